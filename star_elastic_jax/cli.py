"""``star-elastic``: the command-line tool. Thin: parse flags, call library functions, print."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from typing import Sequence

from star_elastic_jax.errors import StarElasticError


def _cmd_info(args: argparse.Namespace) -> int:
    from star_elastic_jax.config import ModelConfig
    from star_elastic_jax.report import count_summary, layer_table

    info = None
    if args.config is None:
        from star_elastic_jax.checkpoint.orbax import read_config, read_metadata

        if args.ckpt is None:
            raise StarElasticError("--config/--ckpt", None, "give a preset, an HF config path, or --ckpt DIR")
        verify = not args.no_verify
        cfg = read_config(args.ckpt, verify=verify)
        if "elastic" in read_metadata(args.ckpt, verify=verify):
            from star_elastic_jax.checkpoint.elastic import read_elastic

            info = read_elastic(args.ckpt, verify=verify)
    else:
        cfg = ModelConfig.load(args.config)
    print(f"pattern {cfg.hybrid_override_pattern} ({cfg.num_hidden_layers} blocks), hidden {cfg.hidden_size}, "
          f"vocab {cfg.vocab_size}")
    print(layer_table(cfg))
    print(count_summary(cfg))
    rows = _info_rows(args, cfg, info)
    if rows:
        _print_budgets(args, cfg, info, rows)
    from star_elastic_jax.report import cache_table

    print()
    print(cache_table(cfg, rows, depth_order=None if info is None else info.depth_order))
    return 0


def _info_rows(args: argparse.Namespace, cfg, info) -> list:
    """``[(label, ElasticChoice)]`` from --budgets, --choices and (by default) the checkpoint's budgets."""
    import json

    from star_elastic_jax.elastic.budget import (check_choice_lists, choice_for_budget, choice_lists_for,
                                                 parse_fraction, validate_budgets)
    from star_elastic_jax.elastic.choice import ElasticChoice
    from star_elastic_jax.errors import ChoiceError

    depth_order = None if info is None else info.depth_order
    rows: list = []
    args.asked = {}  # label -> the fraction asked for (flagged when the delivered one is far from it)
    if args.budgets is None and info is not None:
        rows += list(info.budgets.items())
    if args.budgets is not None:
        stored = None if info is None else info.choice_lists
        if args.choice_lists is not None:
            try:
                stored = check_choice_lists(cfg, json.loads(args.choice_lists))
            except (json.JSONDecodeError, ChoiceError, TypeError, AttributeError) as e:
                raise StarElasticError("--choice-lists", args.choice_lists,
                                       f'a JSON object {{axis: [sizes, descending]}} valid for this config ({e})'
                                       ) from None
        lists = choice_lists_for(cfg, stored)
        items = [x.strip() for x in args.budgets.split(",")]
        if not args.budgets.strip() or any(not x for x in items):
            raise StarElasticError("--budgets", args.budgets, "a comma-separated list such as 1.0,0.78,0.577")
        names = () if info is None else tuple(info.budgets)
        parsed = []  # (label, stored choice or fraction); validated before any (slow) resolution
        for item in items:
            if item in names:
                parsed.append((item, info.budgets[item]))
            else:
                parsed.append((item, parse_fraction(item, "--budgets", names=names)))
        fractions = [v for _, v in parsed if isinstance(v, float)]
        if fractions:
            validate_budgets(fractions, "--budgets")
        for label, v in parsed:
            if isinstance(v, ElasticChoice):
                rows.append((label, v))
            else:
                args.asked[label] = v
                rows.append((label, choice_for_budget(cfg, v, lists)))
    for n, text in enumerate(args.choices or []):
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            choice = ElasticChoice.from_dict(data)
            choice.resolve(cfg, depth_order=depth_order)
        except (json.JSONDecodeError, TypeError) as e:
            raise StarElasticError("--choices", text, 'a JSON object such as \'{"hidden": 2688, "mamba_heads": 32}\' '
                                                      f"({e})") from None
        except ChoiceError as e:
            raise StarElasticError("--choices", text, f"{e.field}={e.value!r}: {e.valid}") from None
        rows.append((f"choice{n + 1}", choice))
    return rows


