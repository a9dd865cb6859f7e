"""The optimizer (SPEC 3.8): AdamW with two parameter groups and global-norm clipping.

The optimized pytree is ``{"model": <model Params>, "router": <router Params>}`` (the router group
is absent in CE pre-training). Only ``nnx.Param`` leaves are in it: buffers such as the MoE
``e_score_correction_bias`` are never optimized (they are not in the pytree at all).

    clip_by_global_norm(clip_norm)                    over model AND router grads
    -> multi_transform(model: adamw(model schedule), router: adamw(router schedule))

Model schedule: linear warmup 0 -> ``lr`` over ``warmup_steps``, cosine to ``min_lr`` at
``total_steps``. Router: the same curve times ``router_lr / lr`` (``"scaled"``) or flat ``router_lr``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from star_elastic_jax.train.config import OptimConfig

GROUPS = ("model", "router")


def model_schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))
    if total_steps <= 1:
        return optax.constant_schedule(o.lr)
    return optax.warmup_cosine_decay_schedule(init_value=0.0 if warmup else o.lr, peak_value=o.lr,
                                              warmup_steps=warmup, decay_steps=total_steps, end_value=o.min_lr)


def router_schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
    if o.router_schedule == "constant":
        return optax.constant_schedule(o.router_lr)
    base, ratio = model_schedule(o, total_steps), o.router_lr / o.lr
    return lambda step: base(step) * ratio


def schedules(o: OptimConfig, total_steps: int) -> dict[str, Callable]:
    return {"model": model_schedule(o, total_steps), "router": router_schedule(o, total_steps)}


def _adamw(o: OptimConfig, lr) -> optax.GradientTransformation:
    return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)


def make_optimizer(o: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The AdamW chain for a ``{"model": ..., "router": ...}`` params pytree (either group optional)."""
    sched = schedules(o, total_steps)
    labels = lambda params: {k: k for k in params}  # noqa: E731  (top-level key = group)
    return optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.multi_transform({g: _adamw(o, sched[g]) for g in GROUPS}, labels),
    )


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any,
                        replicated: Any) -> Any:
    """Shardings of ``tx.init(params)``: a leaf whose key path ends with a parameter's key path (and has
    its shape) is an Adam moment of that parameter and takes its sharding; everything else (step
    counts) is ``replicated``."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    by_path = {}
    for (path, a), s in zip(jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(param_shardings)):
        by_path[tuple(path)] = (tuple(a.shape), s)

    def pick(path, leaf):
        path = tuple(path)
        for i in range(len(path)):
            hit = by_path.get(path[i:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)
