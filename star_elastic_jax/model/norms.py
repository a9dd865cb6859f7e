"""RMSNorm (fp32 inside, SPEC 1.1) and the grouped gated RMSNorm of the Mamba2 mixer (SPEC 1.2 step 6)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from star_elastic_jax.model.params import logical


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """``x * rsqrt(mean(x^2) + eps)`` over the last axis, in fp32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """``y = w * x * rsqrt(mean(x^2) + eps)`` computed in fp32, cast back to the input dtype."""

    def __init__(self, size: int, eps: float, *, param_dtype=jnp.float32, axis_name: str = "embed"):
        self.eps = eps
        self.weight = logical(jnp.ones((size,), param_dtype), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.weight[...].astype(jnp.float32) * rms_normalize(x, self.eps)
        return y.astype(x.dtype)


def gated_group_rms_norm(y: jax.Array, z: jax.Array, weight: jax.Array, groups: int, eps: float) -> jax.Array:
    """``RMSNorm_g(y * silu(z)) * weight``: norm after gate, one RMS per group of channels (fp32)."""
    g = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    *lead, d = g.shape
    g = rms_normalize(g.reshape(*lead, groups, d // groups), eps).reshape(*lead, d)
    return weight.astype(jnp.float32) * g
