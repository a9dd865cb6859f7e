"""GPU kernels for :mod:`.gmm`, lowered through Pallas' Triton backend.

``plgpu.CompilerParams`` is what selects the Triton lowering: without it JAX 0.10 lowers a
``pallas_call`` on CUDA with Mosaic GPU. Refs are unblocked (whole arrays, i.e. raw pointers); every
program addresses its tiles with ``pl.ds`` slices and masked ``plgpu.load``/``plgpu.store``, so partial
tiles (K = 2688, N = 1856 are not multiples of the power-of-two tiles) and rows of other groups are
masked rather than padded.

gmm: grid ``(n-tiles, work items)``; the K loop runs inside the program (``fori_loop`` whose trip
count is ``cdiv(k_limit, bk)``, 0 for no-op items and n-tiles at or past ``n_limit``, which only
store zeros). Straddling m-tiles: the work items of one m-tile (one per group overlapping it) run in
parallel as independent programs; each computes the full ``bm``-row tile (its loads skip the rows of
other groups: masked loads fetch nothing there) and stores with a row mask of its own group's rows.
The rows of a tile are partitioned among its items (rows past ``sum(group_sizes)`` belong to gmm's
padding group, which stores zeros), so the masked stores are disjoint: no races, no atomics, no
zero-initialised output, and every output element is written exactly once.

tgmm: grid ``(n-tiles, k-tiles, groups)``; each program owns one ``[bk, bn]`` block of one group's
output and loops over that group's rows in ``bm``-row steps from the group's (unaligned) first row,
masking rows past the group's end. Empty groups and tiles past the limits run 0 steps and store
zeros. It ignores the work-item list (only ``offsets`` is used): no tile is shared between programs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from star_elastic_jax.errors import ConfigError

# (bm, bk, bn). gmm: 128x128 output tile, K in steps of 64 (bf16 operand tiles 2 x 16 KiB per pipeline
# stage). tgmm: 128x128 [K, N] output tile, rows in steps of 64 (groups average 384 rows at the
# 49152-row target, so a 64-row step wastes little on each group's ragged end).
DEFAULT_TILING = {"gmm": (128, 64, 128), "tgmm": (64, 128, 128)}
NUM_WARPS = 4


def check_tiling(tiling) -> None:
    """Triton tiles must be powers of two and at least 16 (``tl.dot`` needs every dim >= 16)."""
    if not all(t >= 16 and t & (t - 1) == 0 for t in tiling):
        raise ConfigError("tiling", tiling, "powers of two >= 16 for the triton backend")


def resolve_tiling(op: str, tiling, m: int, k: int, n: int) -> tuple[int, int, int]:
    """``tiling`` (or the default for ``op``), each tile shrunk to the smallest power of two >= 16 that
    covers its dim, so small problems do not compute mostly-masked tiles."""
    base = DEFAULT_TILING[op] if tiling is None else tiling
    return tuple(min(t, max(16, pl.next_power_of_2(d))) for t, d in zip(base, (m, k, n)))


def _num_stages(dtype) -> int:
    # 4 stages of bf16 operand tiles fit H100 shared memory comfortably; fp32 tiles are twice the size.
    return 4 if jnp.dtype(dtype).itemsize <= 2 else 2


def _cdiv(a, b: int):
    return lax.div(a + (b - 1), b)


def _dot(a, b, **kw):
    # fp32 operands: full fp32 (no TF32), so fp32 runs match the oracle; bf16: native tensor cores.
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return pl.dot(a, b, precision=prec, **kw)


def _gmm_kernel(off_ref, grp_ref, tile_ref, scal_ref, lhs_ref, rhs_ref, out_ref, *, bm, bk, bn, num_groups,
                transpose_rhs):
    n, w = pl.program_id(0), pl.program_id(1)
    k_lim, n_lim = scal_ref[1], scal_ref[2]
    g = grp_ref[w]
    row0 = tile_ref[w] * bm
    lo = jnp.maximum(off_ref[g], row0)
    # no-op items (w >= count) own no rows
    hi = jnp.where(w < scal_ref[0], jnp.minimum(off_ref[g + 1], row0 + bm), lo)
    rmask = (row0 + jnp.arange(bm) >= lo) & (row0 + jnp.arange(bm) < hi)
    cols = n * bn + jnp.arange(bn)
    cmask = cols < n_lim
    # padding group (g == num_groups), empty items and n-tiles past n_limit: no K steps, store zeros
    steps = jnp.where((g < num_groups) & (n * bn < n_lim) & (hi > lo), _cdiv(k_lim, bk), 0)
    zero = jnp.zeros((), lhs_ref.dtype)

    def body(i, acc):
        kmask = i * bk + jnp.arange(bk) < k_lim
        a = plgpu.load(lhs_ref.at[pl.ds(row0, bm), pl.ds(i * bk, bk)], mask=rmask[:, None] & kmask[None, :],
                       other=zero)
        if transpose_rhs:
            b = plgpu.load(rhs_ref.at[g, pl.ds(n * bn, bn), pl.ds(i * bk, bk)],
                           mask=cmask[:, None] & kmask[None, :], other=zero)
        else:
            b = plgpu.load(rhs_ref.at[g, pl.ds(i * bk, bk), pl.ds(n * bn, bn)],
                           mask=kmask[:, None] & cmask[None, :], other=zero)
        return acc + _dot(a, b, trans_b=transpose_rhs)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    plgpu.store(out_ref.at[pl.ds(row0, bm), pl.ds(n * bn, bn)], acc.astype(out_ref.dtype),
                mask=rmask[:, None] & (cols < out_ref.shape[1])[None, :])


def gmm(lhs, rhs, items, limits, *, num_groups, transpose_rhs, tiling, out_dtype, interpret):
    """``[M, N]`` grouped matmul; ``items`` from :func:`..gmm.work_items` with gmm's padding group,
    ``limits = [k_limit, n_limit]``. See the module docstring."""
    bm, bk, bn = tiling
    M = lhs.shape[0]
    N = rhs.shape[1 if transpose_rhs else 2]
    kernel = functools.partial(_gmm_kernel, bm=bm, bk=bk, bn=bn, num_groups=num_groups,
                               transpose_rhs=transpose_rhs)
    scal = jnp.stack([items.count, limits[0], limits[1]]).astype(jnp.int32)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((M, N), out_dtype), grid=(pl.cdiv(N, bn), items.group.shape[0]),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=_num_stages(lhs.dtype)),
        interpret=interpret, name="gmm_triton",
    )(items.offsets, items.group, items.tile, scal, lhs, rhs)


def _tgmm_kernel(off_ref, scal_ref, lhs_ref, grad_ref, out_ref, *, bm, bk, bn):
    n, k, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k_lim, n_lim = scal_ref[0], scal_ref[1]
    start, end = off_ref[g], off_ref[g + 1]
    ks, ns = k * bk + jnp.arange(bk), n * bn + jnp.arange(bn)
    kmask, nmask = ks < k_lim, ns < n_lim
    steps = jnp.where((k * bk < k_lim) & (n * bn < n_lim), _cdiv(end - start, bm), 0)
    zero = jnp.zeros((), lhs_ref.dtype)

    def body(i, acc):
        r0 = start + i * bm
        rmask = r0 + jnp.arange(bm) < end
        a = plgpu.load(lhs_ref.at[pl.ds(r0, bm), pl.ds(k * bk, bk)], mask=rmask[:, None] & kmask[None, :],
                       other=zero)
        b = plgpu.load(grad_ref.at[pl.ds(r0, bm), pl.ds(n * bn, bn)], mask=rmask[:, None] & nmask[None, :],
                       other=zero)
        return acc + _dot(a, b, trans_a=True)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((bk, bn), jnp.float32))
    K, N = out_ref.shape[1:]
    plgpu.store(out_ref.at[g, pl.ds(k * bk, bk), pl.ds(n * bn, bn)], acc.astype(out_ref.dtype),
                mask=(ks < K)[:, None] & (ns < N)[None, :])


def tgmm(lhs, grad, items, limits, *, tiling, out_dtype, interpret):
    """``[E, K, N]`` per-group ``lhs_e^T @ grad_e``; only ``items.offsets`` is used (see the module docstring)."""
    bm, bk, bn = tiling
    (_, K), N = lhs.shape, grad.shape[1]
    E = items.offsets.shape[0] - 1
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, bm=bm, bk=bk, bn=bn),
        out_shape=jax.ShapeDtypeStruct((E, K, N), out_dtype), grid=(pl.cdiv(N, bn), pl.cdiv(K, bk), E),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=_num_stages(lhs.dtype)),
        interpret=interpret, name="tgmm_triton",
    )(items.offsets, limits.astype(jnp.int32), lhs, grad)
