"""MoE: ragged (sorted, lax.ragged_dot) vs dense expert FFN vs a per-token gather oracle; the MoE block
vs transformers' NemotronHMoE; ``route`` vs transformers' NemotronHTopkRouter (group-limited top-k)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import NemotronHConfig
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE, NemotronHTopkRouter

import star_elastic_jax as sej
from star_elastic_jax.kernels.moe import expert_ffn, expert_ffn_dense, expert_ffn_ragged
from star_elastic_jax.kernels.moe.reference import expert_ffn_gather
from star_elastic_jax.model.moe import MoE, route

from hf_fixtures import random_model


def gather_oracle(x, idx, weights, up, down):
    """Per-token gather of the selected experts' weights: independent of sorting and one-hot combine."""
    hid = jnp.einsum("th,tkfh->tkf", x, up[idx])
    out = jnp.einsum("tkf,tkhf->tkh", jnp.square(jax.nn.relu(hid)), down[idx])
    return jnp.einsum("tk,tkh->th", weights, out)


def numpy_oracle(x, idx, weights, up, down):
    x, weights, up, down = (np.asarray(t, np.float64) for t in (x, weights, up, down))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j, e in enumerate(np.asarray(idx)[t]):
            out[t] += weights[t, j] * (down[e] @ np.maximum(up[e] @ x[t], 0.0) ** 2)
    return out


def expert_inputs(rng, T, H, E, F, k, used):
    """Random inputs where only the experts in ``used`` receive tokens (distinct per token)."""
    x = rng.standard_normal((T, H)).astype(np.float32)
    idx = np.stack([rng.choice(used, size=k, replace=False) for _ in range(T)]).astype(np.int32)
    w = rng.uniform(0.1, 2.0, (T, k)).astype(np.float32)
    up = (rng.standard_normal((E, F, H)) / np.sqrt(H)).astype(np.float32)
    down = (rng.standard_normal((E, H, F)) / np.sqrt(F)).astype(np.float32)
    return x, idx, w, up, down


# (T, H, E, F, k, experts that receive tokens)
EXPERT_CASES = {
    "holes": (13, 16, 6, 8, 2, [0, 1, 3, 4]),        # experts 2 and 5 (the last) get nothing
    "first_empty": (9, 8, 5, 12, 3, [1, 2, 3, 4]),   # expert 0 gets nothing
    "one_expert_used": (7, 8, 4, 4, 1, [2]),         # all tokens to expert 2
    "top1_all": (32, 16, 8, 16, 1, list(range(8))),
}


@pytest.mark.parametrize("case", sorted(EXPERT_CASES))
def test_expert_ffn_values(case, np_rng):
    x, idx, w, up, down = expert_inputs(np_rng, *EXPERT_CASES[case])
    want = numpy_oracle(x, idx, w, up, down)
    for fn in (expert_ffn_ragged, expert_ffn_dense, expert_ffn_gather, gather_oracle):
        got = np.asarray(jax.jit(fn)(x, idx, w, up, down))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=fn.__name__)
    for impl in ("ragged", "dense", "gather", "auto"):
        got = np.asarray(jax.jit(expert_ffn, static_argnames="impl")(x, idx, w, up, down, impl=impl))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=impl)


@pytest.mark.parametrize("case", sorted(EXPERT_CASES))
def test_expert_ffn_gradients(case, np_rng):
    x, idx, w, up, down = expert_inputs(np_rng, *EXPERT_CASES[case])
    cot = np_rng.standard_normal(x.shape).astype(np.float32)

    def grads(fn):
        loss = lambda x, w, up, down: jnp.sum(fn(x, idx, w, up, down) * cot)  # noqa: E731
        return [np.asarray(g) for g in jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, w, up, down)]

    want = grads(gather_oracle)
    unused = sorted(set(range(up.shape[0])) - set(EXPERT_CASES[case][-1]))
    for fn in (expert_ffn_ragged, expert_ffn_dense, expert_ffn_gather):
        got = grads(fn)
        for name, a, b in zip(("x", "weights", "up", "down"), got, want):
            assert np.all(np.isfinite(a)), (fn.__name__, name)
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{fn.__name__} d{name}")
        for e in unused:  # experts with zero tokens get exactly zero gradient
            assert not np.any(got[2][e]) and not np.any(got[3][e])


