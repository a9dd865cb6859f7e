"""Importance ranking: the permutation keeps the function, and planted unimportant units rank last."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elastic_fixtures import CONFIGS, random_model
from star_elastic_jax.elastic import ElasticChoice, rank, slice_model
from star_elastic_jax.errors import DataError


def _batches(cfg, n=3, b=2, L=16):
    return [jax.random.randint(jax.random.key(i), (b, L), 0, cfg.vocab_size) for i in range(n)]


def _set(var, fn):
    var.set_value(fn(var.get_value()))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_permuted_model_computes_the_same_function(name):
    cfg = CONFIGS[name]
    model = random_model(cfg, seed=5)
    batches = _batches(cfg)
    permuted, scores = rank(model, batches, progress=False)
    t = jax.random.randint(jax.random.key(99), (2, 11), 0, cfg.vocab_size)
    a, b = np.asarray(model(t)), np.asarray(permuted(t))
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    # the permutation is not the identity (otherwise the test above proves nothing)
    assert not np.array_equal(scores["permutations"]["hidden"], np.arange(cfg.hidden_size))
    # ranked prefixes: the kept hidden channels of the permuted model have the top scores
    order = np.argsort(-scores["hidden"], kind="stable")
    np.testing.assert_array_equal(scores["permutations"]["hidden"], order)


def test_planted_units_rank_last():
    cfg = CONFIGS["tiny_b"]  # ME*-M*E: 4 B/C groups, 3 KV groups, 6 experts
    model = random_model(cfg, seed=11)
    layers = model.layers
    moe, mamba, mlp, attn = layers[1].mixer, layers[0].mixer, layers[3].mixer, layers[2].mixer
    _set(moe.experts_up, lambda w: w.at[2].set(0.0))              # expert 2 of block 1 is dead
    _set(moe.experts_down, lambda w: w.at[4].multiply(1e-4))       # expert 4 barely contributes
    for layer in layers:                                            # hidden channel 7 is shrunk everywhere
        _set(layer.norm.weight, lambda w: w.at[7].set(1e-4))
    P = cfg.mamba_head_dim
    _set(mamba.in_proj_x, lambda w: w.at[3 * P:4 * P].multiply(1e-4))  # head 3 = group 1's second head
    _set(moe.experts_up, lambda w: w.at[:, 5].set(0.0))             # expert-FFN channel 5 dead in all experts
    _set(mlp.up_proj, lambda w: w.at[11].set(0.0))                  # MLP channel 11 dead
    _set(attn.v_proj, lambda w: w)                                  # (attention heads share V per KV group)
    _, scores = rank(model, _batches(cfg, n=4), progress=False)
    perms = scores["permutations"]
    assert perms["hidden"][-1] == 7
    assert set(perms["experts"][1][-2:]) == {2, 4} and perms["experts"][1][-1] in (2, 4)
    per = cfg.mamba_num_heads // cfg.n_groups
    group1 = perms["mamba_heads"][0][per:2 * per]
    assert group1[-1] == 3 and set(group1) == {2, 3}  # ranked within its own group only
    assert perms["expert_ffn"][1][-1] == 5
    assert perms["mlp_ffn"][3][-1] == 11
    for axis in ("mamba_heads", "attn_heads"):  # within-group: every group maps onto itself
        for i, p in perms[axis].items():
            groups = cfg.n_groups if axis == "mamba_heads" else cfg.num_key_value_heads
            per_g = len(p) // groups
            assert all(set(p[g * per_g:(g + 1) * per_g]) == set(range(g * per_g, (g + 1) * per_g))
                       for g in range(groups))


def test_ranking_makes_small_submodels_better():
    """After ranking, a sub-model that drops the planted dead units loses almost nothing."""
    cfg = CONFIGS["tiny"]
    model = random_model(cfg, seed=2)
    _set(model.layers[3].mixer.experts_up, lambda w: w.at[0].set(0.0))
    permuted, _ = rank(model, _batches(cfg), progress=False)
    t = jax.random.randint(jax.random.key(5), (2, 12), 0, cfg.vocab_size)
    full = np.asarray(model(t))
    small = np.asarray(slice_model(permuted, ElasticChoice(experts=3))(t))
    assert np.abs(small - full).max() <= 1e-5 * np.abs(full).max()


def test_depth_ranking_drops_an_identity_block_first():
    cfg = CONFIGS["tiny"]
    model = random_model(cfg, seed=4)
    _set(model.layers[4].mixer.down_proj, lambda w: w * 0.0)  # the MLP block is an identity
    permuted, scores = rank(model, _batches(cfg, n=2), axes=("hidden",), depth=True, progress=False)
    assert permuted.depth_order[0] == 4 and scores["depth"][0] < 1e-10
    assert sorted(permuted.depth_order) == list(range(cfg.num_hidden_layers))
    t = jax.random.randint(jax.random.key(1), (1, 9), 0, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(permuted(t, elastic=ElasticChoice(depth=5))), np.asarray(model(t)),
                               atol=1e-5 * float(np.abs(np.asarray(model(t))).max()))


def test_bad_calibration_input():
    cfg = CONFIGS["tiny"]
    model = random_model(cfg)
    with pytest.raises(DataError, match="batches"):
        rank(model, [], progress=False)
    with pytest.raises(DataError, match="axes"):
        rank(model, _batches(cfg), axes=("nope",), progress=False)
    with pytest.raises(DataError):
        rank(model, [jnp.zeros((3,), jnp.int32)], progress=False)
