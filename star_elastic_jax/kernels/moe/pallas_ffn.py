"""Routed-expert FFN on the Pallas grouped matmul (:func:`.gmm.gmm`); same contract as
:func:`star_elastic_jax.kernels.moe.reference.expert_ffn_ragged`.

Dropless and sort-based: the ``T*k`` (token, slot) assignments are sorted by expert (stable), so each
expert's rows are contiguous; ``gmm`` against ``up [E, F, H]`` (fc1), ``ffn_mask`` and relu2, ``gmm``
against ``down [E, H, F]`` (fc2), routing weight, unsort, sum over the k slots. Both gmms read the
HF-layout ``[E, out, in]`` weights with ``transpose_rhs=True``: no transposed weight copy, forward or
backward. Experts that receive no tokens are empty groups and cost nothing.

Elastic widths run as kernel limits instead of sliced copies: ``ffn_limit`` is the active prefix of
the F channels (fc1's ``n_limit``, fc2's ``k_limit``) and ``k_limit`` the active prefix of the hidden
channels (fc1's ``k_limit``, fc2's ``n_limit``). Tiles past them are skipped, the outputs past
``k_limit`` are exactly 0, and so are the gradients of the inactive weight slices; the result equals
the dense FFN on the sliced weights, zero-padded.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from star_elastic_jax.errors import ConfigError
from star_elastic_jax.kernels.moe.gmm import gmm


def expert_ffn_pallas(x, idx, weights, up, down, ffn_mask=None, *, k_limit=None, ffn_limit=None, backend=None,
                      interpret: bool = False, tiling=None):
    """``x [T, H]``, ``idx/weights [T, k]``, ``up [E, F, H]``, ``down [E, H, F]`` -> fp32 ``[T, H]``.

    ``ffn_mask [F]`` multiplies every expert's fc1 output before relu2. ``k_limit`` (hidden channels)
    and ``ffn_limit`` (FFN channels) are None, Python ints or traced int scalars (see the module
    docstring). ``backend``/``interpret``/``tiling`` are passed to :func:`.gmm.gmm` (``tiling`` to both
    matmuls). Differentiable (reverse mode) w.r.t. ``x``, ``weights``, ``up``, ``down``, ``ffn_mask``."""
    if idx.ndim != 2 or weights.shape != idx.shape or x.ndim != 2 or x.shape[0] != idx.shape[0]:
        raise ConfigError("idx/weights/x shapes", (getattr(x, "shape", None), idx.shape, weights.shape),
                          "x [T, H] with idx and weights both [T, k]")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ConfigError("idx.dtype", idx.dtype, "an integer dtype")
    if up.ndim != 3 or down.shape != (up.shape[0], up.shape[2], up.shape[1]) or up.shape[2] != x.shape[1]:
        raise ConfigError("up/down shapes", (up.shape, down.shape),
                          f"up [E, F, {x.shape[1]}] and down [E, {x.shape[1]}, F]")
    if ffn_mask is not None and ffn_mask.shape != (up.shape[1],):
        raise ConfigError("ffn_mask.shape", ffn_mask.shape, f"({up.shape[1]},)")
    T, k = idx.shape
    E = up.shape[0]
    flat = idx.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    kw = {"transpose_rhs": True, "backend": backend, "interpret": interpret, "tiling": tiling}
    h = gmm(x[order // k], up.astype(x.dtype), group_sizes, k_limit=k_limit, n_limit=ffn_limit, **kw)
    if ffn_mask is not None:
        h = h * ffn_mask.astype(h.dtype)
    h = jnp.square(jax.nn.relu(h))
    out = gmm(h, down.astype(x.dtype), group_sizes, k_limit=ffn_limit, n_limit=k_limit, **kw)
    out = out.astype(jnp.float32) * weights.reshape(-1)[order][:, None].astype(jnp.float32)
    # unsort by gathering with the inverse permutation (its transpose is a gather too, not a scatter)
    inv = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return out[inv].reshape(T, k, -1).sum(axis=1)
