"""RMSNorm (fp32 inside, SPEC 1.1) and the grouped gated RMSNorm of the Mamba2 mixer (SPEC 1.2 step 6)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from star_elastic_jax.model.params import logical


def rms_normalize(x: jax.Array, eps: float, norm_correction: jax.Array | None = None) -> jax.Array:
    """``x * rsqrt(mean(x^2) + eps)`` over the last axis, in fp32.

    ``norm_correction = (eps_factor, scale)`` is the elastic-mask correction (SPEC 3.5): eps is
    multiplied by ``eps_factor`` and the result by ``scale``, so a norm over a masked axis equals
    the norm over its active channels.
    """
    x = x.astype(jnp.float32)
    if norm_correction is None:
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    eps_factor, scale = norm_correction[0], norm_correction[1]
    return x * (jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps * eps_factor) * scale)


class RMSNorm(nnx.Module):
    """``y = w * x * rsqrt(mean(x^2) + eps)`` computed in fp32, cast back to the input dtype."""

    def __init__(self, size: int, eps: float, *, param_dtype=jnp.float32, axis_name: str = "embed"):
        self.eps = eps
        self.weight = logical(jnp.ones((size,), param_dtype), (axis_name,))

    def __call__(self, x: jax.Array, norm_correction: jax.Array | None = None) -> jax.Array:
        y = self.weight[...].astype(jnp.float32) * rms_normalize(x, self.eps, norm_correction)
        return y.astype(x.dtype)


def gated_group_rms_norm(y: jax.Array, z: jax.Array, weight: jax.Array, groups: int, eps: float,
                         norm_correction: jax.Array | None = None) -> jax.Array:
    """``RMSNorm_g(y * silu(z)) * weight``: norm after gate, one RMS per group of channels (fp32).

    Under a Mamba-head mask every group keeps the same fraction of its heads (per-group prefix),
    so one ``norm_correction`` is exact for all groups.
    """
    g = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    *lead, d = g.shape
    g = rms_normalize(g.reshape(*lead, groups, d // groups), eps, norm_correction).reshape(*lead, d)
    return weight.astype(jnp.float32) * g
