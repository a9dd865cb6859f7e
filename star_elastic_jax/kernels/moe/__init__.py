"""MoE expert FFN over routed tokens: :func:`expert_ffn` is the single dispatch point."""
from star_elastic_jax.kernels.moe.blocked import expert_ffn_blocked
from star_elastic_jax.kernels.moe.reference import expert_ffn, expert_ffn_dense, expert_ffn_ragged

__all__ = ["expert_ffn", "expert_ffn_blocked", "expert_ffn_dense", "expert_ffn_ragged"]
