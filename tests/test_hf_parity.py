"""HF transformers 5.23.0 NemotronH <-> star_elastic_jax: logits parity and bit-exact checkpoint round trips.

Reference: transformers' own PyTorch ``NemotronHForCausalLM`` (torch fallback path, fp32) with random,
deliberately perturbed weights, so that any mis-mapped / transposed / mis-split tensor shows up.
"""
from __future__ import annotations

import json
import os
import shutil
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as torch_save_file
from transformers import NemotronHConfig, NemotronHForCausalLM

import star_elastic_jax as sej
from star_elastic_jax.errors import CheckpointError, ConfigError
from star_elastic_jax.model.params import Buffer

from hf_fixtures import (HF_CONFIGS, SEQ_LEN, assert_tensors_bit_exact, forward, hf_logits, make_hf_model,
                         read_safetensors_dir)

REL_TOL = 1e-4  # max |ours - HF| <= REL_TOL * max |logits_HF| (fp32 on both sides)


def assert_logits_close(got, want):
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = float(np.abs(want).max())
    assert scale > 0.5, "reference logits are degenerate; the test would be too weak"
    err = float(np.abs(got - want).max())
    assert err <= REL_TOL * scale, f"max abs diff {err:.3e} > {REL_TOL:g} * {scale:.3f}"


def flat_params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def load_hf(path) -> NemotronHForCausalLM:
    m = NemotronHForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert all(p.dtype == torch.float32 for p in m.parameters())
    return m


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def case(request, tmp_path_factory):
    name = request.param
    seed = {"A": 0, "B": 1, "C": 2}[name]
    hf = make_hf_model(name, seed=seed)
    root = tmp_path_factory.mktemp(f"hf_{name}")
    fp32_dir = str(root / "fp32")
    hf.save_pretrained(fp32_dir)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, HF_CONFIGS[name]["vocab_size"], size=(2, SEQ_LEN[name]))
    want = hf_logits(hf, tokens)
    ours = sej.from_hf(fp32_dir)
    got = forward(ours, tokens)
    return types.SimpleNamespace(name=name, hf=hf, root=root, fp32_dir=fp32_dir, tokens=tokens, want=want,
                                 ours=ours, got=got)


def test_configs_cover_the_required_features():
    """Guard on the fixture itself: the three configs together exercise every feature the parity
    tests are meant to cover (every block type, grouped B/C, GQA, group-limited routing...)."""
    cfgs = {n: NemotronHConfig(**kw) for n, kw in HF_CONFIGS.items()}
    assert set("".join(c.hybrid_override_pattern for c in cfgs.values())) == set("M*E-")
    assert any(c.n_groups > 1 for c in cfgs.values())
    assert any(c.num_key_value_heads < c.num_attention_heads for c in cfgs.values())
    assert any(c.n_group > 1 and c.topk_group < c.n_group for c in cfgs.values())
    assert any(not c.norm_topk_prob for c in cfgs.values())
    assert any(not c.use_conv_bias for c in cfgs.values())
    assert any(SEQ_LEN[n] % c.chunk_size for n, c in cfgs.items())
    assert SEQ_LEN["A"] == 21 and cfgs["A"].chunk_size == 8
    assert cfgs["A"].layers_block_type == ["linear_attention", "full_attention", "linear_attention", "moe", "mlp",
                                           "linear_attention"]


def test_hf_to_ours_logits(case):
    assert case.got.dtype == np.float32
    assert case.got.shape == (2, SEQ_LEN[case.name], HF_CONFIGS[case.name]["vocab_size"])
    assert_logits_close(case.got, case.want)


