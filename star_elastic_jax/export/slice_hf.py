"""Cut one budget out of an elastic HF NemotronH export, with torch + safetensors only (no JAX).

Input: a directory written by ``star-elastic export-hf --elastic`` (the permuted parent in NVIDIA's
on-disk layout, plus ``config.json["elastic"]`` holding the budgets and the slicing recipe; format
in ``star_elastic_jax/export/hf_recipe.py``). Output: a standard ``nemotron_h`` checkpoint of the
sub-model (sharded safetensors + index like the exporter's, config.json with the sliced fields),
readable by transformers, vLLM, NVIDIA's remote code and ``star_elastic_jax.from_hf``.

This file knows nothing about Nemotron-H: every cut comes from the recipe. Of star_elastic_jax it
imports only the standard-library modules ``errors``, ``manifest`` and ``outputs`` (the output-path
rules, the sha256 manifest and the atomic write shared with the JAX side), so it runs where JAX is
not installed (a checkout, or ``pip install --no-deps star-elastic-jax`` beside torch)::

    python path/to/slice_hf.py --in ELASTIC_HF_DIR --budget NAME --out DIR
    python -m star_elastic_jax.export.slice_hf --in ELASTIC_HF_DIR --budget NAME --out DIR
    python path/to/slice_hf.py --in ELASTIC_HF_DIR --list
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import traceback
from typing import Any, Iterator

if __package__ in (None, ""):  # run as a file: import the stdlib-only modules of the package beside it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from star_elastic_jax.errors import StarElasticError  # noqa: E402
from star_elastic_jax.manifest import HF_CONFIG_KEY, MANIFEST_NAME, has_manifest, verify_manifest  # noqa: E402
from star_elastic_jax.outputs import check_output_dir, parse_size, replace_dir, seal, staging_dir  # noqa: E402

RECIPE_VERSION = 2
RECIPE_VERSIONS = (1, 2)  # 1: no expert groups (a plain expert prefix), still read
ELASTIC_VERSION = 1
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Files of the source directory that are not copied: weights, the index, config.json (rewritten),
# router, and our manifest (the slice gets its own).
_NOT_COPIED = (".safetensors", INDEX_NAME, CONFIG_NAME, MANIFEST_NAME)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class SliceError(ValueError):
    """The input is not an elastic export, the budget is unknown or not HF-exportable, or a tensor
    does not match the recipe. The message names the offending field."""


# ----------------------------------------------------------------------------------------------- reading
def read_config(in_dir: str) -> dict[str, Any]:
    path = os.path.join(in_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise SliceError(f"--in: {in_dir} has no {CONFIG_NAME}")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise SliceError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise SliceError(f"{path} must hold a JSON object")
    return cfg


def elastic_block(cfg: dict[str, Any], where: str = CONFIG_NAME) -> dict[str, Any]:
    block = cfg.get("elastic")
    if not isinstance(block, dict):
        raise SliceError(f"{where} has no 'elastic' block: not an elastic export (write one with "
                         "`star-elastic export-hf --ckpt DIR --elastic --out DIR`)")
    if block.get("sliced"):
        raise SliceError(f"{where} is already a slice (budget {block.get('budget')!r}) of an elastic export; "
                         "slice the elastic export itself")
    if block.get("format_version") != ELASTIC_VERSION:
        raise SliceError(f"elastic.format_version={block.get('format_version')!r}: this slicer reads "
                         f"format {ELASTIC_VERSION}")
    recipe = block.get("recipe")
    if not isinstance(recipe, dict) or recipe.get("format_version") not in RECIPE_VERSIONS:
        raise SliceError(f"elastic.recipe.format_version={(recipe or {}).get('format_version')!r}: "
                         f"this slicer reads recipe formats {list(RECIPE_VERSIONS)}")
    if not isinstance(block.get("budgets"), dict) or not isinstance(recipe.get("tensors"), list):
        raise SliceError("elastic block needs 'budgets' (object) and 'recipe.tensors' (list)")
    return block


class Reader:
    """Lazy tensors of a safetensors checkpoint directory (one file or an index of shards)."""

    def __init__(self, path: str):
        index = os.path.join(path, INDEX_NAME)
        single = os.path.join(path, SINGLE_NAME)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise SliceError(f"{index} needs a 'weight_map' object")
            self.key_to_file = {k: os.path.join(path, v) for k, v in weight_map.items()}
        elif os.path.isfile(single):
            self.key_to_file = {k: single for k in _open(single).keys()}
        else:
            raise SliceError(f"--in: {path} holds neither {SINGLE_NAME} nor {INDEX_NAME}")
        for file in sorted(set(self.key_to_file.values())):
            if not os.path.isfile(file):
                raise SliceError(f"shard {os.path.basename(file)} listed in {INDEX_NAME} is missing")
        self._handles: dict[str, Any] = {}

    def get(self, key: str) -> torch.Tensor:
        if key not in self.key_to_file:
            raise SliceError(f"tensor {key!r} required by the recipe is missing from the checkpoint")
        file = self.key_to_file[key]
        if file not in self._handles:
            self._handles[file] = _open(file)
        try:
            return self._handles[file].get_tensor(key)
        except Exception as e:  # noqa: BLE001 -- safetensors raises its own errors for damaged files
            raise SliceError(f"tensor {key!r} of {os.path.basename(file)} could not be read ({e})") from None


def _open(file: str):
    try:
        return safe_open(file, framework="pt")
    except Exception as e:  # noqa: BLE001 -- truncated or garbage safetensors files
        raise SliceError(f"{file} is not a readable safetensors file ({e})") from None


def check_tensor(key: str, t: torch.Tensor, allow_nonfinite: bool) -> None:
    """Weights must be floating point and finite (``allow_nonfinite``: a warning instead)."""
    if t.dtype not in _FLOAT_DTYPES:
        raise SliceError(f"tensor {key!r} has dtype {t.dtype}; weights must be floating point")
    bad = int(t.numel() - torch.isfinite(t).sum())
    if bad:
        msg = f"tensor {key!r} has {bad} NaN or infinite values"
        if not allow_nonfinite:
            raise SliceError(f"{msg}; pass --allow-nonfinite to slice it anyway")
        print(f"warning: {msg} (kept: --allow-nonfinite)", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- slicing
def _size(sizes: dict[str, Any], axis: str, layer: int | None, what: str) -> int:
    if axis not in sizes:
        raise SliceError(f"budget sizes have no entry for axis {axis!r} (needed by {what})")
    v = sizes[axis]
    if isinstance(v, list):
        if layer is None or not 0 <= layer < len(v) or v[layer] is None:
            raise SliceError(f"budget sizes[{axis!r}] has no size for block {layer} (needed by {what})")
        v = v[layer]
    if isinstance(v, bool) or not isinstance(v, int):
        raise SliceError(f"budget sizes[{axis!r}]={v!r} must be an integer (needed by {what})")
    return v


def slice_dim(t: torch.Tensor, dim: int, segments: list[dict[str, Any]], sizes: dict[str, Any],
              what: str) -> torch.Tensor:
    """Cut dim ``dim`` of ``t``: split into the recipe's segments, keep each axis segment's grouped
    prefix (the first ``size / groups`` units of every group), concatenate."""
    lengths = [int(s["length"]) for s in segments]
    if sum(lengths) != t.shape[dim]:
        raise SliceError(f"{what}: the recipe's segments of dim {dim} add up to {sum(lengths)} ({lengths}), but the "
                         f"tensor has {t.shape[dim]}; the elastic block of config.json does not match the weights")
    if all(s["axis"] is None for s in segments):
        return t
    parts = torch.split(t, lengths, dim=dim)
    out = []
    for seg, part in zip(segments, parts):
        if seg["axis"] is None:
            out.append(part)
            continue
        length, unit, groups = int(seg["length"]), int(seg["unit"]), int(seg["groups"])
        n_units = length // unit
        keep = _size(sizes, seg["axis"], seg["layer"], what)
        if not 0 < keep <= n_units or keep % groups:
            raise SliceError(f"{what}: size {keep} of axis {seg['axis']!r} must be in [1, {n_units}] and a "
                             f"multiple of its {groups} groups")
        if keep == n_units:
            out.append(part)
            continue
        shape = tuple(part.shape)
        grouped = part.reshape(shape[:dim] + (groups, length // groups) + shape[dim + 1:])
        kept = grouped.narrow(dim + 1, 0, keep // groups * unit)
        out.append(kept.reshape(shape[:dim] + (keep * unit,) + shape[dim + 1:]))
    return out[0] if len(out) == 1 else torch.cat(out, dim=dim)


def kept_experts(experts: dict[str, Any], sizes: dict[str, Any], key: str, layer: int | None) -> dict[int, int]:
    """Old -> new index of the experts a per-expert recipe entry keeps.

    The ``count`` experts form ``groups`` equal contiguous groups (the routing groups); a size ``c``
    keeps the first ``c / groups`` of every group, renumbered ``0 .. c-1`` in order (group-major,
    like every grouped axis). ``groups`` absent: one group, a plain prefix.
    """
    count, groups = int(experts["count"]), int(experts.get("groups", 1))
    n = count if experts.get("axis") is None else _size(sizes, experts["axis"], experts.get("layer"), key)
    what = f"{key} (block {layer})"
    if groups < 1 or count % groups:
        raise SliceError(f"{what}: the recipe's {count} experts do not split into {groups} equal groups")
    if not 0 < n <= count or n % groups:
        raise SliceError(f"{what}: keeps {n} of {count} experts; must be in [1, {count}] and a multiple of "
                         f"the {groups} routing groups")
    per, keep = count // groups, n // groups
    old = [g * per + j for g in range(groups) for j in range(keep)]
    return {e: new for new, e in enumerate(old)}


def sliced_tensors(in_dir: str, budget: str, *, allow_nonfinite: bool = False
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` of the sliced checkpoint in on-disk order, one tensor at a time."""
    cfg = read_config(in_dir)
    block = elastic_block(cfg)
    entry = get_budget(block, budget)
    sizes, keep_layers = entry["sizes"], entry["keep_layers"]
    renumber = {old: new for new, old in enumerate(keep_layers)}
    reader = Reader(in_dir)
    used: set[str] = set()
    for spec in block["recipe"]["tensors"]:
        layer = spec.get("layer")
        experts = spec.get("experts")
        if experts is None:
            indices: list[int | None] = [None]
            new_expert: dict[int | None, int | None] = {None: None}
        else:
            indices = list(range(int(experts["count"])))
            new_expert = kept_experts(experts, sizes, spec["key"], layer)
        for e in indices:
            src_key = spec["key"].format(layer=layer, expert=e)
            if layer is not None and layer not in renumber:
                used.add(src_key)
                continue  # block dropped by the depth axis
            if e not in new_expert:
                used.add(src_key)
                continue  # expert beyond the kept prefix of its group
            t = reader.get(src_key)
            used.add(src_key)
            if list(t.shape) != list(spec["shape"]):
                raise SliceError(f"{src_key}: shape {list(t.shape)} differs from the recipe's {spec['shape']}")
            check_tensor(src_key, t, allow_nonfinite)
            for d, segments in enumerate(spec["dims"]):
                t = slice_dim(t, d, segments, sizes, src_key)
            new_layer = None if layer is None else renumber[layer]
            yield spec["key"].format(layer=new_layer, expert=new_expert[e]), t.contiguous()
    extra = sorted(set(reader.key_to_file) - used)
    if extra:
        raise SliceError(f"{len(extra)} tensor(s) of the checkpoint are not in the recipe, e.g. {extra[0]!r}")


