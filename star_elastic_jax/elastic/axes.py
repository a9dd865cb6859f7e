"""THE elastic-axes table: for every elastic axis, which parameter leaves it indexes and along
which dimension. Masks, importance permutations, slicing and the HF slicing recipe all read this
table and nothing else.

Units and layout. An axis counts *units* (channels, heads, experts, layers). A leaf dimension
holds ``unit`` channels per unit, unit-major (a Mamba head owns ``mamba_head_dim`` consecutive
rows of ``in_proj_x``). Grouped axes keep a *prefix within every group*: units are group-major,
``n_units / n_groups`` per group, and a size ``c`` keeps the first ``c / n_groups`` of each group
(Mamba heads within each of the ``n_groups`` B/C groups; query heads within each KV group; routed
experts within each of the ``n_group`` routing groups). That is what keeps B/C sharing and GQA
intact, what makes the per-group norm correction exact, and what keeps group-limited routing
(a token first keeps the ``topk_group`` groups with the best top-2 scores) choosing among the same
groups as the sliced router: every group keeps its own best experts and stays a group.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from star_elastic_jax.config import LayerSizes, ModelConfig


@dataclasses.dataclass(frozen=True)
class LeafDim:
    """One parameter leaf an axis indexes: ``path`` (relative to the block, or to the model for
    global leaves) along ``dim``, with ``unit`` channels per unit (int or a ModelConfig field)."""

    path: str
    dim: int
    unit: int | str = 1

    def unit_size(self, cfg: ModelConfig) -> int:
        return self.unit if isinstance(self.unit, int) else int(getattr(cfg, self.unit))


@dataclasses.dataclass(frozen=True)
class Axis:
    name: str
    kinds: str                    # block kinds it lives in ("" for the global hidden axis)
    size_field: str               # ModelConfig field with the full size, rewritten by a slice
    layer_field: str = ""         # LayerSizes field for per-layer (heterogeneous) sizes
    groups_field: str | None = None  # prefix taken within each of cfg.<groups_field> groups
    leaves: tuple[LeafDim, ...] = ()            # per-block leaves (for blocks of ``kinds``)
    global_leaves: tuple[LeafDim, ...] = ()     # model-level leaves
    block_leaves: dict = dataclasses.field(default_factory=dict)  # kind -> leaves (hidden axis)

    @property
    def per_layer(self) -> bool:
        return bool(self.layer_field)

    def groups(self, cfg: ModelConfig) -> int:
        return 1 if self.groups_field is None else int(getattr(cfg, self.groups_field))

    def leaves_for(self, kind: str) -> tuple[LeafDim, ...]:
        if self.block_leaves:
            return self.block_leaves.get(kind, ())
        return self.leaves if kind in self.kinds else ()


_HIDDEN_BLOCK_LEAVES = {
    "M": (LeafDim("norm.weight", 0), LeafDim("mixer.in_proj_z", 1), LeafDim("mixer.in_proj_x", 1),
          LeafDim("mixer.in_proj_bc", 1), LeafDim("mixer.in_proj_dt", 1), LeafDim("mixer.out_proj", 0)),
    "*": (LeafDim("norm.weight", 0), LeafDim("mixer.q_proj", 1), LeafDim("mixer.k_proj", 1),
          LeafDim("mixer.v_proj", 1), LeafDim("mixer.o_proj", 0)),
    "E": (LeafDim("norm.weight", 0), LeafDim("mixer.gate_weight", 1), LeafDim("mixer.experts_up", 2),
          LeafDim("mixer.experts_down", 1), LeafDim("mixer.shared_experts.up_proj", 1),
          LeafDim("mixer.shared_experts.down_proj", 0)),
    "-": (LeafDim("norm.weight", 0), LeafDim("mixer.up_proj", 1), LeafDim("mixer.down_proj", 0)),
}

AXES: dict[str, Axis] = {
    "hidden": Axis(
        "hidden", kinds="", size_field="hidden_size",
        global_leaves=(LeafDim("embeddings", 1), LeafDim("lm_head", 1), LeafDim("norm_f.weight", 0)),
        block_leaves=_HIDDEN_BLOCK_LEAVES),
    "mamba_heads": Axis(
        "mamba_heads", kinds="M", size_field="mamba_num_heads", layer_field="mamba_heads", groups_field="n_groups",
        leaves=(LeafDim("mixer.in_proj_z", 0, "mamba_head_dim"), LeafDim("mixer.in_proj_x", 0, "mamba_head_dim"),
                LeafDim("mixer.in_proj_dt", 0), LeafDim("mixer.conv_x_weight", 0, "mamba_head_dim"),
                LeafDim("mixer.conv_x_bias", 0, "mamba_head_dim"), LeafDim("mixer.dt_bias", 0),
                LeafDim("mixer.A_log", 0), LeafDim("mixer.D", 0), LeafDim("mixer.norm_weight", 0, "mamba_head_dim"),
                LeafDim("mixer.out_proj", 1, "mamba_head_dim"))),
    "attn_heads": Axis(
        "attn_heads", kinds="*", size_field="num_attention_heads", layer_field="attn_heads",
        groups_field="num_key_value_heads",
        leaves=(LeafDim("mixer.q_proj", 0, "head_dim"), LeafDim("mixer.o_proj", 1, "head_dim"))),
    "experts": Axis(
        "experts", kinds="E", size_field="n_routed_experts", layer_field="experts", groups_field="n_group",
        leaves=(LeafDim("mixer.gate_weight", 0), LeafDim("mixer.e_score_correction_bias", 0),
                LeafDim("mixer.experts_up", 0), LeafDim("mixer.experts_down", 0))),
    "expert_ffn": Axis(
        "expert_ffn", kinds="E", size_field="moe_intermediate_size", layer_field="expert_ffn",
        leaves=(LeafDim("mixer.experts_up", 1), LeafDim("mixer.experts_down", 2))),
    "mlp_ffn": Axis(
        "mlp_ffn", kinds="-", size_field="intermediate_size", layer_field="mlp_ffn",
        leaves=(LeafDim("mixer.up_proj", 0), LeafDim("mixer.down_proj", 1))),
    # Depth removes whole blocks (in the order of a depth ranking); it indexes no leaf dimension.
    "depth": Axis("depth", kinds="M*E-", size_field="num_hidden_layers"),
}
WIDTH_AXES = ("hidden", "mamba_heads", "attn_heads", "experts", "expert_ffn", "mlp_ffn")
PER_LAYER_AXES = tuple(a for a in WIDTH_AXES if AXES[a].per_layer)


def full_size(cfg: ModelConfig, axis: str, layer: int | None = None) -> int:
    """The unsliced size of ``axis`` (at block ``layer`` for per-layer axes)."""
    ax = AXES[axis]
    if ax.per_layer and layer is not None:
        return int(getattr(cfg.layer_sizes(layer), ax.layer_field))
    return int(getattr(cfg, ax.size_field))


def layers_of(cfg: ModelConfig, axis: str) -> list[int]:
    """Block indices an axis lives in (all blocks for ``hidden`` and ``depth``)."""
    ax = AXES[axis]
    if not ax.kinds or axis == "depth":
        return list(range(cfg.num_hidden_layers))
    return [i for i, k in enumerate(cfg.hybrid_override_pattern) if k in ax.kinds]


def kept_units(n: int, groups: int, size: int) -> np.ndarray:
    """Indices of the units a prefix of ``size`` keeps out of ``n`` in ``groups`` equal groups."""
    per, keep = n // groups, size // groups
    return (np.arange(groups)[:, None] * per + np.arange(keep)[None, :]).reshape(-1)


def unit_prefix_mask(n: int, groups: int, size: int) -> np.ndarray:
    """``[n]`` 0/1 float mask of :func:`kept_units`."""
    m = np.zeros((n,), np.float32)
    m[kept_units(n, groups, size)] = 1.0
    return m


def expand_units(units: np.ndarray, unit: int) -> np.ndarray:
    """Unit indices -> channel indices (each unit owns ``unit`` consecutive channels)."""
    return (np.asarray(units)[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)


def leaf_dims(cfg: ModelConfig) -> dict[tuple, list[tuple[str, LeafDim]]]:
    """Every parameter path the table touches -> ``[(axis, LeafDim), ...]`` (for this config)."""
    out: dict[tuple, list[tuple[str, LeafDim]]] = {}
    for name in WIDTH_AXES:
        ax = AXES[name]
        for ld in ax.global_leaves:
            out.setdefault(tuple(ld.path.split(".")), []).append((name, ld))
        for i, kind in enumerate(cfg.hybrid_override_pattern):
            for ld in ax.leaves_for(kind):
                if ld.path.startswith("mixer.conv_x_bias") and not cfg.use_conv_bias:
                    continue
                out.setdefault(("layers", i) + tuple(ld.path.split(".")), []).append((name, ld))
    return out


def layer_sizes_with(cfg: ModelConfig, i: int, **sizes: int) -> LayerSizes:
    """Block ``i``'s sizes with some fields replaced."""
    return dataclasses.replace(cfg.layer_sizes(i), **sizes)


def axes_description() -> dict[str, dict]:
    """JSON description of the axes table (axis -> size/groups/layer fields, block kinds), stored in
    every nested checkpoint's metadata."""
    return {name: {"size_field": ax.size_field, "groups_field": ax.groups_field,
                   "layer_field": ax.layer_field or None, "kinds": ax.kinds or None} for name, ax in AXES.items()}
