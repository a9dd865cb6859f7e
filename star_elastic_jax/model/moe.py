"""Mixture of experts (``E`` block), SPEC 1.6: sigmoid router with a selection-only correction bias,
group-limited top-k, non-gated relu2 experts and an always-on shared expert."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from star_elastic_jax.config import LayerSizes, ModelConfig
from star_elastic_jax.kernels.moe.expert_parallel import routed_expert_ffn
from star_elastic_jax.model.masks import MoEMasks
from star_elastic_jax.model.mlp import MLP
from star_elastic_jax.model.params import Buffer, logical, normal


def route(x: jax.Array, gate_weight: jax.Array, bias: jax.Array, cfg: ModelConfig, expert_mask=None):
    """Router in fp32. Returns ``(idx [T, k] int32, weights [T, k] fp32)``.

    ``c = sigmoid(x W^T) + bias`` selects (bias for selection only); groups keep the ``topk_group``
    best by the sum of their top-2 ``c``; weights are the *unbiased* sigmoid scores of the
    selected experts, optionally normalised, times ``routed_scaling_factor``.

    ``expert_mask [E]`` (elastic, SPEC 3.5): scores are multiplied by it (the soft mixture
    ``sum_i pi_i sigmoid(logits masked at E_i)``) and experts with mask 0 get selection score -inf
    (their correction bias is ignored), so a hard mask selects exactly as the sliced router does.
    """
    scores = jax.nn.sigmoid(jnp.einsum("th,eh->te", x.astype(jnp.float32), gate_weight.astype(jnp.float32)))
    choice = scores + bias.astype(jnp.float32)
    if expert_mask is not None:
        scores = scores * expert_mask
        choice = jnp.where(expert_mask > 0, scores + bias.astype(jnp.float32), -jnp.inf)
    T, E = choice.shape
    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        grouped = choice.reshape(T, cfg.n_group, E // cfg.n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
        _, keep = jax.lax.top_k(group_scores, cfg.topk_group)
        group_mask = jnp.zeros((T, cfg.n_group), bool).at[jnp.arange(T)[:, None], keep].set(True)
        choice = jnp.where(jnp.repeat(group_mask, E // cfg.n_group, axis=1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, idx, axis=1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return idx.astype(jnp.int32), weights * cfg.routed_scaling_factor


class MoE(nnx.Module):
    """Routed experts (stacked ``[E, F, H]`` / ``[E, H, F]``) plus a shared relu2 expert."""

    def __init__(self, cfg: ModelConfig, sizes: LayerSizes, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg
        H, E, F = cfg.hidden_size, sizes.experts, sizes.expert_ffn
        std = cfg.initializer_range
        self.gate_weight = logical(normal(rngs, (E, H), std, param_dtype), (None, "embed"))
        self.e_score_correction_bias = logical(jnp.zeros((E,), jnp.float32), (None,), kind=Buffer)
        self.experts_up = logical(normal(rngs, (E, F, H), std, param_dtype), ("expert", "expert_mlp", "embed"))
        self.experts_down = logical(normal(rngs, (E, H, F), std, param_dtype), ("expert", "embed", "expert_mlp"))
        self.shared_experts = MLP(H, cfg.moe_shared_expert_intermediate_size, std=std, rngs=rngs,
                                  param_dtype=param_dtype)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None, masks: MoEMasks | None = None
                 ) -> jax.Array:
        del segment_ids  # token-wise
        masks = MoEMasks(experts=None, ffn=None) if masks is None else masks
        b, L, H = x.shape
        flat = x.reshape(b * L, H)
        idx, weights = route(flat, self.gate_weight[...], self.e_score_correction_bias[...], self.cfg, masks.experts)
        routed = routed_expert_ffn(flat, idx, weights, self.experts_up[...], self.experts_down[...],
                                   impl=self.cfg.moe_impl, ffn_mask=masks.ffn, k_limit=masks.hidden_limit,
                                   ffn_limit=masks.ffn_limit)
        return routed.astype(x.dtype).reshape(b, L, H) + self.shared_experts(x)
