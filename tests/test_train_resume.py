"""Exact resume and crash safety of the training checkpoints.

* N elastic KD steps, a restart that rebuilds everything from the checkpoint (state, grain iterator,
  step; budgets and router noise are keyed by the step), then N more steps equal 2N steps run straight
  through, bitwise on CPU -- across a stage boundary, and with a partially written newer checkpoint
  (a crash mid-save) lying in the checkpoint directory.
* A process killed in the middle of an async save leaves only an unfinished directory; the previous
  step is what restores.
(Restoring onto another mesh shape is in test_train_sharding, which has 8 devices.)"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from test_train_step import CFG, leaves, one_device_mesh, parent_and_router

from star_elastic_jax.train.checkpointing import TrainCheckpointer
from star_elastic_jax.train.metrics import read_jsonl
from star_elastic_jax.train.trainer import elastic_kd

N = 3  # stage 1 has 4 steps: the resumed half crosses into stage 2 (another dataset and sampling)


def train_lines(workdir):
    return {(r["step"], r["micro_batch"]): r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if r.get("split") != "eval"}


def test_resume_is_bitwise_equal_to_straight_through(tmp_path):
    assert CFG.stages[0].steps > N and 2 * N <= CFG.total_steps
    parent, _ = parent_and_router()
    mesh = one_device_mesh()
    straight = elastic_kd(CFG, str(tmp_path / "a"), parent, mesh, until=2 * N, progress=False)
    want = leaves(straight.state)

    first = elastic_kd(CFG, str(tmp_path / "b"), parent, mesh, until=N, progress=False)
    assert first.step == N and not first.finished
    ckdir = tmp_path / "b" / "checkpoints" / "kd"
    assert TrainCheckpointer(ckdir).latest_step() == N
    # a crash while saving step N + 1 left an unfinished directory behind
    shutil.copytree(ckdir / str(N), ckdir / f"{N + 1}.orbax-checkpoint-tmp-1700000000")
    del first
    resumed = elastic_kd(CFG, str(tmp_path / "b"), parent, mesh, until=2 * N, progress=False)
    assert resumed.step == 2 * N
    got = leaves(resumed.state)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)   # params, optimizer, router, step, rng
    a, b = train_lines(tmp_path / "a"), train_lines(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) == 2 * N * CFG.stages[0].micro_batches
    for key in a:
        for field in ("budget", "kd_loss", "router_loss", "active_frac", "grad_norm", "tau", "stage"):
            assert a[key][field] == b[key][field], (key, field)
    assert {a[(s, 0)]["stage"] for s in range(1, 2 * N + 1)} == {"stage1", "stage2"}


_CRASH = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp, numpy as np
    from star_elastic_jax.train.checkpointing import TrainCheckpointer
    ck = TrainCheckpointer(sys.argv[1], keep=3, async_save=True)
    ck.save(1, {"w": jnp.full((4,), 1.0), "step": jnp.int32(1)}, meta={"stage": 0})
    ck.wait()
    big = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((64, 1024, 1024), np.float32)),
           "step": jnp.int32(2)}
    ck.save(2, big, meta={"stage": 0})
    os._exit(3)  # killed while the async write of step 2 is in flight
""")


def test_killed_mid_save_restores_the_previous_step(tmp_path):
    d = tmp_path / "ck"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(d)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    entries = sorted(os.listdir(d))
    assert "1" in entries and "2" not in entries, entries
    assert any(e.startswith("2.orbax-checkpoint-tmp") for e in entries), entries  # the partial write
    ck = TrainCheckpointer(d)
    assert ck.latest_step() == 1 and ck.all_steps() == [1]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"w": jax.ShapeDtypeStruct((4,), np.float32, sharding=sharding),
              "step": jax.ShapeDtypeStruct((), np.int32, sharding=sharding)}
    state, meta = ck.restore(target)
    assert int(state["step"]) == 1 and meta == {"stage": 0}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.ones(4, np.float32))
    ck.close()


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
    from star_elastic_jax.errors import CheckpointError

    ck = TrainCheckpointer(tmp_path / "none")
    assert ck.latest_step() is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ck.restore({})
    ck.close()
