"""The training loop and the whole pipeline behind ``star-elastic train``.

    train(cfg, workdir)
      1. validate the config, build the mesh and every dataset (bad input fails here, before any compile)
      2. parent: DIR/parent/ if it exists; else pretrain.parent (ranked unless pretrain.ranked); else CE
         pre-training from scratch (checkpoints in DIR/checkpoints/pretrain/), then importance ranking
         (elastic.rank) on calibration batches -> the permuted parent, saved to DIR/parent/
      3. elastic KD (checkpoints in DIR/checkpoints/kd/): frozen teacher = the parent, student = a copy
         with router masks; stages with their own sampling, sequence length and token count; every
         budget evaluated (router argmax) every eval.every steps
      4. DIR/elastic/: one nested checkpoint (checkpoint.elastic format) with the router's argmax
         choice per budget and the router state

Every phase resumes from its latest complete checkpoint; a finished phase is skipped. Metrics go to
DIR/metrics.jsonl (elastic KD: one line per micro-batch with step, stage, budget, kd_loss, ... and
``split: "eval"`` lines per budget), DIR/pretrain_metrics.jsonl and TensorBoard under DIR/tensorboard/.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np
from flax import nnx

from star_elastic_jax.checkpoint.orbax import flat_params
from star_elastic_jax.errors import CheckpointError, ConfigError, OutputError
from star_elastic_jax.train import sharding as sh
from star_elastic_jax.train.config import StageConfig, TrainConfig
from star_elastic_jax.train.loop import (
    PhaseResult,
    PhaseRunner,
    data_seed,
    eval_batches,
    is_main,
    pretrain_stages,
    stage_dataset,
)
from star_elastic_jax.elastic.budget import budget_name
from star_elastic_jax.train.metrics import MetricsWriter, read_jsonl
from star_elastic_jax.train.run_config import check_and_store
from star_elastic_jax.train.step import TrainStep

PARENT_DIR, ELASTIC_DIR = "parent", "elastic"


@dataclasses.dataclass
class TrainResult:
    parent_dir: str
    elastic_dir: str | None
    kd: PhaseResult
    budgets: dict                   # name -> ElasticChoice (argmax), when finished
    eval_table: list[dict]          # per budget: start/end eval (this run's first and last evals)


def build_mesh(cfg: TrainConfig, devices=None):
    devices = list(jax.devices() if devices is None else devices)
    cfg.validate(n_devices=len(devices))
    return sh.make_mesh(cfg.mesh, devices=devices)


def _writer(workdir: str, name: str, cfg: TrainConfig) -> MetricsWriter:
    tb = os.path.join(workdir, "tensorboard", name) if cfg.log.tensorboard else None
    return MetricsWriter(os.path.join(workdir, f"{name}.jsonl"), tb, enabled=is_main())


def init_model(cfg: TrainConfig, mesh):
    """A fresh NemotronH initialised directly into its shardings (one jitted init; as
    ``sharding.init_sharded``, with the run's compiler options)."""
    from star_elastic_jax.model.model import NemotronH
    from star_elastic_jax.train.step import FAST_COMPILE

    make = lambda: NemotronH(cfg.model, rngs=nnx.Rngs(cfg.seed))  # noqa: E731
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    kw = {"compiler_options": FAST_COMPILE} if cfg.fast_compile else {}
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.state(make()), out_shardings=sh.param_shardings(abstract, mesh), **kw)()
    return nnx.merge(graphdef, state)


