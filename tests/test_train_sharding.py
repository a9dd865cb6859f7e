"""Sharding invariance of the elastic KD train step (teacher + masked student + router, AdamW,
gradient accumulation over 2 micro-batches with fixed budgets and keys): the same losses (<= 1e-5
relative) on 1 device and on 8 fake CPU devices as data 8, data 2 x fsdp 2 x expert 2, and fsdp 2 x
expert 2 x tensor 2. Also: a checkpoint written on the data-8 mesh restores onto the fsdp x expert x
tensor mesh (every array on that mesh's shardings, values bitwise equal) and training continues
there with the same loss.

The 8-device half runs this file as a script in a subprocess (started first, so the in-process
1-device work overlaps it)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from test_train_step import N_MICRO, ROWS, SEQ, batch, kd_objects, leaves, one_device_mesh, parent_and_router

from star_elastic_jax.train import sharding as sh
from star_elastic_jax.train.checkpointing import TrainCheckpointer

MESHES = ((8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2))
SAVE_ON, RESTORE_ON = MESHES[0], MESHES[2]
BUDGETS = np.array([1, 2], np.int32)   # fixed budgets (0.78, 0.577); router keys are fixed by the step
LOSS_RTOL = 1e-5


def two_steps(mesh, *, save_to=None):
    """Two KD steps from the parent; returns (metrics of step 1, metrics of step 2, params after step 1)."""
    ts = kd_objects(mesh)
    parent, router = parent_and_router()
    state = ts.init_state(parent, router, seed=0)
    teacher = ts.teacher_from(parent)
    step = ts.train_step(N_MICRO, ROWS, SEQ)
    p0 = leaves(state["params"])
    state, m1 = step(state, teacher, ts.put_batch(batch(0), N_MICRO), BUDGETS)
    p1 = leaves(state["params"])
    assert any(not np.array_equal(p0[k], p1[k]) for k in p1), "step 1 must move the parameters"
    if save_to is not None:
        with TrainCheckpointer(save_to) as ck:
            ck.save(1, state, meta={"mesh": list(mesh.axis_sizes)})
    state, m2 = step(state, teacher, ts.put_batch(batch(1), N_MICRO), BUDGETS)
    return jax.device_get(m1), jax.device_get(m2), p1


def tag(shape):
    return "x".join(map(str, shape))


# ----------------------------------------------------------------------------------- worker
def _worker(out_path: str, ckpt_dir: str) -> None:
    jax.config.update("jax_num_cpu_devices", 8)
    assert jax.device_count() == 8, jax.devices()
    out = {}
    for shape in MESHES:
        mesh = sh.make_mesh(sh.MeshConfig(*shape))
        m1, m2, p1 = two_steps(mesh, save_to=ckpt_dir if shape == SAVE_ON else None)
        for k in ("loss", "kd_loss", "router_loss", "active_frac"):
            out[f"{tag(shape)}/1/{k}"] = m1[k]
            out[f"{tag(shape)}/2/{k}"] = m2[k]
        if shape == SAVE_ON:
            saved = p1
    # restore the data-8 checkpoint onto fsdp 2 x expert 2 x tensor 2 and take step 2 there
    mesh = sh.make_mesh(sh.MeshConfig(*RESTORE_ON))
    ts = kd_objects(mesh)
    parent, _ = parent_and_router()
    with TrainCheckpointer(ckpt_dir) as ck:
        assert ck.latest_step() == 1
        state, meta = ck.restore(ts.abstract_state())
    assert meta["mesh"] == list(SAVE_ON)
    for (path, a), s in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(ts.state_sharding)):
        assert a.sharding.is_equivalent_to(s, a.ndim), (jax.tree_util.keystr(path), a.sharding, s)
    sharded = [jax.tree_util.keystr(p) for p, a in jax.tree_util.tree_leaves_with_path(state)
               if len(a.sharding.device_set) == 8 and not a.sharding.is_fully_replicated]
    out["restored/n_sharded"] = np.asarray(len(sharded))
    restored = leaves(state["params"])
    out["restored/equal"] = np.asarray(all(np.array_equal(restored[k], saved[k]) for k in saved))
    step = ts.train_step(N_MICRO, ROWS, SEQ)
    _, m2 = step(state, ts.teacher_from(parent), ts.put_batch(batch(1), N_MICRO), BUDGETS)
    out["restored/2/loss"] = jax.device_get(m2)["loss"]
    np.savez(out_path, **out)


@pytest.fixture(scope="module")
def worker():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.npz")
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), path, os.path.join(tmp, "ck")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)))

        def result():
            if not hasattr(result, "value"):
                _, err = proc.communicate(timeout=900)
                assert proc.returncode == 0, err[-5000:]
                with np.load(path) as f:
                    result.value = dict(f)
            return result.value

        yield result
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def one_device():
    return two_steps(one_device_mesh())


# ----------------------------------------------------------------------------------- tests
def test_sharding_invariance_and_restore_onto_another_mesh(worker, one_device):
    """One test function (under pytest-xdist the 8-device worker runs once)."""
    m1, m2, _ = one_device
    res = worker()
    for shape in MESHES:
        for step, m in ((1, m1), (2, m2)):
            for k in ("loss", "kd_loss", "router_loss", "active_frac"):
                got, want = res[f"{tag(shape)}/{step}/{k}"], m[k]
                assert np.all(np.isfinite(want)) and want.shape == (N_MICRO,)
                np.testing.assert_allclose(got, want, rtol=LOSS_RTOL, atol=1e-7, err_msg=f"{shape} step {step} {k}")
    # the data-8 checkpoint restored onto fsdp 2 x expert 2 x tensor 2
    assert bool(res["restored/equal"])                 # bitwise, gathered from the new shardings
    assert int(res["restored/n_sharded"]) > 10          # really spread over the 8 devices
    np.testing.assert_allclose(res["restored/2/loss"], res[f"{tag(RESTORE_ON)}/2/loss"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(res["restored/2/loss"], m2["loss"], rtol=LOSS_RTOL)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
