"""Dense relu2 MLP (the ``-`` block, and the MoE shared expert)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from star_elastic_jax.model.params import linear, logical, normal


def relu2(x: jax.Array) -> jax.Array:
    return jnp.square(jax.nn.relu(x))


class MLP(nnx.Module):
    """``down(relu(up(x))^2)``; weights in HF ``[out, in]`` layout."""

    def __init__(self, hidden: int, width: int, *, std: float, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 axis_name: str = "mlp"):
        self.up_proj = logical(normal(rngs, (width, hidden), std, param_dtype), (axis_name, "embed"))
        self.down_proj = logical(normal(rngs, (hidden, width), std, param_dtype), ("embed", axis_name))

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None, masks=None) -> jax.Array:
        """``masks``: :class:`~star_elastic_jax.model.masks.MLPMasks` (fc1 output channels)."""
        del segment_ids  # token-wise
        hid = linear(x, self.up_proj[...])
        if masks is not None:
            hid = hid * masks.ffn.astype(hid.dtype)
        return linear(relu2(hid), self.down_proj[...])
