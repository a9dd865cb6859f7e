"""ElasticMasks: the arrays a masked forward reads (SPEC 3.5).

Every axis' mask is a convex mixture of prefix masks, ``m = sum_i pi_i I_{c_i}``, where ``c_i``
are candidate sizes and ``pi`` their weights. A hard choice is the one-hot case, so hard, soft
(router training) and eval masks are built by the same code. Norms over a masked axis also get
``eps_factor = sum_i pi_i p_i`` and ``scale = sum_i pi_i sqrt(p_i)`` (``p_i = c_i / n``): with the
inactive channels zero, ``sqrt(p) * RMSNorm(x; eps * p)`` over all channels equals RMSNorm over the
active ones, which is what makes a hard-masked model equal its sliced model.

Layout of the pytree (a plain dict, so it can be a traced ``jax.jit`` argument)::

    {"hidden": {"mask": [H], "norm": [2]},
     "layers": ({"keep": [], "mamba": {"mask": [d_in], "norm": [2]}}      # M block
                {"keep": [], "heads": [n_q]}                               # * block
                {"keep": [], "experts": [E], "ffn": [F]}                   # E block
                {"keep": [], "ffn": [I]}, ...)}                            # - block

Hard masks of a concrete choice (:func:`masks_from_choice`) also carry the sizes as int *limits*,
which the Pallas kernels turn into skipped work (masked sub-models cost less than the full model):
``mamba["head_limit"]`` (active heads per group) on M blocks, ``hidden_limit`` and ``ffn_limit`` on
E blocks. They are plain ints (static when the choice is), so the same pytree can be a traced jit
argument. Router masks have none: training needs the gradients of the masked-out units.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from star_elastic_jax.config import ModelConfig
from star_elastic_jax.elastic.axes import AXES, PER_LAYER_AXES, full_size, layers_of, unit_prefix_mask
from star_elastic_jax.elastic.choice import ElasticChoice, resolve_choice
from star_elastic_jax.errors import ChoiceError

ElasticMasks = dict  # the pytree documented above

# mask key inside a block's entry, per axis
_BLOCK_KEY = {"mamba_heads": "mamba", "attn_heads": "heads", "experts": "experts", "expert_ffn": "ffn",
              "mlp_ffn": "ffn"}


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
    out: dict[str, Any] = {"hidden": {"mask": m, "norm": _norm(e, s)}}
    layers: list[dict[str, Any]] = [{} for _ in range(cfg.num_hidden_layers)]
    for i in range(cfg.num_hidden_layers):
        layers[i]["keep"] = jnp.asarray(1.0 if keep is None else keep[i], jnp.float32)
    for axis in PER_LAYER_AXES:
        ax = AXES[axis]
        blocks = layers_of(cfg, axis)
        for j, i in enumerate(blocks):
            n = full_size(cfg, axis, i)
            groups = ax.groups(cfg)
            if axis in axis_mixtures:
                sizes, probs = axis_mixtures[axis]
                sizes_i = sizes[j] if _per_layer(sizes) else sizes
                probs_i = jnp.asarray(probs)[j] if jnp.ndim(probs) == 2 else probs
                m, e, s = mixture_mask(n, groups, sizes_i, probs_i)
            else:
                m, e, s = jnp.ones((n,), jnp.float32), 1.0, 1.0
            if axis == "mamba_heads":
                m = jnp.repeat(m, cfg.mamba_head_dim)
                layers[i]["mamba"] = {"mask": m, "norm": _norm(e, s)}
            else:
                layers[i][_BLOCK_KEY[axis]] = m
    out["layers"] = tuple(layers)
    return out


def _per_layer(sizes) -> bool:
    return len(sizes) > 0 and isinstance(sizes[0], (list, tuple, np.ndarray))


def masks_from_choice(cfg: ModelConfig, choice: ElasticChoice, *, depth_order: Sequence[int] | None = None
                      ) -> ElasticMasks:
    """Hard 0/1 masks of a validated choice (multiplier 1, SPEC 3.5 eval/slicing mode)."""
    r = resolve_choice(cfg, choice, depth_order=depth_order)
    mix: dict[str, tuple] = {"hidden": ([r.hidden], [1.0])}
    for axis in PER_LAYER_AXES:
        if getattr(choice, axis) is not None:
            mix[axis] = ([[c] for c in r.sizes_of(axis, cfg)], np.ones((len(layers_of(cfg, axis)), 1), np.float32))
    keep = np.asarray(r.keep, np.float32) if choice.depth is not None else None
    masks = build_masks(cfg, mix, keep=keep)
    layers = masks["layers"]
    for i, heads in zip(layers_of(cfg, "mamba_heads"), r.sizes_of("mamba_heads", cfg)):
        layers[i]["mamba"]["head_limit"] = heads // cfg.n_groups
    for i, ffn in zip(layers_of(cfg, "expert_ffn"), r.sizes_of("expert_ffn", cfg)):
        layers[i]["hidden_limit"], layers[i]["ffn_limit"] = r.hidden, ffn
    return masks