def get_budget(block: dict[str, Any], budget: str) -> dict[str, Any]:
    budgets = block["budgets"]
    if budget not in budgets:
        raise SliceError(f"--budget={budget!r} is not a budget of this export; available: "
                         f"{', '.join(sorted(budgets)) or 'none'}")
    entry = budgets[budget]
    if not entry.get("hf_exportable", False):
        raise SliceError(f"--budget={budget!r} has heterogeneous per-layer sizes (hf_exportable: false); "
                         "nemotron_h's config.json holds one size per field. Slice it to Orbax with "
                         "`star-elastic slice` instead")
    for field in ("sizes", "keep_layers", "config"):
        if field not in entry:
            raise SliceError(f"elastic.budgets[{budget!r}] lacks {field!r}")
    return entry


def sliced_config(cfg: dict[str, Any], budget: str) -> dict[str, Any]:
    """config.json of the slice: the parent's, with the budget's sliced fields and a slice marker."""
    block = elastic_block(cfg)
    entry = get_budget(block, budget)
    out = {k: v for k, v in cfg.items() if k not in ("elastic", "layers_block_type")}
    out.update(entry["config"])
    out["num_hidden_layers"] = len(out["hybrid_override_pattern"])
    out["elastic"] = {"format_version": ELASTIC_VERSION, "sliced": True, "budget": budget,
                      "choice": entry.get("choice")}
    out[HF_CONFIG_KEY] = MANIFEST_NAME
    return out


