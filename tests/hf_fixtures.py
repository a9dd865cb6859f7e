"""Helpers shared by the test files: random HF NemotronH models and a jit-once forward for ours.

torch / transformers are imported lazily so that JAX-only test files do not pay for them.
"""
from __future__ import annotations

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# ----------------------------------------------------------------------------- HF test configs
# A: SPEC section 2.4 verbatim (all four block types; n_groups=2; GQA 4q/2kv; L=21 with chunk 8).
# B: n_groups=4, GQA 6q/2kv, group-limited routing (8 experts, 4 groups, keep 2, top-3),
#    norm_topk_prob=False, conv kernel 3, L=37 with chunk 16, a non-default scaling factor and eps.
# C: n_groups=1, MHA (kv == q heads), no conv bias, 2 groups keep 1, top-2, conv kernel 2,
#    L=10 with chunk 4, two MoE blocks back to back.
HF_CONFIGS: dict[str, dict] = {
    "A": dict(vocab_size=256, hidden_size=64, hybrid_override_pattern="M*ME-M",
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=16,
              n_groups=2, ssm_state_size=16, conv_kernel=4, chunk_size=8, intermediate_size=128,
              n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
              moe_shared_expert_intermediate_size=48, n_group=1, topk_group=1, routed_scaling_factor=2.5),
    "B": dict(vocab_size=160, hidden_size=48, hybrid_override_pattern="ME*M-E",
              num_attention_heads=6, num_key_value_heads=2, head_dim=8, mamba_num_heads=8, mamba_head_dim=8,
              n_groups=4, ssm_state_size=8, conv_kernel=3, chunk_size=16, intermediate_size=40,
              n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
              moe_shared_expert_intermediate_size=20, n_group=4, topk_group=2, norm_topk_prob=False,
              routed_scaling_factor=1.7, layer_norm_epsilon=1e-6),
    "C": dict(vocab_size=96, hidden_size=32, hybrid_override_pattern="*EEM-M",
              num_attention_heads=2, num_key_value_heads=2, head_dim=16, mamba_num_heads=6, mamba_head_dim=8,
              n_groups=1, ssm_state_size=12, conv_kernel=2, chunk_size=4, intermediate_size=24,
              n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
              moe_shared_expert_intermediate_size=16, n_group=2, topk_group=1, norm_topk_prob=True,
              routed_scaling_factor=1.0, use_conv_bias=False),
}
SEQ_LEN = {"A": 21, "B": 37, "C": 10}


def hf_config(name_or_kwargs):
    from transformers import NemotronHConfig

    kw = HF_CONFIGS[name_or_kwargs] if isinstance(name_or_kwargs, str) else name_or_kwargs
    return NemotronHConfig(**kw)


def perturb_(model, seed: int) -> None:
    """Make every HF tensor non-trivial and distinct so that a mis-mapped tensor changes the logits.

    Matrices get ~unit-gain random values; norm weights, D, A_log, dt_bias and conv biases are
    moved off their (often constant) init; ``e_score_correction_bias`` (zeros in HF) is randomised.
    """
    import torch

    g = torch.Generator().manual_seed(seed)

    def randn(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.add_(0.3 * randn(p))
            elif name.endswith("mixer.D"):
                p.copy_(1.0 + 0.5 * randn(p))
            elif name.endswith("dt_bias"):
                p.add_(0.5 * randn(p))
            elif name.endswith("conv1d.bias"):
                p.copy_(0.3 * randn(p))
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * randn(p))
            elif name.endswith("gate.weight"):
                p.copy_(randn(p) * 2.0 / math.sqrt(p.shape[-1]))
            elif p.ndim >= 2:
                p.copy_(randn(p) / math.sqrt(p.shape[-1]))
            else:
                raise AssertionError(f"unhandled parameter {name}")
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * randn(b))


def make_hf_model(name_or_kwargs, seed: int = 0):
    """A random fp32 ``NemotronHForCausalLM`` in eval mode with perturbed weights."""
    import torch
    from transformers import NemotronHForCausalLM

    torch.manual_seed(seed)
    model = NemotronHForCausalLM(hf_config(name_or_kwargs)).float().eval()
    perturb_(model, seed + 1000)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long))
    return out.logits.float().numpy()


def read_safetensors_dir(path: str) -> dict:
    """All tensors of a checkpoint dir (single file or index) as torch tensors (keeps bf16)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for k in f.keys():
                assert k not in out, f"duplicate key {k}"
                out[k] = f.get_tensor(k)
    return out


def assert_tensors_bit_exact(got: dict, want: dict) -> None:
    """Same key set, same dtypes, same shapes, identical bits."""
    import torch

    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))
    int_view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    for k in want:
        a, b = got[k], want[k]
        assert a.dtype == b.dtype, f"{k}: dtype {a.dtype} != {b.dtype}"
        assert tuple(a.shape) == tuple(b.shape), f"{k}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.equal(a.contiguous().view(int_view[a.dtype]), b.contiguous().view(int_view[b.dtype])), \
            f"{k}: values differ"


# ----------------------------------------------------------------------------- our side
@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, segment_ids):
    return nnx.merge(graphdef, state)(tokens, segment_ids)


def forward(model, tokens, segment_ids=None) -> np.ndarray:
    """``model(tokens, segment_ids)`` under one jit cache keyed by the (hashable) graphdef, so that
    every model of the same config compiles once per input shape."""
    graphdef, state = nnx.split(model)
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    return np.asarray(_forward(graphdef, state, jnp.asarray(tokens, jnp.int32), seg))


def random_model(cfg, seed: int, param_dtype=jnp.float32):
    """A ``NemotronH(cfg)`` whose leaves are numpy random values (no eager JAX init, so no per-op
    compiles): the our-side analogue of :func:`perturb_`. Unit-gain matrices, perturbed vectors,
    random ``e_score_correction_bias``."""
    import star_elastic_jax as sej
    from star_elastic_jax.model.params import Buffer

    abstract = nnx.eval_shape(lambda: sej.NemotronH(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(state):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        noise = rng.standard_normal(shape)
        name = path[-1]
        if isinstance(var, Buffer):
            new = 0.1 * noise
        elif len(shape) >= 2:
            new = noise * (2.0 if name == "gate_weight" else 1.0) / math.sqrt(shape[-1])
        elif name == "D":
            new = 1.0 + 0.5 * noise
        elif name == "A_log":
            new = np.log(np.arange(1, shape[0] + 1)) + 0.3 * noise
        elif name == "dt_bias":
            new = rng.uniform(-6.0, -2.0, shape)
        elif name in ("conv_x_bias", "conv_bc_bias"):
            new = 0.3 * noise
        else:  # norm weights
            new = 1.0 + 0.2 * noise
        var.set_value(jnp.asarray(new, dtype=dtype))
    return nnx.merge(graphdef, state)


def write_word_tokenizer(path, words=("<pad>", "<s>", "</s>", "[UNK]", "hello", "world", "foo", "bar")):
    """A word-level HF ``tokenizer.json`` at ``path`` (pad/bos/eos = 0/1/2, unknown words -> 3)."""
    import pytest

    pytest.importorskip("tokenizers")  # ships with transformers (the test extra)
    from tokenizers import Tokenizer, models, pre_tokenizers

    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(["<pad>", "<s>", "</s>"])
    t.save(str(path))
    return path
