"""The ``--config`` file and ``--config.a.b=value`` overrides (the ml_collections layer of the CLI).

:func:`load_config_file` runs a config file's ``get_config()``; :func:`apply_overrides` edits the
ConfigDict in place, coercing every value to the type of the value it replaces (``int``, ``float``,
``bool``, ``str``, tuples/lists via ``literal_eval`` or commas). List entries are addressed by index
(``--config.stages.0.seq_len=64``); a dataclass field that the file leaves at its default can be set
too (its default gives the type). Unknown paths are a ``ConfigError`` naming the path.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
from typing import Any, Sequence

from star_elastic_jax.config import ModelConfig
from star_elastic_jax.data.pipeline import DataConfig
from star_elastic_jax.data.synthetic import SyntheticConfig
from star_elastic_jax.elastic.router import RouterConfig
from star_elastic_jax.errors import ConfigError
from star_elastic_jax.train.config import (
    CheckpointConfig,
    EvalConfig,
    LogConfig,
    OptimConfig,
    PretrainConfig,
    StageConfig,
    TrainConfig,
)
from star_elastic_jax.train.sharding import MeshConfig


def load_config_file(path: str | os.PathLike) -> Any:
    """``get_config()`` of a Python config file (an ml_collections ConfigDict)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError("--config", path, "a Python config file with get_config() (e.g. configs/tiny.py)")
    if not path.endswith(".py"):
        raise ConfigError("--config", path, "a Python config file (*.py) with get_config() (e.g. configs/tiny.py)")
    spec = importlib.util.spec_from_file_location(f"_star_elastic_config_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise ConfigError("--config", path, "a Python config file with get_config() (e.g. configs/tiny.py)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 -- the user's file: name it and its error in one line
        raise ConfigError("--config", path, f"the file failed to run ({type(e).__name__}: {e})") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError("--config", path, "the file must define get_config()")
    return module.get_config()


def _coerce(old: Any, text: str, field: str) -> Any:
    low = text.strip().lower()
    if isinstance(old, bool):
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(field, text, "true or false")
    if low in ("none", "null"):
        return None
    try:
        if isinstance(old, int):
            return int(text)
        if isinstance(old, float):
            return float(text)
    except ValueError:
        raise ConfigError(field, text, f"must be a {type(old).__name__} (the type of the current value {old!r})") \
            from None
    if isinstance(old, (list, tuple)):
        try:
            v = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            v = [_literal(x) for x in text.split(",") if x.strip()]
        if not isinstance(v, (list, tuple)):
            v = [v]
        return type(old)(v)
    if isinstance(old, str):
        return text
    return _literal(text)  # None or an unknown type: a python literal, else the string


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """Apply ``--config.a.b=value`` (or ``--config.a.b value``) overrides in place; returns ``config``.

    Paths must exist; list entries are addressed by index. Values take the type of the value they
    replace. Anything else is a :class:`ConfigError` naming the path."""
    items = list(overrides)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--config."):
            raise ConfigError(arg, arg, "unrecognised argument; overrides look like --config.a.b=value")
        if "=" in arg:
            key, text = arg[len("--config."):].split("=", 1)
        else:
            if i + 1 >= len(items):
                raise ConfigError(arg, None, "needs a value (--config.a.b=value)")
            key, text = arg[len("--config."):], items[i + 1]
            i += 1
        i += 1
        parts = key.split(".")
        node = config
        for j, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[: j + 1]))
        last = parts[-1]
        if not _has(node, last) and not isinstance(node, (list, tuple)):
            old = _schema_default(parts, key)  # a dataclass field the config file leaves at its default
        else:
            old = _child(node, last, key)
        new = _coerce(old, text, key)
        if isinstance(node, list):
            node[int(last)] = new
        elif isinstance(node, tuple):
            raise ConfigError(key, text, "cannot assign into a tuple; override the whole tuple instead")
        else:
            try:
                node[last] = new
            except (TypeError, ValueError, KeyError, AttributeError):
                # ConfigDict is type-safe: a None -> value or int -> float change needs the setter
                if hasattr(node, "_fields"):
                    node._fields[last] = new
                else:
                    raise
    return config


def _has(node: Any, part: str) -> bool:
    try:
        return part in node
    except TypeError:
        return False


def _schema() -> dict[str, type]:
    return {"": TrainConfig, "data": DataConfig, "data.synthetic": SyntheticConfig, "mesh": MeshConfig,
            "optim": OptimConfig, "pretrain": PretrainConfig, "pretrain.optim": OptimConfig,
            "checkpoint": CheckpointConfig, "eval": EvalConfig, "log": LogConfig, "router": RouterConfig,
            "stages.#": StageConfig, "model.overrides": ModelConfig}


def _schema_default(parts: list[str], path: str) -> Any:
    """The default of a dataclass field that the config file does not set (its type drives coercion)."""
    section = ".".join("#" if p.isdigit() else p for p in parts[:-1])
    cls = _schema().get(section)
    name = parts[-1]
    if cls is None:
        raise ConfigError(path, name, "no such config field")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields or name == "per_layer":
        raise ConfigError(path, name, f"no such config field; valid here: {sorted(set(fields) - {'per_layer'})}")
    f = fields[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        raise ConfigError(path, name, "a config section; set its fields one by one (--config.a.b.c=value)")
    return None


def _child(node: Any, part: str, path: str) -> Any:
    if isinstance(node, (list, tuple)):
        try:
            return node[int(part)]
        except (ValueError, IndexError):
            raise ConfigError(path, part, f"an index into a list of {len(node)}") from None
    try:
        if part in node:
            return node[part]
    except TypeError:
        pass
    keys = sorted(node.keys()) if hasattr(node, "keys") else []
    raise ConfigError(path, part, f"no such config field; valid here: {keys}")
