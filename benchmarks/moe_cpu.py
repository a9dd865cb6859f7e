"""Routed-expert FFN on CPU: ``dense`` (one-hot oracle) vs ``ragged`` (``lax.ragged_dot``) vs ``blocked``.

What it measures, all on the same inputs in the same run (``jax.jit``, compiled ahead of time, the
compiled executables timed interleaved, median of ``--repeats`` after ``--warmup`` untimed calls):

1. **forward**: ``expert_ffn_<impl>(x, idx, weights, up, down)`` -> fp32 ``[T, H]``.
2. **forward+backward**: ``jax.value_and_grad`` of ``sum(out * cot)`` w.r.t. ``x``, ``weights``,
   ``up`` and ``down`` (the routing ``idx`` is an input, not differentiated).

Plus a **matmul** peer: the two plain matmuls of the same useful size (``[T*k, H] @ [H, F]`` then
``[T*k, F] @ [F, H]``, one expert for every row), the floor a dropless grouped matmul aims at.
The table gives each median, its ratio to ``blocked``, useful GFLOP/s (``4 T k H F`` forward,
3x that for forward+backward) and the max abs difference from ``dense`` (forward output / gradient
of ``up``), so a fast-but-wrong path would show.

Inputs: ``x ~ N(0, 1)``, router logits ``~ N(0, 1)`` -> top-``k`` distinct experts per token
(about uniform load), ``weights ~ U(0.1, 1)``, ``up/down ~ N(0, 1/fan_in)``; fp32 unless ``--bf16``.

Defaults are the ``small`` preset's MoE at 2 x 1024 tokens: T=2048, E=16, k=4, H=512, F=256.
Nano-like expert ratios at a CPU-friendly width: ``--experts 128 --topk 6 --hidden 256 --ffn 192``.

    python benchmarks/moe_cpu.py
    python benchmarks/moe_cpu.py --tokens 256 --repeats 3          # quick
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import aot_compile, markdown_table, print_environment, time_interleaved  # noqa: E402

from star_elastic_jax.kernels.moe import expert_ffn_blocked, expert_ffn_dense, expert_ffn_ragged  # noqa: E402
from star_elastic_jax.kernels.moe.blocked import default_block_rows  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="T, tokens (batch x seq) (default 2048)")
    p.add_argument("--experts", type=int, default=16, help="E, routed experts (default 16)")
    p.add_argument("--topk", type=int, default=4, help="k, experts per token (default 4)")
    p.add_argument("--hidden", type=int, default=512, help="H, hidden size (default 512)")
    p.add_argument("--ffn", type=int, default=256, help="F, expert FFN size (default 256)")
    p.add_argument("--block-rows", type=int, default=None,
                   help="blocked: rows per block (default: default_block_rows(T*k, E))")
    p.add_argument("--impls", default="dense,ragged,blocked,matmul",
                   help="comma-separated subset of dense,ragged,blocked,matmul")
    p.add_argument("--bf16", action="store_true", help="bf16 x/up/down (default fp32)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per function (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_inputs(args):
    rng = np.random.default_rng(args.seed)
    T, E, k, H, F = args.tokens, args.experts, args.topk, args.hidden, args.ffn
    dt = jnp.bfloat16 if args.bf16 else jnp.float32
    idx = np.argsort(-rng.standard_normal((T, E)), axis=1)[:, :k].astype(np.int32)
    return {
        "x": jnp.asarray(rng.standard_normal((T, H)), dt),
        "idx": jnp.asarray(idx),
        "weights": jnp.asarray(rng.uniform(0.1, 1.0, (T, k)), jnp.float32),
        "up": jnp.asarray(rng.standard_normal((E, F, H)) / np.sqrt(H), dt),
        "down": jnp.asarray(rng.standard_normal((E, H, F)) / np.sqrt(F), dt),
        "cot": jnp.asarray(rng.standard_normal((T, H)), jnp.float32),
    }


def plain_matmuls(x, idx, weights, up, down, ffn_mask=None):
    """Peer with the same useful FLOPs: every (token, slot) row through expert 0 (not an MoE)."""
    T, k = idx.shape
    xs = jnp.repeat(x, k, axis=0)
    out = jnp.square(jax.nn.relu(xs @ up[0].T.astype(x.dtype))) @ down[0].T.astype(x.dtype)
    return jnp.einsum("tk,tkh->th", weights.astype(jnp.float32), out.astype(jnp.float32).reshape(T, k, -1))


def main(argv=None):
    args = parse_args(argv)
    T, E, k, H, F = args.tokens, args.experts, args.topk, args.hidden, args.ffn
    B = args.block_rows or default_block_rows(T * k, E)
    impls = {"dense": expert_ffn_dense, "ragged": expert_ffn_ragged,
             "blocked": functools.partial(expert_ffn_blocked, block_rows=B), "matmul": plain_matmuls}
    names = [n.strip() for n in args.impls.split(",") if n.strip()]
    unknown = sorted(set(names) - set(impls))
    if unknown:
        raise SystemExit(f"unknown --impls {unknown}; choose from {sorted(impls)}")
    inp = make_inputs(args)
    a = (inp["x"], inp["idx"], inp["weights"], inp["up"], inp["down"])

    def fwd(fn):
        """``(jitted, args)`` of the forward."""
        return jax.jit(lambda x, idx, w, up, down: fn(x, idx, w, up, down)), a

    def fwd_bwd(fn):
        """``(jitted, args)`` of value_and_grad of ``sum(out * cot)`` w.r.t. x, weights, up, down."""
        def loss(x, w, up, down, idx, cot):
            return jnp.sum(fn(x, idx, w, up, down) * cot)

        return (jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))),
                (inp["x"], inp["weights"], inp["up"], inp["down"], inp["idx"], inp["cot"]))

    print_environment({"shape": f"T={T} E={E} k={k} H={H} F={F} ({'bf16' if args.bf16 else 'fp32'})",
                       "blocked block_rows": str(B)})
    print()
    flops = 4.0 * T * k * H * F
    rows = []
    for mode, build, mult in (("forward", fwd, 1.0), ("forward+backward", fwd_bwd, 3.0)):
        compiled, compile_s, results = {}, {}, {}
        for n in names:
            jitted, fargs = build(impls[n])
            c, s = aot_compile(jitted, *fargs)
            call = functools.partial(c, *fargs)
            compiled[n], compile_s[n] = call, s
            results[n] = call()
            print(f"compiled {mode:16s} {n:8s} in {s:.1f}s", file=sys.stderr, flush=True)
        timings = time_interleaved(compiled, repeats=args.repeats, warmup=args.warmup)
        ref = results.get("dense")
        base = timings["blocked"].median if "blocked" in timings else None
        for n in names:
            t = timings[n].median
            out = results[n] if mode == "forward" else results[n][1][2]  # output / d up
            want = None if ref is None else (ref if mode == "forward" else ref[1][2])
            diff = None if want is None or n == "matmul" else float(jnp.max(jnp.abs(
                out.astype(jnp.float32) - want.astype(jnp.float32))))
            rows.append([mode, n, t * 1e3, timings[n].min * 1e3, None if base is None else t / base,
                         flops * mult / t / 1e9, compile_s[n], diff])
    print(markdown_table(["pass", "impl", "median ms", "min ms", "x blocked", "useful GFLOP/s", "compile s",
                          "max|diff| vs dense"], rows))
    print("\nx blocked: median time / blocked's median time in the same pass (>1: slower than blocked). "
          "matmul: plain matmuls of the same useful size (one expert for all rows), a floor, not an MoE. "
          "max|diff|: forward output, or d(up) for forward+backward.")


if __name__ == "__main__":
    main()
