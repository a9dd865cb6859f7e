"""Data: sources (synthetic reasoning corpus, JSONL, plain text), tokenizers (byte-level, HF
``tokenizer.json``) and the deterministic, checkpointable grain packing pipeline.

Names are exported lazily (PEP 562): ``synthetic``, ``tokenizers`` and ``sources`` need only numpy,
so e.g. ``from star_elastic_jax.data import check_answer`` does not import grain (or JAX, which
grain imports); the pipeline names do.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    **dict.fromkeys(("BATCH_KEYS", "DataConfig", "batch_specs", "eval_examples", "load_source", "make_dataset"),
                    "pipeline"),
    **dict.fromkeys(("JsonlSource", "TextSource"), "sources"),
    **dict.fromkeys(("KINDS", "SyntheticConfig", "SyntheticReasoning", "check_answer", "extract_answer",
                     "format_text", "prompt_prefix", "solve", "split_of"), "synthetic"),
    **dict.fromkeys(("ByteTokenizer", "HFTokenizer", "Tokenizer", "encode_document", "load_tokenizer"),
                    "tokenizers"),
}
__all__ = [  # noqa: RUF022 (grouped by module)
    "BATCH_KEYS", "DataConfig", "batch_specs", "eval_examples", "load_source", "make_dataset",
    "JsonlSource", "TextSource",
    "KINDS", "SyntheticConfig", "SyntheticReasoning", "check_answer", "extract_answer", "format_text",
    "prompt_prefix", "solve", "split_of",
    "ByteTokenizer", "HFTokenizer", "Tokenizer", "encode_document", "load_tokenizer",
]
assert set(__all__) == set(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'star_elastic_jax.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"star_elastic_jax.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs
    from star_elastic_jax.data.pipeline import (
        BATCH_KEYS,
        DataConfig,
        batch_specs,
        eval_examples,
        load_source,
        make_dataset,
    )
    from star_elastic_jax.data.sources import JsonlSource, TextSource
    from star_elastic_jax.data.synthetic import (
        KINDS,
        SyntheticConfig,
        SyntheticReasoning,
        check_answer,
        extract_answer,
        format_text,
        prompt_prefix,
        solve,
        split_of,
    )
    from star_elastic_jax.data.tokenizers import (
        ByteTokenizer,
        HFTokenizer,
        Tokenizer,
        encode_document,
        load_tokenizer,
    )
