"""Pure-JAX chunked SSD (Mamba2 selective scan), the reference every other path is tested against.

Shapes: ``x [b, L, h, p]``, ``dt [b, L, h]`` (after softplus and clamp), ``A [h]`` (negative),
``B, C [b, L, g, n]`` (shared by the ``h/g`` heads of a group, group-major), ``D [h]``.
State ``[b, h, p, n]``. All arithmetic is fp32 whatever the input dtype.

Document boundaries (``segment_ids``) are handled by setting the log-decay ``a_t = dt_t*A`` to
``-inf`` at the first token of every document: the state is multiplied by ``exp(-inf) = 0``
before that token's input is added. No decay factor is ever a difference of cumulative sums, so
``-inf`` never meets ``-inf`` in a subtraction: the chunk-start/chunk-end decays are plain
(reverse) cumulative sums, and the intra-chunk segment sums ``sum_{k=s+1..l} a_k`` are summed
directly over the finite log-decays and set to ``-inf`` wherever ``l`` and ``s`` lie in different
documents (exactly where the sum would meet a ``-inf``).

The chunk size only changes the blocking, never the math: internally chunks are at most
``_MAX_CHUNK`` long (smaller diagonal blocks are cheaper; on CPU 64 beats 128 by ~1.5x).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


_MAX_CHUNK = 64


def _segsum_matrix(q: int) -> jax.Array:
    """``M[k, i, j] = 1`` iff ``j < k <= i``: ``(a @ M)[i, j] = sum_{k=j+1..i} a_k``."""
    k, i, j = jnp.meshgrid(jnp.arange(q), jnp.arange(q), jnp.arange(q), indexing="ij")
    return ((j < k) & (k <= i)).astype(jnp.float32)


def _cumsum(a: jax.Array) -> jax.Array:
    """Inclusive cumulative sum over the last axis (associative scan: ~2x ``jnp.cumsum`` on CPU)."""
    return jax.lax.associative_scan(jnp.add, a, axis=a.ndim - 1)


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """``[b, L]`` bool: True where a token starts a new document (never at position 0)."""
    first = jnp.zeros_like(segment_ids[:, :1], dtype=bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def ssd_reference(x, dt, A, B, C, D, *, chunk_size: int, initial_state=None, segment_ids=None):
    """Chunked SSD. Returns ``(y [b, L, h, p] fp32, final_state [b, h, p, n] fp32)``; y includes ``D*x``."""
    b, L, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    q = min(chunk_size, _MAX_CHUNK)
    f32 = jnp.float32
    x, dt, B, C = (t.astype(f32) for t in (x, dt, B, C))
    A = A.astype(f32)
    D = D.astype(f32)

    a_fin = dt * A  # [b, L, h] log-decay per step (finite)
    a = a_fin
    docs = None
    if segment_ids is not None:
        starts = document_starts(segment_ids)
        a = jnp.where(starts[..., None], -jnp.inf, a_fin)
        docs = jnp.cumsum(starts.astype(jnp.int32), axis=1)  # document index of every token
    xbar = x * dt[..., None]

    pad = (-L) % q
    if pad:
        a = jnp.pad(a, ((0, 0), (0, pad), (0, 0)))
        a_fin = jnp.pad(a_fin, ((0, 0), (0, pad), (0, 0)))
        xbar = jnp.pad(xbar, ((0, 0), (0, pad), (0, 0), (0, 0)))
        B = jnp.pad(B, ((0, 0), (0, pad), (0, 0), (0, 0)))
        C = jnp.pad(C, ((0, 0), (0, pad), (0, 0), (0, 0)))
        if docs is not None:
            docs = jnp.pad(docs, ((0, 0), (0, pad)), mode="edge")
    c = (L + pad) // q

    # Chunk-major, group-major layout: [b, c, g, ...] so every contraction below batches (b, c, g).
    a = a.reshape(b, c, q, g, r).transpose(0, 1, 3, 4, 2)          # [b, c, g, r, q]
    a_fin = a_fin.reshape(b, c, q, g, r).transpose(0, 1, 3, 4, 2)
    xh = xbar.reshape(b, c, q, g, r, p).transpose(0, 1, 3, 4, 2, 5)  # [b, c, g, r, q, p]
    B = B.reshape(b, c, q, g, n).transpose(0, 1, 3, 2, 4)          # [b, c, g, q, n]
    C = C.reshape(b, c, q, g, n).transpose(0, 1, 3, 2, 4)

    acs = _cumsum(a)                                   # sum_{k<=l} a_k (may be -inf: never subtracted)
    decay_from_start = jnp.exp(acs)                    # decay chunk start -> l (incl. step l)
    chunk_decay = decay_from_start[..., -1]            # [b, c, g, r]
    a_next = jnp.concatenate([a[..., 1:], jnp.zeros_like(a[..., :1])], axis=-1)
    decay_to_end = jnp.exp(jnp.flip(_cumsum(jnp.flip(a_next, -1)), -1))  # exp(sum_{k>s} a_k)

    # Intra-chunk segment sums over the finite log-decays; -inf above the diagonal and across documents.
    seg = jnp.einsum("...k,kij->...ij", a_fin, _segsum_matrix(q))   # [b, c, g, r, l, s]
    keep = jnp.tril(jnp.ones((q, q), dtype=bool))
    if docs is not None:
        d = docs.reshape(b, c, 1, 1, q)
        keep = keep & (d[..., :, None] == d[..., None, :])
    l_diag = jnp.exp(jnp.where(keep, seg, -jnp.inf))  # decay s -> l inside the chunk

    # 1. intra-chunk (diagonal blocks); C.B is computed once per group, not per head.
    cb = jnp.einsum("bcgln,bcgsn->bcgls", C, B)
    y = jnp.einsum("bcgrls,bcgrsp->bcgrlp", cb[:, :, :, None] * l_diag, xh)

    # 2. each chunk's own contribution to the state at its end.
    chunk_states = jnp.einsum("bcgrsp,bcgsn->cbgrpn", xh * decay_to_end[..., None], B)

    # 3. inter-chunk recurrence, sequential over chunks (O(c), exact same math as the matrix form).
    if initial_state is None:
        s0 = jnp.zeros((b, g, r, p, n), f32)
    else:
        s0 = initial_state.astype(f32).reshape(b, g, r, p, n)

    def step(state, inp):
        decay, new = inp
        return decay[..., None, None] * state + new, state

    final, start_states = jax.lax.scan(step, s0, (jnp.moveaxis(chunk_decay, 1, 0), chunk_states))
    # start_states: [c, b, g, r, p, n], the state entering each chunk.

    # 4. state -> output.
    y = y + jnp.einsum("bcgln,cbgrpn->bcgrlp", C, start_states) * decay_from_start[..., None]

    y = y.transpose(0, 1, 4, 2, 3, 5).reshape(b, c * q, h, p)[:, :L] + D[:, None] * x
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
