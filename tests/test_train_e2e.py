"""``star-elastic train --config configs/tiny.py`` end to end, from nothing, with very few steps: CE
pre-training of a parent, importance ranking, two elastic KD stages (stopped part-way with
``--stop-after`` and resumed by running the same command again), metrics (JSON lines + TensorBoard),
checkpoints, and the final nested elastic checkpoint, which the ``slice`` command then cuts.

The overrides shrink tiny.py to the shapes of test_train_step, so the steps compiled there are reused."""
from __future__ import annotations

import glob
import json
import os

import pytest
from test_train_step import CFG, ROOT, TEST_OVERRIDES

from star_elastic_jax.checkpoint.elastic import load_elastic, read_elastic
from star_elastic_jax.checkpoint.orbax import read_config, read_metadata
from star_elastic_jax.cli import main
from star_elastic_jax.train.checkpointing import TrainCheckpointer
from star_elastic_jax.train.metrics import read_jsonl

STOP = 5


def test_tiny_config_end_to_end(tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = ["train", "--config", os.path.join(ROOT, "configs", "tiny.py"), "--workdir", str(workdir), *TEST_OVERRIDES]
    assert main(argv + ["--stop-after", str(STOP)]) == 0
    out = capsys.readouterr()
    assert f"stopped after {STOP} elastic KD steps" in out.out
    assert "tok/s" in out.err and "pretrain" in out.err and "kd" in out.err   # progress bars
    assert not os.path.exists(workdir / "elastic")
    assert TrainCheckpointer(workdir / "checkpoints" / "kd").latest_step() == STOP

    assert main(argv) == 0                                                  # resume to the end
    out = capsys.readouterr()
    assert "kd@start" in out.out and "nested elastic checkpoint" in out.out
    assert "pretrain" not in out.err                                        # the parent is not rebuilt

    check_run_directory_layout(workdir)
    check_metrics_jsonl(workdir)
    check_nested_checkpoint(workdir, tmp_path)
    assert main(["slice", "--ckpt", str(workdir / "elastic"), "--budget", "0.577", "--out", str(tmp_path / "s")]) == 0
    assert "budget 0.577" in capsys.readouterr().out


def check_run_directory_layout(workdir):
    kd = TrainCheckpointer(workdir / "checkpoints" / "kd")
    assert kd.all_steps() == [STOP, 6, 8]          # every 2 steps + the --stop-after step, keep the last 3
    assert TrainCheckpointer(workdir / "checkpoints" / "pretrain").latest_step() == CFG.pretrain.steps
    assert read_metadata(workdir / "parent") == {"source": "ce-pretrain", "ranked": True}
    assert read_config(workdir / "parent") == CFG.model
    assert json.load(open(workdir / "train_config.json"))["router"]["budgets"] == [1.0, 0.78, 0.577]
    events = glob.glob(str(workdir / "tensorboard" / "metrics" / "events.out.tfevents.*"))
    assert events and os.path.getsize(events[0]) > 0
    assert glob.glob(str(workdir / "tensorboard" / "pretrain_metrics" / "events.out.tfevents.*"))


def check_metrics_jsonl(workdir):
    recs = read_jsonl(workdir / "metrics.jsonl")
    assert all({"step", "budget", "kd_loss"} <= set(r) for r in recs)
    train = [r for r in recs if r.get("split") != "eval"]
    n_micro = CFG.stages[0].micro_batches
    assert sorted({(r["step"], r["micro_batch"]) for r in train}) == \
        [(s, j) for s in range(1, CFG.total_steps + 1) for j in range(n_micro)]
    for r in train:
        assert r["budget"] in CFG.router.budgets and r["kd_loss"] >= 0 and r["tokens_per_s"] > 0
        assert {"router_loss", "tau", "active_frac", "size/hidden", "stage", "lr", "grad_norm"} <= set(r)
    assert {r["stage"] for r in train} == {"stage1", "stage2"}
    evals = [r for r in recs if r.get("split") == "eval"]
    assert sorted((r["step"], r["budget"]) for r in evals) == \
        sorted((s, b) for s in (0, CFG.total_steps) for b in CFG.router.budgets)
    assert all(0 < r["active_frac"] <= 1 and r["active_params"] > 0 for r in evals)
    pre = read_jsonl(workdir / "pretrain_metrics.jsonl")
    assert sorted({r["step"] for r in pre if r.get("split") != "eval"}) == list(range(1, CFG.pretrain.steps + 1))
    assert all(r["ce_loss"] > 0 for r in pre)


def check_nested_checkpoint(workdir, tmp_path):
    info = read_elastic(workdir / "elastic")
    assert sorted(info.budgets) == ["0.577", "0.78", "1.0"]
    assert info.choice_lists == {a: list(s) for a, s in CFG.router.choice_lists}
    last = {r["budget"]: r for r in read_jsonl(workdir / "metrics.jsonl")
            if r.get("split") == "eval" and r["step"] == CFG.total_steps}
    for name, choice in info.budgets.items():                               # the router's argmax choices
        full = CFG.model.param_count().active
        assert CFG.model.param_count(choice).active / full == pytest.approx(last[float(name)]["active_frac"],
                                                                             rel=1e-5)
        assert choice.hidden == last[float(name)]["size/hidden"]
    ck = load_elastic(workdir / "elastic")
    assert set(ck.router_state["routers"]) == set(CFG.router.choice_dict)
    from star_elastic_jax.checkpoint.orbax import read_metadata

    assert read_metadata(workdir / "elastic")["tokenizer"] == CFG.data.tokenizer  # generation decodes with it
