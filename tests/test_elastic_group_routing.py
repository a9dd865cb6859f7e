"""Experts nest within each routing group under group-limited routing (``n_group > 1``).

With DeepSeek-V3-style routing a token first keeps the ``topk_group`` groups whose top-2 selection
scores sum highest, then picks its top-k experts among them. A sub-model with ``c`` experts keeps
the first ``c / n_group`` experts of every group (like Mamba heads within their B/C groups), so the
sliced router still sees ``n_group`` groups scored by the same experts. Shown here on a 6-expert,
2-group, keep-1-group, top-2 config (valid expert counts 4 and 6): masked == sliced, sliced ==
transformers, the PyTorch-only slicer == JAX slicing, ranking stays within groups and keeps the
function, and invalid counts are refused with a clear error.
"""
from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import star_elastic_jax as sej
from elastic_fixtures import tokens_and_segments
from hf_fixtures import forward, random_model
from star_elastic_jax.elastic import rank
from star_elastic_jax.elastic.axes import kept_units
from star_elastic_jax.elastic.choice import valid_sizes
from star_elastic_jax.elastic.importance import permute_params
from star_elastic_jax.elastic.masks import build_masks, masks_from_choice
from star_elastic_jax.errors import ChoiceError

# tiny = M*ME-M: the MoE is block 3; its 6 experts form routing groups {0, 1, 2} and {3, 4, 5}.
CFG = sej.ModelConfig.preset("tiny", n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2,
                             moe_intermediate_size=24)
MOE = 3
REL_TOL = 1e-5
CHOICES = {
    "experts": sej.ElasticChoice(experts=4),
    "combined": sej.ElasticChoice(hidden=48, mamba_heads=4, experts=4, expert_ffn=16),
}
KEPT = [0, 1, 3, 4]  # experts=4: the first 2 of each group of 3


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=3)


