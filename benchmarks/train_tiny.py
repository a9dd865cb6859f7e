""""Training works": configs/tiny.py end to end on CPU, then a start/end table per budget.

Runs ``star-elastic train --config configs/tiny.py`` (CE pre-training of a parent from nothing,
importance ranking, elastic KD stages) in ``--workdir`` (reusing whatever it already holds: a
finished run is only re-evaluated from its files), then reads ``metrics.jsonl`` and prints for every
budget:

* the held-out KD loss of the router's argmax sub-model at step 0 and at the last step, and the
  mean training KD loss (soft router masks) over the first and last ``--window`` steps;
* the router's argmax choice, its active parameters and their fraction of the parent's vs the
  target.

Exit status 0 iff every budget's KD loss came down (both measures) and every argmax choice is within
``--tolerance`` (default 5%) of its target active parameters.

    python benchmarks/train_tiny.py --workdir /tmp/tiny-run [--config.key=value ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.py"))
    p.add_argument("--workdir", default=None, help="run directory (default: a new temporary directory)")
    p.add_argument("--window", type=int, default=20, help="steps averaged for the training-loss columns")
    p.add_argument("--tolerance", type=float, default=0.05, help="allowed |active/target - 1| of the argmax")
    args, overrides = p.parse_known_args()

    from star_elastic_jax.checkpoint.elastic import read_elastic
    from star_elastic_jax.train.config import from_config_dict
    from star_elastic_jax.train.overrides import apply_overrides, load_config_file
    from star_elastic_jax.elastic.budget import budget_name
    from star_elastic_jax.train.metrics import read_jsonl
    from star_elastic_jax.train.trainer import train

    cfg = from_config_dict(apply_overrides(load_config_file(args.config), overrides))
    workdir = args.workdir or tempfile.mkdtemp(prefix="star-elastic-tiny-")
    res = train(cfg, workdir)
    recs = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    info = read_elastic(res.elastic_dir)
    full = cfg.model.param_count().active
    total = cfg.total_steps
    rows, ok = [], True
    for b in cfg.router.budgets:
        ev = sorted((r for r in recs if r.get("split") == "eval" and r["budget"] == b), key=lambda r: r["step"])
        tr = [r for r in recs if r.get("split") != "eval" and r["budget"] == b]
        first = np.mean([r["kd_loss"] for r in tr if r["step"] <= args.window])
        last = np.mean([r["kd_loss"] for r in tr if r["step"] > total - args.window])
        choice = info.budgets[budget_name(b)]
        active = cfg.model.param_count(choice).active
        err = active / (b * full) - 1.0
        good = ev[-1]["kd_loss"] < ev[0]["kd_loss"] and last < first and abs(err) <= args.tolerance
        ok &= good
        rows.append([budget_name(b), ev[0]["kd_loss"], ev[-1]["kd_loss"], float(first), float(last), active,
                     active / full, f"{err:+.2%}", str(choice.to_dict()), "yes" if good else "NO"])
    print(f"\nconfig {args.config}: {total} elastic KD steps; parent {full:,} active parameters; workdir {workdir}\n")
    print(markdown_table(["budget", "eval KD @0", f"eval KD @{total}", f"train KD first {args.window}",
                          f"train KD last {args.window}", "argmax active", "active frac", "vs target",
                          "argmax choice", "ok"], rows))
    print("\nPASS" if ok else "\nFAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
