"""`star-elastic info` with budgets / explicit choices / an elastic checkpoint; slice and export-hf help."""
from __future__ import annotations

import functools
import os
import re

import pytest

import star_elastic_jax as sej
from star_elastic_jax.cli import main
from star_elastic_jax.elastic.budget import choice_for_budget, choice_param_count, nano_choice_lists

from hf_fixtures import random_model

NANO_TOTAL, NANO_ACTIVE = "31,577,937,344", "3,580,073,408"


@functools.lru_cache(maxsize=None)
def nano_choice(budget: float):
    return choice_for_budget(sej.ModelConfig.preset("nano-v3-30b"), budget, nano_choice_lists())


def _row(out: str, label: str) -> list[str]:
    """The cells of the budget-table row whose first cell is ``label``."""
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] == label and len(cells) > 4 and re.fullmatch(r"[\d,]+", cells[-5]):
            return cells
    raise AssertionError(f"no table row {label!r} in:\n{out}")


def _counts(out: str, label: str) -> tuple[int, int, float]:
    """(total, active, active fraction) printed for ``label`` (columns: ... total active frac bytes (human))."""
    cells = _row(out, label)
    return int(cells[-6].replace(",", "")), int(cells[-5].replace(",", "")), float(cells[-4])


@pytest.mark.parametrize("sub", ["slice", "export-hf", "info"])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: star-elastic" in out and "--ckpt" in out


def test_info_budgets_nano(capsys):
    assert main(["info", "--config", "nano-v3-30b", "--budgets", "1.0,0.78,0.577"]) == 0
    out = capsys.readouterr().out
    cfg = sej.ModelConfig.preset("nano-v3-30b")
    full = _row(out, "1.0")
    assert full[-6] == NANO_TOTAL and full[-5] == NANO_ACTIVE
    assert full[1:6] == ["2688", "64", "32", "128", "1856"]  # hidden, mamba_heads, attn_heads, experts, expert_ffn
    for b in (0.78, 0.577):
        choice = nano_choice(b)
        pc = choice_param_count(cfg, choice)
        total, active, frac = _counts(out, str(b))
        assert (total, active) == (pc.total, pc.active)
        assert abs(frac - b) < 0.05 * b  # within the budget's 5% dead zone (SPEC D8)
        cells = _row(out, str(b))
        assert cells[1:6] == [str(choice.hidden), str(choice.mamba_heads), "32", str(choice.experts),
                              str(choice.expert_ffn)]
    # 0.78 -> SPEC 3.2's (2688, 32, 128, 1328): 22.839B total, 2.806B active
    assert _counts(out, "0.78")[:2] == (22_839_201_056, 2_806_246_688)
    m = re.search(r"nested ([\d,]+) B .* vs separate ([\d,]+) B .* separate/nested = ([\d.]+)x", out)
    assert m, out
    nested, separate = int(m[1].replace(",", "")), int(m[2].replace(",", ""))
    assert nested == 31_577_937_344 * 2
    want = sum(choice_param_count(cfg, nano_choice(b)).total * 2 for b in (1.0, 0.78, 0.577))
    assert separate == want and m[3] == f"{want / nested:.2f}"
    assert "2.14x" in out  # the paper's reference ratio is quoted


def test_info_explicit_choices_nano(capsys):
    assert main(["info", "--config", "nano-v3-30b",
                 "--choices", '{"hidden":2688,"mamba_heads":32,"experts":128,"expert_ffn":1328}',
                 "--choices", '{"hidden":1920,"mamba_heads":48,"experts":128,"expert_ffn":960}']) == 0
    out = capsys.readouterr().out
    # SPEC 3.2's table, computed independently of this code base
    for label, total_b, active_b in (("choice1", 22.839, 2.806), ("choice2", 12.290, 1.946)):
        total, active, frac = _counts(out, label)
        assert round(total / 1e9, 3) == total_b and round(active / 1e9, 3) == active_b, (label, total, active)
    assert _row(out, "choice2")[1:6] == ["1920", "48", "32", "128", "960"]
    assert re.search(r"separate/nested = [\d.]+x", out)


