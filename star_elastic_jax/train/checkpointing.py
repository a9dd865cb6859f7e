"""Training checkpoints: an async Orbax ``CheckpointManager`` keeping the last N steps, each step
sealed with a sha256 manifest and verified before it is restored.

Each step directory holds three items, written together (``ocp.args.Composite``):

* ``state``: the whole train state of :mod:`train.step` (model params, buffers, router params,
  optimizer state, step, RNG key data);
* ``data_iter``: the grain iterator (``grain.checkpoint.CheckpointSave``);
* ``meta``: JSON (phase, stage of the saved iterator, seed, mesh, tokens seen, ...);

plus ``star_elastic_manifest.json``, written by Orbax's post-finalization callback into the
step's ``<step>.orbax-checkpoint-tmp`` directory, i.e. *before* Orbax renames it into place: a
committed step always carries its manifest, and a process killed mid-save leaves only a tmp
directory, which ``latest_step`` ignores and the next start removes (``cleanup_tmp_directories``).

Restores always go against an explicit abstract target (``TrainStep.abstract_state()``): its
shardings are the *current* mesh's, so a checkpoint written on one mesh shape restores onto another.
:meth:`TrainCheckpointer.latest_verified_step` skips (and moves aside, as ``<step>.corrupt``) a step
whose files do not match their manifest, so a damaged latest checkpoint falls back to the newest
intact one with a warning.

Fault injection for the crash tests: ``STAR_ELASTIC_FAULT=before-commit:<phase>:<step>`` SIGKILLs the
process after step's manifest is written and before Orbax commits it; ``after-commit:<phase>:<step>``
SIGKILLs it as soon as that step is known to be committed.
"""
from __future__ import annotations

import glob
import os
import signal
import sys
from typing import Any, Mapping

import grain
import jax
import orbax.checkpoint as ocp

from star_elastic_jax.errors import CheckpointError
from star_elastic_jax.manifest import ORBAX_COMMIT_FILES, verify_manifest, write_manifest

FAULT_ENV = "STAR_ELASTIC_FAULT"
MANIFEST_KIND = "train-step"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"


class TrainCheckpointer:
    """``save(step, state, data_iter, meta)`` / ``restore(abstract_state, data_iter)`` on one directory.

    ``phase`` names the run phase in warnings and in fault-injection specs."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 phase: str = "train"):
        self.directory = os.path.abspath(os.fspath(directory))
        self.phase = phase
        self.async_save = async_save
        os.makedirs(self.directory, exist_ok=True)
        self._sealing: int | None = None   # the step whose async write is in flight
        self._committed_check: int | None = None
        # Always the async checkpointer: the manifest is written by its post-finalization callback
        # (inside the tmp directory, before the commit rename); async_save=False waits after each save.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_in_flight))
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    # ------------------------------------------------------------------------------------------ save
    def save(self, step: int, state: Any, data_iter: Any = None, meta: Mapping[str, Any] | None = None) -> None:
        """Start saving ``step`` (async: returns once the arrays are copied off the devices, so the
        next train step may donate them; ``async_save=False``: returns once it is committed)."""
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(dict(meta or {}))}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.wait_until_finished()
        self._after_commit()
        self._sealing = int(step)
        self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        if not self.async_save:
            self.wait()

    def _seal_in_flight(self) -> None:
        """Orbax's post-finalization callback: every item of the in-flight step is written into its
        tmp directory; digest them there (process 0), so that the commit rename publishes the manifest."""
        step = self._sealing
        if step is None or jax.process_index() != 0:
            return
        tmp = [p for p in glob.glob(os.path.join(self.directory, f"{step}{_TMP_SUFFIX}*")) if os.path.isdir(p)]
        if len(tmp) != 1:
            raise CheckpointError("checkpoint", self.step_dir(step),
                                  f"expected one Orbax staging directory {step}{_TMP_SUFFIX}*, found {tmp}")
        write_manifest(tmp[0], MANIFEST_KIND, exclude_names=ORBAX_COMMIT_FILES)
        _maybe_fault("before-commit", self.phase, step)
        self._committed_check = step

    def _after_commit(self) -> None:
        """Fault injection point right after a step is known committed."""
        step, self._committed_check = self._committed_check, None
        if step is not None and os.path.isdir(self.step_dir(step)):
            _maybe_fault("after-commit", self.phase, step)

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._after_commit()

    def close(self) -> None:
        self.wait()
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

    def latest_verified_step(self, *, verify: bool = True) -> int | None:
        """The newest complete step whose files match its manifest. A step that fails is moved aside
        (:meth:`quarantine`) with a warning naming it and why, and the next older one is tried."""
        for step in reversed(self.all_steps()):
            if not verify:
                return step
            try:
                verify_manifest(self.step_dir(step))
                return step
            except CheckpointError as e:
                self.quarantine(step, e)
        return None

    def quarantine(self, step: int, reason: BaseException) -> str:
        """Move a damaged step out of Orbax's view to ``<step>.corrupt[-N]`` (kept for inspection,
        never deleted) and warn. Process 0 renames; every process waits for it."""
        src = self.step_dir(step)
        dst = src + ".corrupt"
        n = 1
        while os.path.lexists(dst):
            dst, n = f"{src}.corrupt-{n}", n + 1
        if jax.process_index() == 0:
            os.replace(src, dst)
            print(f"warning: {self.phase} checkpoint step {step} is damaged and was skipped ({reason}); it was "
                  f"moved to {dst}; resuming from an earlier checkpoint", file=sys.stderr, flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"star_elastic_jax quarantine {src}")
        self.manager.reload()
        return dst

    def read_meta(self, step: int | None = None) -> dict:
        step = self._step(step)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 -- Orbax/TensorStore raise many types for damaged files
            raise CheckpointError("checkpoint", self.step_dir(step), f"its metadata could not be read "
                                                                     f"({type(e).__name__}: {e})") from None
        return dict(out["meta"])

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
        except Exception as e:  # noqa: BLE001 -- as in read_meta
            raise CheckpointError("checkpoint", self.step_dir(step),
                                  f"does not match this run's train state ({type(e).__name__}: {e})") from None
        return out["state"], dict(out["meta"])

    def _step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
        if step is None:
            raise CheckpointError("checkpoint", self.directory, "no complete checkpoint to restore")
        return int(step)


def _maybe_fault(point: str, phase: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{point}:{phase}:{int(step)}":
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
