"""TPU kernels for :mod:`.gmm`, lowered through Pallas' Mosaic backend.

The work-item metadata (:class:`..gmm.WorkItems`) goes in as scalar prefetch (SMEM), so the
``index_map``s can pick each step's blocks from it and the pipeline DMAs exactly those.

gmm: grid ``(n-tiles, work items, k-tiles)``, items and k "arbitrary" (sequential). An fp32 VMEM
scratch accumulates one ``[bm, bn]`` tile over k. Straddling m-tiles: the items of one m-tile are
consecutive, so the output block index does not change between them and the block stays resident in
VMEM (written back to HBM only when the index changes). Each item's last k step writes
``where(row in its group, acc, out)``, preserving the rows other items of the tile wrote; the rows of
a tile are partitioned among its items (gmm's padding group owns the rows past
``sum(group_sizes)`` and writes zeros), so once the tile is left all its rows are written.

tgmm: grid ``(k-tiles, n-tiles, work items)``; the output block is the item's group's ``[bk, bn]``
tile, revisited by that group's consecutive items: the accumulator is zeroed at a group's first item
and stored at its last. Empty groups have one (rowless) item, so their block is written as zeros.

Limits: index maps clamp the k-tile at the last one below ``k_limit`` and pin every input block to a
constant on n-tiles (tgmm: k/n tiles) past the limits, so skipped steps issue no new DMA, and
``pl.when`` skips their compute. Partial tiles: blocks past the array edge read unspecified VMEM
(maybe NaN), so the operand rows/cols that feed the contraction are zeroed with ``where`` (only on the
one k-tile straddling ``k_limit``/``K`` in gmm; rows outside the item's group in tgmm) and output
positions past the limits are selected to 0. Integer division uses ``lax.div``: ``//`` lowers through
``sign``, whose Mosaic rule needs the TPU generation and cannot lower off-TPU (e.g. for export).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from star_elastic_jax.errors import ConfigError

BM = 128            # rows per work item: groups average 384 rows at the target, larger tiles waste more
MAX_KN_TILE = 1024  # bk/bn: largest multiple of 128 up to this with the least padding (2688 -> 896, 1856 -> 960)


def check_tiling(tiling) -> None:
    """Mosaic blocks need their last two dims divisible by (8, 128) (16 for packed bf16 rows) unless
    they span the whole dim; a tile at least as large as its dim is shrunk to the full dim."""
    bm, bk, bn = tiling
    if bm % 16 or bk % 128 or bn % 128:
        raise ConfigError("tiling", tiling, "bm a multiple of 16 and bk, bn multiples of 128 for mosaic_tpu")


def _pick(d: int) -> int:
    if d <= MAX_KN_TILE:
        return d
    return min(range(128, MAX_KN_TILE + 1, 128), key=lambda t: (pl.cdiv(d, t) * t, -t))


def resolve_tiling(op: str, tiling, m: int, k: int, n: int) -> tuple[int, int, int]:
    """``tiling`` or the default (``BM`` rows, least-padding k/n tiles); tiles >= their dim become the dim."""
    del op  # gmm and tgmm share the defaults
    bm, bk, bn = (BM, _pick(k), _pick(n)) if tiling is None else tiling
    return min(bm, m), min(bk, k), min(bn, n)


def _interpret(interpret):
    return pltpu.InterpretParams() if interpret else False


def _cdiv(a, b: int):
    return lax.div(a + (b - 1), b)


def _zero_where(keep, x):
    # select in fp32 (bf16 selects are not native on every TPU generation), then back to the input dtype
    return jnp.where(keep, x.astype(jnp.float32), 0.0).astype(x.dtype)


def _mm(a, b, dims):
    return lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


def _gmm_kernel(off_ref, grp_ref, tile_ref, scal_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, bm, bk, bn,
                num_groups, transpose_rhs):
    n, w, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k_lim, n_lim = scal_ref[1], scal_ref[2]
    g = grp_ref[w]
    valid = w < scal_ref[0]
    live = valid & (g < num_groups) & (n * bn < n_lim)   # g == num_groups: padding group, writes zeros
    k0 = k * bk
    dims = ((1,), (1,)) if transpose_rhs else ((1,), (0,))

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(live & (k0 + bk <= k_lim))
    def _():
        acc_ref[...] += _mm(lhs_ref[...], rhs_ref[...], dims)

    @pl.when(live & (k0 < k_lim) & (k0 + bk > k_lim))   # the k-tile straddling k_limit (or K)
    def _():
        lhs, rhs = lhs_ref[...], rhs_ref[...]
        kdim = 1 if transpose_rhs else 0
        acc_ref[...] += _mm(_zero_where(k0 + lax.broadcasted_iota(jnp.int32, lhs.shape, 1) < k_lim, lhs),
                            _zero_where(k0 + lax.broadcasted_iota(jnp.int32, rhs.shape, kdim) < k_lim, rhs), dims)

    @pl.when(valid & (k == pl.num_programs(2) - 1))
    def _():
        row0 = tile_ref[w] * bm
        rows = row0 + lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
        cols = n * bn + lax.broadcasted_iota(jnp.int32, (bm, bn), 1)
        mine = (rows >= jnp.maximum(off_ref[g], row0)) & (rows < jnp.minimum(off_ref[g + 1], row0 + bm))
        val = jnp.where(cols < n_lim, acc_ref[...], 0.0)
        out_ref[...] = jnp.where(mine, val, out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


def gmm(lhs, rhs, items, limits, *, num_groups, transpose_rhs, tiling, out_dtype, interpret):
    """``[M, N]`` grouped matmul; ``items`` from :func:`..gmm.work_items` with gmm's padding group,
    ``limits = [k_limit, n_limit]``. See the module docstring."""
    bm, bk, bn = tiling
    (M, K), N = lhs.shape, rhs.shape[1 if transpose_rhs else 2]
    W = items.group.shape[0]

    def kc(k, scal):   # clamp at the last k-tile below k_limit: skipped k steps reuse the resident block
        return jnp.minimum(k, jnp.maximum(_cdiv(scal[1], bk) - 1, 0))

    def lhs_map(n, w, k, off, grp, tile, scal):
        skip = n * bn >= scal[2]
        return jnp.where(skip, 0, tile[w]), jnp.where(skip, 0, kc(k, scal))

    def rhs_map(n, w, k, off, grp, tile, scal):
        skip = n * bn >= scal[2]
        g = jnp.where(skip, 0, jnp.minimum(grp[w], num_groups - 1))
        kk, nn = jnp.where(skip, 0, kc(k, scal)), jnp.where(skip, 0, n)
        return (g, nn, kk) if transpose_rhs else (g, kk, nn)

    rhs_block = (None, bn, bk) if transpose_rhs else (None, bk, bn)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(pl.cdiv(N, bn), W, pl.cdiv(K, bk)),
        in_specs=[pl.BlockSpec((bm, bk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
        out_specs=pl.BlockSpec((bm, bn), lambda n, w, k, off, grp, tile, scal: (tile[w], n)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)])
    kernel = functools.partial(_gmm_kernel, bm=bm, bk=bk, bn=bn, num_groups=num_groups, transpose_rhs=transpose_rhs)
    scal = jnp.stack([items.count, limits[0], limits[1]]).astype(jnp.int32)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((M, N), out_dtype), grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=_interpret(interpret), name="gmm_tpu",
    )(items.offsets, items.group, items.tile, scal, lhs, rhs)


def _tgmm_kernel(off_ref, grp_ref, tile_ref, scal_ref, lhs_ref, grad_ref, out_ref, acc_ref, *, bm, bk, bn):
    k, n, w = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    count, k_lim, n_lim = scal_ref[0], scal_ref[1], scal_ref[2]
    last_w = pl.num_programs(2) - 1
    g = grp_ref[w]
    valid = w < count
    first = valid & ((w == 0) | (grp_ref[jnp.maximum(w - 1, 0)] != g))
    last = valid & ((w == count - 1) | (grp_ref[jnp.minimum(w + 1, last_w)] != g))
    row0 = tile_ref[w] * bm
    lo, hi = jnp.maximum(off_ref[g], row0), jnp.minimum(off_ref[g + 1], row0 + bm)

    @pl.when(first)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(valid & (hi > lo) & (k * bk < k_lim) & (n * bn < n_lim))
    def _():
        # rows of other groups and past the array edge must not enter the sum: zero them in both operands.
        # lhs^T is formed in fp32 and cast back (the transpose pattern of the in-tree flash attention
        # backward) rather than a dot_general contracting dim 0 of both operands.
        lhs, grad = lhs_ref[...], grad_ref[...]
        r_l = row0 + lax.broadcasted_iota(jnp.int32, lhs.shape, 0)
        r_g = row0 + lax.broadcasted_iota(jnp.int32, grad.shape, 0)
        lhs_t = jnp.where((r_l >= lo) & (r_l < hi), lhs.astype(jnp.float32), 0.0).T.astype(lhs.dtype)
        acc_ref[...] += _mm(lhs_t, _zero_where((r_g >= lo) & (r_g < hi), grad), ((1,), (0,)))

    @pl.when(last)
    def _():
        ks = k * bk + lax.broadcasted_iota(jnp.int32, (bk, bn), 0)
        ns = n * bn + lax.broadcasted_iota(jnp.int32, (bk, bn), 1)
        out_ref[...] = jnp.where((ks < k_lim) & (ns < n_lim), acc_ref[...], 0.0).astype(out_ref.dtype)


def tgmm(lhs, grad, items, limits, *, tiling, out_dtype, interpret):
    """``[E, K, N]`` per-group ``lhs_e^T @ grad_e``; ``items`` from :func:`..gmm.work_items` with
    ``visit_empty=True``. See the module docstring."""
    bm, bk, bn = tiling
    (_, K), N = lhs.shape, grad.shape[1]
    E = items.offsets.shape[0] - 1

    def skip(k, n, scal):
        return (k * bk >= scal[1]) | (n * bn >= scal[2])

    def lhs_map(k, n, w, off, grp, tile, scal):
        s = skip(k, n, scal)
        return jnp.where(s, 0, tile[w]), jnp.where(s, 0, k)

    def grad_map(k, n, w, off, grp, tile, scal):
        s = skip(k, n, scal)
        return jnp.where(s, 0, tile[w]), jnp.where(s, 0, n)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(pl.cdiv(K, bk), pl.cdiv(N, bn), items.group.shape[0]),
        in_specs=[pl.BlockSpec((bm, bk), lhs_map), pl.BlockSpec((bm, bn), grad_map)],
        out_specs=pl.BlockSpec((None, bk, bn), lambda k, n, w, off, grp, tile, scal: (grp[w], k, n)),
        scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)])
    scal = jnp.stack([items.count, limits[0], limits[1]]).astype(jnp.int32)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, bm=bm, bk=bk, bn=bn),
        out_shape=jax.ShapeDtypeStruct((E, K, N), out_dtype), grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret), name="tgmm_tpu",
    )(items.offsets, items.group, items.tile, scal, lhs, grad)
