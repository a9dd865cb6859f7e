"""The step loop of one training phase (CE pre-training or elastic KD) over its stages: data
iterators per stage, host budget sampling, the jitted step, periodic metrics / evals / checkpoints,
resume from the newest complete checkpoint, and the progress bar."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from star_elastic_jax.data.pipeline import make_dataset
from star_elastic_jax.errors import CheckpointError, DataError
from star_elastic_jax.train.checkpointing import TrainCheckpointer
from star_elastic_jax.train.config import StageConfig, TrainConfig
from star_elastic_jax.elastic.budget import budget_name
from star_elastic_jax.train.metrics import MetricsWriter, Progress
from star_elastic_jax.train.step import TrainStep, budget_indices

CKPT_DIR = "checkpoints"


@dataclasses.dataclass
class PhaseResult:
    state: Any                      # the final train state (on the mesh)
    step: int                       # steps completed
    finished: bool                  # reached the phase's last step
    evals: list[dict]               # eval records of this run (restored runs: from the resume on)
    ts: Any = None                  # the TrainStep (model_from_state / router_from_state)


def is_main() -> bool:
    return jax.process_index() == 0


def data_seed(cfg: TrainConfig, phase: str, stage: int) -> int:
    return cfg.seed * 1000 + (0 if phase == "pretrain" else 100) + stage


def pretrain_stages(cfg: TrainConfig) -> tuple[StageConfig, ...]:
    p = cfg.pretrain
    return (StageConfig("pretrain", "uniform", p.seq_len, p.steps * p.batch_size * p.seq_len, p.batch_size,
                        p.micro_batches),)


def stage_dataset(cfg: TrainConfig, stage: StageConfig, seed: int, *, per_process: bool = True):
    """The stage's training data: this process's shard, or (``per_process=False``) the whole global
    batches on every process (calibration, which every process computes identically)."""
    index, count = (jax.process_index(), jax.process_count()) if per_process else (0, 1)
    return make_dataset(cfg.data, split="train", seq_len=stage.seq_len, batch_size=stage.batch_size, seed=seed,
                        model_config=cfg.model, process_index=index, process_count=count)


def eval_batches(cfg: TrainConfig, seq_len: int) -> list[dict]:
    """A fixed held-out set: the first ``eval.batches`` batches of the eval split (the train split with
    another seed when a file source has no ``eval_source``)."""
    e = cfg.eval
    kw = dict(seq_len=seq_len, batch_size=e.batch_size, model_config=cfg.model, process_index=jax.process_index(),
              process_count=jax.process_count())
    if cfg.data.source == "synthetic" or cfg.data.eval_source is not None:
        ds = make_dataset(cfg.data, split="eval", seed=cfg.seed, shuffle=False, **kw)
    else:
        ds = make_dataset(cfg.data, split="train", seed=cfg.seed + 999_983, **kw)
    it = iter(ds)
    out = []
    for _ in range(e.batches):
        try:
            out.append(next(it))
        except StopIteration:
            break
    if not out:
        raise DataError("eval", cfg.data.eval_source or cfg.data.source, "the eval split produced no batch")
    return out


# ============================================================================================== one phase
class PhaseRunner:
    """The step loop of one phase (``"pretrain"``: CE, ``"kd"``: elastic distillation) over its stages,
    with checkpoints, metrics, evals and a progress bar."""

    def __init__(self, cfg: TrainConfig, phase: str, ts: TrainStep, stages: Sequence[StageConfig], workdir: str, *,
                 datasets: Sequence[Any], evals: list[dict], writer: MetricsWriter, teacher: Any = None,
                 progress: bool = True, verify: bool = True):
        self.cfg, self.phase, self.ts, self.stages = cfg, phase, ts, tuple(stages)
        self.datasets, self.eval_set, self.writer, self.teacher = list(datasets), evals, writer, teacher
        self.progress_enabled = progress and is_main()
        c = cfg.checkpoint
        self.verify = verify
        self.ckpt = TrainCheckpointer(os.path.join(workdir, CKPT_DIR, phase), keep=c.keep, async_save=c.async_save,
                                      phase=phase)
        self.total = sum(s.steps for s in self.stages)
        self.kd = phase == "kd"
        self.full_active = cfg.model.param_count().active

    def stage_at(self, step: int) -> tuple[int, StageConfig]:
        start = 0
        for i, s in enumerate(self.stages):
            if step < start + s.steps:
                return i, s
            start += s.steps
        return len(self.stages) - 1, self.stages[-1]

    # ------------------------------------------------------------------------------------------ state
    def restore_or_init(self, init: Callable[[], Any]) -> tuple[Any, Any, int, int]:
        """``(state, data iterator or None, its stage, step)`` from the newest intact checkpoint, else
        ``init()`` at step 0. A step that fails its manifest or its restore is moved aside with a
        warning and the next older one is tried."""
        while True:
            step = self.ckpt.latest_verified_step(verify=self.verify)
            if step is None:
                self.writer.truncate_after(-1)  # nothing survived: the run restarts, and re-logs, from step 0
                return init(), None, -1, 0
            try:
                meta = self.ckpt.read_meta(step)
                si = int(meta.get("stage", -1))
                it = iter(self.datasets[si]) if si >= 0 else None
                state, _ = self.ckpt.restore(self.ts.abstract_state(), it, step)
                if int(state["step"]) != step:
                    raise CheckpointError("checkpoint", step, f"holds state step {int(state['step'])}")
            except CheckpointError as e:
                self.ckpt.quarantine(step, e)
                continue
            self.writer.truncate_after(step)  # steps after the checkpoint are re-run (and re-logged)
            return state, it, si, step

    # ------------------------------------------------------------------------------------------ loop
    def run(self, state, it, cur: int, start: int, *, until: int | None = None) -> PhaseResult:
        stop = self.total if until is None else min(until, self.total)
        cfg = self.cfg
        nb = cfg.router.n_budgets
        bar = Progress(self.total, start, self.phase, enabled=self.progress_enabled)
        evals: list[dict] = []
        if start == 0 and stop > 0 and cfg.eval.at_start:
            evals += self.evaluate(state, 0, bar)
        pending: list[tuple] = []
        try:
            for step in range(start, stop):
                si, stage = self.stage_at(step)
                if si != cur:
                    it, cur = iter(self.datasets[si]), si
                try:
                    batch = next(it)
                except StopIteration:
                    raise DataError("dataset", stage.name, "ran out of data (set num_epochs=None to repeat)") from None
                n = stage.micro_batches
                bidx = budget_indices(cfg.seed, step, n, nb, stage.weights(nb)) if self.kd else np.zeros(n, np.int32)
                fn = self.ts.train_step(n, stage.micro_rows, stage.seq_len)
                state, metrics = fn(state, self.teacher, self.ts.put_batch(batch, n), bidx)
                pending.append((step + 1, stage, bidx, metrics))
                done = step + 1
                if done % cfg.log.every == 0 or done == stop:
                    self._flush(pending, bar)
                    pending = []
                if done % cfg.eval.every == 0 or done == self.total:
                    self._flush(pending, bar)
                    pending = []
                    evals += self.evaluate(state, done, bar)
                if done % cfg.checkpoint.every == 0 or done == stop:
                    # every row up to `done` reaches the disk before checkpoint `done` can commit,
                    # so a kill at any point after the commit loses no row that the resume keeps
                    self._flush(pending, bar)
                    pending = []
                    self.writer.flush()
                    self.ckpt.save(done, state, it, self._meta(cur, done))
        finally:
            bar.close()
            self.ckpt.wait()
            self.writer.flush()
        return PhaseResult(state=state, step=stop, finished=stop == self.total, evals=evals, ts=self.ts)

    def _meta(self, stage: int, step: int) -> dict:
        return {"phase": self.phase, "stage": stage, "step": step, "seed": self.cfg.seed,
                "mesh": list(map(int, self.ts.mesh.axis_sizes)), "total_steps": self.total}

    def _flush(self, pending: list[tuple], bar: Progress) -> None:
        if not pending:
            return
        fetched = jax.device_get([m for *_, m in pending])
        tokens = sum(s.batch_size * s.seq_len for _, s, _, _ in pending)
        losses = []
        recs = []
        for (step, stage, bidx, _), m in zip(pending, fetched):
            per_mb = {k: np.asarray(v) for k, v in m.items()}
            for j, b in enumerate(bidx):
                rec = {"step": step, "stage": stage.name, "micro_batch": j}
                if self.kd:
                    rec["budget"] = self.cfg.router.budgets[int(b)]
                for k, v in per_mb.items():
                    if k == "budget":
                        continue
                    rec[k] = v[j] if v.ndim == 1 else v
                if self.kd:
                    rec["active_params"] = float(rec["active_frac"]) * self.full_active
                recs.append(rec)
                key = budget_name(rec["budget"]) if self.kd else "ce"
                losses.append((key, float(rec["kd_loss"] if self.kd else rec["ce_loss"])))
        tps = bar.update(len(pending), tokens, losses)
        for rec in recs:
            rec["tokens_per_s"] = tps
            self.writer.write(rec, tb_prefix="train", tb_tag=budget_name(rec["budget"]) if self.kd else None)

    # ------------------------------------------------------------------------------------------ eval
    def evaluate(self, state, step: int, bar: Progress | None = None) -> list[dict]:
        """KD: every budget's router-argmax sub-model on the eval set; CE: the model's loss."""
        b0 = self.eval_set[0]
        fn = self.ts.eval_step(b0["tokens"].shape[0] * jax.process_count(), b0["tokens"].shape[1])
        batches = [self.ts.put_eval_batch(b) for b in self.eval_set]
        out = []
        targets = range(self.cfg.router.n_budgets) if self.kd else [0]
        for i in targets:
            ms = [fn(state["params"], state["buffers"], self.teacher, b, jnp.int32(i)) for b in batches]
            ms = jax.device_get(ms)
            rec = {"step": step, "split": "eval"}
            if self.kd:
                rec["budget"] = self.cfg.router.budgets[i]
            for k in ms[0]:
                rec[k] = float(np.mean([np.asarray(m[k]) for m in ms]))
            if self.kd:
                rec["active_params"] = int(round(rec["active_frac"] * self.full_active))
            out.append(rec)
            self.writer.write(rec, tb_prefix="eval", tb_tag=budget_name(rec["budget"]) if self.kd else None)
        if bar is not None and out:
            if self.kd:
                bar.write(f"[eval step {step}] " + "  ".join(
                    f"b={budget_name(r['budget'])}: kd {r['kd_loss']:.4f} active {r['active_frac']:.3f}" for r in out))
            else:
                bar.write(f"[eval step {step}] ce {out[0]['ce_loss']:.4f}")
        self.writer.flush()
        return out
