"""star_elastic_jax: elastic many-in-one Nemotron-H models in JAX/Flax NNX."""
from star_elastic_jax.checkpoint.hf import from_hf, to_hf
from star_elastic_jax.config import ModelConfig, ParamCount
from star_elastic_jax.errors import CheckpointError, ChoiceError, ConfigError, DataError, StarElasticError
from star_elastic_jax.model import NemotronH

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ChoiceError", "ConfigError", "DataError", "ModelConfig", "NemotronH", "ParamCount",
    "StarElasticError", "from_hf", "to_hf",
]
