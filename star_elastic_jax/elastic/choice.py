"""ElasticChoice: the per-axis sizes of one nested sub-model, and its resolution against a config.

A size is one int for every block of the axis' type (homogeneous), or a tuple with one int per
block of that type, in model order (heterogeneous: mamba_heads, attn_heads, experts, expert_ffn,
mlp_ffn). ``None`` keeps the axis full. ``depth`` is the number of blocks kept, dropping blocks in
the order of the model's depth ranking (least important first).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from star_elastic_jax.config import LayerSizes, ModelConfig
from star_elastic_jax.elastic.axes import AXES, PER_LAYER_AXES, full_size, layers_of
from star_elastic_jax.errors import ChoiceError

Size = int | tuple[int, ...] | None
ALIGNED_AXES = ("hidden", "expert_ffn", "mlp_ffn")  # input dims of NVFP4 matmuls (SPEC 3.11)


@dataclasses.dataclass(frozen=True)
class ElasticChoice:
    """Per-axis sizes of a nested sub-model (``None`` = full)."""

    hidden: int | None = None
    mamba_heads: Size = None
    attn_heads: Size = None
    experts: Size = None
    expert_ffn: Size = None
    mlp_ffn: Size = None
    depth: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))

    @property
    def is_homogeneous(self) -> bool:
        return not any(isinstance(getattr(self, a), tuple) for a in PER_LAYER_AXES)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ElasticChoice":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ChoiceError("choice", unknown, f"unknown axis name(s); valid axes are {sorted(names)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})

    def resolve(self, cfg: ModelConfig, *, depth_order: Sequence[int] | None = None,
                align: int | None = None) -> "ResolvedChoice":
        """Validate against ``cfg`` and expand to per-block sizes. Raises :class:`ChoiceError`."""
        return resolve_choice(cfg, self, depth_order=depth_order, align=align)

    def masks(self, cfg: ModelConfig, *, depth_order: Sequence[int] | None = None):
        """The hard :class:`~star_elastic_jax.model.masks.ElasticMasks` of this choice (with the kernel
        limits). The model calls this, so it needs nothing from the elastic layer above it."""
        from star_elastic_jax.elastic.masks import masks_from_choice

        return masks_from_choice(cfg, self, depth_order=depth_order)


@dataclasses.dataclass(frozen=True)
class ResolvedChoice:
    """A validated choice: the hidden size, every block's sizes, and which blocks are kept."""

    hidden: int
    layer_sizes: tuple[LayerSizes, ...]
    keep: tuple[bool, ...]
    choice: ElasticChoice | None = dataclasses.field(default=None, compare=False)  # what it was resolved from

    def is_full(self, axis: str, cfg: ModelConfig) -> bool:
        """Whether every block of a per-layer ``axis`` keeps its full size."""
        return all(v == full_size(cfg, axis, i) for i, v in zip(layers_of(cfg, axis), self.sizes_of(axis, cfg)))

    def sizes_of(self, axis: str, cfg: ModelConfig) -> list[int]:
        """Per-block sizes of a per-layer axis, for the blocks of its type (kept or not)."""
        return [getattr(self.layer_sizes[i], AXES[axis].layer_field) for i in layers_of(cfg, axis)]


def ensure_resolved(cfg: ModelConfig, choice: "ElasticChoice | ResolvedChoice", *,
                    depth_order: Sequence[int] | None = None) -> ResolvedChoice:
    """``choice`` as a :class:`ResolvedChoice`: an already resolved one passes through (checked to
    belong to ``cfg``), an :class:`ElasticChoice` is resolved. Every consumer of a choice takes
    either, so an entry point resolves a budget once and hands the result down."""
    if isinstance(choice, ResolvedChoice):
        if len(choice.layer_sizes) != cfg.num_hidden_layers or not 1 <= choice.hidden <= cfg.hidden_size:
            raise ChoiceError("elastic", "ResolvedChoice", f"was resolved against another config (it has "
                                         f"{len(choice.layer_sizes)} blocks and hidden={choice.hidden}; this "
                                         f"config has {cfg.num_hidden_layers} and hidden_size={cfg.hidden_size})")
        return choice
    return resolve_choice(cfg, choice, depth_order=depth_order)


