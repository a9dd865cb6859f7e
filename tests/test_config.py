"""ModelConfig: exact parameter counts, HF config.json import/export, validation errors."""
from __future__ import annotations

import json
import math

import jax
import pytest
from flax import nnx

import star_elastic_jax as sej
from star_elastic_jax import ConfigError, ModelConfig
from star_elastic_jax.model.params import Buffer

from hf_fixtures import HF_CONFIGS

# SPEC 1.7 / 1.8 (ModelOpt's "31.58B / 3.58B" log) and SPEC 2.4.
NANO_TOTAL, NANO_ACTIVE = 31_577_937_344, 3_580_073_408
TINY_TOTAL = 175_560

COUNT_CONFIGS = {
    "tiny": ModelConfig.preset("tiny"),
    "small": ModelConfig.preset("small"),
    "mlp_blocks": ModelConfig.preset("tiny", hybrid_override_pattern="-M-*-E-"),
    "no_conv_bias": ModelConfig.preset("tiny", use_conv_bias=False, hybrid_override_pattern="MM*E"),
    "grouped_router": ModelConfig.preset("tiny", n_routed_experts=8, n_group=4, topk_group=2,
                                         num_experts_per_tok=3, hybrid_override_pattern="EME"),
    "attention_only": ModelConfig.preset("tiny", hybrid_override_pattern="**", num_key_value_heads=1),
}


def abstract_param_sizes(cfg: ModelConfig):
    abstract = nnx.eval_shape(lambda: sej.NemotronH(cfg, rngs=nnx.Rngs(0)))
    params = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    buffers = jax.tree.leaves(nnx.state(abstract, Buffer))
    return params, buffers


# ----------------------------------------------------------------------------- counts
def test_nano_counts_match_spec():
    cfg = ModelConfig.preset("nano-v3-30b")
    assert cfg.param_count() == sej.ParamCount(total=NANO_TOTAL, active=NANO_ACTIVE)
    assert cfg.hybrid_override_pattern.count("M") == 23 and cfg.hybrid_override_pattern.count("E") == 23
    assert [i for i, c in enumerate(cfg.hybrid_override_pattern) if c == "*"] == [5, 12, 19, 26, 33, 42]


def test_nano_eval_shape_is_abstract_and_matches_count():
    cfg = ModelConfig.preset("nano-v3-30b")
    params, buffers = abstract_param_sizes(cfg)
    assert all(isinstance(p, jax.ShapeDtypeStruct) for p in params + buffers)
    assert sum(math.prod(p.shape) for p in params) == NANO_TOTAL
    # one fp32 e_score_correction_bias buffer of 128 per MoE block, not counted as a parameter
    assert [tuple(b.shape) for b in buffers] == [(128,)] * 23 and all(b.dtype == "float32" for b in buffers)


def test_tiny_total_matches_spec():
    assert ModelConfig.preset("tiny").param_count().total == TINY_TOTAL


@pytest.mark.parametrize("name", sorted(COUNT_CONFIGS))
def test_param_count_equals_module_tree(name):
    cfg = COUNT_CONFIGS[name]
    params, _ = abstract_param_sizes(cfg)
    assert cfg.param_count().total == sum(math.prod(p.shape) for p in params)


@pytest.mark.parametrize("name", sorted(COUNT_CONFIGS))
def test_active_count_formula(name):
    """active = total - (E - k) routed experts of 2*F*H weights in every MoE block."""
    cfg = COUNT_CONFIGS[name]
    n_moe = cfg.hybrid_override_pattern.count("E")
    inactive = n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * 2 * cfg.moe_intermediate_size \
        * cfg.hidden_size
    c = cfg.param_count()
    assert c.active == c.total - inactive


def _hf_numel(kwargs) -> int:
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    with torch.device("meta"):
        model = NemotronHForCausalLM(NemotronHConfig(**kwargs))
    return sum(p.numel() for p in model.parameters())  # parameters only: the bias is a buffer


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_param_count_equals_transformers(name):
    kw = HF_CONFIGS[name]
    ours = ModelConfig.from_hf(kw).param_count().total
    assert ours == _hf_numel(kw)
    if name == "A":
        assert ours == TINY_TOTAL


def test_tiny_preset_equals_spec_hf_config():
    ours = ModelConfig.preset("tiny")
    spec = ModelConfig.from_hf(HF_CONFIGS["A"])
    for f in HF_CONFIGS["A"]:
        assert getattr(ours, f) == getattr(spec, f), f


# ----------------------------------------------------------------------------- HF config.json
def test_from_hf_accepts_dir_file_and_dict(tmp_path):
    from transformers import NemotronHConfig

    hf = NemotronHConfig(**HF_CONFIGS["B"])
    hf.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        raw = json.load(f)
    assert "hybrid_override_pattern" not in raw and "layers_block_type" in raw  # transformers 5.23 form
    cfgs = [ModelConfig.from_hf(tmp_path), ModelConfig.from_hf(tmp_path / "config.json"), ModelConfig.from_hf(raw)]
    assert cfgs[0] == cfgs[1] == cfgs[2]
    cfg = cfgs[0]
    assert cfg.hybrid_override_pattern == HF_CONFIGS["B"]["hybrid_override_pattern"]
    for field in HF_CONFIGS["B"]:
        assert getattr(cfg, field) == getattr(hf, field), field


