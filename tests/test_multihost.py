"""Multi-host start-up (``star_elastic_jax.distributed``): env / SLURM / TPU parsing, validation errors,
and two CPU processes (gloo collectives) training 3 CE steps that match a single-process run.

The two-process run: each process has one CPU device, joins via ``distributed.initialize`` on
127.0.0.1, builds a ``data = 2`` mesh over the 2 global devices and reads only its own data shard
(``make_dataset(process_index=jax.process_index(), process_count=2)``); ``TrainStep.put_batch`` makes
the global batch with ``jax.make_array_from_process_local_data``. The reference is one process with
2 CPU devices (``--xla_force_host_platform_device_count=2``) that feeds the concatenation of both
shards in process order, i.e. the same global batch (checked too).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from star_elastic_jax import distributed as dist
from star_elastic_jax.distributed import DistributedConfig, first_slurm_host
from star_elastic_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")


# ============================================================================================ parsing
@pytest.mark.parametrize("nodelist, host", [
    ("node07", "node07"),
    ("a,b", "a"),
    ("node[01-04]", "node01"),
    ("node[001,007-015],host2", "node001"),
    ("gpu[3,5-7],cpu1", "gpu3"),
    ("rack[1-2]-n[01-04]", "rack1-n01"),
    ("host-a.example.com,host-b", "host-a.example.com"),
    (" node[10-11] ", "node10"),
])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


@pytest.mark.parametrize("bad", ["", "node[01-04", "[01-02]", "node]1"])
def test_first_slurm_host_errors(bad):
    with pytest.raises(ConfigError):
        first_slurm_host(bad)


def test_from_env_nothing_is_single_process():
    cfg = DistributedConfig.from_env({})
    assert cfg.source == "single" and not cfg.multi_process and cfg.num_processes == 1
    assert dist.initialize(DistributedConfig(num_processes=1, process_id=0)).multi_process is False


def test_from_env_explicit():
    cfg = DistributedConfig.from_env({dist.ENV_COORDINATOR: "10.0.0.1:1234", dist.ENV_NUM_PROCESSES: "4",
                                      dist.ENV_PROCESS_ID: "3", dist.ENV_LOCAL_DEVICE_IDS: "0, 1"})
    assert cfg == DistributedConfig("10.0.0.1:1234", 4, 3, (0, 1), source="env")
    assert cfg.validate().multi_process


SLURM = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2",
         "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_JOB_NODELIST": "gpu[01-10]",
         "SLURM_STEP_TASKS_PER_NODE": "1(x4)"}


def test_from_env_slurm():
    cfg = DistributedConfig.from_env(SLURM)
    port = 61440 + 123456 % 4096
    assert cfg == DistributedConfig(f"gpu07:{port}", 4, 2, None, source="slurm")
    # the step's nodelist wins; the job's is the fallback; an explicit port / coordinator wins over SLURM's
    env = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
    assert DistributedConfig.from_env(env).coordinator_address == f"gpu01:{port}"
    assert DistributedConfig.from_env({**SLURM, dist.ENV_COORDINATOR_PORT: "29500"}).coordinator_address \
        == "gpu07:29500"
    assert DistributedConfig.from_env({**SLURM, dist.ENV_COORDINATOR: "head:1"}).coordinator_address == "head:1"
    # auto=False: SLURM is ignored
    assert DistributedConfig.from_env(SLURM, auto=False).source == "single"


def test_from_env_slurm_tasks_per_gpu():
    env = {**SLURM, "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "5",
           "SLURM_PROCID": "13"}
    cfg = DistributedConfig.from_env(env)
    assert (cfg.num_processes, cfg.process_id, cfg.local_device_ids) == (16, 13, (5,))
    # SLURM bound one GPU to the task: it is the only (local 0) device, nothing to select
    assert DistributedConfig.from_env({**env, "CUDA_VISIBLE_DEVICES": "5"}).local_device_ids is None


@pytest.mark.parametrize("var", ["TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_ACCELERATOR_TYPE"])
def test_from_env_tpu(var):
    cfg = DistributedConfig.from_env({var: "x"})
    assert cfg.source == "tpu" and cfg.multi_process and cfg.num_processes is None
    assert DistributedConfig.from_env({var: "x"}, auto=False).source == "single"


def test_resolved_fills_unset_fields_from_env(monkeypatch):
    for k in dist.ENV_VARS + dist.TPU_ENV_VARS + tuple(SLURM):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(dist.ENV_COORDINATOR, "h:9")
    monkeypatch.setenv(dist.ENV_NUM_PROCESSES, "2")
    cfg = DistributedConfig(process_id=1).resolved()
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("h:9", 2, 1)
    assert DistributedConfig(auto=False).resolved().source == "single"


@pytest.mark.parametrize("kwargs, field", [
    ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"}, "distributed.process_id"),
    ({"num_processes": 2, "process_id": -1, "coordinator_address": "h:1"}, "distributed.process_id"),
    ({"num_processes": 2, "process_id": 0}, "distributed.coordinator_address"),
    ({"num_processes": 2, "coordinator_address": "h:1"}, "distributed.process_id"),
    ({"num_processes": 0, "process_id": 0}, "distributed.num_processes"),
    ({"process_id": 1}, "distributed.num_processes"),
    ({"num_processes": 2, "process_id": 0, "coordinator_address": "h"}, "distributed.coordinator_address"),
    ({"num_processes": 2, "process_id": 0, "coordinator_address": "h:70000"}, "distributed.coordinator_address"),
    ({"num_processes": 1, "process_id": 0, "local_device_ids": (-1,)}, "distributed.local_device_ids"),
])
def test_validation_errors(kwargs, field):
    with pytest.raises(ConfigError) as e:
        dist.initialize(DistributedConfig(auto=False, **kwargs))  # raises before JAX is touched
    assert e.value.field == field


@pytest.mark.parametrize("env, field", [
    ({dist.ENV_NUM_PROCESSES: "two"}, dist.ENV_NUM_PROCESSES),
    ({dist.ENV_LOCAL_DEVICE_IDS: "0,a"}, dist.ENV_LOCAL_DEVICE_IDS),
    ({dist.ENV_COORDINATOR_PORT: "0"}, dist.ENV_COORDINATOR_PORT),
    ({**SLURM, "SLURM_PROCID": "x"}, "SLURM_PROCID"),
])
def test_env_errors(env, field):
    with pytest.raises(ConfigError) as e:
        DistributedConfig.from_env(env)
    assert e.value.field == field


def test_env_inconsistent_values_fail_validation():
    cfg = DistributedConfig.from_env({dist.ENV_COORDINATOR: "h:1", dist.ENV_NUM_PROCESSES: "2",
                                      dist.ENV_PROCESS_ID: "5"})
    with pytest.raises(ConfigError, match="process_id=5.*num_processes=2"):
        cfg.validate()


def test_flags():
    import argparse

    args = dist.add_flags(argparse.ArgumentParser()).parse_args(
        ["--coordinator", "h:2", "--num-processes", "3", "--process-id", "1", "--local-device-ids", "0,1",
         "--no-auto"])
    assert dist.config_from_args(args) == DistributedConfig("h:2", 3, 1, (0, 1), auto=False)


def test_main_single_process_without_command(monkeypatch, capsys):
    from star_elastic_jax.launcher import main as launcher_main  # the entry above distributed and the CLI

    for k in dist.ENV_VARS + dist.TPU_ENV_VARS + tuple(SLURM):
        monkeypatch.delenv(k, raising=False)
    assert launcher_main(["--no-auto"]) == 0
    assert launcher_main(["--num-processes", "2", "--process-id", "0"]) == 2  # no coordinator: a clear error
    assert "coordinator_address" in capsys.readouterr().err


# ============================================================================================ two processes
def _free_port() -> int:
    try:
        import portpicker

        return portpicker.pick_unused_port()
    except ImportError:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def _env(n_devices: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in dist.ENV_VARS + dist.TPU_ENV_VARS and not k.startswith("SLURM_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
               PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _run(name: str, cmds: list[tuple[list[str], dict]], tmp_path, timeout: float) -> list[str]:
    """Start every command, wait for all (killing all on the first failure or the deadline)."""
    procs, logs = [], []
    for i, (cmd, env) in enumerate(cmds):
        log = open(tmp_path / f"{name}{i}.log", "w+")  # noqa: SIM115 (closed below)
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                failed = "a process failed"
                break
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout:.0f}s"
                break
            time.sleep(0.2)
        if failed is None and any(p.returncode != 0 for p in procs):
            failed = "a process failed"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    out = []
    for log in logs:
        log.seek(0)
        out.append(log.read())
        log.close()
    if failed:
        pytest.fail(f"{failed}: exit codes {[p.returncode for p in procs]}\n" +
                    "\n".join(f"--- process {i}\n{o[-3000:]}" for i, o in enumerate(out)))
    return out


def test_two_processes_match_single_process(tmp_path):
    t0 = time.monotonic()
    port = _free_port()
    multi = [([sys.executable, WORKER, "multi", str(i), "2", str(port), str(tmp_path / f"multi{i}.npz")], _env(1))
             for i in range(2)]
    logs = _run("multi", multi, tmp_path, timeout=150)
    single = [([sys.executable, WORKER, "single", "0", "2", "0", str(tmp_path / "single.npz")], _env(2))]
    _run("single", single, tmp_path, timeout=120)
    m0, m1, s = (np.load(tmp_path / f) for f in ("multi0.npz", "multi1.npz", "single.npz"))

    # each process fed only its own shard (2 of the 4 global rows, different data); together they are
    # exactly the single process's global batches
    assert m0["tokens"].shape == m1["tokens"].shape == (3, 2, 16)
    assert (m0["tokens"] != m1["tokens"]).any()
    np.testing.assert_array_equal(np.concatenate([m0["tokens"], m1["tokens"]], axis=1), s["tokens"])
    # same losses: on every process (replicated metrics) and vs the single process
    assert len(s["losses"]) == 3 and np.isfinite(s["losses"]).all()
    np.testing.assert_allclose(m0["losses"], s["losses"], rtol=1e-5, atol=0)
    np.testing.assert_allclose(m1["losses"], m0["losses"], rtol=1e-5, atol=0)
    assert "step 3 loss" in logs[0]
    print(f"two-process test: {time.monotonic() - t0:.1f}s, losses {m0['losses']}")


def test_two_process_train_cli_end_to_end(tmp_path):
    """``star-elastic train`` as two processes (``launch/local_multiprocess.sh 2``) on an fsdp = 2 mesh,
    so every parameter is split across the processes: CE pre-training, ranking, elastic KD, then the
    parent and the nested checkpoint written jointly. Read back by this single process, both hold
    full finite arrays, the nested one differs from the parent (KD moved it), every KD step logged."""
    from star_elastic_jax.checkpoint.elastic import load_elastic
    from star_elastic_jax.checkpoint.orbax import load_params
    from star_elastic_jax.train.metrics import read_jsonl
    from test_train_step import TEST_OVERRIDES, make_config

    workdir = tmp_path / "run"
    overrides = [*TEST_OVERRIDES, "--config.mesh.data=1", "--config.mesh.fsdp=2"]
    env = _env(1)
    env.update(PYTHON=sys.executable, PORT=str(_free_port()))
    cmd = ["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", str(workdir), "--", *overrides]
    _run("cli", [(cmd, env)], tmp_path, timeout=420)
    main_log = (workdir / "logs" / "process_0.log").read_text()
    assert "nested elastic checkpoint:" in main_log, main_log[-3000:]
    for i in range(2):
        text = (workdir / "logs" / f"process_{i}.log").read_text()
        assert f"process {i}/2" in text and "Traceback" not in text, text[-3000:]

    cfg = make_config()
    kd = [r for r in read_jsonl(workdir / "metrics.jsonl") if r.get("split") != "eval"]
    assert sorted({r["step"] for r in kd}) == list(range(1, cfg.total_steps + 1))
    assert all(np.isfinite(r["kd_loss"]) for r in kd)

    _, parent = load_params(workdir / "parent")
    nested = load_elastic(workdir / "elastic")
    assert set(nested.budgets) == {"1.0", "0.78", "0.577"}
    from star_elastic_jax.checkpoint.orbax import flat_params

    student = flat_params(nested.model)
    assert set(student) == set(parent)
    moved = 0
    for path, p in parent.items():
        s = np.asarray(student[path])
        assert s.shape == p.shape and np.isfinite(s).all(), path
        moved += int(not np.array_equal(s, np.asarray(p)))
    assert moved > len(parent) // 2