def test_perturbed_bias_matters(case):
    """Sanity check of the fixture: the randomised e_score_correction_bias changes HF's routing,
    so a loader that dropped it (or used it in the weights) would fail the parity test."""
    hf = case.hf
    saved = {n: b.clone() for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias")}
    assert saved and all(float(b.abs().max()) > 0.01 for b in saved.values())
    try:
        with torch.no_grad():
            for n, b in hf.named_buffers():
                if n in saved:
                    b.zero_()
        zeroed = hf_logits(hf, case.tokens)
    finally:
        with torch.no_grad():
            for n, b in hf.named_buffers():
                if n in saved:
                    b.copy_(saved[n])
    assert np.abs(zeroed - case.want).max() > 100 * REL_TOL * np.abs(case.want).max()


def test_ours_to_hf_logits(case, tmp_path):
    out = sej.to_hf(case.ours, tmp_path / "ours", dtype="float32")
    hf2 = load_hf(out)
    for name, b in hf2.named_buffers():
        if name.endswith("e_score_correction_bias"):
            assert b.dtype == torch.float32
    assert_logits_close(hf_logits(hf2, case.tokens), case.got)


def test_default_export_is_lossless(case, tmp_path):
    """fp32 HF -> from_hf -> to_hf() with its defaults -> transformers gives the original logits
    (<= 1e-6 relative): the default keeps every parameter's dtype, like save_pretrained."""
    out = sej.to_hf(case.ours, tmp_path / "default")
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "float32"
    got = hf_logits(load_hf(out), case.tokens)
    scale = float(np.abs(case.want).max())
    assert float(np.abs(got - case.want).max()) <= 1e-6 * scale
    assert_tensors_bit_exact(read_safetensors_dir(out), read_safetensors_dir(case.fp32_dir))


def test_roundtrip_fp32_bit_exact(case, tmp_path):
    out = sej.to_hf(case.ours, tmp_path / "rt32", dtype="float32")
    assert_tensors_bit_exact(read_safetensors_dir(out), read_safetensors_dir(case.fp32_dir))


@pytest.fixture(scope="module")
def bf16_dir(case):
    """A bf16 HF checkpoint the way transformers writes one (bias kept fp32, like NVIDIA's)."""
    path = str(case.root / "bf16")
    if not os.path.isdir(path):
        NemotronHForCausalLM.from_pretrained(case.fp32_dir, dtype=torch.bfloat16).save_pretrained(path)
    return path


def test_roundtrip_bf16_bit_exact(case, bf16_dir, tmp_path):
    original = read_safetensors_dir(bf16_dir)
    bias_keys = [k for k in original if k.endswith("e_score_correction_bias")]
    assert bias_keys and all(original[k].dtype == torch.float32 for k in bias_keys)
    assert sum(t.dtype == torch.bfloat16 for t in original.values()) == len(original) - len(bias_keys)

    # dtype=None keeps the stored dtypes: bf16 params, fp32 bias buffer.
    ours = sej.from_hf(bf16_dir, dtype=None)
    for path, var in nnx.to_flat_state(nnx.state(ours)):
        want = jnp.float32 if isinstance(var, Buffer) else jnp.bfloat16
        assert var.get_value().dtype == want, path
    out = sej.to_hf(ours, tmp_path / "keep", dtype="bfloat16")
    assert_tensors_bit_exact(read_safetensors_dir(out), original)

    # fp32 master weights: bf16 -> fp32 -> bf16 is exact too.
    ours32 = sej.from_hf(bf16_dir, dtype=jnp.float32)
    assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(ours32)))
    out = sej.to_hf(ours32, tmp_path / "master", dtype="bfloat16")
    assert_tensors_bit_exact(read_safetensors_dir(out), original)


def test_naive_bf16_cast_keeps_bias_fp32(tmp_path):
    """``model.to(torch.bfloat16).save_pretrained`` stores the bias as bf16; we load it as fp32 and
    write it back as fp32 (the NVIDIA / transformers-from_pretrained layout) with the same value."""
    hf = make_hf_model("A", seed=5).to(torch.bfloat16)
    src = str(tmp_path / "naive")
    hf.save_pretrained(src)
    original = read_safetensors_dir(src)
    bias_keys = [k for k in original if k.endswith("e_score_correction_bias")]
    assert bias_keys and all(original[k].dtype == torch.bfloat16 for k in bias_keys)
    ours = sej.from_hf(src, dtype=None)
    moe = ours.layers[3].mixer
    assert moe.e_score_correction_bias[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(moe.e_score_correction_bias[...]),
                                  original[bias_keys[0]].float().numpy())
    written = read_safetensors_dir(sej.to_hf(ours, tmp_path / "out", dtype="bfloat16"))
    for k in bias_keys:
        assert written[k].dtype == torch.float32
        written[k] = written[k].to(torch.bfloat16)  # exact: the values came from bf16
    assert_tensors_bit_exact(written, original)


