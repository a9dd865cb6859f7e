"""Orbax checkpoints of a whole model: parameters + buffers, plus our ModelConfig and free-form
metadata as JSON beside them.

Writes go to a temporary sibling directory that is renamed into place only once complete, so a
process killed mid-save never leaves a readable-but-partial checkpoint; the last file written is the
sha256 manifest (:mod:`star_elastic_jax.manifest`). An existing output is replaced only with
``overwrite=True`` and only when it is one of ours (:func:`star_elastic_jax.outputs.check_output_dir`).

Reads verify the manifest before any array is used (``verify=False`` skips it), restore against an
explicit abstract target built from the stored config (shapes checked), and refuse non-float or
non-finite parameters (``allow_nonfinite=True`` turns the latter into a warning).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from star_elastic_jax.checkpoint.atomic import barrier, publish_dir, shared_staging_dir
from star_elastic_jax.checkpoint.tensor_checks import check_finite, check_float_dtype
from star_elastic_jax.config import ModelConfig
from star_elastic_jax.errors import CheckpointError
from star_elastic_jax.manifest import MANIFEST_NAME, verify_manifest
from star_elastic_jax.outputs import check_output_dir, seal

CONFIG_NAME = "model_config.json"
METADATA_NAME = "metadata.json"
TOKENIZER_NAME = "tokenizer.json"   # an HF tokenizer saved with the checkpoint (metadata "tokenizer")
STATE_DIR = "state"
FORMAT = "star_elastic_jax.model/1"
MANIFEST_KIND = "orbax-model"
_RESERVED_NAMES = {STATE_DIR, CONFIG_NAME, METADATA_NAME}
Path = tuple  # an nnx state path, e.g. ("layers", 3, "mixer", "in_proj_x")


def flat_params(model) -> dict[Path, Any]:
    """``{nnx path: array}`` of every variable of ``model`` (parameters and buffers)."""
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def save_model(model, directory: str | os.PathLike, *, metadata: dict[str, Any] | None = None,
               extra_state: dict[str, Any] | None = None, overwrite: bool = False, tokenizer: str | None = None
               ) -> str:
    """Save ``model`` (an ``NemotronH``) to ``directory`` atomically. Returns the directory.

    ``extra_state`` (name -> pytree of arrays, e.g. ``{"router": ...}``) is saved beside the model
    state in ``directory/<name>``, inside the same atomic write; read it with :func:`load_extra_state`.
    An existing non-empty ``directory`` is an :class:`OutputError` unless ``overwrite`` is set and it
    holds only a checkpoint star_elastic_jax wrote. ``tokenizer``: ``"byte"`` or the path of a
    ``tokenizer.json`` (copied in, listed in the manifest); recorded as metadata ``"tokenizer"`` and
    read back by :func:`load_checkpoint_tokenizer`.
    """
    return _save(model.cfg, flat_params(model), directory, metadata, extra_state, overwrite, tokenizer)


def save_params(cfg: ModelConfig, params: Mapping[Path, Any], directory: str | os.PathLike, *,
                metadata: dict[str, Any] | None = None, extra_state: dict[str, Any] | None = None,
                overwrite: bool = False, tokenizer: str | None = None) -> str:
    """Save a flat ``{nnx path: array}`` dict (jax or numpy arrays) as a model checkpoint of ``cfg``.

    The leaves must be exactly those of ``NemotronH(cfg)`` with its shapes and float dtypes (checked
    before anything is written; dtypes are kept as given). Same atomic layout and ``overwrite`` rule
    as :func:`save_model`, so :func:`load_model` / :func:`load_params` read it.
    """
    check_params(cfg, params)
    return _save(cfg, params, directory, metadata, extra_state, overwrite, tokenizer)


def _check_tokenizer(tokenizer: str | None) -> str | None:
    if tokenizer is None or tokenizer == "byte":
        return tokenizer
    path = os.fspath(tokenizer)
    if not os.path.isfile(path):
        raise CheckpointError("tokenizer", path, "'byte' or the path of an existing tokenizer.json")
    return os.path.abspath(path)


def load_checkpoint_tokenizer(directory: str | os.PathLike, *, verify: bool = True):
    """The tokenizer saved with a checkpoint: its ``tokenizer.json`` (an Orbax checkpoint with
    metadata ``"tokenizer"``, or an HF directory holding one), else the built-in byte tokenizer."""
    from star_elastic_jax.data.tokenizers import ByteTokenizer, HFTokenizer

    directory = os.fspath(directory)
    name = None
    if os.path.isfile(os.path.join(directory, METADATA_NAME)):
        name = read_metadata(directory, verify=verify).get("tokenizer")
    elif os.path.isfile(os.path.join(directory, TOKENIZER_NAME)):
        name = TOKENIZER_NAME
    if name in (None, "byte"):
        return ByteTokenizer()
    if name != TOKENIZER_NAME or not os.path.isfile(os.path.join(directory, name)):
        raise CheckpointError("metadata.json:tokenizer", name, f"'byte' or {TOKENIZER_NAME!r} present in {directory}")
    return HFTokenizer(os.path.join(directory, name))


def _save(cfg: ModelConfig, params: Mapping[Path, Any], directory, metadata, extra_state, overwrite,
          tokenizer: str | None = None) -> str:
    extra_state = dict(extra_state or {})
    tokenizer = _check_tokenizer(tokenizer)
    if tokenizer is not None:
        metadata = {**(metadata or {}), "tokenizer": "byte" if tokenizer == "byte" else TOKENIZER_NAME}
    for name in extra_state:
        if not isinstance(name, str) or not name.isidentifier() or name in _RESERVED_NAMES:
            raise CheckpointError("extra_state", name,
                                  f"names must be identifiers other than {sorted(_RESERVED_NAMES)}")
    directory = check_output_dir(directory, overwrite=overwrite, field="directory")
    tmp = shared_staging_dir(directory, ".tmp-ckpt-")
    main = jax.process_index() == 0
    try:
        state = nnx.traversals.unflatten_mapping({tuple(p): _savable(v) for p, v in params.items()})
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, STATE_DIR), state)
            for name, tree in extra_state.items():
                if tree is not None:
                    ckptr.save(os.path.join(tmp, name), tree)
            ckptr.wait_until_finished()
        if main:
            _write_json(os.path.join(tmp, CONFIG_NAME), {"format": FORMAT, "config": cfg.to_dict()})
            _write_json(os.path.join(tmp, METADATA_NAME), metadata or {})
            if tokenizer not in (None, "byte"):
                shutil.copyfile(tokenizer, os.path.join(tmp, TOKENIZER_NAME))
        barrier(f"written {directory}")  # every process's shards are in place before the digests
        if main:
            seal(tmp, MANIFEST_KIND)
        publish_dir(tmp, directory)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _savable(x):
    """Multi-process, a process-local ``jax.Array`` (every process holds the same full value) is saved
    as a host array, which Orbax writes once; arrays spanning processes are written shard by shard."""
    if jax.process_count() > 1 and isinstance(x, jax.Array) and x.is_fully_addressable:
        return np.asarray(x)
    return x


def abstract_params(cfg: ModelConfig) -> dict[Path, Any]:
    """``{nnx path: ShapeDtypeStruct}`` of ``NemotronH(cfg)`` (traced abstractly: no init, no compile)."""
    from star_elastic_jax.model.model import abstract_model

    abstract = abstract_model(cfg)
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(abstract))}


def check_params(cfg: ModelConfig, params: Mapping[Path, Any], where: str = "params") -> None:
    """Raise :class:`CheckpointError` unless ``params`` has exactly ``NemotronH(cfg)``'s leaves and shapes."""
    want = abstract_params(cfg)
    missing = [p for p in want if p not in params]
    if missing:
        raise CheckpointError(where, ".".join(map(str, missing[0])), f"{len(missing)} parameter(s) missing")
    extra = [p for p in params if p not in want]
    if extra:
        raise CheckpointError(where, ".".join(map(str, extra[0])), "is not a parameter of this config")
    for p, a in want.items():
        if tuple(params[p].shape) != tuple(a.shape):
            raise CheckpointError(".".join(map(str, p)), tuple(params[p].shape), f"expected shape {tuple(a.shape)}")
        check_float_dtype(".".join(map(str, p)), params[p].dtype)


