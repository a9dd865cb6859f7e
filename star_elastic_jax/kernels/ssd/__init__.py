"""Chunked Mamba2 SSD scan: :func:`ssd` is the single dispatch point."""
from star_elastic_jax.kernels.ssd.dispatch import ssd
from star_elastic_jax.kernels.ssd.reference import document_starts, ssd_reference, ssd_step

__all__ = ["ssd", "ssd_reference", "ssd_step", "document_starts"]
