"""NemotronH: embeddings -> [pre-norm block + residual] x L -> norm_f -> lm_head -> fp32 logits."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from star_elastic_jax.config import ModelConfig
from star_elastic_jax.errors import DataError
from star_elastic_jax.model.attention import Attention
from star_elastic_jax.model.mamba2 import Mamba2Mixer
from star_elastic_jax.model.mlp import MLP
from star_elastic_jax.model.moe import MoE
from star_elastic_jax.model.norms import RMSNorm
from star_elastic_jax.model.params import logical, normal


def make_mixer(cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs, param_dtype):
    if kind == "M":
        return Mamba2Mixer(cfg, rngs=rngs, param_dtype=param_dtype)
    if kind == "*":
        return Attention(cfg, rngs=rngs, param_dtype=param_dtype)
    if kind == "E":
        return MoE(cfg, rngs=rngs, param_dtype=param_dtype)
    return MLP(cfg.hidden_size, cfg.intermediate_size, std=cfg.initializer_range, rngs=rngs,
               param_dtype=param_dtype)


class Block(nnx.Module):
    """``h = x + mixer(RMSNorm(x))`` (one pre-norm, no post-norm)."""

    def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, param_dtype=param_dtype)
        self.mixer = make_mixer(cfg, kind, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        return x + self.mixer(self.norm(x), segment_ids)


class NemotronH(nnx.Module):
    """The Nemotron-H hybrid Mamba2 / attention / MoE causal LM.

    ``model(tokens)`` returns fp32 logits ``[batch, seq, vocab]``. ``segment_ids [batch, seq]``
    marks packed documents: attention, the conv window and the SSM state never cross them.
    Parameters are stored in ``param_dtype`` (fp32 master weights by default); activations run in
    ``cfg.compute_dtype``; norms, the SSM, router and softmax always run in fp32.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg
        V, H = cfg.vocab_size, cfg.hidden_size
        self.embeddings = logical(normal(rngs, (V, H), cfg.initializer_range, param_dtype), ("vocab", "embed"))
        self.layers = nnx.List([Block(cfg, k, rngs=rngs, param_dtype=param_dtype)
                                for k in cfg.hybrid_override_pattern])
        self.norm_f = RMSNorm(H, cfg.layer_norm_epsilon, param_dtype=param_dtype)
        self.lm_head = logical(normal(rngs, (V, H), cfg.initializer_range, param_dtype), ("vocab", "embed"))

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        check_tokens(tokens, segment_ids, self.cfg)
        cdt = jnp.dtype(self.cfg.compute_dtype)
        x = jnp.take(self.embeddings[...], tokens, axis=0).astype(cdt)
        for layer in self.layers:
            x = layer(x, segment_ids)
        x = self.norm_f(x)
        return jnp.einsum("bld,vd->blv", x, self.lm_head[...].astype(cdt), preferred_element_type=jnp.float32)


def check_tokens(tokens, segment_ids, cfg: ModelConfig) -> None:
    """Shape checks that must fail in Python, before tracing reaches XLA."""
    if tokens.ndim != 2:
        raise DataError("tokens.shape", tuple(tokens.shape), "must be [batch, seq]")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise DataError("tokens.dtype", str(tokens.dtype), "must be an integer dtype")
    if tokens.shape[1] > cfg.max_position_embeddings:
        raise DataError("tokens.shape[1]", tokens.shape[1],
                        f"must be <= max_position_embeddings={cfg.max_position_embeddings}")
    if segment_ids is not None and tuple(segment_ids.shape) != tuple(tokens.shape):
        raise DataError("segment_ids.shape", tuple(segment_ids.shape), f"must equal tokens.shape={tokens.shape}")
