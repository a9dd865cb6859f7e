"""Exporters of nested elastic checkpoints (``checkpoint/elastic.py`` is their on-disk format):
zero-shot slicing of one budget (Orbax or HF output), the elastic HF export (full parent +
``config.json["elastic"]`` with the slicing recipe that ``export/slice_hf.py`` applies), and the
nested-vs-separate storage measurement. All work on the stored arrays only: the model is never
built or compiled, and the source is only read.

The budget's path through :func:`slice_checkpoint`: the name or fraction is resolved once
(:func:`elastic.budget.resolve_budget_rule`: a stored name, the trained router within its trained
budgets, else the exhaustive search) into an :class:`ElasticChoice`, which is resolved once
against the config (:func:`elastic.choice.resolve_choice`) into a :class:`ResolvedChoice` that the
HF pre-check, :func:`elastic.slicing.slice_params` (the axes table) and the marker all read.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from star_elastic_jax.checkpoint.elastic import (FORMAT_VERSION, ROUTER_HF_FILE, ROUTER_STATE, ElasticInfo,
                                                 read_elastic, trained_router)
from star_elastic_jax.config import ModelConfig
from star_elastic_jax.elastic.budget import RULE_STORED, ChoiceResolver, resolve_budget_rule
from star_elastic_jax.elastic.choice import ElasticChoice, ResolvedChoice, resolve_choice
from star_elastic_jax.errors import CheckpointError, ChoiceError


@dataclasses.dataclass(frozen=True)
class SliceResult:
    out: str
    choice: ElasticChoice
    cfg: ModelConfig               # the sliced model's config
    active_fraction: float = 1.0   # its active parameters over the parent's
    rule: str = "explicit"         # how the budget was resolved: stored / router / search / explicit


def _numpy_params(params: Mapping[tuple, Any]) -> dict[tuple, np.ndarray]:
    import jax

    return {p: np.asarray(jax.device_get(v)) for p, v in params.items()}


def _cast(params: dict[tuple, np.ndarray], cfg: ModelConfig, dtype: str | None) -> dict[tuple, np.ndarray]:
    """Cast floating leaves to ``dtype``, except buffers (kept fp32, like the HF export)."""
    if dtype is None:
        return params
    from flax import nnx

    from star_elastic_jax.checkpoint.hf import _NP_DTYPES
    from star_elastic_jax.model.model import abstract_model
    from star_elastic_jax.model.params import Buffer

    if dtype not in _NP_DTYPES:
        raise CheckpointError("dtype", dtype, f"one of {sorted(_NP_DTYPES)}")
    abstract = abstract_model(cfg)
    buffers = {tuple(p) for p, v in nnx.to_flat_state(nnx.state(abstract)) if isinstance(v, Buffer)}
    return {p: v if p in buffers else v.astype(_NP_DTYPES[dtype]) for p, v in params.items()}


def slice_checkpoint(src: str | os.PathLike, budget: str | float | ElasticChoice, out: str | os.PathLike, *,
                     hf: bool = False, dtype: str | None = None, max_shard_size: int | str = "5GB",
                     resolver: ChoiceResolver | None = None, overwrite: bool = False, verify: bool = True,
                     allow_nonfinite: bool = False) -> SliceResult:
    """Cut ``budget`` (a stored budget name, a fraction, or an explicit :class:`ElasticChoice`) out of
    the elastic checkpoint ``src`` and write it to ``out``: an Orbax model checkpoint, or with
    ``hf=True`` an HF NemotronH checkpoint (heterogeneous choices raise
    :class:`ConfigError` before anything is read or written). Pure array slicing of the stored
    arrays; ``src`` is only read (and verified, unless ``verify=False``). ``out`` must not overlap
    ``src``; an existing one is replaced only with ``overwrite`` and only if it is ours. Both outputs
    keep the stored dtypes unless ``dtype`` is set (lossless; the CLI's ``--hf`` defaults to bf16).
    """
    from star_elastic_jax.checkpoint.orbax import load_params, verify_checkpoint
    from star_elastic_jax.elastic.budget import parse_fraction
    from star_elastic_jax.outputs import check_output_dir, parse_size

    src = os.path.abspath(os.fspath(src))
    out = check_output_dir(out, inputs=[src], overwrite=overwrite)
    parse_size(max_shard_size)
    info = read_elastic(src, verify=verify)
    explicit = isinstance(budget, ElasticChoice)
    if not explicit and not (isinstance(budget, str) and budget in info.budgets):
        parse_fraction(budget, names=tuple(info.budgets))  # a bad budget fails before the digests
    if verify:
        verify_checkpoint(src)
    if explicit:
        choice, rule = budget, "explicit"
    else:
        choice, rule = resolve_budget_rule(info, budget, resolver=resolver or router_resolver(info, budget))
    if rule == RULE_STORED:
        resolved = info.resolved[budget]  # validated by read_elastic
    else:
        resolved = resolve_choice(info.cfg, choice, depth_order=info.depth_order)
    _precheck(info, resolved, hf)
    _, params = load_params(src, verify=False, allow_nonfinite=allow_nonfinite)
    res = _write_slice(info, _numpy_params(params), resolved, out, hf=hf, dtype=dtype, max_shard_size=max_shard_size,
                       label=None if explicit else budget, overwrite=overwrite)
    return dataclasses.replace(res, rule=rule)


def router_resolver(info: ElasticInfo, budget: str | float) -> ChoiceResolver | None:
    """A resolver asking the trained router for ``budget`` when the checkpoint has one and the
    fraction lies within its trained budgets (it interpolates between them); else ``None``, and the
    exhaustive search decides."""
    from star_elastic_jax.elastic.budget import parse_fraction

    if info.router_config is None or (isinstance(budget, str) and budget in info.budgets):
        return None
    try:
        fraction = parse_fraction(budget)
    except ChoiceError:
        return None  # resolve_budget_rule reports it
    trained = info.router_config.get("budgets") or []
    if not trained or fraction < min(trained):
        return None
    router = trained_router(info)
    return None if router is None else (lambda cfg, f: router.choice(f))


def _precheck(info: ElasticInfo, r: ResolvedChoice, hf: bool) -> None:
    from star_elastic_jax.elastic.slicing import sliced_config

    if hf:
        sliced_config(info.cfg, r).to_hf()  # heterogeneous -> ConfigError naming per_layer


def _write_slice(info: ElasticInfo, params: dict[tuple, np.ndarray], r: ResolvedChoice, out: str, *,
                 hf: bool, dtype: str | None, max_shard_size: int | str = "5GB", label=None,
                 overwrite: bool = False) -> SliceResult:
    from star_elastic_jax.checkpoint.hf import params_to_hf
    from star_elastic_jax.checkpoint.orbax import save_params
    from star_elastic_jax.elastic.slicing import slice_params, sliced_depth_order

    new_cfg, new_params = slice_params(info.cfg, params, r)
    marker = {"format_version": FORMAT_VERSION, "sliced": True, "budget": None if label is None else str(label),
              "choice": r.choice.to_dict()}
    if hf:
        params_to_hf(new_cfg, new_params, out, dtype, max_shard_size=max_shard_size,
                     extra_config={"elastic": marker}, overwrite=overwrite)
    else:
        depth = sliced_depth_order(info.depth_order, r.keep)
        marker["depth_order"] = None if depth is None else list(depth)
        save_params(new_cfg, _cast(new_params, new_cfg, dtype), out,
                    metadata={"source": info.path, "elastic_slice": marker}, overwrite=overwrite,
                    tokenizer=_source_tokenizer(info.path))
    return SliceResult(out=out, choice=r.choice, cfg=new_cfg,
                       active_fraction=new_cfg.param_count().active / info.cfg.param_count().active)


def _source_tokenizer(src: str) -> str | None:
    """The tokenizer a slice inherits: ``"byte"``, the source's ``tokenizer.json``, or None."""
    from star_elastic_jax.checkpoint.orbax import TOKENIZER_NAME, read_metadata

    name = read_metadata(src, verify=False).get("tokenizer")
    return os.path.join(src, TOKENIZER_NAME) if name == TOKENIZER_NAME else name


def export_elastic_hf(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
                      max_shard_size: int | str = "5GB", overwrite: bool = False, verify: bool = True,
                      allow_nonfinite: bool = False) -> str:
    """Write the full permuted parent of elastic checkpoint ``src`` in HF format; config.json gets an
    ``elastic`` block (budgets with their sliced config fields and counts, the slicing recipe) that
    ``star_elastic_jax/export/slice_hf.py`` reads; router state goes to ``elastic_router.safetensors``.
    ``out`` must not overlap ``src``; ``overwrite`` / ``verify`` as :func:`slice_checkpoint`."""
    from star_elastic_jax.checkpoint.hf import params_to_hf
    from star_elastic_jax.outputs import parse_size
    from star_elastic_jax.checkpoint.orbax import load_extra_state, load_params
    from star_elastic_jax.outputs import check_output_dir

    src = os.path.abspath(os.fspath(src))
    out = check_output_dir(out, inputs=[src], overwrite=overwrite)
    parse_size(max_shard_size)
    info = read_elastic(src, verify=verify)
    block = elastic_hf_block(info.cfg, info.budgets, depth_order=info.depth_order)
    cfg, params = load_params(info.path, verify=verify, allow_nonfinite=allow_nonfinite)
    router = load_extra_state(info.path, ROUTER_STATE, verify=False)
    extra_files = None
    if router is not None:
        import jax

        flat = jax.tree_util.tree_flatten_with_path(router)[0]
        tensors = {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v)
                   for path, v in flat}
        extra_files = {ROUTER_HF_FILE: tensors}
        block["router_file"] = ROUTER_HF_FILE
    return params_to_hf(cfg, _numpy_params(params), out, dtype, max_shard_size=max_shard_size,
                        extra_config={"elastic": block}, extra_files=extra_files, overwrite=overwrite)