def pretrain_parent(cfg: TrainConfig, workdir: str, mesh, *, datasets=None, progress: bool = True,
                    verify: bool = True):
    """CE pre-training from scratch (resumable). Returns the trained (unpermuted) model."""
    stages = pretrain_stages(cfg)
    datasets = datasets or [stage_dataset(cfg, stages[0], data_seed(cfg, "pretrain", 0))]
    evals = eval_batches(cfg, stages[0].seq_len)
    ts = TrainStep("ce", cfg.model, cfg.pretrain.optim, stages[0].steps, mesh, fast_compile=cfg.fast_compile)
    writer = _writer(workdir, "pretrain_metrics", cfg)
    runner = PhaseRunner(cfg, "pretrain", ts, stages, workdir, datasets=datasets, evals=evals, writer=writer,
                         progress=progress, verify=verify)
    try:
        state, it, cur, start = runner.restore_or_init(
            lambda: ts.init_state(init_model(cfg, mesh), seed=cfg.seed))
        res = runner.run(state, it, cur, start)
    finally:
        runner.ckpt.close()
        writer.close()
    return ts.model_from_state(res.state)


def rank_parent(cfg: TrainConfig, model, *, progress: bool = True):
    """Importance ranking (SPEC 3.3) on ``pretrain.calib_batches`` calibration batches of the training data.

    Multi-process, every process gathers the parent to host and ranks the same global calibration
    batches on its own first device: the scores, hence the permutation, are identical everywhere and
    the permuted parent comes back process-local (:func:`checkpoint.orbax.save_model` writes it once)."""
    from star_elastic_jax.elastic.importance import rank
    from star_elastic_jax.model.model import model_from_params

    p = cfg.pretrain
    st = StageConfig("calibration", "uniform", p.seq_len, 1, p.batch_size, 1)
    it = iter(stage_dataset(cfg, st, data_seed(cfg, "pretrain", 0) + 50, per_process=False))
    batches = []
    for _ in range(p.calib_batches):
        b = next(it)
        batches.append((b["tokens"], b["segment_ids"]))
    # elastic.importance computes the fc2-input statistics with an identity "down" through expert_ffn,
    # which only the ragged/dense kernels support (the others assume down is [E, H, F]): rank a
    # ragged-kernel view of the same arrays, then rebuild the permuted model with the run's config.
    cfg_rank = model.cfg if model.cfg.moe_impl == "dense" else model.cfg.with_updates(moe_impl="ragged")
    view = model_from_params(cfg_rank, host_params(model), depth_order=model.depth_order)
    ranked, _ = rank(view, batches, progress=progress and is_main())
    return model_from_params(model.cfg, flat_params(ranked), depth_order=ranked.depth_order)


def host_params(model) -> dict:
    """``flat_params(model)`` with every array that spans several processes gathered to a full host
    copy (a collective when multi-process: every process must call it)."""
    params = flat_params(model)
    if jax.process_count() == 1:
        return params
    from jax.experimental import multihost_utils

    return {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
            if isinstance(v, jax.Array) and not v.is_fully_addressable else v for k, v in params.items()}


def prepare_parent(cfg: TrainConfig, workdir: str, mesh, *, progress: bool = True, verify: bool = True):
    """The permuted parent: DIR/parent if present, else from ``pretrain.parent`` or CE pre-training.
    Every checkpoint read is verified against its manifest unless ``verify=False``."""
    from star_elastic_jax.checkpoint.orbax import load_model, read_config, save_model

    path = os.path.join(workdir, PARENT_DIR)
    runtime = _runtime(cfg.model)
    if os.path.isdir(path):
        if read_config(path, verify=verify).with_updates(**runtime) != cfg.model:
            raise CheckpointError("parent", path, "was trained with another model config than this run's")
        return load_model(path, verify=verify, **runtime)
    p = cfg.pretrain
    if p.parent is not None:
        model = load_model(p.parent, verify=verify, **runtime)
        if model.cfg != cfg.model:
            raise CheckpointError("pretrain.parent", p.parent, "has another model config than the run's model")
        source = os.path.abspath(p.parent)
    else:
        model = pretrain_parent(cfg, workdir, mesh, progress=progress, verify=verify)
        source = "ce-pretrain"
    if not (p.parent is not None and p.ranked):
        model = rank_parent(cfg, model, progress=progress)
    save_model(model, path, metadata={"source": source, "ranked": True})
    return load_model(path, verify=False, **runtime)  # just written by this process


