"""Losses (SPEC 3.7): logit distillation, next-token cross entropy, and the router budget loss.

All losses run in fp32 whatever the logits' dtype. Token losses take a ``loss_mask [b, L]``
(1 = counted) and average over the counted tokens; ``*_per_token`` variants return the
unreduced ``[b, L]`` values for callers that accumulate sums and counts across micro-batches.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from star_elastic_jax.config import ModelConfig
from star_elastic_jax.elastic.budget import expected_active_params
from star_elastic_jax.elastic.router import RouterConfig

# a budget counts as "the full model" (no dead zone, identity regulariser on) at or above this
FULL_BUDGET = 1.0 - 1e-6


def _masked_mean(values: jax.Array, loss_mask: jax.Array) -> jax.Array:
    m = jnp.asarray(loss_mask, jnp.float32)
    return jnp.sum(values * m) / jnp.maximum(jnp.sum(m), 1.0)


def kd_per_token(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """``T^2 KL(p_teacher || p_student)`` per token ``[...]`` over the last (vocabulary) axis, with
    ``p = softmax(logits / T)``. The teacher is ``stop_gradient``-ed."""
    t = jnp.float32(temperature)
    ls = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    lt = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t, axis=-1)
    pt = jnp.exp(lt)
    # 0 * log 0 = 0 (a teacher logit of -inf contributes nothing, and no NaN)
    kl = jnp.sum(jnp.where(pt > 0, pt * (lt - ls), 0.0), axis=-1)
    return kl * t * t


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, loss_mask: jax.Array,
            temperature: float = 1.0) -> jax.Array:
    """Forward KL distillation (SPEC 3.7, T = 1): mean over tokens with ``loss_mask = 1`` of
    ``T^2 KL(p_teacher || p_student)`` on the full-vocabulary logits ``[b, L, V]``."""
    return _masked_mean(kd_per_token(student_logits, teacher_logits, temperature), loss_mask)


def ce_per_token(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``-log p(targets)`` per token. ``logits[:, t]`` predicts ``targets[:, t]`` (the caller shifts:
    ``targets = tokens[:, 1:]`` for ``logits = model(tokens[:, :-1])``). Out-of-range targets (e.g.
    -1 padding) are clipped; mask them out."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tgt = jnp.clip(jnp.asarray(targets, jnp.int32), 0, logits.shape[-1] - 1)
    return -jnp.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]


def ce_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean next-token cross entropy over tokens with ``loss_mask = 1`` (pre-training mode)."""
    return _masked_mean(ce_per_token(logits, targets), loss_mask)


def router_loss(model_cfg: ModelConfig, router_cfg: RouterConfig, probs: Mapping[str, jax.Array], budget
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The budget loss of SPEC 3.7 ([MLM] ``budget_loss_func``), traceable in ``probs`` and ``budget``.

    1. ``d = pi . choices`` per axis (per block for heterogeneous axes);
    2. ``diff = |P_act(d) / (b P_act,full) - 1|`` with the exact counter at real-valued sizes;
    3. ``b != 1``: ``diff = 0`` inside the dead zone ``diff < dead_zone``;
    4. ``b == 1``: ``diff += identity_weight * sum_axes mean((pi - onehot(0))^2)``.

    Returns ``(router_loss_weight * diff, metrics)``; metrics hold ``router/diff`` (unweighted),
    ``router/active_frac`` (expected active fraction), ``router/identity_mse`` and
    ``router/size/<axis>`` (expected sizes; ``[n_blocks]`` for heterogeneous axes).
    """
    choices = router_cfg.choice_dict
    missing = sorted(set(choices) - set(probs))
    if missing:
        from star_elastic_jax.errors import ChoiceError

        raise ChoiceError("probs", missing, "needs one entry per routed axis")
    b = jnp.asarray(budget, jnp.float32)
    expected = {a: jnp.asarray(probs[a], jnp.float32) @ jnp.asarray(choices[a], jnp.float32) for a in choices}
    full_active = float(model_cfg.param_count().active)
    active = expected_active_params(model_cfg, expected)
    frac = active / full_active
    diff = jnp.abs(frac / b - 1.0)
    is_full = b >= FULL_BUDGET
    diff = jnp.where(jnp.logical_and(~is_full, diff < router_cfg.dead_zone), 0.0, diff)
    mse = sum(jnp.mean((jnp.asarray(probs[a], jnp.float32)
                        - jax.nn.one_hot(0, len(choices[a]), dtype=jnp.float32)) ** 2) for a in choices)
    diff = diff + jnp.where(is_full, router_cfg.identity_weight * mse, 0.0)
    metrics = {"router/diff": diff, "router/active_frac": frac, "router/identity_mse": mse}
    metrics.update({f"router/size/{a}": v for a, v in expected.items()})
    return router_cfg.router_loss_weight * diff, metrics