# ----------------------------------------------------------------------------------------------- writing
def slice_hf(in_dir: str | os.PathLike, budget: str, out_dir: str | os.PathLike, *,
             max_shard_size: int | str = "5GB", overwrite: bool = False, verify: bool = True,
             allow_nonfinite: bool = False) -> str:
    """Write budget ``budget`` of the elastic export ``in_dir`` to ``out_dir`` (atomically: through a
    temporary sibling renamed into place). ``in_dir`` is only read, and first verified against its
    manifest (``verify=False`` skips that). ``out_dir`` must not overlap ``in_dir``; an existing one is
    replaced only with ``overwrite`` and only if it is a checkpoint of ours. Returns ``out_dir``."""
    in_dir = os.path.abspath(os.fspath(in_dir))
    out_dir = check_output_dir(out_dir, inputs=[in_dir], overwrite=overwrite, field="--out")
    limit = parse_size(max_shard_size, "--max-shard-size")
    new_cfg = sliced_config(read_config(in_dir), budget)  # validates before anything is written
    if verify:
        if not has_manifest(in_dir):
            raise SliceError(f"--in: {in_dir} has no star_elastic_manifest.json, which every elastic export "
                             "carries; it is incomplete or was altered (pass --no-verify to slice it anyway)")
        verify_manifest(in_dir)
    tmp = staging_dir(out_dir, ".tmp-slice-")
    try:
        files: list[str] = []
        weight_map: dict[str, int] = {}
        current: dict[str, torch.Tensor] = {}
        size = total = 0

        def flush():
            nonlocal current, size
            save_file(current, os.path.join(tmp, f"shard-{len(files):05d}.safetensors"), metadata={"format": "pt"})
            files.append(f"shard-{len(files):05d}.safetensors")
            current, size = {}, 0

        for key, t in sliced_tensors(in_dir, budget, allow_nonfinite=allow_nonfinite):
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > limit:
                flush()
            current[key] = t
            weight_map[key] = len(files)
            size += nbytes
            total += nbytes
        if current:
            flush()
        if len(files) == 1:
            os.replace(os.path.join(tmp, files[0]), os.path.join(tmp, SINGLE_NAME))
        else:
            names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
            for old, new in zip(files, names):
                os.replace(os.path.join(tmp, old), os.path.join(tmp, new))
            index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in weight_map.items()}}
            with open(os.path.join(tmp, INDEX_NAME), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(new_cfg, f, indent=2)
        for name in sorted(os.listdir(in_dir)):  # tokenizer, generation config...
            src = os.path.join(in_dir, name)
            if os.path.isfile(src) and not os.path.islink(src) and not name.endswith(_NOT_COPIED) \
                    and not name.startswith("."):
                shutil.copy2(src, os.path.join(tmp, name))
        seal(tmp, "hf")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slice_hf", description=(
        "Cut one budget out of an elastic HF NemotronH export (star-elastic export-hf --elastic) into a "
        "standard nemotron_h checkpoint. Needs only torch and safetensors."))
    p.add_argument("--in", dest="in_dir", required=True, metavar="DIR", help="the elastic HF export to read")
    p.add_argument("--budget", metavar="NAME", help="budget name from config.json's elastic block")
    p.add_argument("--out", metavar="DIR", help="directory to write the sliced checkpoint to")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--list", action="store_true", help="list the budgets of --in and exit")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out, only if it is a checkpoint star_elastic_jax wrote")
    p.add_argument("--no-verify", action="store_true", help="skip checking --in against its sha256 manifest")
    p.add_argument("--allow-nonfinite", action="store_true", help="slice weights holding NaN/inf (with a warning)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (SliceError, StarElasticError, OSError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.list:
        block = elastic_block(read_config(args.in_dir))
        for name, entry in block["budgets"].items():
            flag = "" if entry.get("hf_exportable") else "  (heterogeneous: not HF-exportable)"
            print(f"{name}: {entry.get('choice')}  total {entry.get('total_params'):,}  "
                  f"active {entry.get('active_params'):,}{flag}")
        return 0
    if not args.budget or not args.out:
        raise SliceError("--budget NAME and --out DIR are required (or --list)")
    out = slice_hf(args.in_dir, args.budget, args.out, max_shard_size=args.max_shard_size,
                   overwrite=args.overwrite, verify=not args.no_verify, allow_nonfinite=args.allow_nonfinite)
    print(f"wrote {out} (budget {args.budget})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
