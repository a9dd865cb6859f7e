"""Per-chunk SSD math (forward and backward) on 2-D tiles, shared by the Triton and Mosaic kernels.

Both kernel bodies load one chunk of one head and call :func:`chunk_forward` / :func:`chunk_backward`;
everything here is plain ``jnp`` on 2-D arrays, restricted to what both Pallas lowerings accept:
2-D ``dot_general`` (no batch dims), elementwise ops, ``exp``, ``where``, iota comparisons and
row/column sums. There are no cumsum primitives (Triton has no reverse cumsum, Mosaic none at all), no
3-D values, no gathers and no slicing of values.

Notation for one chunk of ``q`` tokens of one head (``S`` is the ``[p, n]`` state entering the chunk):

* ``a_t = dt_t A`` and ``acs_t = sum_{k<=t} a_k`` (a masked row sum: the within-chunk cumsum);
* ``M[t, s] = exp(acs_t - acs_s)`` for ``s <= t`` in the same document, else 0 (decay ``s -> t``);
* ``y = ((C B^T) * M) @ (dt * x) + enter_t exp(acs_t) C_t S^T + D x``;
* ``S' = lam S + sum_s w_s (dt_s x_s)^T B_s`` with ``w_s = exp(acs_last - acs_s)`` if ``s`` is in the
  last token's document (else 0) and ``lam = exp(acs_last)`` if the chunk has no document start.

Documents are handled with masks instead of the reference's ``a_t = -inf`` at document starts, so every
exponent is finite and ``<= 0``: ``doc`` holds, per token, the number of document starts in the chunk
up to and including it (0 = the document that was running before the chunk). A document start at
token ``k`` then only ever appears in masked-out terms, so the gradient through the decay into
``dt_k`` vanishes there, as ``jax.grad`` of the reference gives (``exp(-inf)`` has zero derivative).

Per-token scalars (``dt``, ``doc``) arrive as a column ``[q, 1]`` (Triton: strided loads from the
``[b, L, h]`` layout) or a row ``[1, q]`` (Mosaic: lane-dense blocks); results for them come back in
the orientation they came in. Row <-> column conversion is an exact identity-mask sum.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


def _dot(a, b, contract_a: int, contract_b: int, precision):
    """2-D matmul contracting ``a``'s axis ``contract_a`` with ``b``'s axis ``contract_b`` (fp32 out)."""
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision,
                           preferred_element_type=_F32)


def _iotas(q: int):
    """``(t, s)`` index grids of a ``[q, q]`` tile: ``t`` is the row (target), ``s`` the column (source)."""
    return lax.broadcasted_iota(jnp.int32, (q, q), 0), lax.broadcasted_iota(jnp.int32, (q, q), 1)


def _to_row(col, eye):
    """``[q, 1] -> [1, q]`` exactly (one non-zero term per sum)."""
    return jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


def _to_col(row, eye):
    """``[1, q] -> [q, 1]`` exactly."""
    return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def _total(m):
    """Sum of a 2-D array as a ``[1, 1]`` array (kept 2-D for Mosaic)."""
    return jnp.sum(jnp.sum(m, axis=1, keepdims=True), axis=0, keepdims=True)


class _Decays:
    """Decay factors of one chunk, shared by the forward and the backward (recomputed there)."""

    def __init__(self, dt, doc, a_coef):
        q = max(dt.shape)
        self.t, self.s = _iotas(q)
        eye = self.t == self.s
        self.eye = eye
        self.row_major = dt.shape[0] == 1
        dt = dt.astype(_F32)
        self.dt_col = _to_col(dt, eye) if self.row_major else dt
        a_row = _to_row(self.dt_col, eye) * a_coef
        causal = self.s <= self.t
        # acs_t = sum_{k<=t} a_k; the row copy is an exact transposition, so acs_t - acs_t == 0.
        self.acs_col = jnp.sum(jnp.where(causal, a_row, 0.0), axis=1, keepdims=True)
        acs_row = _to_row(self.acs_col, eye)
        self.total = jnp.sum(a_row, axis=1, keepdims=True)                    # [1, 1] = acs_last
        keep = causal
        if doc is None:
            enter = jnp.ones_like(self.acs_col)
            in_last = enter
            no_start = jnp.ones_like(self.total)
        else:
            doc = doc.astype(_F32)
            doc_col = _to_col(doc, eye) if self.row_major else doc
            doc_row = _to_row(doc_col, eye)
            doc_last = jnp.max(doc_row, axis=1, keepdims=True)                # doc ids never decrease
            keep = keep & (doc_col == doc_row)
            enter = (doc_col == 0.0).astype(_F32)                           # same doc as the previous chunk
            in_last = (doc_col == doc_last).astype(_F32)
            no_start = (doc_last == 0.0).astype(_F32)
        self.keep = keep
        # Valid exponents are <= 0 mathematically; the clamp only removes rounding noise and keeps the
        # masked-out entries (which may be large and positive) from overflowing.
        self.m = jnp.where(keep, jnp.exp(jnp.minimum(self.acs_col - acs_row, 0.0)), 0.0)   # [q, q]
        self.enter = enter * jnp.exp(self.acs_col)                                        # [q, 1]
        self.w = in_last * jnp.exp(jnp.minimum(self.total - self.acs_col, 0.0))           # [q, 1]
        self.lam = no_start * jnp.exp(self.total)                                         # [1, 1]

    def like_input(self, col):
        """A ``[q, 1]`` result in the orientation ``dt`` came in."""
        return _to_row(col, self.eye) if self.row_major else col


def chunk_forward(x, dt, doc, b_mat, c_mat, state, a_coef, d_coef, *, precision=None):
    """One chunk of the SSD forward for one head.

    Args:
      x: ``[q, p]`` inputs (any float dtype). dt: ``[q, 1]`` or ``[1, q]`` step sizes.
      doc: like ``dt``, document number within the chunk (0 = continues the previous chunk), or None.
      b_mat, c_mat: ``[q, n]``. state: ``[p, n]`` fp32 state entering the chunk.
      a_coef, d_coef: the head's scalar ``A`` and ``D``.
      precision: ``dot_general`` precision (the kernels pass exact-fp32 settings).
    Returns:
      ``(y [q, p] fp32, state [p, n] fp32 leaving the chunk)``.
    """
    x, b_mat, c_mat = (t.astype(_F32) for t in (x, b_mat, c_mat))
    dec = _Decays(dt, doc, a_coef)
    u = x * dec.dt_col                                                  # dt-scaled input
    g = _dot(c_mat, b_mat, 1, 1, precision) * dec.m                     # [q, q] (C B^T) * decay
    y = _dot(g, u, 1, 0, precision)
    y = y + dec.enter * _dot(c_mat, state, 1, 1, precision)             # state entering -> output
    y = y + d_coef * x
    new_state = dec.lam * state + _dot(u * dec.w, b_mat, 0, 0, precision)
    return y, new_state


def chunk_backward(x, dt, doc, b_mat, c_mat, state, dy, dstate_out, a_coef, d_coef, *, precision=None):
    """One chunk of the SSD backward for one head (forward intermediates are recomputed).

    Args are those of :func:`chunk_forward` plus ``dy [q, p]`` (cotangent of ``y``) and
    ``dstate_out [p, n]`` (cotangent of the state leaving the chunk).
    Returns ``(dx [q, p], ddt, da, db [q, n], dc [q, n], dstate_in [p, n])``, all fp32, where ``ddt``
    and ``da`` (the cotangent of ``a_t = dt_t A``, for ``dA = sum(da * dt)``) have ``dt``'s orientation.
    ``ddt`` already includes ``A * da``; ``dx`` includes the ``D`` skip.
    """
    x, b_mat, c_mat, dy = (t.astype(_F32) for t in (x, b_mat, c_mat, dy))
    dec = _Decays(dt, doc, a_coef)
    u = x * dec.dt_col
    cb = _dot(c_mat, b_mat, 1, 1, precision)

    # Intra-chunk term y = (cb * m) @ u.
    dg = _dot(dy, u, 1, 1, precision)                                   # [q, q] dy_t . u_s
    dcb = dg * dec.m
    dc = _dot(dcb, b_mat, 1, 0, precision)
    db = _dot(dcb, c_mat, 0, 0, precision)
    du = _dot(cb * dec.m, dy, 0, 0, precision)
    p_seg = dcb * cb                       # d loss / d (acs_t - acs_s), zero wherever m is masked

    # State entering the chunk -> output: y_t += enter_t C_t S^T.
    dc = dc + dec.enter * _dot(dy, state, 1, 0, precision)
    dstate_in = dec.lam * dstate_out + _dot(dy * dec.enter, c_mat, 0, 0, precision)
    d_enter = jnp.sum(dy * _dot(c_mat, state, 1, 1, precision), axis=1, keepdims=True)

    # Chunk -> state leaving it: S' = lam S + (u w)^T B.
    b_ds = _dot(b_mat, dstate_out, 1, 1, precision)                     # [q, p]
    du = du + dec.w * b_ds
    db = db + dec.w * _dot(u, dstate_out, 1, 0, precision)
    d_w = jnp.sum(u * b_ds, axis=1, keepdims=True) * dec.w              # d loss / d log w_s
    d_lam = _total(dstate_out * state) * dec.lam                        # d loss / d log lam

    # Cotangent of acs (enter_t ~ exp(acs_t), w_s ~ exp(acs_last - acs_s), lam ~ exp(acs_last)), then
    # of a through acs_t = sum_{k<=t} a_k: da_k = sum_{t>=k} dacs_t, plus the acs_last terms for all k.
    dacs = (jnp.sum(p_seg, axis=1, keepdims=True) - _to_col(jnp.sum(p_seg, axis=0, keepdims=True), dec.eye)
            + d_enter * dec.enter - d_w)
    d_last = d_lam + jnp.sum(d_w, axis=0, keepdims=True)                # [1, 1]
    da_row = jnp.sum(jnp.where(dec.t >= dec.s, dacs, 0.0), axis=0, keepdims=True) + d_last
    da = _to_col(da_row, dec.eye)

    ddt = jnp.sum(du * x, axis=1, keepdims=True) + a_coef * da
    dx = du * dec.dt_col + d_coef * dy
    return dx, dec.like_input(ddt), dec.like_input(da), db, dc, dstate_in


__all__ = ["chunk_backward", "chunk_forward"]
