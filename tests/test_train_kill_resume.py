"""Honest resume (issue 9, item 4): ``star-elastic train`` SIGKILLed at a checkpoint commit, then run
again, ends with the weights of an uninterrupted run and exactly its metrics.jsonl rows; a damaged
latest checkpoint resumes from the previous one; a changed config is refused; staging leftovers of
a killed run are removed.

The kills are real SIGKILLs of a subprocess at a deterministic point, through the fault-injection
hook of ``train/checkpointing.py`` (``STAR_ELASTIC_FAULT``): just before Orbax commits step N (its
manifest already written), and just after step N is committed. The reference is the same command
run straight through. The parent is a fixed random model given as ``pretrain.parent`` (ranked), so
only the elastic KD phase runs: 8 steps, a checkpoint every 2.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_train_step import MODEL, ROOT, TEST_OVERRIDES
from train_fixtures import random_params

from star_elastic_jax.checkpoint.orbax import load_params, save_params
from star_elastic_jax.cli import main
from star_elastic_jax.train.checkpointing import FAULT_ENV, TrainCheckpointer
from star_elastic_jax.train.metrics import read_jsonl

TIMING_FIELDS = ("tokens_per_s",)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A ranked parent checkpoint, the train argv for a workdir, and the uninterrupted reference run."""
    root = tmp_path_factory.mktemp("kill")
    parent = save_params(MODEL, random_params(MODEL, seed=3), root / "parent")
    cache = str(root / "jax-cache")  # the subprocesses share their compiled steps

    def argv(workdir, *extra):
        return ["train", "--config", os.path.join(ROOT, "configs", "tiny.py"), "--workdir", str(workdir),
                *TEST_OVERRIDES, f"--config.pretrain.parent={parent}", "--config.pretrain.ranked=true",
                "--no-progress", *extra]

    ref = root / "reference"
    assert main(argv(ref)) == 0
    return {"root": root, "argv": argv, "ref": ref, "cache": cache}


def run_killed(runs, workdir, fault, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=runs["cache"], **{FAULT_ENV: fault})
    proc = subprocess.run([sys.executable, "-m", "star_elastic_jax.cli", *runs["argv"](workdir, *extra)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-3000:])  # SIGKILL
    return proc


def metric_rows(workdir):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_jsonl(workdir / "metrics.jsonl")]


def assert_same_run(workdir, ref):
    _, got = load_params(workdir / "elastic")
    _, want = load_params(ref / "elastic")
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=str(k))
    for name in ("router",):
        a = json.dumps(sorted(os.listdir(workdir / "elastic" / name)))
        assert a == json.dumps(sorted(os.listdir(ref / "elastic" / name)))
    assert metric_rows(workdir) == metric_rows(ref)


@pytest.mark.parametrize("fault, resumes_from", [("after-commit:kd:4", 4), ("before-commit:kd:4", 2)])
def test_sigkill_at_a_checkpoint_commit_then_resume_equals_an_uninterrupted_run(runs, fault, resumes_from, capsys):
    workdir = runs["root"] / fault.replace(":", "_")
    run_killed(runs, workdir, fault)
    ck = TrainCheckpointer(workdir / "checkpoints" / "kd")
    assert ck.latest_step() == resumes_from
    ck.close()
    rows = read_jsonl(workdir / "metrics.jsonl")
    # every row of the committed steps reached the disk before the kill
    assert {r["step"] for r in rows if r.get("split") != "eval"} >= set(range(1, resumes_from + 1))
    assert main(runs["argv"](workdir)) == 0
    capsys.readouterr()
    assert_same_run(workdir, runs["ref"])


def test_damaged_latest_checkpoint_resumes_from_the_previous_one(runs, capsys):
    workdir = runs["root"] / "damaged"
    run_killed(runs, workdir, "after-commit:kd:6")
    kd = workdir / "checkpoints" / "kd"
    state = kd / "6" / "state"
    big = max((os.path.join(d, f) for d, _, fs in os.walk(state) for f in fs), key=os.path.getsize)
    data = bytearray(open(big, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(big, "wb").write(bytes(data))
    assert main(runs["argv"](workdir)) == 0
    err = capsys.readouterr().err
    assert "checkpoint step 6 is damaged" in err and os.path.basename(big) in err, err
    assert os.path.isdir(kd / "6.corrupt")  # kept for inspection, never deleted
    assert_same_run(workdir, runs["ref"])


def test_changed_config_is_refused_unless_allowed(runs, capsys, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(runs["ref"], workdir)
    before = open(workdir / "train_config.json").read()
    rc = main(runs["argv"](workdir, "--config.optim.lr=0.5", "--config.seed=7"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "optim.lr" in err and "seed" in err, err
    assert open(workdir / "train_config.json").read() == before
    # logging, eval frequency and checkpoint frequency may change
    assert main(runs["argv"](workdir, "--config.log.every=3", "--config.eval.every=7")) == 0
    capsys.readouterr()
    assert main(runs["argv"](workdir, "--config.optim.lr=0.5", "--allow-config-change")) == 0
    assert "optim.lr" in capsys.readouterr().err
    kept = json.load(open(workdir / "train_config.1.json"))
    assert kept["optim"]["lr"] != 0.5 and json.load(open(workdir / "train_config.json"))["optim"]["lr"] == 0.5


def test_staging_leftovers_of_a_killed_run_are_removed_and_nothing_else(runs, capsys, tmp_path):
    from star_elastic_jax.outputs import STAGING_MARKER

    workdir = tmp_path / "run"
    shutil.copytree(runs["ref"], workdir)
    ours = workdir / ".tmp-ckpt-abc123"
    ours.mkdir()
    (ours / STAGING_MARKER).write_text("x")
    (ours / "half.bin").write_bytes(b"0" * 10)
    theirs = workdir / ".tmp-ckpt-users"   # same prefix, no marker: not ours
    theirs.mkdir()
    (theirs / "keep.txt").write_text("keep")
    assert main(runs["argv"](workdir)) == 0
    assert "staging directory" in capsys.readouterr().out
    assert not ours.exists() and (theirs / "keep.txt").read_text() == "keep"


def test_bad_workdir_and_stop_after_are_one_line_errors(runs, capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for extra, wd, match in ((["--stop-after", "-5"], tmp_path / "w", "--stop-after"),
                             (["--stop-after", "0"], tmp_path / "w", "--stop-after"),
                             ([], f, "--workdir"), ([], f / "sub", "--workdir")):
        rc = main(runs["argv"](wd, *extra))
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error:") and "\n" not in err and match in err, (extra, err)
    assert not (tmp_path / "w").exists() and f.read_text() == "x"
