"""The training input pipeline (grain 0.2.18), deterministic and checkpointable.

::

    MapDataset.source(src)[process_index::process_count]      # this process's shard only
      .shuffle(seed).repeat(num_epochs)                         # reshuffled every epoch
      .map(tokenize: [bos] + ids + [eos], vocab check)
      .to_iter_dataset()
      -> chunk: (inputs, targets) = (ids[:-1], ids[1:]) cut into pieces of <= seq_len
      -> grain.experimental.FirstFitPackIterDataset(num_packing_bins=rows)
      -> batch(rows) -> finalize (pad a short last batch with empty rows)

Each element is a dict of numpy arrays, ``rows = batch_size // process_count``:

``tokens`` int32 [rows, L]
    input ids; padding positions hold the tokenizer's ``pad_id`` (0 if it has none).
``targets`` int32 [rows, L]
    the next token *of the same document* (shifted before packing, so a document's last
    position predicts its ``eos`` and a chunk's last position predicts the next chunk's first).
``segment_ids`` int32 [rows, L]
    documents of a row are numbered 1, 2, ...; padding is 0 (always a trailing run, so it is a
    run of its own, as the model's run-based segment handling expects).
``positions`` int32 [rows, L]
    position inside the packed piece (restarts at 0 for each chunk).
``loss_mask`` float32 [rows, L]
    1 on document tokens, 0 on padding. Every unmasked target lies in the same document.

Determinism: the order depends only on ``(seed, process_index, process_count)``, never on
threads or timing. ``it = iter(ds)``; ``it.get_state()`` is a JSON-serialisable dict and
``it.set_state(state)`` on a fresh iterator of an identically built dataset resumes exactly.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from grain.experimental import (
    FirstFitPackIterDataset,
    FlatMapIterDataset,
    FlatMapTransform,
)

from star_elastic_jax.data.sources import TEXT_MODES, JsonlSource, TextSource, is_jsonl
from star_elastic_jax.data.synthetic import (
    SyntheticConfig,
    SyntheticReasoning,
    prompt_prefix,
)
from star_elastic_jax.data.tokenizers import Tokenizer, encode_document, load_tokenizer
from star_elastic_jax.errors import DataError

SPLITS = ("train", "eval")
BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is tokenized.

    ``source``: ``"synthetic"`` or a path spec (file, directory, glob, or a tuple of them);
    ``.jsonl``/``.json``/``.ndjson`` are read as JSONL (``field``), anything else as plain text
    (``text_mode``: ``"line"`` or ``"file"``). ``eval_source``: the file source for
    ``split="eval"`` (the synthetic corpus has its own held-out split). ``tokenizer``: ``"byte"``
    or a path to a ``tokenizer.json``.
    """

    source: str | tuple[str, ...] = "synthetic"
    eval_source: str | tuple[str, ...] | None = None
    tokenizer: str = "byte"
    field: str = "text"
    text_mode: str = "line"
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    add_bos: bool = True
    add_eos: bool = True

    def __post_init__(self):
        for name in ("source", "eval_source"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        if self.text_mode not in TEXT_MODES:
            raise DataError("text_mode", self.text_mode, f"one of {TEXT_MODES}")
        if not self.source:
            raise DataError("source", self.source, "'synthetic' or a path to JSONL/text data")


def _is_source_object(x: Any) -> bool:
    return not isinstance(x, (str, os.PathLike, DataConfig)) and hasattr(x, "__len__") and hasattr(x, "__getitem__")


def load_source(data: DataConfig, split: str = "train"):
    """The random-access source of ``data`` for ``split``."""
    if split not in SPLITS:
        raise DataError("split", split, f"one of {SPLITS}")
    if data.source == "synthetic":
        return SyntheticReasoning(split=split, config=data.synthetic)
    spec = data.source if split == "train" else data.eval_source
    if spec is None:
        raise DataError("eval_source", None, "a file source for split='eval' (only the synthetic corpus has a "
                                             "built-in held-out split)")
    return JsonlSource(spec, data.field) if is_jsonl(spec) else TextSource(spec, data.text_mode)


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise DataError(name, v, "must be a positive integer")
    return int(v)


class _Tokenize:
    """record -> int32 ids ``[bos] + text + [eos]``; ``None`` (dropped) if < 2 tokens."""

    def __init__(self, tok: Tokenizer, add_bos: bool, add_eos: bool, vocab_size: int | None):
        self.tok, self.add_bos, self.add_eos, self.vocab_size = tok, add_bos, add_eos, vocab_size

    def __call__(self, record: Any) -> np.ndarray | None:
        text = record["text"] if isinstance(record, dict) else record
        ids = encode_document(self.tok, text, add_bos=self.add_bos, add_eos=self.add_eos)
        if self.vocab_size is not None and ids.size and int(ids.max()) >= self.vocab_size:
            raise DataError("token_id", int(ids.max()), f"must be < the model's vocab_size={self.vocab_size} "
                                                        f"(tokenizer/vocab mismatch: {self.tok!r})")
        return ids if ids.size >= 2 else None


class _Chunk(FlatMapTransform):
    """ids -> next-token pieces ``{"inputs", "targets"}`` of at most ``seq_len`` positions."""

    max_fan_out = 1 << 20  # not enforced by FlatMapIterDataset; documents may be arbitrarily long

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, ids: np.ndarray) -> list[dict]:
        inputs, targets, L = ids[:-1], ids[1:], self.seq_len
        return [{"inputs": inputs[s:s + L], "targets": targets[s:s + L]} for s in range(0, len(inputs), L)]


