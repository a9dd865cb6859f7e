"""Inference: the hybrid cache, prefill/decode steps, sampling and the generation engine."""
from star_elastic_jax.infer.cache import HybridCache, KVCache, MambaState, cache_bytes, cache_bytes_split, init_cache
from star_elastic_jax.infer.engine import Engine, GenerationStats, generate
from star_elastic_jax.infer.sampling import SamplingParams, sample
from star_elastic_jax.infer.steps import decode, prefill

__all__ = ["Engine", "GenerationStats", "HybridCache", "KVCache", "MambaState", "SamplingParams", "cache_bytes",
           "cache_bytes_split", "decode", "generate", "init_cache", "prefill", "sample"]
