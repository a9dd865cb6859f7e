"""Flax NNX modules for the Nemotron-H hybrid blocks."""
from star_elastic_jax.model.attention import Attention
from star_elastic_jax.model.mamba2 import Mamba2Mixer
from star_elastic_jax.model.mlp import MLP
from star_elastic_jax.model.model import Block, NemotronH
from star_elastic_jax.model.moe import MoE
from star_elastic_jax.model.norms import RMSNorm
from star_elastic_jax.model.params import Buffer

__all__ = ["Attention", "Block", "Buffer", "MLP", "Mamba2Mixer", "MoE", "NemotronH", "RMSNorm"]
