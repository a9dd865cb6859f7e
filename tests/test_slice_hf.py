"""Elastic HF export + the PyTorch-only slicer (star_elastic_jax/export/slice_hf.py).

The slicer interprets the recipe (generated from the axes table and the HF key table) without any
knowledge of Nemotron-H; slicing in JAX (``slice_model`` then ``to_hf``) must give bit-identical
tensors, and transformers must run the result with our sliced model's logits.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import star_elastic_jax as sej  # noqa: E402
from star_elastic_jax.export.elastic import slice_checkpoint  # noqa: E402
from star_elastic_jax.checkpoint.orbax import load_model  # noqa: E402
from star_elastic_jax.cli import main  # noqa: E402
from star_elastic_jax.export.hf_recipe import build_recipe  # noqa: E402

from hf_fixtures import assert_tensors_bit_exact, forward, random_model, read_safetensors_dir  # noqa: E402

SLICER = os.path.join(os.path.dirname(sej.__file__), "export", "slice_hf.py")
DEPTH_ORDER = (4, 1, 0, 2, 3, 5)  # blocks dropped first: 4 (the '-' block), then 1 (attention)
BUDGETS = {
    "full": sej.ElasticChoice(),
    # every width axis at once
    "w1": sej.ElasticChoice(hidden=48, mamba_heads=4, attn_heads=2, experts=3, expert_ffn=24, mlp_ffn=96),
    # other sizes (3 of 4 heads per Mamba group; E' = top-k)
    "w2": sej.ElasticChoice(hidden=32, mamba_heads=6, experts=2, expert_ffn=16, mlp_ffn=64),
    # depth: drops blocks 4 and 1, renumbers the rest (pattern M*ME-M -> MMEM)
    "deep": sej.ElasticChoice(hidden=48, depth=4, expert_ffn=16, mamba_heads=4),
    "het": sej.ElasticChoice(mamba_heads=(8, 4, 6), expert_ffn=(24,)),
}
HOMOGENEOUS = ["full", "w1", "w2", "deep"]
REL_TOL = 1e-4


def _load_slicer():
    spec = importlib.util.spec_from_file_location("slice_hf_under_test", SLICER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def slicer():
    return _load_slicer()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny parent (every leaf random, e_score_correction_bias included), saved as an elastic
    checkpoint and exported to HF with the elastic block in fp32 and bf16."""
    root = tmp_path_factory.mktemp("slice_hf")
    cfg = sej.ModelConfig.preset("tiny")
    model = random_model(cfg, seed=7)
    model.depth_order = DEPTH_ORDER
    bias = np.asarray(model.layers[3].mixer.e_score_correction_bias.get_value())
    assert np.abs(bias).max() > 0.01  # randomised, so expert selection depends on it
    ckpt = str(root / "elastic")
    sej.save_elastic(model, ckpt, BUDGETS, router_state={"hidden": {"w": np.arange(6, dtype=np.float32)}})
    exports = {}
    for dtype in ("float32", "bfloat16"):
        exports[dtype] = str(root / f"export-{dtype}")
        assert main(["export-hf", "--ckpt", ckpt, "--elastic", "--out", exports[dtype], "--dtype", dtype]) == 0
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 13))
    return dict(root=root, cfg=cfg, model=model, ckpt=ckpt, exports=exports, tokens=tokens)


def test_export_has_elastic_block_and_recipe(setup):
    cfg_json = json.load(open(os.path.join(setup["exports"]["float32"], "config.json")))
    block = cfg_json["elastic"]
    assert block["permuted"] is True and block["format_version"] == 1
    assert set(block["budgets"]) == set(BUDGETS)
    assert block["budgets"]["het"]["hf_exportable"] is False
    assert all(block["budgets"][n]["hf_exportable"] for n in HOMOGENEOUS)
    w1 = block["budgets"]["w1"]
    assert w1["config"]["hidden_size"] == 48 and w1["config"]["mamba_num_heads"] == 4
    assert w1["config"]["n_routed_experts"] == 3 and w1["config"]["moe_intermediate_size"] == 24
    assert w1["config"]["intermediate_size"] == 96 and w1["config"]["num_attention_heads"] == 2
    pc = sej.ModelConfig.preset("tiny").param_count(BUDGETS["w1"])
    assert (w1["total_params"], w1["active_params"]) == (pc.total, pc.active)
    assert block["budgets"]["deep"]["config"]["hybrid_override_pattern"] == "MMEM"
    assert block["recipe"]["size_fields"]["mamba_heads"] == "mamba_num_heads"
    assert os.path.isfile(os.path.join(setup["exports"]["float32"], "elastic_router.safetensors"))
    # the exported parent is a plain nemotron_h checkpoint too (the elastic block is ignored on import)
    assert sej.from_hf(setup["exports"]["float32"]).cfg == setup["cfg"]


