"""The hybrid generation cache (SPEC 1.4): one entry per block, in model order.

* ``M`` (Mamba2): :class:`MambaState`: ``conv [B, conv_dim, K-1]``, the last ``K-1`` pre-conv
  ``x | B | C`` columns (HF's channel order; vLLM keeps ``K-1`` too, HF and jax-llm-examples ``K``:
  the newest column is the current input, so it never needs caching), and ``ssm [B, h, P, N]`` in
  ``cfg.mamba_ssm_cache_dtype`` (fp32 by default).
* ``*`` (attention): :class:`KVCache`: ``k, v [B, kv_heads, max_len, head_dim]`` preallocated, in
  the compute dtype. Row ``b`` holds valid keys at positions ``doc_start[b] .. lengths[b] - 1``.
* ``E`` / ``-``: ``None`` (token-wise blocks hold no state).

``lengths [B]`` (tokens seen per row: the next write position) and ``doc_start [B]`` (where the
row's current document starts: keys before it are invisible, as packed ``segment_ids`` make them
in the forward) are shared by all blocks. The cache of an elastic budget has the shapes of that
budget's sliced model (fewer Mamba heads, a narrower conv); :func:`cache_bytes` counts it exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from star_elastic_jax.config import ModelConfig

Array = Any


def _pytree(cls):
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


@_pytree
class MambaState:
    conv: Array   # [B, conv_dim, K-1] pre-conv columns, compute dtype
    ssm: Array    # [B, h, P, N], mamba_ssm_cache_dtype


@_pytree
class KVCache:
    k: Array      # [B, kv_heads, max_len, head_dim]
    v: Array


@_pytree
class HybridCache:
    layers: tuple           # MambaState | KVCache | None per block
    lengths: Array          # [B] int32
    doc_start: Array        # [B] int32

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def max_len(self) -> int | None:
        for e in self.layers:
            if isinstance(e, KVCache):
                return int(e.k.shape[2])
        return None


def conv_dim(cfg: ModelConfig, mamba_heads: int) -> int:
    return mamba_heads * cfg.mamba_head_dim + 2 * cfg.n_groups * cfg.ssm_state_size


def _entry_shapes(cfg: ModelConfig, batch: int, max_len: int) -> list[dict[str, tuple[tuple[int, ...], Any]] | None]:
    """Per block: ``{field: (shape, dtype)}`` of its cache entry, or None (one source for
    :func:`init_cache` and :func:`cache_bytes`)."""
    cdt = jnp.dtype(cfg.compute_dtype)
    sdt = jnp.dtype(cfg.mamba_ssm_cache_dtype)
    out: list = []
    for i in range(cfg.num_hidden_layers):
        s = cfg.layer_sizes(i)
        if s.kind == "M":
            out.append({"conv": ((batch, conv_dim(cfg, s.mamba_heads), cfg.conv_kernel - 1), cdt),
                        "ssm": ((batch, s.mamba_heads, cfg.mamba_head_dim, cfg.ssm_state_size), sdt)})
        elif s.kind == "*":
            kv = ((batch, cfg.num_key_value_heads, max_len, cfg.head_dim), cdt)
            out.append({"k": kv, "v": kv})
        else:
            out.append(None)
    return out


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> HybridCache:
    """An empty cache (zeros) for ``batch`` rows of up to ``max_len`` tokens, for the model ``cfg``
    (for an elastic budget: its sliced config)."""
    layers = []
    for shapes in _entry_shapes(cfg, batch, max_len):
        if shapes is None:
            layers.append(None)
            continue
        arrays = {k: jnp.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()}
        layers.append(MambaState(**arrays) if "ssm" in arrays else KVCache(**arrays))
    return HybridCache(layers=tuple(layers), lengths=jnp.zeros((batch,), jnp.int32),
                       doc_start=jnp.zeros((batch,), jnp.int32))  # two buffers: the cache is donated


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, choice=None, *, depth_order=None) -> int:
    """Exact bytes of :func:`init_cache` ``(cfg, batch, max_len)`` (of the sliced model when
    ``choice`` is an ElasticChoice or ResolvedChoice), the two ``[B]`` int32 counters included."""
    if choice is not None:
        from star_elastic_jax.elastic.choice import ensure_resolved
        from star_elastic_jax.elastic.slicing import sliced_config

        cfg = sliced_config(cfg, ensure_resolved(cfg, choice, depth_order=depth_order))
    total = 2 * batch * 4
    for shapes in _entry_shapes(cfg, batch, max_len):
        for shape, dtype in (shapes or {}).values():
            total += int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    return total


def cache_bytes_split(cfg: ModelConfig, choice=None, *, depth_order=None) -> tuple[int, int]:
    """``(bytes per token, fixed bytes per sequence)`` of one row's cache: the KV grows with the
    sequence, the Mamba states do not (both exact; ``cache_bytes = batch * (per_seq + per_tok * max_len)``
    plus the counters)."""
    one = cache_bytes(cfg, 1, 1, choice, depth_order=depth_order)
    two = cache_bytes(cfg, 1, 2, choice, depth_order=depth_order)
    per_tok = two - one
    return per_tok, one - per_tok - 8


__all__ = ["HybridCache", "KVCache", "MambaState", "cache_bytes", "cache_bytes_split", "init_cache"]
