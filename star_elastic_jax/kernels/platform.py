"""Which Pallas lowering a kernel call uses, and whether ``auto`` means the Pallas kernels (the one
place these platform rules live; the SSD and MoE kernels and both dispatchers read them)."""
from __future__ import annotations

import jax

from star_elastic_jax.errors import ConfigError

PALLAS_BACKENDS = ("triton", "mosaic_tpu")
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def on_accelerator() -> bool:
    """True on GPU/TPU, where ``auto`` picks the Pallas kernels (CPU keeps the pure-JAX references)."""
    return jax.default_backend() in _GPU_PLATFORMS + ("tpu",)


def resolve_pallas_backend(backend: str | None, interpret: bool) -> tuple[str, bool]:
    """``(backend, interpret)``: None picks Mosaic on TPU, Triton elsewhere; off a GPU/TPU (CPU) the
    Triton kernels run in interpret mode. An explicit backend keeps the caller's ``interpret``."""
    if backend is None:
        platform = jax.default_backend()
        if platform == "tpu":
            return "mosaic_tpu", bool(interpret)
        return "triton", bool(interpret) or platform not in _GPU_PLATFORMS
    if backend not in PALLAS_BACKENDS:
        raise ConfigError("backend", backend, f"one of {(None,) + PALLAS_BACKENDS}")
    return backend, bool(interpret)
