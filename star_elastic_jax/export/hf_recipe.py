"""The HF slicing recipe: how to cut every tensor of an exported elastic checkpoint, as plain JSON.

Generated from the two tables and nothing else: ``checkpoint/hf_keys.py`` (which of our leaves make
up each HF tensor, concatenated along which dim, per-expert keys, extra singleton dims) and
``elastic/axes.py`` (which axis cuts which leaf dim, unit size, grouping). A PyTorch-only slicer
(``star_elastic_jax/export/slice_hf.py``) interprets it without knowing either table.

Recipe (``config.json["elastic"]["recipe"]``)::

    {"format_version": 1,
     "num_hidden_layers": L,
     "size_fields": {axis: config.json field},          # e.g. "mamba_heads": "mamba_num_heads"
     "tensors": [                                       # on-disk order
       {"key": "backbone.layers.{layer}.mixer.in_proj.weight",   # template: {layer} (and {expert})
        "layer": 0,                                     # block index, null for global tensors
        "experts": null,                                # or {"axis": "experts", "layer": i, "count": E,
                                                        #     "groups": G}: the key stands for E tensors
                                                        #   {expert}=0..E-1 in G equal contiguous groups;
                                                        #   a size c keeps the first c/G of every group,
                                                        #   renumbered 0..c-1 in order
        "shape": [328, 64],                             # full shape of each such tensor
        "dims": [                                       # one segment list per dim of the tensor
          [{"length": 128, "axis": "mamba_heads", "unit": 16, "groups": 2, "layer": 0},   # z
           {"length": 128, "axis": "mamba_heads", "unit": 16, "groups": 2, "layer": 0},   # x
           {"length": 64,  "axis": null, "unit": 1, "groups": 1, "layer": null},          # B|C
           {"length": 8,   "axis": "mamba_heads", "unit": 1, "groups": 2, "layer": 0}],   # dt
          [{"length": 64, "axis": "hidden", "unit": 1, "groups": 1, "layer": null}]]}, ...]}

A dim is the concatenation of its segments. A segment with an axis holds ``length / unit`` units
in ``groups`` equal groups, ``unit`` consecutive channels per unit; a size ``c`` keeps the first
``c / groups`` units of every group (the grouped prefix of ``axes.kept_units``). ``layer`` says
which block's size applies (null: the axis is global, i.e. ``hidden``). Per-expert keys follow the
same rule over the expert index (``groups``: the routing groups, ``n_group``); a recipe without
``experts.groups`` means one group (a plain prefix).

Budgets (``config.json["elastic"]["budgets"][name]``) carry, besides the choice and counts, the
resolved sizes the slicer reads: ``"sizes": {"hidden": int, axis: [size or null per block]}``
(null where the axis does not live) and ``"keep_layers"`` (kept block indices, ascending; dropped
blocks' tensors are removed and the rest renumbered), and ``"config"``: the config.json fields of
the sliced model (every axis' ``size_field`` plus the pattern).
"""
from __future__ import annotations

from typing import Any, Sequence

from star_elastic_jax.checkpoint.hf_keys import ONDISK_LAYER_PREFIX, entries
from star_elastic_jax.config import ModelConfig
from star_elastic_jax.elastic.axes import AXES, PER_LAYER_AXES, WIDTH_AXES, LeafDim, layers_of, leaf_dims
from star_elastic_jax.elastic.choice import ElasticChoice, ResolvedChoice, ensure_resolved
from star_elastic_jax.elastic.slicing import sliced_config
from star_elastic_jax.errors import ConfigError

RECIPE_VERSION = 2  # 2: per-expert entries carry their routing groups
LAYER_FIELD = "{layer}"
EXPERT_FIELD = "{expert}"


def size_fields() -> dict[str, str]:
    """Axis -> the config.json field holding its (homogeneous) size."""
    return {name: ax.size_field for name, ax in AXES.items()}


def _leaf_shapes(cfg: ModelConfig) -> dict[tuple, tuple[int, ...]]:
    from flax import nnx

    from star_elastic_jax.model.model import abstract_model

    abstract = abstract_model(cfg)
    return {tuple(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(abstract))}


def _segment(cfg: ModelConfig, length: int, cut: tuple[str, LeafDim] | None, layer: int | None) -> dict[str, Any]:
    if cut is None:
        return {"length": int(length), "axis": None, "unit": 1, "groups": 1, "layer": None}
    axis, ld = cut
    ax = AXES[axis]
    return {"length": int(length), "axis": axis, "unit": ld.unit_size(cfg), "groups": ax.groups(cfg),
            "layer": layer if ax.per_layer else None}


