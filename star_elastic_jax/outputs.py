"""Output directories that never destroy what star_elastic_jax did not write.

Every command and library function that writes a directory calls :func:`check_output_dir` before
it reads or computes anything, then writes through :func:`staging_dir` + :func:`replace_dir`:

* an existing non-empty output is refused unless ``overwrite`` is set, and even then it is replaced
  only when it holds a checkpoint of ours (its ``star_elastic_manifest.json``) and nothing else:
  a file the manifest does not list (a user's note, a tokenizer copied in by hand) is never deleted;
* an output that is, contains, or lies inside an input (after resolving symlinks) is refused;
* the current directory, the home directory and a filesystem root are refused outright;
* the output's parent must be an existing directory; an existing regular file or a symlink at the
  output path is refused.

Writes stage into a hidden sibling (``.tmp-*``, marked with :data:`STAGING_MARKER`) that is renamed
into place once complete; :func:`cleanup_staging` removes the marked leftovers of a killed run.

Standard library only, like :mod:`star_elastic_jax.manifest` (the PyTorch-only slicer uses both).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable

from star_elastic_jax.errors import CheckpointError, OutputError
from star_elastic_jax.manifest import has_manifest, read_manifest, unlisted_files, write_manifest

STAGING_MARKER = ".star_elastic_staging"
STAGING_PREFIXES = (".tmp-ckpt-", ".tmp-hf-", ".tmp-slice-")


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _overlaps(a: str, b: str) -> bool:
    """``a`` is ``b``, lies inside it, or contains it (real paths)."""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


def check_output_dir(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                     overwrite: bool = False, field: str = "out") -> str:
    """Validate an output directory (see the module docstring); returns its absolute path.

    Raises :class:`OutputError` naming ``field``, the path and what would be valid. Reads only:
    nothing is created or removed here.
    """
    raw = os.fspath(out)
    if not raw.strip():
        raise OutputError(field, raw, "a directory path")
    path = os.path.abspath(os.path.expanduser(raw))
    real = _real(raw)
    if os.path.dirname(real) == real:
        raise OutputError(field, raw, "is a filesystem root; give a new directory for the output")
    for name, special in (("the home directory", "~"), ("the current directory", os.getcwd())):
        if real == _real(special):
            raise OutputError(field, raw, f"is {name}; give a new directory for the output (e.g. {raw.rstrip('/')}"
                                          f"/out)")
    for src in inputs:
        if src is None:
            continue
        src_real = _real(os.fspath(src))
        if _overlaps(real, src_real):
            where = "is" if real == src_real else ("lies inside" if real.startswith(src_real) else "contains")
            raise OutputError(field, raw, f"{where} the input {os.fspath(src)} ({src_real}); write the output "
                                          "somewhere that does not overlap an input")
    if os.path.islink(path):
        raise OutputError(field, raw, f"is a symbolic link (to {os.readlink(path)}); give the real directory")
    parent = os.path.dirname(path)
    if not os.path.exists(parent):
        raise OutputError(field, raw, f"its parent directory {parent} does not exist; create it first")
    if not os.path.isdir(parent):
        raise OutputError(field, raw, f"its parent {parent} is not a directory")
    if not os.path.lexists(path):
        return path
    if not os.path.isdir(path):
        raise OutputError(field, raw, "exists and is not a directory; refusing to replace it")
    if not os.listdir(path):
        return path
    if not overwrite:
        raise OutputError(field, raw, "exists and is not empty; choose a new directory, or pass --overwrite "
                                      "(overwrite=True) to replace a checkpoint star_elastic_jax wrote there")
    if not has_manifest(path):
        raise OutputError(field, raw, "holds files that star_elastic_jax did not write (no star_elastic_manifest."
                                      "json); refusing to replace it even with --overwrite")
    try:
        extra = unlisted_files(path, read_manifest(path))
    except ValueError as e:
        raise OutputError(field, raw, f"its manifest is unreadable ({e}); refusing to replace it") from None
    if extra:
        raise OutputError(field, raw, f"holds {len(extra)} file(s) star_elastic_jax did not write (e.g. "
                                      f"{extra[0]!r}); move them away first, even with --overwrite")
    return path


def staging_dir(target: str, prefix: str) -> str:
    """A fresh, marked temporary directory beside ``target`` (its parent must exist), with the
    usual umask-based permissions (``mkdtemp`` alone gives 0700, which would hide checkpoints
    from others on shared storage)."""
    if prefix not in STAGING_PREFIXES:
        raise ValueError(f"staging prefix {prefix!r} is not one of {STAGING_PREFIXES}")
    parent = os.path.dirname(os.path.abspath(target))
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    with open(os.path.join(tmp, STAGING_MARKER), "w", encoding="utf-8") as f:
        f.write(f"{os.path.abspath(target)}\n{os.getpid()}\n")
    return tmp


def seal(tmp: str, kind: str) -> None:
    """Write the manifest of the complete staging directory ``tmp`` (the last write before the
    rename, so a published directory always has one)."""
    write_manifest(tmp, kind, exclude=(STAGING_MARKER,))


def replace_dir(tmp: str, target: str) -> None:
    """Move the complete staging directory ``tmp`` to ``target``. An existing ``target`` (already
    checked by :func:`check_output_dir`) is swapped out first and removed only after the swap."""
    marker = os.path.join(tmp, STAGING_MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    if os.path.lexists(target):
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(os.path.abspath(target)))
        os.rmdir(old)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def cleanup_staging(directory: str | os.PathLike) -> list[str]:
    """Remove the staging directories a killed run left in ``directory``: only hidden ``.tmp-*``
    directories that carry :data:`STAGING_MARKER` (so never anything we did not create). Returns
    the removed paths."""
    directory = os.fspath(directory)
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        if name.startswith(STAGING_PREFIXES) and not os.path.islink(full) and os.path.isdir(full) \
                and os.path.isfile(os.path.join(full, STAGING_MARKER)):
            shutil.rmtree(full, ignore_errors=True)
            removed.append(full)
    return removed


_SIZE_UNITS = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("TB", 10**12), ("GB", 10**9), ("MB", 10**6),
               ("KB", 10**3), ("B", 1))


def parse_size(size: int | str, field: str = "max_shard_size") -> int:
    """Bytes of a shard-size limit: ``5GB``, ``500MiB``, ``1e9`` or an int. Anything else (``5XB``,
    ``0``, ``-1``) is a :class:`CheckpointError` naming ``field``."""
    valid = "a positive size such as 5GB, 500MB, 2GiB or a number of bytes"
    if isinstance(size, bool):
        raise CheckpointError(field, size, valid)
    if isinstance(size, int):
        n = size
    else:
        s = str(size).strip().upper()
        mult = 1
        for unit, m in _SIZE_UNITS:
            if s.endswith(unit):
                s, mult = s[: -len(unit)].strip(), m
                break
        try:
            n = int(float(s) * mult)
        except (ValueError, OverflowError):
            raise CheckpointError(field, size, valid) from None
    if n <= 0:
        raise CheckpointError(field, size, valid)
    return n
