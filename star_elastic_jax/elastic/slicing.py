"""Zero-shot slicing: cut a (permuted) parent's parameters and config down to an elastic choice.

Pure array slicing driven by the axes table. A grouped prefix (the first ``c/g`` units of each of
``g`` groups, ``unit`` channels each) is a reshape to ``[g, n/g * unit]``, a basic slice and a
reshape back, so it works the same on numpy and JAX arrays, without gathers or compilation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from star_elastic_jax.config import ModelConfig
from star_elastic_jax.elastic.axes import AXES, PER_LAYER_AXES, full_size, leaf_dims
from star_elastic_jax.elastic.choice import ElasticChoice, ResolvedChoice, ensure_resolved

Path = tuple


def slice_dim(arr: Any, dim: int, n_units: int, groups: int, keep: int, unit: int) -> Any:
    """Keep the first ``keep/groups`` units of every group along ``dim``."""
    if keep == n_units:
        return arr
    shape = arr.shape
    per = n_units // groups * unit
    grouped = arr.reshape(shape[:dim] + (groups, per) + shape[dim + 1:])
    index = (slice(None),) * (dim + 1) + (slice(0, keep // groups * unit),)
    return grouped[index].reshape(shape[:dim] + (keep * unit,) + shape[dim + 1:])


def sliced_config(cfg: ModelConfig, r: ResolvedChoice) -> ModelConfig:
    """The config of the sub-model: hidden_size, per-axis sizes and (depth) pattern rewritten.

    Homogeneous sizes go into the global HF fields; heterogeneous ones into ``per_layer``.
    n_groups, KV heads, head dims, state size, top-k and the routing groups (``n_group``,
    ``topk_group``: experts are kept per group) never change.
    """
    kept = [s for s, k in zip(r.layer_sizes, r.keep) if k]
    changes: dict[str, Any] = {"hidden_size": r.hidden,
                               "hybrid_override_pattern": "".join(s.kind for s in kept)}
    hetero = False
    for axis in PER_LAYER_AXES:
        ax = AXES[axis]
        values = {getattr(s, ax.layer_field) for s in kept if s.kind in ax.kinds}
        if len(values) == 1:
            changes[ax.size_field] = values.pop()
        elif len(values) > 1:
            hetero = True
    changes["per_layer"] = tuple(kept) if hetero else None
    return dataclasses.replace(cfg, **changes)


def slice_params(cfg: ModelConfig, params: Mapping[Path, Any], choice: ElasticChoice | ResolvedChoice, *,
                 depth_order: Sequence[int] | None = None) -> tuple[ModelConfig, dict[Path, Any]]:
    """Slice a flat ``{nnx path: array}`` dict to ``choice`` (resolved or not). Returns
    ``(new_cfg, new_params)``."""
    r = ensure_resolved(cfg, choice, depth_order=depth_order)
    table = leaf_dims(cfg)
    renumber = {old: new for new, old in enumerate(i for i, k in enumerate(r.keep) if k)}
    out: dict[Path, Any] = {}
    for path, arr in params.items():
        layer = path[1] if path[0] == "layers" else None
        if layer is not None and layer not in renumber:
            continue  # dropped by the depth axis
        for axis, ld in table.get(tuple(path), ()):
            if axis == "hidden":
                n, keep, groups = cfg.hidden_size, r.hidden, 1
            else:
                n = full_size(cfg, axis, layer)
                keep = getattr(r.layer_sizes[layer], AXES[axis].layer_field)
                groups = AXES[axis].groups(cfg)
            arr = slice_dim(arr, ld.dim, n, groups, keep, ld.unit_size(cfg))
        new_path = tuple(path) if layer is None else ("layers", renumber[layer]) + tuple(path[2:])
        out[new_path] = arr
    return sliced_config(cfg, r), out


def sliced_depth_order(depth_order: Sequence[int] | None, keep: Sequence[bool]) -> tuple[int, ...] | None:
    """The parent's depth ranking restricted to the kept blocks, renumbered."""
    if depth_order is None:
        return None
    renumber = {old: new for new, old in enumerate(i for i, k in enumerate(keep) if k)}
    return tuple(renumber[i] for i in depth_order if i in renumber)


def slice_model(model, choice: ElasticChoice | ResolvedChoice):
    """A physically smaller :class:`NemotronH` holding exactly the sub-model ``choice`` selects."""
    from flax import nnx

    from star_elastic_jax.model.model import model_from_params

    import jax
    import numpy as np

    # On the host: basic numpy slicing compiles nothing (eager JAX slicing would compile per shape).
    params = {tuple(p): np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(nnx.state(model))}
    r = ensure_resolved(model.cfg, choice, depth_order=model.depth_order)
    new_cfg, new_params = slice_params(model.cfg, params, r)
    return model_from_params(new_cfg, new_params, depth_order=sliced_depth_order(model.depth_order, r.keep))
