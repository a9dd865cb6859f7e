"""Pallas kernels vs their pure-JAX peers: the SSD scan, the MoE grouped matmul and the expert FFN.

What it measures, always against a peer timed in the same run on the same inputs:

1. **ssd** -- the chunked Mamba2 SSD scan ``ssd(x, dt, A, B, C, D, impl=...)`` (the layer's call:
   ``y`` is the output, the final state is discarded), ``impl="pallas"`` (our kernels) vs
   ``impl="reference"`` (the pure-JAX chunked scan), at Nemotron 3 Nano shapes (from
   ``ModelConfig.preset("nano-v3-30b")``: ``L 4096, H 64, P 64, N 128, G 8, chunk 128``) for every
   ``--batch``. Plus the per-layer scan of a Nemotron-H-8B-like layer (``b 1, L 2048, H 128, P 64,
   N 128, G 8``: d_model 4096, expand 2, headdim 64), whose forward is also given as a ratio to the
   published mamba_ssm Triton figure, ``--published-ms`` (0.36 ms; a figure from another machine and
   software stack, so only indicative).
2. **moe** -- the fc1 grouped matmul at the Nano MoE shape: 8192 tokens x top-6 = 49152 rows,
   ``K = 2688`` (hidden), ``N = 1856`` (expert FFN), 128 experts, routing = top-6 of random logits
   (fixed seed, roughly balanced). ``gmm`` (Pallas, HF-layout weights ``[E, N, K]``,
   ``transpose_rhs=True`` as the FFN calls it) vs ``lax.ragged_dot_general`` on the same operands vs
   a dense matmul of the same total rows ``[49152, 2688] @ [2688, 1856]``, the "peak" reference (one
   weight matrix, no groups: what a perfect grouped matmul would approach). gmm is reported as a %
   of the dense matmul's TFLOP/s and as a speedup over ragged_dot. Plus the whole routed-expert FFN
   (sort, fc1, relu2, fc2, weighting, unsort, combine): ``expert_ffn_pallas`` vs
   ``expert_ffn_ragged`` (the GPU reference path).
3. **masked** -- the elastic sub-model at budget fractions ``--budgets`` (default 0.577 and 0.78)
   vs the full layer, both through the Pallas kernels. The choice is computed at run time with
   ``choice_for_budget(ModelConfig.preset("nano-v3-30b"), budget, nano_choice_lists())`` (about a
   second; ``--choice hidden=..,mamba_heads=..,experts=..,expert_ffn=..`` skips the search). The
   masked SSD gets ``head_limit = mamba_heads // G``; the masked gmm / expert FFN get
   ``k_limit = hidden`` and ``n_limit``/``ffn_limit = expert_ffn``, and tokens are routed among the
   first ``experts`` experts only. The limits are static Python ints, as ``masks_from_choice`` gives
   the model. Reported: masked time / full time (target <= 0.7). The reference implementations on
   the masked problem (operands zeroed outside the active prefixes; they skip nothing) are timed too
   and give the numerics check.

Every case is timed **forward** and **forward+backward** (``jax.value_and_grad`` of
``sum(out * cot)`` with a fixed random fp32 cotangent, w.r.t. every float input: x, dt, A, B, C, D
for the SSD; lhs and rhs for the matmuls; x, routing weights, up and down for the FFN).

Method. Each function is ``jax.jit``-ed and compiled ahead of time (compile time excluded, printed
to stderr); one call's result is kept for the numerics check; then the implementations of one
comparison are timed interleaved (``--warmup`` untimed calls each, then ``--repeats`` timed rounds,
every call ending in ``jax.block_until_ready``) and the **median** is reported. Numerics, same run:
``max rel diff`` = ``max |got - want| / max |want|`` of the Pallas output (forward) or of every
gradient (forward+backward, the max over the gradients) against the reference row named in the
comparison column (masked rows: against the reference on the zeroed problem, whose gradients
outside the active prefixes are then exactly zero as well, so the comparison is like for like).

FLOP model (useful FLOPs only; forward+backward counts 3x forward for every case):

* SSD, matmul FLOPs of the chunked algorithm with chunk ``Q`` (the nominal ``chunk``, whatever
  blocking an implementation uses internally), ``Ha`` active heads, per token:
  ``2*G*Q*N`` (``C B^T`` per group) + ``Ha * (2*Q*P`` (intra-chunk ``(L o C B^T) X``)
  ``+ 2*P*N`` (chunk states ``B^T X``) ``+ 2*P*N`` (output from the state ``C h``)
  ``+ 2*P*N/Q)`` (inter-chunk state passing); times ``b * L``. Elementwise work (decays, exp,
  ``D`` skip) is not counted.
* gmm: ``2 * M * k * n`` over the ``M`` real (routed) rows, with ``k``/``n`` the active contraction
  and output widths (full: ``K``, ``N``). Dense matmul: the same ``2 * M * K * N``.
* expert FFN: two gmms, ``4 * M * h * f`` (``M = T * top_k``, ``h`` hidden, ``f`` expert FFN).

Byte model (compulsory HBM traffic: every operand read once, every result written once, at the
array's dtype; intermediates and residuals an implementation keeps are not counted):

* SSD forward: ``x`` (``b L Ha P``), ``dt`` (fp32 ``b L Ha``), ``B``, ``C`` (``b L G N`` each) read;
  ``y`` (fp32 ``b L Ha P``) written. Backward adds: ``x``, ``dt``, ``B``, ``C`` and ``dy`` (fp32)
  read, ``dx``, ``ddt``, ``dB``, ``dC`` written.
* gmm: ``M k`` (lhs) + ``E_used k n`` (weights of the experts that got rows) + ``M n`` (output);
  dense matmul: ``M K + K N + M N``. Backward: ``d lhs = grad @ rhs^T`` and ``d rhs = lhs^T grad``
  each touch the same three arrays once, so forward+backward = 3x forward.
* expert FFN: the two gmms' models plus the fp32 ``[T, h]`` output; forward+backward 3x forward.

TFLOP/s and GB/s are these counts over the median time. On a GPU the two are the roofline
coordinates: a kernel near the dense matmul's TFLOP/s is compute-bound and fine; one far below both
peaks has a launch, occupancy or tiling problem.

Fail soft: every implementation of every case is compiled, run and timed under its own
``try``; an exception (say a Triton compile error on real hardware, or out of memory) fills that
row's error column and the script goes on, so a single GPU run yields as much of the table as
possible. The exit status is 1 when any row failed (after the table and ``--json`` are written).

On CPU the Pallas kernels run in **interpret mode** (emulated program by program): their timings are
meaningless there. The CPU run, with ``--small`` (tiny shapes, seconds), only smoke-tests the script
and checks numerics; ``tests/test_benchmark_kernels.py`` does exactly that in CI.

Run on a GPU (H100) from the repo root, after ``pip install -U "jax[cuda12]"`` and ``pip install -e .``:

    python benchmarks/kernels.py                                   # everything, Nano shapes
    python benchmarks/kernels.py --cases ssd --batch 1,8 --json ssd.json
    python benchmarks/kernels.py --cases masked --choice hidden=1920,mamba_heads=64,experts=128,expert_ffn=960
    python benchmarks/kernels.py --small --repeats 1               # CPU smoke run (interpret mode)
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import aot_compile, block, markdown_table, print_environment, time_fn, time_interleaved  # noqa: E402

from kernel_setup import (  # noqa: E402
    FWD,
    FWD_BWD,
    Built,
    Masked,
    MoEShape,
    SSDShape,
    build_shapes,
    dense_fn,
    dense_inputs,
    ffn_bytes,
    ffn_fn,
    gmm_bytes,
    gmm_flops,
    gmm_fn,
    masked_choices,
    moe_inputs,
    routing,
    ssd_bytes,
    ssd_flops,
    ssd_fn,
    ssd_inputs,
)

CASES = ("ssd", "moe", "masked")
MASKED_TARGET = 0.7
DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}


# ------------------------------------------------------------------------------------------ engine
@dataclasses.dataclass
class Row:
    case: str
    kernel: str
    shape: str
    impl: str
    mode: str
    median_ms: float | None = None
    min_ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    compare: str = ""
    max_rel_diff: float | None = None
    diff_vs: str | None = None
    compile_s: float | None = None
    error: str | None = None
    metrics: dict = dataclasses.field(default_factory=dict)   # numeric forms of `compare`


@dataclasses.dataclass
class Impl:
    name: str
    build: Callable[[dict], Built]
    flops: float
    bytes: float
    ref: str | None = None       # impl of the same group whose result this one is checked against
    inputs: str = "main"         # key of the input dict it runs on
    key: tuple | None = None     # identifies the function: equal keys (and argument shapes) share one executable

    def __post_init__(self):
        if self.key is None:
            self.key = getattr(self.build, "key", None)


# (Impl.key, pass, argument shapes/dtypes) -> (compiled executable, its compile seconds). The masked case
# times the full kernels again next to the masked ones; this spares compiling them twice.
_COMPILED: dict = {}


def _signature(args) -> tuple:
    return tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree_util.tree_leaves(args))


def _error_text(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:4000]


@jax.jit
def _diff_and_scale(got: list, want: list) -> list:
    """``(max |a - b|, max |b|)`` per leaf pair, on the device (one compiled call, no big host transfer)."""
    f32 = jnp.float32
    return [(jnp.max(jnp.abs(a.astype(f32) - b.astype(f32))), jnp.max(jnp.abs(b.astype(f32))))
            for a, b in zip(got, want)]


def max_rel_diff(got, want) -> float:
    """``max |got - want| / max |want|`` per pair of leaves, the max over the leaves."""
    got, want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    if len(got) != len(want):
        raise ValueError(f"{len(got)} result arrays vs {len(want)} reference arrays")
    worst = 0.0
    for diff, scale in jax.device_get(_diff_and_scale(got, want)):
        diff, scale = float(diff), float(scale)
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
    return worst


def _timed(calls: dict, repeats: int, warmup: int) -> dict:
    """Interleaved timing; if that raises, each call alone, so one failure spoils only its own row."""
    try:
        return time_interleaved(calls, repeats=repeats, warmup=warmup)
    except Exception:  # noqa: BLE001 - fail soft, see the module docstring
        out = {}
        for name, call in calls.items():
            try:
                out[name] = time_fn(call, repeats=repeats, warmup=warmup)
            except Exception as e:  # noqa: BLE001
                out[name] = e
        return out


def run_group(case: str, kernel: str, shape: str, mode: str, make_inputs: Callable[[], dict],
              impls: list[Impl], args) -> dict[str, Row]:
    """Compile, check and time one comparison; every failure lands in its row's ``error``."""
    rows = {im.name: Row(case, kernel, shape, im.name, mode, diff_vs=im.ref) for im in impls}
    try:
        inputs = make_inputs()
    except Exception as e:  # noqa: BLE001
        for row in rows.values():
            row.error = f"inputs: {_error_text(e)}"
        return rows
    calls, results = {}, {}
    for im in impls:
        row = rows[im.name]
        try:
            jitted, fargs = im.build(inputs[im.inputs])
            cache_key = None if im.key is None else (im.key, mode, _signature(fargs))
            cached = cache_key is not None and cache_key in _COMPILED
            if cached:
                compiled, row.compile_s = _COMPILED[cache_key]
            else:
                compiled, row.compile_s = aot_compile(jitted, *fargs)
                if cache_key is not None:
                    _COMPILED[cache_key] = (compiled, row.compile_s)
            call = functools.partial(compiled, *fargs)
            results[im.name] = block(call())
            calls[im.name] = call
            print(f"  {'reused' if cached else 'compiled'} {kernel} [{shape}] {im.name} {mode} "
                  f"({row.compile_s:.1f}s)", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001
            row.error = _error_text(e)
            print(f"  FAILED {kernel} [{shape}] {im.name} {mode}: {row.error[:300]}", file=sys.stderr, flush=True)
    for im in impls:
        if im.ref is None or im.name not in results:
            continue
        row = rows[im.name]
        if im.ref not in results:
            row.compare = f"(no numerics: {im.ref} failed)"
            continue
        try:
            pick = (lambda r: r) if mode == FWD else (lambda r: r[1])   # forward output / the gradients
            row.max_rel_diff = max_rel_diff(pick(results[im.name]), pick(results[im.ref]))
        except Exception as e:  # noqa: BLE001
            row.error = f"numerics: {_error_text(e)}"
    results.clear()   # free the outputs before timing
    for name, t in _timed(calls, args.repeats, args.warmup).items():
        row, im = rows[name], next(i for i in impls if i.name == name)
        if isinstance(t, Exception):
            row.error = f"timing: {_error_text(t)}"
            continue
        row.median_ms, row.min_ms = t.median * 1e3, t.min * 1e3
        row.tflops = im.flops / t.median / 1e12
        row.gbps = im.bytes / t.median / 1e9
    return rows


def _ratio(rows: dict, num: str, den: str) -> float | None:
    a, b = rows.get(num), rows.get(den)
    if a is None or b is None or a.median_ms is None or b.median_ms is None:
        return None
    return a.median_ms / b.median_ms


# ------------------------------------------------------------------------------------------- cases
def case_ssd(args, ssd_shape: SSDShape, ssd_8b: SSDShape, dtype) -> list[Row]:
    itemsize = jnp.dtype(dtype).itemsize
    out = []
    shapes = [("ssd", dataclasses.replace(ssd_shape, b=b)) for b in args.batch] + [("ssd (8b-like)", ssd_8b)]
    for kernel, s in shapes:
        for mode in (FWD, FWD_BWD):
            mult = 1.0 if mode == FWD else 3.0
            flops, nbytes = ssd_flops(s, s.h) * mult, ssd_bytes(s, s.h, itemsize, mode == FWD_BWD)
            impls = [Impl("pallas", ssd_fn("pallas", s, mode), flops, nbytes, ref="reference"),
                     Impl("reference", ssd_fn("reference", s, mode), flops, nbytes)]
            rows = run_group("ssd", kernel, s.label(), mode, lambda s=s: {"main": ssd_inputs(s, dtype, args.seed)},
                             impls, args)
            speedup = _ratio(rows, "reference", "pallas")
            if speedup is not None:
                rows["pallas"].compare = f"{speedup:.2f}x vs reference"
                rows["pallas"].metrics["speedup_vs_reference"] = speedup
            if kernel != "ssd" and mode == FWD:
                for row in rows.values():
                    if row.median_ms is not None:
                        ratio = row.median_ms / args.published_ms
                        row.compare = "; ".join(filter(None, [row.compare, f"{ratio:.2f}x mamba_ssm's "
                                                                          f"{args.published_ms:g} ms"]))
                        row.metrics["ratio_vs_published"] = ratio
            out += rows.values()
    return out


def case_moe(args, moe: MoEShape, dtype) -> list[Row]:
    itemsize = jnp.dtype(dtype).itemsize
    out = []
    M, K, N = moe.rows, moe.hidden, moe.ffn
    shape = f"M={M} ({moe.tokens}x top-{moe.topk}) K={K} N={N} E={moe.experts}"
    e_used = int(np.sum(np.bincount(routing(moe, moe.experts, args.seed).reshape(-1), minlength=moe.experts) > 0))

    def inputs():
        return {"main": moe_inputs(moe, dtype, args.seed), "dense": dense_inputs(moe, dtype, args.seed)}

    for mode in (FWD, FWD_BWD):
        mult = 1.0 if mode == FWD else 3.0
        flops = gmm_flops(M, K, N) * mult
        impls = [Impl("gmm (pallas)", gmm_fn("gmm", mode), flops, gmm_bytes(M, K, N, e_used, itemsize) * mult,
                      ref="ragged_dot"),
                 Impl("ragged_dot", gmm_fn("ragged_dot", mode), flops, gmm_bytes(M, K, N, e_used, itemsize) * mult),
                 Impl("dense matmul", dense_fn(mode), flops, itemsize * (M * K + K * N + M * N) * mult,
                      inputs="dense")]
        rows = run_group("moe", "gmm fc1", shape, mode, inputs, impls, args)
        dense_ms = rows["dense matmul"].median_ms
        for name in ("gmm (pallas)", "ragged_dot"):
            row = rows[name]
            parts = []
            if row.median_ms is not None and dense_ms is not None:
                pct = 100.0 * dense_ms / row.median_ms      # = its TFLOP/s as a % of the dense matmul's
                parts.append(f"{pct:.0f}% of dense TFLOP/s")
                row.metrics["pct_of_dense"] = pct
            if name == "gmm (pallas)":
                speedup = _ratio(rows, "ragged_dot", "gmm (pallas)")
                if speedup is not None:
                    parts.append(f"{speedup:.2f}x vs ragged_dot")
                    row.metrics["speedup_vs_ragged_dot"] = speedup
            row.compare = "; ".join(parts)
        if dense_ms is not None:
            rows["dense matmul"].compare = "peak reference"
        out += rows.values()

    ffn_shape = f"T={moe.tokens} top-{moe.topk} H={K} F={N} E={moe.experts}"
    for mode in (FWD, FWD_BWD):
        mult = 1.0 if mode == FWD else 3.0
        flops, nbytes = 2 * gmm_flops(M, K, N) * mult, ffn_bytes(moe, K, N, e_used, itemsize) * mult
        impls = [Impl("pallas", ffn_fn("pallas", mode), flops, nbytes, ref="ragged (reference)"),
                 Impl("ragged (reference)", ffn_fn("ragged", mode), flops, nbytes)]
        rows = run_group("moe", "expert_ffn", ffn_shape, mode, lambda: {"main": moe_inputs(moe, dtype, args.seed)},
                         impls, args)
        speedup = _ratio(rows, "ragged (reference)", "pallas")
        if speedup is not None:
            rows["pallas"].compare = f"{speedup:.2f}x vs ragged"
            rows["pallas"].metrics["speedup_vs_reference"] = speedup
        out += rows.values()
    return out


def _masked_compare(rows: dict, full: str, masked: str, unmasked: bool) -> None:
    """``unmasked``: the choice keeps this layer's full width (same kernel, so a ratio of ~1 is expected)."""
    ratio = _ratio(rows, masked, full)
    if ratio is not None:
        verdict = "ok" if ratio <= MASKED_TARGET else "ABOVE target"
        rows[masked].compare = f"masked/full {ratio:.2f} (target <= {MASKED_TARGET}: {verdict})"
        rows[masked].metrics["masked_over_full"] = ratio
    if unmasked:
        rows[masked].compare = "; ".join(filter(None, [rows[masked].compare, "full width at this budget"]))


def case_masked(args, ssd_shape: SSDShape, moe: MoEShape, dtype, choices: list[Masked]) -> list[Row]:
    itemsize = jnp.dtype(dtype).itemsize
    out = []
    s = dataclasses.replace(ssd_shape, b=max(args.batch))
    full_idx = routing(moe, moe.experts, args.seed).reshape(-1)
    e_full = int(np.sum(np.bincount(full_idx, minlength=moe.experts) > 0))
    M, K, N = moe.rows, moe.hidden, moe.ffn
    for c in choices:
        # a limit equal to the full width is no limit: pass None so the executable is the full one
        k_lim = None if c.hidden == K else c.hidden
        n_lim = None if c.ffn == N else c.ffn
        full_moe = k_lim is None and n_lim is None and c.experts == moe.experts
        nano = ", ".join(f"{k} {v}" for k, v in c.nano.items())
        print(f"masked {c.label}: Nano choice {nano} -> head_limit {c.head_limit}/{s.heads_per_group} per group, "
              f"k_limit {c.hidden}/{K}, ffn {c.ffn}/{N}, experts {c.experts}/{moe.experts}", file=sys.stderr)
        ha = s.g * c.head_limit
        for mode in (FWD, FWD_BWD):
            mult = 1.0 if mode == FWD else 3.0
            bwd = mode == FWD_BWD
            impls = [Impl("pallas full", ssd_fn("pallas", s, mode), ssd_flops(s, s.h) * mult,
                          ssd_bytes(s, s.h, itemsize, bwd)),
                     Impl("pallas masked", ssd_fn("pallas", s, mode, c.head_limit), ssd_flops(s, ha) * mult,
                          ssd_bytes(s, ha, itemsize, bwd), ref="reference masked"),
                     Impl("reference masked", ssd_fn("reference", s, mode, c.head_limit), ssd_flops(s, ha) * mult,
                          ssd_bytes(s, ha, itemsize, bwd))]
            rows = run_group("masked", f"ssd @ {c.label}", s.label(c.head_limit), mode,
                             lambda: {"main": ssd_inputs(s, dtype, args.seed)}, impls, args)
            _masked_compare(rows, "pallas full", "pallas masked", c.head_limit == s.heads_per_group)
            out += rows.values()

        e_masked = int(np.sum(np.bincount(routing(moe, c.experts, args.seed).reshape(-1), minlength=moe.experts) > 0))

        def inputs(c=c):
            return {"main": moe_inputs(moe, dtype, args.seed),
                    "masked": moe_inputs(moe, dtype, args.seed, experts=c.experts, hidden=c.hidden, ffn=c.ffn)}

        shape = f"M={M} K={c.hidden}/{K} N={c.ffn}/{N} E={c.experts}/{moe.experts}"
        for mode in (FWD, FWD_BWD):
            mult = 1.0 if mode == FWD else 3.0
            fm, bm = gmm_flops(M, c.hidden, c.ffn) * mult, gmm_bytes(M, c.hidden, c.ffn, e_masked, itemsize) * mult
            impls = [Impl("pallas full", gmm_fn("gmm", mode), gmm_flops(M, K, N) * mult,
                          gmm_bytes(M, K, N, e_full, itemsize) * mult),
                     Impl("pallas masked", gmm_fn("gmm", mode, k_lim, n_lim), fm, bm, ref="ragged_dot masked",
                          inputs="masked"),
                     Impl("ragged_dot masked", gmm_fn("ragged_dot", mode), fm, bm, inputs="masked")]
            rows = run_group("masked", f"gmm fc1 @ {c.label}", shape, mode, inputs, impls, args)
            _masked_compare(rows, "pallas full", "pallas masked", full_moe)
            out += rows.values()

        shape = f"T={moe.tokens} H={c.hidden}/{K} F={c.ffn}/{N} E={c.experts}/{moe.experts}"
        for mode in (FWD, FWD_BWD):
            mult = 1.0 if mode == FWD else 3.0
            fm = 2 * gmm_flops(M, c.hidden, c.ffn) * mult
            bm = ffn_bytes(moe, c.hidden, c.ffn, e_masked, itemsize) * mult
            impls = [Impl("pallas full", ffn_fn("pallas", mode), 2 * gmm_flops(M, K, N) * mult,
                          ffn_bytes(moe, K, N, e_full, itemsize) * mult),
                     Impl("pallas masked", ffn_fn("pallas", mode, k_lim, n_lim), fm, bm, ref="ragged masked",
                          inputs="masked"),
                     Impl("ragged masked", ffn_fn("ragged", mode), fm, bm, inputs="masked")]
            rows = run_group("masked", f"expert_ffn @ {c.label}", shape, mode, inputs, impls, args)
            _masked_compare(rows, "pallas full", "pallas masked", full_moe)
            out += rows.values()
    return out


# -------------------------------------------------------------------------------------------- main
def _int_list(text: str) -> list[int]:
    vals = [int(v) for v in text.split(",") if v.strip()]
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}")
    return vals


