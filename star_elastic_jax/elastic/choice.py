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


@dataclasses.dataclass(frozen=True)
class ResolvedChoice:
    """A validated choice: the hidden size, every block's sizes, and which blocks are kept."""

    hidden: int
    layer_sizes: tuple[LayerSizes, ...]
    keep: tuple[bool, ...]

    def sizes_of(self, axis: str, cfg: ModelConfig) -> list[int]:
        """Per-block sizes of a per-layer axis, for the blocks of its type (kept or not)."""
        return [getattr(self.layer_sizes[i], AXES[axis].layer_field) for i in layers_of(cfg, axis)]


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
    return ResolvedChoice(hidden=hidden, layer_sizes=tuple(sizes), keep=tuple(keep))


def _validate_size(cfg: ModelConfig, axis: str, layer: int, v: int, where: str, align: int | None) -> None:
    full = full_size(cfg, axis, layer)
    if not 1 <= v <= full:
        raise ChoiceError(f"{axis}{where}", v, f"must be in [1, {full}] (the full size of block {layer})")
    groups = AXES[axis].groups(cfg)
    if v % groups:
        raise ChoiceError(f"{axis}{where}", v, f"must be a multiple of {AXES[axis].groups_field}={groups} "
                                               "(a prefix is kept within every group)")
    if axis == "experts":
        if v < cfg.num_experts_per_tok:
            raise ChoiceError(f"experts{where}", v, f"must be >= num_experts_per_tok={cfg.num_experts_per_tok}")
        if v < full and cfg.n_group > 1:
            raise ChoiceError(f"experts{where}", v, f"group-limited routing (n_group={cfg.n_group}) is not "
                                                    "prefix-nested; keep experts full or use n_group=1")
    if align and axis in ALIGNED_AXES and v % align:
        raise ChoiceError(f"{axis}{where}", v, f"must be a multiple of {align} (block alignment requested)")
