"""Token sampling: greedy, temperature, top-k, top-p (nucleus) and min-p, as one pure function.

The filters compose in the usual order (HF's and vLLM's): temperature scales the logits, then
top-k, top-p and min-p each remove tokens (ties at a top-k / top-p boundary are kept), then one
categorical draw. ``temperature == 0`` is greedy (argmax; the first index on ties, as torch).
Reproducible: the same key gives the same tokens.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from star_elastic_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static sampling settings (a jit cache key). ``None`` disables a filter."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self):
        validate_sampling(self.temperature, self.top_k, self.top_p, self.min_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def validate_sampling(temperature, top_k, top_p, min_p) -> None:
    """The one check of the sampling fields (:class:`DataError` naming the field)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise DataError("temperature", temperature, "a finite number >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise DataError("top_k", top_k, "an integer >= 1, or None")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise DataError("top_p", top_p, "a number in (0, 1], or None")
    if min_p is not None and (isinstance(min_p, bool) or not isinstance(min_p, (int, float))
                              or not 0.0 <= min_p <= 1.0):
        raise DataError("min_p", min_p, "a number in [0, 1], or None")


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """``logits [B, V]`` scaled by the temperature, with the filtered-out tokens at ``-inf``."""
    x = logits.astype(jnp.float32) / params.temperature
    neg = jnp.finfo(jnp.float32).min
    if params.top_k is not None and params.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, params.top_k)[0][..., -1:]
        x = jnp.where(x >= kth, x, -jnp.inf)
    if params.top_p is not None and params.top_p < 1.0:
        order = jnp.argsort(-x, axis=-1)
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs          # mass of the strictly better tokens
        keep_sorted = before < params.top_p                  # the smallest prefix reaching top_p
        threshold = jnp.min(jnp.where(keep_sorted, sorted_x, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x >= threshold, x, -jnp.inf)
    if params.min_p is not None and params.min_p > 0.0:
        probs = jax.nn.softmax(x, axis=-1)
        x = jnp.where(probs >= params.min_p * probs.max(axis=-1, keepdims=True), x, -jnp.inf)
    return jnp.where(jnp.isnan(x), neg, x)


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """One token per row of ``logits [B, V]``: int32 ``[B]``."""
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, params), axis=-1).astype(jnp.int32)


__all__ = ["SamplingParams", "filter_logits", "sample", "validate_sampling"]