def test_recipe_matches_the_exported_tensors(setup):
    """Every recipe entry's full shape and segment lengths agree with the HF tensors it describes."""
    recipe = build_recipe(setup["cfg"])
    tensors = read_safetensors_dir(setup["exports"]["float32"])
    keys = set()
    for spec in recipe["tensors"]:
        assert [sum(s["length"] for s in segs) for segs in spec["dims"]] == spec["shape"]
        n = spec["experts"]["count"] if spec["experts"] else 1
        for e in range(n):
            key = spec["key"].format(layer=spec["layer"], expert=e if spec["experts"] else None)
            assert list(tensors[key].shape) == spec["shape"], key
            keys.add(key)
    assert keys == set(tensors)
    in_proj = next(s for s in recipe["tensors"] if s["key"].endswith("in_proj.weight"))
    assert [s["axis"] for s in in_proj["dims"][0]] == ["mamba_heads", "mamba_heads", None, "mamba_heads"]
    assert [s["unit"] for s in in_proj["dims"][0]] == [16, 16, 1, 1]


@pytest.mark.parametrize("name", HOMOGENEOUS)
def test_torch_slicer_equals_jax_slicing_and_transformers(setup, slicer, name, tmp_path):
    choice = BUDGETS[name]
    sub = sej.slice_model(setup["model"], choice)
    jax_dir = sej.to_hf(sub, tmp_path / "jax", dtype="float32")
    torch_dir = slicer.slice_hf(setup["exports"]["float32"], name, str(tmp_path / "torch"))
    assert_tensors_bit_exact(read_safetensors_dir(torch_dir), read_safetensors_dir(jax_dir))
    assert json.load(open(os.path.join(torch_dir, "config.json"))) == \
        json.load(open(os.path.join(jax_dir, "config.json"))) | {
            "elastic": {"format_version": 1, "sliced": True, "budget": name, "choice": choice.to_dict()}}
    assert not os.path.exists(os.path.join(torch_dir, "elastic_router.safetensors"))

    hf = transformers.NemotronHForCausalLM.from_pretrained(torch_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        # use_cache=False: transformers 5.23.0 cannot build a cache for a model without attention blocks
        want = hf(torch.as_tensor(setup["tokens"], dtype=torch.long), use_cache=False).logits.numpy()
    got = forward(sub, setup["tokens"])
    scale = float(np.abs(want).max())
    assert scale > 0.5
    assert float(np.abs(got - want).max()) <= REL_TOL * scale


def test_bf16_export_slices_bit_exact_with_shards(setup, slicer, tmp_path):
    sub = sej.slice_model(setup["model"], BUDGETS["w1"])
    jax_dir = sej.to_hf(sub, tmp_path / "jax", dtype="bfloat16")
    torch_dir = slicer.slice_hf(setup["exports"]["bfloat16"], "w1", str(tmp_path / "torch"), max_shard_size="20KB")
    assert os.path.isfile(os.path.join(torch_dir, "model.safetensors.index.json"))
    got = read_safetensors_dir(torch_dir)
    assert got["backbone.layers.3.mixer.gate.e_score_correction_bias"].dtype == torch.float32
    assert got["backbone.embeddings.weight"].dtype == torch.bfloat16
    assert_tensors_bit_exact(got, read_safetensors_dir(jax_dir))


def test_heterogeneous_choice(setup, slicer, tmp_path, capsys):
    sub = sej.slice_model(setup["model"], BUDGETS["het"])
    assert sub.cfg.per_layer is not None
    with pytest.raises(sej.ConfigError, match="per_layer"):
        sej.to_hf(sub, tmp_path / "hf")
    assert not os.path.exists(tmp_path / "hf")
    # Orbax slicing works and holds exactly the JAX-sliced model
    res = slice_checkpoint(setup["ckpt"], "het", tmp_path / "orbax")
    loaded = load_model(res.out)
    assert loaded.cfg.per_layer == sub.cfg.per_layer
    np.testing.assert_array_equal(np.asarray(loaded.layers[2].mixer.in_proj_x[...]),
                                  np.asarray(sub.layers[2].mixer.in_proj_x[...]))
    # the CLI --hf refuses, and so does the torch slicer (clear error, nothing written)
    assert main(["slice", "--ckpt", setup["ckpt"], "--budget", "het", "--out", str(tmp_path / "hf2"), "--hf"]) == 2
    assert "per_layer" in capsys.readouterr().err
    with pytest.raises(slicer.SliceError, match="hf_exportable"):
        slicer.slice_hf(setup["exports"]["float32"], "het", str(tmp_path / "t"))
    assert not os.path.exists(tmp_path / "t") and not os.path.exists(tmp_path / "hf2")


def test_slicer_errors(setup, slicer, tmp_path):
    export = setup["exports"]["float32"]
    with pytest.raises(slicer.SliceError, match="'nope'.*available: deep, full, het, w1, w2"):
        slicer.slice_hf(export, "nope", str(tmp_path / "x"))
    plain = sej.to_hf(setup["model"], tmp_path / "plain", dtype="float32")
    with pytest.raises(slicer.SliceError, match="not an elastic export"):
        slicer.slice_hf(plain, "w1", str(tmp_path / "x"))
    sliced = slicer.slice_hf(export, "w1", str(tmp_path / "w1"))
    with pytest.raises(slicer.SliceError, match="already a slice"):
        slicer.slice_hf(sliced, "w1", str(tmp_path / "x"))
    with pytest.raises(sej.errors.OutputError, match="lies inside the input"):
        slicer.slice_hf(export, "w1", os.path.join(export, "sub"))
    assert slicer.main(["--in", export, "--budget", "nope", "--out", str(tmp_path / "x")]) == 2
    assert not os.path.exists(tmp_path / "x")


def test_slicer_runs_without_jax(setup, tmp_path):
    """The script, run by its path, works with jax, flax and orbax made unimportable (of our package
    it imports only the standard-library modules errors/manifest/outputs)."""
    out = str(tmp_path / "nojax")
    code = ("import sys, runpy\n"
            "for m in ('jax', 'jaxlib', 'flax', 'orbax'): sys.modules[m] = None\n"
            f"sys.argv = ['slice_hf.py', '--in', {setup['exports']['float32']!r}, '--budget', 'w2', '--out', {out!r}]\n"
            f"runpy.run_path({SLICER!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    jax_dir = sej.to_hf(sej.slice_model(setup["model"], BUDGETS["w2"]), tmp_path / "jax", dtype="float32")
    assert_tensors_bit_exact(read_safetensors_dir(out), read_safetensors_dir(jax_dir))


def test_slicer_module_cli_help():
    """``python -m star_elastic_jax.export.slice_hf`` works and never imports JAX (lazy package init)."""
    code = ("import sys, runpy\n"
            "for m in ('jax', 'jaxlib', 'flax', 'orbax'): sys.modules[m] = None\n"
            "sys.argv = ['slice_hf', '--help']\n"
            "runpy.run_module('star_elastic_jax.export.slice_hf', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--budget" in proc.stdout, proc.stderr


@pytest.mark.parametrize("name, choice", [
    # n_groups=4 (Mamba prefix per group of 2 heads), GQA 6q/2kv (3 q heads per KV group), conv kernel 3
    ("B", sej.ElasticChoice(hidden=32, mamba_heads=4, attn_heads=4, expert_ffn=16, mlp_ffn=24)),
    # n_groups=1, MHA, no conv bias, two MoE blocks back to back
    ("C", sej.ElasticChoice(hidden=16, mamba_heads=3, expert_ffn=8, mlp_ffn=16)),
    # group-limited routing (6 experts in 2 groups, keep 1): experts 0, 1, 3, 4 of both MoE blocks
    ("C", sej.ElasticChoice(hidden=16, experts=4, expert_ffn=8)),
])
def test_other_configs_bit_exact(name, choice, slicer, tmp_path):
    from hf_fixtures import HF_CONFIGS

    from star_elastic_jax.export.elastic import export_elastic_hf

    cfg = sej.ModelConfig.from_hf(HF_CONFIGS[name])
    model = random_model(cfg, seed=1)
    ckpt = sej.save_elastic(model, tmp_path / "ck", {"b": choice})
    export = export_elastic_hf(ckpt, tmp_path / "export", dtype="float32")
    torch_dir = slicer.slice_hf(export, "b", str(tmp_path / "torch"))
    jax_dir = sej.to_hf(sej.slice_model(model, choice), tmp_path / "jax", dtype="float32")
    assert_tensors_bit_exact(read_safetensors_dir(torch_dir), read_safetensors_dir(jax_dir))


def test_plain_export_hf(setup, tmp_path, capsys):
    """export-hf without --elastic writes the plain model (no elastic block), from the arrays only."""
    out = str(tmp_path / "plain")
    assert main(["export-hf", "--ckpt", setup["ckpt"], "--out", out, "--dtype", "float32"]) == 0
    assert "elastic" not in json.load(open(os.path.join(out, "config.json")))
    want = sej.to_hf(setup["model"], tmp_path / "want", dtype="float32")
    assert_tensors_bit_exact(read_safetensors_dir(out), read_safetensors_dir(want))
    plain_ckpt = str(tmp_path / "plain_ckpt")
    from star_elastic_jax.checkpoint.orbax import save_model

    save_model(setup["model"], plain_ckpt)
    capsys.readouterr()
    assert main(["export-hf", "--ckpt", plain_ckpt, "--elastic", "--out", str(tmp_path / "x")]) == 2
    assert "not an elastic checkpoint" in capsys.readouterr().err