def elastic_hf_block(cfg: ModelConfig, budgets: Mapping[str, ElasticChoice], *,
                     depth_order: Sequence[int] | None = None) -> dict[str, Any]:
    """config.json's ``elastic`` block for the parent ``cfg`` (see ``export/hf_recipe.py``)."""
    from star_elastic_jax.export.hf_recipe import budget_entry, build_recipe

    return {"format_version": FORMAT_VERSION, "permuted": True,
            "budgets": {name: budget_entry(cfg, c, depth_order=depth_order) for name, c in budgets.items()},
            "recipe": build_recipe(cfg)}


# ---------------------------------------------------------------------------------------------- sizes
def dir_bytes(path: str | os.PathLike) -> int:
    """Bytes of every regular file under ``path`` (what the checkpoint occupies, metadata included)."""
    total = 0
    for root, _, files in os.walk(os.fspath(path)):
        for f in files:
            p = os.path.join(root, f)
            if os.path.isfile(p) and not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def measure_storage(src: str | os.PathLike, budgets: Mapping[str, ElasticChoice | str | float], *,
                    workdir: str | os.PathLike | None = None, verify: bool = True) -> tuple[int, dict[str, int]]:
    """``(nested bytes, {label: bytes of that budget's separately sliced Orbax checkpoint})``. The
    source arrays are read once; each budget is sliced into a temporary directory, measured, deleted."""
    import shutil
    import tempfile

    from star_elastic_jax.checkpoint.orbax import load_params

    info = read_elastic(src, verify=verify)
    choices = {label: resolve_choice(info.cfg, b if isinstance(b, ElasticChoice) else resolve_budget_rule(info, b)[0],
                                     depth_order=info.depth_order)
               for label, b in budgets.items()}
    nested = dir_bytes(info.path)
    _, params = load_params(info.path, verify=verify)
    params = _numpy_params(params)
    sizes: dict[str, int] = {}
    tmp_root = tempfile.mkdtemp(prefix="star-elastic-measure-", dir=workdir)
    try:
        for label, choice in choices.items():
            out = os.path.join(tmp_root, "slice")
            _write_slice(info, params, choice, out, hf=False, dtype=None, label=label)
            sizes[label] = dir_bytes(out)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return nested, sizes


__all__ = ["SliceResult", "dir_bytes", "elastic_hf_block", "export_elastic_hf", "measure_storage", "router_resolver",
           "slice_checkpoint"]
