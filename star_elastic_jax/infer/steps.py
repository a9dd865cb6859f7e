"""Prefill and one-token decode of a :class:`NemotronH` against a :class:`HybridCache`.

Pure functions of the module's parameters, meant to run inside ``jax.jit`` (the engine traces them
once per budget, on that budget's sliced view of the parent's weights). They reuse the training
forward's pieces (projections, conv taps, the chunked SSD, the gated norm, the MoE block), so the
math is the forward's, one position at a time.

Rows are right-padded: ``lengths [B]`` new tokens per row. Padding never reaches a state: its
Mamba input is zeroed and its ``dt`` is 0 (decay 1, no input), its conv columns are never kept,
and its keys sit beyond ``lengths`` where no query looks (decode overwrites them).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from star_elastic_jax.infer.cache import HybridCache, KVCache, MambaState
from star_elastic_jax.kernels.ssd import document_starts, ssd, ssd_step
from star_elastic_jax.model.attention import causal_attention
from star_elastic_jax.model.norms import gated_group_rms_norm
from star_elastic_jax.model.params import linear


# ------------------------------------------------------------------------------------------ Mamba2
def _mamba_inputs(mx, u):
    z = linear(u, mx.in_proj_z[...])
    pre = jnp.concatenate([linear(u, mx.in_proj_x[...]), linear(u, mx.in_proj_bc[...])], axis=-1)
    return z, pre, linear(u, mx.in_proj_dt[...])


def _conv_params(mx):
    w = jnp.concatenate([mx.conv_x_weight[...], mx.conv_bc_weight[...]], axis=0).astype(jnp.float32)  # [C, K]
    b = None if mx.conv_x_bias is None else jnp.concatenate(
        [mx.conv_x_bias[...], mx.conv_bc_bias[...]]).astype(jnp.float32)
    return w, b


def _dt(mx, dt_raw):
    dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + mx.dt_bias[...].astype(jnp.float32))
    return jnp.maximum(dt, mx.cfg.effective_dt_clamp_min)


def _mamba_out(mx, y, z, dtype):
    cfg = mx.cfg
    g = gated_group_rms_norm(y.reshape(*y.shape[:-2], -1), z, mx.norm_weight[...], cfg.n_groups,
                             cfg.layer_norm_epsilon)
    return linear(g.astype(dtype), mx.out_proj[...])


def _split_conv(mx, out):
    d_in = mx.num_heads * mx.cfg.mamba_head_dim
    return out[..., :d_in], out[..., d_in:]


def mamba_prefill(mx, u, state: MambaState, valid, seg):
    """``u [B, T, H]`` (normed block input), ``valid [B, T]``, ``seg [B, T]`` (document ids, padding
    holding the row's last id). The cached conv columns and SSM state continue the first document."""
    cfg = mx.cfg
    b, T, _ = u.shape
    h, P, G, N, K = mx.num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size, cfg.conv_kernel
    u = u * valid[..., None].astype(u.dtype)  # SPEC 1.2 step 1
    z, pre, dt_raw = _mamba_inputs(mx, u)
    ext = jnp.concatenate([jnp.swapaxes(state.conv, 1, 2).astype(pre.dtype), pre], axis=1)  # [B, K-1+T, C]
    seg_ext = jnp.concatenate([jnp.repeat(seg[:, :1], K - 1, axis=1), seg], axis=1)
    w, bias = _conv_params(mx)
    extf = ext.astype(jnp.float32)
    out = jnp.zeros(pre.shape, jnp.float32) if bias is None else jnp.broadcast_to(bias, pre.shape)
    for k in range(K):  # the forward's taps, in its order; a tap into an earlier document is dropped
        tap = extf[:, k:k + T] * w[:, k]
        out = out + jnp.where((seg_ext[:, k:k + T] == seg)[..., None], tap, 0.0)
    xs, bc = _split_conv(mx, jax.nn.silu(out))
    B, C = jnp.split(bc.reshape(b, T, 2 * G, N), 2, axis=2)
    dt = _dt(mx, dt_raw) * valid[..., None]  # padding: decay 1, no input
    A = -jnp.exp(mx.A_log[...].astype(jnp.float32))
    y, final = ssd(xs.reshape(b, T, h, P), dt, A, B, C, mx.D[...], chunk_size=cfg.chunk_size,
                   initial_state=state.ssm, segment_ids=seg, impl=cfg.ssd_impl)
    # The conv tail: the K-1 columns ending at the row's last valid token, zeroed where they belong
    # to an earlier document than that token's (the next tap would drop them).
    n_new = valid.sum(axis=1).astype(jnp.int32)
    idx = n_new[:, None] + jnp.arange(K - 1)[None]                       # ext index of the kept columns
    tail = jnp.take_along_axis(ext, idx[..., None], axis=1)               # [B, K-1, C]
    last_seg = jnp.take_along_axis(seg_ext, (n_new + K - 2)[:, None], axis=1)
    tail = jnp.where((jnp.take_along_axis(seg_ext, idx, axis=1) == last_seg)[..., None], tail, 0)
    new = MambaState(conv=jnp.swapaxes(tail, 1, 2).astype(state.conv.dtype), ssm=final.astype(state.ssm.dtype))
    return _mamba_out(mx, y, z, u.dtype), new


def mamba_decode(mx, u, state: MambaState):
    """``u [B, H]``: one token per row."""
    cfg = mx.cfg
    b = u.shape[0]
    h, P, G, N = mx.num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
    z, pre, dt_raw = _mamba_inputs(mx, u)
    window = jnp.concatenate([state.conv.astype(pre.dtype), pre[:, :, None]], axis=2)  # [B, C, K]
    w, bias = _conv_params(mx)
    wf = window.astype(jnp.float32)
    out = jnp.zeros(pre.shape, jnp.float32) if bias is None else jnp.broadcast_to(bias, pre.shape)
    for k in range(cfg.conv_kernel):
        out = out + wf[:, :, k] * w[:, k]
    xs, bc = _split_conv(mx, jax.nn.silu(out))
    B, C = jnp.split(bc.reshape(b, 2 * G, N), 2, axis=1)
    A = -jnp.exp(mx.A_log[...].astype(jnp.float32))
    y, ssm = ssd_step(state.ssm, xs.reshape(b, h, P), _dt(mx, dt_raw), A, B, C, mx.D[...])
    new = MambaState(conv=window[:, :, 1:].astype(state.conv.dtype), ssm=ssm.astype(state.ssm.dtype))
    return _mamba_out(mx, y, z, u.dtype), new


# --------------------------------------------------------------------------------------- attention
def _qkv(at, x):
    cfg = at.cfg
    lead = x.shape[:-1]
    q = linear(x, at.q_proj[...]).reshape(*lead, cfg.num_key_value_heads, -1, cfg.head_dim)
    k = linear(x, at.k_proj[...]).reshape(*lead, cfg.num_key_value_heads, cfg.head_dim)
    v = linear(x, at.v_proj[...]).reshape(*lead, cfg.num_key_value_heads, cfg.head_dim)
    return q, k, v


def _attend_cache(q, kc, vc, lo, hi):
    """``q [B, ..., kv, rep, d]`` against the whole cache ``[B, kv, S, d]``; key ``s`` is visible to
    a query iff ``lo <= s <= hi`` (``lo, hi`` broadcast against q's leading dims)."""
    dh = q.shape[-1]
    s = jnp.arange(kc.shape[2])
    scores = jnp.einsum("b...krd,bksd->b...krs", q, kc, preferred_element_type=jnp.float32) / math.sqrt(dh)
    vis = (s >= lo[..., None]) & (s <= hi[..., None])                     # [B, ..., S]
    scores = jnp.where(vis[..., None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("b...krs,bksd->b...krd", probs, vc)


def _write_rows(cache, new, start):
    """``cache [B, kv, S, d]`` with ``new [B, T, kv, d]`` written at ``start[b]`` in row ``b``."""
    new = jnp.swapaxes(new, 1, 2).astype(cache.dtype)
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n, (0, s, 0)))(cache, new, start)


def attention_prefill(at, x, entry: KVCache, seg, start, doc_lo, fresh: bool):
    """``x [B, T, H]``; ``start [B]``: the cache position of the first new token; ``doc_lo [B, T]``:
    each query's document start. ``fresh`` (static): the cache is empty, so the new keys are all
    there is and the forward's block-causal attention applies directly."""
    b, T, _ = x.shape
    q, k, v = _qkv(at, x)
    new = KVCache(k=_write_rows(entry.k, k, start), v=_write_rows(entry.v, v, start))
    if fresh:
        out = causal_attention(q, k, v, seg)
    else:
        pos = start[:, None] + jnp.arange(T)[None]
        out = _attend_cache(q, new.k, new.v, doc_lo, pos)
    return linear(out.reshape(b, T, -1), at.o_proj[...]), new


def attention_decode(at, x, entry: KVCache, pos, doc_lo):
    """``x [B, H]`` at cache position ``pos [B]``."""
    b = x.shape[0]
    q, k, v = _qkv(at, x)
    rows = jnp.arange(b)
    new = KVCache(k=entry.k.at[rows, :, pos].set(k.astype(entry.k.dtype)),
                  v=entry.v.at[rows, :, pos].set(v.astype(entry.v.dtype)))
    out = _attend_cache(q, new.k, new.v, doc_lo, pos)
    return linear(out.reshape(b, -1), at.o_proj[...]), new


# ------------------------------------------------------------------------------------------- model
def _embed(model, tokens):
    return jnp.take(model.embeddings[...], tokens, axis=0).astype(jnp.dtype(model.cfg.compute_dtype))


def _logits(model, x):
    x = model.norm_f(x)
    return jnp.einsum("...d,vd->...v", x, model.lm_head[...].astype(x.dtype), preferred_element_type=jnp.float32)


def prefill(model, tokens, lengths, cache: HybridCache, segment_ids=None, *, fresh: bool = True):
    """Run ``tokens [B, T]`` (row ``b``'s first ``lengths[b]`` are real) through ``model`` from
    ``cache``; returns ``(logits of each row's last real token [B, V] fp32, updated cache)``.

    ``segment_ids [B, T]`` marks packed documents as in the forward; the cache's state continues
    the first new document. ``fresh`` (static): ``cache`` is empty (a new request)."""
    b, T = tokens.shape
    lengths = lengths.astype(jnp.int32)
    valid = jnp.arange(T)[None] < lengths[:, None]
    last = jnp.maximum(lengths - 1, 0)
    if segment_ids is None:
        seg = jnp.zeros((b, T), jnp.int32)
    else:
        seg = jnp.cumsum(document_starts(segment_ids), axis=1).astype(jnp.int32)  # as the forward renumbers
        seg = jnp.where(valid, seg, jnp.take_along_axis(seg, last[:, None], axis=1))
    start = cache.lengths
    pos = start[:, None] + jnp.arange(T)[None]
    new_doc = jnp.concatenate([jnp.zeros((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    doc_lo = jnp.maximum(cache.doc_start[:, None], jax.lax.cummax(jnp.where(new_doc, pos, 0), axis=1))
    x = _embed(model, tokens)
    entries = []
    for layer, entry in zip(model.layers, cache.layers):
        u = layer.norm(x)
        if isinstance(entry, MambaState):
            out, entry = mamba_prefill(layer.mixer, u, entry, valid, seg)
        elif isinstance(entry, KVCache):
            out, entry = attention_prefill(layer.mixer, u, entry, seg, start, doc_lo, fresh)
        else:
            out = layer.mixer(u)
        x = x + out
        entries.append(entry)
    h_last = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    new = HybridCache(layers=tuple(entries), lengths=start + lengths,
                      doc_start=jnp.take_along_axis(doc_lo, last[:, None], axis=1)[:, 0])
    return _logits(model, h_last), new


def decode(model, tokens, cache: HybridCache):
    """One token per row (``tokens [B]``) at position ``cache.lengths``; returns
    ``(logits [B, V] fp32, cache advanced by one)``."""
    pos = cache.lengths
    x = _embed(model, tokens)
    entries = []
    for layer, entry in zip(model.layers, cache.layers):
        u = layer.norm(x)
        if isinstance(entry, MambaState):
            out, entry = mamba_decode(layer.mixer, u, entry)
        elif isinstance(entry, KVCache):
            out, entry = attention_decode(layer.mixer, u, entry, pos, cache.doc_start)
        else:
            out = layer.mixer(u[:, None])[:, 0]
        x = x + out
        entries.append(entry)
    return _logits(model, x), HybridCache(layers=tuple(entries), lengths=pos + 1, doc_start=cache.doc_start)


__all__ = ["decode", "prefill"]
