"""The kernel dispatch points wired through the model and the train step: with ``ssd_impl`` /
``moe_impl`` = "pallas" (interpret mode on CPU) the model computes what the pure-JAX reference
computes -- full model, packed documents, a hard elastic choice (whose masks carry the int limits the
kernels skip work with) and the gradients -- and the ``kernels`` config section selects them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from elastic_fixtures import random_model, tokens_and_segments
from flax import nnx

import star_elastic_jax as sej
from star_elastic_jax.config import MOE_IMPLS, SSD_IMPLS
from star_elastic_jax.elastic.masks import masks_from_choice
from star_elastic_jax.errors import ConfigError
from star_elastic_jax.kernels.ssd import dispatch as ssd_dispatch
from star_elastic_jax.kernels.ssd.reference import ssd_reference
from star_elastic_jax.model.model import model_from_params

# fp32 everywhere; the kernels and the reference sum in different orders (Pallas: per-chunk tiles and
# differences of cumulative log-decays; reference: direct segment sums), ~1e-6 relative per layer.
RTOL = 2e-5

CFG = sej.ModelConfig.preset("tiny", n_groups=2, hybrid_override_pattern="ME*M")
CHOICE = sej.ElasticChoice(hidden=48, mamba_heads=4, experts=3, expert_ffn=16)


def _with(model, **impls):
    return model_from_params(model.cfg.with_updates(**impls), {tuple(p): v.get_value() for p, v in
                                                               nnx.to_flat_state(nnx.state(model))})


def _logits(model, tokens, seg, elastic=None):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, t, g, e: nnx.merge(graphdef, s)(t, segment_ids=g, elastic=e))(state, tokens, seg,
                                                                                            elastic)


@pytest.fixture(scope="module")
def models():
    ref = random_model(CFG.with_updates(ssd_impl="reference", moe_impl="dense"), seed=3)
    return ref, _with(ref, ssd_impl="pallas", moe_impl="pallas")


def _close(a, b, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(np.abs(b).max(), 1e-30))


def test_choice_masks_carry_limits():
    masks = masks_from_choice(CFG, CHOICE)
    layers = masks.layers
    assert layers[0].mixer.head_limit == 4 // CFG.n_groups
    assert layers[1].mixer.hidden_limit == 48 and layers[1].mixer.ffn_limit == 16
    # the limits agree with the 0/1 masks they summarise
    head_mask = np.asarray(layers[0].mixer.mask).reshape(CFG.n_groups, -1, CFG.mamba_head_dim)[..., 0]
    assert (head_mask.sum(axis=1) == layers[0].mixer.head_limit).all()
    assert np.asarray(layers[1].mixer.ffn).sum() == 16 and np.asarray(masks.hidden.mask).sum() == 48


def test_pallas_model_equals_reference(models):
    ref, pal = models
    tokens, seg = tokens_and_segments(CFG, batch=2, length=21)
    _close(_logits(pal, tokens, seg), _logits(ref, tokens, seg))


def test_pallas_elastic_choice_equals_reference(models):
    """A hard choice: the Pallas path gets the int limits (traced, as jit arguments) and skips the
    inactive heads / channels; the reference computes them and the masks zero them."""
    ref, pal = models
    tokens, seg = tokens_and_segments(CFG, batch=2, length=21)
    masks = masks_from_choice(CFG, CHOICE)
    full = _logits(ref, tokens, seg)
    want = _logits(ref, tokens, seg, masks)
    assert np.abs(np.asarray(want) - np.asarray(full)).max() > 1e-3  # the choice changes the function
    _close(_logits(pal, tokens, seg, masks), want)
    # as a static choice inside the trace (limits are Python ints there)
    graphdef, state = nnx.split(pal)
    static = jax.jit(lambda s, t, g: nnx.merge(graphdef, s)(t, segment_ids=g, elastic=CHOICE))(state, tokens, seg)
    _close(static, want)


def test_pallas_gradients_equal_reference(models):
    ref, pal = models
    tokens, seg = tokens_and_segments(CFG, batch=2, length=19, seed=1)

    def grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(tokens[:, :-1], segment_ids=seg[:, :-1])
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

        return jax.jit(jax.value_and_grad(loss))(params)

    (lp, gp), (lr, gr) = grads(pal), grads(ref)
    np.testing.assert_allclose(lp, lr, rtol=1e-6)
    flat_p, flat_r = jax.tree.leaves(gp), jax.tree.leaves(gr)
    assert len(flat_p) == len(flat_r)
    for a, b in zip(flat_p, flat_r):
        _close(a, b, rtol=5e-5)  # two chained kernels per layer, backward sums in another order again


def test_ssd_reference_head_limit_zeroes_inactive_heads():
    rng = np.random.default_rng(0)
    b, L, h, p, g, n = 1, 11, 6, 4, 2, 5
    x = rng.standard_normal((b, L, h, p)).astype(np.float32)
    dt = rng.uniform(0.01, 0.2, (b, L, h)).astype(np.float32)
    A = -rng.uniform(0.5, 2, h).astype(np.float32)
    B, C = (rng.standard_normal((b, L, g, n)).astype(np.float32) for _ in range(2))
    D = rng.standard_normal(h).astype(np.float32)
    y, s = ssd_dispatch.ssd(x, dt, A, B, C, D, chunk_size=4, head_limit=2, impl="reference")
    y_all, s_all = ssd_reference(x, dt, A, B, C, D, chunk_size=4)
    active = np.array([0, 1, 3, 4])  # 3 heads per group, the first 2 of each
    inactive = np.array([2, 5])
    np.testing.assert_array_equal(np.asarray(y)[:, :, active], np.asarray(y_all)[:, :, active])
    np.testing.assert_array_equal(np.asarray(s)[:, active], np.asarray(s_all)[:, active])
    assert not np.asarray(y)[:, :, inactive].any() and not np.asarray(s)[:, inactive].any()


def test_impl_names_resolve():
    on_cpu = jax.default_backend() == "cpu"
    for impl in SSD_IMPLS:
        assert ssd_dispatch.resolve_impl(impl) in ("reference", "pallas")
    assert ssd_dispatch.resolve_impl("auto") == ("reference" if on_cpu else "pallas")
    with pytest.raises(ConfigError, match="ssd_impl"):
        ssd_dispatch.resolve_impl("triton")
    assert set(MOE_IMPLS) >= {"auto", "reference", "pallas"}


def test_kernels_config_section():
    from test_train_step import make_config

    cfg = make_config("--config.kernels.ssd=pallas", "--config.kernels.moe=reference")
    assert (cfg.model.ssd_impl, cfg.model.moe_impl) == ("pallas", "reference")
    assert make_config().model.ssd_impl == "auto"
    with pytest.raises(ConfigError, match="kernels.ssd"):
        make_config("--config.kernels.ssd=cuda")
    with pytest.raises(ConfigError, match="kernels.attention"):
        make_config("--config.kernels.attention=pallas")
