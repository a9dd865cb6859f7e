"""Grouped matmul for MoE experts as Pallas kernels: ``gmm``, its transpose ``tgmm``, and their custom VJP.

``gmm(lhs [M, K], rhs [E, K, N], group_sizes [E])`` multiplies the rows of group ``e`` (the contiguous
rows ``offsets[e] : offsets[e] + group_sizes[e]`` of the expert-sorted ``lhs``) by ``rhs[e]``;
``tgmm(lhs [M, K], grad [M, N], group_sizes)`` gives ``lhs_e^T @ grad_e`` per group, i.e. the weight
gradient. ``transpose_rhs=True`` takes ``rhs [E, N, K]`` (our HF weights are ``[E, out, in]``) and
contracts it in the kernel, so no transposed copy of the weights is ever made, forward or backward.

Work items (megablox's formulation). Rows are cut into ``bm``-row m-tiles; a group may start and end
inside a tile, so the kernels run over the ``(group, m-tile)`` pairs that overlap, listed in row order
by :func:`work_items` in plain JAX from the traced ``group_sizes``. Each item computes its tile and
writes only its own group's rows. For ``E`` groups over ``nt`` tiles there are at most
``nt + E - 1`` pairs (consecutive groups share at most one tile), a static bound, so the grid has a
static size; items past the real count are no-ops. Empty groups get no items in ``gmm`` (no work),
while ``tgmm`` gives each empty group one item so its ``[K, N]`` output block is written (zeros).
``gmm`` adds a virtual padding group over the rows past ``sum(group_sizes)`` that computes nothing
and writes zeros, so every output row is owned by exactly one group (bound ``nt + E``).

Limits. ``k_limit``/``n_limit`` (static or traced) are the active prefixes of the contraction and the
output columns (elastic widths): k-tiles past ``k_limit`` are not computed (loop bound / ``pl.when``
plus clamped block indices, so no DMA either), n-tiles past ``n_limit`` only write zeros, and the one
straddling tile is masked. The VJP respects them: ``d lhs = gmm(grad, rhs^T)`` with the limits swapped
and ``d rhs = tgmm(lhs, grad)`` (``tgmm(grad, lhs)`` gives the ``[E, N, K]`` layout directly when
``transpose_rhs``), so gradients outside the limits are exactly 0.

Backends: ``triton`` (:mod:`.gmm_triton`, GPU) and ``mosaic_tpu`` (:mod:`.gmm_tpu`); ``backend=None``
picks from ``jax.default_backend()`` (``gpu`` -> triton, ``tpu`` -> mosaic_tpu, anything else ->
triton in interpret mode, the only way to run on CPU). ``interpret=True`` runs either on CPU.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from star_elastic_jax.errors import ConfigError
from star_elastic_jax.kernels.moe import gmm_tpu, gmm_triton
from star_elastic_jax.kernels.platform import resolve_pallas_backend

BACKENDS = {"triton": gmm_triton, "mosaic_tpu": gmm_tpu}


class WorkItems(NamedTuple):
    """Scalar metadata of one kernel launch (all int32, traced)."""

    offsets: jax.Array     # [G + 1] first row of every group, clipped to M (last entry: end of last group)
    group: jax.Array       # [W] group of every work item (items past ``count`` repeat the last real one)
    tile: jax.Array        # [W] m-tile of every work item
    count: jax.Array       # [] number of real work items


class _Cfg(NamedTuple):
    """Static (hashable) settings of one gmm, carried through the custom VJP."""

    backend: str
    interpret: bool
    tiling: tuple[int, int, int] | None
    transpose_rhs: bool
    out_dtype: np.dtype


# ------------------------------------------------------------------------------ group metadata
def _cumsum(v):
    """Inclusive prefix sum of a short int vector as a masked ``[G, G]`` sum (cheaper to compile on CPU
    than ``jnp.cumsum``'s associative scan; ``G`` is the number of experts)."""
    i = jnp.arange(v.shape[0])
    return jnp.sum(jnp.where(i[None, :] <= i[:, None], v[None, :], 0), axis=1, dtype=v.dtype)


def group_offsets(group_sizes, m: int):
    """``[E + 1]`` int32 row offsets of the groups; negative sizes count as 0 and groups are clipped at ``m``
    (rows that do not fit are ignored, never read out of bounds)."""
    ends = jnp.minimum(_cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), m)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])


