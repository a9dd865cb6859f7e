"""Exact accounting for elastic choices, and budget -> choice resolution, on nano-v3-30b.

Expected numbers are SPEC 3.2's table (computed independently of this code) and SPEC 1.8's
formulas evaluated by hand below.
"""
import pytest

import star_elastic_jax as sej
from star_elastic_jax.elastic import ElasticChoice, choice_for_budget, slice_model
from star_elastic_jax.elastic.budget import choice_param_count, nano_choice_lists
from star_elastic_jax.errors import ChoiceError

NANO = sej.ModelConfig.preset("nano-v3-30b")


def test_full_model():
    assert NANO.param_count() == sej.ParamCount(31_577_937_344, 3_580_073_408)
    assert NANO.param_count(ElasticChoice()) == NANO.param_count()


@pytest.mark.parametrize("sizes,total_b,active_b", [
    ((2688, 32, 128, 1328), 22.839, 2.806),
    ((1920, 32, 96, 1328), 12.559, 2.003),
    ((1920, 48, 128, 960), 12.290, 1.946),
])
def test_spec_table(sizes, total_b, active_b):
    h, m, e, f = sizes
    pc = NANO.param_count(ElasticChoice(hidden=h, mamba_heads=m, experts=e, expert_ffn=f))
    assert round(pc.total / 1e9, 3) == total_b and round(pc.active / 1e9, 3) == active_b


def test_formula_by_hand():
    """(2688, 32, 128, 1328): recompute SPEC 1.8's formulas by hand for a nested choice."""
    H, V, mh, P, G, N, K = 2688, 131072, 32, 64, 8, 128, 4
    d_in = mh * P
    mamba = H * (2 * d_in + 2 * G * N + mh) + (d_in + 2 * G * N) * (K + 1) + 3 * mh + d_in + d_in * H
    attn = 2 * H * 32 * 128 + 2 * H * 2 * 128
    E, F, S, k = 128, 1328, 3712, 6
    moe_total, moe_active = 2 * E * F * H + 2 * S * H + E * H, 2 * k * F * H + 2 * S * H + E * H
    common = 23 * mamba + 6 * attn + 53 * H + 2 * V * H
    pc = NANO.param_count(ElasticChoice(mamba_heads=32, expert_ffn=1328))
    assert pc.total == common + 23 * moe_total and pc.active == common + 23 * moe_active


def test_budgets_resolve():
    lists = nano_choice_lists()
    full = choice_for_budget(NANO, 1.0, lists)
    assert choice_param_count(NANO, full) == NANO.param_count()
    b78 = choice_for_budget(NANO, 0.78, lists)
    assert (b78.hidden, b78.mamba_heads, b78.experts, b78.expert_ffn) == (2688, 32, 128, 1328)
    b577 = choice_for_budget(NANO, 0.577, lists)
    pc = choice_param_count(NANO, b577)
    assert abs(pc.active / NANO.param_count().active - 0.577) < 0.01
    assert 11.5e9 < pc.total < 13e9  # "12B"


def test_param_count_of_choice_equals_sliced_model():
    cfg = sej.ModelConfig.preset("tiny")
    from flax import nnx

    model = sej.NemotronH(cfg, rngs=nnx.Rngs(0))
    for choice in (ElasticChoice(hidden=40, mamba_heads=(2, 8, 4), experts=3, expert_ffn=8, mlp_ffn=33),
                   ElasticChoice(attn_heads=2, depth=6)):
        small = slice_model(model, choice)
        n = sum(v.get_value().size for p, v in nnx.to_flat_state(nnx.state(small, nnx.Param)))
        assert cfg.param_count(choice).total == small.cfg.param_count().total == n


@pytest.mark.parametrize("kw,field", [
    (dict(mamba_heads=36), "mamba_heads"),             # not a multiple of n_groups=8
    (dict(experts=4), "experts"),                      # below top-k=6
    (dict(hidden=3000), "hidden"),                     # above full
    (dict(expert_ffn=0), "expert_ffn"),
    (dict(mamba_heads=(64,) * 3), "mamba_heads"),      # wrong number of per-layer sizes
    (dict(depth=40), "depth"),                         # no depth ranking
    (dict(hidden=2.5), "hidden"),
])
def test_invalid_choices(kw, field):
    with pytest.raises(ChoiceError) as e:
        NANO.param_count(ElasticChoice(**kw))
    assert e.value.field.startswith(field) and isinstance(e.value, ValueError)


def test_block_alignment():
    with pytest.raises(ChoiceError, match="multiple of 16"):
        ElasticChoice(expert_ffn=1325).resolve(NANO, align=16)
    ElasticChoice(hidden=1392, expert_ffn=1328).resolve(NANO, align=16)


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.2, True, "0.5"])
def test_invalid_budget(bad):
    with pytest.raises(ChoiceError, match="budget"):
        choice_for_budget(NANO, bad, nano_choice_lists())


def test_empty_choice_list():
    with pytest.raises(ChoiceError, match="choice_lists"):
        choice_for_budget(NANO, 0.5, {"hidden": []})
