"""The budget router (SPEC 3.6): shapes, init, schedules, budget input, sampling modes, argmax
choices, and gradient flow through the masked forward. References are closed-form formulas and
numpy, independent of the implementation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import star_elastic_jax as sej
from star_elastic_jax.elastic.masks import masks_from_choice
from star_elastic_jax.elastic.router import (BudgetRouter, RouterConfig, budget_vector, router_key,
                                             sample_budget_index, scaler, tau)
from star_elastic_jax.errors import ChoiceError
from star_elastic_jax.train.losses import kd_loss

CFG = sej.ModelConfig.preset("tiny")  # M*ME-M: 3 Mamba, 1 attention, 1 MoE, 1 MLP block
LISTS = {"hidden": (64, 48, 32), "mamba_heads": (8, 6, 4), "experts": (4, 3, 2), "expert_ffn": (32, 24, 16),
         "mlp_ffn": (128, 96, 64)}
BUDGETS = (1.0, 0.7, 0.5)


def make(seed=0, **kw):
    kw.setdefault("budgets", BUDGETS)
    kw.setdefault("choice_lists", LISTS)
    rc = RouterConfig(**kw)
    return BudgetRouter(CFG, rc, rngs=nnx.Rngs(seed))


def params_of(router):
    return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(router, nnx.Param))}


def test_shapes_param_count_and_logical_names():
    r = make(heterogeneous_axes=("mamba_heads",))
    logits = r.logits(r.budget_vector(1.0))
    assert {a: z.shape for a, z in logits.items()} == {
        "hidden": (3,), "mamba_heads": (3, 3), "experts": (3,), "expert_ffn": (3,), "mlp_ffn": (3,)}
    n_out = {"hidden": 3, "mamba_heads": 9, "experts": 3, "expert_ffn": 3, "mlp_ffn": 3}
    expected = sum(3 * 256 + 256 * k for k in n_out.values())  # no biases
    params = params_of(r)
    assert sum(v.get_value().size for v in params.values()) == expected
    assert params["routers/mamba_heads/w_out"].get_value().shape == (9, 256)
    for name, v in params.items():
        names = v.get_metadata().get("out_sharding")
        assert names is not None and len(names) == v.get_value().ndim, name
        assert v.get_value().dtype == jnp.float32


def test_init_std():
    r = make(seed=3)
    flat = np.concatenate([np.asarray(v.get_value()).ravel() for v in params_of(r).values()])
    assert abs(flat.mean()) < 0.01 and abs(flat.std() - 0.1) < 0.005


def test_schedules_closed_form():
    rc = RouterConfig(budgets=BUDGETS, choice_lists=LISTS)
    for step in (0, 1, 100, 5000, 9000):
        assert float(tau(rc, step)) == pytest.approx(max(0.9997 ** step, 0.05), rel=1e-5)
    assert float(tau(rc, 20000)) == pytest.approx(0.05)  # floored (0.9997^20000 = 0.0025)
    total = 1000
    for step, want in ((0, 1.0), (250, 3.25), (500, 5.5), (1000, 10.0), (5000, 10.0)):
        assert float(scaler(rc, step, total)) == pytest.approx(want, rel=1e-6)
    # traceable with a traced step
    f = jax.jit(lambda s: (tau(rc, s), scaler(rc, s, total)))
    t, s = f(jnp.int32(300))
    assert float(t) == pytest.approx(0.9997 ** 300, rel=1e-5) and float(s) == pytest.approx(1 + 9 * 0.3, rel=1e-6)


def test_budget_vector_interpolation():
    np.testing.assert_array_equal(budget_vector(BUDGETS, 1.0), [1, 0, 0])
    np.testing.assert_array_equal(budget_vector(BUDGETS, 0.7), [0, 1, 0])
    np.testing.assert_array_equal(budget_vector(BUDGETS, 0.5), [0, 0, 1])
    np.testing.assert_allclose(budget_vector(BUDGETS, 0.6), [0, 0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(budget_vector(BUDGETS, 0.85), [0.5, 0.5, 0], atol=1e-6)
    np.testing.assert_allclose(budget_vector(BUDGETS, 0.64), [0, 0.7, 0.3], atol=1e-6)
    np.testing.assert_array_equal(budget_vector((0.9, 0.5), 1.0), [1, 0])  # above the largest -> largest
    with pytest.raises(ChoiceError, match="smallest trained budget"):
        budget_vector(BUDGETS, 0.4)
    with pytest.raises(ChoiceError):
        budget_vector(BUDGETS, 1.5)
    r = make()
    np.testing.assert_array_equal(r.index_vector(1), [0, 1, 0])


@pytest.mark.parametrize("budgets", [(), (0.5, 0.7), (1.0, 1.0), (1.2, 0.5), (1.0, 0.0), (1.0, True)])
def test_config_rejects_bad_budgets(budgets):
    with pytest.raises(ChoiceError) as e:
        RouterConfig(budgets=budgets, choice_lists=LISTS)
    assert e.value.field == "budgets"


def test_config_rejects_bad_lists_and_options():
    with pytest.raises(ChoiceError, match="descending"):
        RouterConfig(budgets=BUDGETS, choice_lists={"hidden": (32, 64)})
    with pytest.raises(ChoiceError, match="depth"):
        RouterConfig(budgets=BUDGETS, choice_lists={"depth": (6, 5)})
    with pytest.raises(ChoiceError, match="mode"):
        RouterConfig(budgets=BUDGETS, choice_lists=LISTS, mode="hard")
    with pytest.raises(ChoiceError, match="heterogeneous"):
        RouterConfig(budgets=BUDGETS, choice_lists=LISTS, heterogeneous_axes=("hidden",))
    with pytest.raises(ChoiceError, match="multiple of n_groups"):  # validated against the model
        BudgetRouter(CFG, RouterConfig(budgets=BUDGETS, choice_lists={"mamba_heads": (8, 5)}), rngs=nnx.Rngs(0))
    with pytest.raises(ChoiceError, match="full size"):
        BudgetRouter(CFG, RouterConfig(budgets=BUDGETS, choice_lists={"hidden": (48, 32)}), rngs=nnx.Rngs(0))
    rc = RouterConfig(budgets=[1.0, 0.5], choice_lists=LISTS)  # lists/mappings normalised, hashable
    assert isinstance(rc.budgets, tuple) and hash(rc) == hash(RouterConfig(budgets=(1.0, 0.5), choice_lists=LISTS))


def without_limits(masks):
    """The mask arrays of ``masks_from_choice`` without the int limits it adds for the kernels
    (router masks have none)."""
    return masks.without_limits()


@pytest.mark.parametrize("hetero", [(), ("mamba_heads", "expert_ffn")])
def test_eval_argmax_choice_resolves_and_matches_masks(hetero):
    r = make(seed=1, heterogeneous_axes=hetero)
    for b in (1.0, 0.85, 0.7, 0.6, 0.5):
        choice = r.choice(b)
        assert isinstance(choice, sej.ElasticChoice)
        choice.resolve(CFG)  # a valid sub-model
        u = r.budget_vector(b)
        logits = r.logits(u)
        probs = r.probs(u, train=False)
        for axis, p in probs.items():
            z = np.asarray(logits[axis])
            np.testing.assert_array_equal(np.asarray(p), np.eye(z.shape[-1])[z.argmax(-1)])
            want = [LISTS[axis][i] for i in np.atleast_1d(z.argmax(-1))]
            got = getattr(choice, axis)
            assert (tuple(want) if axis in hetero else want[0]) == got
        # eval masks == the hard masks of the chosen sub-model
        jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-6), r.masks(probs),
                     without_limits(masks_from_choice(CFG, choice)))


def test_hard_st_is_one_hot_with_the_soft_gradient():
    soft, hard = make(seed=2), make(seed=2, mode="hard_st")
    u, key = soft.budget_vector(0.7), jax.random.key(5)
    w = {a: jax.random.normal(jax.random.key(i), z.shape) for i, (a, z) in enumerate(soft.logits(u).items())}

    def grad_of(router):
        graphdef, state = nnx.split(router, nnx.Param)

        def f(state):
            probs = nnx.merge(graphdef, state).probs(u, step=10, key=key, total_steps=100)
            return sum(jnp.sum(w[a] * p) for a, p in probs.items()), probs
        return jax.grad(f, has_aux=True)(state)

    g_soft, p_soft = grad_of(soft)
    g_hard, p_hard = grad_of(hard)
    for a, p in p_hard.items():
        p = np.asarray(p)
        np.testing.assert_allclose(p, np.eye(p.shape[-1])[np.asarray(p_soft[a]).argmax(-1)], atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_soft, g_hard)
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g_soft))


def test_soft_probs_formula_and_hard_sample_prob():
    r = make(seed=4)
    u, step, total, key = r.budget_vector(0.5), 1234, 4000, jax.random.key(9)
    probs = r.probs(u, step=step, key=key, total_steps=total)
    logits = r.logits(u)
    keys = jax.random.split(key, len(logits) + 1)
    s, t = 1 + 9 * step / total, max(0.9997 ** step, 0.05)
    for (a, z), k in zip(logits.items(), keys[:-1]):
        g = np.asarray(jax.random.gumbel(k, z.shape))
        x = (s * np.asarray(z, np.float64) + g) / t
        want = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
        np.testing.assert_allclose(np.asarray(probs[a]), want, rtol=1e-4, atol=1e-6)
        assert np.asarray(probs[a]).max() < 1 - 1e-3  # soft
    always = make(seed=4, hard_sample_prob=1.0).probs(u, step=step, key=key, total_steps=total)
    for a, p in always.items():
        p = np.asarray(p)
        np.testing.assert_allclose(p, np.eye(p.shape[-1])[np.asarray(probs[a]).argmax(-1)], atol=1e-6)


def test_noise_is_deterministic_per_step_and_microbatch():
    r = make(seed=0)
    u, base = r.budget_vector(0.7), jax.random.key(42)

    def draw(step, mb):
        return r.probs(u, step=step, key=router_key(base, step, mb), total_steps=100)

    same = [draw(7, 1), draw(7, 1)]
    jax.tree.map(np.testing.assert_array_equal, *same)
    for other in (draw(7, 2), draw(8, 1)):
        assert not np.allclose(np.asarray(other["hidden"]), np.asarray(same[0]["hidden"]))
    # traced step / micro-batch give the same key (what a jitted step on every DP rank computes)
    k = jax.jit(router_key)(base, jnp.int32(7), jnp.int32(1))
    np.testing.assert_array_equal(jax.random.key_data(k), jax.random.key_data(router_key(base, 7, 1)))
    idx = [int(sample_budget_index(router_key(base, s, 0), None, 3)) for s in range(60)]
    assert set(idx) == {0, 1, 2}
    assert int(sample_budget_index(router_key(base, 3, 0), (0.0, 1.0, 0.0), 3)) == 1


# XLA CPU compile of a model forward+backward is the slow part of these tests; its LLVM
# optimisations are irrelevant for a correctness check.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def test_gradient_flows_from_masked_model_to_router():
    """A KD loss on the soft-masked model's logits reaches every axis' router parameters.

    A 3-block model (Mamba, MoE, MLP: every routed axis; attention is not routed) built inside one
    jit: eager init/forward compiles op by op and costs ~15 s on CPU."""
    cfg = sej.ModelConfig.preset("tiny", hybrid_override_pattern="ME-")
    router = BudgetRouter(cfg, RouterConfig(budgets=BUDGETS, choice_lists=LISTS, heterogeneous_axes=("mamba_heads",)),
                          rngs=nnx.Rngs(0))
    r_graph, r_state = nnx.split(router, nnx.Param)
    u = router.budget_vector(0.7)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)))

    def value_and_grad(r_state):
        model = sej.NemotronH(cfg, rngs=nnx.Rngs(0))
        moe = model.layers[1].mixer
        # Spread the MoE router's sigmoid scores: at init they are all ~0.5, so a soft-masked expert
        # (score x mask < 1) never makes the top-k and the experts axis would get no gradient.
        moe.gate_weight.set_value(jax.random.normal(jax.random.key(3), moe.gate_weight.get_value().shape))
        teacher = model(tokens)

        def loss(r_state):
            r = nnx.merge(r_graph, r_state)
            probs = r.probs(u, step=0, key=jax.random.key(1), total_steps=100)
            return kd_loss(model(tokens, elastic=r.masks(probs)), teacher, jnp.ones(tokens.shape))
        return jax.value_and_grad(loss)(r_state)

    value, grads = jax.jit(value_and_grad).lower(r_state).compile(compiler_options=FAST_COMPILE)(r_state)
    assert math.isfinite(float(value)) and float(value) > 0
    for path, g in nnx.to_flat_state(grads):
        assert bool(jnp.all(jnp.isfinite(g.get_value()))), path
        assert float(jnp.abs(g.get_value()).max()) > 1e-9, path
