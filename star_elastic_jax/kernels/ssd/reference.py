"""Pure-JAX chunked SSD (Mamba2 selective scan), the reference every other path is tested against.

Shapes: ``x [b, L, h, p]``, ``dt [b, L, h]`` (after softplus and clamp), ``A [h]`` (negative),
``B, C [b, L, g, n]`` (shared by the ``h/g`` heads of a group, group-major), ``D [h]``.
State ``[b, h, p, n]``. All arithmetic is fp32 whatever the input dtype.

Document boundaries (``segment_ids``) are handled by setting the log-decay ``a_t = dt_t*A`` to
``-inf`` at the first token of every document: the state is multiplied by ``exp(-inf) = 0``
before that token's input is added. Every decay factor is read off one stable segment-sum
(mask -> cumsum -> mask) over the chunk prefixed with a zero, never as a difference of
cumulative sums, so ``-inf`` never meets ``-inf`` in a subtraction.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _segsum(a: jax.Array) -> jax.Array:
    """``out[..., i, j] = sum_{k=j+1..i} a[..., k]`` for ``i >= j``, ``-inf`` above the diagonal."""
    q = a.shape[-1]
    x = jnp.broadcast_to(a[..., :, None], (*a.shape, q))  # x[..., i, j] = a_i
    strict = jnp.tril(jnp.ones((q, q), dtype=bool), k=-1)
    x = jnp.where(strict, x, 0.0)
    s = jnp.cumsum(x, axis=-2)
    return jnp.where(jnp.tril(jnp.ones((q, q), dtype=bool)), s, -jnp.inf)


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """``[b, L]`` bool: True where a token starts a new document (never at position 0)."""
    first = jnp.zeros_like(segment_ids[:, :1], dtype=bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def ssd_reference(x, dt, A, B, C, D, *, chunk_size: int, initial_state=None, segment_ids=None):
    """Chunked SSD. Returns ``(y [b, L, h, p] fp32, final_state [b, h, p, n] fp32)``; y includes ``D*x``."""
    b, L, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    q = chunk_size
    f32 = jnp.float32
    x, dt, B, C = (t.astype(f32) for t in (x, dt, B, C))
    A = A.astype(f32)
    D = D.astype(f32)

    a = dt * A  # [b, L, h] log-decay per step
    if segment_ids is not None:
        a = jnp.where(document_starts(segment_ids)[..., None], -jnp.inf, a)
    xbar = x * dt[..., None]

    pad = (-L) % q
    if pad:
        a = jnp.pad(a, ((0, 0), (0, pad), (0, 0)))
        xbar = jnp.pad(xbar, ((0, 0), (0, pad), (0, 0), (0, 0)))
        B = jnp.pad(B, ((0, 0), (0, pad), (0, 0), (0, 0)))
        C = jnp.pad(C, ((0, 0), (0, pad), (0, 0), (0, 0)))
    c = (L + pad) // q

    a = a.reshape(b, c, q, g, r).transpose(0, 3, 4, 1, 2)  # [b, g, r, c, q]
    xbar = xbar.reshape(b, c, q, g, r, p)
    B = B.reshape(b, c, q, g, n)
    C = C.reshape(b, c, q, g, n)

    seg = _segsum(jnp.pad(a, ((0, 0),) * 4 + ((1, 0),)))  # [b, g, r, c, q+1, q+1]
    l_diag = jnp.exp(seg[..., 1:, 1:])                     # decay s -> l inside the chunk
    decay_to_end = jnp.exp(seg[..., q, 1:])                # decay s -> chunk end
    decay_from_start = jnp.exp(seg[..., 1:, 0])            # decay chunk start -> l
    chunk_decay = jnp.exp(seg[..., q, 0])                  # [b, g, r, c]

    # 1. intra-chunk (diagonal blocks); C.B is computed once per group, not per head.
    cb = jnp.einsum("bclgn,bcsgn->bgcls", C, B)
    y = jnp.einsum("bgcls,bgrcls,bcsgrp->bclgrp", cb, l_diag, xbar)

    # 2. each chunk's own contribution to the state at its end.
    chunk_states = jnp.einsum("bcsgn,bgrcs,bcsgrp->cbgrpn", B, decay_to_end, xbar)

    # 3. inter-chunk recurrence, sequential over chunks (O(c), exact same math as the matrix form).
    if initial_state is None:
        s0 = jnp.zeros((b, g, r, p, n), f32)
    else:
        s0 = initial_state.astype(f32).reshape(b, g, r, p, n)

    def step(state, inp):
        decay, new = inp
        return decay[..., None, None] * state + new, state

    final, start_states = jax.lax.scan(step, s0, (jnp.moveaxis(chunk_decay, -1, 0), chunk_states))
    # start_states: [c, b, g, r, p, n], the state entering each chunk.

    # 4. state -> output.
    y = y + jnp.einsum("bclgn,cbgrpn,bgrcl->bclgrp", C, start_states, decay_from_start)

    y = y.reshape(b, c * q, h, p)[:, :L] + D[:, None] * x
    return y, final.reshape(b, h, p, n)


def ssd_step(state, x, dt, A, B, C, D):
    """One decode step. ``state [b,h,p,n]``, ``x [b,h,p]``, ``dt [b,h]``, ``B,C [b,g,n]``.

    Returns ``(y [b,h,p] fp32, new_state fp32)``: ``S = exp(dt*A) S + dt x B^T``; ``y = S C + D x``.
    """
    b, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    f32 = jnp.float32
    x, dt, B, C, state = (t.astype(f32) for t in (x, dt, B, C, state))
    decay = jnp.exp(dt * A.astype(f32))  # [b, h]
    Bh = jnp.repeat(B, r, axis=1)  # [b, h, n] (group-major heads)
    Ch = jnp.repeat(C, r, axis=1)
    state = decay[..., None, None] * state + (dt[..., None] * x)[..., None] * Bh[:, :, None, :]
    y = jnp.einsum("bhpn,bhn->bhp", state, Ch) + D.astype(f32)[:, None] * x
    return y, state
