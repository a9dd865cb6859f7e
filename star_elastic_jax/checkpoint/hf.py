"""Read and write HF NemotronH checkpoints (config.json + safetensors), streaming tensor by tensor.

Loading reads only safetensors (never pickle), accepts one file or an index of shards, and both
the on-disk ``backbone.*`` layout (one tensor per expert) and transformers' in-memory ``model.*``
layout (fused 3-D experts). Every tensor is checked for presence and shape against the config
before it is placed; errors name the key. Tensors must be floating point and finite
(``allow_nonfinite`` warns instead). A directory that carries our manifest (every export of ours)
is verified against it first. Writing produces NVIDIA's on-disk layout plus that manifest, and
never replaces a directory that is not ours (:mod:`star_elastic_jax.outputs`).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from star_elastic_jax.checkpoint.hf_keys import Entry, entries, to_inmemory_key
from star_elastic_jax.checkpoint.tensor_checks import check_tensor
from star_elastic_jax.config import ModelConfig
from star_elastic_jax.errors import CheckpointError
from star_elastic_jax.manifest import HF_CONFIG_KEY, MANIFEST_NAME, has_manifest, verify_manifest
from star_elastic_jax.outputs import check_output_dir, parse_size, replace_dir, seal, staging_dir

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_IGNORED_PREFIXES = ("mtp.", "model.mtp.", "backbone.mtp.")
MANIFEST_KIND = "hf"


class SafetensorsReader:
    """Lazy, validated access to the tensors of one HF checkpoint directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index = os.path.join(self.path, INDEX_NAME)
        single = os.path.join(self.path, SINGLE_NAME)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(INDEX_NAME, index, f"must be JSON with a 'weight_map' object ({e!r})") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{INDEX_NAME}:weight_map", type(weight_map).__name__, "must be an object")
            self.key_to_file = {k: os.path.join(self.path, v) for k, v in weight_map.items()}
        elif os.path.isfile(single):
            with _open_safetensors(single) as f:
                self.key_to_file = {k: single for k in f.keys()}
        else:
            pickles = [n for n in os.listdir(self.path) if n.endswith((".bin", ".pt", ".pth"))] \
                if os.path.isdir(self.path) else []
            hint = f" (found {pickles}: pickle checkpoints are never loaded; re-save with safetensors)" if pickles else ""
            raise CheckpointError("safetensors", self.path, f"directory must hold {SINGLE_NAME} or {INDEX_NAME}{hint}")
        for file in sorted(set(self.key_to_file.values())):
            if not os.path.isfile(file):
                raise CheckpointError("weight_map", os.path.basename(file), "shard listed in the index is missing")
        self._handles: dict[str, Any] = {}

    def keys(self) -> set[str]:
        return set(self.key_to_file)

    def get(self, key: str) -> np.ndarray:
        if key not in self.key_to_file:
            raise CheckpointError(key, "missing", f"tensor required by the config is not in {self.path}")
        file = self.key_to_file[key]
        if file not in self._handles:
            self._handles[file] = _open_safetensors(file)
        try:
            return self._handles[file].get_tensor(key)
        except Exception as e:  # safetensors raises its own errors for truncated/corrupt files
            raise CheckpointError(key, os.path.basename(file), f"tensor could not be read ({e})") from None

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_safetensors(file: str):
    """``safe_open`` (numpy, never pickle) with a CheckpointError naming the file on corruption."""
    try:
        handle = safe_open(file, framework="numpy")
        return handle.__enter__()
    except Exception as e:  # SafetensorError / OSError for truncated or garbage files
        raise CheckpointError(os.path.basename(file), file, f"not a readable safetensors file ({e})") from None


def _leaf_shapes(entry: Entry, flat: dict) -> list[tuple[int, ...]]:
    return [tuple(flat[p].shape) for p in entry.paths]


