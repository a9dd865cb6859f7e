"""Bad input is one clear error (issue 9, items 3, 5 and 6): tensors are checked on the way in
(float dtypes only, finite values), a config.json missing a shape field names it, every error a
user can cause is one ``error:`` line with exit code 2 (``--debug`` adds the traceback), and a
budget that cannot be honoured is refused or flagged, never silently replaced."""
from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import star_elastic_jax as sej
from star_elastic_jax.checkpoint.orbax import flat_params, load_params, save_params
from star_elastic_jax.cli import main
from star_elastic_jax.config.hf_json import _HF_REQUIRED
from star_elastic_jax.errors import CheckpointError, ConfigError
from star_elastic_jax.export.elastic import export_elastic_hf
from star_elastic_jax.export import slice_hf as torch_slicer
from star_elastic_jax.manifest import MANIFEST_NAME
from star_elastic_jax.outputs import parse_size

CFG = sej.ModelConfig.preset("tiny")
SMALL = sej.ElasticChoice(hidden=48, mamba_heads=4, experts=2, expert_ffn=16)
KEY = "backbone.layers.0.mixer.in_proj.weight"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    model = sej.NemotronH(CFG, rngs=nnx.Rngs(0))
    el = sej.save_elastic(model, root / "el", budgets={"full": sej.ElasticChoice(), "small": SMALL})
    return {"model": model, "hf": sej.to_hf(model, root / "hf", dtype="float32"),
            "ckpt": sej.checkpoint.orbax.save_model(model, root / "ckpt"), "el": el,
            "elhf": export_elastic_hf(el, root / "elhf", dtype="float32")}


