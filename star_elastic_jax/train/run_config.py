"""The run's stored config (``WORKDIR/train_config.json``) and the guard that keeps a resume honest.

A resumed run must be the run that was started: a changed learning rate, budget list, model or data
seed would silently splice two different runs into one checkpoint history. :func:`check_and_store`
compares the config of this invocation with the stored one and refuses any difference in a field
that changes the run, naming the fields. Fields that only change what is *reported* or *when* it is
written (:data:`MAY_CHANGE`) may differ freely; ``--stop-after`` is not part of the config at all.
``allow_change=True`` (``--allow-config-change``) proceeds, keeping the old config as
``train_config.N.json`` beside the new one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from star_elastic_jax.errors import ConfigError

CONFIG_NAME = "train_config.json"
# dotted field prefixes whose change cannot change the trained weights
MAY_CHANGE = ("log.", "eval.every", "eval.at_start", "checkpoint.every", "checkpoint.keep", "checkpoint.async_save")
# what in a workdir shows that a run already made progress there
RUN_STATE = ("checkpoints", "parent", "elastic")


def config_json(cfg) -> dict[str, Any]:
    """The JSON form of a :class:`TrainConfig` (what ``train_config.json`` holds)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out or {prefix.rstrip("."): []}
    return {prefix.rstrip("."): obj}


def changed_fields(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted names of the fields that differ and are not in :data:`MAY_CHANGE`, sorted."""
    a, b = _flatten(stored), _flatten(current)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    return [k for k in diff if not k.startswith(MAY_CHANGE)]


def has_run_state(workdir: str) -> bool:
    for name in RUN_STATE:
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and os.listdir(path):
            return True
    return False


def check_and_store(cfg, workdir: str, *, allow_change: bool = False, write: bool = True) -> None:
    """Refuse a resume whose config differs from the stored one (see the module docstring), then
    store this invocation's config. ``write=False`` (processes other than 0) only checks."""
    path = os.path.join(workdir, CONFIG_NAME)
    current = config_json(cfg)
    if os.path.isfile(path) and has_run_state(workdir):
        try:
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(CONFIG_NAME, path, f"is unreadable ({e}); the run cannot be checked for a resume. "
                                                 "Move it away to resume without the check") from None
        changed = changed_fields(stored, current)
        if changed and not allow_change:
            shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
            raise ConfigError("--config", shown,
                              f"differs from the run stored in {workdir} ({CONFIG_NAME}); resuming with another "
                              "config would splice two runs. Use a new --workdir, restore the config, or pass "
                              "--allow-config-change to continue with the new one (both are kept)")
        if changed and write:
            n = 1
            while os.path.exists(os.path.join(workdir, f"train_config.{n}.json")):
                n += 1
            kept = os.path.join(workdir, f"train_config.{n}.json")
            os.replace(path, kept)
            print(f"warning: continuing {workdir} with a changed config ({', '.join(changed)}); the previous "
                  f"config is kept as {kept}", file=sys.stderr, flush=True)
    if write:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(current, f, indent=2)
        os.replace(tmp, path)
