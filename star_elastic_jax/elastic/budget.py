"""Exact parameter accounting for any elastic choice, and budget -> choice search.

A budget is a fraction of the full model's *active* parameters (SPEC 3.2).
"""
from __future__ import annotations

import itertools
from typing import Mapping, Sequence

from star_elastic_jax.config import ModelConfig, ParamCount, count_params
from star_elastic_jax.elastic.choice import ElasticChoice, resolve_choice
from star_elastic_jax.errors import ChoiceError

HOMOGENEOUS_AXES = ("hidden", "mamba_heads", "attn_heads", "experts", "expert_ffn", "mlp_ffn")


def choice_param_count(cfg: ModelConfig, choice: ElasticChoice, *, depth_order: Sequence[int] | None = None
                       ) -> ParamCount:
    """Exact total/active parameters of the sub-model ``choice`` selects (equals its sliced model's)."""
    r = resolve_choice(cfg, choice, depth_order=depth_order)
    return count_params(cfg, r.layer_sizes, hidden=r.hidden, keep=r.keep)


def validate_budget(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ChoiceError("budget", fraction, "a fraction of the full model's active parameters in (0, 1]")
    return float(fraction)


def choice_for_budget(cfg: ModelConfig, fraction: float, choice_lists: Mapping[str, Sequence[int]], *,
                      tie_tolerance: float = 0.01) -> ElasticChoice:
    """The homogeneous choice whose active parameters best match ``fraction`` x full active.

    Exhaustive over the product of ``choice_lists`` (axis -> candidate sizes; unlisted axes stay
    full). Candidates whose relative error is within ``tie_tolerance`` of the best one count as
    ties, and the tie goes to the largest *total*: the routed-expert count changes active
    parameters only through router rows, so without this rule a search would drop experts (capacity)
    for a negligible active-count gain.
    """
    fraction = validate_budget(fraction)
    unknown = sorted(set(choice_lists) - set(HOMOGENEOUS_AXES))
    if unknown:
        raise ChoiceError("choice_lists", unknown, f"axes must be among {HOMOGENEOUS_AXES}")
    for axis, values in choice_lists.items():
        if not values:
            raise ChoiceError(f"choice_lists[{axis!r}]", list(values), "must list at least one size")
    target = fraction * cfg.param_count().active
    axes = list(choice_lists)
    scored = []
    for combo in itertools.product(*(choice_lists[a] for a in axes)):
        choice = ElasticChoice(**dict(zip(axes, combo)))
        pc = choice_param_count(cfg, choice)
        scored.append((abs(pc.active - target) / target, pc.total, choice))
    best_err = min(err for err, _, _ in scored)
    ties = [s for s in scored if s[0] <= best_err + tie_tolerance]
    return max(ties, key=lambda s: (s[1], -s[0]))[2]


def smallest_active_fraction(cfg: ModelConfig, choice_lists: Mapping[str, Sequence[int]]) -> float:
    """Active fraction of the smallest sub-model ``choice_lists`` allow (every axis at its smallest size)."""
    choice = ElasticChoice(**{a: min(v) for a, v in choice_lists.items() if v})
    return choice_param_count(cfg, choice).active / cfg.param_count().active


def default_choice_lists(cfg: ModelConfig, fractions: Sequence[float] = (1.0, 0.75, 0.5)) -> dict[str, list[int]]:
    """Descending candidate sizes per axis: each fraction of the full size, rounded down to a valid
    size (multiple of the axis' groups; experts >= top-k). Used when a config has no explicit lists."""
    from star_elastic_jax.elastic.axes import AXES

    lists: dict[str, list[int]] = {}
    pattern = cfg.hybrid_override_pattern
    for axis in ("hidden", "mamba_heads", "experts", "expert_ffn", "mlp_ffn"):
        ax = AXES[axis]
        if ax.kinds and not any(k in pattern for k in ax.kinds):
            continue
        if axis == "experts" and cfg.n_group > 1:
            continue
        full = getattr(cfg, ax.size_field)
        g = ax.groups(cfg)
        vals = []
        for f in fractions:
            v = max(g, int(full * f) // g * g)
            if axis == "experts":
                v = max(v, cfg.num_experts_per_tok)
            if v not in vals:
                vals.append(v)
        lists[axis] = sorted(vals, reverse=True)
    return lists


def nano_choice_lists() -> dict[str, list[int]]:
    """SPEC 3.2's decision for Nemotron 3 Nano (multiples of 16 for NVFP4)."""
    return {"hidden": [2688, 1920, 1392], "mamba_heads": [64, 48, 32], "experts": [128, 96, 64],
            "expert_ffn": [1856, 1328, 960]}


def expected_param_count(cfg: ModelConfig, expected: Mapping) -> ParamCount:
    """Total/active parameters at real-valued (possibly traced, differentiable) sizes.

    ``expected[axis]`` is a scalar (every block of the axis' type) or, for a per-layer axis, a
    ``[n_blocks_of_type]`` array in model order; axes not given stay full. This is
    ``config.count_params`` at those sizes, so it traces under ``jit``/``grad``. The fields of the
    returned ParamCount are fp32 scalars (or Python numbers).
    """
    import dataclasses

    import jax.numpy as jnp

    from star_elastic_jax.config import per_layer_sizes
    from star_elastic_jax.elastic.axes import AXES, PER_LAYER_AXES, layers_of

    unknown = sorted(set(expected) - set(HOMOGENEOUS_AXES))
    if unknown:
        raise ChoiceError("expected", unknown, f"axes must be among {HOMOGENEOUS_AXES}")
    H = expected.get("hidden", cfg.hidden_size)
    if not isinstance(H, (int, float)):
        H = jnp.asarray(H, jnp.float32)
        if H.ndim:
            raise ChoiceError("expected['hidden']", H.shape, "the hidden axis is homogeneous: a scalar")
    sizes = list(per_layer_sizes(cfg))
    for axis in PER_LAYER_AXES:
        if axis not in expected:
            continue
        value, blocks = expected[axis], layers_of(cfg, axis)
        per_layer = not isinstance(value, (int, float)) and jnp.ndim(value) == 1
        if per_layer and jnp.shape(value)[0] != len(blocks):
            raise ChoiceError(f"expected[{axis!r}]", jnp.shape(value),
                              f"one value per '{AXES[axis].kinds}' block ({len(blocks)} of them)")
        if not isinstance(value, (int, float)) and jnp.ndim(value) > 1:
            raise ChoiceError(f"expected[{axis!r}]", jnp.shape(value), "a scalar or a [n_blocks] vector")
        for j, i in enumerate(blocks):
            v = value[j] if per_layer else value
            sizes[i] = dataclasses.replace(sizes[i], **{AXES[axis].layer_field: v})
    return count_params(cfg, sizes, hidden=H)


def expected_active_params(cfg: ModelConfig, expected: Mapping):
    """Active parameters at real-valued sizes (see :func:`expected_param_count`); differentiable."""
    return expected_param_count(cfg, expected).active
