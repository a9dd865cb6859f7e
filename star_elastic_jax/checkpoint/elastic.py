"""Nested elastic checkpoints: ONE Orbax checkpoint holding the permuted parent (every sub-model is
a prefix of it), its named budgets, choice lists, depth ranking and (optionally) router state.

Layout: a :func:`checkpoint.orbax.save_model` checkpoint whose ``metadata.json`` has an ``elastic``
block (format_version, axes description, budgets as choice dicts, choice lists, depth order,
``permuted: true``); router state and importance scores, when given, are Orbax pytrees in
``router/`` and ``scores/`` inside the same atomic write.

Also here: zero-shot slicing of such a checkpoint to one budget (Orbax or HF output) and the
elastic HF export (full parent + ``config.json["elastic"]`` with the slicing recipe). Both work on
the stored arrays only: the model is never built or compiled, and the source is only read.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from star_elastic_jax.config import ModelConfig
from star_elastic_jax.elastic.budget import ChoiceResolver, check_choice_lists, resolve_budget_rule
from star_elastic_jax.elastic.choice import ElasticChoice, resolve_choice
from star_elastic_jax.errors import CheckpointError, ChoiceError

FORMAT_VERSION = 1
ROUTER_STATE = "router"
SCORES_STATE = "scores"
ROUTER_HF_FILE = "elastic_router.safetensors"


@dataclasses.dataclass(frozen=True)
class ElasticInfo:
    """An elastic checkpoint's metadata (no arrays loaded)."""

    path: str
    cfg: ModelConfig
    budgets: dict[str, ElasticChoice]
    choice_lists: dict[str, list[int]] | None
    depth_order: tuple[int, ...] | None
    format_version: int
    permuted: bool = True
    router_config: dict | None = None   # the trained budget router's RouterConfig fields, when stored


@dataclasses.dataclass
class ElasticCheckpoint:
    """A loaded elastic checkpoint: the permuted parent model and everything needed to slice it."""

    model: Any
    budgets: dict[str, ElasticChoice]
    choice_lists: dict[str, list[int]] | None
    depth_order: tuple[int, ...] | None
    router_state: Any | None
    format_version: int
    scores: Any | None = None

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg


# ---------------------------------------------------------------------------------------------- save / load
def axes_description() -> dict[str, dict[str, Any]]:
    from star_elastic_jax.elastic.hf_recipe import axes_description as describe

    return describe()


def _check_budgets(cfg: ModelConfig, budgets: Mapping[str, ElasticChoice], depth_order) -> dict[str, ElasticChoice]:
    if not isinstance(budgets, Mapping):
        raise ChoiceError("budgets", type(budgets).__name__, "a dict {name: ElasticChoice}")
    out = {}
    for name, choice in budgets.items():
        if not isinstance(name, str) or not name.strip():
            raise ChoiceError("budgets", name, "budget names must be non-empty strings")
        if not isinstance(choice, ElasticChoice):
            raise ChoiceError(f"budgets[{name!r}]", type(choice).__name__, "must be an ElasticChoice")
        try:
            choice.resolve(cfg, depth_order=depth_order)
        except ChoiceError as e:
            raise ChoiceError(f"budgets[{name!r}].{e.field}", e.value, e.valid) from None
        out[name] = choice
    return out


def _check_tree(name: str, tree: Any) -> None:
    """Extra state must be a nested dict with string keys and array leaves (it round-trips as such)."""
    if tree is None:
        return
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            if not isinstance(k, str):
                raise CheckpointError(name, k, "pytree dict keys must be strings")
            _check_tree(f"{name}.{k}", v)
    elif not hasattr(tree, "shape") or not hasattr(tree, "dtype"):
        raise CheckpointError(name, type(tree).__name__, "leaves must be arrays (nested dicts of arrays)")


