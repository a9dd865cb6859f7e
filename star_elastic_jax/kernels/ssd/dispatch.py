"""The one dispatch point for the SSD scan."""
from __future__ import annotations

from star_elastic_jax.config import SSD_IMPLS as IMPLS
from star_elastic_jax.errors import ConfigError
from star_elastic_jax.kernels.ssd.reference import ssd_reference



def ssd(x, dt, A, B, C, D, *, chunk_size: int, initial_state=None, segment_ids=None, impl: str = "reference"):
    """Chunked SSD: ``(y [b,L,h,p] fp32, final_state [b,h,p,n] fp32)``; see :mod:`.reference` for shapes.

    ``impl`` selects the implementation; ``auto`` currently resolves to the pure-JAX reference.
    """
    if impl not in IMPLS:
        raise ConfigError("ssd_impl", impl, f"one of {IMPLS}")
    return ssd_reference(x, dt, A, B, C, D, chunk_size=chunk_size, initial_state=initial_state,
                         segment_ids=segment_ids)
