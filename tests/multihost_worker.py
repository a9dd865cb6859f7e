"""One process of the multi-host test (tests/test_multihost.py); not a test module itself.

    python tests/multihost_worker.py multi  PROCESS_ID NUM_PROCESSES PORT OUT.npz
    python tests/multihost_worker.py single 0          2             0    OUT.npz

``multi``: one CPU device per process, ``star_elastic_jax.distributed.initialize`` on 127.0.0.1:PORT
(gloo), a data=NUM_PROCESSES mesh over the global devices; the process reads only its own data shard.
``single``: one process with NUM_PROCESSES CPU devices (XLA_FLAGS set by the caller) that builds the
same global batch by concatenating every process's shard in process order (the row order of
``jax.make_array_from_process_local_data`` over a ``data`` mesh). Both run the real CE train step
(``train.step.TrainStep``) for STEPS steps and save their losses and the batches they fed.
"""
from __future__ import annotations

import sys
import time

STEPS, ROWS, SEQ = 3, 4, 16          # global batch: 4 rows x 16 tokens, 1 micro-batch
MODEL_OVERRIDES = {"hybrid_override_pattern": "M*E-", "n_routed_experts": 4}


def main() -> int:
    mode, pid, nproc, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    t0 = time.time()
    from star_elastic_jax import distributed

    if mode == "multi":
        cfg = distributed.initialize(distributed.DistributedConfig(
            coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
            initialization_timeout=60, auto=False))
        assert cfg.multi_process and cfg.process_id == pid, cfg
        assert distributed.initialize() is cfg  # idempotent
    import jax
    import numpy as np

    from star_elastic_jax.config import ModelConfig
    from star_elastic_jax.data import make_dataset
    from star_elastic_jax.model.model import model_from_params
    from star_elastic_jax.train import sharding as sh
    from star_elastic_jax.train.config import OptimConfig
    from star_elastic_jax.train.step import TrainStep

    if mode == "multi":
        assert jax.process_count() == nproc and jax.process_index() == pid, (jax.process_count(), jax.process_index())
        assert jax.local_device_count() == 1
    assert jax.device_count() == nproc, jax.devices()
    print(f"[{mode} {pid}] up after {time.time() - t0:.1f}s: {jax.devices()}", flush=True)

    model_cfg = ModelConfig.preset("tiny", **MODEL_OVERRIDES)
    from train_fixtures import random_params

    model = model_from_params(model_cfg, random_params(model_cfg, seed=0))
    mesh = sh.make_mesh(sh.MeshConfig(data=nproc))
    optim = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0, weight_decay=0.0, clip_norm=1.0)
    ts = TrainStep("ce", model_cfg, optim, total_steps=STEPS, mesh=mesh, fast_compile=True)
    state = ts.init_state(model, seed=0)
    step = ts.train_step(1, ROWS, SEQ)

    def shard(i):
        return iter(make_dataset("synthetic", seq_len=SEQ, batch_size=ROWS, seed=7, model_config=model_cfg,
                                 process_index=i, process_count=nproc))

    if mode == "multi":
        iters = [shard(jax.process_index())]           # this process's shard only
    else:
        iters = [shard(i) for i in range(nproc)]        # every shard, concatenated in process order
    losses, fed = [], []
    for _ in range(STEPS):
        parts = [next(it) for it in iters]
        local = {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
        fed.append(local["tokens"])
        batch = ts.put_batch(local, 1)
        assert batch["tokens"].shape == (1, ROWS, SEQ), batch["tokens"].shape
        state, metrics = step(state, None, batch, np.zeros((1,), np.int32))
        loss = float(np.asarray(metrics["loss"].addressable_data(0))[0])
        losses.append(loss)
        print(f"[{mode} {pid}] step {len(losses)} loss {loss:.8f}", flush=True)
    np.savez(out, losses=np.asarray(losses, np.float64), tokens=np.stack(fed))
    print(f"[{mode} {pid}] done in {time.time() - t0:.1f}s", flush=True)
    if mode == "multi":
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