def test_info_elastic_checkpoint_measures_storage(tmp_path, capsys):
    cfg = sej.ModelConfig.preset("tiny")
    model = random_model(cfg, seed=11)
    budgets = {"full": sej.ElasticChoice(), "mid": sej.ElasticChoice(hidden=48, mamba_heads=4, expert_ffn=24),
               "small": sej.ElasticChoice(hidden=32, mamba_heads=4, experts=2, expert_ffn=16, mlp_ffn=64)}
    path = sej.save_elastic(model, tmp_path / "ck", budgets)
    before = sorted(os.listdir(tmp_path))
    assert main(["info", "--ckpt", path]) == 0
    out = capsys.readouterr().out
    for name, choice in budgets.items():
        pc = cfg.param_count(choice)
        assert _counts(out, name)[:2] == (pc.total, pc.active)
    m = re.search(r"measured on disk: nested checkpoint ([\d,]+) B .* vs separately sliced checkpoints ([\d,]+) B "
                  r".*separate/nested = ([\d.]+)x", out)
    assert m, out
    nested, separate = int(m[1].replace(",", "")), int(m[2].replace(",", ""))
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    assert nested == on_disk
    assert nested < separate < 3 * nested  # three sub-models, the largest one the nested model itself
    assert sorted(os.listdir(tmp_path)) == before  # temporaries removed
    # budget names of the checkpoint and fractions mix in --budgets
    assert main(["info", "--ckpt", path, "--budgets", "mid,0.5"]) == 0
    out = capsys.readouterr().out
    assert _counts(out, "mid")[:2] == tuple(cfg.param_count(budgets["mid"]).__dict__.values())
    assert "measured on disk" in out and _row(out, "0.5")
    assert main(["info", "--ckpt", path, "--budgets", "nope"]) == 2
    assert "--budgets='nope'" in capsys.readouterr().err


@pytest.mark.parametrize("args, flag", [
    (["--budgets", ""], "--budgets"),
    (["--budgets", "1.0,,0.5"], "--budgets"),
    (["--budgets", "0.577,0.78,1.0"], "--budgets"),    # unsorted
    (["--budgets", "1.0,0.78,0.78"], "--budgets"),     # repeated
    (["--budgets", "1.2,0.5"], "--budgets"),           # out of range
    (["--budgets", "0"], "--budgets"),
    (["--budgets", "30B"], "--budgets"),               # unknown budget name (no checkpoint)
    (["--choices", "{hidden: 2688}"], "--choices"),    # malformed JSON
    (["--choices", "[2688, 32]"], "--choices"),        # not an object
    (["--choices", '{"hiden": 2688}'], "--choices"),   # unknown axis
    (["--choices", '{"mamba_heads": 30}'], "--choices"),  # not a multiple of n_groups
    (["--choices", '{"hidden": 4096}'], "--choices"),  # larger than the model
    (["--budgets", "1.0", "--choice-lists", "{bad"], "--choice-lists"),
    (["--budgets", "1.0", "--choice-lists", '{"hidden": [1920, 2688]}'], "--choice-lists"),
])
def test_info_bad_inputs_exit_2_naming_the_flag(args, flag, capsys):
    assert main(["info", "--config", "nano-v3-30b", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err, err


def test_info_choice_lists_override(capsys):
    assert main(["info", "--config", "tiny", "--budgets", "1.0,0.5",
                 "--choice-lists", '{"hidden": [64, 32], "mamba_heads": [8, 4]}']) == 0
    out = capsys.readouterr().out
    cells = _row(out, "0.5")
    assert cells[1] in ("64", "32") and cells[2] in ("8", "4")
    assert cells[3:6] == ["4", "4", "32"]  # attn_heads, experts, expert_ffn: not listed, so full
