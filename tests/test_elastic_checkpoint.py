"""Nested elastic checkpoints (save_elastic / load_elastic), budget resolution and `star-elastic slice`."""
from __future__ import annotations

import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import star_elastic_jax as sej
from star_elastic_jax.checkpoint import orbax as ckpt_orbax
from star_elastic_jax.checkpoint.elastic import read_elastic
from star_elastic_jax.elastic.budget import resolve_budget
from star_elastic_jax.cli import main
from star_elastic_jax.elastic.budget import choice_for_budget, choice_param_count, default_choice_lists

from hf_fixtures import forward, random_model

DEPTH_ORDER = (4, 1, 0, 2, 3, 5)
BUDGETS = {
    "full": sej.ElasticChoice(),
    "mid": sej.ElasticChoice(hidden=48, mamba_heads=4, attn_heads=2, experts=3, expert_ffn=24, mlp_ffn=96),
    "small": sej.ElasticChoice(hidden=32, mamba_heads=4, experts=2, expert_ffn=16, mlp_ffn=64, depth=5),
    "het": sej.ElasticChoice(mamba_heads=(8, 4, 6)),
}
LISTS = {"hidden": [64, 48, 32], "mamba_heads": [8, 4], "experts": [4, 3], "expert_ffn": [32, 16]}


def _flat(model) -> dict:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _hashes(root) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


@functools.partial(jax.jit, static_argnums=0)
def _masked_forward(graphdef, state, tokens, masks):
    return nnx.merge(graphdef, state)(tokens, elastic=masks)


