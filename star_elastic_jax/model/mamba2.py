"""The Mamba2 mixer (``M`` block), SPEC 1.2.

HF fuses ``in_proj`` rows as z | x | B | C | dt and conv1d channels as x | B | C. We keep them as
separate leaves (``in_proj_z``, ``in_proj_x``, ``in_proj_bc``, ``in_proj_dt``; ``conv_x_*``,
``conv_bc_*``) so that the Mamba-head axis (z, x, dt rows; x conv channels) and tensor sharding
touch whole leaves; the HF key table concatenates them back bit-exactly.
Heads are group-major: head ``h`` uses B/C group ``h // (heads / n_groups)``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from star_elastic_jax.config import LayerSizes, ModelConfig
from star_elastic_jax.kernels.ssd import ssd
from star_elastic_jax.model.masks import MambaMasks
from star_elastic_jax.model.norms import gated_group_rms_norm
from star_elastic_jax.model.params import dt_bias_init, linear, logical, normal, uniform


def causal_depthwise_conv(x: jax.Array, w: jax.Array, bias: jax.Array | None,
                          segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal depthwise conv1d: ``out[t, c] = bias[c] + sum_k w[c, k] * x[t - (K-1) + k, c]``.

    With ``segment_ids`` a tap reaching into a previous document is dropped, so the conv window
    restarts at every document boundary. Computed in fp32.
    """
    K = w.shape[-1]
    L = x.shape[1]
    xf = jnp.pad(x.astype(jnp.float32), ((0, 0), (K - 1, 0), (0, 0)))
    wf = w.astype(jnp.float32)
    out = jnp.zeros(x.shape, jnp.float32) if bias is None else jnp.broadcast_to(bias.astype(jnp.float32), x.shape)
    if segment_ids is not None:
        seg = jnp.pad(segment_ids, ((0, 0), (K - 1, 0)), constant_values=-1)
    for k in range(K):
        tap = xf[:, k:k + L] * wf[:, k]
        if segment_ids is not None:
            tap = jnp.where((seg[:, k:k + L] == segment_ids)[..., None], tap, 0.0)
        out = out + tap
    return out


class Mamba2Mixer(nnx.Module):
    """Mamba2 selective-state-space mixer with grouped B/C and a gated grouped RMSNorm."""

    def __init__(self, cfg: ModelConfig, sizes: LayerSizes, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg
        H, h, P = cfg.hidden_size, sizes.mamba_heads, cfg.mamba_head_dim
        d_in, gn2, K = h * P, 2 * cfg.n_groups * cfg.ssm_state_size, cfg.conv_kernel
        std = cfg.initializer_range
        self.in_proj_z = logical(normal(rngs, (d_in, H), std, param_dtype), ("mamba_inner", "embed"))
        self.in_proj_x = logical(normal(rngs, (d_in, H), std, param_dtype), ("mamba_inner", "embed"))
        self.in_proj_bc = logical(normal(rngs, (gn2, H), std, param_dtype), ("mamba_bc", "embed"))
        self.in_proj_dt = logical(normal(rngs, (h, H), std, param_dtype), ("mamba_heads", "embed"))
        bound = 1.0 / math.sqrt(K)  # torch Conv1d default init for a depthwise filter
        self.conv_x_weight = logical(uniform(rngs, (d_in, K), bound, param_dtype), ("mamba_inner", None))
        self.conv_bc_weight = logical(uniform(rngs, (gn2, K), bound, param_dtype), ("mamba_bc", None))
        if cfg.use_conv_bias:
            self.conv_x_bias = logical(uniform(rngs, (d_in,), bound, param_dtype), ("mamba_inner",))
            self.conv_bc_bias = logical(uniform(rngs, (gn2,), bound, param_dtype), ("mamba_bc",))
        else:
            self.conv_x_bias = self.conv_bc_bias = None
        self.dt_bias = logical(dt_bias_init(rngs, h, cfg.time_step_min, cfg.time_step_max, cfg.time_step_floor,
                                            param_dtype), ("mamba_heads",))
        self.A_log = logical(jnp.log(jnp.arange(1, h + 1, dtype=jnp.float32)).astype(param_dtype), ("mamba_heads",))
        self.D = logical(jnp.ones((h,), param_dtype), ("mamba_heads",))
        self.norm_weight = logical(jnp.ones((d_in,), param_dtype), ("mamba_inner",))
        out_std = std / math.sqrt(cfg.num_hidden_layers) if cfg.rescale_prenorm_residual else std
        self.out_proj = logical(normal(rngs, (H, d_in), out_std, param_dtype), ("embed", "mamba_inner"))

    @property
    def num_heads(self) -> int:
        return self.A_log.shape[0]

    def __call__(self, u: jax.Array, segment_ids: jax.Array | None = None, masks: MambaMasks | None = None
                 ) -> jax.Array:
        """``masks`` (:class:`MambaMasks`) masks heads (SPEC 3.5): z and the x
        conv pre-activation (= conv weight and bias) are multiplied by the channel mask, so masked
        heads carry x = 0 and y = 0; the gated group-norm gets the eps/scale correction."""
        cfg = self.cfg
        b, L, _ = u.shape
        h = self.num_heads
        P, G, N = cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
        # One matmul over the four row blocks (HF's fused in_proj): the backward then does one
        # input-gradient matmul and one weight-gradient matmul instead of four small ones (-20% of
        # this block's forward+backward on CPU, benchmarks/profile_blocks.py).
        w = jnp.concatenate([self.in_proj_z[...], self.in_proj_x[...], self.in_proj_bc[...],
                             self.in_proj_dt[...]], axis=0)
        d_in, gn2 = h * P, 2 * G * N
        z, xs, bc, dt_raw = jnp.split(linear(u, w), [d_in, 2 * d_in, 2 * d_in + gn2], axis=-1)

        head_mask = masks
        bias = lambda v: None if v is None else v[...]  # noqa: E731
        xs = causal_depthwise_conv(xs, self.conv_x_weight[...], bias(self.conv_x_bias), segment_ids)
        if head_mask is not None:
            z = z * head_mask.mask.astype(z.dtype)
            xs = xs * head_mask.mask
        xs = jax.nn.silu(xs)
        bc = jax.nn.silu(causal_depthwise_conv(bc, self.conv_bc_weight[...], bias(self.conv_bc_bias), segment_ids))
        B, C = jnp.split(bc.reshape(b, L, 2 * G, N), 2, axis=2)

        dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        dt = jnp.maximum(dt, cfg.effective_dt_clamp_min)
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        y, _ = ssd(xs.reshape(b, L, h, P), dt, A, B, C, self.D[...], chunk_size=cfg.chunk_size,
                   segment_ids=segment_ids, impl=cfg.ssd_impl,
                   head_limit=None if head_mask is None else head_mask.head_limit)
        g = gated_group_rms_norm(y.reshape(b, L, h * P), z, self.norm_weight[...], G, cfg.layer_norm_epsilon,
                                 None if head_mask is None else head_mask.norm)
        return linear(g.astype(u.dtype), self.out_proj[...])

