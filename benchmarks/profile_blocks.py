"""Where forward+backward time goes, per block type: ours (JAX) against transformers' own blocks.

For the ``--preset`` (default ``small``) at ``--batch`` x ``--seq`` tokens (default 2 x 1024), with
the same fp32 weights on both sides (HF ``save_pretrained`` -> ``star_elastic_jax.from_hf``):

* one block of each type (``M`` Mamba2 + SSD, ``*`` attention, ``E`` MoE, ``-`` MLP), its pre-norm
  and residual included, on a random hidden state: forward, and forward + backward (gradient of
  ``sum(out * cotangent)`` with respect to the input and every parameter of the block);
* the head: embedding lookup + final norm + lm_head + next-token cross-entropy.

Each row gives the median time over ``--repeats``, the count of such blocks in the model, and their
total share of the model's forward+backward. For ours it also reports what the optimised HLO of the
backward spends on data movement: the bytes written by ``copy`` / ``transpose`` instructions, as a
share of all bytes the instructions write (a static count from ``compiled.as_text()``, not a timing).

    python benchmarks/profile_blocks.py                 # the default table (a few minutes on 2 cores)
    python benchmarks/profile_blocks.py --seq 256 --repeats 2   # quick
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import star_elastic_jax as sej  # noqa: E402
from star_elastic_jax.model.norms import rms_normalize  # noqa: E402
from common import aot_compile, cpu_cores, markdown_table, print_environment, time_fn  # noqa: E402

KINDS = {"M": "Mamba2 + SSD", "*": "attention", "E": "MoE", "-": "MLP"}
_SHAPE = re.compile(r"= (\w+)\[([\d,]*)\]")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


def movement_share(hlo: str) -> float:
    """Bytes written by copy/transpose instructions over bytes written by all instructions."""
    moved = total = 0
    for line in hlo.splitlines():
        line = line.strip()
        m = _SHAPE.search(line)
        if not m or " parameter(" in line or line.startswith("ROOT tuple") or "get-tuple-element" in line:
            continue
        n = _BYTES.get(m.group(1), 4) * int(np.prod([int(d) for d in m.group(2).split(",") if d] or [1]))
        total += n
        op = line.split("=", 1)[1].split("(")[0].split()[-1] if "=" in line else ""
        if op in ("copy", "transpose") or "copy_fusion" in line or "transpose_fusion" in line:
            moved += n
    return moved / total if total else 0.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=cpu_cores())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-hf", action="store_true")
    return p.parse_args(argv)


def build(cfg, seed):
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    hf = NemotronHForCausalLM(NemotronHConfig(**cfg.to_hf(torch_dtype="float32"))).float()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = sej.from_hf(tmp, dtype=jnp.float32)
    return hf, ours


def ours_block(model, i, x, cot, repeats):
    graphdef, state = nnx.split(model.layers[i])

    def fwd(state, x):
        return nnx.merge(graphdef, state)(x)

    def loss(state, x):
        return jnp.sum(fwd(state, x) * cot)

    f, _ = aot_compile(jax.jit(fwd), state, x)
    g, _ = aot_compile(jax.jit(jax.grad(loss, argnums=(0, 1))), state, x)
    return (time_fn(lambda: f(state, x), repeats=repeats).median, time_fn(lambda: g(state, x), repeats=repeats).median,
            movement_share(g.as_text()))


def ours_head(model, ids, repeats):
    def loss(emb, norm_w, head, ids):
        x = jnp.take(emb, ids, axis=0)
        x = norm_w * rms_normalize(x, model.cfg.layer_norm_epsilon)
        logits = jnp.einsum("bld,vd->blv", x, head, preferred_element_type=jnp.float32)[:, :-1]
        logz = jax.nn.logsumexp(logits, axis=-1)
        return jnp.mean(logz - jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0])

    args = (model.embeddings[...], model.norm_f.weight[...], model.lm_head[...], ids)
    f, _ = aot_compile(jax.jit(loss), *args)
    g, _ = aot_compile(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), *args)
    return (time_fn(lambda: f(*args), repeats=repeats).median, time_fn(lambda: g(*args), repeats=repeats).median,
            movement_share(g.as_text()))


def hf_block(hf, i, x_np, cot_np, repeats):
    import torch

    layer = hf.model.layers[i] if hasattr(hf, "model") else hf.backbone.layers[i]
    x = torch.from_numpy(x_np)
    cot = torch.from_numpy(cot_np)

    def fwd():
        with torch.no_grad():
            return layer(x)

    def fwd_bwd():
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out = out[0] if isinstance(out, tuple) else out
        (out * cot).sum().backward()
        return xi.grad

    return time_fn(fwd, repeats=repeats, sync=lambda r: r).median, \
        time_fn(fwd_bwd, repeats=repeats, sync=lambda r: r).median


def hf_head(hf, ids_np, repeats):
    import torch

    backbone = hf.model if hasattr(hf, "model") else hf.backbone
    ids = torch.from_numpy(ids_np)

    def run(grad: bool):
        hf.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad):
            x = backbone.embeddings(ids)
            logits = hf.lm_head(backbone.norm_f(x)).float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1))
            if grad:
                loss.backward()
        return loss

    return time_fn(lambda: run(False), repeats=repeats, sync=lambda r: r).median, \
        time_fn(lambda: run(True), repeats=repeats, sync=lambda r: r).median


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    cfg = sej.ModelConfig.preset(args.preset)
    print_environment()
    hf, ours = build(cfg, args.seed)
    rng = np.random.default_rng(args.seed)
    B, L, H = args.batch, args.seq, cfg.hidden_size
    x_np = rng.standard_normal((B, L, H)).astype(np.float32)
    cot_np = rng.standard_normal((B, L, H)).astype(np.float32)
    ids_np = rng.integers(0, cfg.vocab_size, (B, L)).astype(np.int64)
    x, cot = jnp.asarray(x_np), jnp.asarray(cot_np)
    pattern = cfg.hybrid_override_pattern
    rows, totals = [], {"ours": 0.0, "hf": 0.0}
    measured = {}
    for kind in KINDS:
        if kind not in pattern:
            continue
        i = pattern.index(kind)
        o_f, o_fb, share = ours_block(ours, i, x, cot, args.repeats)
        h_f, h_fb = (float("nan"),) * 2 if args.no_hf else hf_block(hf, i, x_np, cot_np, args.repeats)
        measured[kind] = (pattern.count(kind), o_f, o_fb, share, h_f, h_fb)
    o_f, o_fb, share = ours_head(ours, jnp.asarray(ids_np, jnp.int32), args.repeats)
    h_f, h_fb = (float("nan"),) * 2 if args.no_hf else hf_head(hf, ids_np, args.repeats)
    measured["head"] = (1, o_f, o_fb, share, h_f, h_fb)
    for n, _, o_fb, _, _, h_fb in measured.values():
        totals["ours"] += n * o_fb
        totals["hf"] += n * h_fb
    for kind, (n, o_f, o_fb, share, h_f, h_fb) in measured.items():
        name = KINDS.get(kind, "embed + norm_f + lm_head + CE")
        rows.append([f"{name} (x{n})", f"{o_f * 1e3:.1f}", f"{o_fb * 1e3:.1f}", f"{o_fb / max(o_f, 1e-12):.1f}x",
                     f"{n * o_fb / totals['ours']:.0%}", f"{share:.0%}", f"{h_f * 1e3:.1f}", f"{h_fb * 1e3:.1f}",
                     f"{h_fb / max(h_f, 1e-12):.1f}x", f"{h_fb / o_fb:.2f}x"])
    print(f"\npreset {args.preset}, {B} x {L} tokens, median of {args.repeats}, torch threads {args.threads}")
    print(markdown_table(["block", "ours fwd ms", "ours fwd+bwd ms", "bwd/fwd", "share of ours", "copy/transpose "
                          "bytes (bwd HLO)", "HF fwd ms", "HF fwd+bwd ms", "HF bwd/fwd", "HF/ours fwd+bwd"], rows))
    print(f"\nsum over the model's blocks, fwd+bwd: ours {totals['ours']:.2f} s, HF {totals['hf']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
