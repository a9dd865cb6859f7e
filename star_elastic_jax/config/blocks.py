"""Block types and runtime fields of the Nemotron-H config: the constants every other part of
``star_elastic_jax.config`` (and the kernel dispatchers) read."""
from __future__ import annotations

# One source of truth for block types: pattern char -> (HF 5.x name, legacy name).
BLOCK_TYPES = {
    "M": ("linear_attention", "mamba"),
    "*": ("full_attention", "attention"),
    "E": ("moe", "moe"),
    "-": ("mlp", "mlp"),
}
_NAME_TO_CHAR = {name: ch for ch, names in BLOCK_TYPES.items() for name in names}
BLOCK_NAMES = {"M": "mamba2", "*": "attention", "E": "moe", "-": "mlp"}

_RUNTIME_FIELDS = ("compute_dtype", "dt_clamp_min", "ssd_impl", "moe_impl")
# Kernel implementations the dispatchers (kernels/ssd/dispatch.py, kernels/moe/reference.py) accept.
# "auto": the Pallas kernel on GPU/TPU, the pure-JAX reference on CPU. MoE "reference" is the pure-JAX
# sorted path of the backend (blocked on CPU, ragged_dot elsewhere); blocked/ragged/dense pin one.
SSD_IMPLS = ("auto", "reference", "pallas")
MOE_IMPLS = ("auto", "reference", "pallas", "blocked", "ragged", "dense", "gather")
