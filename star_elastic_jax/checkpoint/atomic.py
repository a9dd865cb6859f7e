"""Atomic directory writes: stage into a temporary sibling, then rename into place.

A process killed mid-write leaves only a ``.tmp-*`` sibling, never a half-written checkpoint under
the real name; an existing checkpoint is swapped out only once the new one is complete.
"""
from __future__ import annotations

import os
import shutil
import tempfile


def staging_dir(target: str, prefix: str) -> str:
    """A fresh temporary directory beside ``target``, with the usual umask-based permissions
    (``mkdtemp`` alone gives 0700, which would hide checkpoints from others on shared storage)."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def replace_dir(tmp: str, target: str) -> None:
    """Move the complete ``tmp`` to ``target``; an existing ``target`` is swapped out, then removed."""
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(os.path.abspath(target)))
        os.rmdir(old)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
