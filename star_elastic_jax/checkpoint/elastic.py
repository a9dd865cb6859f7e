"""Nested elastic checkpoints: ONE Orbax checkpoint holding the permuted parent (every sub-model is
a prefix of it), its named budgets, choice lists, depth ranking and (optionally) router state.

Layout: a :func:`checkpoint.orbax.save_model` checkpoint whose ``metadata.json`` has an ``elastic``
block (format_version, axes description, budgets as choice dicts, choice lists, depth order,
``permuted: true``); router state and importance scores, when given, are Orbax pytrees in
``router/`` and ``scores/`` inside the same atomic write.

This module is the on-disk format only (and :func:`trained_router`, which reads the stored router).
Slicing a budget out of it, the elastic HF export and storage measurement are exporters:
:mod:`star_elastic_jax.export.elastic`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

from star_elastic_jax.config import ModelConfig
from star_elastic_jax.elastic.axes import axes_description
from star_elastic_jax.elastic.budget import check_choice_lists
from star_elastic_jax.elastic.choice import ElasticChoice
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
    resolved: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # name -> ResolvedChoice


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
                 scores: Any = None, overwrite: bool = False, router_config: Any = None,
                 tokenizer: str | None = None) -> str:
    """Write ``model`` (the permuted parent) and its named budgets as ONE nested Orbax checkpoint.

    Every budget is validated against the model (``choice.resolve(cfg, depth_order=...)``) and the
    choice lists and extra state are checked before anything is written (:class:`ChoiceError` /
    :class:`CheckpointError`). ``router_state`` / ``scores``: nested dicts of arrays (string keys).
    ``overwrite``: as :func:`checkpoint.orbax.save_model` (only a checkpoint of ours is replaced).
    ``router_config``: the :class:`~star_elastic_jax.elastic.router.RouterConfig` of ``router_state``;
    with both stored, slicing a fraction that is not a stored budget asks the trained router.
    ``tokenizer``: as :func:`~star_elastic_jax.checkpoint.orbax.save_model` (generation reads it).
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
                      overwrite=overwrite, tokenizer=tokenizer)


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
    budgets, resolved = {}, {}
    for name, data in raw.items():
        if not isinstance(data, dict):
            raise CheckpointError(f"elastic.budgets[{name!r}]", data, "a choice object {axis: size}")
        try:
            choice = ElasticChoice.from_dict(data)
            resolved[name] = choice.resolve(cfg, depth_order=depth_order)
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
                       router_config=router_config, resolved=resolved)


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


__all__ = ["ElasticCheckpoint", "ElasticInfo", "FORMAT_VERSION", "ROUTER_HF_FILE", "ROUTER_STATE", "SCORES_STATE",
           "load_elastic", "read_elastic", "save_elastic", "trained_router"]
