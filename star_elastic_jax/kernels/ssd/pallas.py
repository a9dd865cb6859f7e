"""Public Pallas SSD: :func:`ssd_pallas`, a ``custom_vjp`` over the Triton (GPU) or Mosaic (TPU) kernels.

The wrapper validates arguments, converts the inputs to the chosen kernel layout (padding ``L`` to a
whole number of chunks, plus ``p``/``n`` to powers of two >= 16 for Triton; head-major transposes for
Mosaic), runs the kernels and maps the results back. All layout work is plain JAX *outside* the
``custom_vjp``, so autodiff maps the kernel-layout gradients back through the pads and transposes.

Padding is exact: padded tokens have ``dt = 0`` (decay ``exp(0) = 1``, no input) and ``x = B = C = 0``,
so they add nothing to any output and leave the final state unchanged; padded ``p``/``n`` columns
stay zero throughout. Documents (``segment_ids``) become a per-token count of document starts within
the token's chunk (see :mod:`.chunk_math`), computed here with a plain cumsum.

Elastic heads (``head_limit``, a per-group prefix of active heads): with a static limit the Triton
grid covers only the active heads, mapped to model heads inside the index maps (no gather), while
the Mosaic path slices the active heads out during the head-major transposes it needs anyway and
zero-pads the results back. A traced limit reaches the kernels as an ``int32[1]`` operand and
inactive heads skip their work there. Either way inactive heads get exact-zero outputs, and zero
gradients: their kernel outputs are zero and ``dD`` is masked here.

The forward's residuals are the inputs plus the fp32 state entering every chunk; the backward kernel
recomputes the chunk intermediates. The cheap reductions stay in JAX: ``dA = sum(da * dt)``,
``dD = sum(dy * x)`` and the sum of the per-head ``dB``/``dC`` partials over each group's heads.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from star_elastic_jax.errors import ConfigError
from star_elastic_jax.kernels.platform import PALLAS_BACKENDS, resolve_pallas_backend
from star_elastic_jax.kernels.ssd import pallas_tpu, pallas_triton
from star_elastic_jax.kernels.ssd.reference import document_starts

BACKENDS = PALLAS_BACKENDS
_F32 = jnp.float32
_TPU_LANES = 128


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static launch description (hashable: the ``custom_vjp`` non-differentiable argument)."""

    backend: str
    interpret: bool
    q: int                      # kernel chunk length
    heads_per_group: int
    head_limit: int | None      # Triton only: static active heads per group; None: all, or traced


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _validate(x, dt, A, B, C, D, chunk_size, initial_state, segment_ids):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
        raise ConfigError("chunk_size", chunk_size, "a positive int")
    if x.ndim != 4:
        raise ConfigError("x.shape", x.shape, "[b, L, h, p]")
    b, seq, h, p = x.shape
    if B.ndim != 4:
        raise ConfigError("B.shape", B.shape, "[b, L, g, n]")
    g, n = B.shape[2:]
    expected = {"dt": (dt, (b, seq, h)), "A": (A, (h,)), "B": (B, (b, seq, g, n)), "C": (C, (b, seq, g, n)),
                "D": (D, (h,))}
    if initial_state is not None:
        expected["initial_state"] = (initial_state, (b, h, p, n))
    if segment_ids is not None:
        expected["segment_ids"] = (segment_ids, (b, seq))
    for name, (arr, shape) in expected.items():
        if tuple(arr.shape) != shape:
            raise ConfigError(f"{name}.shape", tuple(arr.shape), f"{shape} given x {x.shape}, B {B.shape}")
    if g == 0 or h % g:
        raise ConfigError("B.shape[2]", g, f"a divisor of the head count {h}")


def _static_head_limit(head_limit, r):
    """``(static limit or None, traced int32[1] limit or None)``."""
    if head_limit is None:
        return None, None
    if isinstance(head_limit, (int, np.integer)) and not isinstance(head_limit, bool):
        if not 1 <= head_limit <= r:
            raise ConfigError("head_limit", head_limit, f"an int in [1, {r}] (heads per group)")
        return (None if head_limit == r else int(head_limit)), None
    if isinstance(head_limit, jax.Array) and head_limit.size == 1 and jnp.issubdtype(head_limit.dtype, jnp.integer):
        # Traced limits cannot be checked; clamping keeps out-of-range values meaningful (0 or all heads).
        return None, jnp.clip(jnp.reshape(head_limit, (1,)).astype(jnp.int32), 0, r)
    raise ConfigError("head_limit", head_limit, "None, a Python int, or an integer JAX scalar")


def _chunk_len(plan_backend, interpret, chunk_size, seq):
    """Kernel chunk: Triton tiles are powers of two in [16, MAX_CHUNK]; Mosaic rows a multiple of 8."""
    if plan_backend == "triton":
        return min(max(_next_pow2(min(chunk_size, seq)), 16), pallas_triton.MAX_CHUNK)
    q = _round_up(min(chunk_size, seq), 8)
    if not interpret and q % _TPU_LANES and q < seq:
        # dt and document ids are [1, q] lane-dim blocks: Mosaic needs q % 128 == 0 or q == L.
        raise ConfigError("chunk_size", chunk_size,
                          "a multiple of 128 (or >= the sequence length) for compiled Mosaic TPU kernels")
    return q