def save_elastic(model, directory: str | os.PathLike, budgets: Mapping[str, ElasticChoice], *,
                 choice_lists: Mapping[str, Sequence[int]] | None = None, router_state: Any = None,
                 scores: Any = None, overwrite: bool = False, router_config: Any = None) -> str:
    """Write ``model`` (the permuted parent) and its named budgets as ONE nested Orbax checkpoint.

    Every budget is validated against the model (``choice.resolve(cfg, depth_order=...)``) and the
    choice lists and extra state are checked before anything is written (:class:`ChoiceError` /
    :class:`CheckpointError`). ``router_state`` / ``scores``: nested dicts of arrays (string keys).
    ``overwrite``: as :func:`checkpoint.orbax.save_model` (only a checkpoint of ours is replaced).
    ``router_config``: the :class:`~star_elastic_jax.elastic.router.RouterConfig` of ``router_state``;
    with both stored, slicing a fraction that is not a stored budget asks the trained router.
    """
    from star_elastic_jax.outputs import check_output_dir

    check_output_dir(directory, overwrite=overwrite, field="directory")  # before any validation work
    from star_elastic_jax.checkpoint.orbax import save_model

    cfg: ModelConfig = model.cfg
    depth_order = model.depth_order
    budgets = _check_budgets(cfg, budgets, depth_order)
    lists = check_choice_lists(cfg, choice_lists)
    _check_tree(ROUTER_STATE, router_state)
    _check_tree(SCORES_STATE, scores)
    meta = {"elastic": {
        "format_version": FORMAT_VERSION,
        "axes": axes_description(),
        "budgets": {name: c.to_dict() for name, c in budgets.items()},
        "choice_lists": lists,
        "depth_order": None if depth_order is None else list(depth_order),
        "permuted": True,
        "router": ROUTER_STATE if router_state is not None else None,
        "scores": SCORES_STATE if scores is not None else None,
        "router_config": None if router_config is None or router_state is None else _jsonable(router_config),
    }}
    extra = {ROUTER_STATE: router_state, SCORES_STATE: scores}
    return save_model(model, directory, metadata=meta, extra_state={k: v for k, v in extra.items() if v is not None},
                      overwrite=overwrite)


def _jsonable(router_config: Any) -> dict:
    import json

    d = dataclasses.asdict(router_config) if dataclasses.is_dataclass(router_config) else dict(router_config)
    return json.loads(json.dumps(d))


def read_elastic(directory: str | os.PathLike, *, verify: bool = True) -> ElasticInfo:
    """Read and validate an elastic checkpoint's metadata (:class:`CheckpointError` if it is not one;
    ``verify``: its JSON files are checked against the manifest first)."""
    from star_elastic_jax.checkpoint.orbax import read_config, read_metadata

    directory = os.path.abspath(os.fspath(directory))
    cfg = read_config(directory, verify=verify)
    block = read_metadata(directory, verify=verify).get("elastic")
    if not isinstance(block, dict):
        raise CheckpointError("metadata.json:elastic", None if block is None else type(block).__name__,
                              f"{directory} is not an elastic checkpoint (write one with save_elastic)")
    version = block.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError("elastic.format_version", version, f"this version reads format {FORMAT_VERSION}")
    depth_order = block.get("depth_order")
    if depth_order is not None:
        if not isinstance(depth_order, list) or sorted(depth_order) != list(range(cfg.num_hidden_layers)):
            raise CheckpointError("elastic.depth_order", depth_order,
                                  f"a permutation of range({cfg.num_hidden_layers}) or null")
        depth_order = tuple(int(i) for i in depth_order)
    raw = block.get("budgets")
    if not isinstance(raw, dict):
        raise CheckpointError("elastic.budgets", raw, "an object {name: choice}")
    budgets = {}
    for name, data in raw.items():
        if not isinstance(data, dict):
            raise CheckpointError(f"elastic.budgets[{name!r}]", data, "a choice object {axis: size}")
        try:
            choice = ElasticChoice.from_dict(data)
            choice.resolve(cfg, depth_order=depth_order)
        except (ChoiceError, TypeError) as e:
            raise CheckpointError(f"elastic.budgets[{name!r}]", data, f"is not a valid choice ({e})") from None
        budgets[name] = choice
    try:
        lists = check_choice_lists(cfg, block.get("choice_lists"))
    except ChoiceError as e:
        raise CheckpointError(f"elastic.{e.field}", e.value, e.valid) from None
    router_config = block.get("router_config")
    if router_config is not None and not isinstance(router_config, dict):
        raise CheckpointError("elastic.router_config", router_config, "an object of RouterConfig fields or null")
    return ElasticInfo(path=directory, cfg=cfg, budgets=budgets, choice_lists=lists, depth_order=depth_order,
                       format_version=version, permuted=bool(block.get("permuted", True)),
                       router_config=router_config)


