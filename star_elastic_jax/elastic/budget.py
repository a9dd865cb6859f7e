"""Everything about a budget: the one fraction check, budget lists and display names, choice
lists, exact parameter accounting of any choice, and budget -> choice resolution (a stored name, a
trained router's choice through the ``resolver`` hook, or the exhaustive search).

A budget is a fraction of the full model's *active* parameters (SPEC 3.2). Every public entry that
takes one (the CLI, train configs, the router, checkpoints, slicing) validates it with
:func:`validate_fraction`, so they all accept and refuse the same values with the same message.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from typing import Any, Callable, Mapping, Sequence

from star_elastic_jax.config import ModelConfig, ParamCount, count_params
from star_elastic_jax.elastic.choice import ElasticChoice, ResolvedChoice, ensure_resolved
from star_elastic_jax.errors import ChoiceError

HOMOGENEOUS_AXES = ("hidden", "mamba_heads", "attn_heads", "experts", "expert_ffn", "mlp_ffn")
FRACTION_VALID = "a fraction of the full model's active parameters in (0, 1]"
BUDGET_SLACK = 0.05  # 5 points of active fraction: a delivered size further than this from the asked one is flagged
ChoiceResolver = Callable[[ModelConfig, float], ElasticChoice]


# ---------------------------------------------------------------------------------------------- fractions
def validate_fraction(value: Any, field: str = "budget", *, names: Sequence[str] = (), shown: Any = None) -> float:
    """THE budget check: a real number in (0, 1], finite. Anything else (0, 1.5, NaN, ``"abc"``, a
    bool, a string: text is parsed by :func:`parse_fraction` first) is a :class:`ChoiceError` naming
    ``field`` and showing ``shown`` (default ``value``); ``names``: the budget names that would also
    have been valid there (listed in the message)."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
          and 0 < float(value) <= 1)
    if not ok:
        valid = FRACTION_VALID + (f", or a budget name ({', '.join(sorted(names))})" if names else "")
        raise ChoiceError(field, value if shown is None else shown, valid)
    return float(value)


def parse_fraction(value: Any, field: str = "budget", *, names: Sequence[str] = ()) -> float:
    """A budget from user text (``"0.78"``) or a number, checked by :func:`validate_fraction`."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass  # validate_fraction refuses the text itself
    return validate_fraction(number, field, names=names, shown=value)


def validate_budgets(values: Any, field: str = "budgets") -> tuple[float, ...]:
    """A list of budgets (trained, or asked for together): non-empty, each a valid fraction,
    distinct, in descending order (index 0 = the largest). Errors name ``field``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ChoiceError(field, values, f"a non-empty, descending list of fractions ({FRACTION_VALID})")
    out = tuple(validate_fraction(v, field) for v in values)
    if len(set(out)) != len(out):
        raise ChoiceError(field, list(values), "budgets must be distinct")
    if list(out) != sorted(out, reverse=True):
        raise ChoiceError(field, list(values), "budgets must be in descending order (index 0 = the largest)")
    return out


def budget_name(b: float) -> str:
    """The label of a budget fraction (also its name in the elastic checkpoint): ``1.0``, ``0.78``."""
    s = f"{float(b):g}"
    return s if "." in s else s + ".0"


def choice_param_count(cfg: ModelConfig, choice: ElasticChoice | ResolvedChoice, *,
                       depth_order: Sequence[int] | None = None) -> ParamCount:
    """Exact total/active parameters of the sub-model ``choice`` selects (equals its sliced model's)."""
    r = ensure_resolved(cfg, choice, depth_order=depth_order)
    return count_params(cfg, r.layer_sizes, hidden=r.hidden, keep=r.keep)


