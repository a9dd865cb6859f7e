"""The one dispatch point for the SSD scan (``ModelConfig.ssd_impl``, train config ``kernels.ssd``).

``reference``: the pure-JAX chunked scan (:mod:`.reference`), every backend. ``pallas``: the Pallas
kernels (:mod:`.pallas`; Triton on GPU, Mosaic on TPU, the Triton kernels in interpret mode on CPU,
which is slow and meant for tests). ``auto``: ``pallas`` on GPU/TPU, ``reference`` on CPU.
"""
from __future__ import annotations

import jax.numpy as jnp

from star_elastic_jax.config import SSD_IMPLS as IMPLS
from star_elastic_jax.errors import ConfigError
from star_elastic_jax.kernels.platform import on_accelerator
from star_elastic_jax.kernels.ssd.reference import ssd_reference


def resolve_impl(impl: str) -> str:
    """``auto`` -> ``pallas`` on GPU/TPU, ``reference`` elsewhere; other names pass through (validated)."""
    if impl not in IMPLS:
        raise ConfigError("ssd_impl", impl, f"one of {IMPLS}")
    if impl == "auto":
        return "pallas" if on_accelerator() else "reference"
    return impl


def ssd(x, dt, A, B, C, D, *, chunk_size: int, initial_state=None, segment_ids=None, head_limit=None,
        impl: str = "reference", interpret: bool = False):
    """Chunked SSD: ``(y [b,L,h,p] fp32, final_state [b,h,p,n] fp32)``; shapes as in :mod:`.reference`.

    ``head_limit`` (int or traced int32 scalar, or None = all): the active heads per group (elastic
    Mamba heads are a per-group prefix). Heads beyond it output exactly zero (y, D skip and final
    state); the Pallas kernels skip them, the reference computes and zeroes them.
    ``interpret`` runs the Pallas kernels in interpret mode (implied on CPU).
    """
    impl = resolve_impl(impl)
    if impl == "pallas":
        from star_elastic_jax.kernels.ssd.pallas import ssd_pallas

        return ssd_pallas(x, dt, A, B, C, D, chunk_size=chunk_size, initial_state=initial_state,
                          segment_ids=segment_ids, head_limit=head_limit, interpret=interpret)
    y, state = ssd_reference(x, dt, A, B, C, D, chunk_size=chunk_size, initial_state=initial_state,
                             segment_ids=segment_ids)
    if head_limit is None:
        return y, state
    h, g = x.shape[2], B.shape[2]
    active = (jnp.arange(h) % (h // g)) < head_limit  # group-major heads: a prefix of every group
    return y * active[:, None], state * active[:, None, None]