def _runtime(model_cfg) -> dict:
    from star_elastic_jax.config.blocks import _RUNTIME_FIELDS

    return {k: getattr(model_cfg, k) for k in _RUNTIME_FIELDS}


def elastic_kd(cfg: TrainConfig, workdir: str, parent, mesh, *, until: int | None = None, progress: bool = True,
               datasets=None, evals=None, verify: bool = True) -> PhaseResult:
    """Elastic distillation from the frozen ``parent`` (resumable; ``until`` stops after that many steps)."""
    from star_elastic_jax.elastic.router import BudgetRouter

    ts = TrainStep("kd", cfg.model, cfg.optim, cfg.total_steps, mesh, router_cfg=cfg.router,
                   teacher_dtype=cfg.teacher_dtype, fast_compile=cfg.fast_compile)
    datasets = datasets or [stage_dataset(cfg, s, data_seed(cfg, "kd", i)) for i, s in enumerate(cfg.stages)]
    evals = evals if evals is not None else eval_batches(cfg, cfg.stages[0].seq_len)
    writer = _writer(workdir, "metrics", cfg)
    teacher = ts.teacher_from(parent)
    runner = PhaseRunner(cfg, "kd", ts, cfg.stages, workdir, datasets=datasets, evals=evals, writer=writer,
                         teacher=teacher, progress=progress, verify=verify)
    try:
        state, it, cur, start = runner.restore_or_init(
            lambda: ts.init_state(parent, BudgetRouter(cfg.model, cfg.router, rngs=nnx.Rngs(cfg.seed + 1)),
                                  seed=cfg.seed))
        res = runner.run(state, it, cur, start, until=until)
    finally:
        runner.ckpt.close()
        writer.close()
    return res


def save_final(cfg: TrainConfig, workdir: str, ts: TrainStep, state) -> tuple[str, dict]:
    """DIR/elastic: the student (permuted parent layout) + per-budget argmax choices + router state."""
    from star_elastic_jax.checkpoint.elastic import save_elastic

    model = ts.model_from_state(state)
    router = ts.router_from_state(state)
    budgets = {budget_name(b): router.choice(b) for b in cfg.router.budgets}
    router_state = jax.tree.map(np.asarray, nnx.state(router, nnx.Param).to_pure_dict())
    path = save_elastic(model, os.path.join(workdir, ELASTIC_DIR), budgets,
                        choice_lists={a: list(s) for a, s in cfg.router.choice_lists}, router_state=router_state,
                        router_config=cfg.router, overwrite=True,  # a rerun of a finished run rewrites its own output
                        tokenizer=cfg.data.tokenizer)  # generation decodes with the training tokenizer
    return path, budgets


def eval_table(cfg: TrainConfig, evals: list[dict], budgets: dict | None = None) -> list[dict]:
    """Per budget: the first and last eval of this run (KD loss, argmax active fraction vs target)."""
    rows = []
    for b in cfg.router.budgets:
        recs = sorted((r for r in evals if r.get("budget") == b), key=lambda r: r["step"])
        if not recs:
            continue
        first, last = recs[0], recs[-1]
        rows.append({"budget": b, "start_step": first["step"], "end_step": last["step"],
                     "kd_start": first["kd_loss"], "kd_end": last["kd_loss"], "ce_end": last["ce_loss"],
                     "active_frac": last["active_frac"], "rel_err": last["active_frac"] / b - 1.0,
                     "choice": None if budgets is None else budgets[budget_name(b)].to_dict()})
    return rows


def format_eval_table(rows: list[dict]) -> str:
    head = f"{'budget':>7} {'kd@start':>9} {'kd@end':>9} {'active(argmax)':>15} {'vs target':>9}  choice"
    lines = [head, "-" * len(head)]
    for r in rows:
        choice = "" if r["choice"] is None else r["choice"]
        lines.append(f"{budget_name(r['budget']):>7} {r['kd_start']:>9.4f} {r['kd_end']:>9.4f} "
                     f"{r['active_frac']:>15.4f} {r['rel_err']:>+9.2%}  {choice}")
    return "\n".join(lines)


