"""Exact parameter counting (SPEC 1.8): total and active parameters of any per-block sizes, with
real-valued (traceable) sizes allowed so that the router loss can differentiate through them."""
from __future__ import annotations

import dataclasses
from typing import Iterable

from star_elastic_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Exact parameter counts. ``active`` counts only the top-k routed experts per token."""

    total: int
    active: int


def block_param_count(cfg, hidden: float, s) -> tuple[float, float]:
    """(total, active) parameters of one block's mixer + its pre-norm, at ``hidden`` channels.

    Works with real-valued sizes so the router loss can differentiate through the expectation.
    """
    H = hidden
    norm = H
    if s.kind == "M":
        d_in = s.mamba_heads * cfg.mamba_head_dim
        gn2 = 2 * cfg.n_groups * cfg.ssm_state_size
        n = (H * (2 * d_in + gn2 + s.mamba_heads) + (d_in + gn2) * (cfg.conv_kernel + (1 if cfg.use_conv_bias else 0))
             + 3 * s.mamba_heads + d_in + d_in * H)
        return n + norm, n + norm
    if s.kind == "*":
        n = 2 * H * s.attn_heads * cfg.head_dim + 2 * H * cfg.num_key_value_heads * cfg.head_dim
        return n + norm, n + norm
    if s.kind == "E":
        shared = 2 * cfg.moe_shared_expert_intermediate_size * H
        router = s.experts * H
        per_expert = 2 * s.expert_ffn * H
        total = s.experts * per_expert + shared + router
        active = cfg.num_experts_per_tok * per_expert + shared + router
        return total + norm, active + norm
    if s.kind == "-":
        n = 2 * s.mlp_ffn * H
        return n + norm, n + norm
    raise ConfigError("hybrid_override_pattern", s.kind, "valid block chars are M * E -")


def count_params(cfg, sizes: Iterable, hidden: float | None = None,
                 keep: Iterable[bool] | None = None) -> ParamCount:
    """Exact counts for the given per-layer sizes (``keep`` drops layers for the depth axis)."""
    H = cfg.hidden_size if hidden is None else hidden
    total = active = 2 * cfg.vocab_size * H + H  # embeddings + lm_head + norm_f
    sizes = list(sizes)
    keep = [True] * len(sizes) if keep is None else list(keep)
    for s, k in zip(sizes, keep):
        if k:
            t, a = block_param_count(cfg, H, s)
            total += t
            active += a
    if isinstance(total, int) and isinstance(active, int):
        return ParamCount(total=total, active=active)
    # real-valued (or traced, differentiable) sizes: the router loss's expected parameter count
    return ParamCount(total=total, active=active)  # type: ignore[arg-type]
