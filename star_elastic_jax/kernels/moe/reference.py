"""Routed-expert FFN (non-gated relu2 experts): pure-JAX implementations and the dispatch table.

``ragged``: dropless and sort-based. The ``T*k`` (token, slot) assignments are sorted by expert,
each expert's contiguous rows go through ``lax.ragged_dot_general`` against the stacked HF-layout
weights ``up [E, F, H]`` / ``down [E, H, F]`` (no transposed copy), then are unsorted and summed.
``dense``: every token through every expert, combined with a one-hot weight matrix. Exact and
simple; it is the oracle the sorted path is tested against. ``gather``: a loop over the (token, slot)
pairs, each reading only its expert's weights (the decode path).
``blocked`` (:mod:`star_elastic_jax.kernels.moe.blocked`): sorted, each expert's group padded to
whole row blocks, a loop of dense per-block matmuls over the used blocks. Dropless and exact; on CPU,
where XLA lowers ``ragged_dot`` to a masked dense matmul doing ``E`` times the useful work, it is the
fast path. ``pallas`` (:mod:`star_elastic_jax.kernels.moe.pallas_ffn`): the Pallas grouped matmuls
(Triton on GPU, Mosaic on TPU, interpret mode on CPU), the only one that uses the elastic prefix
limits to skip work. ``reference`` picks ``gather`` for at most ``2E`` (token, slot) pairs, else
``blocked`` when ``jax.default_backend() == "cpu"``, else ``ragged``; ``auto`` picks ``pallas`` on GPU/TPU, else ``reference``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from star_elastic_jax.errors import ConfigError
from star_elastic_jax.kernels.moe.blocked import expert_ffn_blocked
from star_elastic_jax.kernels.platform import on_accelerator

# contract lhs dim 1 with rhs dim 2 (weights stored [E, out, in]); rhs dim 0 indexes groups.
_RAGGED_DN = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def _relu2(x):
    return jnp.square(jax.nn.relu(x))


def _masked(h, ffn_mask):
    return h if ffn_mask is None else h * ffn_mask.astype(h.dtype)


def expert_ffn_ragged(x, idx, weights, up, down, ffn_mask=None):
    """``x [T, H]``, ``idx/weights [T, k]``, ``up [E, F, H]``, ``down [E, H, F]`` -> ``[T, H]`` (fp32 combine).

    ``ffn_mask [F]`` multiplies the fc1 output of every expert before relu2 (elastic expert FFN)."""
    T, k = idx.shape
    E = up.shape[0]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    xs = x[order // k]
    hid = _relu2(_masked(lax.ragged_dot_general(xs, up.astype(x.dtype), group_sizes, _RAGGED_DN), ffn_mask))
    out = lax.ragged_dot_general(hid, down.astype(x.dtype), group_sizes, _RAGGED_DN)
    out = out.astype(jnp.float32) * weights.reshape(-1)[order][:, None].astype(jnp.float32)
    unsorted = jnp.zeros_like(out).at[order].set(out)
    return unsorted.reshape(T, k, -1).sum(axis=1)


def expert_ffn_dense(x, idx, weights, up, down, ffn_mask=None):
    """Dense one-hot oracle: same contract as :func:`expert_ffn_ragged`."""
    T, _ = idx.shape
    E = up.shape[0]
    combine = jnp.zeros((T, E), jnp.float32).at[jnp.arange(T)[:, None], idx].add(weights.astype(jnp.float32))
    hid = _relu2(_masked(jnp.einsum("th,efh->tef", x, up.astype(x.dtype)), ffn_mask))
    out = jnp.einsum("tef,ehf->teh", hid, down.astype(x.dtype))
    return jnp.einsum("te,teh->th", combine, out.astype(jnp.float32))


def expert_ffn_gather(x, idx, weights, up, down, ffn_mask=None):
    """A loop over the ``T*k`` (token, slot) pairs, each reading only its expert's weights (a
    dynamic slice that XLA fuses into the matrix-vector products: no copy of the weights). The fast
    path for a few tokens (decode); same contract as :func:`expert_ffn_ragged`."""
    T, k = idx.shape
    pair_token = jnp.repeat(jnp.arange(T, dtype=jnp.int32), k)

    def one(acc, pair):
        t, e, w = pair
        xv = lax.dynamic_index_in_dim(x, t, keepdims=False)
        u = lax.dynamic_index_in_dim(up, e, keepdims=False).astype(x.dtype)      # [F, H]
        d = lax.dynamic_index_in_dim(down, e, keepdims=False).astype(x.dtype)    # [H, F]
        h = _relu2(_masked(u @ xv, ffn_mask))
        return acc.at[t].add(w * (d @ h).astype(jnp.float32)), None

    init = jnp.zeros((T, x.shape[1]), jnp.float32)
    pairs = (pair_token, idx.reshape(-1), weights.reshape(-1).astype(jnp.float32))
    return lax.scan(one, init, pairs)[0]


def _expert_ffn_reference(x, idx, weights, up, down, ffn_mask=None):
    """At trace time: ``gather`` for at most twice as many (token, slot) pairs as experts (decode),
    else ``blocked`` on the CPU backend and ``ragged`` elsewhere."""
    if idx.shape[0] * idx.shape[1] <= 2 * up.shape[0]:
        return expert_ffn_gather(x, idx, weights, up, down, ffn_mask)
    fn = expert_ffn_blocked if jax.default_backend() == "cpu" else expert_ffn_ragged
    return fn(x, idx, weights, up, down, ffn_mask)


def _expert_ffn_pallas(x, idx, weights, up, down, ffn_mask=None, *, k_limit=None, ffn_limit=None):
    from star_elastic_jax.kernels.moe.pallas_ffn import expert_ffn_pallas

    return expert_ffn_pallas(x, idx, weights, up, down, ffn_mask, k_limit=k_limit, ffn_limit=ffn_limit)


def _expert_ffn_auto(x, idx, weights, up, down, ffn_mask=None, **limits):
    """``pallas`` on GPU/TPU, ``reference`` on CPU (resolved at trace time)."""
    if on_accelerator():
        return _expert_ffn_pallas(x, idx, weights, up, down, ffn_mask, **limits)
    return _expert_ffn_reference(x, idx, weights, up, down, ffn_mask)


_IMPLS = {"ragged": expert_ffn_ragged, "dense": expert_ffn_dense, "blocked": expert_ffn_blocked,
          "gather": expert_ffn_gather,
          "reference": _expert_ffn_reference, "pallas": _expert_ffn_pallas, "auto": _expert_ffn_auto}
_USES_LIMITS = ("pallas", "auto")


def expert_ffn(x, idx, weights, up, down, *, impl: str = "ragged", ffn_mask=None, k_limit=None, ffn_limit=None):
    """Dispatch point for the routed experts; returns fp32 ``[T, H]``.

    ``k_limit`` / ``ffn_limit`` (int, traced int32 scalar or None): the elastic prefixes of the hidden
    and FFN channels. Channels past them must already be zero in ``x`` / after ``ffn_mask``; the
    Pallas kernels then skip them (exact), the other implementations ignore the limits."""
    if impl not in _IMPLS:
        raise ConfigError("moe_impl", impl, f"one of {sorted(_IMPLS)}")
    if impl in _USES_LIMITS:
        return _IMPLS[impl](x, idx, weights, up, down, ffn_mask, k_limit=k_limit, ffn_limit=ffn_limit)
    return _IMPLS[impl](x, idx, weights, up, down, ffn_mask)
