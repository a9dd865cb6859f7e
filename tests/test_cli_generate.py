"""``star-elastic generate`` (issue 11): elastic, plain Orbax and HF checkpoints; the checkpoint's own
tokenizer; the same tokens as the library's engine; streaming; bad input exits 2 on one line before
anything is loaded or compiled; and ``info`` prints the cache per budget."""
from __future__ import annotations

import json

import numpy as np
import pytest

import star_elastic_jax as sej
from star_elastic_jax.checkpoint.orbax import load_checkpoint_tokenizer, save_model
from star_elastic_jax.cli import main
from star_elastic_jax.data.tokenizers import ByteTokenizer, HFTokenizer
from star_elastic_jax.infer.loading import load_engine

from hf_fixtures import random_model, write_word_tokenizer

CFG = sej.ModelConfig.preset("tiny")
BUDGETS = {"1.0": sej.ElasticChoice(), "0.577": sej.ElasticChoice(hidden=48, mamba_heads=4, experts=2,
                                                                   expert_ffn=16)}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = random_model(CFG, seed=4)
    elastic = sej.save_elastic(model, root / "elastic", BUDGETS, tokenizer="byte")
    plain = save_model(model, root / "plain")
    sej.to_hf(model, root / "hf")
    return {"model": model, "elastic": elastic, "plain": plain, "hf": str(root / "hf"), "root": root}


def _run(capsys, *argv):
    rc = main(["generate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _engine_text(model, prompt, n, elastic=None):
    tok = ByteTokenizer()
    engine = sej.Engine(model, tokenizer=tok, budgets=BUDGETS)
    return engine.generate_text([prompt], n, elastic=elastic)[0]


@pytest.mark.parametrize("kind", ["elastic", "plain", "hf"])
def test_generate_reads_every_checkpoint_kind(ckpts, capsys, kind):
    rc, out, err = _run(capsys, "--ckpt", str(ckpts[kind]), "--prompt", "2+3=", "--max-new-tokens", "12")
    assert rc == 0, err
    assert out.rstrip("\n") == _engine_text(ckpts["model"], "2+3=", 12)
    assert "prefill" in err and "tok/s" in err


def test_generate_at_a_budget_streams_the_same_text(ckpts, capsys):
    want = _engine_text(ckpts["model"], "ab", 10, elastic="0.577")
    rc, out, _ = _run(capsys, "--ckpt", ckpts["elastic"], "--budget", "0.577", "--prompt", "ab",
                      "--max-new-tokens", "10")
    assert rc == 0 and out.rstrip("\n") == want
    rc, streamed, _ = _run(capsys, "--ckpt", ckpts["elastic"], "--budget", "0.577", "--prompt", "ab",
                           "--max-new-tokens", "10", "--stream", "--stream-chunk", "3")
    assert rc == 0 and streamed.rstrip("\n") == want


def test_prompts_file_gives_one_json_line_each(ckpts, capsys, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "hi"}) + "\n\n" + json.dumps("a longer prompt") + "\n")
    rc, out, err = _run(capsys, "--ckpt", ckpts["plain"], "--prompts", str(f), "--max-new-tokens", "6")
    assert rc == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["prompt"] for x in lines] == ["hi", "a longer prompt"]
    engine = sej.Engine(ckpts["model"], tokenizer=ByteTokenizer())
    assert [x["completion"] for x in lines] == engine.generate_text(["hi", "a longer prompt"], 6)


@pytest.mark.parametrize("argv, field", [
    (["--prompt", ""], "--prompt"),
    ([], "--prompt/--prompts"),
    (["--prompt", "x", "--budget", "abc"], "--budget"),
    (["--prompt", "x", "--budget", "0"], "--budget"),
    (["--prompt", "x", "--top-p", "1.5", "--temperature", "1"], "top_p"),
    (["--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "x" * 5000, "--max-new-tokens", "8"], "max_len"),
])
def test_bad_input_exits_2_on_one_line(ckpts, capsys, argv, field):
    rc, out, err = _run(capsys, "--ckpt", ckpts["elastic"], *argv)
    assert rc == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and field in err, err


def test_a_missing_checkpoint_exits_2(capsys, tmp_path):
    rc, _, err = _run(capsys, "--ckpt", str(tmp_path / "nope"), "--prompt", "x")
    assert rc == 2 and "--ckpt" in err


def test_the_training_tokenizer_travels_with_the_checkpoint_and_its_slices(tmp_path):
    path = write_word_tokenizer(tmp_path / "tok" / "tokenizer.json")
    cfg = sej.ModelConfig.preset("tiny")
    model = random_model(cfg, seed=1)
    ck = sej.save_elastic(model, tmp_path / "el", BUDGETS, tokenizer=str(path))
    tok = load_checkpoint_tokenizer(ck)
    assert isinstance(tok, HFTokenizer) and list(tok.encode("hello world")) == [4, 5]
    from star_elastic_jax.export.elastic import slice_checkpoint

    sl = slice_checkpoint(ck, "0.577", tmp_path / "slice")
    assert isinstance(load_checkpoint_tokenizer(sl.out), HFTokenizer)
    engine = load_engine(ck)
    assert isinstance(engine.tokenizer, HFTokenizer)
    out = engine.generate_text(["hello world"], 4, elastic="0.577")
    assert isinstance(out[0], str)
    assert isinstance(load_checkpoint_tokenizer(save_model(model, tmp_path / "p")), ByteTokenizer)
    with pytest.raises(sej.CheckpointError, match="tokenizer"):
        save_model(model, tmp_path / "q", tokenizer=str(tmp_path / "missing.json"))


def test_info_prints_the_cache_per_budget(ckpts, capsys):
    from star_elastic_jax.infer import cache_bytes_split

    assert main(["info", "--ckpt", ckpts["elastic"]]) == 0
    out = capsys.readouterr().out
    assert "generation cache" in out
    per_tok, per_seq = cache_bytes_split(CFG, BUDGETS["0.577"])
    line = next(x for x in out.splitlines() if x.startswith("0.577") and "B" in x and "KiB" in x)
    from star_elastic_jax.report import human_bytes

    assert human_bytes(per_tok) in line and human_bytes(per_seq) in line
    assert np.isfinite(per_seq)


def test_compile_cache_is_used_across_processes(ckpts, tmp_path):
    """A second process finds the first one's executables (JAX's persistent cache); run in
    subprocesses so the cache setting does not leak into this test process."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "xla"
    cmd = [sys.executable, "-m", "star_elastic_jax.cli", "--compile-cache", str(cache), "generate", "--ckpt",
           ckpts["plain"], "--prompt", "ab", "--max-new-tokens", "4"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    def entries():
        return {f: os.stat(cache / f).st_mtime_ns for f in os.listdir(cache) if f.endswith("-cache")}

    before = entries()
    assert before, "no executable was cached"
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert entries() == before  # every executable read back, none compiled and written again


def test_compile_cache_refuses_a_file_or_a_foreign_directory(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    assert main(["--compile-cache", str(f), "info", "--config", "tiny"]) == 2
    assert "--compile-cache" in capsys.readouterr().err
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep")
    assert main(["--compile-cache", str(d), "info", "--config", "tiny"]) == 2
    assert "notes.txt" in capsys.readouterr().err and (d / "notes.txt").read_text() == "keep"


def test_a_budget_below_the_choice_lists_names_the_flag(ckpts, capsys):
    rc, _, err = _run(capsys, "--ckpt", ckpts["elastic"], "--budget", "0.01", "--prompt", "x")
    assert rc == 2 and err.startswith("error: --budget=") and len(err.strip().splitlines()) == 1, err
