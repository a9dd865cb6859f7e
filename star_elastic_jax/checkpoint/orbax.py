"""Orbax checkpoints of a whole model: parameters + buffers, plus our ModelConfig and free-form
metadata as JSON beside them.

Writes go to a temporary sibling directory that is renamed into place only once complete, so a
process killed mid-save never leaves a readable-but-partial checkpoint. Reads restore against an
explicit abstract target built from the stored config, so shapes and dtypes are verified.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from star_elastic_jax.config import ModelConfig
from star_elastic_jax.errors import CheckpointError

CONFIG_NAME = "model_config.json"
METADATA_NAME = "metadata.json"
STATE_DIR = "state"
FORMAT = "star_elastic_jax.model/1"


def save_model(model, directory: str | os.PathLike, *, metadata: dict[str, Any] | None = None) -> str:
    """Save ``model`` (an ``NemotronH``) to ``directory`` atomically. Returns the directory."""
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=parent)
    try:
        state = nnx.to_pure_dict(nnx.state(model))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, STATE_DIR), state)
            ckptr.wait_until_finished()
        _write_json(os.path.join(tmp, CONFIG_NAME), {"format": FORMAT, "config": model.cfg.to_dict()})
        _write_json(os.path.join(tmp, METADATA_NAME), metadata or {})
        if os.path.exists(directory):
            old = tempfile.mkdtemp(prefix=".old-ckpt-", dir=parent)
            os.rmdir(old)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored in a checkpoint written by :func:`save_model`."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    data = _read_json(path)
    if data.get("format") != FORMAT or "config" not in data:
        raise CheckpointError(CONFIG_NAME, data.get("format"), f"expected format {FORMAT!r} with a 'config' object")
    return ModelConfig.from_dict(data["config"])


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    return _read_json(os.path.join(os.fspath(directory), METADATA_NAME))


def load_model(directory: str | os.PathLike, **runtime: Any):
    """Restore a model saved by :func:`save_model` (``runtime`` overrides runtime config fields)."""
    from star_elastic_jax.model.model import NemotronH

    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(os.path.join(directory, STATE_DIR)):
        raise CheckpointError("checkpoint", directory, f"not a star_elastic_jax checkpoint (no '{STATE_DIR}/')")
    cfg = read_config(directory)
    if runtime:
        cfg = cfg.with_updates(**runtime)
    abstract = nnx.eval_shape(lambda: NemotronH(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    device = jax.devices()[0]
    one_device = jax.sharding.SingleDeviceSharding(device)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device),
                          nnx.to_pure_dict(state))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(os.path.join(directory, STATE_DIR), target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError("checkpoint", directory, f"state does not match its model_config.json ({e})") from None
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


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
