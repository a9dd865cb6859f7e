"""Checkpoint formats: HF NemotronH safetensors (hf.py, one key table in hf_keys.py) and Orbax."""
from star_elastic_jax.checkpoint.hf import from_hf, hf_tensors, to_hf

__all__ = ["from_hf", "hf_tensors", "to_hf"]
