"""Losses (SPEC 3.7): KD and CE against numpy, the differentiable expected-parameter counter
against the exact integer counter and a hand formula, the router budget loss against a numpy
re-computation, and router-loss-only gradient descent reaching every budget."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import star_elastic_jax as sej
from star_elastic_jax.elastic.budget import choice_param_count, expected_active_params, expected_param_count
from star_elastic_jax.elastic.router import BudgetRouter, RouterConfig, router_key
from star_elastic_jax.errors import ChoiceError
from star_elastic_jax.train.losses import ce_loss, kd_loss, kd_per_token, router_loss

CFG = sej.ModelConfig.preset("tiny")  # M*ME-M
LISTS = {"hidden": (64, 48, 32), "mamba_heads": (8, 6, 4), "experts": (4, 3, 2), "expert_ffn": (32, 24, 16),
         "mlp_ffn": (128, 96, 64)}
BUDGETS = (1.0, 0.7, 0.5)


# ---------------------------------------------------------------------------------------------- numpy refs
def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_kd(student, teacher, mask, T=1.0):
    ls, lt = np_log_softmax(student / T), np_log_softmax(teacher / T)
    kl = (np.exp(lt) * (lt - ls)).sum(-1) * T * T
    return (kl * mask).sum() / mask.sum()


def tiny_active(H, mh, E, F, I):
    """Active parameters of the tiny config (SPEC 1.8's formulas by hand); ``mh`` per Mamba block."""
    V, P, G, N, K, nq, nkv, hd, k, S = 256, 16, 2, 16, 4, 4, 2, 16, 2, 48
    mh = np.broadcast_to(np.asarray(mh, np.float64), (3,))

    def mamba(m):
        d = m * P
        return H * (2 * d + 2 * G * N + m) + (d + 2 * G * N) * (K + 1) + 3 * m + d + d * H + H
    attn = 2 * H * nq * hd + 2 * H * nkv * hd + H
    moe = 2 * k * F * H + 2 * S * H + E * H + H
    mlp = 2 * I * H + H
    return 2 * V * H + H + sum(mamba(m) for m in mh) + attn + moe + mlp


FULL_ACTIVE = 167_368


def test_hand_formula_is_the_config_count():
    assert tiny_active(64, 8, 4, 32, 128) == FULL_ACTIVE == CFG.param_count().active


# ---------------------------------------------------------------------------------------------- KD / CE
def test_kd_loss_matches_numpy(np_rng):
    s, t = np_rng.normal(size=(2, 5, 37)) * 3, np_rng.normal(size=(2, 5, 37)) * 3
    mask = (np_rng.random((2, 5)) < 0.7).astype(np.float32)
    mask[0, 0] = 1
    for T in (1.0, 2.0, 0.5):
        got = float(kd_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(mask), T))
        assert got == pytest.approx(np_kd(s, t, mask, T), rel=1e-4, abs=1e-6)
    # T scaling: T^2 x the KL of the tempered distributions
    kl2 = np_kd(s / 2.0, t / 2.0, mask, 1.0)
    assert float(kd_loss(s, t, mask, 2.0)) == pytest.approx(4.0 * kl2, rel=1e-4)


def test_kd_loss_zero_for_identical_logits_and_bf16_input(np_rng):
    x = jnp.asarray(np_rng.normal(size=(3, 4, 50)) * 5, jnp.bfloat16)
    assert float(kd_loss(x, x, jnp.ones((3, 4)))) == pytest.approx(0.0, abs=1e-6)
    assert kd_per_token(x, x).dtype == jnp.float32


