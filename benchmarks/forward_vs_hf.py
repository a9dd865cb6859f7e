"""Forward and forward+backward speed of our JAX NemotronH vs Hugging Face transformers' PyTorch one.

What it measures (both models hold the *same* weights, on the same inputs, in the same run):

1. **forward**: HF ``model(ids, use_cache=False).logits`` in eval mode under ``torch.no_grad()``
   vs ours: ``jax.jit`` of a pure function of the split NNX state,
   ``lambda state, ids: nnx.merge(graphdef, state)(ids)``.
2. **forward+backward**: next-token cross-entropy (mean over the ``batch * (seq - 1)`` predicted
   tokens, labels = the input ids shifted by one) and its gradient with respect to every parameter.
   HF: train mode, ``model(ids, labels=ids, use_cache=False).loss.backward()`` (grads zeroed each
   repeat; HF shifts the labels itself). Ours: ``jax.jit(jax.value_and_grad(loss_fn))`` over the
   ``nnx.Param`` state only (the ``e_score_correction_bias`` buffers are not differentiated; they are
   not parameters in transformers either).

Our compile time is excluded from the timed runs (each function is compiled ahead of time and the
compiled executable is timed) and reported in its own column. Both sides are warmed up, then HF and
ours are timed alternately (so load drift on a shared machine hits both alike); the table shows the
median of ``--repeats`` timed runs and tokens/s at that median. The same run also checks
numerics: max |logit diff| (forward), |loss diff| and the relative difference of the global gradient
L2 norm (forward+backward).

The HF model is a random ``NemotronHForCausalLM`` built from ``ModelConfig.preset(--preset).to_hf()``
(``torch.manual_seed(--seed)``), saved with ``save_pretrained`` in fp32 to a temporary directory and
loaded into ours with ``star_elastic_jax.from_hf``, so both use bit-identical fp32 weights.

Threads: torch uses ``--threads`` (default: every CPU core this process may use); XLA's CPU backend
uses all cores by default. Both are printed. On a machine with a CUDA build of torch and a GPU
JAX, HF runs on ``--torch-device`` (default: cuda when available) and ours on JAX's default device.

Run from the repo root (the full default run, batch 2 x 1024 tokens, takes minutes on a laptop CPU):

    python benchmarks/forward_vs_hf.py
    python benchmarks/forward_vs_hf.py --seq 128 --repeats 2 --warmup 1   # quick smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import star_elastic_jax as sej  # noqa: E402
from common import aot_compile, cpu_cores, markdown_table, print_environment, time_interleaved  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="ModelConfig preset to build (default: small)")
    p.add_argument("--batch", type=int, default=2, help="sequences per batch (default: 2)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default: 1024)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per path; the median is reported (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per path before timing (default: 2)")
    p.add_argument("--threads", type=int, default=cpu_cores(),
                   help=f"torch intra-op threads (default: all {cpu_cores()} cores, as XLA uses)")
    p.add_argument("--seed", type=int, default=0, help="seed for the HF weights and the tokens (default: 0)")
    p.add_argument("--torch-device", default=None, choices=["cpu", "cuda"],
                   help="device for the HF model (default: cuda if torch sees one, else cpu)")
    p.add_argument("--moe-impl", default=None, help="override ModelConfig.moe_impl for ours (default: config's)")
    p.add_argument("--ssd-impl", default=None, help="override ModelConfig.ssd_impl for ours (default: config's)")
    p.add_argument("--skip-backward", action="store_true", help="time the forward path only")
    args = p.parse_args(argv)
    for name in ("batch", "seq", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.seq < 2:
        p.error("--seq must be >= 2 (the loss predicts the next token)")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


# ----------------------------------------------------------------------------------------- models
def build_models(cfg: sej.ModelConfig, seed: int, torch_device: str, runtime: dict):
    """A random HF NemotronHForCausalLM and ours loaded from its fp32 save_pretrained directory."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_cfg = NemotronHConfig(**cfg.to_hf(torch_dtype="float32"))
    torch.manual_seed(seed)
    hf = NemotronHForCausalLM(hf_cfg).to(dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="sej-bench-") as tmp:
        hf.save_pretrained(tmp)
        ours = sej.from_hf(tmp, dtype=jnp.float32, **runtime)
    return hf.to(torch_device), ours