def _check_int(axis: str, value: Any, where: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ChoiceError(f"{axis}{where}", value, "must be an integer")
    return value


def resolve_choice(cfg: ModelConfig, choice: ElasticChoice, *, depth_order: Sequence[int] | None = None,
                   align: int | None = None) -> ResolvedChoice:
    if not isinstance(choice, ElasticChoice):
        raise ChoiceError("elastic", type(choice).__name__, "must be an ElasticChoice")
    H = cfg.hidden_size
    hidden = H if choice.hidden is None else _check_int("hidden", choice.hidden)
    if not 1 <= hidden <= H:
        raise ChoiceError("hidden", hidden, f"must be in [1, hidden_size={H}]")
    if align and hidden % align:
        raise ChoiceError("hidden", hidden, f"must be a multiple of {align} (block alignment requested)")
    sizes = [dataclasses.replace(cfg.layer_sizes(i)) for i in range(cfg.num_hidden_layers)]
    for axis in PER_LAYER_AXES:
        value = getattr(choice, axis)
        if value is None:
            continue
        layers = layers_of(cfg, axis)
        if isinstance(value, tuple):
            if len(value) != len(layers):
                raise ChoiceError(axis, value, f"a heterogeneous choice needs one size per "
                                               f"'{AXES[axis].kinds}' block ({len(layers)} of them)")
            per = list(value)
        else:
            per = [value] * len(layers)
        for j, (i, v) in enumerate(zip(layers, per)):
            where = f"[{j}]" if isinstance(value, tuple) else ""
            v = _check_int(axis, v, where)
            _validate_size(cfg, axis, i, v, where, align)
            sizes[i] = dataclasses.replace(sizes[i], **{AXES[axis].layer_field: v})
    keep = [True] * cfg.num_hidden_layers
    if choice.depth is not None:
        n = cfg.num_hidden_layers
        depth = _check_int("depth", choice.depth)
        if not 1 <= depth <= n:
            raise ChoiceError("depth", depth, f"number of blocks kept, in [1, {n}]")
        if depth < n:
            if depth_order is None or sorted(depth_order) != list(range(n)):
                raise ChoiceError("depth", depth, "needs the model's depth ranking (elastic.rank with depth=True): "
                                                  f"a permutation of range({n}), got {depth_order!r}")
            for i in list(depth_order)[: n - depth]:
                keep[i] = False
    return ResolvedChoice(hidden=hidden, layer_sizes=tuple(sizes), keep=tuple(keep), choice=choice)


def _validate_size(cfg: ModelConfig, axis: str, layer: int, v: int, where: str, align: int | None) -> None:
    full = full_size(cfg, axis, layer)
    if not 1 <= v <= full:
        raise ChoiceError(f"{axis}{where}", v, f"must be in [1, {full}] (the full size of block {layer})")
    groups = AXES[axis].groups(cfg)
    if v % groups:
        raise ChoiceError(f"{axis}{where}", v, f"must be a multiple of {AXES[axis].groups_field}={groups} "
                                               "(a prefix is kept within every group)")
    if axis == "experts":
        _validate_experts(cfg, v, f"experts{where}")
    if align and axis in ALIGNED_AXES and v % align:
        raise ChoiceError(f"{axis}{where}", v, f"must be a multiple of {align} (block alignment requested)")


def _validate_experts(cfg: ModelConfig, v: int, field: str) -> None:
    """Routing constraints on an expert count ``v`` (already a multiple of ``n_group``).

    Experts nest within each routing group (``v / n_group`` kept per group), so the sliced router
    must still be a valid group-limited router: every group is scored by the sum of its top-2
    experts (here, in transformers and in ``ModelConfig.validate``), and the ``topk_group`` groups
    a token keeps must hold at least ``num_experts_per_tok`` experts to pick from.
    """
    k = cfg.num_experts_per_tok
    if v < k:
        raise ChoiceError(field, v, f"must be >= num_experts_per_tok={k}")
    if cfg.n_group == 1:
        return
    per_group = v // cfg.n_group
    if per_group < 2:
        raise ChoiceError(field, v, f"keeps {per_group} expert per routing group, but group routing "
                                    f"(n_group={cfg.n_group}) scores each group by its top-2 experts: "
                                    f"keep >= 2 per group (experts >= {2 * cfg.n_group})")
    if cfg.topk_group * per_group < k:
        need = -(-k // cfg.topk_group) * cfg.n_group  # ceil(k / topk_group) experts in every group
        raise ChoiceError(field, v, f"the topk_group={cfg.topk_group} groups a token keeps would hold "
                                    f"{cfg.topk_group * per_group} experts, fewer than num_experts_per_tok={k}: "
                                    f"experts must be >= {need}")


def valid_sizes(cfg: ModelConfig, axis: str, layer: int | None = None) -> list[int]:
    """Every size ``axis`` accepts (at block ``layer`` for per-layer axes), ascending.

    The sizes :func:`resolve_choice` accepts for a homogeneous choice of this axis alone (no block
    alignment): e.g. for ``experts`` the multiples of ``n_group`` that keep >= 2 experts per group
    (when ``n_group > 1``) and enough experts in the kept groups for top-k.
    """
    if axis not in PER_LAYER_AXES and axis != "hidden":
        raise ChoiceError("axis", axis, f"a width axis: hidden or one of {PER_LAYER_AXES}")
    if axis == "hidden":
        return list(range(1, cfg.hidden_size + 1))
    if layer is None:
        layers = layers_of(cfg, axis)
        if not layers:
            return []
        layer = layers[0]
    out = []
    for v in range(1, full_size(cfg, axis, layer) + 1):
        try:
            _validate_size(cfg, axis, layer, v, "", None)
        except ChoiceError:
            continue
        out.append(v)
    return out
