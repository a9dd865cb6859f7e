"""Smoke test of ``benchmarks/kernels.py``: the ``--small`` CPU run completes and its Pallas results agree.

The script runs in a subprocess exactly as documented (``--small --repeats 1 --json PATH``) on the CPU
backend, where the Pallas kernels run in interpret mode. Timings are not asserted beyond being
finite and positive (they are meaningless in interpret mode); what is asserted is that every case
produced its rows without errors and that every Pallas row's max relative difference from its
reference row (computed by the script in the same run) is small.

XLA's CPU backend optimisation is turned down for the subprocess: the run is dominated by ~30
compilations of tiny programs, and this roughly halves the wall time without changing the math
(the compared results stay within ~1e-5 of each other).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "kernels.py"
# Max relative difference (max|pallas - reference| / max|reference|) allowed. Both sides see the same
# bf16 operands and accumulate in fp32; the forward outputs agree to ~1e-7 and the gradients, some of
# them rounded to bf16 (relative 2^-9 ~ 2e-3), to ~1e-5 here. bf16 FFN gradients compound roundings
# (tests/test_gmm_pallas.py allows 3e-2 there), so 3e-2: any wrong row, tile or head is an O(1) error.
TOLERANCE = 3e-2
FAST_CPU_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.mark.slow
def test_kernels_benchmark_small_cpu(tmp_path):
    out = tmp_path / "rows.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_CPU_COMPILE}".strip(),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]]
                                                         if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--repeats", "1", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log
    assert "interpret mode" in proc.stdout, log          # the CPU warning is printed
    assert "| case " in proc.stdout, log                 # and the table

    data = json.loads(out.read_text())
    assert data["interpret_mode"] is True and data["platform"] == "cpu"
    rows = data["rows"]
    assert {r["case"] for r in rows} == {"ssd", "moe", "masked"}, rows
    for r in rows:
        what = f"{r['kernel']} [{r['shape']}] {r['impl']} {r['mode']}"
        assert r["error"] is None, f"{what}: {r['error']}"
        for key in ("median_ms", "tflops", "gbps"):
            assert r[key] is not None and math.isfinite(r[key]) and r[key] > 0, f"{what}: {key}={r[key]}"

    # every kernel of every case, forward and forward+backward, has a Pallas row checked against a reference
    kernels = {(r["case"], r["kernel"]) for r in rows}
    checked = [r for r in rows if r["diff_vs"] is not None]
    for case, kernel in kernels:
        for mode in ("fwd", "fwd+bwd"):
            got = [r for r in checked if (r["case"], r["kernel"], r["mode"]) == (case, kernel, mode)]
            assert got, f"no numerics check for {case}/{kernel} {mode}"
    for r in checked:
        what = f"{r['kernel']} [{r['shape']}] {r['impl']} {r['mode']} vs {r['diff_vs']}"
        assert r["max_rel_diff"] is not None and r["max_rel_diff"] < TOLERANCE, f"{what}: {r['max_rel_diff']}"

    # the comparisons the benchmark exists for are computed: speedups, % of dense, masked/full ratios
    metrics = [r["metrics"] for r in rows]
    for name in ("speedup_vs_reference", "pct_of_dense", "speedup_vs_ragged_dot", "masked_over_full",
                 "ratio_vs_published"):
        assert any(name in m for m in metrics), name
    # the masked case searched the choices for both default budgets
    assert [c["label"] for c in data["choices"]] == ["budget 0.577", "budget 0.78"]