def next_token_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of ``logits[:, t]`` predicting ``labels[:, t + 1]`` (what HF's loss computes)."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(logz - picked)


def hf_mamba_path() -> str:
    """Which Mamba2 implementation transformers will use here (fused CUDA kernels or its torch fallback)."""
    import importlib.util

    have = [m for m in ("mamba_ssm", "causal_conv1d") if importlib.util.find_spec(m) is not None]
    return f"kernels ({', '.join(have)} installed)" if have else "torch reference (no mamba_ssm / causal_conv1d)"


def gemm_floor(cfg: sej.ModelConfig, tokens: int, repeats: int) -> float:
    """Seconds of one ``jnp.dot`` [tokens, hidden] x [hidden, N] with the FLOPs of the forward's
    weight matmuls (N chosen to match), the median of ``repeats``."""
    from common import time_fn

    flops = 2 * tokens * (cfg.param_count().active - cfg.vocab_size * cfg.hidden_size)
    k = cfg.hidden_size
    n = max(1, round(flops / (2 * tokens * k)))
    a = jnp.ones((tokens, k), jnp.float32)
    b = jnp.ones((k, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    return time_fn(lambda: dot(a, b), repeats=max(repeats, 3), warmup=1).median


def global_norm(tree) -> float:
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree))))