def _cut(table: dict, path: tuple, dim: int) -> tuple[str, LeafDim] | None:
    cuts = [(axis, ld) for axis, ld in table.get(path, ()) if ld.dim == dim]
    if len(cuts) > 1:
        raise ConfigError("axes table", path, f"dim {dim} is cut by several axes {[a for a, _ in cuts]}")
    return cuts[0] if cuts else None


def build_recipe(cfg: ModelConfig) -> dict[str, Any]:
    """The JSON-able recipe of the full (elastic parent) model ``cfg``; see the module docstring."""
    if cfg.per_layer is not None:
        raise ConfigError("per_layer", "heterogeneous per-layer sizes", "the recipe describes a full parent model")
    table = leaf_dims(cfg)
    shapes = _leaf_shapes(cfg)
    tensors: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    for entry in entries(cfg):
        layer = entry.paths[0][1] if entry.paths[0][0] == "layers" else None
        km = entry.km
        if entry.expert is not None:
            if (layer, km.hf) in seen:
                continue  # one recipe entry stands for all experts of the layer
            seen.add((layer, km.hf))
        key = entry.hf_key if layer is None else \
            ONDISK_LAYER_PREFIX.format(i=LAYER_FIELD) + km.hf.replace("{e}", EXPERT_FIELD)
        experts = None
        leaf_dims_of_hf: list[int] = list(range(len(shapes[entry.paths[0]])))  # HF dim -> leaf dim (None: extra)
        if entry.expert is not None:
            cut = _cut(table, entry.paths[0], 0)
            n = shapes[entry.paths[0]][0]
            experts = {"axis": None if cut is None else cut[0], "layer": layer, "count": n,
                       "groups": 1 if cut is None else AXES[cut[0]].groups(cfg)}
            leaf_dims_of_hf = leaf_dims_of_hf[1:]
        hf_dims: list[int | None] = list(leaf_dims_of_hf)
        for d in km.hf_extra_dims:
            hf_dims.insert(d, None)
        dims = []
        for leaf_d in hf_dims:
            if leaf_d is None:
                dims.append([_segment(cfg, 1, None, None)])
                continue
            parts = entry.paths if (len(entry.paths) > 1 and leaf_d == km.axis) else entry.paths[:1]
            segs = [_segment(cfg, shapes[p][leaf_d], _cut(table, p, leaf_d), layer) for p in parts]
            if len(parts) == 1 and len(entry.paths) > 1:
                others = {(_cut(table, p, leaf_d) or ("",))[0] for p in entry.paths}
                if len(others) > 1:
                    raise ConfigError("axes table", entry.hf_key,
                                      f"fused leaves disagree on the axis of dim {leaf_d}: {sorted(others)}")
            dims.append(segs)
        shape = [sum(s["length"] for s in segs) for segs in dims]
        tensors.append({"key": key, "layer": layer, "experts": experts, "shape": shape, "dims": dims})
    return {"format_version": RECIPE_VERSION, "num_hidden_layers": cfg.num_hidden_layers,
            "size_fields": size_fields(), "tensors": tensors}


def hf_config_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json fields a slice can change, with ``cfg``'s values."""
    fields = {ax.size_field: getattr(cfg, ax.size_field) for ax in AXES.values()}
    fields["hybrid_override_pattern"] = cfg.hybrid_override_pattern
    return fields


def budget_entry(cfg: ModelConfig, choice: ElasticChoice | ResolvedChoice, *,
                 depth_order: Sequence[int] | None = None) -> dict[str, Any]:
    """What the slicer needs for one budget (see the module docstring)."""
    from star_elastic_jax.config import count_params

    r = ensure_resolved(cfg, choice, depth_order=depth_order)
    sub = sliced_config(cfg, r)
    pc = count_params(cfg, r.layer_sizes, hidden=r.hidden, keep=r.keep)
    sizes: dict[str, Any] = {"hidden": r.hidden}
    for axis in PER_LAYER_AXES:
        per: list[int | None] = [None] * cfg.num_hidden_layers
        for i in layers_of(cfg, axis):
            per[i] = int(getattr(r.layer_sizes[i], AXES[axis].layer_field))
        sizes[axis] = per
    assert set(sizes) == set(WIDTH_AXES)
    return {"choice": r.choice.to_dict(), "config": hf_config_fields(sub), "sizes": sizes,
            "keep_layers": [i for i, k in enumerate(r.keep) if k], "hf_exportable": sub.per_layer is None,
            "total_params": pc.total, "active_params": pc.active}
