"""Importance ranking (SPEC 3.3) and the function-preserving permutation it induces (SPEC 3.4).

One calibration pass accumulates, per block, the activation statistics each axis is scored from:

- hidden channels: every block's pre-norm output, Minitron aggregation (``a = mean_seq |act|`` per
  sequence and channel, ``sqrt(sum_batch a^2)`` per block), summed over blocks;
- Mamba heads: the x slice of in_proj's output, L2 over tokens and the head's channels, ranked
  within each B/C group;
- experts: REAP, the mean over tokens routed to an expert of (combine weight x ||expert output||),
  ranked within each routing group (group-limited routing scores a group by its own experts, so
  moving an expert to another group would change which groups a token keeps);
- expert-FFN channels: the fc2 input (post relu2) over all experts' routed tokens, Minitron;
- dense-MLP channels: the fc2 input, Minitron;
- attention heads: L2 of each head's o_proj input, ranked within its KV group;
- depth (optional): normalised logit MSE of dropping a block, removing blocks iteratively.

Units are then sorted by descending score and every tensor the axes table lists is permuted, so
that every prefix of every axis is the most important sub-model of that size.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_elastic_jax.elastic.axes import AXES, expand_units, full_size, leaf_dims
from star_elastic_jax.errors import DataError
from star_elastic_jax.kernels.moe import expert_ffn
from star_elastic_jax.model.mlp import relu2
from star_elastic_jax.model.moe import route
from star_elastic_jax.model.params import linear

RANKED_AXES = ("hidden", "mamba_heads", "attn_heads", "experts", "expert_ffn", "mlp_ffn")


def _minitron(act: jax.Array) -> jax.Array:
    """``sum_batch (mean_seq |act|)^2`` per channel for ``act [b, L, C]`` (sqrt taken at the end)."""
    a = jnp.mean(jnp.abs(act.astype(jnp.float32)), axis=1)
    return jnp.sum(a * a, axis=0)


def _block_stats(layer, h: jax.Array, segment_ids, moe_impl: str) -> dict[str, jax.Array]:
    """The statistics of one block given its pre-norm output ``h``."""
    mixer = layer.mixer
    out: dict[str, jax.Array] = {"hidden": _minitron(h)}
    if layer.kind == "M":
        xs = linear(h, mixer.in_proj_x[...]).astype(jnp.float32)
        out["mamba_sq"] = jnp.sum(xs * xs, axis=(0, 1))  # [d_in]
    elif layer.kind == "*":
        heads = mixer.head_outputs(h, segment_ids).astype(jnp.float32)  # [b, L, kv, rep, d]
        out["attn_sq"] = jnp.sum(heads * heads, axis=(0, 1, 4)).reshape(-1)  # [n_q], kv-group-major
    elif layer.kind == "E":
        b, L, H = h.shape
        flat = h.reshape(b * L, H)
        idx, weights = route(flat, mixer.gate_weight[...], mixer.e_score_correction_bias[...], mixer.cfg)
        k = idx.shape[1]
        E, F, _ = mixer.experts_up.shape
        reps = jnp.repeat(flat, k, axis=0)
        one = idx.reshape(-1, 1)
        ones = jnp.ones_like(one, jnp.float32)
        # per-assignment (unweighted) expert outputs: route each (token, slot) to its own expert alone
        f = expert_ffn(reps, one, ones, mixer.experts_up[...], mixer.experts_down[...], impl=moe_impl)
        norms = jnp.linalg.norm(f, axis=-1)  # [T*k]
        flat_idx = idx.reshape(-1)
        out["reap_sum"] = jnp.zeros((E,), jnp.float32).at[flat_idx].add(weights.reshape(-1) * norms)
        out["reap_count"] = jnp.zeros((E,), jnp.float32).at[flat_idx].add(1.0)
        # fc2 inputs: the same dispatch with an identity "down" projection returns relu2(up x)
        eye = jnp.broadcast_to(jnp.eye(F, dtype=reps.dtype), (E, F, F))
        hid = expert_ffn(reps, one, ones, mixer.experts_up[...], eye, impl=moe_impl)  # [T*k, F]
        a = jnp.mean(jnp.abs(hid), axis=0)
        out["expert_ffn"] = a * a
    elif layer.kind == "-":
        out["mlp_ffn"] = _minitron(relu2(linear(h, mixer.up_proj[...])))
    return out


def collect_statistics(model, batches: Iterable, *, progress: bool = True) -> dict[str, Any]:
    """Accumulate the per-block statistics of :func:`_block_stats` over calibration ``batches``.

    ``batches`` yields token arrays ``[b, L]`` or ``(tokens, segment_ids)`` pairs.
    """
    graphdef, state = nnx.split(model)
    moe_impl = model.cfg.moe_impl

    @jax.jit
    def step(state, tokens, segment_ids):
        m = nnx.merge(graphdef, state)
        x = jnp.take(m.embeddings[...], tokens, axis=0).astype(jnp.dtype(m.cfg.compute_dtype))
        stats = []
        for layer in m.layers:
            h = layer.norm(x)
            stats.append(_block_stats(layer, h, segment_ids, moe_impl))
            x = x + layer.mixer(h, segment_ids)
        return stats

    total = None
    n = 0
    for batch in _progress(batches, progress, "calibrate"):
        tokens, seg = batch if isinstance(batch, tuple) else (batch, None)
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or tokens.size == 0:
            raise DataError("calibration batch", tuple(tokens.shape), "non-empty token arrays [batch, seq]")
        stats = step(state, tokens, None if seg is None else jnp.asarray(seg))
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
        n += 1
    if total is None:
        raise DataError("batches", "empty", "calibration needs at least one batch")
    return {"per_block": jax.tree.map(np.asarray, total), "num_batches": n}


def scores_from_statistics(cfg, stats: Mapping[str, Any]) -> dict[str, Any]:
    """Per-axis importance scores. ``hidden``: ``[H]``; per-layer axes: ``{block index: [units]}``."""
    blocks = stats["per_block"]
    scores: dict[str, Any] = {"hidden": sum(np.sqrt(b["hidden"]) for b in blocks)}
    for axis in RANKED_AXES[1:]:
        scores[axis] = {}
    for i, b in enumerate(blocks):
        if "mamba_sq" in b:
            per_head = b["mamba_sq"].reshape(-1, cfg.mamba_head_dim).sum(-1)
            scores["mamba_heads"][i] = np.sqrt(per_head)
        if "attn_sq" in b:
            scores["attn_heads"][i] = np.sqrt(b["attn_sq"])
        if "reap_sum" in b:
            scores["experts"][i] = b["reap_sum"] / np.maximum(b["reap_count"], 1.0)  # unrouted -> 0
            scores["expert_ffn"][i] = np.sqrt(b["expert_ffn"])
        if "mlp_ffn" in b:
            scores["mlp_ffn"][i] = np.sqrt(b["mlp_ffn"])
    return scores


def ranking(score: np.ndarray, groups: int = 1) -> np.ndarray:
    """Unit permutation: descending score within each of ``groups`` contiguous groups (stable)."""
    score = np.asarray(score, np.float64)
    per = score.shape[0] // groups
    order = np.argsort(-score.reshape(groups, per), axis=1, kind="stable")
    return (order + np.arange(groups)[:, None] * per).reshape(-1)


def permutations_from_scores(cfg, scores: Mapping[str, Any], axes: Iterable[str] = RANKED_AXES) -> dict[str, Any]:
    """``{"hidden": perm, axis: {block: perm}}`` for the requested axes."""
    perms: dict[str, Any] = {}
    for axis in axes:
        if axis == "hidden":
            perms["hidden"] = ranking(scores["hidden"])
        else:
            perms[axis] = {i: ranking(s, AXES[axis].groups(cfg)) for i, s in scores[axis].items()}
    return perms


def permute_params(cfg, params: Mapping[tuple, Any], perms: Mapping[str, Any]) -> dict[tuple, Any]:
    """Apply unit permutations to every leaf the axes table lists (function-preserving)."""
    table = leaf_dims(cfg)
    out = {}
    for path, arr in params.items():
        for axis, ld in table.get(tuple(path), ()):
            if axis not in perms:
                continue
            perm = perms[axis] if axis == "hidden" else perms[axis].get(path[1])
            if perm is None:
                continue
            n = cfg.hidden_size if axis == "hidden" else full_size(cfg, axis, path[1])
            if len(perm) != n or sorted(perm) != list(range(n)):
                raise ValueError(f"{axis} permutation for {path} is not a permutation of {n} units")
            arr = jnp.take(jnp.asarray(arr), expand_units(np.asarray(perm), ld.unit_size(cfg)), axis=ld.dim)
        out[tuple(path)] = arr
    return out


def depth_ranking(model, batches: list, *, progress: bool = True) -> tuple[tuple[int, ...], list[float]]:
    """Iterative depth ranking (SPEC 3.3, [NE] Eq. 5): repeatedly drop the block whose removal
    (on top of those already removed) changes the logits least, by ``sum (full - dropped)^2 /
    sum full^2``. Returns the drop order (least important first) and each step's score."""
    from star_elastic_jax.elastic.masks import build_masks

    cfg = model.cfg
    graphdef, state = nnx.split(model)
    L = cfg.num_hidden_layers

    @jax.jit
    def nmse(state, tokens, keep, full):
        logits = nnx.merge(graphdef, state)(tokens, elastic=build_masks(cfg, {}, keep=keep))
        return jnp.sum((full - logits) ** 2), jnp.sum(full ** 2)

    batches = [jnp.asarray(b[0] if isinstance(b, tuple) else b) for b in batches]
    fulls = [jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, t) for t in batches]
    removed: list[int] = []
    step_scores: list[float] = []
    for _ in _progress(range(L - 1), progress, "depth ranking"):
        best, best_score = None, None
        for j in range(L):
            if j in removed:
                continue
            keep = np.ones((L,), np.float32)
            keep[removed + [j]] = 0.0
            num = den = 0.0
            for t, f in zip(batches, fulls):
                a, b = nmse(state, t, keep, f)
                num, den = num + float(a), den + float(b)
            s = num / max(den, 1e-30)
            if best_score is None or s < best_score:
                best, best_score = j, s
        removed.append(best)
        step_scores.append(best_score)
    removed.extend(j for j in range(L) if j not in removed)
    return tuple(removed), step_scores