def test_unknown_impl():
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(sej.ConfigError):
        expert_ffn(x, np.zeros((2, 1), np.int32), np.ones((2, 1), np.float32), np.zeros((2, 3, 4), np.float32),
                   np.zeros((2, 4, 3), np.float32), impl="megablocks")


# ----------------------------------------------------------------------------- router vs HF
ROUTER_CASES = {
    "grouped_no_norm": dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
                            norm_topk_prob=False, routed_scaling_factor=1.7),
    "grouped_norm": dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
                         norm_topk_prob=True, routed_scaling_factor=1.7),
    "grouped_wide": dict(n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=4,
                         norm_topk_prob=True, routed_scaling_factor=2.5),
    "ungrouped": dict(n_routed_experts=6, n_group=1, topk_group=1, num_experts_per_tok=2,
                      norm_topk_prob=True, routed_scaling_factor=2.5),
    "ungrouped_no_norm": dict(n_routed_experts=6, n_group=1, topk_group=1, num_experts_per_tok=2,
                              norm_topk_prob=False, routed_scaling_factor=1.0),
    "all_groups_kept": dict(n_routed_experts=8, n_group=4, topk_group=4, num_experts_per_tok=3,
                            norm_topk_prob=True, routed_scaling_factor=1.0),
}
H_ROUTER = 16


def _cfgs(kw):
    base = dict(hidden_size=H_ROUTER, hybrid_override_pattern="E", vocab_size=32, moe_intermediate_size=8,
                moe_shared_expert_intermediate_size=8, **kw)
    return NemotronHConfig(**base), sej.ModelConfig.from_hf(base)


def _router_inputs(rng, E, T=96, bias_scale=0.1):
    x = rng.standard_normal((T, H_ROUTER)).astype(np.float32)
    w = (2.0 * rng.standard_normal((E, H_ROUTER)) / np.sqrt(H_ROUTER)).astype(np.float32)
    b = (bias_scale * rng.standard_normal(E)).astype(np.float32)
    return x, w, b


def _hf_route(hf_cfg, x, w, b):
    router = NemotronHTopkRouter(hf_cfg)
    with torch.no_grad():
        router.weight.copy_(torch.from_numpy(w))
        router.e_score_correction_bias.copy_(torch.from_numpy(b))
        _, weights, idx = router(torch.from_numpy(x))
    return idx.numpy(), weights.numpy()


def _sorted_by_expert(idx, weights):
    order = np.argsort(idx, axis=1)
    return np.take_along_axis(idx, order, 1), np.take_along_axis(weights, order, 1)


@pytest.mark.parametrize("case", sorted(ROUTER_CASES))
def test_route_matches_transformers(case, np_rng):
    hf_cfg, cfg = _cfgs(ROUTER_CASES[case])
    x, w, b = _router_inputs(np_rng, cfg.n_routed_experts)
    idx, weights = jax.jit(route, static_argnums=3)(x, w, b, cfg)
    assert idx.dtype == jnp.int32 and weights.dtype == jnp.float32
    assert idx.shape == weights.shape == (x.shape[0], cfg.num_experts_per_tok)
    got_idx, got_w = _sorted_by_expert(np.asarray(idx), np.asarray(weights))
    want_idx, want_w = _sorted_by_expert(*_hf_route(hf_cfg, x, w, b))
    np.testing.assert_array_equal(got_idx, want_idx)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-6, atol=1e-6)


