"""Masked == sliced: the full model run with hard elastic masks equals the physically sliced model.

Property test over random choices on the tiny configs (one with group-limited routing, where experts
nest within each routing group): every axis (hidden, mamba_heads, attn_heads, experts, expert_ffn,
mlp_ffn, depth), homogeneous and heterogeneous sizes, with and without packed documents. The
reference is the sliced model: a separate, smaller network built by slicing tensors.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elastic_fixtures import CONFIGS, random_model, tokens_and_segments
from star_elastic_jax.elastic import ElasticChoice, slice_model
from star_elastic_jax.elastic.axes import AXES, layers_of
from star_elastic_jax.elastic.masks import masks_from_choice

REL_TOL = 1e-5


def _valid_sizes(cfg, axis):
    ax = AXES[axis]
    full = getattr(cfg, ax.size_field)
    g = ax.groups(cfg)
    sizes = [s for s in range(g, full + 1, g)]
    if axis == "experts":
        sizes = [s for s in sizes if s >= cfg.num_experts_per_tok]
        if cfg.n_group > 1:  # group routing: >= 2 experts per group (top-2 group score), top-k in the kept groups
            sizes = [s for s in sizes if s // g >= 2 and cfg.topk_group * (s // g) >= cfg.num_experts_per_tok]
    return sizes


@st.composite
def choices(draw, cfg):
    kw = {}
    if draw(st.booleans()):
        kw["hidden"] = draw(st.integers(1, cfg.hidden_size))
    for axis in ("mamba_heads", "attn_heads", "experts", "expert_ffn", "mlp_ffn"):
        mode = draw(st.sampled_from(["full", "homogeneous", "heterogeneous"]))
        sizes = _valid_sizes(cfg, axis)
        if mode == "homogeneous":
            kw[axis] = draw(st.sampled_from(sizes))
        elif mode == "heterogeneous":
            kw[axis] = tuple(draw(st.sampled_from(sizes)) for _ in layers_of(cfg, axis))
    if draw(st.integers(0, 3)) == 0:
        kw["depth"] = draw(st.integers(1, cfg.num_hidden_layers))
    return ElasticChoice(**kw)


class _Runner:
    """One compiled masked forward per config (masks are traced arrays, so any choice reuses it)."""

    def __init__(self, name):
        self.cfg = CONFIGS[name]
        order = tuple(np.random.default_rng(7).permutation(self.cfg.num_hidden_layers).tolist())
        self.model = random_model(self.cfg, seed=3, depth_order=order)
        graphdef, state = nnx.split(self.model)
        self.state = state
        self.masked = jax.jit(lambda s, t, seg, m: nnx.merge(graphdef, s)(t, seg, elastic=m))
        self.tokens, self.seg = tokens_and_segments(self.cfg)


_RUNNERS = {}
_SLICED_FWD = {}  # sliced config -> compiled forward (derandomized draws repeat shapes)


def sliced_forward(small):
    graphdef, state = nnx.split(small)
    if small.cfg not in _SLICED_FWD:
        _SLICED_FWD[small.cfg] = jax.jit(lambda s, t, seg: nnx.merge(graphdef, s)(t, seg))
    return _SLICED_FWD[small.cfg], state


def runner(name):
    if name not in _RUNNERS:
        _RUNNERS[name] = _Runner(name)
    return _RUNNERS[name]


def check(r, choice):
    """Masked (without and with packed documents) vs the sliced model, in one sliced compile: the
    sliced model runs both cases as one batch, the unpacked rows with all-zero segment ids."""
    masks = masks_from_choice(r.cfg, choice, depth_order=r.model.depth_order)
    small = slice_model(r.model, choice)
    fwd, state = sliced_forward(small)
    tokens = jnp.asarray(np.concatenate([r.tokens, r.tokens]))
    segs = jnp.asarray(np.concatenate([np.zeros_like(r.seg), r.seg]))
    sliced = np.asarray(fwd(state, tokens, segs))
    b = r.tokens.shape[0]
    for name, seg, ref in (("unpacked", None, sliced[:b]), ("packed", jnp.asarray(r.seg), sliced[b:])):
        masked = np.asarray(r.masked(r.state, jnp.asarray(r.tokens), seg, masks))
        err = np.abs(masked - ref).max() / np.abs(ref).max()
        assert err <= REL_TOL, (choice, name, err)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_masked_equals_sliced(name, data):
    r = runner(name)
    check(r, data.draw(choices(r.cfg)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_axis_alone(name):
    """Deterministic coverage: each axis at its smallest valid size, alone and all together."""
    r = runner(name)
    smallest = {a: _valid_sizes(r.cfg, a)[0] for a in ("mamba_heads", "attn_heads", "experts", "expert_ffn",
                                                        "mlp_ffn")}
    for axis, size in smallest.items():
        check(r, ElasticChoice(**{axis: size}))
    check(r, ElasticChoice(hidden=r.cfg.hidden_size // 2, depth=r.cfg.num_hidden_layers - 2, **smallest))


def test_sliced_config_fields():
    r = runner("tiny_b")
    small = slice_model(r.model, ElasticChoice(hidden=32, mamba_heads=4, attn_heads=3, experts=4, expert_ffn=16,
                                               mlp_ffn=20))
    c = small.cfg
    assert (c.hidden_size, c.mamba_num_heads, c.num_attention_heads, c.n_routed_experts, c.moe_intermediate_size,
            c.intermediate_size) == (32, 4, 3, 4, 16, 20)
    assert (c.n_groups, c.num_key_value_heads, c.num_experts_per_tok) == (4, 3, 2)
    assert c.per_layer is None
    hetero = slice_model(r.model, ElasticChoice(mamba_heads=(4, 8)))
    assert hetero.cfg.per_layer is not None
    assert [s.mamba_heads for s in hetero.cfg.per_layer if s.kind == "M"] == [4, 8]
    assert hetero.cfg.param_count() == r.cfg.param_count(ElasticChoice(mamba_heads=(4, 8)))


def test_soft_mask_of_one_hot_equals_hard():
    """A soft mixture with one-hot weights is the hard mask (same code path, no special case)."""
    from star_elastic_jax.elastic.masks import build_masks

    r = runner("tiny")
    sizes = {"hidden": [64, 48, 32], "mamba_heads": [8, 6, 4], "experts": [4, 3], "expert_ffn": [32, 16]}
    soft = build_masks(r.cfg, {a: (s, np.eye(len(s))[1]) for a, s in sizes.items()})
    hard = ElasticChoice(hidden=48, mamba_heads=6, experts=3, expert_ffn=16)
    t = jnp.asarray(r.tokens)
    np.testing.assert_allclose(np.asarray(r.masked(r.state, t, None, soft)),
                               np.asarray(slice_model(r.model, hard)(t)), rtol=0, atol=1e-5)


def test_soft_mask_is_differentiable_in_the_weights():
    from star_elastic_jax.elastic.masks import build_masks

    r = runner("tiny")
    t = jnp.asarray(r.tokens)

    def loss(w):
        m = build_masks(r.cfg, {"hidden": ([64, 32], w), "mamba_heads": ([8, 4], w), "expert_ffn": ([32, 16], w)})
        return r.masked(r.state, t, None, m).std()

    g = jax.grad(loss)(jnp.asarray([0.7, 0.3]))
    assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).sum() > 0
