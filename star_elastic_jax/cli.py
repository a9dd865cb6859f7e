"""``star-elastic``: the command-line tool. Thin: parse flags, call library functions, print."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Sequence

from star_elastic_jax.errors import StarElasticError


def _cmd_info(args: argparse.Namespace) -> int:
    from star_elastic_jax.config import ModelConfig
    from star_elastic_jax.report import count_summary, layer_table

    if args.config is None:
        from star_elastic_jax.checkpoint.orbax import read_config

        if args.ckpt is None:
            raise StarElasticError("--config/--ckpt", None, "give a preset, an HF config path, or --ckpt DIR")
        cfg = read_config(args.ckpt)
    else:
        cfg = ModelConfig.load(args.config)
    print(f"pattern {cfg.hybrid_override_pattern} ({cfg.num_hidden_layers} blocks), hidden {cfg.hidden_size}, "
          f"vocab {cfg.vocab_size}")
    print(layer_table(cfg))
    print(count_summary(cfg))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from star_elastic_jax.checkpoint.hf import from_hf, to_hf
    from star_elastic_jax.checkpoint.orbax import load_model, save_model

    if args.from_hf:
        if not args.out:
            raise StarElasticError("--out", None, "--from-hf needs --out DIR (the Orbax checkpoint to write)")
        model = from_hf(args.from_hf, progress=True)
        save_model(model, args.out, metadata={"source": os.path.abspath(args.from_hf)})
        print(f"wrote Orbax checkpoint {args.out} ({model.cfg.param_count().total:,} parameters)")
    else:
        if not args.to_hf:
            raise StarElasticError("--to-hf", None, "--ckpt needs --to-hf DIR (the HF checkpoint to write)")
        model = load_model(args.ckpt)
        to_hf(model, args.to_hf, dtype=args.dtype, max_shard_size=args.max_shard_size, progress=True)
        print(f"wrote HF checkpoint {args.to_hf} ({args.dtype})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from star_elastic_jax.demo import run_demo

    return run_demo(workdir=args.workdir or tempfile.mkdtemp(prefix="star-elastic-demo-"), seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="star-elastic",
                                description="Elastic many-in-one Nemotron-H models in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="print the layer table and parameter counts of a config or checkpoint",
                          description="Print the layer table and exact total/active parameter counts.")
    src = info.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="preset (tiny, small, nano-v3-30b) or path to an HF config.json / dir")
    src.add_argument("--ckpt", help="a star_elastic_jax Orbax checkpoint directory")
    info.set_defaults(func=_cmd_info)

    conv = sub.add_parser("convert", help="convert between HF safetensors and Orbax checkpoints",
                          description="HF -> Orbax: --from-hf DIR --out DIR.  Orbax -> HF: --ckpt DIR --to-hf DIR.")
    direction = conv.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="DIR", help="HF NemotronH checkpoint directory to read")
    direction.add_argument("--ckpt", metavar="DIR", help="Orbax checkpoint directory to read")
    conv.add_argument("--out", metavar="DIR", help="Orbax checkpoint directory to write (with --from-hf)")
    conv.add_argument("--to-hf", metavar="DIR", help="HF checkpoint directory to write (with --ckpt)")
    conv.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                      help="tensor dtype of the HF checkpoint (default bfloat16, like NVIDIA's)")
    conv.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    conv.set_defaults(func=_cmd_convert)

    demo = sub.add_parser("demo", help="build the tiny model, run it, export to HF and compare with transformers",
                          description="End-to-end check on CPU: tiny preset -> forward -> HF export -> "
                                      "transformers reload -> largest logit difference.")
    demo.add_argument("--workdir", help="where to write the exported checkpoint (default: a temp dir)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StarElasticError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