def test_transformers_in_memory_layout(case, tmp_path):
    """A safetensors file of ``model.state_dict()`` (``model.`` prefix, fused 3-D experts)."""
    sd = {k: v.detach().contiguous().clone() for k, v in case.hf.state_dict().items()}
    fused = [k for k in sd if k.endswith("mixer.experts.up_proj")]
    assert fused and sd[fused[0]].ndim == 3 and all(k.startswith(("model.", "lm_head.")) for k in sd)
    d = tmp_path / "inmem"
    d.mkdir()
    torch_save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(case.fp32_dir, "config.json"), d / "config.json")
    loaded = sej.from_hf(d)
    want, got = flat_params(case.ours), flat_params(loaded)
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
    assert_logits_close(forward(loaded, case.tokens), case.want)


def test_sharded_write(case, tmp_path):
    out = sej.to_hf(case.ours, tmp_path / "sharded", dtype="float32", max_shard_size=20_000)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(shards)
    for s in shards:  # each shard respects the limit unless it holds a single larger tensor
        tensors = load_file(os.path.join(out, s))
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 20_000
    assert_tensors_bit_exact(read_safetensors_dir(out), read_safetensors_dir(case.fp32_dir))
    assert_logits_close(hf_logits(load_hf(out), case.tokens), case.want)
    back = flat_params(sej.from_hf(out))
    for k, v in flat_params(case.ours).items():
        np.testing.assert_array_equal(back[k], v, err_msg=str(k))


def test_written_config_json(case, tmp_path):
    out = sej.to_hf(case.ours, tmp_path / "cfg", dtype="float32")
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    kw = HF_CONFIGS[case.name]
    assert written["hybrid_override_pattern"] == kw["hybrid_override_pattern"]
    assert written["model_type"] == "nemotron_h"
    hf_cfg = NemotronHConfig.from_pretrained(out)
    ref = NemotronHConfig(**kw)
    assert hf_cfg.layers_block_type == ref.layers_block_type
    for field in kw:
        if field != "hybrid_override_pattern":
            assert getattr(hf_cfg, field) == getattr(ref, field), field


# ----------------------------------------------------------------------------- bad checkpoints
@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("good") / "ckpt")
    make_hf_model("A", seed=7).save_pretrained(d)
    return d


