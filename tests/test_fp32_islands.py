"""The fp32 islands the README promises under ``compute_dtype="bfloat16"``, each pinned exactly
against a reference written here with the casts spelled out: the RMSNorm statistics, the gated
group norm, the SSD scan and state, the Mamba dt path, the MoE router, and the attention softmax.

Each test also checks that its input is sensitive: the same computation with the island done in
bf16 gives a different result, so a regression that drops the island fails the test.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

import star_elastic_jax as sej
from star_elastic_jax.kernels.ssd import ssd
from star_elastic_jax.model.attention import causal_attention
from star_elastic_jax.model.moe import route
from star_elastic_jax.model.norms import RMSNorm, gated_group_rms_norm

from hf_fixtures import random_model

BF = jnp.bfloat16
F32 = jnp.float32


def _bf16(rng, shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, F32).astype(BF)


def test_rmsnorm_statistics_are_fp32(np_rng):
    x = _bf16(np_rng, (4, 33, 96), scale=30.0)
    norm = RMSNorm(96, 1e-5)
    norm.weight[...] = jnp.asarray(1.0 + 0.3 * np_rng.standard_normal(96), F32)
    w = norm.weight[...]
    xf = x.astype(F32)
    want = (w * (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-5))).astype(BF)
    got = norm(x)
    assert got.dtype == BF
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    in_bf16 = (w.astype(BF) * (x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + BF(1e-5)))).astype(BF)
    assert not np.array_equal(np.asarray(in_bf16, np.float32), np.asarray(want, np.float32))


def test_gated_group_norm_is_fp32(np_rng):
    y = jnp.asarray(np_rng.standard_normal((2, 17, 64)), F32)
    z = _bf16(np_rng, (2, 17, 64), 3.0)
    w = jnp.asarray(1.0 + 0.2 * np_rng.standard_normal(64), F32)
    g = y * jax.nn.silu(z.astype(F32))
    g4 = g.reshape(2, 17, 4, 16)
    want = w * (g4 * jax.lax.rsqrt(jnp.mean(g4 * g4, -1, keepdims=True) + 1e-5)).reshape(2, 17, 64)
    got = gated_group_rms_norm(y, z, w, 4, 1e-5)
    assert got.dtype == F32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_ssd_scan_and_state_are_fp32(np_rng):
    b, L, h, p, g, n = 2, 21, 4, 8, 2, 8
    x = _bf16(np_rng, (b, L, h, p))
    B, C = _bf16(np_rng, (b, L, g, n)), _bf16(np_rng, (b, L, g, n))
    dt = jnp.asarray(np_rng.uniform(0.01, 0.2, (b, L, h)), F32)
    A = -jnp.asarray(np_rng.uniform(0.5, 2.0, h), F32)
    D = jnp.ones((h,), F32)
    y, state = ssd(x, dt, A, B, C, D, chunk_size=8)
    y32, state32 = ssd(x.astype(F32), dt, A, B.astype(F32), C.astype(F32), D, chunk_size=8)
    assert y.dtype == F32 and state.dtype == F32
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y32))
    np.testing.assert_array_equal(np.asarray(state), np.asarray(state32))


def test_mamba_dt_path_is_fp32(np_rng, monkeypatch):
    """The mixer hands the scan an fp32 ``dt = max(softplus(dt_raw + dt_bias), clamp)`` computed
    from the bf16 projection upcast, and fp32 ``A``."""
    import star_elastic_jax.model.mamba2 as mamba2

    cfg = sej.ModelConfig.preset("tiny").with_updates(compute_dtype="bfloat16")
    model = random_model(cfg, seed=2)
    mixer = model.layers[0].mixer
    seen = {}
    real = mamba2.ssd

    def spy(x, dt, A, *a, **kw):
        seen.update(dt=dt, A=A)
        return real(x, dt, A, *a, **kw)

    monkeypatch.setattr(mamba2, "ssd", spy)
    u = _bf16(np_rng, (2, 12, cfg.hidden_size))
    mixer(u)
    dt_raw = jnp.einsum("bli,oi->blo", u, mixer.in_proj_dt[...].astype(BF))
    want = jnp.maximum(jax.nn.softplus(dt_raw.astype(F32) + mixer.dt_bias[...].astype(F32)),
                       cfg.effective_dt_clamp_min)
    assert seen["dt"].dtype == F32 and seen["A"].dtype == F32
    np.testing.assert_array_equal(np.asarray(seen["dt"]), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(seen["A"]), np.asarray(-jnp.exp(mixer.A_log[...].astype(F32))))


def test_router_is_fp32(np_rng):
    cfg = sej.ModelConfig.preset("tiny")
    x = _bf16(np_rng, (40, cfg.hidden_size), 2.0)
    gate = jnp.asarray(np_rng.standard_normal((cfg.n_routed_experts, cfg.hidden_size)) * 0.3, F32).astype(BF)
    bias = jnp.asarray(np_rng.standard_normal(cfg.n_routed_experts) * 0.01, F32)
    idx, w = route(x, gate, bias, cfg)
    scores = jax.nn.sigmoid(x.astype(F32) @ gate.astype(F32).T)
    want_idx = jax.lax.top_k(scores + bias, cfg.num_experts_per_tok)[1]
    want_w = jnp.take_along_axis(scores, want_idx, 1)
    want_w = want_w / (want_w.sum(-1, keepdims=True) + 1e-20) * cfg.routed_scaling_factor
    assert w.dtype == F32
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))
    np.testing.assert_array_equal(np.asarray(w), np.asarray(want_w))


def test_attention_softmax_is_fp32(np_rng):
    b, L, kv, rep, d = 2, 19, 2, 2, 16
    q, k, v = (_bf16(np_rng, s, 2.0) for s in ((b, L, kv, rep, d), (b, L, kv, d), (b, L, kv, d)))
    s = jnp.einsum("bqkrd,bskd->bkrqs", q, k, preferred_element_type=F32) / math.sqrt(d)
    s = jnp.where(jnp.tril(jnp.ones((L, L), bool)), s, -jnp.inf)
    want = jnp.einsum("bkrqs,bskd->bqkrd", jax.nn.softmax(s, axis=-1).astype(BF), v)
    got = causal_attention(q, k, v)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    s16 = jnp.where(jnp.tril(jnp.ones((L, L), bool)), jnp.einsum("bqkrd,bskd->bkrqs", q, k) / BF(math.sqrt(d)),
                    -jnp.inf)
    in_bf16 = jnp.einsum("bkrqs,bskd->bqkrd", jax.nn.softmax(s16, axis=-1), v)
    assert not np.array_equal(np.asarray(in_bf16, np.float32), np.asarray(want, np.float32))