def work_items(offsets, m: int, bm: int, *, visit_empty: bool) -> WorkItems:
    """The ``(group, m-tile)`` pairs that overlap, in row order, padded to the static bound ``nt + G - 1``.

    ``offsets [G + 1]`` from :func:`group_offsets` (possibly with a padding group appended). With
    ``visit_empty`` an empty group gets one item (on the tile where it would start), so kernels that own
    a per-group output (tgmm) still write it. Items ``>= count`` repeat the last real item: block indices
    do not change, so the TPU pipeline issues no DMA for them, and kernels treat them as no-ops."""
    G = offsets.shape[0] - 1
    nt = -(-m // bm)
    starts, ends = offsets[:-1], offsets[1:]
    first = starts // bm
    ntiles = jnp.where(ends > starts, (ends - 1) // bm - first + 1, int(visit_empty)).astype(jnp.int32)
    cum = _cumsum(ntiles)
    count = cum[-1]
    w = jnp.minimum(jnp.arange(nt + G - 1, dtype=jnp.int32), jnp.maximum(count - 1, 0))
    group = jnp.minimum(jnp.searchsorted(cum, w, side="right", method="compare_all"), G - 1).astype(jnp.int32)
    tile = jnp.clip(first[group] + w - (cum[group] - ntiles[group]), 0, nt - 1).astype(jnp.int32)
    return WorkItems(offsets, group, tile, count)


# ------------------------------------------------------------------------------ validation
def _limit(name: str, value, dim: int):
    """A static limit is checked against ``[0, dim]``; a traced one must be an integer scalar and is
    clipped to ``[0, dim]`` at run time. Returns an int32 scalar array."""
    if value is None:
        return jnp.int32(dim)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not 0 <= int(value) <= dim:
            raise ConfigError(name, int(value), f"an int in [0, {dim}] (or None for all {dim})")
        return jnp.int32(value)
    if isinstance(value, bool) or not hasattr(value, "dtype") or not jnp.issubdtype(value.dtype, jnp.integer) \
            or jnp.ndim(value) != 0:
        raise ConfigError(name, value, "None, a Python int or an integer scalar array")
    return jnp.clip(jnp.asarray(value).astype(jnp.int32), 0, dim)


def _check_operands(what, lhs, other, group_sizes):
    for name, a, nd in (("lhs", lhs, 2), (what, other, 3 if what == "rhs" else 2)):
        if not hasattr(a, "shape") or a.ndim != nd:
            raise ConfigError(f"{name}.shape", getattr(a, "shape", a), f"a rank-{nd} array")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ConfigError(f"{name}.dtype", a.dtype, "a floating dtype")
        if min(a.shape[1:]) < 1:
            raise ConfigError(f"{name}.shape", a.shape, "non-empty dims (only the row count may be 0)")
    if other.dtype != lhs.dtype:
        raise ConfigError(f"{what}.dtype", other.dtype, f"equal to lhs.dtype ({lhs.dtype})")
    if not hasattr(group_sizes, "dtype") or not jnp.issubdtype(group_sizes.dtype, jnp.integer) \
            or group_sizes.ndim != 1 or group_sizes.shape[0] < 1:
        raise ConfigError("group_sizes", getattr(group_sizes, "shape", group_sizes), "a non-empty 1-D integer array")


def _check_tiling(mod, tiling):
    if tiling is None:
        return None
    if not isinstance(tiling, (tuple, list)) or len(tiling) != 3 \
            or not all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in tiling):
        raise ConfigError("tiling", tiling, "None or three positive ints (bm, bk, bn)")
    mod.check_tiling(tuple(tiling))
    return tuple(tiling)


def _out_dtype(preferred_element_type, lhs):
    dt = np.dtype(preferred_element_type or lhs.dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise ConfigError("preferred_element_type", preferred_element_type, "None or a floating dtype")
    return dt


# ------------------------------------------------------------------------------ kernel launches
def _gmm_call(cfg: _Cfg, lhs, rhs, group_sizes, limits):
    mod = BACKENDS[cfg.backend]
    M, K = lhs.shape
    N = rhs.shape[1 if cfg.transpose_rhs else 2]
    if M == 0:
        return jnp.zeros((M, N), cfg.out_dtype)
    tiling = mod.resolve_tiling("gmm", cfg.tiling, M, K, N)
    offsets = group_offsets(group_sizes, M)
    # virtual padding group [sum(group_sizes), M): owns the ignored rows so that they are written as 0
    items = work_items(jnp.concatenate([offsets, jnp.full((1,), M, jnp.int32)]), M, tiling[0], visit_empty=False)
    return mod.gmm(lhs, rhs, items, limits, num_groups=rhs.shape[0], transpose_rhs=cfg.transpose_rhs,
                   tiling=tiling, out_dtype=cfg.out_dtype, interpret=cfg.interpret)


def _tgmm_call(cfg: _Cfg, lhs, grad, group_sizes, limits):
    mod = BACKENDS[cfg.backend]
    (M, K), N, E = lhs.shape, grad.shape[1], group_sizes.shape[0]
    if M == 0:
        return jnp.zeros((E, K, N), cfg.out_dtype)
    tiling = mod.resolve_tiling("tgmm", cfg.tiling, M, K, N)
    items = work_items(group_offsets(group_sizes, M), M, tiling[0], visit_empty=True)
    return mod.tgmm(lhs, grad, items, limits, tiling=tiling, out_dtype=cfg.out_dtype, interpret=cfg.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(cfg, lhs, rhs, group_sizes, limits):
    return _gmm_call(cfg, lhs, rhs, group_sizes, limits)


def _gmm_fwd(cfg, lhs, rhs, group_sizes, limits):
    return _gmm_call(cfg, lhs, rhs, group_sizes, limits), (lhs, rhs, group_sizes, limits)


def _swap_kn(tiling):
    return None if tiling is None else (tiling[0], tiling[2], tiling[1])


def _gmm_bwd(cfg, res, grad):
    lhs, rhs, group_sizes, limits = res
    grad = grad.astype(lhs.dtype)
    swapped = limits[::-1]  # d lhs contracts over N (n_limit) and has K columns (k_limit)
    # rhs [E, K, N] read as [E, out=K, in=N] is rhs^T with the transpose flag flipped: no copy.
    dlhs_cfg = cfg._replace(transpose_rhs=not cfg.transpose_rhs, out_dtype=lhs.dtype, tiling=_swap_kn(cfg.tiling))
    dlhs = _gmm_call(dlhs_cfg, grad, rhs, group_sizes, swapped)
    t_cfg = cfg._replace(out_dtype=rhs.dtype)
    if cfg.transpose_rhs:   # rhs is [E, N, K]: grad_e^T @ lhs_e is already in that layout
        drhs = _tgmm_call(t_cfg._replace(tiling=_swap_kn(cfg.tiling)), grad, lhs, group_sizes, swapped)
    else:
        drhs = _tgmm_call(t_cfg, lhs, grad, group_sizes, limits)
    return dlhs, drhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


# ------------------------------------------------------------------------------ public API
def gmm(lhs, rhs, group_sizes, *, k_limit=None, n_limit=None, transpose_rhs: bool = False, backend=None,
        interpret: bool = False, tiling=None, preferred_element_type=None):
    """Grouped matmul: ``out[r] = lhs[r, :k_limit] @ rhs[e(r)][:k_limit, :n_limit]`` for row ``r`` of group ``e(r)``.

    Args:
      lhs: ``[M, K]`` rows sorted by group; rows past ``sum(group_sizes)`` are ignored (output 0).
      rhs: ``[E, K, N]``, or ``[E, N, K]`` with ``transpose_rhs=True``; same dtype as ``lhs``.
      group_sizes: ``[E]`` integer (traced) rows per group; not differentiable.
      k_limit, n_limit: None (full), a Python int, or a traced integer scalar: only the first
        ``k_limit`` of ``K`` contribute and output columns ``>= n_limit`` are exactly 0 (skipped tiles).
      backend: None (from ``jax.default_backend()``), ``"triton"`` or ``"mosaic_tpu"``.
      interpret: run the kernels in Pallas interpret mode (CPU).
      tiling: ``(bm, bk, bn)`` override of the backend's default tiles.
      preferred_element_type: output dtype (default ``lhs.dtype``); accumulation is always fp32.

    Returns ``[M, N]``. Differentiable w.r.t. ``lhs`` and ``rhs`` (reverse mode) with a custom VJP
    built from :func:`gmm`/:func:`tgmm` kernels. Raises :class:`ConfigError` on bad arguments."""
    backend, interpret = resolve_pallas_backend(backend, interpret)
    _check_operands("rhs", lhs, rhs, group_sizes)
    E, d1, d2 = rhs.shape
    K, N = (d2, d1) if transpose_rhs else (d1, d2)
    if lhs.shape[1] != K:
        raise ConfigError("rhs.shape", rhs.shape, f"contraction dim {'2' if transpose_rhs else '1'} == lhs.shape[1] "
                          f"({lhs.shape[1]})")
    if group_sizes.shape[0] != E:
        raise ConfigError("group_sizes.shape", group_sizes.shape, f"({E},) to match rhs.shape[0]")
    cfg = _Cfg(backend, interpret, _check_tiling(BACKENDS[backend], tiling), bool(transpose_rhs),
               _out_dtype(preferred_element_type, lhs))
    limits = jnp.stack([_limit("k_limit", k_limit, K), _limit("n_limit", n_limit, N)])
    return _gmm(cfg, lhs, rhs, group_sizes.astype(jnp.int32), limits)


def tgmm(lhs, grad, group_sizes, *, k_limit=None, n_limit=None, backend=None, interpret: bool = False,
         tiling=None, preferred_element_type=None):
    """Transposed grouped matmul ``[E, K, N]``: ``out[e] = lhs_e[:, :k_limit]^T @ grad_e[:, :n_limit]``, zero-padded.

    ``lhs [M, K]`` and ``grad [M, N]`` are sorted by group like :func:`gmm`'s ``lhs``; rows past
    ``sum(group_sizes)`` are ignored and empty groups give exactly 0. ``k_limit``/``n_limit`` bound the
    output rows/columns (outside: exactly 0, tiles skipped). Other arguments as :func:`gmm`; ``tiling``
    is ``(bm, bk, bn)`` with ``bm`` the rows per step. Not differentiable (it is gmm's weight gradient)."""
    backend, interpret = resolve_pallas_backend(backend, interpret)
    _check_operands("grad", lhs, grad, group_sizes)
    if grad.shape[0] != lhs.shape[0]:
        raise ConfigError("grad.shape", grad.shape, f"{lhs.shape[0]} rows like lhs")
    cfg = _Cfg(backend, interpret, _check_tiling(BACKENDS[backend], tiling), False,
               _out_dtype(preferred_element_type, lhs))
    limits = jnp.stack([_limit("k_limit", k_limit, lhs.shape[1]), _limit("n_limit", n_limit, grad.shape[1])])
    return _tgmm_call(cfg, lhs, grad, group_sizes.astype(jnp.int32), limits)


__all__ = ["BACKENDS", "WorkItems", "gmm", "group_offsets", "tgmm", "work_items"]
