"""ElasticMasks: the arrays a masked forward reads (SPEC 3.5).

Every axis' mask is a convex mixture of prefix masks, ``m = sum_i pi_i I_{c_i}``, where ``c_i``
are candidate sizes and ``pi`` their weights (for a grouped axis ``I_c`` is the grouped prefix of
``axes.unit_prefix_mask``: e.g. the first ``c / n_group`` experts of every routing group). A hard
choice is the one-hot case, so hard, soft (router training) and eval masks are built by the same
code. Norms over a masked axis also get ``eps_factor = sum_i pi_i p_i`` and
``scale = sum_i pi_i sqrt(p_i)`` (``p_i = c_i / n``): with the inactive channels zero,
``sqrt(p) * RMSNorm(x; eps * p)`` over all channels equals RMSNorm over the active ones, which is
what makes a hard-masked model equal its sliced model.

The result is the typed pytree of :mod:`star_elastic_jax.model.masks` (it can be a traced
``jax.jit`` argument)::

    ElasticMasks(hidden=HiddenMasks(mask [H], norm [2]),
                 layers=(BlockMasks(keep [], MambaMasks(mask [d_in], norm [2], head_limit)),   # M
                         BlockMasks(keep [], AttentionMasks(heads [n_q])),                      # *
                         BlockMasks(keep [], MoEMasks(experts [E], ffn [F], hidden_limit, ffn_limit)),  # E
                         BlockMasks(keep [], MLPMasks(ffn [I])), ...))                          # -

Hard masks of a concrete choice (:func:`masks_from_choice`) also carry the sizes as int *limits*,
which the Pallas kernels turn into skipped work (masked sub-models cost less than the full model):
``MambaMasks.head_limit`` (active heads per group) on M blocks, ``MoEMasks.hidden_limit`` and
``ffn_limit`` on E blocks. They are plain ints (static when the choice is), so the same pytree can be a traced jit
argument. Router masks have none: training needs the gradients of the masked-out units. There is
no expert limit: the kept experts are a prefix of every routing group, not of the expert axis, so
an expert-count limit would be wrong with ``n_group > 1``; and none is needed, since the router never
selects a masked-out expert, so no tokens are dispatched to it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from star_elastic_jax.config import ModelConfig
from star_elastic_jax.elastic.axes import AXES, PER_LAYER_AXES, full_size, layers_of, unit_prefix_mask
from star_elastic_jax.elastic.choice import ElasticChoice, ResolvedChoice, ensure_resolved
from star_elastic_jax.errors import ChoiceError
from star_elastic_jax.model.masks import (AttentionMasks, BlockMasks, ElasticMasks, HiddenMasks, MambaMasks,
                                          MLPMasks, MoEMasks)

__all__ = ["ElasticMasks", "build_masks", "masks_from_choice", "mixture_mask"]


def mixture_mask(n: int, groups: int, sizes: Sequence[int], probs) -> tuple[Any, Any, Any]:
    """``(unit_mask [n], eps_factor, scale)`` of the mixture ``sum_i probs_i I_{sizes_i}``."""
    prefix = np.stack([unit_prefix_mask(n, groups, int(c)) for c in sizes])  # [k, n]
    frac = np.asarray(sizes, np.float32) / n
    probs = jnp.asarray(probs, jnp.float32)
    return probs @ prefix, probs @ frac, probs @ np.sqrt(frac)


def _norm(eps_factor, scale):
    return jnp.stack([jnp.asarray(eps_factor, jnp.float32), jnp.asarray(scale, jnp.float32)])


def build_masks(cfg: ModelConfig, axis_mixtures: Mapping[str, tuple], keep=None) -> ElasticMasks:
    """Masks from per-axis mixtures.

    ``axis_mixtures[axis] = (sizes, probs)``: ``sizes`` a sequence of candidate sizes (or, for a
    per-layer axis, one sequence per block of its type) and ``probs`` the matching weights
    (``[k]`` or ``[n_blocks, k]``). Axes not given stay full. ``keep`` is an optional ``[L]``
    per-block weight (depth axis; 1 = kept, 0 = identity).
    """
    unknown = sorted(set(axis_mixtures) - set(AXES))
    if unknown:
        raise ChoiceError("axis", unknown, f"one of {sorted(AXES)}")
    H = cfg.hidden_size
    if "hidden" in axis_mixtures:
        sizes, probs = axis_mixtures["hidden"]
        m, e, s = mixture_mask(H, 1, sizes, probs)
    else:
        m, e, s = jnp.ones((H,), jnp.float32), 1.0, 1.0
    hidden = HiddenMasks(mask=m, norm=_norm(e, s))
    axis_masks: list[dict[str, Any]] = [{} for _ in range(cfg.num_hidden_layers)]
    for axis in PER_LAYER_AXES:
        ax = AXES[axis]
        for j, i in enumerate(layers_of(cfg, axis)):
            n = full_size(cfg, axis, i)
            if axis in axis_mixtures:
                sizes, probs = axis_mixtures[axis]
                sizes_i = sizes[j] if _per_layer(sizes) else sizes
                probs_i = jnp.asarray(probs)[j] if jnp.ndim(probs) == 2 else probs
                axis_masks[i][axis] = mixture_mask(n, ax.groups(cfg), sizes_i, probs_i)
            else:
                axis_masks[i][axis] = (jnp.ones((n,), jnp.float32), 1.0, 1.0)
    layers = []
    for i, kind in enumerate(cfg.hybrid_override_pattern):
        a = axis_masks[i]
        if kind == "M":
            m, e, s = a["mamba_heads"]
            mixer = MambaMasks(mask=jnp.repeat(m, cfg.mamba_head_dim), norm=_norm(e, s))
        elif kind == "*":
            mixer = AttentionMasks(heads=a["attn_heads"][0])
        elif kind == "E":
            mixer = MoEMasks(experts=a["experts"][0], ffn=a["expert_ffn"][0])
        else:
            mixer = MLPMasks(ffn=a["mlp_ffn"][0])
        layers.append(BlockMasks(keep=jnp.asarray(1.0 if keep is None else keep[i], jnp.float32), mixer=mixer))
    return ElasticMasks(hidden=hidden, layers=tuple(layers))


def _per_layer(sizes) -> bool:
    return len(sizes) > 0 and isinstance(sizes[0], (list, tuple, np.ndarray))


def masks_from_choice(cfg: ModelConfig, choice: ElasticChoice | ResolvedChoice, *,
                      depth_order: Sequence[int] | None = None) -> ElasticMasks:
    """Hard 0/1 masks of a choice, resolved or not (multiplier 1, SPEC 3.5 eval/slicing mode).
    Axes kept full get no mask; the kernel limits are always set."""
    r = ensure_resolved(cfg, choice, depth_order=depth_order)
    mix: dict[str, tuple] = {"hidden": ([r.hidden], [1.0])}
    for axis in PER_LAYER_AXES:
        if not r.is_full(axis, cfg):
            mix[axis] = ([[c] for c in r.sizes_of(axis, cfg)], np.ones((len(layers_of(cfg, axis)), 1), np.float32))
    keep = None if all(r.keep) else np.asarray(r.keep, np.float32)
    masks = build_masks(cfg, mix, keep=keep)
    layers = list(masks.layers)
    for i, heads in zip(layers_of(cfg, "mamba_heads"), r.sizes_of("mamba_heads", cfg)):
        layers[i] = dataclasses.replace(layers[i], mixer=dataclasses.replace(layers[i].mixer,
                                                                             head_limit=heads // cfg.n_groups))
    for i, ffn in zip(layers_of(cfg, "expert_ffn"), r.sizes_of("expert_ffn", cfg)):
        layers[i] = dataclasses.replace(layers[i], mixer=dataclasses.replace(layers[i].mixer, hidden_limit=r.hidden,
                                                                             ffn_limit=ffn))
    return dataclasses.replace(masks, layers=tuple(layers))
