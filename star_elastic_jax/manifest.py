"""Checkpoint manifests: the sha256 digest and size of every file a checkpoint directory holds,
written last inside the atomic write and verified before any array is read.

Every directory star_elastic_jax writes (Orbax model and elastic checkpoints, HF exports, slices,
training checkpoint steps) holds ``star_elastic_manifest.json``. It is both the integrity record
(a flipped byte, a truncated, deleted or renamed file is one :class:`CheckpointError` naming the
file) and the marker that the directory is ours, which ``--overwrite`` requires
(:mod:`star_elastic_jax.outputs`).

Standard library only: the PyTorch-only slicer (``export/slice_hf.py``) imports it without JAX.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

from star_elastic_jax.errors import CheckpointError

MANIFEST_NAME = "star_elastic_manifest.json"
FORMAT = "star_elastic_jax.manifest/1"
# the config.json key by which an HF directory says it carries our manifest (so that removing the
# manifest is detected; HF checkpoints from elsewhere have neither and are read unverified)
HF_CONFIG_KEY = "star_elastic_manifest"
_CHUNK = 8 << 20
# Orbax rewrites these after a training step's manifest is written (commit bookkeeping), so they
# are left out of it; a damaged one makes Orbax's own restore fail, which the caller reports.
ORBAX_COMMIT_FILES = ("commit_success.txt", "_CHECKPOINT_METADATA")


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: str, exclude: Iterable[str], exclude_names: Iterable[str] = ()) -> list[str]:
    """Relative paths (``/``-separated) of the regular files under ``directory``, sorted, without
    ``exclude`` (relative paths) and files named one of ``exclude_names`` (at any depth)."""
    skip = set(exclude) | {MANIFEST_NAME}
    skip_names = set(exclude_names)
    out = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory).replace(os.sep, "/")
            if rel in skip or name in skip_names or os.path.islink(full):
                continue
            out.append(rel)
    return sorted(out)


def write_manifest(directory: str | os.PathLike, kind: str, *, exclude: Iterable[str] = (),
                   exclude_names: Iterable[str] = ()) -> dict[str, Any]:
    """Digest every file under ``directory`` (except ``exclude``, relative paths, and files named one
    of ``exclude_names``) and write the manifest there, through a temporary file renamed into
    place. Returns the manifest."""
    directory = os.fspath(directory)
    files = {rel: {"size": os.path.getsize(os.path.join(directory, rel)),
                   "sha256": file_sha256(os.path.join(directory, rel))}
             for rel in _files(directory, exclude, exclude_names)}
    manifest = {"format": FORMAT, "kind": kind, "algorithm": "sha256", "files": files}
    path = os.path.join(directory, MANIFEST_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return manifest


def has_manifest(directory: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(directory), MANIFEST_NAME))


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed manifest of ``directory`` (:class:`CheckpointError` if missing or malformed)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(MANIFEST_NAME, directory,
                              "is missing: the checkpoint is incomplete, was altered, or was not written by "
                              "star_elastic_jax (pass --no-verify / verify=False to read it anyway)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(MANIFEST_NAME, path, f"must be valid JSON ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(files, dict) or any(
            not isinstance(v, dict) or not isinstance(v.get("size"), int) or not isinstance(v.get("sha256"), str)
            for v in files.values()):
        raise CheckpointError(MANIFEST_NAME, path, f"must be a {FORMAT} object with files {{path: {{size, sha256}}}}")
    return manifest


def verify_manifest(directory: str | os.PathLike, *, only: Iterable[str] | None = None) -> dict[str, Any]:
    """Check the files of ``directory`` against its manifest: each listed file must exist with the
    recorded size, and each one (or, with ``only``, each of those: a cheap check of a few metadata
    files) with the recorded sha256. Sizes are checked before any digest is computed, so a truncated
    or deleted file fails fast. Raises :class:`CheckpointError` naming the first bad file and what
    was expected; returns the manifest."""
    directory = os.fspath(directory)
    manifest = read_manifest(directory)
    files = manifest["files"]
    names = sorted(files) if only is None else list(only)
    for rel in sorted(set(names) | set(files)):
        if rel not in files:
            raise CheckpointError(rel, directory, f"is not listed in {MANIFEST_NAME}: the checkpoint was altered")
        path = os.path.join(directory, *rel.split("/"))
        if not os.path.isfile(path):
            raise CheckpointError(rel, directory, f"is missing (listed in {MANIFEST_NAME}, {files[rel]['size']} bytes)")
        size = os.path.getsize(path)
        if size != files[rel]["size"]:
            raise CheckpointError(rel, f"{size} bytes", f"expected {files[rel]['size']} bytes (listed in "
                                                        f"{MANIFEST_NAME} of {directory}): truncated or altered")
    for rel in names:
        digest = file_sha256(os.path.join(directory, *rel.split("/")))
        if digest != files[rel]["sha256"]:
            raise CheckpointError(rel, f"sha256 {digest[:16]}...",
                                  f"expected sha256 {files[rel]['sha256'][:16]}... (listed in {MANIFEST_NAME} of "
                                  f"{directory}): the file is corrupted or was altered")
    return manifest


def unlisted_files(directory: str | os.PathLike, manifest: dict[str, Any] | None = None) -> list[str]:
    """Entries under ``directory`` that its manifest does not list: files, and symbolic links of any
    kind (never ours). This is what ``--overwrite`` would destroy without having written it. Orbax's
    commit bookkeeping files count as listed."""
    directory = os.fspath(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    listed = set(manifest["files"])
    extra = []
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory).replace(os.sep, "/")
            if os.path.islink(full):
                extra.append(rel)
            elif name in files and rel not in listed and rel != MANIFEST_NAME \
                    and name not in ORBAX_COMMIT_FILES:
                extra.append(rel)
    return sorted(extra)
