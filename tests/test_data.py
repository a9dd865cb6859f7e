"""Data pipeline: tokenizers, sources, the synthetic corpus, packing, sharding, determinism and resume.

Everything here is numpy + grain on tiny inputs; no JAX compilation.
"""
import collections
import json
import string

import numpy as np
import pytest

from star_elastic_jax.config import ModelConfig
from star_elastic_jax.data import (
    BATCH_KEYS,
    ByteTokenizer,
    DataConfig,
    HFTokenizer,
    JsonlSource,
    SyntheticConfig,
    SyntheticReasoning,
    TextSource,
    check_answer,
    encode_document,
    eval_examples,
    load_tokenizer,
    make_dataset,
    solve,
    split_of,
)
from star_elastic_jax.errors import DataError

from hf_fixtures import write_word_tokenizer

L = 32


def _docs(n=23, seed=0, max_len=90):
    """Unique random lowercase documents; several are longer than L (so they get chunked)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase + " "))
    return [{"text": "".join(rng.choice(letters, size=int(rng.integers(1, max_len))))} for _ in range(n)]


def _batches(ds, k):
    it = iter(ds)
    return [next(it) for _ in range(k)]


def _equal(a, b):
    return all(np.array_equal(a[key], b[key]) for key in BATCH_KEYS)


def _pieces(batch):
    """Each document piece of a batch as the tuple tokens[run] + (last target,), with row checks."""
    out = []
    for tok, tgt, seg, mask in zip(batch["tokens"], batch["targets"], batch["segment_ids"], batch["loss_mask"]):
        assert np.array_equal(mask, (seg != 0).astype(np.float32))  # loss only on document tokens
        nz = np.flatnonzero(seg)
        assert nz.size == 0 or np.array_equal(nz, np.arange(nz.size))  # padding is one trailing run
        starts = np.flatnonzero(np.diff(seg, prepend=-1)) if nz.size else np.zeros(0, int)
        runs = [(a, b) for a, b in zip(starts, list(starts[1:]) + [len(seg)]) if seg[a] != 0]
        assert [seg[a] for a, _ in runs] == list(range(1, len(runs) + 1))  # documents numbered 1, 2, ...
        for a, b in runs:
            assert np.array_equal(tgt[a:b - 1], tok[a + 1:b])  # next token, within the same document
            out.append(tuple(tok[a:b]) + (int(tgt[b - 1]),))
    return out


def _expected_pieces(docs, tok=None, seq_len=L):
    """doc index -> the pieces the pipeline must produce for it (ids chunked by seq_len positions)."""
    tok, exp = tok or ByteTokenizer(), {}
    for d, rec in enumerate(docs):
        ids = encode_document(tok, rec["text"])
        exp[d] = [tuple(int(x) for x in ids[s:s + seq_len + 1]) for s in range(0, len(ids) - 1, seq_len)]
    return exp


def _epoch_pieces(ds):
    return [p for b in ds for p in _pieces(b)]


# ----------------------------------------------------------------------------- tokenizers
def test_byte_tokenizer_roundtrip_and_reserved_bytes():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    text = "Compute 12+7.\n<think>\nx\n</think>\n19 é"
    ids = encode_document(tok, text)
    assert ids.dtype == np.int32 and ids[0] == 1 and ids[-1] == 2 and ids.max() < 256
    assert tok.decode(ids) == text
    with pytest.raises(DataError, match="reserved control byte 0x01") as e:
        tok.encode("a\x01b")
    assert e.value.field == "text"


def test_hf_tokenizer_and_pipeline(tmp_path):
    path = write_word_tokenizer(tmp_path / "tokenizer.json")
    tok = load_tokenizer(str(tmp_path))  # a directory holding tokenizer.json
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 8
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert list(tok.encode("hello world zzz")) == [4, 5, 3]
    assert tok.decode([1, 4, 5, 2]) == "hello world"
    docs = [{"text": "hello world foo"}, {"text": "bar bar"}, {"text": "foo"}]
    ds = make_dataset(docs, tokenizer=str(path), seq_len=8, batch_size=2, seed=0, num_epochs=1, vocab_size=8)
    pieces = collections.Counter(_epoch_pieces(ds))
    want = collections.Counter(p for ps in _expected_pieces(docs, tok, 8).values() for p in ps)
    assert pieces == want
    with pytest.raises(DataError) as e:  # tokenizer/vocab mismatch
        make_dataset(docs, tokenizer=str(path), seq_len=8, batch_size=2, vocab_size=6)
    assert e.value.field == "tokenizer.vocab_size"
    with pytest.raises(DataError) as e:
        HFTokenizer(path, eos_token="<end>")
    assert e.value.field == "eos_token"


# ----------------------------------------------------------------------------- synthetic corpus
def test_synthetic_deterministic_ascii_and_self_consistent():
    a, b = SyntheticReasoning(seed=3), SyntheticReasoning(seed=3)
    c = SyntheticReasoning(seed=4)
    exs = [a[i] for i in range(300)]
    assert exs[:50] == [b[i] for i in range(50)]
    assert [e["text"] for e in exs[:50]] != [c[i]["text"] for i in range(50)]
    assert {e["kind"] for e in exs} == {"add", "sub", "mul", "sort"}
    printable = set(string.printable) - set("\x0b\x0c\r\t")
    for e in exs:
        assert set(e["text"]) <= printable
        assert e["text"].endswith("\n</think>\n" + e["answer"]) and e["text"].startswith(e["prompt"] + "\n<think>\n")
        assert solve(e["prompt"]) == e["answer"]
        assert check_answer(e, e["text"]) and check_answer(e["prompt"], e["text"])
    assert solve("Compute 478+65.") == "543" and solve("Compute 100-1.") == "99"
    assert solve("Compute 12*34.") == "408" and solve("Sort ascending: 5 12 3.") == "3 5 12"
    with pytest.raises(DataError) as e:
        SyntheticReasoning(kinds=("add", "div"))
    assert e.value.field == "kinds"


def test_synthetic_eval_split_is_disjoint_from_train():
    train = SyntheticReasoning(seed=0, split="train", max_digits=2, max_items=4)
    ev = SyntheticReasoning(seed=0, split="eval", max_digits=2, max_items=4, num_eval=150)
    eval_prompts = {ev[i]["prompt"] for i in range(len(ev))}
    train_prompts = {train[i]["prompt"] for i in range(3000)}
    assert len(eval_prompts) > 50 and not eval_prompts & train_prompts
    assert all(split_of(p) == "eval" for p in eval_prompts) and all(split_of(p) == "train" for p in train_prompts)
    # the held-out set is a property of the prompt, so a different corpus seed cannot leak it either
    other = SyntheticReasoning(seed=7, split="train", max_digits=2, max_items=4)
    assert not eval_prompts & {other[i]["prompt"] for i in range(1000)}


def test_check_answer_accepts_right_and_rejects_wrong():
    ex = {"prompt": "Compute 478+65.", "answer": "543"}
    assert check_answer(ex, "8+5+0=13 ...\n</think>\n543")
    assert check_answer(ex, "Compute 478+65.\n<think>\nx\n</think>\n543\nmore text")
    assert check_answer("Compute 478+65.", "</think> 543\x02garbage")  # eos byte ends the answer
    assert check_answer("Sort ascending: 3 1 2.", "<think>\n</think>\n1 2 3")
    assert not check_answer(ex, "</think>\n544")
    assert not check_answer(ex, "</think>\n5430")
    assert not check_answer(ex, "543")  # the trace was never closed
    assert not check_answer(ex, "</think>\n")
    assert not check_answer("Sort ascending: 3 1 2.", "</think>\n1 3 2")
    with pytest.raises(DataError) as e:
        solve("What is love?")
    assert e.value.field == "prompt"


def test_eval_examples():
    exs = eval_examples(5, DataConfig(synthetic=SyntheticConfig(seed=2)))
    assert len(exs) == 5 and exs == eval_examples(5, SyntheticConfig(seed=2))
    for e in exs:
        assert split_of(e["prompt"]) == "eval"
        assert e["text"].startswith(e["prompt_text"]) and e["prompt_text"].endswith("<think>\n")
        assert check_answer(e, e["prompt_text"] + e["think"] + "\n</think>\n" + e["answer"])
    with pytest.raises(DataError) as e:
        eval_examples(10, SyntheticConfig(num_eval=4))
    assert e.value.field == "n"


# ----------------------------------------------------------------------------- pipeline
def test_pipeline_deterministic_and_seed_dependent():
    kw = {"seq_len": 64, "batch_size": 4, "model_config": ModelConfig.preset("tiny")}
    a, b = _batches(make_dataset(seed=5, **kw), 4), _batches(make_dataset("synthetic", seed=5, **kw), 4)
    c = _batches(make_dataset(seed=6, **kw), 4)
    assert all(_equal(x, y) for x, y in zip(a, b))
    assert not any(_equal(x, y) for x, y in zip(a, c))
    for x in a:
        assert {k: (v.shape, v.dtype.name) for k, v in x.items()} == {
            "tokens": ((4, 64), "int32"), "targets": ((4, 64), "int32"), "segment_ids": ((4, 64), "int32"),
            "positions": ((4, 64), "int32"), "loss_mask": ((4, 64), "float32")}
        assert x["loss_mask"].mean() > 0.5  # packing fills most of each row
        _pieces(x)
    # prefetch threads do not change the order
    docs = _docs()
    d1 = _batches(make_dataset(docs, seq_len=L, batch_size=2, seed=1), 15)
    d2 = _batches(make_dataset(docs, seq_len=L, batch_size=2, seed=1, num_threads=2), 15)
    assert all(_equal(x, y) for x, y in zip(d1, d2))


@pytest.mark.parametrize("source", ["list", "synthetic"])
def test_resume_reproduces_the_continuation(source):
    data = _docs() if source == "list" else DataConfig()
    kw = {"seq_len": L, "batch_size": 2, "seed": 3}
    n, m = 9, 14  # the small list source crosses several epoch boundaries
    full = _batches(make_dataset(data, **kw), n + m)
    it = iter(make_dataset(data, **kw))
    for _ in range(n):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # the state is plain JSON
    fresh = iter(make_dataset(data, **kw))
    fresh.set_state(state)
    rest = [next(fresh) for _ in range(m)]
    assert all(_equal(x, y) for x, y in zip(rest, full[n:]))


def test_resume_through_orbax_checkpoint_manager(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    kw = {"seq_len": L, "batch_size": 2, "seed": 0}
    full = _batches(make_dataset(_docs(), **kw), 8)
    it = iter(make_dataset(_docs(), **kw))
    for _ in range(5):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
    fresh = iter(make_dataset(_docs(), **kw))
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.restore(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    assert all(_equal(next(fresh), want) for want in full[5:])


def test_packing_never_mixes_documents_and_covers_each_once():
    docs = _docs(n=31, seed=4, max_len=100)
    exp = _expected_pieces(docs)
    owner = {}
    for d, ps in exp.items():
        for p in ps:
            assert p not in owner  # random docs: every piece is unique, so it names its document
            owner[p] = d
    assert any(len(ps) > 1 for ps in exp.values())  # some documents are split across rows
    ds = make_dataset(docs, seq_len=L, batch_size=3, seed=0, num_epochs=1)
    got = _epoch_pieces(ds)
    assert collections.Counter(got) == collections.Counter(list(owner))  # exactly the document chunks, once each
    blobs = [tuple(int(x) for x in encode_document(ByteTokenizer(), r["text"])) for r in docs]
    for p in got:  # each piece is a contiguous run of exactly one document
        hits = [d for d, blob in enumerate(blobs) if any(blob[s:s + len(p)] == p for s in range(len(blob)))]
        assert owner[p] in hits and (len(p) < 6 or hits == [owner[p]])
    two = _epoch_pieces(make_dataset(docs, seq_len=L, batch_size=3, seed=0, num_epochs=2))
    assert collections.Counter(two) == collections.Counter({p: 2 for p in owner})
    assert two[:len(got)] != two[len(got):]  # each epoch is reshuffled


def test_two_process_sharding_partitions_the_data():
    docs = _docs(n=25, seed=9)
    owner = {p: d for d, ps in _expected_pieces(docs).items() for p in ps}
    seen = []
    for pi in range(2):
        ds = make_dataset(docs, seq_len=L, batch_size=4, seed=0, num_epochs=1, process_index=pi, process_count=2)
        b = next(iter(ds))
        assert b["tokens"].shape == (2, L)  # per-process rows = global batch / process_count
        seen.append({owner[p] for p in _epoch_pieces(ds)})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(len(docs)))
    assert seen[0] == set(range(0, 25, 2))  # process i reads source[i::2]


def test_file_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "first doc", "id": 1}\n\n{"text": "second"}\n')
    (tmp_path / "b.jsonl").write_text('{"body": "third", "text": "x"}\n')
    src = JsonlSource(str(tmp_path))
    assert len(src) == 3 and [src[i]["text"] for i in range(3)] == ["first doc", "second", "x"]
    assert JsonlSource(tmp_path / "b.jsonl", field="body")[0] == {"text": "third"}
    (tmp_path / "c.txt").write_text("line one\n\n  \nline two\r\nline three")
    lines = TextSource(tmp_path / "c.txt")
    assert [lines[i]["text"] for i in range(len(lines))] == ["line one", "line two", "line three"]
    whole = TextSource(str(tmp_path / "*.txt"), mode="file")
    assert len(whole) == 1 and whole[0]["text"].startswith("line one\n")
    cfg = DataConfig(source=str(tmp_path / "c.txt"), eval_source=str(tmp_path / "a.jsonl"))
    ev = _epoch_pieces(make_dataset(cfg, split="eval", seq_len=16, batch_size=1, num_epochs=1, shuffle=False))
    assert bytes(ev[0][1:-1]).decode() == "first doc"
    with pytest.raises(DataError) as e:
        make_dataset(DataConfig(source=str(tmp_path / "c.txt")), split="eval", seq_len=16, batch_size=1)
    assert e.value.field == "eval_source"


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_data_error_naming_the_field(tmp_path):
    tiny = ModelConfig.preset("tiny")

    def field(fn):
        with pytest.raises(DataError) as e:
            fn()
        return e.value

    assert field(lambda: make_dataset([], seq_len=L, batch_size=2)).field == "dataset"
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert field(lambda: make_dataset(str(tmp_path / "empty.jsonl"), seq_len=L, batch_size=2)).field == "dataset"
    err = field(lambda: make_dataset(seq_len=tiny.max_position_embeddings + 1, batch_size=2, model_config=tiny))
    assert err.field == "seq_len" and "max_position_embeddings=4096" in str(err)
    err = field(lambda: make_dataset(str(tmp_path / "nope.jsonl"), seq_len=L, batch_size=2))
    assert err.field == "path" and "nope.jsonl" in str(err)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    err = field(lambda: JsonlSource(tmp_path / "bad.jsonl"))
    assert err.field == "jsonl" and "bad.jsonl:3" in str(err) and "line 3" in str(err)
    (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n{"content": "no"}\n')
    err = field(lambda: make_dataset(str(tmp_path / "nofield.jsonl"), seq_len=L, batch_size=2))
    assert err.field == "text" and "nofield.jsonl:2" in str(err)
    err = field(lambda: make_dataset(seq_len=L, batch_size=2, model_config=ModelConfig.preset("tiny", vocab_size=200)))
    assert err.field == "tokenizer.vocab_size"  # byte ids (256) do not fit a 200-token model

    class Wide(ByteTokenizer):  # a tokenizer that under-reports its vocab: caught per document
        vocab_size = 100

    err = field(lambda: make_dataset([{"text": "zebra"}], tokenizer=Wide(), seq_len=L, batch_size=2,
                                     model_config=ModelConfig.preset("tiny", vocab_size=100)))
    assert err.field == "token_id" and "vocab_size=100" in str(err)
    assert field(lambda: make_dataset([{"text": "a\x00"}], seq_len=L, batch_size=2)).field == "text"
    assert field(lambda: make_dataset(seq_len=L, batch_size=3, process_count=2)).field == "batch_size"
    assert field(lambda: make_dataset(seq_len=L, batch_size=2, process_index=2, process_count=2)).field == \
        "process_index"
    assert field(lambda: make_dataset(_docs(n=1), seq_len=L, batch_size=2, process_index=1,
                                      process_count=2)).field == "process_count"
    assert field(lambda: make_dataset(seq_len=0, batch_size=2)).field == "seq_len"
    assert field(lambda: make_dataset(seq_len=L, batch_size=2, split="test")).field == "split"
    assert field(lambda: load_tokenizer(str(tmp_path / "missing.json"))).field == "tokenizer"