def read_config(directory: str | os.PathLike, *, verify: bool = True) -> ModelConfig:
    """The ModelConfig stored in a checkpoint written by :func:`save_model` (with ``verify``, its
    model_config.json is first checked against the manifest)."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    _check_is_checkpoint(directory)
    if verify:
        verify_manifest(directory, only=[CONFIG_NAME])
    data = _read_json(path)
    if data.get("format") != FORMAT or "config" not in data:
        raise CheckpointError(CONFIG_NAME, data.get("format"), f"expected format {FORMAT!r} with a 'config' object")
    return ModelConfig.from_dict(data["config"])


def read_metadata(directory: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """The free-form metadata.json of a checkpoint (verified against the manifest with ``verify``)."""
    _check_is_checkpoint(directory)
    if verify:
        verify_manifest(directory, only=[METADATA_NAME])
    return _read_json(os.path.join(os.fspath(directory), METADATA_NAME))


def _check_is_checkpoint(directory) -> None:
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError("checkpoint", directory, "is not a directory (give a star_elastic_jax Orbax checkpoint)")
    if not any(os.path.exists(os.path.join(directory, n)) for n in (CONFIG_NAME, MANIFEST_NAME)):
        hint = " (it looks like an HF checkpoint: use --from-hf / from_hf)" if os.path.isfile(
            os.path.join(directory, "config.json")) else ""
        raise CheckpointError(CONFIG_NAME, directory, f"is missing: not a star_elastic_jax Orbax checkpoint{hint}")


def verify_checkpoint(directory: str | os.PathLike) -> None:
    """Every file of the checkpoint against its sha256 manifest (:class:`CheckpointError` naming the
    first bad file). Reads every byte once."""
    _check_is_checkpoint(directory)
    verify_manifest(directory)


def load_model(directory: str | os.PathLike, *, verify: bool = True, allow_nonfinite: bool = False, **runtime: Any):
    """Restore a model saved by :func:`save_model`, keeping the stored dtypes (``runtime``
    overrides runtime config fields such as ``compute_dtype``). ``verify`` / ``allow_nonfinite``:
    as :func:`load_params`."""
    from star_elastic_jax.model.model import model_from_params

    cfg, params = load_params(directory, verify=verify, allow_nonfinite=allow_nonfinite)
    if runtime:
        cfg = cfg.with_updates(**runtime)
    return model_from_params(cfg, params, where=os.fspath(directory))


def load_params(directory: str | os.PathLike, *, verify: bool = True, allow_nonfinite: bool = False
                ) -> tuple[ModelConfig, dict[Path, Any]]:
    """Restore a checkpoint's arrays as a flat ``{nnx path: jax.Array}`` dict, *without building the
    model*: the target's shapes come from the stored config (verified), its dtypes are the stored
    ones (a bf16 checkpoint stays bf16). Opens the checkpoint read-only. Returns ``(cfg, params)``.

    ``verify``: check every file against the manifest first (:func:`verify_checkpoint`). Every
    parameter must be floating point and finite (``allow_nonfinite``: warn instead)."""
    directory = os.path.abspath(os.fspath(directory))
    _check_is_checkpoint(directory)
    if verify:
        verify_checkpoint(directory)
    if not os.path.isdir(os.path.join(directory, STATE_DIR)):
        raise CheckpointError("checkpoint", directory, f"not a star_elastic_jax checkpoint (no '{STATE_DIR}/')")
    cfg = read_config(directory, verify=False)
    want = abstract_params(cfg)
    state_dir = os.path.join(directory, STATE_DIR)
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        with ocp.StandardCheckpointer() as ckptr:
            stored = nnx.traversals.flatten_mapping(_tree_of(ckptr.metadata(state_dir)))
            stored = {tuple(str(k) for k in p): m for p, m in stored.items()}
            target = {}
            for p, a in want.items():
                meta = stored.get(tuple(str(k) for k in p))
                if meta is None:
                    raise CheckpointError(".".join(map(str, p)), "missing", f"not in {state_dir}")
                if tuple(meta.shape) != tuple(a.shape):
                    raise CheckpointError(".".join(map(str, p)), tuple(meta.shape),
                                          f"expected shape {tuple(a.shape)} from {CONFIG_NAME}")
                check_float_dtype(".".join(map(str, p)), meta.dtype)
                target[p] = jax.ShapeDtypeStruct(a.shape, meta.dtype, sharding=one_device)
            restored = ckptr.restore(state_dir, nnx.traversals.unflatten_mapping(target))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- TensorStore/Orbax raise many types for damaged files
        raise CheckpointError("checkpoint", directory, f"its state could not be restored ({type(e).__name__}: "
                                                       f"{_first_line(e)})") from None
    params = {tuple(p): v for p, v in nnx.traversals.flatten_mapping(restored).items()}
    for p, v in params.items():
        check_finite(".".join(map(str, p)), v, allow_nonfinite=allow_nonfinite, where=directory)
    return cfg, params


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def load_extra_state(directory: str | os.PathLike, name: str, *, verify: bool = True) -> Any | None:
    """The ``extra_state[name]`` pytree saved with the checkpoint (``None`` when absent). Restored
    against a target built from the stored array metadata; dict keys come back as strings.
    ``verify``: check the checkpoint's manifest first (skip it when :func:`load_params` just did)."""
    path = os.path.join(os.path.abspath(os.fspath(directory)), name)
    if name in _RESERVED_NAMES or not os.path.isdir(path):
        return None
    if verify:
        verify_checkpoint(directory)
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = _tree_of(ckptr.metadata(path))
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=one_device), meta)
            return ckptr.restore(path, target)
    except Exception as e:  # noqa: BLE001 -- as in load_params
        raise CheckpointError(name, path, f"could not be restored ({type(e).__name__}: {_first_line(e)})") from None


def _tree_of(step_metadata) -> Any:
    item = getattr(step_metadata, "item_metadata", step_metadata)
    return getattr(item, "tree", item)


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(os.path.basename(path), path, "file is missing")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(os.path.basename(path), path, f"must be valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(os.path.basename(path), path, "must hold a JSON object")
    return data