class _Finalize:
    """Packed rows -> the model batch; a short final batch is padded with empty rows."""

    def __init__(self, rows: int, seq_len: int, pad_id: int):
        self.rows, self.seq_len, self.pad_id = rows, seq_len, pad_id

    def __call__(self, packed: dict) -> dict:
        seg = packed["inputs_segment_ids"].astype(np.int32)
        n = seg.shape[0]
        real = seg != 0
        out = {
            "tokens": np.where(real, packed["inputs"], self.pad_id).astype(np.int32),
            "targets": np.where(real, packed["targets"], self.pad_id).astype(np.int32),
            "segment_ids": seg,
            "positions": np.where(real, packed["inputs_positions"], 0).astype(np.int32),
            "loss_mask": real.astype(np.float32),
        }
        if n < self.rows:
            pad = ((0, self.rows - n), (0, 0))
            out = {k: np.pad(v, pad, constant_values=self.pad_id if k in ("tokens", "targets") else 0)
                   for k, v in out.items()}
        return out


def make_dataset(data: DataConfig | str | Any = None, *, split: str = "train", seq_len: int, batch_size: int,
                 seed: int = 0, model_config: Any = None, vocab_size: int | None = None, tokenizer: Any = None,
                 process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                 shuffle: bool = True, num_packing_bins: int | None = None, num_threads: int = 0
                 ) -> grain.IterDataset:
    """The packed, batched, per-process training dataset (a ``grain.IterDataset``).

    ``data``: a :class:`DataConfig`, a source spec string (``"synthetic"`` or a path), or a
    random-access source object (``len`` + ``__getitem__`` returning ``{"text": ...}`` or str,
    e.g. a list of ``{"text": ...}`` dicts; a list of *strings* is read as a list of paths).
    ``batch_size`` is the **global** batch; each process gets ``batch_size // process_count``
    rows from its own shard (``source[process_index::process_count]``). ``model_config`` (any
    object with ``vocab_size`` and ``max_position_embeddings``, e.g. a ``ModelConfig``) bounds
    ``seq_len`` and the token ids; ``vocab_size`` alone bounds the ids. ``num_epochs=None``
    repeats forever (reshuffled each epoch). ``tokenizer`` overrides ``data.tokenizer``.

    Everything that can be checked is checked here, before any compilation, raising
    ``DataError`` naming the field: the ints, the split, seq_len vs ``max_position_embeddings``,
    tokenizer vocab vs model vocab, missing/malformed files, an empty dataset or shard, and the
    first document of the shard (tokenized as a probe).
    """
    if data is None:
        data = DataConfig()
    elif isinstance(data, (str, os.PathLike)):
        data = DataConfig(source=os.fspath(data))
    elif isinstance(data, (tuple, list)) and data and all(isinstance(p, (str, os.PathLike)) for p in data):
        data = DataConfig(source=tuple(os.fspath(p) for p in data))
    seq_len = _positive_int("seq_len", seq_len)
    batch_size = _positive_int("batch_size", batch_size)
    process_count = _positive_int("process_count", process_count)
    if isinstance(process_index, bool) or not isinstance(process_index, (int, np.integer)) \
            or not 0 <= process_index < process_count:
        raise DataError("process_index", process_index, f"an integer in [0, process_count={process_count})")
    if batch_size % process_count:
        raise DataError("batch_size", batch_size, f"the global batch must be divisible by "
                                                  f"process_count={process_count}")
    if num_epochs is not None:
        num_epochs = _positive_int("num_epochs", num_epochs)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError("seed", seed, "a non-negative integer")
    if split not in SPLITS:
        raise DataError("split", split, f"one of {SPLITS}")
    if model_config is not None:
        max_pos = int(model_config.max_position_embeddings)
        if seq_len > max_pos:
            raise DataError("seq_len", seq_len, f"must be <= the model's max_position_embeddings={max_pos}")
        vocab_size = int(model_config.vocab_size) if vocab_size is None else min(vocab_size, model_config.vocab_size)
    rows = batch_size // process_count

    tok = load_tokenizer(tokenizer if tokenizer is not None
                         else (data.tokenizer if isinstance(data, DataConfig) else "byte"))
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise DataError("tokenizer.vocab_size", tok.vocab_size,
                        f"must be <= the model's vocab_size={vocab_size} (tokenizer/vocab mismatch: {tok!r})")
    if isinstance(data, DataConfig):
        source, add_bos, add_eos = load_source(data, split), data.add_bos, data.add_eos
    elif _is_source_object(data):
        source, add_bos, add_eos = data, True, True
    else:
        raise DataError("data", data, "a DataConfig, 'synthetic', a path, or a random-access source")
    if len(source) == 0:
        raise DataError("dataset", source, "must contain at least one document (the source is empty)")

    ds = grain.MapDataset.source(source)
    if process_count > 1:
        ds = ds[process_index::process_count]
        if len(ds) == 0:
            raise DataError("process_count", process_count, f"must be <= the number of documents ({len(source)}); "
                                                            f"process {process_index}'s shard is empty")
    tokenize = _Tokenize(tok, add_bos, add_eos, vocab_size)
    tokenize(ds[0])  # probe: a decoding/vocab problem surfaces now, not inside the training loop
    if shuffle:
        ds = ds.shuffle(seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(tokenize)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=4 * max(num_threads, 1) if num_threads else 0))
    it = FlatMapIterDataset(it, _Chunk(seq_len))
    it = FirstFitPackIterDataset(it, length_struct={"inputs": seq_len, "targets": seq_len},
                                 num_packing_bins=num_packing_bins or rows, shuffle_bins=False)
    it = it.batch(rows, drop_remainder=False)
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    return it.map(_Finalize(rows, seq_len, pad_id))