def test_kd_masked_tokens_ignored_and_teacher_frozen(np_rng):
    s, t = np_rng.normal(size=(2, 6, 11)), np_rng.normal(size=(2, 6, 11))
    mask = np.ones((2, 6), np.float32)
    mask[1, 3:] = 0
    base = float(kd_loss(s, t, mask))
    s2, t2 = s.copy(), t.copy()
    s2[1, 3:] += 100 * np_rng.normal(size=(3, 11))
    t2[1, 4] = -50
    assert float(kd_loss(s2, t2, mask)) == pytest.approx(base, rel=1e-6)
    gs, gt = jax.grad(lambda a, b: kd_loss(a, b, mask), argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
    assert float(jnp.abs(gt).max()) == 0.0 and float(jnp.abs(gs[1, 3:]).max()) == 0.0
    assert float(jnp.abs(gs[0]).max()) > 0
    # the gradient of mean KL w.r.t. student logits is (p_s - p_t) / n_tokens
    n = mask.sum()
    want = (np.exp(np_log_softmax(s)) - np.exp(np_log_softmax(t))) * mask[..., None] / n
    np.testing.assert_allclose(np.asarray(gs), want, atol=1e-6)
    # a -inf teacher logit (e.g. padded vocab) contributes 0, not NaN
    t3 = t.copy()
    t3[..., -1] = -np.inf
    assert np.isfinite(float(kd_loss(s, t3, mask)))


def test_ce_loss_matches_numpy(np_rng):
    logits = np_rng.normal(size=(2, 7, 19)) * 2
    targets = np_rng.integers(0, 19, size=(2, 7))
    mask = np.ones((2, 7), np.float32)
    mask[0, 5:] = 0
    targets[0, 6] = -1  # padding under the mask is clipped, not an error
    lp = np_log_softmax(logits)
    nll = -np.take_along_axis(lp, np.clip(targets, 0, 18)[..., None], -1)[..., 0]
    want = (nll * mask).sum() / mask.sum()
    assert float(ce_loss(jnp.asarray(logits, jnp.float32), targets, mask)) == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------------------------- expected params
def test_expected_active_params_equals_exact_counter_for_integer_sizes():
    rng = np.random.default_rng(0)
    for _ in range(6):
        c = {a: int(rng.choice(v)) for a, v in LISTS.items()}
        exact = choice_param_count(CFG, sej.ElasticChoice(**c))
        got = expected_param_count(CFG, {a: jnp.float32(v) for a, v in c.items()})
        assert float(got.active) == pytest.approx(exact.active, rel=1e-6)
        assert float(got.total) == pytest.approx(exact.total, rel=1e-6)
    # heterogeneous Mamba heads (one value per M block)
    het = sej.ElasticChoice(hidden=48, mamba_heads=(8, 4, 6), expert_ffn=16)
    got = expected_active_params(CFG, {"hidden": 48.0, "mamba_heads": jnp.array([8.0, 4.0, 6.0]),
                                       "expert_ffn": 16.0})
    assert float(got) == pytest.approx(choice_param_count(CFG, het).active, rel=1e-6)
    assert expected_active_params(CFG, {}) == FULL_ACTIVE  # nothing given: the full model


def test_expected_active_params_is_differentiable():
    def f(x):
        return expected_active_params(CFG, {"hidden": x[0], "mamba_heads": x[1:4], "experts": x[4],
                                            "expert_ffn": x[5], "mlp_ffn": x[6]})
    x = jnp.array([50.0, 7.0, 5.5, 4.0, 3.2, 20.0, 100.0])
    assert float(jax.jit(f)(x)) == pytest.approx(tiny_active(50.0, [7.0, 5.5, 4.0], 3.2, 20.0, 100.0), rel=1e-6)
    g = np.asarray(jax.grad(f)(x))
    eps = np.eye(7) * 1e-2
    fd = [(tiny_active(*_unpack(np.asarray(x) + e)) - tiny_active(*_unpack(np.asarray(x) - e))) / 2e-2 for e in eps]
    np.testing.assert_allclose(g, fd, rtol=1e-3)
    assert np.all(g > 0)
    with pytest.raises(ChoiceError):
        expected_active_params(CFG, {"mamba_heads": jnp.ones(2)})  # 3 Mamba blocks
    with pytest.raises(ChoiceError):
        expected_active_params(CFG, {"depth": 3.0})


def _unpack(x):
    return x[0], x[1:4], x[4], x[5], x[6]


# ---------------------------------------------------------------------------------------------- router loss
def rcfg(**kw):
    return RouterConfig(budgets=BUDGETS, choice_lists=LISTS, **kw)


def np_router_loss(probs, b, dead_zone=0.05, identity_weight=10.0, hetero=()):
    d = {a: np.asarray(p, np.float64) @ np.asarray(LISTS[a], np.float64) for a, p in probs.items()}
    frac = tiny_active(d["hidden"], d["mamba_heads"], d["experts"], d["expert_ffn"], d["mlp_ffn"]) / FULL_ACTIVE
    diff = abs(frac / b - 1)
    if b != 1 and diff < dead_zone:
        diff = 0.0
    if b == 1:
        diff += identity_weight * sum(np.mean((np.asarray(p) - np.eye(3)[0]) ** 2) for p in probs.values())
    return diff, frac, d


def random_probs(rng, hetero=()):
    out = {}
    for a in LISTS:
        shape = (3, 3) if a in hetero else (3,)
        x = rng.random(shape) + 0.05
        out[a] = x / x.sum(-1, keepdims=True)
    return out


@pytest.mark.parametrize("b", [1.0, 0.7, 0.5])
@pytest.mark.parametrize("hetero", [(), ("mamba_heads",)])
def test_router_loss_matches_numpy(b, hetero, np_rng):
    probs = random_probs(np_rng, hetero)
    want, frac, d = np_router_loss(probs, b)
    loss, m = router_loss(CFG, rcfg(heterogeneous_axes=hetero), {a: jnp.asarray(p, jnp.float32)
                                                                   for a, p in probs.items()}, b)
    assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert float(m["router/active_frac"]) == pytest.approx(frac, rel=1e-5)
    for a in LISTS:
        np.testing.assert_allclose(np.asarray(m[f"router/size/{a}"]), d[a], rtol=1e-5)
    # router_loss_weight scales the loss, not the logged diff
    loss2, m2 = router_loss(CFG, rcfg(heterogeneous_axes=hetero, router_loss_weight=0.25),
                            {a: jnp.asarray(p) for a, p in probs.items()}, b)
    assert float(loss2) == pytest.approx(0.25 * want, rel=1e-5, abs=1e-7)
    assert float(m2["router/diff"]) == pytest.approx(want, rel=1e-5, abs=1e-7)


def onehot_probs(**idx):
    return {a: jnp.eye(3)[idx.get(a, 0)] for a in LISTS}


def test_router_loss_dead_zone():
    rc = rcfg()
    # (64, 4, 4, 24, 64): 0.7069 of the full active count -> |0.7069/0.7 - 1| = 0.0098 < 0.05
    inside = onehot_probs(mamba_heads=2, expert_ffn=1, mlp_ffn=2)
    frac = tiny_active(64, 4, 4, 24, 64) / FULL_ACTIVE
    assert abs(frac / 0.7 - 1) < 0.05
    loss, m = router_loss(CFG, rc, inside, 0.7)
    assert float(loss) == 0.0 and float(m["router/active_frac"]) == pytest.approx(frac, rel=1e-6)
    # outside: the full model at b = 0.7 is 1/0.7 - 1 = 0.4286 off
    loss, _ = router_loss(CFG, rc, onehot_probs(), 0.7)
    assert float(loss) == pytest.approx(1 / 0.7 - 1, rel=1e-6)
    # b = 0.5 with the 0.7069 sub-model: 0.414 off, no dead zone
    loss, _ = router_loss(CFG, rc, inside, 0.5)
    assert float(loss) == pytest.approx(frac / 0.5 - 1, rel=1e-5)
    # a wider dead zone swallows it
    assert float(router_loss(CFG, rcfg(dead_zone=0.5), inside, 0.5)[0]) == 0.0


def test_router_loss_identity_regulariser_at_full_budget():
    rc = rcfg()
    assert float(router_loss(CFG, rc, onehot_probs(), 1.0)[0]) == 0.0  # the parent: no loss
    # a sub-model within 5% of the full count is *not* in a dead zone at b = 1, and pays the MSE
    near = onehot_probs(experts=1)  # 3 of 4 experts: -192 active params (router rows only)
    frac = tiny_active(64, 8, 3, 32, 128) / FULL_ACTIVE
    mse = np.mean((np.eye(3)[1] - np.eye(3)[0]) ** 2)
    loss, m = router_loss(CFG, rc, near, 1.0)
    assert float(loss) == pytest.approx(abs(frac - 1) + 10 * mse, rel=1e-5)
    assert float(m["router/identity_mse"]) == pytest.approx(mse, rel=1e-6)
    # the same probs at b = 0.999 are inside the dead zone (and no regulariser)
    assert float(router_loss(CFG, rc, near, 0.999)[0]) == 0.0


def test_router_loss_traced_budget_and_gradient():
    rc = rcfg()
    probs = random_probs(np.random.default_rng(1))
    budgets = jnp.asarray(BUDGETS)

    @jax.jit
    def f(p, i):
        return router_loss(CFG, rc, p, budgets[i])[0]
    for i, b in enumerate(BUDGETS):
        assert float(f(probs, i)) == pytest.approx(np_router_loss(probs, b)[0], rel=1e-5)
    g = jax.grad(f)(probs, 2)
    assert all(float(jnp.abs(x).max()) > 0 for x in g.values())
    with pytest.raises(ChoiceError):
        router_loss(CFG, rc, {"hidden": probs["hidden"]}, 0.7)


# ---------------------------------------------------------------------------------------------- descent
# XLA CPU compile dominates; LLVM optimisations are irrelevant here.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def test_router_loss_descent_reaches_every_budget():
    """Adam on the router loss alone (all budgets every step, Gumbel noise, the tau/scaler schedules
    compressed 10x: tau 0.997^t over 1000 steps) drives each budget's argmax sub-model within the
    5% dead zone of its target active fraction.

    Not every seed converges: the loss alone is a combinatorial problem and a saturated softmax can
    lock a budget onto a sub-model ~10% off (about 2 seeds in 10 here); the KD gradient and the
    full-length schedules of a real run are not part of this check.
    """
    rc = rcfg(tau_decay=0.997)
    T = 1000
    router = BudgetRouter(CFG, rc, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(router, nnx.Param)
    tx = optax.adam(3e-3)
    budgets = jnp.asarray(rc.budgets)
    base = jax.random.key(0)

    def loss_fn(state, t):
        r = nnx.merge(graphdef, state)

        def one(i):
            p = r.probs(r.index_vector(i), step=t, key=router_key(base, t, i), total_steps=T)
            return router_loss(CFG, rc, p, budgets[i])[0]
        return jax.vmap(one)(jnp.arange(len(rc.budgets))).sum()

    def step(state, opt, t):
        loss, g = jax.value_and_grad(loss_fn)(state, t)
        upd, opt = tx.update(g, opt, state)
        return optax.apply_updates(state, upd), opt, loss

    opt = tx.init(state)
    step = jax.jit(step).lower(state, opt, 0).compile(compiler_options=FAST_COMPILE)
    for t in range(T):
        state, opt, _ = step(state, opt, t)
    router = nnx.merge(graphdef, state)
    full = CFG.param_count().active
    rows = []
    for b in rc.budgets:
        c = router.choice(b)
        frac = choice_param_count(CFG, c).active / full
        rows.append((b, c, frac))
    print("\nbudget  hidden mamba experts e_ffn mlp_ffn  active_frac  rel_err")
    for b, c, frac in rows:
        print(f"{b:6.3f}  {c.hidden:6d} {c.mamba_heads:5d} {c.experts:7d} {c.expert_ffn:5d} {c.mlp_ffn:7d}"
              f"  {frac:11.4f}  {frac / b - 1:+.4f}")
    assert rows[0][1] == sej.ElasticChoice(**{a: v[0] for a, v in LISTS.items()})  # b = 1 -> the parent
    for b, _, frac in rows:
        assert abs(frac / b - 1) <= 0.05, (b, frac)


def test_descent_reference_table_is_reachable():
    """Sanity of the check above: every budget has sub-models inside its dead zone."""
    fr = [choice_param_count(CFG, sej.ElasticChoice(**dict(zip(LISTS, c)))).active / FULL_ACTIVE
          for c in itertools.product(*LISTS.values())]
    for b in BUDGETS:
        assert any(abs(f / b - 1) <= 0.05 for f in fr)
