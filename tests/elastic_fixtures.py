"""Tiny configs and random models for the elastic tests."""
import jax
import numpy as np
from flax import nnx

import star_elastic_jax as sej

# Tiny configs that between them exercise every axis: tiny = SPEC 2.4 (M*ME-M); "tiny_b" has
# 4 B/C groups, 3 KV groups of 2 query heads, 6 experts and two MoE and two attention blocks;
# "tiny_g" has group-limited routing (8 experts in 2 routing groups, each token keeps 1 group, top-2),
# so experts nest within each routing group (valid expert counts 4, 6, 8), in two MoE blocks.
CONFIGS = {
    "tiny": sej.ModelConfig.preset("tiny"),
    "tiny_b": sej.ModelConfig.preset(
        "tiny", hybrid_override_pattern="ME*-M*E", mamba_num_heads=8, n_groups=4, num_attention_heads=6,
        num_key_value_heads=3, n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
        intermediate_size=40, hidden_size=48),
    "tiny_g": sej.ModelConfig.preset(
        "tiny", hybrid_override_pattern="ME*E-", n_routed_experts=8, n_group=2, topk_group=1,
        num_experts_per_tok=2, moe_intermediate_size=24),
}


def random_model(cfg, seed=0, depth_order=None):
    """A model with non-trivial norms, biases and SSM parameters (so mis-sliced tensors show)."""
    model = sej.NemotronH(cfg, rngs=nnx.Rngs(seed), depth_order=depth_order)
    key = jax.random.key(seed + 1000)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        key, sub = jax.random.split(key)
        name = path[-1]
        v = var.get_value()
        if name in ("weight", "norm_weight"):
            var.set_value(1.0 + 0.3 * jax.random.normal(sub, v.shape))
        elif name in ("e_score_correction_bias", "D", "conv_x_bias", "conv_bc_bias"):
            var.set_value(0.2 * jax.random.normal(sub, v.shape))
    return model


def tokens_and_segments(cfg, batch=2, length=13, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(batch, length))
    seg = np.zeros((batch, length), np.int32)
    seg[0, 4:] = 1
    seg[0, 9:] = 2
    return tokens, seg
