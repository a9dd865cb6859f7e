"""star_elastic_jax: elastic many-in-one Nemotron-H models in JAX/Flax NNX."""
from star_elastic_jax.checkpoint.hf import from_hf, to_hf
from star_elastic_jax.config import ModelConfig, ParamCount
from star_elastic_jax.errors import CheckpointError, ChoiceError, ConfigError, DataError, StarElasticError
from star_elastic_jax.model import NemotronH
from star_elastic_jax import elastic
from star_elastic_jax.checkpoint.elastic import load_elastic, save_elastic
from star_elastic_jax.elastic.choice import ElasticChoice
from star_elastic_jax.elastic.slicing import slice_model

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ChoiceError", "ConfigError", "DataError", "ModelConfig", "NemotronH", "ParamCount",
    "StarElasticError", "from_hf", "to_hf",
    "ElasticChoice", "elastic", "load_elastic", "save_elastic", "slice_model",
]
