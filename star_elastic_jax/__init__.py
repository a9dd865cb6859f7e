"""star_elastic_jax: elastic many-in-one Nemotron-H models in JAX/Flax NNX.

The public names below are imported lazily (PEP 562), so that light entry points, the CLI's
``--help`` and the PyTorch-only ``star_elastic_jax.export.slice_hf``, never import JAX.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "star_elastic_jax.config",
    "ParamCount": "star_elastic_jax.config",
    "CheckpointError": "star_elastic_jax.errors",
    "ChoiceError": "star_elastic_jax.errors",
    "ConfigError": "star_elastic_jax.errors",
    "DataError": "star_elastic_jax.errors",
    "StarElasticError": "star_elastic_jax.errors",
    "NemotronH": "star_elastic_jax.model",
    "from_hf": "star_elastic_jax.checkpoint.hf",
    "to_hf": "star_elastic_jax.checkpoint.hf",
    "ElasticChoice": "star_elastic_jax.elastic.choice",
    "slice_model": "star_elastic_jax.elastic.slicing",
    "save_elastic": "star_elastic_jax.checkpoint.elastic",
    "load_elastic": "star_elastic_jax.checkpoint.elastic",
    "generate": "star_elastic_jax.infer.engine",
    "Engine": "star_elastic_jax.infer.engine",
    "cache_bytes": "star_elastic_jax.infer.cache",
}
_SUBMODULES = ("elastic", "checkpoint", "model", "kernels", "config", "errors", "infer")

__all__ = sorted(_EXPORTS) + ["elastic"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"star_elastic_jax.{name}")
    else:
        raise AttributeError(f"module 'star_elastic_jax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))


if TYPE_CHECKING:  # for type checkers and IDEs
    from star_elastic_jax import elastic  # noqa: F401
    from star_elastic_jax.checkpoint.elastic import load_elastic, save_elastic  # noqa: F401
    from star_elastic_jax.checkpoint.hf import from_hf, to_hf  # noqa: F401
    from star_elastic_jax.config import ModelConfig, ParamCount  # noqa: F401
    from star_elastic_jax.elastic.choice import ElasticChoice  # noqa: F401
    from star_elastic_jax.elastic.slicing import slice_model  # noqa: F401
    from star_elastic_jax.errors import (  # noqa: F401
        CheckpointError, ChoiceError, ConfigError, DataError, StarElasticError)
    from star_elastic_jax.infer.cache import cache_bytes  # noqa: F401
    from star_elastic_jax.infer.engine import Engine, generate  # noqa: F401
    from star_elastic_jax.model import NemotronH  # noqa: F401
