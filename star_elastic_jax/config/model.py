"""ModelConfig: the Nemotron-H architecture as a frozen (hashable) dataclass.

Field names follow Hugging Face's ``NemotronHConfig`` so that ``config.json`` maps 1:1
(:mod:`star_elastic_jax.config.hf_json`). A handful of *runtime* fields (compute dtype, kernel
choice, dt clamp) are ours and never written to ``config.json``. All validation lives in
:meth:`ModelConfig.validate`; it runs in ``__post_init__`` so an invalid config can never reach
XLA. Counting: :mod:`star_elastic_jax.config.counting`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

from star_elastic_jax.config.blocks import BLOCK_TYPES, MOE_IMPLS, SSD_IMPLS
from star_elastic_jax.config.counting import ParamCount, count_params
from star_elastic_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Nemotron-H hyper-parameters (HF field names) plus a few runtime knobs.

    ``hybrid_override_pattern`` has one char per block: ``M`` Mamba2, ``*`` attention,
    ``E`` MoE, ``-`` dense MLP.
    """

    vocab_size: int = 131072
    hidden_size: int = 2688
    hybrid_override_pattern: str = "M*E-"
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    max_position_embeddings: int = 262144
    intermediate_size: int = 1856
    mlp_hidden_act: str = "relu2"
    ssm_state_size: int = 128
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    mamba_hidden_act: str = "silu"
    n_groups: int = 8
    conv_kernel: int = 4
    use_conv_bias: bool = True
    chunk_size: int = 128
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    mamba_ssm_cache_dtype: str = "float32"
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1856
    moe_shared_expert_intermediate_size: int = 3712
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.0173
    rescale_prenorm_residual: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0
    num_logits_to_keep: int = 1
    # Per-block sizes of a heterogeneous elastic slice (None: every block uses the global fields).
    # HF's nemotron_h config cannot express these, so to_hf refuses such configs.
    per_layer: tuple["LayerSizes", ...] | None = None
    # ---- runtime fields (ours; never written to config.json) ----
    compute_dtype: str = "float32"      # activations/matmuls: float32 | bfloat16 (params stay as stored)
    dt_clamp_min: float | None = None   # None -> time_step_min (SPEC 1.5); 0.0 reproduces the kernel path
    ssd_impl: str = "auto"              # SSD_IMPLS: auto (pallas on GPU/TPU, reference on CPU) | reference | pallas
    moe_impl: str = "auto"              # MOE_IMPLS: auto (pallas on GPU/TPU, reference on CPU) | reference | pallas
    #                                     | blocked | ragged | dense (the one-hot oracle)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_hidden_layers(self) -> int:
        return len(self.hybrid_override_pattern)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def layers_block_type(self) -> list[str]:
        return [BLOCK_TYPES[c][0] for c in self.hybrid_override_pattern]

    def layer_sizes(self, i: int) -> "LayerSizes":
        """Sizes of block ``i`` (per-layer override, else the global fields)."""
        return per_layer_sizes(self)[i]

    @property
    def effective_dt_clamp_min(self) -> float:
        return self.time_step_min if self.dt_clamp_min is None else self.dt_clamp_min

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first inconsistent field."""
        pat = self.hybrid_override_pattern
        if not isinstance(pat, str) or not pat:
            raise ConfigError("hybrid_override_pattern", pat, "a non-empty string of M * E -")
        bad = sorted({c for c in pat if c not in BLOCK_TYPES})
        if bad:
            raise ConfigError("hybrid_override_pattern", pat,
                              f"unknown character(s) {bad}; valid are 'M' (Mamba2), '*' (attention), "
                              "'E' (MoE), '-' (MLP)")
        for name in ("vocab_size", "hidden_size", "max_position_embeddings"):
            _positive(self, name)
        if "*" in pat:
            for name in ("num_attention_heads", "num_key_value_heads", "head_dim"):
                _positive(self, name)
            if self.num_attention_heads % self.num_key_value_heads:
                raise ConfigError("num_key_value_heads", self.num_key_value_heads,
                                  f"must divide num_attention_heads={self.num_attention_heads}")
        if "M" in pat:
            for name in ("mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size", "conv_kernel",
                         "chunk_size"):
                _positive(self, name)
            if self.mamba_num_heads % self.n_groups:
                raise ConfigError("n_groups", self.n_groups,
                                  f"must divide mamba_num_heads={self.mamba_num_heads}")
            if self.mamba_hidden_act != "silu":
                raise ConfigError("mamba_hidden_act", self.mamba_hidden_act, "only 'silu' is supported")
            if not (self.time_step_min >= 0 and math.isfinite(self.time_step_min)):
                raise ConfigError("time_step_min", self.time_step_min, "must be a finite number >= 0")
            if self.dt_clamp_min is not None and not (self.dt_clamp_min >= 0):
                raise ConfigError("dt_clamp_min", self.dt_clamp_min, "must be None or >= 0")
            if self.mamba_ssm_cache_dtype not in ("float32", "bfloat16", "float16"):
                raise ConfigError("mamba_ssm_cache_dtype", self.mamba_ssm_cache_dtype,
                                  "one of float32, bfloat16, float16")
        if "E" in pat:
            for name in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                         "moe_shared_expert_intermediate_size", "n_group", "topk_group"):
                _positive(self, name)
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ConfigError("num_experts_per_tok", self.num_experts_per_tok,
                                  f"must be <= n_routed_experts={self.n_routed_experts}")
            if self.n_routed_experts % self.n_group:
                raise ConfigError("n_group", self.n_group, f"must divide n_routed_experts={self.n_routed_experts}")
            if self.topk_group > self.n_group:
                raise ConfigError("topk_group", self.topk_group, f"must be <= n_group={self.n_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1 and per_group < 2:
                raise ConfigError("n_group", self.n_group,
                                  "group routing scores the top-2 experts per group, so each group needs >= 2 "
                                  f"experts (n_routed_experts={self.n_routed_experts})")
            if self.num_experts_per_tok > self.topk_group * per_group:
                raise ConfigError("num_experts_per_tok", self.num_experts_per_tok,
                                  f"must be <= topk_group*experts_per_group={self.topk_group * per_group}")
        if "-" in pat:
            _positive(self, "intermediate_size")
        if "E" in pat or "-" in pat:
            if self.mlp_hidden_act != "relu2":
                raise ConfigError("mlp_hidden_act", self.mlp_hidden_act, "only 'relu2' is supported")
        if self.per_layer is not None:
            self._validate_per_layer()
        if not self.layer_norm_epsilon > 0:
            raise ConfigError("layer_norm_epsilon", self.layer_norm_epsilon, "must be > 0")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ConfigError("compute_dtype", self.compute_dtype, "one of 'float32', 'bfloat16'")
        if self.ssd_impl not in SSD_IMPLS:
            raise ConfigError("ssd_impl", self.ssd_impl, f"one of {SSD_IMPLS}")
        if self.moe_impl not in MOE_IMPLS:
            raise ConfigError("moe_impl", self.moe_impl, f"one of {MOE_IMPLS}")

    def _validate_per_layer(self) -> None:
        pl = self.per_layer
        if not isinstance(pl, tuple) or len(pl) != self.num_hidden_layers:
            raise ConfigError("per_layer", pl, f"a tuple of {self.num_hidden_layers} LayerSizes (one per block)")
        for i, (s, ch) in enumerate(zip(pl, self.hybrid_override_pattern)):
            field = f"per_layer[{i}]"
            if not isinstance(s, LayerSizes) or s.kind != ch:
                raise ConfigError(field, s, f"LayerSizes with kind {ch!r} (the pattern's block {i})")
            if ch == "M" and (s.mamba_heads <= 0 or s.mamba_heads % self.n_groups):
                raise ConfigError(f"{field}.mamba_heads", s.mamba_heads,
                                  f"a positive multiple of n_groups={self.n_groups}")
            if ch == "*" and (s.attn_heads <= 0 or s.attn_heads % self.num_key_value_heads):
                raise ConfigError(f"{field}.attn_heads", s.attn_heads,
                                  f"a positive multiple of num_key_value_heads={self.num_key_value_heads}")
            if ch == "E":
                if s.experts < self.num_experts_per_tok or s.experts % self.n_group:
                    raise ConfigError(f"{field}.experts", s.experts,
                                      f">= num_experts_per_tok={self.num_experts_per_tok} and a multiple of "
                                      f"n_group={self.n_group}")
                per_group = s.experts // self.n_group
                if self.n_group > 1 and (per_group < 2 or self.topk_group * per_group < self.num_experts_per_tok):
                    raise ConfigError(f"{field}.experts", s.experts,
                                      f">= 2 per routing group (n_group={self.n_group}) and topk_group * experts per "
                                      f"group >= num_experts_per_tok={self.num_experts_per_tok}")
                if s.expert_ffn <= 0:
                    raise ConfigError(f"{field}.expert_ffn", s.expert_ffn, "a positive integer")
            if ch == "-" and s.mlp_ffn <= 0:
                raise ConfigError(f"{field}.mlp_ffn", s.mlp_ffn, "a positive integer")

    # ------------------------------------------------------------------ counting
    def param_count(self, choice: Any = None) -> ParamCount:
        """Exact total and active parameter counts (SPEC 1.8), computed arithmetically.

        ``e_score_correction_bias`` is a buffer and is not counted. ``choice`` (an
        ``ElasticChoice``, or anything whose ``resolve(cfg)`` gives per-block sizes, a hidden size and
        the kept blocks) counts a nested sub-model; ``None`` counts the full model. Duck-typed, so
        the config layer needs nothing from ``elastic`` (the layer above it).
        """
        if choice is None:
            return count_params(self, per_layer_sizes(self))
        if not callable(getattr(choice, "resolve", None)):
            raise ConfigError("choice", type(choice).__name__, "an ElasticChoice (or None for the full model)")
        r = choice.resolve(self)
        return count_params(self, r.layer_sizes, hidden=r.hidden, keep=r.keep)

    def to_dict(self) -> dict[str, Any]:
        """Every field, runtime ones included (our own JSON form, not HF's)."""
        d = dataclasses.asdict(self)
        if self.per_layer is not None:
            d["per_layer"] = [dataclasses.asdict(s) for s in self.per_layer]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError("model_config", unknown, f"unknown field(s); valid fields are {sorted(names)}")
        data = dict(data)
        if data.get("per_layer") is not None:
            data["per_layer"] = tuple(LayerSizes(**s) for s in data["per_layer"])
        return cls(**data)

    def with_updates(self, **changes: Any) -> "ModelConfig":
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any], **runtime: Any) -> "ModelConfig":
        """Build from an HF ``config.json`` (a dir, a file path, or an already-parsed dict).

        Accepts ``hybrid_override_pattern`` or ``layers_block_type`` with HF 5.x names
        (linear_attention/full_attention/moe/mlp) or legacy ones (mamba/attention/moe/mlp); the
        mapping lives in :mod:`star_elastic_jax.config.hf_json`.
        """
        from star_elastic_jax.config.hf_json import config_from_hf

        return config_from_hf(cls, source, **runtime)

    def to_hf(self, path: str | os.PathLike | None = None, *, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """The HF ``config.json`` dict (written to ``path`` when given: a dir or a file).

        Writes ``hybrid_override_pattern`` like NVIDIA's checkpoints (SPEC 2.2).
        """
        from star_elastic_jax.config.hf_json import config_to_hf

        return config_to_hf(self, path, torch_dtype=torch_dtype)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **changes: Any) -> "ModelConfig":
        """A named preset: ``tiny`` (CPU tests), ``small`` (benchmarks), ``nano-v3-30b``."""
        if name not in PRESETS:
            raise ConfigError("preset", name, f"one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **changes})

    @classmethod
    def load(cls, spec: str, **runtime: Any) -> "ModelConfig":
        """A preset name, or a path to an HF config.json / checkpoint dir."""
        if spec in PRESETS:
            return cls.preset(spec, **runtime)
        if os.path.exists(spec):
            return cls.from_hf(spec, **runtime)
        raise ConfigError("config", spec, f"a preset ({', '.join(sorted(PRESETS))}) or an existing path")


def _positive(cfg: ModelConfig, name: str) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(name, v, "must be a positive integer")


@dataclasses.dataclass(frozen=True)
class LayerSizes:
    """Sizes of one block that elastic slicing can change (full model: the config's)."""

    kind: str  # pattern char
    mamba_heads: int = 0
    attn_heads: int = 0
    experts: int = 0
    expert_ffn: int = 0
    mlp_ffn: int = 0


def per_layer_sizes(cfg: ModelConfig) -> list[LayerSizes]:
    """The per-block sizes (the per-layer override when present, else the global fields)."""
    if cfg.per_layer is not None:
        return list(cfg.per_layer)
    out = []
    for ch in cfg.hybrid_override_pattern:
        out.append(LayerSizes(kind=ch, mamba_heads=cfg.mamba_num_heads, attn_heads=cfg.num_attention_heads,
                              experts=cfg.n_routed_experts, expert_ffn=cfg.moe_intermediate_size,
                              mlp_ffn=cfg.intermediate_size))
    return out


# ---------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # SPEC 2.4: the CI fixture transformers itself builds (175,560 parameters).
    "tiny": dict(vocab_size=256, hidden_size=64, hybrid_override_pattern="M*ME-M", num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2,
                 ssm_state_size=16, conv_kernel=4, chunk_size=8, intermediate_size=128, n_routed_experts=4,
                 num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
                 n_group=1, topk_group=1, routed_scaling_factor=2.5, max_position_embeddings=4096,
                 initializer_range=0.02),
    "small": dict(vocab_size=4096, hidden_size=512, hybrid_override_pattern="MEMEM*EMEMEM*E",
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, mamba_num_heads=16, mamba_head_dim=64,
                  n_groups=4, ssm_state_size=64, conv_kernel=4, chunk_size=128, intermediate_size=1024,
                  n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                  moe_shared_expert_intermediate_size=512, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                  max_position_embeddings=65536, initializer_range=0.02),
    "nano-v3-30b": dict(vocab_size=131072, hidden_size=2688,
                        hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
                        num_attention_heads=32, num_key_value_heads=2, head_dim=128, mamba_num_heads=64,
                        mamba_head_dim=64, n_groups=8, ssm_state_size=128, conv_kernel=4, chunk_size=128,
                        intermediate_size=1856, n_routed_experts=128, num_experts_per_tok=6,
                        moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712, n_group=1,
                        topk_group=1, routed_scaling_factor=2.5, max_position_embeddings=262144,
                        initializer_range=0.0173),
}
