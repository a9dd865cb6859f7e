"""Parameter helpers: every parameter is created with logical axis names (``out_sharding``
metadata, applied lazily so that modules build with or without a mesh)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class Buffer(nnx.Variable):
    """A non-trainable tensor that lives in the checkpoint (e.g. ``e_score_correction_bias``)."""


def logical(value: jax.Array, names: tuple[str | None, ...], kind=nnx.Param) -> nnx.Variable:
    """Wrap ``value`` in ``kind`` with logical axis ``names`` (one per dim)."""
    if len(names) != value.ndim:
        raise ValueError(f"logical axis names {names} do not match shape {value.shape}")
    return kind(value, out_sharding=names, eager_sharding=False)


def normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def uniform(rngs: nnx.Rngs, shape: tuple[int, ...], bound: float, dtype) -> jax.Array:
    return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound).astype(dtype)


def inv_softplus(y: jax.Array) -> jax.Array:
    return y + jnp.log(-jnp.expm1(-y))


def dt_bias_init(rngs: nnx.Rngs, n: int, dt_min: float, dt_max: float, floor: float, dtype) -> jax.Array:
    """Mamba2 dt bias: softplus^-1 of dt log-uniform in [dt_min, dt_max], floored (SPEC 1.2)."""
    u = jax.random.uniform(rngs.params(), (n,), jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return inv_softplus(jnp.maximum(dt, floor)).astype(dtype)


def linear(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """``x @ w.T`` for a weight in HF ``[out, in]`` layout."""
    return jnp.einsum("...i,oi->...o", x, w.astype(x.dtype), preferred_element_type=out_dtype)