def _variant(good_dir, tmp_path, edit) -> str:
    d = tmp_path / "bad"
    d.mkdir()
    shutil.copy(os.path.join(good_dir, "config.json"), d / "config.json")
    tensors = load_file(os.path.join(good_dir, "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return str(d)


def test_good_dir_loads(good_dir):
    """The variants below differ from this directory only by the stated defect; it loads, with every
    tensor equal to the file's, and gives transformers' logits."""
    model = sej.from_hf(good_dir)
    hf = load_hf(good_dir)
    tokens = np.random.default_rng(7).integers(0, 256, size=(1, 21))
    assert_logits_close(forward(model, tokens), hf_logits(hf, tokens))
    stored = load_file(os.path.join(good_dir, "model.safetensors"))
    np.testing.assert_array_equal(np.asarray(model.lm_head[...]), stored["lm_head.weight"])
    np.testing.assert_array_equal(np.asarray(model.embeddings[...]), stored["backbone.embeddings.weight"])


@pytest.mark.parametrize("key", ["backbone.layers.3.mixer.experts.2.down_proj.weight",
                                 "backbone.layers.0.mixer.conv1d.bias",
                                 "backbone.layers.3.mixer.gate.e_score_correction_bias",
                                 "lm_head.weight"])
def test_missing_tensor(good_dir, tmp_path, key):
    d = _variant(good_dir, tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as ei:
        sej.from_hf(d)
    assert isinstance(ei.value, ValueError) and not isinstance(ei.value, KeyError)
    assert ei.value.field == key and key in str(ei.value)


@pytest.mark.parametrize("key,shape", [("backbone.layers.1.mixer.k_proj.weight", (64, 64)),
                                       ("backbone.layers.0.mixer.conv1d.weight", (192, 4)),
                                       ("backbone.layers.0.mixer.in_proj.weight", (320, 64))])
def test_wrong_shape(good_dir, tmp_path, key, shape):
    d = _variant(good_dir, tmp_path, lambda t: t.__setitem__(key, np.zeros(shape, np.float32)))
    with pytest.raises(CheckpointError) as ei:
        sej.from_hf(d)
    assert ei.value.field == key and key in str(ei.value)
    assert tuple(ei.value.value) == shape


def test_extra_tensor(good_dir, tmp_path):
    key = "backbone.layers.4.mixer.gate_proj.weight"
    d = _variant(good_dir, tmp_path, lambda t: t.__setitem__(key, np.zeros((128, 64), np.float32)))
    with pytest.raises(CheckpointError) as ei:
        sej.from_hf(d)
    assert key in str(ei.value)


def test_mtp_tensors_are_ignored(good_dir, tmp_path):
    """transformers ignores ``mtp.*`` (``_keys_to_ignore_on_load_unexpected``); so do we."""
    d = _variant(good_dir, tmp_path, lambda t: t.__setitem__("mtp.layers.0.norm.weight", np.ones(64, np.float32)))
    want = flat_params(sej.from_hf(good_dir))
    got = flat_params(sej.from_hf(d))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_pickle_only_dir(good_dir, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(os.path.join(good_dir, "config.json"), d / "config.json")
    torch.save({k: torch.from_numpy(v) for k, v in load_file(os.path.join(good_dir, "model.safetensors")).items()},
               d / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as ei:
        sej.from_hf(d)
    assert "pytorch_model.bin" in str(ei.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated_header", "truncated_data"])
def test_corrupt_safetensors_file(good_dir, tmp_path, damage):
    """A damaged model.safetensors is a CheckpointError naming the file, not a raw SafetensorError."""
    d = tmp_path / "corrupt"
    d.mkdir()
    shutil.copy(os.path.join(good_dir, "config.json"), d / "config.json")
    with open(os.path.join(good_dir, "model.safetensors"), "rb") as f:
        data = f.read()
    data = {"garbage": b"not a safetensors file\n", "truncated_header": data[:64],
            "truncated_data": data[:-1000]}[damage]
    (d / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError) as ei:
        sej.from_hf(d)
    assert "model.safetensors" in str(ei.value)


@pytest.fixture(scope="module")
def good_model(good_dir):
    return sej.from_hf(good_dir)


def test_corrupt_shard(good_model, tmp_path):
    out = sej.to_hf(good_model, tmp_path / "sh", dtype="float32", max_shard_size=20_000)
    victim = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[1]
    with open(os.path.join(out, victim), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError) as ei:
        sej.from_hf(out)
    assert victim in str(ei.value)


def test_index_with_missing_shard(good_model, tmp_path):
    out = sej.to_hf(good_model, tmp_path / "sh", dtype="float32", max_shard_size=20_000)
    victim = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(out, victim))
    with pytest.raises(CheckpointError) as ei:
        sej.from_hf(out)
    assert victim in str(ei.value)


def test_missing_config_json(good_dir, tmp_path):
    d = tmp_path / "nocfg"
    d.mkdir()
    shutil.copy(os.path.join(good_dir, "model.safetensors"), d / "model.safetensors")
    with pytest.raises(ConfigError) as ei:
        sej.from_hf(d)
    assert "config.json" in str(ei.value)
