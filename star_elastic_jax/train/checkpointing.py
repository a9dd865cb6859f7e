"""Training checkpoints: an async Orbax ``CheckpointManager`` keeping the last N steps.

Each step directory holds three items, written together (``ocp.args.Composite``):

* ``state``: the whole train state of :mod:`train.step` (model params, buffers, router params,
  optimizer state, step, RNG key data);
* ``data_iter``: the grain iterator (``grain.checkpoint.CheckpointSave``);
* ``meta``: JSON (phase, stage of the saved iterator, seed, mesh, tokens seen, ...).

Restores always go against an explicit abstract target (``TrainStep.abstract_state()``): its
shardings are the *current* mesh's, so a checkpoint written on one mesh shape restores onto another.
Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete, so a process
killed mid-save leaves only a tmp directory, which ``latest_step`` ignores: the previous step is
restored.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import grain
import orbax.checkpoint as ocp

from star_elastic_jax.errors import CheckpointError


class TrainCheckpointer:
    """``save(step, state, data_iter, meta)`` / ``restore(abstract_state, data_iter)`` on one directory."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        os.makedirs(self.directory, exist_ok=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------------------------------------ save
    def save(self, step: int, state: Any, data_iter: Any = None, meta: Mapping[str, Any] | None = None) -> None:
        """Start saving ``step`` (async: returns once the arrays are copied off the devices, so the
        next train step may donate them)."""
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(dict(meta or {}))}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------ restore
    def latest_step(self) -> int | None:
        """The newest *complete* step (unfinished tmp directories are ignored), or None."""
        self.manager.reload()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def read_meta(self, step: int | None = None) -> dict:
        step = self._step(step)
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, abstract_state: Any, data_iter: Any = None, step: int | None = None) -> tuple[Any, dict]:
        """``(state, meta)`` of ``step`` (default: the latest complete one). ``abstract_state``: a pytree
        of ``jax.ShapeDtypeStruct`` with the target shardings; ``data_iter``: a fresh iterator of an
        identically built dataset, restored in place."""
        step = self._step(step)
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError("checkpoint", os.path.join(self.directory, str(step)),
                                  f"does not match this run's train state ({e})") from None
        return out["state"], dict(out["meta"])

    def _step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
        if step is None:
            raise CheckpointError("checkpoint", self.directory, "no complete checkpoint to restore")
        return int(step)