def masked_forward(model, tokens, choice) -> np.ndarray:
    """The full model under the hard masks of ``choice`` (one compile for every choice)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_masked_forward(graphdef, state, jnp.asarray(tokens, jnp.int32), model.elastic_masks(choice)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic_ckpt")
    cfg = sej.ModelConfig.preset("tiny")
    model = random_model(cfg, seed=3)
    model.depth_order = DEPTH_ORDER
    router = {"emb": {"w1": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32),
                      "w2": np.arange(12, dtype=np.float32).reshape(4, 3)}}
    scores = {"hidden": np.linspace(0, 1, 64, dtype=np.float32)}
    path = sej.save_elastic(model, root / "ck", BUDGETS, choice_lists=LISTS, router_state=router, scores=scores)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 11))
    return dict(root=root, cfg=cfg, model=model, path=path, router=router, scores=scores, tokens=tokens)


def test_round_trip_is_exact(setup):
    ck = sej.load_elastic(setup["path"])
    assert ck.format_version == 1 and ck.cfg == setup["cfg"]
    assert ck.budgets == BUDGETS and ck.choice_lists == LISTS
    assert ck.depth_order == DEPTH_ORDER and ck.model.depth_order == DEPTH_ORDER
    want, got = _flat(setup["model"]), _flat(ck.model)
    assert set(want) == set(got)
    for p in want:
        assert got[p].dtype == want[p].dtype and np.array_equal(got[p], want[p]), p
    for k in ("w1", "w2"):
        np.testing.assert_array_equal(np.asarray(ck.router_state["emb"][k]), setup["router"]["emb"][k])
    np.testing.assert_array_equal(np.asarray(ck.scores["hidden"]), setup["scores"]["hidden"])
    meta = ckpt_orbax.read_metadata(setup["path"])["elastic"]
    assert meta["permuted"] is True and meta["axes"]["mamba_heads"]["groups_field"] == "n_groups"
    assert meta["budgets"]["het"] == {"mamba_heads": [8, 4, 6]}


def test_round_trip_without_optional_parts(tmp_path):
    cfg = sej.ModelConfig.preset("tiny")
    model = random_model(cfg, seed=4)
    sej.save_elastic(model, tmp_path / "ck", {"half": sej.ElasticChoice(hidden=32)})
    ck = sej.load_elastic(tmp_path / "ck")
    assert ck.router_state is None and ck.scores is None and ck.depth_order is None and ck.choice_lists is None
    assert ck.budgets == {"half": sej.ElasticChoice(hidden=32)}


@pytest.mark.parametrize("budgets, field", [
    ({"x": sej.ElasticChoice(hidden=65)}, "hidden"),
    ({"x": sej.ElasticChoice(mamba_heads=3)}, "mamba_heads"),        # not a multiple of n_groups
    ({"x": sej.ElasticChoice(experts=1)}, "experts"),                # below top-k
    ({"x": sej.ElasticChoice(mamba_heads=(8, 4))}, "mamba_heads"),   # wrong number of per-layer sizes
    ({"x": sej.ElasticChoice(depth=3)}, "depth"),                    # the model has no depth ranking
    ({"x": {"hidden": 32}}, "budgets['x']"),                         # not an ElasticChoice
    ({"": sej.ElasticChoice()}, "budgets"),
])
def test_invalid_budgets_rejected_before_writing(tmp_path, budgets, field):
    model = random_model(sej.ModelConfig.preset("tiny"), seed=5)
    with pytest.raises(sej.ChoiceError) as e:
        sej.save_elastic(model, tmp_path / "ck", budgets)
    assert field in e.value.field
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("lists", [{"hidden": [32, 64]}, {"hidden": [70]}, {"depth": [6]}, {"experts": []}])
def test_invalid_choice_lists_rejected(tmp_path, lists):
    model = random_model(sej.ModelConfig.preset("tiny"), seed=5)
    with pytest.raises(sej.ChoiceError):
        sej.save_elastic(model, tmp_path / "ck", {}, choice_lists=lists)
    assert os.listdir(tmp_path) == []


def _edit_metadata(path, fn):
    p = os.path.join(path, ckpt_orbax.METADATA_NAME)
    data = json.load(open(p))
    fn(data)
    json.dump(data, open(p, "w"))


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["elastic"].update(format_version=99), "format_version"),
    (lambda d: d["elastic"].update(budgets=[1, 2]), "budgets"),
    (lambda d: d["elastic"]["budgets"].update(bad={"hidden": "big"}), "bad"),
    (lambda d: d["elastic"]["budgets"].update(bad={"nope": 3}), "bad"),
    (lambda d: d["elastic"]["budgets"].update(bad={"hidden": 100}), "bad"),
    (lambda d: d["elastic"].update(depth_order=[0, 0, 1, 2, 3, 4]), "depth_order"),
])
def test_malformed_elastic_metadata(setup, tmp_path, edit, match):
    import shutil

    path = str(tmp_path / "ck")
    shutil.copytree(setup["path"], path)
    _edit_metadata(path, edit)
    with pytest.raises(sej.CheckpointError, match=match):  # the metadata checks behind the manifest's
        sej.load_elastic(path, verify=False)
    with pytest.raises(sej.CheckpointError, match="metadata.json"):  # and the manifest catches the edit first
        sej.load_elastic(path)


def test_non_elastic_checkpoint(setup, tmp_path):
    path = ckpt_orbax.save_model(setup["model"], tmp_path / "plain")
    with pytest.raises(sej.CheckpointError, match="not an elastic checkpoint"):
        sej.load_elastic(path)
    assert main(["slice", "--ckpt", path, "--budget", "0.5", "--out", str(tmp_path / "o")]) == 2


def test_resolve_budget(setup):
    info = read_elastic(setup["path"])
    assert resolve_budget(info, "mid") == BUDGETS["mid"]
    assert resolve_budget(info, "0.6") == choice_for_budget(setup["cfg"], 0.6, LISTS)
    assert resolve_budget(info, 0.6) == resolve_budget(info, "0.6")
    assert resolve_budget(info, 1.0) == sej.ElasticChoice(hidden=64, mamba_heads=8, experts=4, expert_ffn=32)
    hook = sej.ElasticChoice(hidden=48)
    assert resolve_budget(info, "0.3", resolver=lambda cfg, f: hook) == hook  # the trained-router hook
    for bad in ("nope", "0", "1.5", "nan", -0.2):
        with pytest.raises(sej.ChoiceError, match="budget"):
            resolve_budget(info, bad)
    no_lists = info.__class__(**{**info.__dict__, "choice_lists": None})
    cfg = setup["cfg"]
    assert resolve_budget(no_lists, 0.7) == choice_for_budget(cfg, 0.7, default_choice_lists(cfg))


def test_cli_slice_never_modifies_source_and_matches_masked_model(setup, tmp_path, capsys):
    src = setup["path"]
    before = _hashes(src)
    model, tokens = setup["model"], setup["tokens"]
    cases = [("mid", "mid", []), ("small", "small", []), ("0.6", "frac", []), ("mid", "mid_hf", ["--hf", "--dtype",
                                                                                                   "float32"])]
    for budget, name, extra in cases:
        out = str(tmp_path / name)
        assert main(["slice", "--ckpt", src, "--budget", budget, "--out", out, *extra]) == 0
        printed = capsys.readouterr().out
        assert "wrote" in printed and budget in printed
    assert _hashes(src) == before  # contents and mtimes of every file
    assert sorted(os.listdir(tmp_path)) == sorted(name for _, name, _ in cases)  # no temporaries left behind

    info = read_elastic(src)
    for budget, name in (("mid", "mid"), ("small", "small"), ("0.6", "frac")):
        choice = resolve_budget(info, budget)
        sliced = ckpt_orbax.load_model(tmp_path / name)
        assert sliced.cfg.param_count() == choice_param_count(setup["cfg"], choice, depth_order=DEPTH_ORDER)
        got = forward(sliced, tokens)
        want = masked_forward(model, tokens, choice)
        scale = float(np.abs(want).max())
        assert scale > 0.5
        assert float(np.abs(got - want).max()) <= 1e-5 * scale, budget
    meta = ckpt_orbax.read_metadata(tmp_path / "small")["elastic_slice"]
    assert meta["budget"] == "small" and meta["depth_order"] == [1, 0, 2, 3, 4]  # block 4 dropped, 5 renumbered to 4
    # the --hf output holds the same arrays as the Orbax slice (fp32)
    a, b = _flat(sej.from_hf(tmp_path / "mid_hf")), _flat(ckpt_orbax.load_model(tmp_path / "mid"))
    assert set(a) == set(b) and all(np.array_equal(a[p], b[p]) for p in a)


def test_cli_slice_dtype_and_errors(setup, tmp_path, capsys):
    src = setup["path"]
    assert main(["slice", "--ckpt", src, "--budget", "mid", "--out", str(tmp_path / "bf"), "--dtype", "bfloat16"]) == 0
    _, params = ckpt_orbax.load_params(tmp_path / "bf")
    assert params[("embeddings",)].dtype == jnp.bfloat16
    assert params[("layers", 3, "mixer", "e_score_correction_bias")].dtype == jnp.float32
    capsys.readouterr()
    assert main(["slice", "--ckpt", src, "--budget", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--budget='nope'" in err and "mid" in err
    assert main(["slice", "--ckpt", src, "--budget", "2.0", "--out", str(tmp_path / "x")]) == 2
    assert main(["slice", "--ckpt", src, "--budget", "mid", "--out", os.path.join(src, "inside")]) == 2
    assert not os.path.exists(tmp_path / "x")


def test_save_params_checks_leaves(setup, tmp_path):
    params = _flat(setup["model"])
    params.pop(("lm_head",))
    with pytest.raises(sej.CheckpointError, match="lm_head"):
        ckpt_orbax.save_params(setup["cfg"], params, tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")