def _float_list(text: str) -> list[float]:
    vals = [float(v) for v in text.split(",") if v.strip()]
    if not vals or not all(0 < v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions in (0, 1], got {text!r}")
    return vals


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset of {','.join(CASES)} (default: all)")
    p.add_argument("--batch", type=_int_list, default=None,
                   help="SSD batch sizes (default 1,2,4,8; --small: 1); the masked SSD uses the largest")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per implementation; the median is reported "
                                                           "(default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per implementation first (default 3)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="dtype of x/B/C and the MoE operands (dt, A, D are fp32 as in the model; default bf16)")
    p.add_argument("--small", action="store_true",
                   help="tiny shapes so the script runs in seconds on CPU (a smoke test, not a benchmark)")
    p.add_argument("--json", metavar="PATH", help="also write the rows (and the run's settings) to PATH")
    p.add_argument("--budgets", type=_float_list, default=[0.577, 0.78],
                   help="masked case: budget fractions to search choices for (default 0.577,0.78)")
    p.add_argument("--choice", action="append", metavar="AXIS=N,..",
                   help="masked case: an explicit Nano choice (axes hidden, mamba_heads, experts, expert_ffn; "
                        "missing = full) instead of the --budgets search; repeatable")
    p.add_argument("--seq", type=int, default=None, help="SSD sequence length (default 4096; --small: 128)")
    p.add_argument("--tokens", type=int, default=None, help="MoE tokens (default 8192; --small: 64)")
    p.add_argument("--published-ms", type=float, default=0.36,
                   help="published mamba_ssm Triton forward time of the 8b-like SSD layer, ms (default 0.36)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown or not args.cases:
        p.error(f"--cases: unknown {unknown}; choose from {','.join(CASES)}")
    if args.batch is None:
        args.batch = [1] if args.small else [1, 2, 4, 8]
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    for name in ("seq", "tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


HEADERS = ["case", "kernel", "shape", "impl", "pass", "median ms", "TFLOP/s", "GB/s", "comparison",
           "max rel diff", "error"]


def table_rows(rows: list[Row]) -> list[list]:
    out = []
    for r in rows:
        err = "" if r.error is None else (r.error if len(r.error) <= 120 else r.error[:117] + "...")
        out.append([r.case, r.kernel, r.shape, r.impl, r.mode, r.median_ms, r.tflops, r.gbps, r.compare,
                    r.max_rel_diff, err])
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    dev = jax.devices()[0]
    on_cpu = dev.platform == "cpu"
    ssd_shape, ssd_8b, moe = build_shapes(args)
    warning = ("WARNING: no accelerator (JAX backend is CPU): the Pallas kernels run in interpret mode, so "
               "every Pallas timing below is meaningless; this run only smoke-tests the script and checks "
               "numerics.") if on_cpu else None

    print(f"# Pallas kernels vs pure-JAX peers ({'--small, ' if args.small else ''}{args.dtype})\n")
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; timing: median of {args.repeats} "
          f"after {args.warmup} warm-up run(s), interleaved, block_until_ready")
    if warning:
        print(f"\n{warning}")
    print()
    choices = []
    if "masked" in args.cases:
        choices = masked_choices(args, ssd_shape, moe)
    print_environment({"dtype": args.dtype, "cases": ",".join(args.cases), "ssd": ssd_shape.label() +
                       f" (batches {','.join(map(str, args.batch))})", "ssd 8b-like": ssd_8b.label(),
                       "moe": f"T={moe.tokens} top-{moe.topk} H={moe.hidden} F={moe.ffn} E={moe.experts}",
                       **{f"masked {c.label}": f"Nano {c.nano} -> head_limit {c.head_limit}, k_limit {c.hidden}, "
                                               f"ffn {c.ffn}, experts {c.experts}" for c in choices}})
    print(flush=True)

    rows: list[Row] = []
    for case in args.cases:
        print(f"case {case} ...", file=sys.stderr, flush=True)
        try:
            if case == "ssd":
                rows += case_ssd(args, ssd_shape, ssd_8b, dtype)
            elif case == "moe":
                rows += case_moe(args, moe, dtype)
            else:
                rows += case_masked(args, ssd_shape, moe, dtype, choices)
        except Exception as e:  # noqa: BLE001 - a bug outside run_group must not lose the other cases
            rows.append(Row(case, case, "-", "-", "-", error=_error_text(e)))

    print(markdown_table(HEADERS, table_rows(rows)))
    print(f"\nmedian ms: median wall time of one call. TFLOP/s, GB/s: the useful-FLOP and compulsory-byte models "
          f"of the docstring over the median. comparison: pallas speedup = peer time / pallas time; "
          f"'% of dense' = gmm TFLOP/s / dense matmul TFLOP/s (same useful FLOPs); masked/full = masked time / "
          f"full time (target <= {MASKED_TARGET}); 'Nx mamba_ssm's {args.published_ms:g} ms' = median / that "
          f"published forward time (< 1: faster). max rel diff: max|pallas - reference| / max|reference| of the "
          f"output (fwd) or of every gradient (fwd+bwd).")
    if warning:
        print(f"\n{warning}")

    failed = [r for r in rows if r.error]
    if args.json:
        payload = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
                   "interpret_mode": on_cpu, "args": {k: v for k, v in vars(args).items()},
                   "choices": [dataclasses.asdict(c) for c in choices],
                   "rows": [dataclasses.asdict(r) for r in rows]}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1, default=str)
    if failed:
        print(f"\n{len(failed)} row(s) failed; see the error column.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
