"""Generation speed of our engine against transformers' ``generate``, same weights, same run.

Measured on the ``--preset`` (default ``small``) with random fp32 weights that both sides share
(HF ``save_pretrained`` -> ``star_elastic_jax.from_hf``):

1. **prefill**: a ``--prompt`` (default 512) token prompt. HF: ``model(ids, use_cache=True)`` under
   ``torch.no_grad()``. Ours: ``Engine.prefill`` (the jitted prefill with the cache writes).
2. **decode**: ``--new`` (default 128) greedy tokens after a 16-token prompt, at batch 1 and
   ``--batch`` (default 8). HF: ``generate(do_sample=False, use_cache=True, min_new_tokens=new)``;
   its decode time is the generate time minus the same prompt's prefill. Ours: ``Engine.generate``
   (device-side loop), decode time as reported by the engine (prefill excluded).
3. The same at each elastic budget (``--budgets``, default 1.0,0.78,0.577) on the *parent's*
   weights: the engine compiles each budget once and reads only its prefix of every weight. The
   budgets are resolved by the exhaustive search over the preset's default choice lists.

The "weight-read floor" is the batch-1 decode rate of a step that only reads, once, the weights
it must read (the active fp32 parameters less the embedding table), measured in the same run as a
jitted sum over a buffer of that size: no decode can beat it on this machine's memory bandwidth.

Compilation is excluded (every function runs once before timing); each figure is the median of
``--repeats`` runs. Peak RSS (``ru_maxrss``) is printed after each side.

    python benchmarks/generate.py                      # the full table (minutes on 2 cores)
    python benchmarks/generate.py --prompt 64 --new 16 --repeats 1 --no-hf   # smoke run
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import star_elastic_jax as sej  # noqa: E402
from common import markdown_table, print_environment  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--prompt", type=int, default=512, help="prefill prompt length (default 512)")
    p.add_argument("--new", type=int, default=128, help="new tokens per decode run (default 128)")
    p.add_argument("--batch", type=int, default=8, help="the larger decode batch (default 8)")
    p.add_argument("--budgets", default="1.0,0.78,0.577")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (ours only)")
    return p.parse_args(argv)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build(cfg, seed):
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    hf = NemotronHForCausalLM(NemotronHConfig(**cfg.to_hf(torch_dtype="float32"))).float().eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = sej.from_hf(tmp, dtype=jnp.float32)
    return hf, ours


def bandwidth_floor_tok_s(cfg, choice, repeats: int) -> float:
    """Decode tokens/s at batch 1 if a step did nothing but read the weights it must read once:
    the active parameters per token (fp32), less the embedding table (one row is read). Measured as
    a jitted sum over a buffer of that many floats, in this run."""
    from star_elastic_jax.elastic.budget import choice_param_count

    active = (cfg.param_count() if choice is None else choice_param_count(cfg, choice)).active
    hidden = cfg.hidden_size if choice is None or choice.hidden is None else choice.hidden
    n = int(active - cfg.vocab_size * hidden)
    buf = jnp.ones((n,), jnp.float32)
    f = jax.jit(jnp.sum)
    return 1.0 / median_time(lambda: f(buf).block_until_ready(), max(repeats, 5))


def bench_hf(hf, prompt_ids, decode_ids, new, repeats):
    import torch

    def prefill(ids):
        with torch.no_grad():
            hf(torch.as_tensor(ids), use_cache=True)

    def gen(ids):
        with torch.no_grad():
            hf.generate(torch.as_tensor(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                        use_cache=True)

    out = {"prefill": prompt_ids.size / median_time(lambda: prefill(prompt_ids), repeats)}
    for name, ids in decode_ids.items():
        total = median_time(lambda: gen(ids), repeats)
        pre = median_time(lambda: prefill(ids), repeats)
        out[name] = ids.shape[0] * new / max(total - pre, 1e-9)
    return out


def bench_ours(engine, prompt_ids, decode_ids, new, repeats, budget):
    def prefill():
        logits, _ = engine.prefill(prompt_ids, elastic=budget)
        jax.block_until_ready(logits)

    out = {"prefill": prompt_ids.size / median_time(prefill, repeats)}
    for name, ids in decode_ids.items():
        rates = []
        engine.generate(ids, new, elastic=budget)  # compile
        for _ in range(repeats):
            engine.generate(ids, new, elastic=budget)
            rates.append(engine.stats.decode_tok_s)
        out[name] = statistics.median(rates)
    return out



def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = sej.ModelConfig.preset(args.preset)
    print_environment()
    hf, ours = build(cfg, args.seed)
    rng = np.random.default_rng(args.seed)
    prompt_ids = rng.integers(3, cfg.vocab_size, (1, args.prompt)).astype(np.int64)
    decode_ids = {"decode b=1": rng.integers(3, cfg.vocab_size, (1, 16)).astype(np.int64),
                  f"decode b={args.batch}": rng.integers(3, cfg.vocab_size, (args.batch, 16)).astype(np.int64)}
    from star_elastic_jax.elastic.budget import choice_for_budget, choice_lists_for

    lists = choice_lists_for(cfg, None)
    budgets = {}
    for b in args.budgets.split(","):
        f = float(b)
        budgets[b] = None if f == 1.0 else choice_for_budget(cfg, f, lists)
    engine = sej.Engine(ours)
    rows, results = [], {}
    for label, choice in budgets.items():
        res = bench_ours(engine, prompt_ids, decode_ids, args.new, args.repeats, choice)
        res["floor b=1"] = bandwidth_floor_tok_s(cfg, choice, args.repeats)
        results[label] = res
        frac = 1.0 if choice is None else sej.elastic.budget.achieved_fraction(cfg, choice)
        print(f"ours @ {label} (active {frac:.3f}): " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in res.items())
              + f"; peak RSS {peak_rss_gb():.2f} GB", flush=True)
    hf_res = None
    if not args.no_hf:
        hf_res = bench_hf(hf, prompt_ids, decode_ids, args.new, args.repeats)
        print("transformers: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in hf_res.items())
              + f"; peak RSS {peak_rss_gb():.2f} GB", flush=True)
    cols = ["prefill"] + list(decode_ids)
    headers = (["path"] + [f"{c} (tok/s)" for c in cols]
               + ["vs full (b=1)", "weight-read floor b=1 (tok/s)", "b=1 / floor"])
    full = results[next(iter(results))]["decode b=1"]
    for label, res in results.items():
        rows.append([f"ours @ {label}"] + [f"{res[c]:.1f}" for c in cols]
                    + [f"{res['decode b=1'] / full:.2f}x", f"{res['floor b=1']:.1f}",
                       f"{res['decode b=1'] / res['floor b=1']:.0%}"])
    if hf_res:
        rows.append(["transformers generate"] + [f"{hf_res[c]:.1f}" for c in cols] + ["-", "-", "-"])
        rows.append(["ours @ full / transformers"] + [f"{results[next(iter(results))][c] / hf_res[c]:.1f}x"
                                                     for c in cols] + ["-", "-", "-"])
    print()
    print(f"preset {args.preset}, prompt {args.prompt}, {args.new} new tokens, median of {args.repeats}, "
          f"backend {jax.default_backend()}, peak RSS {peak_rss_gb():.2f} GB")
    print(markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