def _print_budgets(args: argparse.Namespace, cfg, info, rows) -> None:
    from star_elastic_jax.report import (budget_table, distinct_choices, measured_storage_summary,
                                         storage_summary)

    depth_order = None if info is None else info.depth_order
    print()
    for label, choice in rows:
        print(f"{label}: {choice.to_dict() or 'full model'}")
    print(budget_table(cfg, rows, depth_order=depth_order))
    _flag_far_budgets(cfg, rows, getattr(args, "asked", {}), depth_order)
    print(storage_summary(cfg, rows, depth_order=depth_order))
    if info is not None:
        from star_elastic_jax.export.elastic import measure_storage

        distinct = dict(distinct_choices(cfg, rows, depth_order=depth_order))
        nested, sizes = measure_storage(info.path, distinct, verify=not args.no_verify)
        print(measured_storage_summary(nested, sizes))


def _flag_far_budgets(cfg, rows, asked: dict, depth_order) -> None:
    """A line per row whose delivered active fraction is more than 5 points from the asked one."""
    from star_elastic_jax.elastic.budget import BUDGET_SLACK, achieved_fraction

    for label, choice in rows:
        if label not in asked:
            continue
        got = achieved_fraction(cfg, choice, depth_order)
        if abs(got - asked[label]) > BUDGET_SLACK:
            print(f"warning: budget {label} -> active fraction {got:.4f}, {abs(got - asked[label]) * 100:.1f} points "
                  f"from the asked {asked[label]:g}: the choice lists allow nothing closer (pass --choice-lists with "
                  "finer sizes, or --choices)")


