"""The HF ``config.json`` <-> :class:`ModelConfig` mapping: field aliases of older NVIDIA configs,
unsupported features, the fields a config.json must give, the block-type names, and the JSON I/O."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from star_elastic_jax.config.blocks import _NAME_TO_CHAR, _RUNTIME_FIELDS, BLOCK_NAMES
from star_elastic_jax.errors import ConfigError

# Legacy key aliases NVIDIA's older configs use (same meaning, different name).
_HF_ALIASES = {
    "mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max", "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias", "mamba_chunk_size": "chunk_size", "mamba_dt_limit": "time_step_limit",
}
# Features of NemotronHConfig we do not implement: (field, the only supported value).
_UNSUPPORTED = {
    "use_bias": False, "mlp_bias": False, "attention_bias": False, "mamba_proj_bias": False,
    "moe_latent_size": None, "tie_word_embeddings": False, "residual_in_fp32": False,
}
# config.json fields without which the model's shapes are unknown (a default would silently build
# another model): always, and per block kind of the pattern. Names after _HF_ALIASES.
_HF_REQUIRED = {"": ("vocab_size", "hidden_size"),
                "M": ("mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size"),
                "*": ("num_attention_heads", "num_key_value_heads", "head_dim"),
                "E": ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                      "moe_shared_expert_intermediate_size"),
                "-": ("intermediate_size",)}


def config_from_hf(cls, source: str | os.PathLike | Mapping[str, Any], **runtime: Any):
    """Build from an HF ``config.json`` (a dir, a file path, or an already-parsed dict).

    Accepts ``hybrid_override_pattern`` or ``layers_block_type`` with HF 5.x names
    (linear_attention/full_attention/moe/mlp) or legacy ones (mamba/attention/moe/mlp).
    """
    raw = _read_hf_json(source)
    where = str(source) if not isinstance(source, Mapping) else "config dict"
    if raw.get("model_type", "nemotron_h") != "nemotron_h":
        raise ConfigError("model_type", raw.get("model_type"), "must be 'nemotron_h'", context=where)
    data = {_HF_ALIASES.get(k, k): v for k, v in raw.items()}
    pattern = _pattern_from_hf(data, where)
    for kind, fields in _HF_REQUIRED.items():
        if kind and kind not in pattern:
            continue
        for name in fields:
            if data.get(name) is None:
                need = "the model" if not kind else f"the pattern's {BLOCK_NAMES[kind]} blocks"
                raise ConfigError(name, "missing", f"config.json must give it: {need} cannot be built without it",
                                  context=where)
    for key, supported in _UNSUPPORTED.items():
        if key in data and data[key] not in (supported, None if supported is None else supported):
            raise ConfigError(key, data[key], f"only {supported!r} is supported by star_elastic_jax",
                              context=where)
    names = {f.name for f in dataclasses.fields(cls)} - set(_RUNTIME_FIELDS) - {"per_layer"}
    kwargs = {k: v for k, v in data.items() if k in names and k != "hybrid_override_pattern"}
    if isinstance(kwargs.get("eos_token_id"), list):
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0] if kwargs["eos_token_id"] else None
    for k in ("time_step_min", "time_step_max", "time_step_floor", "routed_scaling_factor",
              "layer_norm_epsilon", "initializer_range"):
        if k in kwargs and not isinstance(kwargs[k], (int, float)):
            raise ConfigError(k, kwargs[k], "must be a number", context=where)
    for k, v in kwargs.items():
        default = next(f.default for f in dataclasses.fields(cls) if f.name == k)
        if isinstance(default, bool) and not isinstance(v, bool):
            raise ConfigError(k, v, "must be true or false", context=where)
        if isinstance(default, int) and not isinstance(default, bool) and not (
                isinstance(v, int) and not isinstance(v, bool)) and v is not None:
            raise ConfigError(k, v, "must be an integer", context=where)
    try:
        return cls(hybrid_override_pattern=pattern, **kwargs, **runtime)
    except ConfigError as e:
        raise ConfigError(e.field, e.value, e.valid, context=where) from None


def config_to_hf(self, path: str | os.PathLike | None = None, *, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """The HF ``config.json`` dict (written to ``path`` when given: a dir or a file).

    Writes ``hybrid_override_pattern`` like NVIDIA's checkpoints (SPEC 2.2).
    """
    if self.per_layer is not None:
        raise ConfigError("per_layer", "heterogeneous per-layer sizes",
                          "HF's nemotron_h config has one size per field; export a homogeneous choice, "
                          "or keep this model in the Orbax format")
    out: dict[str, Any] = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h"}
    for f in dataclasses.fields(self):
        if f.name not in _RUNTIME_FIELDS and f.name != "per_layer":
            out[f.name] = getattr(self, f.name)
    out.update(num_hidden_layers=self.num_hidden_layers, tie_word_embeddings=False, use_bias=False,
               mlp_bias=False, attention_bias=False, mamba_proj_bias=False, moe_latent_size=None,
               residual_in_fp32=False, time_step_limit=[0.0, float("inf")], torch_dtype=torch_dtype,
               expand=2, use_cache=True)
    if path is not None:
        p = os.fspath(path)
        if os.path.isdir(p):
            p = os.path.join(p, "config.json")
        _atomic_write_json(p, out)
    return out


def _read_hf_json(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    p = os.fspath(source)
    if os.path.isdir(p):
        p = os.path.join(p, "config.json")
    if not os.path.isfile(p):
        raise ConfigError("config.json", p, "file does not exist")
    try:
        with open(p, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError("config.json", p, f"must be valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError("config.json", p, "must hold a JSON object")
    return raw


def _pattern_from_hf(data: Mapping[str, Any], where: str) -> str:
    if "hybrid_override_pattern" in data and data["hybrid_override_pattern"]:
        pattern = data["hybrid_override_pattern"]
        if not isinstance(pattern, str):
            raise ConfigError("hybrid_override_pattern", pattern, "must be a string", context=where)
        return pattern
    types = data.get("layers_block_type") or data.get("layer_types")
    if not types:
        raise ConfigError("hybrid_override_pattern", None,
                          "config.json needs 'hybrid_override_pattern' or 'layers_block_type'", context=where)
    if not isinstance(types, list):
        raise ConfigError("layers_block_type", types, "must be a list of block type names", context=where)
    try:
        return "".join(_NAME_TO_CHAR[t] for t in types)
    except (KeyError, TypeError):
        bad = [t for t in types if t not in _NAME_TO_CHAR]
        raise ConfigError("layers_block_type", bad, f"entries must be among {sorted(_NAME_TO_CHAR)}",
                          context=where) from None


def _atomic_write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