def test_router_cases_are_discriminating(np_rng):
    """The random inputs above make group limiting and the selection-only bias change the result,
    so a router that ignored either would fail test_route_matches_transformers."""
    hf_cfg, cfg = _cfgs(ROUTER_CASES["grouped_no_norm"])
    x, w, b = _router_inputs(np_rng, cfg.n_routed_experts)
    scores = 1 / (1 + np.exp(-(x @ w.T)))
    want_idx, want_w = _sorted_by_expert(*_hf_route(hf_cfg, x, w, b))
    plain = np.sort(np.argsort(-(scores + b), axis=1)[:, :3], axis=1)  # no group limit
    assert (plain != want_idx).any(axis=1).mean() > 0.1
    no_bias = np.sort(np.argsort(-scores, axis=1)[:, :3], axis=1)
    hf_ungrouped, _ = _cfgs(ROUTER_CASES["ungrouped_no_norm"] | dict(n_routed_experts=8, num_experts_per_tok=3))
    ungrouped_idx, _ = _sorted_by_expert(*_hf_route(hf_ungrouped, x, w, b))
    assert (no_bias != ungrouped_idx).any(axis=1).mean() > 0.05
    # weights are the unbiased sigmoid scores (times the scale), not scores + bias
    np.testing.assert_allclose(want_w, np.take_along_axis(scores, want_idx, 1) * 1.7, rtol=1e-5)


# ----------------------------------------------------------------------------- MoE block
MOE_CASES = {
    "grouped": dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, norm_topk_prob=False,
                    routed_scaling_factor=1.7),
    "tiny": dict(n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2, norm_topk_prob=True,
                 routed_scaling_factor=2.5),
}


def _moe_pair(kw, seed):
    base = dict(hidden_size=H_ROUTER, hybrid_override_pattern="E", vocab_size=32, moe_intermediate_size=12,
                moe_shared_expert_intermediate_size=10, **kw)
    cfg = sej.ModelConfig.from_hf(base)
    mods = {}
    for impl in ("ragged", "dense"):
        m = random_model(cfg.with_updates(moe_impl=impl), seed).layers[0].mixer
        assert isinstance(m, MoE)
        mods[impl] = m
    return NemotronHConfig(**base), mods


def _to_hf_moe(hf_cfg, m: MoE):
    hf = NemotronHMoE(hf_cfg).eval()
    t = lambda v: torch.from_numpy(np.array(v[...]))  # noqa: E731
    with torch.no_grad():
        hf.gate.weight.copy_(t(m.gate_weight))
        hf.gate.e_score_correction_bias.copy_(t(m.e_score_correction_bias))
        hf.experts.up_proj.copy_(t(m.experts_up))
        hf.experts.down_proj.copy_(t(m.experts_down))
        hf.shared_experts.up_proj.weight.copy_(t(m.shared_experts.up_proj))
        hf.shared_experts.down_proj.weight.copy_(t(m.shared_experts.down_proj))
    return hf


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_moe_block_ragged_dense_and_transformers(case, np_rng):
    hf_cfg, mods = _moe_pair(MOE_CASES[case], seed=3)
    x = np_rng.standard_normal((2, 11, H_ROUTER)).astype(np.float32)

    def run(m):
        gd, st = nnx.split(m)
        return np.asarray(jax.jit(lambda st, x: nnx.merge(gd, st)(x))(st, x))

    ragged, dense = run(mods["ragged"]), run(mods["dense"])
    dense_params = dict(nnx.to_flat_state(nnx.state(mods["dense"])))
    for p, v in nnx.to_flat_state(nnx.state(mods["ragged"])):  # same parameters in both
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(dense_params[p].get_value()))
    with torch.no_grad():
        want = _to_hf_moe(hf_cfg, mods["ragged"])(torch.from_numpy(x)).numpy()
    scale = np.abs(want).max()
    assert scale > 0.5
    np.testing.assert_allclose(ragged, want, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(dense, want, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(ragged, dense, rtol=0, atol=1e-5 * scale)