def _cmd_generate(args: argparse.Namespace) -> int:
    import json

    from star_elastic_jax.elastic.budget import parse_fraction
    from star_elastic_jax.infer.loading import load_engine
    from star_elastic_jax.infer.sampling import validate_sampling

    prompts = _read_prompts(args)
    validate_sampling(args.temperature, args.top_k, args.top_p, args.min_p)  # before loading anything
    if args.max_new_tokens < 1:
        raise StarElasticError("--max-new-tokens", args.max_new_tokens, "an integer >= 1")
    engine = load_engine(args.ckpt, verify=not args.no_verify)
    budget = args.budget
    if budget is not None and budget not in engine.budgets:
        budget = parse_fraction(budget, "--budget", names=tuple(engine.budgets))
    engine.resolve(budget, field="--budget")  # a budget the checkpoint cannot honour fails here, before compiling
    tok = engine.tokenizer
    kw = dict(elastic=budget, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
              eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, seed=args.seed)
    if args.stream:
        ids, lens = engine.encode_prompts(prompts)
        print(f"[{len(prompts)} prompt(s), streaming]", file=sys.stderr)
        done = [""] * len(prompts)
        gen = [[] for _ in prompts]
        for chunk in engine.stream(ids, args.max_new_tokens, lengths=lens, stream_chunk=args.stream_chunk, **kw):
            for b, row in enumerate(chunk.tolist()):
                gen[b] += row
                text = tok.decode(gen[b])
                if len(prompts) == 1:
                    sys.stdout.write(text[len(done[b]):])
                    sys.stdout.flush()
                done[b] = text
        if len(prompts) == 1:
            print()
        texts = done
    else:
        texts = engine.generate_text(prompts, args.max_new_tokens, **kw)
    if not (args.stream and len(prompts) == 1):
        for p, t in zip(prompts, texts):
            print(json.dumps({"prompt": p, "completion": t}, ensure_ascii=False) if args.prompts else t)
    s = engine.stats
    print(f"budget {args.budget or 'full'}: prefill {s.prompt_tokens} tokens in {s.prefill_s:.3f}s "
          f"({s.prefill_tok_s:.1f} tok/s, compile included on first use); decode {s.new_tokens} tokens in "
          f"{s.decode_s:.3f}s ({s.decode_tok_s:.1f} tok/s)", file=sys.stderr)
    return 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt TEXT, or --prompts FILE.jsonl (one {"prompt": ...} object or JSON string per line)."""
    import json

    if (args.prompt is None) == (args.prompts is None):
        raise StarElasticError("--prompt/--prompts", None, "give exactly one of --prompt TEXT or --prompts FILE.jsonl")
    if args.prompt is not None:
        if not args.prompt:
            raise StarElasticError("--prompt", "", "must not be empty")
        return [args.prompt]
    out = []
    with open(args.prompts, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise StarElasticError(f"--prompts line {n}", line.strip()[:60], f"a JSON object or string ({e})"
                                       ) from None
            text = rec.get("prompt") if isinstance(rec, dict) else rec
            if not isinstance(text, str) or not text:
                raise StarElasticError(f"--prompts line {n}", line.strip()[:60],
                                       'a non-empty JSON string or {"prompt": "..."}')
            out.append(text)
    if not out:
        raise StarElasticError("--prompts", args.prompts, "holds no prompt")
    return out


def _check_out(args: argparse.Namespace, out: str, field: str, *inputs: str) -> None:
    """The output rules of star_elastic_jax.outputs, checked before anything is read, naming the flag."""
    from star_elastic_jax.outputs import check_output_dir, parse_size

    check_output_dir(out, inputs=inputs, overwrite=args.overwrite, field=field)
    if getattr(args, "max_shard_size", None) is not None:
        parse_size(args.max_shard_size, "--max-shard-size")


def _cmd_slice(args: argparse.Namespace) -> int:
    from star_elastic_jax.export.elastic import slice_checkpoint
    from star_elastic_jax.errors import ChoiceError

    _check_out(args, args.out, "--out", args.ckpt)
    try:
        dtype = args.dtype or ("bfloat16" if args.hf else None)  # --hf: bf16 for deployment, as documented
        res = slice_checkpoint(args.ckpt, args.budget, args.out, hf=args.hf, dtype=dtype,
                               max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                               verify=not args.no_verify, allow_nonfinite=args.allow_nonfinite)
    except ChoiceError as e:
        if e.field == "budget":
            raise StarElasticError("--budget", e.value, e.valid) from None
        raise
    pc = res.cfg.param_count()
    frac = res.active_fraction
    print(f"budget {args.budget} -> {res.choice.to_dict() or 'full model'} (active fraction {frac:.4f}; "
          f"{_RULES[res.rule]})")
    _note_far_slice(args.budget, frac)
    print(f"wrote {'HF' if args.hf else 'Orbax'} checkpoint {res.out} ({pc.total:,} parameters, {pc.active:,} active)")
    return 0


_RULES = {"stored": "a budget stored in the checkpoint",
          "router": "chosen by the checkpoint's trained router, interpolating between its trained budgets",
          "search": "chosen by exhaustive search over the checkpoint's choice lists (no trained router covers it)",
          "explicit": "an explicit choice"}


def _note_far_slice(budget: str, frac: float) -> None:
    from star_elastic_jax.elastic.budget import BUDGET_SLACK

    try:
        asked = float(budget)
    except ValueError:
        return  # a stored budget name: delivered exactly as stored
    if abs(frac - asked) > BUDGET_SLACK:
        print(f"note: asked for {asked:g}, delivered active fraction {frac:.4f} ({abs(frac - asked) * 100:.1f} points "
              "away): the closest sub-model this checkpoint's choice lists allow")


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from star_elastic_jax.checkpoint.hf import params_to_hf

    _check_out(args, args.out, "--out", args.ckpt)
    verify = not args.no_verify
    if args.elastic:
        from star_elastic_jax.checkpoint.elastic import read_elastic
        from star_elastic_jax.export.elastic import export_elastic_hf

        info = read_elastic(args.ckpt, verify=verify)
        export_elastic_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                          overwrite=args.overwrite, verify=verify, allow_nonfinite=args.allow_nonfinite)
        print(f"wrote elastic HF checkpoint {args.out} ({args.dtype}; budgets: {', '.join(info.budgets) or 'none'})")
    else:
        from star_elastic_jax.checkpoint.orbax import load_params

        cfg, params = load_params(args.ckpt, verify=verify, allow_nonfinite=args.allow_nonfinite)
        params_to_hf(cfg, params, args.out, args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        print(f"wrote HF checkpoint {args.out} ({args.dtype})")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from star_elastic_jax.checkpoint.hf import from_hf, to_hf
    from star_elastic_jax.checkpoint.orbax import load_model, save_model

    verify = not args.no_verify
    if args.from_hf:
        if not args.out:
            raise StarElasticError("--out", None, "--from-hf needs --out DIR (the Orbax checkpoint to write)")
        if args.to_hf:
            raise StarElasticError("--to-hf", args.to_hf, "goes with --ckpt; with --from-hf give --out")
        _check_out(args, args.out, "--out", args.from_hf)
        model = from_hf(args.from_hf, progress=True, verify=verify, allow_nonfinite=args.allow_nonfinite)
        save_model(model, args.out, metadata={"source": os.path.abspath(args.from_hf)}, overwrite=args.overwrite)
        print(f"wrote Orbax checkpoint {args.out} ({model.cfg.param_count().total:,} parameters)")
    else:
        if not args.to_hf:
            raise StarElasticError("--to-hf", None, "--ckpt needs --to-hf DIR (the HF checkpoint to write)")
        if args.out:
            raise StarElasticError("--out", args.out, "goes with --from-hf; with --ckpt give --to-hf")
        _check_out(args, args.to_hf, "--to-hf", args.ckpt)
        model = load_model(args.ckpt, verify=verify, allow_nonfinite=args.allow_nonfinite)
        to_hf(model, args.to_hf, dtype=args.dtype, max_shard_size=args.max_shard_size, progress=True,
              overwrite=args.overwrite)
        print(f"wrote HF checkpoint {args.to_hf} ({args.dtype})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from star_elastic_jax.demo import run_demo

    if args.workdir is not None:
        from star_elastic_jax.outputs import check_output_dir

        if os.path.lexists(args.workdir) and not os.path.isdir(args.workdir):
            raise StarElasticError("--workdir", args.workdir, "exists and is not a directory")
        os.makedirs(args.workdir, exist_ok=True)
        check_output_dir(os.path.join(args.workdir, "tiny-hf"), overwrite=True, field="--workdir")  # before any work

    return run_demo(workdir=args.workdir or tempfile.mkdtemp(prefix="star-elastic-demo-"), seed=args.seed)


def _cmd_train(args: argparse.Namespace) -> int:
    from star_elastic_jax.distributed import initialize
    from star_elastic_jax.train.config import from_config_dict
    from star_elastic_jax.train.overrides import apply_overrides, load_config_file
    from star_elastic_jax.train.trainer import train

    from star_elastic_jax.train.trainer import check_workdir

    check_workdir(args.workdir, args.stop_after)  # --workdir / --stop-after errors before any setup
    initialize()  # multi-host: coordinator/process from STAR_ELASTIC_*, SLURM or TPU; no-op for one process
    config = apply_overrides(load_config_file(args.config), args.overrides or [])
    cfg = from_config_dict(config)
    if args.no_progress:
        import dataclasses

        cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, progress=False))
    res = train(cfg, args.workdir, until=args.stop_after, verify=not args.no_verify,
                allow_config_change=args.allow_config_change)
    if res.elastic_dir is None:
        print(f"stopped after {res.kd.step} elastic KD steps; run the same command again to resume "
              f"(checkpoints in {os.path.join(args.workdir, 'checkpoints')})")
    return 0


def _add_hf_write_args(parser: argparse.ArgumentParser, dtype_default: str | None, dtype_help: str) -> None:
    """``--dtype`` and ``--max-shard-size``, shared by every subcommand that writes safetensors."""
    parser.add_argument("--dtype", default=dtype_default, choices=["bfloat16", "float32", "float16"], help=dtype_help)
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")


def _add_read_args(parser: argparse.ArgumentParser, *, nonfinite: bool = True) -> None:
    """``--no-verify`` (and ``--allow-nonfinite``), shared by every subcommand that reads a checkpoint."""
    parser.add_argument("--no-verify", action="store_true",
                        help="skip checking the input checkpoint against its sha256 manifest (faster; a damaged file "
                             "is then not detected)")
    if nonfinite:
        parser.add_argument("--allow-nonfinite", action="store_true",
                            help="load parameters that hold NaN/inf, with a warning, instead of refusing them")


def _add_overwrite_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output directory, only if it holds a checkpoint star-elastic wrote "
                             "and nothing else (anything else is never deleted)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="star-elastic",
                                description="Elastic many-in-one Nemotron-H models in JAX/Flax. Errors print one line "
                                            "(exit 2); --debug shows the traceback.")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    cache_help = ("keep compiled XLA executables in DIR and reuse them in later runs (a second `train` or "
                  "`generate` of the same config then compiles in about a quarter of the time); default: "
                  f"${COMPILE_CACHE_ENV} if set, else off")
    p.add_argument("--compile-cache", metavar="DIR", default=None, help=cache_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the Python traceback of an error")
    common.add_argument("--compile-cache", metavar="DIR", default=argparse.SUPPRESS, help=cache_help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=lambda **kw: argparse.ArgumentParser(parents=[common], **kw))

    info = sub.add_parser("info", help="print the layer table and parameter counts of a config or checkpoint",
                          description="Print the layer table and exact total/active parameter counts; with "
                                      "--budgets/--choices (or an elastic --ckpt) also every sub-model's sizes and "
                                      "counts and the nested-vs-separate storage.")
    src = info.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="preset (tiny, small, nano-v3-30b) or path to an HF config.json / dir")
    src.add_argument("--ckpt", help="a star_elastic_jax Orbax checkpoint directory (an elastic one adds its budgets "
                                    "and measured on-disk storage)")
    info.add_argument("--budgets", metavar="LIST",
                      help="descending active-parameter fractions (and/or budget names of --ckpt), e.g. "
                           "1.0,0.78,0.577, each resolved to the best choice over the choice lists")
    info.add_argument("--choice-lists", metavar="JSON",
                      help='candidate sizes per axis for --budgets, e.g. \'{"hidden": [2688, 1920]}\' (default: the '
                           "checkpoint's lists, SPEC 3.2's for nano-v3-30b, else 100/75/50%% of each axis)")
    info.add_argument("--choices", metavar="JSON", action="append",
                      help='an explicit choice, e.g. \'{"hidden": 2688, "mamba_heads": 32, "experts": 128, '
                           '"expert_ffn": 1328}\' (repeatable)')
    _add_read_args(info, nonfinite=False)
    info.set_defaults(func=_cmd_info)

    conv = sub.add_parser("convert", help="convert between HF safetensors and Orbax checkpoints",
                          description="HF -> Orbax: --from-hf DIR --out DIR.  Orbax -> HF: --ckpt DIR --to-hf DIR.")
    direction = conv.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="DIR", help="HF NemotronH checkpoint directory to read")
    direction.add_argument("--ckpt", metavar="DIR", help="Orbax checkpoint directory to read")
    conv.add_argument("--out", metavar="DIR", help="Orbax checkpoint directory to write (with --from-hf)")
    conv.add_argument("--to-hf", metavar="DIR", help="HF checkpoint directory to write (with --ckpt)")
    _add_hf_write_args(conv, "bfloat16", "tensor dtype of the HF checkpoint (default bfloat16, like NVIDIA's)")
    _add_overwrite_arg(conv)
    _add_read_args(conv)
    conv.set_defaults(func=_cmd_convert)

    sl = sub.add_parser("slice", help="cut one budget out of an elastic checkpoint (pure array slicing)",
                        description="Zero-shot slicing: restore the elastic checkpoint's arrays (no model is built "
                                    "or compiled), keep the budget's prefixes, write an Orbax or HF checkpoint. The "
                                    "source is only read.")
    sl.add_argument("--ckpt", required=True, metavar="DIR", help="elastic Orbax checkpoint (save_elastic)")
    sl.add_argument("--budget", required=True, metavar="NAME|FRACTION",
                    help="a budget name stored in the checkpoint, or a fraction of active parameters in (0, 1]")
    sl.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    sl.add_argument("--hf", action="store_true", help="write HF NemotronH safetensors instead of Orbax "
                                                      "(homogeneous budgets only)")
    _add_hf_write_args(sl, None, "tensor dtype (default: bfloat16 with --hf, the stored dtypes for Orbax)")
    _add_overwrite_arg(sl)
    _add_read_args(sl)
    sl.set_defaults(func=_cmd_slice)

    ex = sub.add_parser("export-hf", help="write a checkpoint in HF format (--elastic: with budgets and recipe)",
                        description="Write the full model in HF NemotronH format. With --elastic (an elastic "
                                    "checkpoint), config.json gets an 'elastic' block: budgets with their sliced "
                                    "config fields and counts, and the per-tensor slicing recipe that "
                                    "star_elastic_jax/export/slice_hf.py (torch only) applies.")
    ex.add_argument("--ckpt", required=True, metavar="DIR", help="Orbax checkpoint directory to read")
    ex.add_argument("--out", required=True, metavar="DIR", help="HF checkpoint directory to write")
    ex.add_argument("--elastic", action="store_true", help="add the elastic block (needs an elastic checkpoint)")
    _add_hf_write_args(ex, "bfloat16", "tensor dtype (default bfloat16)")
    _add_overwrite_arg(ex)
    _add_read_args(ex)
    ex.set_defaults(func=_cmd_export_hf)

    tr = sub.add_parser("train", help="elastic KD training (CE pre-training and ranking of a parent if needed)",
                        description="Run a training config: [CE pre-training of a parent -> importance ranking ->] "
                                    "elastic KD stages -> one nested checkpoint in WORKDIR/elastic/. Resumes from "
                                    "WORKDIR/checkpoints/. Metrics: WORKDIR/metrics.jsonl and TensorBoard "
                                    "(WORKDIR/tensorboard/). Override any config field with --config.a.b=value "
                                    "(list entries by index: --config.stages.0.seq_len=256).")
    tr.add_argument("--config", required=True, metavar="FILE", help="ml_collections config file, e.g. configs/tiny.py")
    tr.add_argument("--workdir", required=True, metavar="DIR", help="run directory (checkpoints, metrics, outputs)")
    tr.add_argument("--stop-after", type=int, default=None, metavar="N",
                    help="stop elastic KD after N steps (a checkpoint is saved; rerun to resume)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.add_argument("--allow-config-change", action="store_true",
                    help="resume although the config differs from WORKDIR/train_config.json in a field that changes "
                         "the run (the old config is kept as train_config.N.json); logging, eval.every and "
                         "checkpoint frequency may always change")
    _add_read_args(tr, nonfinite=False)
    tr.set_defaults(func=_cmd_train, overrides=[])

    ge = sub.add_parser("generate", help="generate text from a checkpoint at any budget (hybrid-cache engine)",
                        description="Greedy or sampled generation from an elastic checkpoint (any stored budget or "
                                    "fraction, on the parent's weights), a plain Orbax checkpoint or an HF "
                                    "directory. The tokenizer is the checkpoint's tokenizer.json, else the built-in "
                                    "byte tokenizer. Reports prefill and decode tokens/s on stderr.")
    ge.add_argument("--ckpt", required=True, metavar="DIR", help="elastic / Orbax checkpoint or HF directory")
    ge.add_argument("--budget", default=None, metavar="NAME|FRACTION",
                    help="a stored budget name or a fraction of active parameters (default: the full model)")
    ge.add_argument("--prompt", default=None, metavar="TEXT", help="one prompt")
    ge.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                    help='prompts, one per line: a JSON string or {"prompt": "..."}; prints one JSON line each')
    ge.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    ge.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ge.add_argument("--top-k", type=int, default=None)
    ge.add_argument("--top-p", type=float, default=None)
    ge.add_argument("--min-p", type=float, default=None)
    ge.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same tokens)")
    ge.add_argument("--stream", action="store_true", help="print tokens as they come, in chunks")
    ge.add_argument("--stream-chunk", type=int, default=8, metavar="N", help="decode steps per streamed chunk")
    _add_read_args(ge, nonfinite=False)
    ge.set_defaults(func=_cmd_generate)

    demo = sub.add_parser("demo", help="build the tiny model, run it, export to HF and compare with transformers",
                          description="End-to-end check on CPU: tiny preset -> forward -> HF export -> "
                                      "transformers reload -> largest logit difference.")
    demo.add_argument("--workdir", help="where to write the exported checkpoint (default: a temp dir)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    return p


COMPILE_CACHE_ENV = "STAR_ELASTIC_COMPILE_CACHE"


def _use_compile_cache(directory: str | None) -> None:
    """Turn on JAX's persistent compilation cache in ``directory`` (created if missing; only
    compiles of 1 s or more are kept). A directory we did not create is used only if it is empty or
    already a JAX cache (its entries are files named by JAX), so a mistyped path never fills a user's
    directory with cache files."""
    if not directory:
        return
    directory = os.path.abspath(os.path.expanduser(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise StarElasticError("--compile-cache", directory, "a directory (this path is a file)")
    if os.path.isdir(directory):
        foreign = [f for f in os.listdir(directory) if not (f.startswith("jit_") or f.startswith("pjit_")
                                                            or f.endswith("-atime") or f.endswith("-cache"))]
        if foreign:
            raise StarElasticError("--compile-cache", directory, f"an empty directory or one JAX's cache wrote "
                                                                 f"(it holds {foreign[0]!r})")
    os.makedirs(directory, exist_ok=True)
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # only `train` takes free-form --config.a.b=value overrides
        if getattr(args, "func", None) is not _cmd_train:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    debug = bool(getattr(args, "debug", False))
    try:
        _use_compile_cache(getattr(args, "compile_cache", None) or os.environ.get(COMPILE_CACHE_ENV))
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except StarElasticError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user gave: permissions, a full disk, a missing file
        if debug:
            traceback.print_exc()
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 -- a bug: one line unless --debug
        if debug:
            raise
        print(f"error: unexpected {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
              "(this is a bug; rerun with --debug for the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