def one_line_error(argv, capsys, main_fn=main, rc=2) -> str:
    """Run a CLI; the error is its last stderr line (a progress bar may come before it), no traceback."""
    got = main_fn([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1] if err else ""
    assert got == rc and last.startswith("error:") and "Traceback" not in err, (got, err)
    return last


def foreign_copy(src_dir, dst):
    """A copy of an HF export without our manifest (as an HF checkpoint from elsewhere)."""
    shutil.copytree(src_dir, dst)
    os.remove(os.path.join(dst, MANIFEST_NAME))
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg.pop("star_elastic_manifest")
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


def rewrite_tensor(hf_dir, key, fn):
    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    tensors[key] = fn(tensors[key])
    save_file(tensors, path, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------- item 3
def test_int_weight_is_an_error_not_zeros(src, tmp_path, capsys):
    d = foreign_copy(src["hf"], tmp_path / "int")
    rewrite_tensor(d, KEY, lambda t: np.round(t * 100).astype(np.int32))
    with pytest.raises(CheckpointError, match=f"{KEY}.*int32.*floating point"):
        sej.from_hf(d)
    err = one_line_error(["convert", "--from-hf", d, "--out", tmp_path / "o"], capsys)
    assert KEY in err and not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_float_weights_convert(src, tmp_path, dtype):
    d = foreign_copy(src["hf"], tmp_path / "f")
    rewrite_tensor(d, KEY, lambda t: t.astype(dtype))
    back = sej.to_hf(sej.from_hf(d), tmp_path / "back", dtype="float32")
    want = load_file(os.path.join(src["hf"], "model.safetensors"))[KEY].astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(load_file(os.path.join(back, "model.safetensors"))[KEY], want)


def test_nonfinite_weights_are_refused_or_warned(src, tmp_path, capsys):
    model = sej.NemotronH(CFG, rngs=nnx.Rngs(1))
    params = flat_params(model)
    path = next(p for p in params if np.asarray(params[p]).ndim == 2 and min(np.asarray(params[p]).shape) > 1)
    bad = {p: np.asarray(v) for p, v in params.items()}
    bad[path] = bad[path].copy()
    bad[path][0, 0] = np.nan
    bad[path][1, 1] = np.inf
    ck = save_params(CFG, bad, tmp_path / "nan")
    name = ".".join(map(str, path))
    with pytest.raises(CheckpointError, match=f"{name}.*2 of .* NaN or infinite"):
        load_params(ck)
    with pytest.warns(UserWarning, match="NaN or infinite"):
        _, got = load_params(ck, allow_nonfinite=True)
    assert np.isnan(np.asarray(got[path])[0, 0])
    err = one_line_error(["convert", "--ckpt", ck, "--to-hf", tmp_path / "o"], capsys)
    assert "--allow-nonfinite" in err and not os.path.exists(tmp_path / "o")
    assert main(["convert", "--ckpt", str(ck), "--to-hf", str(tmp_path / "o"), "--allow-nonfinite"]) == 0
    # the same tensor in an HF directory
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        sej.from_hf(tmp_path / "o")
    with pytest.warns(UserWarning):
        sej.from_hf(tmp_path / "o", allow_nonfinite=True)


def test_saving_an_int_parameter_is_refused(tmp_path):
    params = {p: np.asarray(v) for p, v in flat_params(sej.NemotronH(CFG, rngs=nnx.Rngs(0))).items()}
    p = next(iter(params))
    params[p] = params[p].astype(np.int32)
    with pytest.raises(CheckpointError, match="floating point"):
        save_params(CFG, params, tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("field", sorted({f for fs in _HF_REQUIRED.values() for f in fs}))
def test_config_json_missing_a_shape_field_names_it(src, tmp_path, field, capsys):
    d = tmp_path / "cfg"
    d.mkdir()
    cfg = json.load(open(os.path.join(src["hf"], "config.json")))
    assert field in cfg
    del cfg[field]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=f"{field}='missing'"):
        sej.ModelConfig.from_hf(d)
    err = one_line_error(["info", "--config", d], capsys)
    assert field in err


def test_required_fields_follow_the_pattern():
    """A pattern without attention needs no attention head counts."""
    raw = CFG.to_hf()
    raw.update(hybrid_override_pattern="ME-M")
    for k in _HF_REQUIRED["*"]:
        raw.pop(k)
    assert sej.ModelConfig.from_hf(raw).hybrid_override_pattern == "ME-M"


# ---------------------------------------------------------------------------------------------- item 5
@pytest.mark.parametrize("size", ["5XB", "0", "-1", "GB", "abc"])
def test_bad_max_shard_size_is_one_line_before_any_work(src, tmp_path, size, capsys):
    for argv in (["convert", "--ckpt", src["ckpt"], "--to-hf", tmp_path / "o"],
                 ["export-hf", "--ckpt", src["ckpt"], "--out", tmp_path / "o"],
                 ["slice", "--hf", "--ckpt", src["el"], "--budget", "small", "--out", tmp_path / "o"]):
        err = one_line_error([*argv, "--max-shard-size", size], capsys)
        assert "--max-shard-size" in err
    err = one_line_error(["--in", src["elhf"], "--budget", "small", "--out", tmp_path / "o", "--max-shard-size", size],
                         capsys, main_fn=torch_slicer.main)
    assert "--max-shard-size" in err
    assert not os.path.exists(tmp_path / "o")


def test_parse_size_units():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("1e9") == 10**9
    assert parse_size(1024) == 1024 and parse_size(" 2 gib ") == 2 * 2**30 and parse_size("10KB") == 10_000


def test_recipe_not_matching_the_tensors_is_one_line(src, tmp_path, capsys):
    d = tmp_path / "elhf"
    shutil.copytree(src["elhf"], d)
    cfg = json.load(open(d / "config.json"))
    spec = next(t for t in cfg["elastic"]["recipe"]["tensors"] if any(len(dim) > 1 for dim in t["dims"]))
    dim = next(dim for dim in spec["dims"] if len(dim) > 1)
    dim[0]["length"] += 1
    json.dump(cfg, open(d / "config.json", "w"))
    err = one_line_error(["--in", d, "--budget", "small", "--out", tmp_path / "o", "--no-verify"], capsys,
                         main_fn=torch_slicer.main)
    assert "add up to" in err and "does not match the weights" in err
    err = one_line_error(["--in", d, "--budget", "small", "--out", tmp_path / "o"], capsys, main_fn=torch_slicer.main)
    assert "config.json" in err  # with verification the edit is caught first
    assert not os.path.exists(tmp_path / "o")


def test_truncated_safetensors_in_the_slicer_is_one_line(src, tmp_path, capsys):
    d = tmp_path / "elhf"
    shutil.copytree(src["elhf"], d)
    f = d / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 3)
    err = one_line_error(["--in", d, "--budget", "small", "--out", tmp_path / "o", "--no-verify"], capsys,
                         main_fn=torch_slicer.main)
    assert "model.safetensors" in err and not os.path.exists(tmp_path / "o")


def test_debug_shows_the_traceback(src, tmp_path, capsys):
    assert main(["convert", "--ckpt", str(src["ckpt"]), "--to-hf", str(tmp_path / "o"), "--max-shard-size", "5XB",
                 "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error:")


def test_an_unexpected_error_is_one_line_too(src, tmp_path, capsys, monkeypatch):
    import star_elastic_jax.checkpoint.orbax as orbax_mod

    def boom(*a, **k):
        raise RuntimeError("something internal\nwith a second line")

    monkeypatch.setattr(orbax_mod, "load_model", boom)
    err = one_line_error(["convert", "--ckpt", src["ckpt"], "--to-hf", tmp_path / "o"], capsys, rc=1)
    assert "RuntimeError: something internal" in err and "--debug" in err


# ---------------------------------------------------------------------------------------------- item 6
def test_budget_below_the_smallest_choice_is_refused(src, tmp_path, capsys):
    err = one_line_error(["slice", "--ckpt", src["el"], "--budget", "0.01", "--out", tmp_path / "o"], capsys)
    assert "--budget" in err and "smallest sub-model" in err and not os.path.exists(tmp_path / "o")


def test_budget_far_from_every_choice_is_noted(src, tmp_path, capsys):
    from star_elastic_jax.checkpoint.elastic import read_elastic
    from star_elastic_jax.elastic.budget import achieved_fraction, resolve_budget

    info = read_elastic(src["el"])
    frac = achieved_fraction(CFG, resolve_budget(info, 0.9))
    assert main(["slice", "--ckpt", str(src["el"]), "--budget", "0.9", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert f"active fraction {frac:.4f}" in out
    assert ("note: asked for 0.9" in out) == (abs(frac - 0.9) > 0.05)


def test_info_flags_a_row_far_from_its_budget(capsys):
    assert main(["info", "--config", "tiny", "--budgets", "1.0,0.95,0.2"]) == 0
    out = capsys.readouterr().out
    from star_elastic_jax.elastic.budget import achieved_fraction, choice_for_budget, choice_lists_for

    lists = choice_lists_for(CFG)
    for b in (1.0, 0.95, 0.2):
        frac = achieved_fraction(CFG, choice_for_budget(CFG, b, lists))
        flagged = f"warning: budget {b} -> active fraction {frac:.4f}" in out
        assert flagged == (abs(frac - b) > 0.05), (b, frac, out)
    assert "warning: budget 0.2" in out  # the default lists stop at half of every axis


def test_library_dtypes_survive_jnp(tmp_path):
    """bf16 parameters are floating point for the checks (ml_dtypes)."""
    params = {p: jnp.asarray(v, jnp.bfloat16) for p, v in flat_params(sej.NemotronH(CFG, rngs=nnx.Rngs(0))).items()}
    ck = save_params(CFG, params, tmp_path / "bf16")
    _, got = load_params(ck)
    assert all(v.dtype == jnp.bfloat16 for v in got.values())