def rank(model, batches: Iterable, *, axes: Iterable[str] = RANKED_AXES, depth: bool = False,
         progress: bool = True):
    """Rank ``axes`` on calibration ``batches`` and return ``(permuted_model, scores)``.

    The permuted model computes the same function (up to fp rounding); every elastic prefix of it
    keeps the highest-scoring units. ``depth=True`` also computes the depth ranking (stored on the
    model as ``depth_order``; costs O(L^2) forward passes).
    """
    from star_elastic_jax.model.model import model_from_params

    axes = tuple(axes)
    unknown = sorted(set(axes) - set(RANKED_AXES))
    if unknown:
        raise DataError("axes", unknown, f"rankable axes are {RANKED_AXES}")
    batches = list(batches)
    stats = collect_statistics(model, batches, progress=progress)
    scores = scores_from_statistics(model.cfg, stats)
    perms = permutations_from_scores(model.cfg, scores, axes)
    params = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    depth_order = model.depth_order
    if depth:
        depth_order, scores["depth"] = depth_ranking(model, batches, progress=progress)
    permuted = permute_params(model.cfg, params, perms)
    scores["permutations"] = perms
    return model_from_params(model.cfg, permuted, depth_order=depth_order), scores


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=len(it) if hasattr(it, "__len__") else None)