@pytest.fixture(scope="module")
def slicer():
    path = os.path.join(os.path.dirname(sej.__file__), "export", "slice_hf.py")
    spec = importlib.util.spec_from_file_location("slice_hf_group_routing", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kept_experts_are_a_prefix_of_every_group(model):
    assert list(kept_units(6, 2, 4)) == KEPT
    mask = masks_from_choice(CFG, CHOICES["experts"]).layers[MOE].mixer.experts
    np.testing.assert_array_equal(np.asarray(mask), [1, 1, 0, 1, 1, 0])
    small = sej.slice_model(model, CHOICES["experts"])
    assert (small.cfg.n_routed_experts, small.cfg.n_group, small.cfg.topk_group) == (4, 2, 1)
    for leaf in ("gate_weight", "e_score_correction_bias", "experts_up", "experts_down"):
        np.testing.assert_array_equal(np.asarray(getattr(small.layers[MOE].mixer, leaf)[...]),
                                      np.asarray(getattr(model.layers[MOE].mixer, leaf)[...])[KEPT], err_msg=leaf)


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_masked_equals_sliced(model, name):
    choice = CHOICES[name]
    tokens, seg = tokens_and_segments(CFG)
    small = sej.slice_model(model, choice)
    assert small.cfg.param_count() == CFG.param_count(choice)
    full = np.asarray(model(jnp.asarray(tokens)))
    for seg_ids in (None, jnp.asarray(seg)):
        masked = model(jnp.asarray(tokens), seg_ids, elastic=choice)
        sliced = small(jnp.asarray(tokens), seg_ids)
        assert _rel(masked, sliced) <= REL_TOL, (name, seg_ids is not None)
    assert _rel(masked, full) > 1e-3  # the choice changes the function, so the equality is not vacuous


def test_one_hot_soft_mask_equals_hard(model):
    """Router masks (mixtures of grouped prefixes) at a one-hot weight select exactly the hard choice."""
    tokens = jnp.asarray(tokens_and_segments(CFG)[0])
    soft = build_masks(CFG, {"experts": ([6, 4], np.asarray([0.0, 1.0]))})
    np.testing.assert_array_equal(np.asarray(soft.layers[MOE].mixer.experts), [1, 1, 0, 1, 1, 0])
    want = sej.slice_model(model, CHOICES["experts"])(tokens)
    assert _rel(model(tokens, elastic=soft), want) <= REL_TOL


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_sliced_model_runs_in_transformers(model, name, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    small = sej.slice_model(model, CHOICES[name])
    hf_dir = sej.to_hf(small, tmp_path / "hf", dtype="float32")
    saved = json.load(open(os.path.join(hf_dir, "config.json")))
    assert (saved["n_routed_experts"], saved["n_group"], saved["topk_group"]) == (4, 2, 1)
    hf = transformers.NemotronHForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = tokens_and_segments(CFG)[0]
    with torch.no_grad():
        want = hf(torch.as_tensor(tokens, dtype=torch.long), use_cache=False).logits.numpy()
    assert _rel(forward(small, tokens), want) <= REL_TOL


def test_torch_slicer_equals_jax_slicing(model, slicer, tmp_path):
    """The recipe carries the routing groups; the PyTorch-only slicer keeps and renumbers the same
    experts as the JAX slicing, bit for bit."""
    from hf_fixtures import assert_tensors_bit_exact, read_safetensors_dir

    from star_elastic_jax.export.elastic import export_elastic_hf

    ckpt = sej.save_elastic(model, tmp_path / "ck", CHOICES)
    export = export_elastic_hf(ckpt, tmp_path / "export", dtype="float32")
    recipe = json.load(open(os.path.join(export, "config.json")))["elastic"]["recipe"]
    per_expert = [t for t in recipe["tensors"] if t["experts"]]
    assert per_expert and all(t["experts"]["groups"] == 2 for t in per_expert)
    sliced = {}
    for name, choice in CHOICES.items():
        torch_dir = slicer.slice_hf(export, name, str(tmp_path / f"torch-{name}"))
        jax_dir = sej.to_hf(sej.slice_model(model, choice), tmp_path / f"jax-{name}", dtype="float32")
        sliced[name] = read_safetensors_dir(torch_dir)
        assert_tensors_bit_exact(sliced[name], read_safetensors_dir(jax_dir))
    # experts=4 renumbers the parent's experts 0, 1, 3, 4 (not the prefix 0..3) to 0..3
    parent = read_safetensors_dir(export)
    key = "backbone.layers.{l}.mixer.experts.{e}.down_proj.weight"
    for new, old in enumerate(KEPT):
        assert parent[key.format(l=MOE, e=old)].equal(sliced["experts"][key.format(l=MOE, e=new)])


def test_kept_experts_map_of_the_slicer(slicer):
    entry = {"axis": "experts", "layer": 3, "count": 6, "groups": 2}
    assert slicer.kept_experts(entry, {"experts": [None, None, None, 4]}, "k", 3) == {0: 0, 1: 1, 3: 2, 4: 3}
    legacy = {"axis": "experts", "layer": 0, "count": 4}  # a recipe without groups: a plain prefix
    assert slicer.kept_experts(legacy, {"experts": [3]}, "k", 0) == {0: 0, 1: 1, 2: 2}
    with pytest.raises(slicer.SliceError, match="multiple of the 2 routing groups"):
        slicer.kept_experts(entry, {"experts": [None, None, None, 3]}, "k", 3)


def _batches(n=3, b=2, L=16):
    return [jax.random.randint(jax.random.key(i), (b, L), 0, CFG.vocab_size) for i in range(n)]


def test_ranking_stays_within_groups_and_keeps_the_function():
    model = random_model(CFG, seed=11)
    moe = model.layers[MOE].mixer
    moe.experts_up.set_value(moe.experts_up.get_value().at[3].set(0.0))  # expert 3 (first of group 1) is dead
    ranked, scores = rank(model, _batches(), axes=("experts",), progress=False)
    s = scores["experts"][MOE]
    assert s[3] == 0.0 and np.all(s[[4, 5]] > 0)  # the others of group 1 are routed to and contribute
    perm = list(scores["permutations"]["experts"][MOE])
    assert sorted(perm[:3]) == [0, 1, 2] and sorted(perm[3:]) == [3, 4, 5]  # every group maps onto itself
    assert perm[5] == 3  # the dead expert ranks last within group 1
    assert perm == list(np.argsort(-s[:3], kind="stable")) + list(3 + np.argsort(-s[3:], kind="stable"))
    t = jax.random.randint(jax.random.key(99), (2, 11), 0, CFG.vocab_size)
    assert _rel(ranked(t), model(t)) <= REL_TOL
    assert perm != list(range(6))  # a non-trivial permutation, so the equality above proves something


def test_a_permutation_across_groups_would_change_the_function():
    """Why the ranking must stay within groups: swapping an expert into the other group changes
    which groups tokens keep."""
    from flax import nnx

    from star_elastic_jax.model.model import model_from_params

    model = random_model(CFG, seed=5)
    params = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    within = permute_params(CFG, params, {"experts": {MOE: np.array([2, 0, 1, 5, 3, 4])}})
    across = permute_params(CFG, params, {"experts": {MOE: np.array([3, 1, 2, 0, 4, 5])}})
    t = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
    want = model(t)
    assert _rel(model_from_params(CFG, within)(t), want) <= REL_TOL
    assert _rel(model_from_params(CFG, across)(t), want) > 1e-3


def test_valid_expert_counts():
    assert valid_sizes(CFG, "experts") == [4, 6]
    assert valid_sizes(sej.ModelConfig.preset("tiny"), "experts") == [2, 3, 4]  # n_group=1: any count >= top-k
    wide = sej.ModelConfig.preset("tiny", n_routed_experts=12, n_group=2, topk_group=1, num_experts_per_tok=4)
    assert valid_sizes(wide, "experts") == [8, 10, 12]  # the kept group must hold top-4


@pytest.mark.parametrize("cfg, value, match", [
    (CFG, 3, r"experts.*3.*multiple of n_group=2"),
    (CFG, 5, r"experts.*5.*multiple of n_group=2"),
    (CFG, 2, r"experts.*2.*1 expert per routing group.*top-2.*experts >= 4"),
    (sej.ModelConfig.preset("tiny", n_routed_experts=16, n_group=2, topk_group=2, num_experts_per_tok=6), 4,
     r"experts=4.*must be >= num_experts_per_tok=6"),
    (CFG, (3,), r"experts\[0\].*3.*multiple of n_group=2"),
    (sej.ModelConfig.preset("tiny", n_routed_experts=12, n_group=2, topk_group=1, num_experts_per_tok=4), 6,
     r"experts.*6.*topk_group=1.*3 experts, fewer than num_experts_per_tok=4.*experts must be >= 8"),
])
def test_invalid_expert_counts_are_refused(cfg, value, match):
    with pytest.raises(ChoiceError, match=match):
        sej.ElasticChoice(experts=value).resolve(cfg)
