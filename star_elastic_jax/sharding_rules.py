"""THE logical-axis rules table: every parameter and activation carries logical axis names; this maps
each to mesh axes. Standard library only and at the bottom of the package, so that both the kernels
(the expert-parallel MoE derives its mesh axes from it) and ``train.sharding`` (parameter and batch
shardings) read the one table. See ``train/sharding.py`` for the rationale of each rule and the
divisibility fallback.
"""
from __future__ import annotations

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis name -> mesh axis, tuple of mesh axes, or None (replicated). Flax LogicalRules format,
# so it also works with ``nnx.logical_axis_rules(LOGICAL_RULES)``.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("act_embed", None),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mamba_inner", "tensor"),
    ("mamba_heads", "tensor"),
    ("mamba_bc", None),
    ("q_heads", "tensor"),
    ("kv_heads", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("layers", None),  # a stacked (scanned) layer axis, should one appear
    # the budget router: a few thousand parameters, replicated everywhere
    ("router_hidden", None),
    ("router_budgets", None),
    ("router_choices", None),
)
RULES = dict(LOGICAL_RULES)


def mesh_axes_of(logical: str) -> tuple[str, ...]:
    """The mesh axes a logical axis maps to (``()`` when replicated)."""
    rule = RULES[logical]
    return () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)
