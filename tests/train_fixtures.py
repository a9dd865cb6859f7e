"""Shared by the training tests and the multi-host worker script (which runs with tests/ on sys.path)."""
from __future__ import annotations


def random_params(cfg, seed=0) -> dict:
    """Plausible, identical-per-seed parameters from numpy. No JAX initialisers: their per-op
    compiles cost seconds of CPU, and every process of the multi-host test must agree bitwise.
    Imports are local so the worker can set up jax.distributed before anything imports JAX."""
    import numpy as np

    from star_elastic_jax.checkpoint.orbax import abstract_params

    rng = np.random.default_rng(seed)
    out = {}
    for path, a in abstract_params(cfg).items():
        name = path[-1]
        if name in ("weight", "norm_weight", "D"):
            v = 1.0 + 0.1 * rng.standard_normal(a.shape)
        elif name == "A_log":
            v = np.log(np.arange(1, a.shape[0] + 1))
        elif name == "dt_bias":
            v = np.log(np.expm1(rng.uniform(0.001, 0.1, a.shape)))
        elif name == "e_score_correction_bias":
            v = 0.01 * np.arange(a.shape[0])
        else:
            v = cfg.initializer_range * rng.standard_normal(a.shape)
        out[path] = np.asarray(v, np.float32)
    return out