def ssd_pallas(x, dt, A, B, C, D, *, chunk_size, initial_state=None, segment_ids=None, head_limit=None,
               backend=None, interpret=False):
    """Chunked SSD with Pallas kernels; same shapes and semantics as :func:`.reference.ssd_reference`.

    Args:
      x: ``[b, L, h, p]``; dt: ``[b, L, h]`` (softplus + clamp already applied); A: ``[h]`` (negative);
        B, C: ``[b, L, g, n]`` (group-major heads); D: ``[h]``. bf16 or fp32; computed in fp32.
      chunk_size: chunk length hint; the math does not depend on it. Triton rounds it to a power of
        two in ``[16, pallas_triton.MAX_CHUNK]``; Mosaic to a multiple of 8 (compiled kernels need a
        multiple of 128 unless one chunk covers ``L``).
      initial_state: optional ``[b, h, p, n]`` state before the first token (first document only).
      segment_ids: optional ``[b, L]`` ints; the state is reset before every token whose id differs
        from the previous token's.
      head_limit: active heads per group (head ``grp * (h/g) + j`` is active iff ``j < head_limit``):
        a Python int (the grid covers only active heads) or a traced integer scalar (full grid,
        inactive heads skip their work). Inactive heads get exactly-zero outputs and gradients.
      backend: ``"triton"``, ``"mosaic_tpu"`` or None (from ``jax.default_backend()``; CPU runs the
        Triton kernels in interpret mode).
      interpret: run the kernels in Pallas interpret mode (CPU).
    Returns:
      ``(y [b, L, h, p] fp32, final_state [b, h, p, n] fp32)``; ``y`` includes ``D * x``.
    Raises:
      ConfigError: bad backend, chunk_size, head_limit or inconsistent shapes (before any tracing).
    """
    backend, interpret = resolve_pallas_backend(backend, interpret)
    _validate(x, dt, A, B, C, D, chunk_size, initial_state, segment_ids)
    b, seq, h, p = x.shape
    g, n = B.shape[2:]
    r = h // g
    static_limit, traced_limit = _static_head_limit(head_limit, r)
    q = _chunk_len(backend, interpret, int(chunk_size), seq)
    plan = _Plan(backend, interpret, q, r, static_limit)
    seq_pad = _round_up(seq, q)

    doc = None
    if segment_ids is not None:
        starts = jnp.pad(document_starts(jnp.asarray(segment_ids)), ((0, 0), (0, seq_pad - seq)))
        doc = jnp.cumsum(starts.reshape(b, seq_pad // q, q).astype(jnp.int32), axis=-1)
        doc = doc.reshape(b, seq_pad).astype(_F32)  # small ints: exact in fp32, and float-only kernels

    def pad(arr, axis_pads):
        widths = [(0, 0)] * arr.ndim
        for axis, amount in axis_pads:
            widths[axis] = (0, amount)
        return jnp.pad(arr, widths) if any(w for _, w in widths) else arr

    if backend == "triton":
        pp, nn = max(_next_pow2(p), 16), max(_next_pow2(n), 16)
        xk = pad(x, [(1, seq_pad - seq), (3, pp - p)])
        dtk = pad(dt, [(1, seq_pad - seq)])
        bk, ck = (pad(t, [(1, seq_pad - seq), (3, nn - n)]) for t in (B, C))
        s0k = None if initial_state is None else pad(initial_state, [(2, pp - p), (3, nn - n)])
        dock = None if doc is None else doc[..., None]
        y, final = _ssd_core(plan, xk, dtk, A, bk, ck, D, s0k, dock, traced_limit)
        return y[:, :seq, :, :p], final[:, :, :p, :n]

    # Mosaic: head-major transposes. A static head limit is applied here, on the way: the grid then
    # covers exactly the active heads and the transposes copy only them.
    limit = static_limit or r
    xk, dtk, a_k, d_k, s0k = (
        None if t is None else _active_prefix(t, axis, g, r, limit)
        for t, axis in ((x, 2), (dt, 2), (A, 0), (D, 0), (initial_state, 1)))
    plan = dataclasses.replace(plan, heads_per_group=limit, head_limit=None)
    xk = jnp.transpose(pad(xk, [(1, seq_pad - seq)]), (0, 2, 1, 3))               # [b, h, Lp, p]
    dtk = jnp.transpose(pad(dtk, [(1, seq_pad - seq)]), (0, 2, 1))[:, :, None]     # [b, h, 1, Lp]
    bk, ck = (jnp.transpose(pad(t, [(1, seq_pad - seq)]), (0, 2, 1, 3)) for t in (B, C))  # [b, g, Lp, n]
    dock = None if doc is None else doc[:, None]                                  # [b, 1, Lp]
    y, final = _ssd_core(plan, xk, dtk, a_k, bk, ck, d_k, s0k, dock, traced_limit)
    y = jnp.transpose(y, (0, 2, 1, 3))[:, :seq]
    return _scatter_prefix(y, 2, g, r), _scatter_prefix(final, 1, g, r)


def _active_prefix(arr, axis, groups, heads_per_group, limit):
    """The first ``limit`` heads of every group along ``axis`` (group-major heads)."""
    if limit == heads_per_group:
        return arr
    shape = arr.shape
    grouped = arr.reshape(shape[:axis] + (groups, heads_per_group) + shape[axis + 1:])
    kept = jax.lax.slice_in_dim(grouped, 0, limit, axis=axis + 1)
    return kept.reshape(shape[:axis] + (groups * limit,) + shape[axis + 1:])


def _scatter_prefix(arr, axis, groups, heads_per_group):
    """Inverse of :func:`_active_prefix`: zero-pad every group back to ``heads_per_group`` heads."""
    shape = arr.shape
    limit = shape[axis] // groups
    if limit == heads_per_group:
        return arr
    grouped = arr.reshape(shape[:axis] + (groups, limit) + shape[axis + 1:])
    widths = [(0, 0)] * grouped.ndim
    widths[axis + 1] = (0, heads_per_group - limit)
    return jnp.pad(grouped, widths).reshape(shape[:axis] + (groups * heads_per_group,) + shape[axis + 1:])


def _module(plan):
    return pallas_triton if plan.backend == "triton" else pallas_tpu


def _launch_args(plan):
    args = {"q": plan.q, "heads_per_group": plan.heads_per_group, "interpret": plan.interpret}
    if plan.backend == "triton":   # Mosaic never sees a static limit (see ssd_pallas)
        args["head_limit"] = plan.head_limit
    return args


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ssd_core(plan, x, dt, a_vec, b_mat, c_mat, d_vec, s0, doc, hl):
    """Kernel-layout SSD; returns kernel-layout ``(y, final_state)``."""
    return _ssd_fwd(plan, x, dt, a_vec, b_mat, c_mat, d_vec, s0, doc, hl)[0]


def _ssd_fwd(plan, x, dt, a_vec, b_mat, c_mat, d_vec, s0, doc, hl):
    y, final, states = _module(plan).forward(x, dt, doc, b_mat, c_mat, a_vec, d_vec, s0, hl,
                                             **_launch_args(plan))
    return (y, final), (x, dt, a_vec, b_mat, c_mat, d_vec, s0, doc, hl, states)


def _active_heads(plan, h, hl):
    """``[h]`` bool mask of active heads, or None when all are."""
    j = jnp.arange(h) % plan.heads_per_group
    if hl is not None:
        return j < hl[0]
    if plan.head_limit is not None:
        return j < plan.head_limit
    return None


def _ssd_bwd(plan, residuals, cotangents):
    x, dt, a_vec, b_mat, c_mat, d_vec, s0, doc, hl, states = residuals
    dy, dfinal = (t.astype(_F32) for t in cotangents)
    dx, ddt, da, db_part, dc_part, ds0 = _module(plan).backward(
        x, dt, doc, b_mat, c_mat, a_vec, d_vec, states, dy, dfinal, hl, **_launch_args(plan))
    dtf = dt.astype(_F32)
    if plan.backend == "triton":        # x [b, Lp, h, p], dt [b, Lp, h], partials [b, Lp, H, n]
        h, head_axis = x.shape[2], 2
        dd = jnp.sum(dy * x.astype(_F32), axis=(0, 1, 3))
        da_sum = jnp.sum(da * dtf, axis=(0, 1))
    else:                               # x [b, h, Lp, p], dt [b, h, 1, Lp], partials [b, H, Lp, n]
        h, head_axis = x.shape[1], 1
        dd = jnp.sum(dy * x.astype(_F32), axis=(0, 2, 3))
        da_sum = jnp.sum(da * dtf, axis=(0, 2, 3))
    active = _active_heads(plan, h, hl)
    if active is not None:
        dd = jnp.where(active, dd, 0.0)   # y of an inactive head is 0 whatever D is

    def group_sum(part):
        """Sum per-head partials over each group's heads: ``[.., H, ..] -> [.., g, ..]``."""
        shape = part.shape
        heads_in_group = plan.head_limit or plan.heads_per_group
        split = shape[:head_axis] + (shape[head_axis] // heads_in_group, heads_in_group) + shape[head_axis + 1:]
        return jnp.sum(part.reshape(split), axis=head_axis + 1)

    grads = (dx.astype(x.dtype), ddt.astype(dt.dtype), da_sum.astype(a_vec.dtype),
             group_sum(db_part).astype(b_mat.dtype), group_sum(dc_part).astype(c_mat.dtype),
             dd.astype(d_vec.dtype), None if s0 is None else ds0.astype(s0.dtype), None, None)
    return grads


_ssd_core.defvjp(_ssd_fwd, _ssd_bwd)

__all__ = ["BACKENDS", "ssd_pallas"]