@pytest.mark.parametrize("names", [
    ["linear_attention", "full_attention", "moe", "mlp", "linear_attention"],
    ["mamba", "attention", "moe", "mlp", "mamba"],
])
def test_layers_block_type_names(names):
    raw = dict(HF_CONFIGS["A"])
    del raw["hybrid_override_pattern"]
    raw["layers_block_type"] = names
    assert ModelConfig.from_hf(raw).hybrid_override_pattern == "M*E-M"


def test_legacy_key_aliases_match_transformers():
    """NVIDIA's older config keys (mamba_n_groups, mamba_d_conv, ...) mean what transformers says."""
    from transformers import NemotronHConfig

    raw = dict(HF_CONFIGS["A"])
    for new in ("n_groups", "conv_kernel", "chunk_size", "use_conv_bias"):
        raw.pop(new, None)
    raw.update(mamba_n_groups=4, mamba_d_conv=3, mamba_chunk_size=16, mamba_conv_bias=False)
    hf = NemotronHConfig(**raw)
    ours = ModelConfig.from_hf(raw)
    for f in ("n_groups", "conv_kernel", "chunk_size", "use_conv_bias"):
        assert getattr(ours, f) == getattr(hf, f), f
    assert (ours.n_groups, ours.conv_kernel, ours.chunk_size, ours.use_conv_bias) == (4, 3, 16, False)


def test_to_hf_writes_pattern_and_transformers_reads_it(tmp_path):
    from transformers import NemotronHConfig

    cfg = ModelConfig.preset("small")
    written = cfg.to_hf(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f) == json.loads(json.dumps(written))
    assert written["hybrid_override_pattern"] == cfg.hybrid_override_pattern
    for runtime in ("compute_dtype", "dt_clamp_min", "ssd_impl", "moe_impl"):
        assert runtime not in written
    hf = NemotronHConfig.from_pretrained(tmp_path)
    assert hf.hybrid_override_pattern == cfg.hybrid_override_pattern
    for f in ("hidden_size", "n_groups", "mamba_num_heads", "num_key_value_heads", "n_routed_experts",
              "moe_shared_expert_intermediate_size", "routed_scaling_factor", "chunk_size"):
        assert getattr(hf, f) == getattr(cfg, f), f
    assert ModelConfig.from_hf(tmp_path) == cfg


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("changes,field", [
    (dict(hybrid_override_pattern="M*X"), "hybrid_override_pattern"),
    (dict(hybrid_override_pattern=""), "hybrid_override_pattern"),
    (dict(mamba_num_heads=8, n_groups=3), "n_groups"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(n_routed_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(n_routed_experts=8, n_group=2, topk_group=3), "topk_group"),
    (dict(n_routed_experts=8, n_group=3), "n_group"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(compute_dtype="float16"), "compute_dtype"),
    (dict(moe_impl="nope"), "moe_impl"),
])
def test_invalid_config(changes, field):
    with pytest.raises(ConfigError) as ei:
        ModelConfig.preset("tiny", **changes)
    assert isinstance(ei.value, ValueError)
    assert ei.value.field == field and field in str(ei.value)


def test_with_updates_validates():
    with pytest.raises(ConfigError) as ei:
        ModelConfig.preset("tiny").with_updates(num_key_value_heads=3)
    assert ei.value.field == "num_key_value_heads"


def test_unknown_preset():
    with pytest.raises(ConfigError) as ei:
        ModelConfig.preset("huge")
    assert "tiny" in str(ei.value)


def _write(tmp_path, text) -> str:
    p = tmp_path / "config.json"
    p.write_text(text)
    return str(tmp_path)


def test_malformed_json(tmp_path):
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_hf(_write(tmp_path, '{"hidden_size": 64,'))
    assert "config.json" in str(ei.value)


def test_json_not_an_object(tmp_path):
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_hf(_write(tmp_path, "[1, 2]"))
    assert "config.json" in str(ei.value)


def test_missing_pattern(tmp_path):
    raw = dict(HF_CONFIGS["A"])
    del raw["hybrid_override_pattern"]
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_hf(_write(tmp_path, json.dumps(raw)))
    assert "hybrid_override_pattern" in str(ei.value) and "layers_block_type" in str(ei.value)


@pytest.mark.parametrize("field,value", [
    ("hidden_size", "64"), ("hidden_size", 64.0), ("mamba_num_heads", True), ("time_step_min", "0.001"),
    ("hybrid_override_pattern", ["M", "*"]), ("layers_block_type", "M*ME-M"),
    # booleans given as strings must not be silently truthy ("false" would mean True)
    ("norm_topk_prob", "false"), ("use_conv_bias", "no"),
])
def test_wrong_type(tmp_path, field, value):
    raw = dict(HF_CONFIGS["A"])
    if field == "layers_block_type":
        del raw["hybrid_override_pattern"]
    raw[field] = value
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_hf(_write(tmp_path, json.dumps(raw)))
    assert ei.value.field == field and field in str(ei.value)


def test_unknown_layer_type_name():
    raw = dict(HF_CONFIGS["A"])
    del raw["hybrid_override_pattern"]
    raw["layers_block_type"] = ["mamba", "transformer"]
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_hf(raw)
    assert ei.value.field == "layers_block_type" and "transformer" in str(ei.value)


@pytest.mark.parametrize("field,value", [("model_type", "llama"), ("moe_latent_size", 512),
                                         ("tie_word_embeddings", True), ("mamba_proj_bias", True)])
def test_unsupported_hf_features(field, value):
    raw = dict(HF_CONFIGS["A"], **{field: value})
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_hf(raw)
    assert ei.value.field == field
