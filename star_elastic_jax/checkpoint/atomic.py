"""Atomic directory writes: stage into a temporary sibling, then rename into place.

A process killed mid-write leaves only a ``.tmp-*`` sibling, never a half-written checkpoint under
the real name; an existing checkpoint is swapped out only once the new one is complete. The
single-process primitives live in :mod:`star_elastic_jax.outputs` (standard library only).

Multi-process runs (``jax.process_count() > 1``) write one checkpoint together: every process must
stage into the *same* directory (Orbax writes each process's shards there and waits for all of
them), and only process 0 may rename it into place, after which everyone waits for the rename.
:func:`shared_staging_dir` and :func:`publish_dir` do that; with one process they are
:func:`staging_dir` and :func:`replace_dir`.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from star_elastic_jax.outputs import replace_dir, staging_dir

__all__ = ["barrier", "publish_dir", "replace_dir", "shared_staging_dir", "staging_dir"]


def shared_staging_dir(target: str, prefix: str) -> str:
    """:func:`staging_dir`, agreed by every process: process 0 creates it and broadcasts its
    random suffix (a collective: every process must call this, in the same order)."""
    if jax.process_count() == 1:
        return staging_dir(target, prefix)
    from jax.experimental import multihost_utils

    tmp = staging_dir(target, prefix) if jax.process_index() == 0 else None
    suffix = os.path.basename(tmp)[len(prefix):] if tmp else ""
    code = np.zeros(64, np.uint8)
    code[:len(suffix)] = np.frombuffer(suffix.encode(), np.uint8)
    code = np.asarray(multihost_utils.broadcast_one_to_all(code))
    agreed = os.path.join(os.path.dirname(os.path.abspath(target)),
                          prefix + bytes(code[code > 0].astype(np.uint8)).decode())
    if tmp is None and not os.path.isdir(agreed):
        raise FileNotFoundError(f"staging directory {agreed} made by process 0 is not visible from process "
                                f"{jax.process_index()}: multi-process checkpoints need a shared filesystem")
    return agreed


def publish_dir(tmp: str, target: str) -> None:
    """:func:`replace_dir` by process 0, then a barrier so that no process reads ``target`` before it
    is in place (a collective with several processes)."""
    if jax.process_index() == 0:
        replace_dir(tmp, target)
    barrier(f"publish {target}")


def barrier(name: str) -> None:
    """Wait for every process (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"star_elastic_jax {name}")
