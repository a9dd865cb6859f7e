"""File data sources: JSONL and plain text, as grain random-access sources (``len`` + ``__getitem__``
returning ``{"text": str}``).

Both validate eagerly at construction, so a bad file fails before any compilation: every JSONL
line is parsed (a malformed line raises ``DataError`` naming the file and line number), every
text file is decoded as UTF-8. Only byte offsets are kept in memory; documents are re-read on
access, so the sources pickle cleanly (no open handles).

A path may be a file, a directory (its files with a matching suffix, sorted), or a glob.
"""
from __future__ import annotations

import abc
import glob
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from star_elastic_jax.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md")
TEXT_MODES = ("line", "file")


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike], suffixes: Sequence[str]) -> list[str]:
    """Files named by ``paths`` (files, directories, globs), in a deterministic order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if any(c in p for c in "*?["):
            hits = sorted(h for h in glob.glob(p, recursive=True) if os.path.isfile(h))
            if not hits:
                raise DataError("path", p, "a glob matching at least one file")
            out.extend(hits)
        elif os.path.isdir(p):
            hits = sorted(os.path.join(p, f) for f in os.listdir(p)
                          if f.endswith(tuple(suffixes)) and os.path.isfile(os.path.join(p, f)))
            if not hits:
                raise DataError("path", p, f"a directory containing files ending in {tuple(suffixes)}")
            out.extend(hits)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise DataError("path", p, "an existing file, directory or glob (file not found)")
    if not out:
        raise DataError("path", list(paths), "at least one file")
    return out


class _OffsetSource(abc.ABC):
    """Documents addressed as (file index, byte offset, byte length)."""

    def __init__(self, files: list[str]):
        self.files = files
        self._file_idx = np.zeros(0, np.int32)
        self._offset = np.zeros(0, np.int64)
        self._length = np.zeros(0, np.int64)

    def _set_index(self, rows: list[tuple[int, int, int]]) -> None:
        if not rows:
            raise DataError("dataset", self.files, "must contain at least one document (the files are empty)")
        arr = np.asarray(rows, dtype=np.int64)
        self._file_idx, self._offset, self._length = arr[:, 0].astype(np.int32), arr[:, 1], arr[:, 2]

    def __len__(self) -> int:
        return int(self._offset.shape[0])

    def _read(self, i: int) -> bytes:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range for a source of {len(self)}")
        with open(self.files[self._file_idx[i]], "rb") as f:
            f.seek(int(self._offset[i]))
            return f.read(int(self._length[i]))

    def __getitem__(self, i: int) -> dict:
        return {"text": self._decode(self._read(i))}

    @abc.abstractmethod
    def _decode(self, raw: bytes) -> str:
        """One document's raw bytes -> its text (each concrete source defines its format)."""


class JsonlSource(_OffsetSource):
    """One JSON object per line; the document is ``obj[field]`` (a string). Blank lines are skipped."""

    def __init__(self, paths: Any, field: str = "text"):
        super().__init__(expand_paths(paths, JSONL_SUFFIXES))
        if not isinstance(field, str) or not field:
            raise DataError("field", field, "a non-empty JSON key")
        self.field = field
        rows = []
        for fi, path in enumerate(self.files):
            offset = 0
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        self._check_line(path, lineno, line)
                        rows.append((fi, offset, len(line)))
                    offset += len(line)
        self._set_index(rows)

    def _check_line(self, path: str, lineno: int, line: bytes) -> None:
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except UnicodeDecodeError as e:
            raise DataError("jsonl", where, f"line {lineno} of {path} must be UTF-8 ({e.reason})") from e
        except json.JSONDecodeError as e:
            raise DataError("jsonl", where, f"line {lineno} of {path} is not valid JSON: {e.msg} "
                                            f"(column {e.colno})") from e
        if not isinstance(obj, dict):
            raise DataError("jsonl", where, f"line {lineno} of {path} must be a JSON object, "
                                            f"got {type(obj).__name__}")
        if self.field not in obj:
            raise DataError(self.field, where, f"line {lineno} of {path} lacks the text field {self.field!r} "
                                               f"(keys: {sorted(obj)[:8]})")
        if not isinstance(obj[self.field], str):
            raise DataError(self.field, where, f"line {lineno} of {path}: {self.field!r} must be a string, "
                                               f"got {type(obj[self.field]).__name__}")

    def _decode(self, raw: bytes) -> str:
        return json.loads(raw)[self.field]

    def __repr__(self) -> str:
        return f"JsonlSource({len(self.files)} files, field={self.field!r}, len={len(self)})"


class TextSource(_OffsetSource):
    """Plain UTF-8 text. ``mode="line"``: each non-blank line is a document (the newline is
    dropped); ``mode="file"``: each non-empty file is one document."""

    def __init__(self, paths: Any, mode: str = "line"):
        if mode not in TEXT_MODES:
            raise DataError("text_mode", mode, f"one of {TEXT_MODES}")
        super().__init__(expand_paths(paths, TEXT_SUFFIXES))
        self.mode = mode
        rows = []
        for fi, path in enumerate(self.files):
            with open(path, "rb") as f:
                data = f.read()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                lineno = data[:e.start].count(b"\n") + 1
                raise DataError("text", f"{path}:{lineno}", f"line {lineno} of {path} must be UTF-8 ({e.reason})") from e
            if mode == "file":
                if data.strip():
                    rows.append((fi, 0, len(data)))
                continue
            offset = 0
            for line in data.splitlines(keepends=True):
                body = line.rstrip(b"\r\n")
                if body.strip():
                    rows.append((fi, offset, len(body)))
                offset += len(line)
        self._set_index(rows)

    def _decode(self, raw: bytes) -> str:
        return raw.decode("utf-8")

    def __repr__(self) -> str:
        return f"TextSource({len(self.files)} files, mode={self.mode!r}, len={len(self)})"


def is_jsonl(paths: Any) -> bool:
    """Whether a path spec names JSONL data (by suffix of the first path)."""
    first = paths if isinstance(paths, (str, os.PathLike)) else (paths[0] if len(paths) else "")
    first = os.fspath(first)
    if os.path.isdir(first):
        return any(f.endswith(JSONL_SUFFIXES) for f in os.listdir(first))
    return first.endswith(JSONL_SUFFIXES)
