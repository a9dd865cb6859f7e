"""Slicing a fraction the checkpoint does not store (issue 10, item 6): the trained router decides
when the checkpoint has one and the fraction lies within its trained budgets (interpolating between
them, as at train time), the exhaustive search otherwise; the CLI says which rule it used."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import star_elastic_jax as sej
from star_elastic_jax.checkpoint.elastic import read_elastic, trained_router
from star_elastic_jax.export.elastic import slice_checkpoint
from star_elastic_jax.checkpoint.orbax import read_metadata
from star_elastic_jax.cli import main
from star_elastic_jax.elastic.budget import choice_for_budget, choice_lists_for
from star_elastic_jax.elastic.router import BudgetRouter, RouterConfig

CFG = sej.ModelConfig.preset("tiny")
LISTS = {"hidden": (64, 56, 48, 40), "mamba_heads": (8, 6, 4, 2), "experts": (4, 3, 2), "expert_ffn": (32, 24, 16, 8)}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    model = sej.NemotronH(CFG, rngs=nnx.Rngs(0))
    rc = RouterConfig(budgets=(1.0, 0.78, 0.577), choice_lists=LISTS, init_std=1.0)
    router = BudgetRouter(CFG, rc, rngs=nnx.Rngs(5))   # random weights: distinct choices per budget
    state = jax.tree.map(np.asarray, nnx.state(router, nnx.Param).to_pure_dict())
    budgets = {"1.0": router.choice(1.0), "0.78": router.choice(0.78), "0.577": router.choice(0.577)}
    with_router = sej.save_elastic(model, root / "with", budgets, choice_lists=LISTS, router_state=state,
                                   router_config=rc)
    without = sej.save_elastic(model, root / "without", budgets, choice_lists=LISTS)
    return {"router": router, "with": with_router, "without": without, "root": root}


def test_the_router_round_trips_through_the_checkpoint(ckpts):
    loaded = trained_router(read_elastic(ckpts["with"]))
    for b in (1.0, 0.9, 0.78, 0.7, 0.6, 0.577):
        assert loaded.choice(b) == ckpts["router"].choice(b), b
    assert read_metadata(ckpts["with"])["elastic"]["router_config"]["budgets"] == [1.0, 0.78, 0.577]
    assert trained_router(read_elastic(ckpts["without"])) is None


@pytest.mark.parametrize("fraction", [0.9, 0.7, 0.6])
def test_a_fraction_within_the_trained_budgets_asks_the_router(ckpts, tmp_path, fraction):
    res = slice_checkpoint(ckpts["with"], fraction, tmp_path / "s")
    assert res.rule == "router" and res.choice == ckpts["router"].choice(fraction)
    res = slice_checkpoint(ckpts["without"], fraction, tmp_path / "t")
    info = read_elastic(ckpts["without"])
    assert res.rule == "search" and res.choice == choice_for_budget(CFG, fraction, choice_lists_for(CFG, LISTS))
    assert info.router_config is None


def test_outside_the_trained_budgets_the_search_decides(ckpts, tmp_path):
    res = slice_checkpoint(ckpts["with"], 0.5, tmp_path / "s")
    assert res.rule == "search" and res.choice == choice_for_budget(CFG, 0.5, choice_lists_for(CFG, LISTS))
    res = slice_checkpoint(ckpts["with"], "0.78", tmp_path / "n")
    assert res.rule == "stored" and res.choice == read_elastic(ckpts["with"]).budgets["0.78"]


def test_the_cli_prints_the_rule(ckpts, tmp_path, capsys):
    assert main(["slice", "--ckpt", str(ckpts["with"]), "--budget", "0.7", "--out", str(tmp_path / "a")]) == 0
    assert "trained router" in capsys.readouterr().out
    assert main(["slice", "--ckpt", str(ckpts["without"]), "--budget", "0.7", "--out", str(tmp_path / "b")]) == 0
    assert "exhaustive search" in capsys.readouterr().out
    assert main(["slice", "--ckpt", str(ckpts["with"]), "--budget", "0.577", "--out", str(tmp_path / "c")]) == 0
    assert "stored in the checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("budget", ["0.78", "explicit"])
def test_a_slice_resolves_its_choice_once(ckpts, tmp_path, monkeypatch, budget):
    """The chosen budget is validated and expanded exactly once per slice (issue 10, item 2): a stored
    one when the checkpoint's metadata is read, an explicit one after; the resolved value flows to
    the HF pre-check, the array slicer and the marker. (Reading the checkpoint also checks its
    choice lists, one single-axis choice per entry: those are other choices.)"""
    import star_elastic_jax.elastic.choice as choice_mod
    import star_elastic_jax.export.elastic as export_mod

    calls = []
    real = choice_mod.resolve_choice

    def counting(cfg, choice, **kw):
        calls.append(choice)
        return real(cfg, choice, **kw)

    monkeypatch.setattr(choice_mod, "resolve_choice", counting)
    monkeypatch.setattr(export_mod, "resolve_choice", counting)
    target = sej.ElasticChoice(hidden=48, mamba_heads=4, experts=3, expert_ffn=16) if budget == "explicit" else budget
    for hf in (False, True):
        calls.clear()
        res = slice_checkpoint(ckpts["with"], target, tmp_path / f"s{hf}", hf=hf)
        assert [c for c in calls if c == res.choice] == [res.choice], calls
        assert len(calls) == 1 + 3 + sum(len(v) for v in LISTS.values()) - (budget != "explicit"), calls


def test_a_resolved_choice_from_another_config_is_refused():
    from star_elastic_jax.elastic.choice import ensure_resolved
    from star_elastic_jax.errors import ChoiceError

    import dataclasses

    other = dataclasses.replace(CFG, hybrid_override_pattern="M*")
    r = sej.ElasticChoice(hidden=48).resolve(CFG)
    assert ensure_resolved(CFG, r) is r
    with pytest.raises(ChoiceError, match="another config"):
        ensure_resolved(other, r)