def eval_examples(n: int, data: DataConfig | SyntheticConfig | None = None) -> list[dict]:
    """The first ``n`` held-out synthetic problems, each with ``prompt_text`` (the generation
    prefix ``"{prompt}\\n<think>\\n"``) added; check a completion with ``check_answer(ex, text)``."""
    n = _positive_int("n", n)
    cfg = data.synthetic if isinstance(data, DataConfig) else (data or SyntheticConfig())
    if isinstance(data, DataConfig) and data.source != "synthetic":
        raise DataError("source", data.source, "eval_examples needs the synthetic corpus (source='synthetic')")
    src = SyntheticReasoning(split="eval", config=cfg)
    if n > len(src):
        raise DataError("n", n, f"must be <= the eval split size num_eval={len(src)}")
    return [dict(src[i], prompt_text=prompt_prefix(src[i]["prompt"])) for i in range(n)]


def batch_specs(rows: int, seq_len: int) -> dict:
    """``{key: (shape, dtype)}`` of one per-process batch (for building abstract inputs)."""
    f = {"tokens": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
         "loss_mask": np.float32}
    return {k: ((rows, seq_len), np.dtype(v)) for k, v in f.items()}


__all__: Sequence[str] = ("BATCH_KEYS", "DataConfig", "batch_specs", "eval_examples", "load_source", "make_dataset")