# -------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch_device = args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    runtime = {k: v for k, v in (("moe_impl", args.moe_impl), ("ssd_impl", args.ssd_impl)) if v is not None}
    cfg = sej.ModelConfig.preset(args.preset)
    B, L = args.batch, args.seq
    tokens = B * L

    t0 = time.perf_counter()
    hf, ours = build_models(cfg, args.seed, torch_device, runtime)
    build_s = time.perf_counter() - t0
    ours_cfg = ours.cfg
    ids_np = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, size=(B, L), dtype=np.int64)
    ids_t = torch.from_numpy(ids_np).to(torch_device)
    ids_j = jnp.asarray(ids_np, dtype=jnp.int32)

    print(f"# forward / forward+backward: star_elastic_jax vs transformers NemotronH ({args.preset} preset)\n")
    pc = cfg.param_count()
    print(f"model: preset={args.preset} pattern={cfg.hybrid_override_pattern} hidden={cfg.hidden_size} "
          f"experts={cfg.n_routed_experts} top-{cfg.num_experts_per_tok} vocab={cfg.vocab_size} "
          f"params total={pc.total:,} active={pc.active:,}")
    print(f"input: batch={B} seq={L} ({tokens:,} tokens/step); timing: median of {args.repeats} after "
          f"{args.warmup} warm-up run(s); build+convert {build_s:.1f} s")
    print(f"ours: fp32 params, compute_dtype={ours_cfg.compute_dtype}, moe_impl={ours_cfg.moe_impl}, "
          f"ssd_impl={ours_cfg.ssd_impl}; HF: fp32, attn={hf.config._attn_implementation}, "
          f"experts={getattr(hf.config, '_experts_implementation', '?')}, mamba={hf_mamba_path()}, "
          f"device={torch_device}\n")
    print_environment({"torch device": torch_device,
                       "threads": f"torch {torch.get_num_threads()} (--threads); XLA CPU: its default pool "
                                  f"(all {cpu_cores()} cores)"})
    print()

    rows, checks, spread = [], [], []

    # ---------------------------------------------------------------- forward
    hf.eval()

    def hf_forward():
        with torch.no_grad():
            return hf(ids_t, use_cache=False).logits

    graphdef, state = nnx.split(ours)
    fwd = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    fwd_c, fwd_compile = aot_compile(fwd, state, ids_j)

    t = time_interleaved({"hf": hf_forward, "ours": lambda: fwd_c(state, ids_j)},
                         repeats=args.repeats, warmup=args.warmup)
    t_hf, t_ours = t["hf"], t["ours"]
    spread += [("forward", "HF", t_hf), ("forward", "ours", t_ours)]
    rows.append(["forward", t_hf.median, t_ours.median, t_hf.median / t_ours.median,
                 t_hf.per_second(tokens), t_ours.per_second(tokens), fwd_compile])

    logits_hf = hf_forward().float().cpu().numpy()
    logits_ours = np.asarray(fwd_c(state, ids_j))
    diff = float(np.max(np.abs(logits_ours - logits_hf)))
    checks.append(["forward", "max abs logit diff", diff, float(np.max(np.abs(logits_hf)))])
    del logits_hf, logits_ours

    # ---------------------------------------------------------------- forward + backward
    if not args.skip_backward:
        hf.train()

        def hf_step():
            hf.zero_grad(set_to_none=True)
            loss = hf(ids_t, labels=ids_t, use_cache=False).loss
            loss.backward()
            return loss

        graphdef_p, params, rest = nnx.split(ours, nnx.Param, ...)

        def loss_fn(params, rest, ids):
            return next_token_loss(nnx.merge(graphdef_p, params, rest)(ids), ids)

        step = jax.jit(jax.value_and_grad(loss_fn))
        step_c, step_compile = aot_compile(step, params, rest, ids_j)

        t = time_interleaved({"hf": hf_step, "ours": lambda: step_c(params, rest, ids_j)},
                             repeats=args.repeats, warmup=args.warmup)
        t_hf, t_ours = t["hf"], t["ours"]
        spread += [("forward+backward", "HF", t_hf), ("forward+backward", "ours", t_ours)]
        rows.append(["forward+backward", t_hf.median, t_ours.median, t_hf.median / t_ours.median,
                     t_hf.per_second(tokens), t_ours.per_second(tokens), step_compile])

        loss_hf = float(hf_step().detach())
        gnorm_hf = float(torch.sqrt(sum(torch.sum(p.grad.double() ** 2) for p in hf.parameters()
                                        if p.grad is not None)))
        loss_ours, grads = step_c(params, rest, ids_j)
        loss_ours, gnorm_ours = float(loss_ours), global_norm(grads)
        checks.append(["forward+backward", "abs loss diff", abs(loss_ours - loss_hf), loss_hf])
        checks.append(["forward+backward", "ours loss", loss_ours, loss_hf])
        checks.append(["forward+backward", "rel grad-norm diff", abs(gnorm_ours - gnorm_hf) / gnorm_hf, gnorm_hf])

    floor = gemm_floor(cfg, tokens, args.repeats)
    for r in rows:
        r.append(f"{(floor if r[0] == 'forward' else 3 * floor) / r[2]:.0%}")
    print(markdown_table(["path", "HF transformers (s)", "ours (s)", "speedup (HF/ours)", "HF tokens/s",
                          "ours tokens/s", "ours compile (s)", "ours vs GEMM floor"], rows))
    print(f"\n(GEMM floor: one plain jnp.dot with the FLOPs of the model's weight matmuls for these tokens, "
          f"2 x tokens x (active params - embedding table), measured in this run: {floor:.3f} s forward, "
          "3x that for forward+backward; attention scores and the SSD are extra work on top)")
    print("\n(ours compile = trace + lower + XLA compile, once; excluded from the timed columns)")
    print("timing spread (min / max s): " + "; ".join(f"{path} {who} {t.min:.3g} / {t.max:.3g}"
                                                     for path, who, t in spread))
    noisy = [f"{path} {who}" for path, who, t in spread if t.max > 1.5 * t.min]
    if noisy:
        print(f"WARNING: noisy timings (max > 1.5 x min) for {', '.join(noisy)}: the machine is probably busy; "
              "torch's OpenMP threads slow down far more than XLA's under CPU contention, so rerun on an idle "
              "machine (or with more --repeats) before quoting the ratios.")
    print()
    print(markdown_table(["path", "numerics check", "value", "reference scale"], checks))
    print("\n(reference scale: max |HF logit| for logits, HF loss for the loss, HF global grad L2 norm "
          "for the gradient)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