def check_workdir(workdir: str, until: int | None) -> str:
    """The run directory (it may be missing: created, with its parents, once the config is valid) and
    ``--stop-after``, checked before anything is built. Returns the absolute workdir."""
    from star_elastic_jax.outputs import check_output_dir

    if until is not None and (isinstance(until, bool) or not isinstance(until, int) or until < 1):
        raise ConfigError("--stop-after", until, "a positive number of elastic KD steps")
    workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
        raise OutputError("--workdir", workdir, "exists and is not a directory; give a directory for the run")
    parent = os.path.dirname(workdir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError("--workdir", workdir, f"cannot be created: {parent} is not a directory")
    if os.path.isdir(workdir):
        # the final output is replaced on a rerun, so it must be ours: refuse now, not after training
        check_output_dir(os.path.join(workdir, ELASTIC_DIR), overwrite=True, field="--workdir")
    return workdir


def open_workdir(workdir: str) -> None:
    """Create the run directory and remove the marked staging directories a killed run left there."""
    from star_elastic_jax.outputs import cleanup_staging

    if is_main():
        os.makedirs(workdir, exist_ok=True)
        for leftover in cleanup_staging(workdir):
            print(f"removed the staging directory of an interrupted write: {leftover}", flush=True)


def train(cfg: TrainConfig, workdir: str | os.PathLike, *, until: int | None = None, progress: bool | None = None,
          devices=None, verify: bool = True, allow_config_change: bool = False) -> TrainResult:
    """The whole pipeline (see the module docstring). ``until``: stop elastic KD after that many steps
    (resume by calling again). A resume with a config that differs from the stored
    ``train_config.json`` in a field that changes the run is a :class:`ConfigError` unless
    ``allow_config_change`` (:mod:`train.run_config`). ``verify``: check every checkpoint read
    against its manifest (a damaged training checkpoint is skipped for the newest intact one)."""
    workdir = check_workdir(workdir, until)
    progress = cfg.log.progress if progress is None else progress
    t0 = time.perf_counter()
    mesh = build_mesh(cfg, devices)           # config + mesh checks
    kd_sets = [stage_dataset(cfg, s, data_seed(cfg, "kd", i)) for i, s in enumerate(cfg.stages)]  # data checks
    evals = eval_batches(cfg, cfg.stages[0].seq_len)
    if cfg.pretrain.parent is None and not os.path.isdir(os.path.join(workdir, PARENT_DIR)):
        stage_dataset(cfg, pretrain_stages(cfg)[0], data_seed(cfg, "pretrain", 0))
    open_workdir(workdir)
    check_and_store(cfg, workdir, allow_change=allow_config_change, write=is_main())
    parent = prepare_parent(cfg, workdir, mesh, progress=progress, verify=verify)
    kd = elastic_kd(cfg, workdir, parent, mesh, until=until, progress=progress, datasets=kd_sets, evals=evals,
                    verify=verify)
    elastic_dir, budgets = None, {}
    if kd.finished:
        elastic_dir, budgets = save_final(cfg, workdir, kd.ts, kd.state)
    evals = kd.evals
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if is_main() and os.path.exists(metrics_path):  # every eval of the run, earlier invocations included
        evals = [r for r in read_jsonl(metrics_path) if r.get("split") == "eval"]
    table = eval_table(cfg, evals, budgets or None)
    if is_main():
        if table:
            print(format_eval_table(table))
        if elastic_dir:
            print(f"nested elastic checkpoint: {elastic_dir}  ({time.perf_counter() - t0:.0f}s)")
    return TrainResult(parent_dir=os.path.join(workdir, PARENT_DIR), elastic_dir=elastic_dir, kd=kd, budgets=budgets,
                       eval_table=table)
