"""Train-step throughput: an elastic KD step (frozen teacher forward + masked student forward/backward
+ router + AdamW) against a CE step (model forward/backward + AdamW), same model, batch and device.

Both are the jitted steps of ``star_elastic_jax.train.step.TrainStep`` (what ``star-elastic train``
runs), compiled ahead of the timing, then timed interleaved (median of ``--repeats`` after
``--warmup`` untimed steps; each step consumes the state the previous one returned, as in training).
Peak resident memory (``ru_maxrss``) is measured per mode in a fresh subprocess that only builds,
compiles and runs that mode, so the numbers do not mix.

Defaults: the ``small`` preset (45M parameters, 26M active) with configs/small.py's router, on one
batch of 1 x 256 tokens.

    python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --preset tiny --seq 128 --repeats 20
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, print_environment, time_interleaved  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(mode: str, preset: str, batch: int, seq: int):
    """(step closure, compile seconds) for ``mode`` in ``("kd", "ce")``."""
    from flax import nnx

    from star_elastic_jax.elastic.router import BudgetRouter
    from star_elastic_jax.train import sharding as sh
    from star_elastic_jax.train.config import from_config_dict
    from star_elastic_jax.train.overrides import apply_overrides, load_config_file
    from star_elastic_jax.train.step import TrainStep

    cfg = from_config_dict(apply_overrides(load_config_file(os.path.join(ROOT, "configs", "small.py")),
                                           [f"--config.model.preset={preset}"]
                                           + ([] if preset == "small" else _tiny_router())))
    mesh = sh.make_mesh(sh.MeshConfig(), devices=jax.devices()[:1])
    model = sh.init_sharded(cfg.model, mesh, seed=0)
    if mode == "kd":
        ts = TrainStep("kd", cfg.model, cfg.optim, 1000, mesh, router_cfg=cfg.router)
        state = ts.init_state(model, BudgetRouter(cfg.model, cfg.router, rngs=nnx.Rngs(1)))
        teacher = ts.teacher_from(model)
    else:
        ts = TrainStep("ce", cfg.model, cfg.optim, 1000, mesh)
        state, teacher = ts.init_state(model), None
    del model
    rng = np.random.default_rng(0)
    host = {"tokens": rng.integers(3, 256, (batch, seq)).astype(np.int32),
            "targets": rng.integers(3, 256, (batch, seq)).astype(np.int32),
            "segment_ids": np.ones((batch, seq), np.int32), "loss_mask": np.ones((batch, seq), np.float32)}
    data = ts.put_batch(host, 1)
    budgets = np.array([1], np.int32)  # budget 0.78 (KD); ignored by CE
    step = ts.train_step(1, batch, seq)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sh.LOGICAL_RULES):
        compiled = step.jitted.lower(state, teacher, data, budgets).compile()
    compile_s = time.perf_counter() - t0
    box = {"state": state}

    def run():
        box["state"], metrics = compiled(box["state"], teacher, data, budgets)
        return metrics

    return run, compile_s


def _tiny_router() -> list[str]:
    return ["--config.router.choice_lists.hidden=(64, 48, 32)", "--config.router.choice_lists.mamba_heads=(8, 6, 4)",
            "--config.router.choice_lists.experts=(4, 3)", "--config.router.choice_lists.expert_ffn=(32, 24, 16)"]


def peak_rss_mib() -> float:
    """This process's peak resident set: ``VmHWM`` (per address space, so a child started by a big
    parent does not inherit the parent's peak the way ``ru_maxrss`` does across fork/exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def child(mode: str, args) -> None:
    """Subprocess body: build, compile and run ``mode`` alone; print its peak RSS as JSON."""
    base = peak_rss_mib()
    run, compile_s = build(mode, args.preset, args.batch, args.seq)
    for _ in range(args.warmup + 2):
        jax.block_until_ready(run())
    print(json.dumps({"mode": mode, "peak_rss_mib": peak_rss_mib(), "import_rss_mib": base,
                      "compile_s": compile_s}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-rss", action="store_true", help="skip the per-mode peak-RSS subprocesses")
    p.add_argument("--child", choices=["kd", "ce"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args)
        return
    rss = {}
    if not args.no_rss:  # first, while this process is still small
        for mode in ("kd", "ce"):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--preset", args.preset, "--batch",
                   str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rss[mode] = json.loads(out.strip().splitlines()[-1])
    runs, compile_s = {}, {}
    for mode in ("kd", "ce"):
        runs[mode], compile_s[mode] = build(mode, args.preset, args.batch, args.seq)
    timings = time_interleaved(runs, repeats=args.repeats, warmup=args.warmup)
    print_environment({"preset": args.preset, "batch": f"{args.batch} x {args.seq} tokens"})
    print()
    tokens = args.batch * args.seq
    rows = []
    for mode, label in (("kd", "elastic KD (teacher + student + router)"), ("ce", "CE (model only)")):
        t = timings[mode]
        rows.append([label, t.median * 1e3, t.per_second(tokens), timings["ce"].median / t.median,
                     compile_s[mode], rss.get(mode, {}).get("peak_rss_mib")])
    print(markdown_table(["step", "median ms", "tokens/s", "speed vs CE", "compile s", "peak RSS MiB"], rows))
    if rss:
        print(f"\n(peak RSS (VmHWM) of a fresh process that builds, compiles and runs that step alone; "
              f"after imports: {rss['kd']['import_rss_mib']:.0f} MiB; this process, both steps: "
              f"{peak_rss_mib():.0f} MiB)")


if __name__ == "__main__":
    main()