def choice_for_budget(cfg: ModelConfig, fraction: float, choice_lists: Mapping[str, Sequence[int]], *,
                      tie_tolerance: float = 0.01) -> ElasticChoice:
    """The homogeneous choice whose active parameters best match ``fraction`` x full active.

    Exhaustive over the product of ``choice_lists`` (axis -> candidate sizes; unlisted axes stay
    full). Candidates whose relative error is within ``tie_tolerance`` of the best one count as
    ties, and the tie goes to the largest *total*: the routed-expert count changes active
    parameters only through router rows, so without this rule a search would drop experts (capacity)
    for a negligible active-count gain.
    """
    fraction = validate_fraction(fraction)
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
        full = getattr(cfg, ax.size_field)
        g = ax.groups(cfg)
        vals = []
        for f in fractions:
            v = max(g, int(full * f) // g * g)
            if axis == "experts":
                v = max(v, cfg.num_experts_per_tok)
            if v not in vals and _valid_size(cfg, axis, v):
                vals.append(v)
        if len(vals) > 1:  # an axis that cannot shrink (e.g. too few experts per routing group) is left out
            lists[axis] = sorted(vals, reverse=True)
    return lists


def _valid_size(cfg: ModelConfig, axis: str, size: int) -> bool:
    """Whether ``size`` is a valid homogeneous size of ``axis`` (e.g. a grouped expert count)."""
    try:
        ElasticChoice(**{axis: size}).resolve(cfg)
    except ChoiceError:
        return False
    return True


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


# ---------------------------------------------------------------------------------------------- choice lists
def check_choice_lists(cfg: ModelConfig, choice_lists: Mapping[str, Sequence[int]] | None
                       ) -> dict[str, list[int]] | None:
    """Validate ``{axis: [sizes, descending]}`` against ``cfg`` (:class:`ChoiceError` naming the axis)."""
    if choice_lists is None:
        return None
    if not isinstance(choice_lists, Mapping):
        raise ChoiceError("choice_lists", type(choice_lists).__name__, "a dict {axis: [sizes, descending]}")
    out = {}
    for axis, values in choice_lists.items():
        if axis not in dataclasses.asdict(ElasticChoice()) or axis == "depth":
            raise ChoiceError("choice_lists", axis, "keys must be width axes of ElasticChoice")
        values = list(values) if isinstance(values, (list, tuple)) else values
        if not isinstance(values, list) or not values:
            raise ChoiceError(f"choice_lists[{axis!r}]", values, "a non-empty list of sizes")
        for v in values:
            try:
                ElasticChoice(**{axis: v}).resolve(cfg)
            except ChoiceError as e:
                raise ChoiceError(f"choice_lists[{axis!r}]", v, e.valid) from None
        if values != sorted(set(values), reverse=True):
            raise ChoiceError(f"choice_lists[{axis!r}]", values, "sizes must be distinct and descending")
        out[axis] = [int(v) for v in values]
    return out


_SHAPE_FIELDS = ("vocab_size", "hidden_size", "hybrid_override_pattern", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size", "n_routed_experts",
                 "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
                 "intermediate_size", "n_group", "topk_group")


def choice_lists_for(cfg: ModelConfig, stored: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[int]]:
    """The candidate sizes budgets resolve over: ``stored`` lists (a checkpoint's) when given, SPEC
    3.2's decision for the Nemotron 3 Nano architecture, else :func:`default_choice_lists`."""
    if stored:
        return {a: list(v) for a, v in stored.items()}
    nano = ModelConfig.preset("nano-v3-30b")
    if all(getattr(cfg, f) == getattr(nano, f) for f in _SHAPE_FIELDS) and cfg.per_layer is None:
        return nano_choice_lists()
    return default_choice_lists(cfg)


def smallest_active_fraction(cfg: ModelConfig, choice_lists: Mapping[str, Sequence[int]]) -> float:
    """Active fraction of the smallest sub-model ``choice_lists`` allow (every axis at its smallest size)."""
    choice = ElasticChoice(**{a: min(v) for a, v in choice_lists.items() if v})
    return choice_param_count(cfg, choice).active / cfg.param_count().active


def achieved_fraction(cfg: ModelConfig, choice: ElasticChoice, depth_order: Sequence[int] | None = None) -> float:
    """Active parameters of ``choice`` as a fraction of the full model's."""
    return choice_param_count(cfg, choice, depth_order=depth_order).active / cfg.param_count().active


# ---------------------------------------------------------------------------------------------- resolution
RULE_STORED, RULE_ROUTER, RULE_SEARCH = "stored", "router", "search"


def resolve_budget_rule(source: Any, name_or_fraction: str | float, *, resolver: ChoiceResolver | None = None,
                        field: str = "budget") -> tuple[ElasticChoice, str]:
    """``(choice, rule)`` for a budget against ``source`` (anything with ``cfg``, ``budgets`` and
    ``choice_lists``: an elastic checkpoint or its metadata). ``rule`` says how it was resolved:

    * ``"stored"``: a budget name stored in ``source``;
    * ``"router"``: a fraction given to ``resolver(cfg, fraction)`` (a trained budget router);
    * ``"search"``: the exhaustive :func:`choice_for_budget` over the stored choice lists (or the
      config's defaults). A fraction more than :data:`BUDGET_SLACK` below the smallest sub-model
      those lists allow cannot be honoured and is a :class:`ChoiceError`, never a larger model.
    """
    budgets = source.budgets
    if isinstance(name_or_fraction, str) and name_or_fraction in budgets:
        return budgets[name_or_fraction], RULE_STORED
    fraction = parse_fraction(name_or_fraction, field, names=tuple(budgets))
    cfg = source.cfg
    if resolver is not None:
        return resolver(cfg, fraction), RULE_ROUTER
    lists = choice_lists_for(cfg, source.choice_lists)
    smallest = smallest_active_fraction(cfg, lists)
    if fraction < smallest - BUDGET_SLACK:
        raise ChoiceError(field, name_or_fraction,
                          f"the smallest sub-model of the choice lists has active fraction {smallest:.4f}; ask for a "
                          f"fraction of at least {max(smallest - BUDGET_SLACK, 0.0):.2f} (or a stored budget name)")
    return choice_for_budget(cfg, fraction, lists), RULE_SEARCH


def resolve_budget(source: Any, name_or_fraction: str | float, *, resolver: ChoiceResolver | None = None
                   ) -> ElasticChoice:
    """The choice of :func:`resolve_budget_rule`, without the rule."""
    return resolve_budget_rule(source, name_or_fraction, resolver=resolver)[0]
