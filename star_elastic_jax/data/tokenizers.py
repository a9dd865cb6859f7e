"""Tokenizers with one small interface: ``encode(text) -> int32 ids``, ``decode(ids) -> str``,
``vocab_size`` and ``bos_id`` / ``eos_id`` / ``pad_id`` (any may be ``None`` for HF files).

``ByteTokenizer`` has **vocab_size 256** so that it fits the ``tiny`` preset (vocab 256): byte
``b`` is id ``b``, and the three control bytes ``0x00``/``0x01``/``0x02`` are reserved as
``pad``/``bos``/``eos``. Text containing those bytes is rejected (``DataError``) rather than
silently confused with a special token; ordinary text never contains them. ``<think>`` and
``</think>`` are plain text.

``HFTokenizer`` wraps any Hugging Face ``tokenizers`` ``tokenizer.json`` (the ``tokenizers``
package is imported lazily; it ships with ``transformers``).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from star_elastic_jax.errors import DataError


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids; ``pad=0``, ``bos=1``, ``eos=2``; ``vocab_size=256``."""

    vocab_size = 256
    pad_id, bos_id, eos_id = 0, 1, 2
    _RESERVED = bytes([0, 1, 2])

    def encode(self, text: str) -> np.ndarray:
        if not isinstance(text, str):
            raise DataError("text", type(text).__name__, "must be a str")
        data = text.encode("utf-8")
        if data.translate(None, self._RESERVED) != data:
            bad = next(i for i, b in enumerate(data) if b in self._RESERVED)
            raise DataError("text", data[max(0, bad - 20):bad + 20],
                            f"contains the reserved control byte 0x{data[bad]:02x} at byte {bad}; the byte "
                            "tokenizer uses 0x00/0x01/0x02 as pad/bos/eos")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataError("ids", int(arr.max() if arr.max() > 255 else arr.min()), "byte ids must be in [0, 256)")
        if skip_special:
            arr = arr[arr > 2]
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256, pad=0, bos=1, eos=2)"


_BOS = ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]", "<|startoftext|>", "<|im_start|>")
_EOS = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]", "<|eot_id|>", "<|im_end|>")
_PAD = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (a file, or a directory containing one).

    Special tokens are found by name (``<s>``/``</s>``/``<pad>`` and common variants) unless
    given explicitly; a token named but missing from the vocabulary is a ``DataError``.
    """

    def __init__(self, path: str | os.PathLike, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None):
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise DataError("tokenizer", path, "a tokenizer.json file (or a directory containing one) that exists")
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as e:  # pragma: no cover - tokenizers ships with transformers
            raise DataError("tokenizer", path, "needs the `tokenizers` package (pip install tokenizers)") from e
        try:
            self._tok = _HF.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise DataError("tokenizer", path, f"a valid HF tokenizer.json ({e})") from e
        self.path = path
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.bos_id = self._special("bos_token", bos_token, _BOS)
        self.eos_id = self._special("eos_token", eos_token, _EOS)
        self.pad_id = self._special("pad_token", pad_token, _PAD)

    def _special(self, field: str, name: str | None, candidates: Sequence[str]) -> int | None:
        if name is not None:
            i = self._tok.token_to_id(name)
            if i is None:
                raise DataError(field, name, f"a token in {self.path}")
            return int(i)
        for c in candidates:
            i = self._tok.token_to_id(c)
            if i is not None:
                return int(i)
        return None

    def encode(self, text: str) -> np.ndarray:
        if not isinstance(text, str):
            raise DataError("text", type(text).__name__, "must be a str")
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special)

    def __repr__(self) -> str:
        return (f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id})")


def load_tokenizer(spec: Any = "byte", **kwargs: Any) -> Tokenizer:
    """``"byte"`` → :class:`ByteTokenizer`; a path → :class:`HFTokenizer`; a tokenizer object is
    returned as is."""
    if isinstance(spec, str) and spec == "byte":
        return ByteTokenizer()
    if isinstance(spec, (str, os.PathLike)):
        return HFTokenizer(spec, **kwargs)
    if all(hasattr(spec, a) for a in ("encode", "decode", "vocab_size")):
        return spec
    raise DataError("tokenizer", spec, "'byte', a path to a tokenizer.json (or its directory), or a tokenizer object")


def encode_document(tok: Tokenizer, text: str, *, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
    """``[bos] + encode(text) + [eos]`` as int32 (a special token the tokenizer lacks is skipped)."""
    ids = tok.encode(text)
    head = [tok.bos_id] if add_bos and tok.bos_id is not None else []
    tail = [tok.eos_id] if add_eos and tok.eos_id is not None else []
    if head or tail:
        ids = np.concatenate([np.asarray(head, np.int32), ids, np.asarray(tail, np.int32)])
    return ids.astype(np.int32, copy=False)