def _expected_hf_shape(entry: Entry, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    km = entry.km
    shape = list(shapes[0])
    if len(shapes) > 1:
        shape[km.axis] = sum(s[km.axis] for s in shapes)
    if entry.expert is not None:
        shape = shape[1:]
    for d in km.hf_extra_dims:
        shape.insert(d, 1)
    return tuple(shape)


def verify_hf_dir(path: str | os.PathLike, *, required: bool = False) -> bool:
    """Check an HF directory against our manifest. Every export of ours has one and says so in
    config.json (``star_elastic_manifest``), so removing it is an error; an HF checkpoint from
    elsewhere has neither and is not verified. ``required``: a missing manifest is always an error.
    Returns whether a manifest was verified."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError("checkpoint", path, "is not a directory (give an HF checkpoint directory)")
    if not required and not has_manifest(path) and not _claims_manifest(path):
        return False
    verify_manifest(path)
    return True


def _claims_manifest(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return isinstance(data := json.load(f), dict) and data.get(HF_CONFIG_KEY) == MANIFEST_NAME
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False  # a missing/unreadable config.json is reported by ModelConfig.from_hf


def from_hf(path: str | os.PathLike, dtype: Any = jnp.float32, *, progress: bool = False, verify: bool = True,
            allow_nonfinite: bool = False, **runtime: Any):
    """Load an HF NemotronH checkpoint directory into a :class:`~star_elastic_jax.NemotronH`.

    ``dtype`` is the parameter dtype (fp32 master weights by default; ``None`` keeps each tensor's
    stored dtype). ``e_score_correction_bias`` always loads as fp32. ``runtime`` overrides runtime
    config fields (``compute_dtype``, ``moe_impl``...). Peak host memory is about one copy of the
    weights plus one tensor. ``verify``: check our manifest first when the directory has one.
    Non-float tensors are an error; non-finite ones too unless ``allow_nonfinite``.
    """
    if verify:
        verify_hf_dir(path)
    cfg = ModelConfig.from_hf(path, **runtime)
    with SafetensorsReader(path) as reader:
        return _load(cfg, reader, dtype, progress, allow_nonfinite)


def _load(cfg: ModelConfig, reader: SafetensorsReader, dtype: Any, progress: bool, allow_nonfinite: bool = False):
    from star_elastic_jax.model.model import abstract_model

    fused = any(k.startswith("model.") for k in reader.keys())
    pdt = jnp.float32 if dtype is None else jnp.dtype(dtype)
    abstract = abstract_model(cfg, param_dtype=pdt)
    graphdef, state = nnx.split(abstract)
    flat = {path_: var for path_, var in nnx.to_flat_state(state)}
    flat_shapes = {p: v.get_value() for p, v in flat.items()}
    loaded: dict[tuple, jax.Array] = {}
    used: set[str] = set()
    pending: dict[tuple, np.ndarray] = {}
    all_entries = list(entries(cfg, fused_experts=fused))
    for entry in _progress(all_entries, progress, "load HF"):
        key = to_inmemory_key(entry.hf_key) if fused else entry.hf_key
        tensor = reader.get(key)
        used.add(key)
        shapes = _leaf_shapes(entry, flat_shapes)
        want = _expected_hf_shape(entry, shapes)
        if tuple(tensor.shape) != want:
            raise CheckpointError(key, tuple(tensor.shape), f"expected shape {want} from config.json")
        check_tensor(key, tensor, allow_nonfinite=allow_nonfinite, where=reader.path)
        for d in sorted(entry.km.hf_extra_dims, reverse=True):
            tensor = np.squeeze(tensor, axis=d)
        if len(entry.paths) > 1:
            cuts = np.cumsum([s[entry.km.axis] for s in shapes])[:-1]
            parts = np.split(tensor, cuts, axis=entry.km.axis)
        else:
            parts = [tensor]
        for p, part in zip(entry.paths, parts):
            target = jnp.float32 if entry.km.fp32 else (part.dtype if dtype is None else pdt)
            if entry.expert is None:
                loaded[p] = jnp.asarray(part, dtype=target)
                continue
            buf = pending.setdefault(p, np.empty(flat_shapes[p].shape, dtype=part.dtype))
            buf[entry.expert] = part
            if entry.expert == flat_shapes[p].shape[0] - 1:
                loaded[p] = jnp.asarray(pending.pop(p), dtype=target)
    extra = sorted(k for k in reader.keys() - used if not k.startswith(_IGNORED_PREFIXES))
    if extra:
        raise CheckpointError("unexpected tensors", extra[:5] + (["..."] if len(extra) > 5 else []),
                              f"{len(extra)} tensor(s) are not part of the NemotronH layout of config.json "
                              f"(pattern {cfg.hybrid_override_pattern})")
    for p, var in flat.items():
        var.set_value(loaded[p])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def hf_tensors(model, dtype: str | None = None) -> Iterable[tuple[str, np.ndarray]]:
    """Yield ``(hf_key, numpy tensor)`` in on-disk order, one tensor at a time."""
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
    return hf_tensors_from_params(model.cfg, _LazyValues(flat), dtype)


class _LazyValues(dict):
    """``{path: Variable}`` read as ``{path: array}`` (values fetched when indexed)."""

    def __getitem__(self, key):
        return super().__getitem__(key).get_value()


def hf_tensors_from_params(cfg: ModelConfig, params, dtype: str | None = None) -> Iterable[tuple[str, np.ndarray]]:
    """Yield ``(hf_key, numpy tensor)`` in on-disk order from a flat ``{nnx path: array}`` dict of a
    model of ``cfg`` (jax or numpy arrays), one tensor at a time. ``dtype=None`` keeps every
    parameter's own dtype (lossless); a name converts to it. fp32 buffers always stay fp32."""
    if dtype is not None and dtype not in _NP_DTYPES:
        raise CheckpointError("dtype", dtype, f"one of {sorted(_NP_DTYPES)} or None (keep each parameter's dtype)")
    if cfg.per_layer is not None:
        cfg.to_hf()  # raises the ConfigError that explains why heterogeneous slices have no HF form
    return _hf_tensors(cfg, params, None if dtype is None else _NP_DTYPES[dtype])


def stored_dtype_name(params) -> str:
    """config.json's ``torch_dtype`` for parameters written in their own dtypes: the widest float
    dtype among them (``float32`` when any is fp32)."""
    names = {str(np.dtype(params[k].dtype)) for k in params}
    for name in ("float64", "float32", "bfloat16", "float16"):
        if name in names:
            return "float32" if name == "float64" else name
    return "float32"


def _hf_tensors(cfg: ModelConfig, params, np_dtype) -> Iterable[tuple[str, np.ndarray]]:
    cache: dict[tuple, np.ndarray] = {}
    for entry in entries(cfg):
        if any(p not in cache for p in entry.paths):
            cache = {p: np.asarray(jax.device_get(params[p])) for p in entry.paths}
        arrays = [cache[p] for p in entry.paths]
        t = np.concatenate(arrays, axis=entry.km.axis) if len(arrays) > 1 else arrays[0]
        if entry.expert is not None:
            t = t[entry.expert]
        for d in entry.km.hf_extra_dims:
            t = np.expand_dims(t, d)
        target = np.float32 if entry.km.fp32 else (t.dtype if np_dtype is None else np_dtype)
        yield entry.hf_key, np.ascontiguousarray(t.astype(target, copy=False))


def to_hf(model, out_dir: str | os.PathLike, dtype: str | None = None, *, max_shard_size: int | str = "5GB",
          progress: bool = False, extra_config: dict | None = None, overwrite: bool = False) -> str:
    """Write ``model`` as an HF NemotronH checkpoint (config.json + safetensors shards + index +
    our sha256 manifest). Lossless by default, like ``save_pretrained``: every parameter keeps its
    dtype; ``dtype="bfloat16"`` (or float16 / float32) converts.

    The directory is written through a temporary sibling and renamed into place, so a crash never
    leaves a half-written checkpoint under ``out_dir``. An existing non-empty ``out_dir`` is an
    :class:`OutputError` unless ``overwrite`` is set and it holds only a checkpoint of ours.
    Returns ``out_dir``.
    """
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
    return params_to_hf(model.cfg, _LazyValues(flat), out_dir, dtype, max_shard_size=max_shard_size,
                        progress=progress, extra_config=extra_config, overwrite=overwrite)


def params_to_hf(cfg: ModelConfig, params, out_dir: str | os.PathLike, dtype: str | None = None, *,
                 max_shard_size: int | str = "5GB", progress: bool = False, extra_config: dict | None = None,
                 extra_files: dict[str, dict[str, np.ndarray]] | None = None, overwrite: bool = False) -> str:
    """:func:`to_hf` for a flat ``{nnx path: array}`` dict of a model of ``cfg`` (no model needed).

    ``extra_config`` entries are merged into config.json; ``extra_files`` (file name -> tensors) are
    written as extra safetensors files beside the shards, outside the weight index (e.g. the
    elastic router). Heterogeneous (``per_layer``) configs raise :class:`ConfigError` before
    anything is written.
    """
    limit = parse_size(max_shard_size)
    out_dir = check_output_dir(out_dir, overwrite=overwrite, field="out_dir")
    tensors = hf_tensors_from_params(cfg, params, dtype)  # validates dtype and heterogeneous configs
    cfg_json = cfg.to_hf(torch_dtype=dtype or stored_dtype_name(params))
    for name in extra_files or {}:
        if not name.endswith(".safetensors") or os.path.basename(name) != name or name == SINGLE_NAME \
                or name.startswith("model-"):
            raise CheckpointError("extra_files", name, "a plain '*.safetensors' file name not used by the shards")
    tmp = staging_dir(out_dir, ".tmp-hf-")
    try:
        files: list[str] = []
        weight_map: dict[str, int] = {}
        current: dict[str, np.ndarray] = {}
        size = total = 0

        def flush():
            nonlocal current, size
            name = f"shard-{len(files):05d}.safetensors"
            save_file(current, os.path.join(tmp, name), metadata={"format": "pt"})
            files.append(name)
            current, size = {}, 0

        n = sum(1 for _ in entries(cfg))
        for key, t in _progress(tensors, progress, "write HF", total=n):
            if current and size + t.nbytes > limit:
                flush()
            current[key] = t
            weight_map[key] = len(files)
            size += t.nbytes
            total += t.nbytes
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
        for name, extra in (extra_files or {}).items():
            save_file({k: np.ascontiguousarray(v) for k, v in extra.items()}, os.path.join(tmp, name),
                      metadata={"format": "pt"})
        if extra_config:
            cfg_json.update(extra_config)
        cfg_json[HF_CONFIG_KEY] = MANIFEST_NAME
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg_json, f, indent=2)
        seal(tmp, MANIFEST_KIND)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _progress(it: Iterable, enabled: bool, desc: str, total: int | None = None) -> Iterable:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total if total is not None else (len(it) if hasattr(it, "__len__") else None),
                unit="tensor")


ProgressFn = Callable[[Iterable], Iterable]
