"""One budget validation (issue 10, item 1): every public entry that takes a budget -- the CLI
(``slice --budget``, ``info --budgets``), the train config, the router (its config and a concrete
budget), checkpoints (``resolve_budget``), slicing and the choice search -- refuses 0, 1.5, NaN and
"abc" with the same error type and message, raised by ``elastic.budget.validate_fraction`` itself
(the innermost frame of the traceback), never by a copy of the check. Entries that take user text
(a budget name or ``"0.78"``) parse it with ``parse_fraction`` first; numeric entries refuse text."""
from __future__ import annotations

import math
import os

import pytest
from flax import nnx

import star_elastic_jax as sej
from star_elastic_jax.checkpoint.elastic import read_elastic
from star_elastic_jax.export.elastic import slice_checkpoint
from star_elastic_jax.cli import main
from star_elastic_jax.elastic.budget import (FRACTION_VALID, choice_for_budget, default_choice_lists, parse_fraction,
                                             resolve_budget, validate_budgets, validate_fraction)
from star_elastic_jax.elastic.router import BudgetRouter, RouterConfig
from star_elastic_jax.errors import ChoiceError
from star_elastic_jax.train.config import from_config_dict
from star_elastic_jax.train.overrides import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = sej.ModelConfig.preset("tiny")
BAD = [0, 0.0, "0", 1.5, "1.5", math.nan, "nan", "abc", -0.2, True]


@pytest.fixture(scope="module")
def el(tmp_path_factory):
    model = sej.NemotronH(CFG, rngs=nnx.Rngs(0))
    return sej.save_elastic(model, tmp_path_factory.mktemp("b") / "el",
                            budgets={"full": sej.ElasticChoice(), "small": sej.ElasticChoice(hidden=48)})


def _tiny_config(budgets):
    c = load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    c.router.budgets = budgets
    return c


def entries(el, tmp_path):
    lists = default_choice_lists(CFG)
    rc = RouterConfig.default(CFG, budgets=(1.0, 0.5))
    router = BudgetRouter(CFG, rc, rngs=nnx.Rngs(0))
    info = read_elastic(el)
    return {
        "validate_fraction": lambda b: validate_fraction(b),
        "parse_fraction": lambda b: parse_fraction(b),
        "choice_for_budget": lambda b: choice_for_budget(CFG, b, lists),
        "RouterConfig": lambda b: RouterConfig.default(CFG, budgets=(b,)),
        "BudgetRouter.choice": lambda b: router.choice(b),
        "train config": lambda b: from_config_dict(_tiny_config((b,))),
        "resolve_budget": lambda b: resolve_budget(info, b),
        "slice_checkpoint": lambda b: slice_checkpoint(el, b, tmp_path / "out"),
    }


def _origin(excinfo) -> str:
    tb = excinfo.tb
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_frame.f_code.co_name}"


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_every_library_entry_refuses_with_the_one_function(el, tmp_path, bad):
    for name, call in entries(el, tmp_path).items():
        with pytest.raises(ChoiceError) as e:
            call(bad)
        assert type(e.value) is ChoiceError, name
        assert e.value.valid.startswith(FRACTION_VALID), (name, e.value.valid)
        assert _origin(e) == "budget.py:validate_fraction", (name, _origin(e))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("bad", ["0", "1.5", "nan", "abc"])
def test_cli_entries_print_the_same_message(el, tmp_path, bad, capsys):
    for argv in (["slice", "--ckpt", str(el), "--budget", bad, "--out", str(tmp_path / "o")],
                 ["info", "--config", "tiny", "--budgets", bad],
                 ["info", "--ckpt", str(el), "--budgets", f"small,{bad}"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error:") and FRACTION_VALID in err, (argv, err)


def test_good_values_pass_everywhere_alike(el, tmp_path):
    assert parse_fraction("0.78") == parse_fraction(" 0.78") == validate_fraction(0.78) == 0.78
    assert validate_fraction(1) == 1.0 and validate_budgets([1.0, 0.5]) == (1.0, 0.5)
    with pytest.raises(ChoiceError, match="budget"):  # numeric entries take numbers, not text
        validate_fraction("0.5")
    for values, match in (([0.5, 1.0], "descending"), ([0.5, 0.5], "distinct"), ([], "non-empty"), ("0.5", "list")):
        with pytest.raises(ChoiceError, match=match):
            validate_budgets(values)
    assert RouterConfig.default(CFG, budgets=(1.0, 0.5)).budgets == (1.0, 0.5)


def test_stored_names_are_offered_in_the_message(el):
    with pytest.raises(ChoiceError, match=r"or a budget name \(full, small\)"):
        resolve_budget(read_elastic(el), "nope")
