"""Grouped-query attention (``*`` block), SPEC 1.6. No positional encoding: Nemotron-H attention
is position-free (HF defines rotary helpers but never calls them)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from star_elastic_jax.config import LayerSizes, ModelConfig
from star_elastic_jax.model.params import linear, logical, normal


def attention_mask(L: int, segment_ids: jax.Array | None) -> jax.Array:
    """``[b or 1, L, L]`` bool: causal, and (with ``segment_ids``) within one document only."""
    causal = jnp.tril(jnp.ones((L, L), dtype=bool))[None]
    if segment_ids is None:
        return causal
    return causal & (segment_ids[:, :, None] == segment_ids[:, None, :])


def _query_block(L: int) -> int:
    """Query-block size: 64 rows (best on CPU), but at most 16 blocks so the unrolled trace stays small."""
    return max(64, -(-L // 16))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """``softmax(q k^T / sqrt(d) + mask) v`` with fp32 scores; ``q [b, L, kv, rep, d]``, ``k, v [b, L, kv, d]``.

    Block-causal: query block ``[s0, e)`` only scores keys ``[0, e)`` (the keys after ``e`` are masked
    for every row of the block), so about half the ``L x L`` score matrix is never built. Each row's
    softmax still sees all its unmasked keys at once, so this is the same softmax as the full masked one.
    """
    b, L, _, _, dh = q.shape
    bq = _query_block(L)
    outs = []
    for s0 in range(0, L, bq):
        e = min(s0 + bq, L)
        scores = jnp.einsum("bqkrd,bskd->bkrqs", q[:, s0:e], k[:, :e], preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(dh)
        mask = (jnp.arange(e)[None, :] <= jnp.arange(s0, e)[:, None])[None]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, s0:e, None] == segment_ids[:, None, :e])
        scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        outs.append(jnp.einsum("bkrqs,bskd->bqkrd", probs, v[:, :e]))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


class Attention(nnx.Module):
    """Causal GQA; softmax in fp32; query head ``i`` reads KV head ``i // (n_q / n_kv)``."""

    def __init__(self, cfg: ModelConfig, sizes: LayerSizes, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg
        H, nq, nkv, dh = cfg.hidden_size, sizes.attn_heads, cfg.num_key_value_heads, cfg.head_dim
        std = cfg.initializer_range
        self.q_proj = logical(normal(rngs, (nq * dh, H), std, param_dtype), ("q_heads", "embed"))
        self.k_proj = logical(normal(rngs, (nkv * dh, H), std, param_dtype), ("kv_heads", "embed"))
        self.v_proj = logical(normal(rngs, (nkv * dh, H), std, param_dtype), ("kv_heads", "embed"))
        self.o_proj = logical(normal(rngs, (H, nq * dh), std, param_dtype), ("embed", "q_heads"))

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None, masks=None) -> jax.Array:
        b, L, _ = x.shape
        return linear(self.head_outputs(x, segment_ids, masks).reshape(b, L, -1), self.o_proj[...])

    def head_outputs(self, x: jax.Array, segment_ids: jax.Array | None = None, masks=None):
        """Per-head attention outputs ``[b, L, kv, rep, d]`` (the o_proj input)."""
        cfg = self.cfg
        b, L, _ = x.shape
        dh, nkv = cfg.head_dim, cfg.num_key_value_heads
        # One fused q|k|v matmul: one input-gradient and one weight-gradient matmul in the backward.
        nq = self.q_proj.shape[0]
        w = jnp.concatenate([self.q_proj[...], self.k_proj[...], self.v_proj[...]], axis=0)
        q, k, v = jnp.split(linear(x, w), [nq, nq + nkv * dh], axis=-1)
        q = q.reshape(b, L, nkv, -1, dh)  # [b, L, kv, rep, d]
        k = k.reshape(b, L, nkv, dh)
        v = v.reshape(b, L, nkv, dh)
        out = causal_attention(q, k, v, segment_ids)
        if masks is not None:  # AttentionMasks; query heads are kv-group-major
            out = out * masks.heads.reshape(nkv, -1)[:, :, None].astype(out.dtype)
        return out