def load_elastic(directory: str | os.PathLike, *, verify: bool = True, allow_nonfinite: bool = False
                 ) -> ElasticCheckpoint:
    """Load an elastic checkpoint: the parent model (stored dtypes kept), budgets, lists, router state.
    ``verify`` / ``allow_nonfinite``: as :func:`checkpoint.orbax.load_params` (verified once)."""
    from star_elastic_jax.checkpoint.orbax import load_extra_state, load_params
    from star_elastic_jax.model.model import model_from_params

    info = read_elastic(directory, verify=verify)
    cfg, params = load_params(info.path, verify=verify, allow_nonfinite=allow_nonfinite)
    model = model_from_params(cfg, params, depth_order=info.depth_order, where=info.path)
    return ElasticCheckpoint(model=model, budgets=dict(info.budgets), choice_lists=info.choice_lists,
                             depth_order=info.depth_order,
                             router_state=load_extra_state(info.path, ROUTER_STATE, verify=False),
                             format_version=info.format_version,
                             scores=load_extra_state(info.path, SCORES_STATE, verify=False))


# ---------------------------------------------------------------------------------------------- slicing
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
    _precheck(info, choice, hf)
    _, params = load_params(src, verify=False, allow_nonfinite=allow_nonfinite)
    res = _write_slice(info, _numpy_params(params), choice, out, hf=hf, dtype=dtype, max_shard_size=max_shard_size,
                       label=None if explicit else budget, overwrite=overwrite)
    return dataclasses.replace(res, rule=rule)


def trained_router(info: ElasticInfo):
    """The checkpoint's trained :class:`~star_elastic_jax.elastic.router.BudgetRouter` (``None`` when it
    stores no router state or no router config)."""
    from flax import nnx

    from star_elastic_jax.checkpoint.orbax import load_extra_state
    from star_elastic_jax.elastic.router import BudgetRouter, RouterConfig

    if info.router_config is None:
        return None
    state = load_extra_state(info.path, ROUTER_STATE, verify=False)
    if state is None:
        return None
    try:
        router = BudgetRouter(info.cfg, RouterConfig(**info.router_config), rngs=nnx.Rngs(0))
        params = nnx.state(router, nnx.Param)
        params.replace_by_pure_dict(state)
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError("elastic.router_config", info.path, f"does not match the stored router state ({e})") \
            from None
    nnx.update(router, params)
    return router


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


def _precheck(info: ElasticInfo, choice: ElasticChoice, hf: bool) -> None:
    from star_elastic_jax.elastic.slicing import sliced_config

    r = resolve_choice(info.cfg, choice, depth_order=info.depth_order)
    if hf:
        sliced_config(info.cfg, r).to_hf()  # heterogeneous -> ConfigError naming per_layer


def _write_slice(info: ElasticInfo, params: dict[tuple, np.ndarray], choice: ElasticChoice, out: str, *,
                 hf: bool, dtype: str | None, max_shard_size: int | str = "5GB", label=None,
                 overwrite: bool = False) -> SliceResult:
    from star_elastic_jax.checkpoint.hf import params_to_hf
    from star_elastic_jax.checkpoint.orbax import save_params
    from star_elastic_jax.elastic.slicing import slice_params, sliced_depth_order

    r = resolve_choice(info.cfg, choice, depth_order=info.depth_order)
    new_cfg, new_params = slice_params(info.cfg, params, choice, depth_order=info.depth_order)
    marker = {"format_version": FORMAT_VERSION, "sliced": True, "budget": None if label is None else str(label),
              "choice": choice.to_dict()}
    if hf:
        params_to_hf(new_cfg, new_params, out, dtype, max_shard_size=max_shard_size,
                     extra_config={"elastic": marker}, overwrite=overwrite)
    else:
        depth = sliced_depth_order(info.depth_order, r.keep)
        marker["depth_order"] = None if depth is None else list(depth)
        save_params(new_cfg, _cast(new_params, new_cfg, dtype), out,
                    metadata={"source": info.path, "elastic_slice": marker}, overwrite=overwrite)
    return SliceResult(out=out, choice=choice, cfg=new_cfg,
                       active_fraction=new_cfg.param_count().active / info.cfg.param_count().active)


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
    """config.json's ``elastic`` block for the parent ``cfg`` (see ``elastic/hf_recipe.py``)."""
    from star_elastic_jax.elastic.hf_recipe import budget_entry, build_recipe

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
    choices = {label: b if isinstance(b, ElasticChoice) else resolve_budget_rule(info, b)[0]
               for label, b in budgets.items()}
    for c in choices.values():
        _precheck(info, c, hf=False)
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


__all__ = ["ElasticCheckpoint", "ElasticInfo", "FORMAT_VERSION", "SliceResult", "dir_bytes", "elastic_hf_block",
           "export_elastic_hf", "load_elastic", "measure_storage", "read_elastic", "router_resolver", "save_elastic",
           "slice_checkpoint", "trained_router"]
