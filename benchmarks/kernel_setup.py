"""Shapes, FLOP/byte models, inputs and the timed functions of :mod:`kernels` (the benchmark driver);
see its docstring for the method and the models."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from star_elastic_jax.config import ModelConfig
from star_elastic_jax.elastic.budget import choice_for_budget, nano_choice_lists
from star_elastic_jax.kernels.moe.gmm import gmm
from star_elastic_jax.kernels.moe.pallas_ffn import expert_ffn_pallas
from star_elastic_jax.kernels.moe.reference import expert_ffn_ragged
from star_elastic_jax.kernels.ssd import ssd

NANO_PRESET = "nano-v3-30b"
# contract lhs dim 1 with rhs dim 2 (HF-layout weights [E, out, in]); rhs dim 0 indexes the groups
RAGGED_DN = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
FWD, FWD_BWD = "fwd", "fwd+bwd"


# ------------------------------------------------------------------------------------------ shapes
@dataclasses.dataclass(frozen=True)
class SSDShape:
    b: int
    L: int
    h: int
    p: int
    n: int
    g: int
    chunk: int

    @property
    def heads_per_group(self) -> int:
        return self.h // self.g

    def label(self, head_limit: int | None = None) -> str:
        heads = f"H={self.h}" if head_limit is None else f"H={self.g * head_limit}/{self.h}"
        return f"b={self.b} L={self.L} {heads} P={self.p} N={self.n} G={self.g} Q={self.chunk}"


@dataclasses.dataclass(frozen=True)
class MoEShape:
    tokens: int
    topk: int
    hidden: int
    ffn: int
    experts: int

    @property
    def rows(self) -> int:
        return self.tokens * self.topk


@dataclasses.dataclass(frozen=True)
class Masked:
    """One elastic choice: the Nano sizes it names and the limits at this run's shapes."""

    label: str            # "budget 0.577" or "--choice"
    nano: dict            # hidden / mamba_heads / experts / expert_ffn at Nano scale
    head_limit: int       # active SSD heads per group
    hidden: int           # gmm / FFN k_limit
    ffn: int              # gmm n_limit, FFN ffn_limit
    experts: int          # tokens are routed among the first `experts`


def nano_config() -> ModelConfig:
    return ModelConfig.preset(NANO_PRESET)


def build_shapes(args) -> tuple[SSDShape, SSDShape, MoEShape]:
    """``(ssd at batch 1, the nemotron-h-8b-like ssd, moe)``; ``--small``: tiny shapes for CPU smoke runs."""
    if args.small:
        ssd_shape = SSDShape(b=1, L=args.seq or 128, h=8, p=16, n=16, g=2, chunk=32)
        ssd_8b = ssd_shape   # a stand-in: the same tiny shape, so its executables are reused
        moe = MoEShape(tokens=args.tokens or 64, topk=2, hidden=128, ffn=64, experts=8)
        return ssd_shape, ssd_8b, moe
    cfg = nano_config()
    ssd_shape = SSDShape(b=1, L=args.seq or 4096, h=cfg.mamba_num_heads, p=cfg.mamba_head_dim,
                         n=cfg.ssm_state_size, g=cfg.n_groups, chunk=cfg.chunk_size)
    ssd_8b = SSDShape(b=1, L=2048, h=128, p=64, n=128, g=8, chunk=128)  # d_model 4096, expand 2, headdim 64
    moe = MoEShape(tokens=args.tokens or 8192, topk=cfg.num_experts_per_tok, hidden=cfg.hidden_size,
                   ffn=cfg.moe_intermediate_size, experts=cfg.n_routed_experts)
    return ssd_shape, ssd_8b, moe


def _scaled(value: int, nano_full: int, full: int, multiple: int, minimum: int) -> int:
    """``value`` (a Nano size out of ``nano_full``) at a benchmark width ``full`` (identity at Nano shapes)."""
    if full == nano_full:
        return int(value)
    v = round(value / nano_full * full / multiple) * multiple
    return int(min(max(v, minimum, multiple), full))


def masked_choices(args, ssd_shape: SSDShape, moe: MoEShape) -> list[Masked]:
    """The elastic choices to benchmark (``--choice`` if given, else the budget search), at our shapes."""
    cfg = nano_config()
    full = {"hidden": cfg.hidden_size, "mamba_heads": cfg.mamba_num_heads, "experts": cfg.n_routed_experts,
            "expert_ffn": cfg.moe_intermediate_size}
    picked: list[tuple[str, dict]] = []
    if args.choice:
        for text in args.choice:
            picked.append(("--choice", {**full, **parse_choice(text)}))
    else:
        lists = nano_choice_lists()
        for budget in args.budgets:
            c = choice_for_budget(cfg, budget, lists)
            picked.append((f"budget {budget:g}", {a: (getattr(c, a) if getattr(c, a) is not None else full[a])
                                                 for a in full}))
    out = []
    for label, nano in picked:
        if nano["mamba_heads"] % cfg.n_groups:
            raise SystemExit(f"{label}: mamba_heads {nano['mamba_heads']} is not a multiple of G={cfg.n_groups}")
        heads_per_group = nano["mamba_heads"] // cfg.n_groups
        out.append(Masked(
            label=label, nano=nano,
            head_limit=_scaled(heads_per_group, cfg.mamba_num_heads // cfg.n_groups, ssd_shape.heads_per_group, 1, 1),
            hidden=_scaled(nano["hidden"], cfg.hidden_size, moe.hidden, 16, 16),
            ffn=_scaled(nano["expert_ffn"], cfg.moe_intermediate_size, moe.ffn, 16, 16),
            experts=_scaled(nano["experts"], cfg.n_routed_experts, moe.experts, 1, moe.topk)))
    return out


def parse_choice(text: str) -> dict:
    axes = ("hidden", "mamba_heads", "experts", "expert_ffn")
    out = {}
    for part in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = part.partition("=")
        if key not in axes or not value.strip().isdigit():
            raise SystemExit(f"--choice: bad entry {part!r}; expected axis=int with axis in {axes}")
        out[key] = int(value)
    return out


# ------------------------------------------------------------------------------ FLOP / byte models
def ssd_flops(s: SSDShape, active_heads: int) -> float:
    q = s.chunk
    per_token = 2 * s.g * q * s.n + active_heads * (2 * q * s.p + 4 * s.p * s.n + 2 * s.p * s.n / q)
    return float(s.b * s.L * per_token)


def ssd_bytes(s: SSDShape, active_heads: int, itemsize: int, backward: bool) -> float:
    tok = s.b * s.L
    x, dt, bc, y = tok * active_heads * s.p * itemsize, tok * active_heads * 4, 2 * tok * s.g * s.n * itemsize, \
        tok * active_heads * s.p * 4
    fwd = x + dt + bc + y
    return float(fwd + (2 * (x + dt + bc) + y if backward else 0))


def gmm_flops(m: int, k: int, n: int) -> float:
    return 2.0 * m * k * n


def gmm_bytes(m: int, k: int, n: int, e_used: int, itemsize: int) -> float:
    return float(itemsize * (m * k + e_used * k * n + m * n))


def ffn_bytes(moe: MoEShape, h: int, f: int, e_used: int, itemsize: int) -> float:
    m = moe.rows
    return gmm_bytes(m, h, f, e_used, itemsize) + gmm_bytes(m, f, h, e_used, itemsize) + 4.0 * moe.tokens * h


# ------------------------------------------------------------------------------------------ inputs
def ssd_inputs(s: SSDShape, dtype, seed: int) -> dict:
    """Random SSD operands at realistic scales (dt in [1e-3, 1e-1], A in [-16, -1]); dt/A/D fp32 as in the model."""
    return _ssd_inputs(jax.random.PRNGKey(seed), s, dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _ssd_inputs(key, s: SSDShape, dtype) -> dict:
    # one jitted generator per shape: generated on the device, compiled once (eager ops would compile each op)
    k = jax.random.split(key, 7)
    f32 = jnp.float32
    return {
        "x": jax.random.normal(k[0], (s.b, s.L, s.h, s.p), f32).astype(dtype),
        "dt": jnp.exp(jax.random.uniform(k[1], (s.b, s.L, s.h), f32, math.log(1e-3), math.log(1e-1))),
        "A": -jnp.exp(jax.random.uniform(k[2], (s.h,), f32, 0.0, math.log(16.0))),
        "B": (jax.random.normal(k[3], (s.b, s.L, s.g, s.n), f32) / math.sqrt(s.n)).astype(dtype),
        "C": (jax.random.normal(k[4], (s.b, s.L, s.g, s.n), f32) / math.sqrt(s.n)).astype(dtype),
        "D": jax.random.normal(k[5], (s.h,), f32),
        "cot": jax.random.normal(k[6], (s.b, s.L, s.h, s.p), f32),
    }


def routing(moe: MoEShape, experts: int, seed: int) -> np.ndarray:
    """``[T, top_k]`` int32: the top-k of N(0, 1) logits over the first ``experts`` experts (about uniform load)."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((moe.tokens, experts), dtype=np.float32)
    return np.argsort(-logits, axis=1)[:, :moe.topk].astype(np.int32)


def moe_inputs(moe: MoEShape, dtype, seed: int, *, experts: int | None = None, hidden: int | None = None,
               ffn: int | None = None) -> dict:
    """Operands of the fc1 gmm (expert-sorted rows) and of the whole FFN, routing among the first ``experts``.

    With ``hidden``/``ffn`` (the masked problem) every array is zero outside the active prefixes, as
    in the masked model, and so are the cotangents (outputs outside are exactly 0 in the masked model)."""
    idx = routing(moe, experts or moe.experts, seed)
    group_sizes = np.bincount(idx.reshape(-1), minlength=moe.experts).astype(np.int32)
    inp = _moe_arrays(jax.random.PRNGKey(seed + 1), moe, dtype, hidden or moe.hidden, ffn or moe.ffn)
    return {"idx": jnp.asarray(idx), "group_sizes": jnp.asarray(group_sizes), **inp}


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _moe_arrays(key, moe: MoEShape, dtype, hidden: int, ffn: int) -> dict:
    E, H, F, T, M = moe.experts, moe.hidden, moe.ffn, moe.tokens, moe.rows
    k = jax.random.split(key, 7)
    f32 = jnp.float32
    h_on = (jnp.arange(H) < hidden).astype(f32)
    f_on = (jnp.arange(F) < ffn).astype(f32)
    return {
        "lhs": (jax.random.normal(k[0], (M, H), f32) * h_on).astype(dtype),   # expert-sorted fc1 rows
        "x": (jax.random.normal(k[1], (T, H), f32) * h_on).astype(dtype),
        "weights": jax.random.uniform(k[2], (T, moe.topk), f32, 0.1, 1.0),
        "up": (jax.random.normal(k[3], (E, F, H), f32) / math.sqrt(H) * f_on[:, None] * h_on).astype(dtype),
        "down": (jax.random.normal(k[4], (E, H, F), f32) / math.sqrt(F) * h_on[:, None] * f_on).astype(dtype),
        "cot_gmm": jax.random.normal(k[5], (M, F), f32) * f_on,
        "cot_ffn": jax.random.normal(k[6], (T, H), f32) * h_on,
    }


@functools.partial(jax.jit, static_argnums=(1, 2))
def _dense_inputs(key, moe: MoEShape, dtype) -> dict:
    k = jax.random.split(key, 3)
    return {"lhs": jax.random.normal(k[0], (moe.rows, moe.hidden), jnp.float32).astype(dtype),
            "w": (jax.random.normal(k[1], (moe.hidden, moe.ffn), jnp.float32) / math.sqrt(moe.hidden)).astype(dtype),
            "cot": jax.random.normal(k[2], (moe.rows, moe.ffn), jnp.float32)}


def dense_inputs(moe: MoEShape, dtype, seed: int) -> dict:
    return _dense_inputs(jax.random.PRNGKey(seed + 2), moe, dtype)


# ------------------------------------------------------------------------------- functions timed
Built = tuple[Any, tuple]   # (jitted function, its arguments)


def _fwd_or_grad(out_fn: Callable, mode: str, n_diff: int) -> Any:
    """``jit(out_fn)`` for the forward, else ``jit(value_and_grad(sum(out_fn(*a) * cot)))`` over the first ``n_diff``
    arguments (the cotangent is the last argument)."""
    if mode == FWD:
        return jax.jit(out_fn)

    def loss(*a):
        *operands, cot = a
        return jnp.sum(out_fn(*operands).astype(jnp.float32) * cot)

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(n_diff))))


def ssd_fn(impl: str, s: SSDShape, mode: str, head_limit: int | None = None) -> Callable[[dict], Built]:
    head_limit = None if head_limit == s.heads_per_group else head_limit   # all heads: the unmasked kernel

    def out(x, dt, A, B, C, D):
        return ssd(x, dt, A, B, C, D, chunk_size=s.chunk, impl=impl, head_limit=head_limit)[0]

    def build(inp):
        args = tuple(inp[k] for k in ("x", "dt", "A", "B", "C", "D"))
        return _fwd_or_grad(out, mode, 6), args if mode == FWD else args + (inp["cot"],)

    build.key = ("ssd", impl, s.chunk, head_limit)
    return build


def gmm_fn(impl: str, mode: str, k_limit: int | None = None, n_limit: int | None = None
           ) -> Callable[[dict], Built]:
    if impl == "gmm":
        def out(lhs, up, gs):
            return gmm(lhs, up, gs, k_limit=k_limit, n_limit=n_limit, transpose_rhs=True)
    else:
        def out(lhs, up, gs):
            return lax.ragged_dot_general(lhs, up, gs, RAGGED_DN)

    def build(inp):
        args = (inp["lhs"], inp["up"], inp["group_sizes"])
        return _fwd_or_grad(out, mode, 2), args if mode == FWD else args + (inp["cot_gmm"],)

    build.key = ("gmm", impl) + ((k_limit, n_limit) if impl == "gmm" else ())
    return build


def dense_fn(mode: str) -> Callable[[dict], Built]:
    def out(lhs, w):
        return lhs @ w

    def build(inp):
        args = (inp["lhs"], inp["w"])
        return _fwd_or_grad(out, mode, 2), args if mode == FWD else args + (inp["cot"],)

    build.key = ("dense",)
    return build


def ffn_fn(impl: str, mode: str, k_limit: int | None = None, ffn_limit: int | None = None
           ) -> Callable[[dict], Built]:
    if impl == "pallas":
        def out(x, weights, up, down, idx):
            return expert_ffn_pallas(x, idx, weights, up, down, k_limit=k_limit, ffn_limit=ffn_limit)
    else:
        def out(x, weights, up, down, idx):
            return expert_ffn_ragged(x, idx, weights, up, down)

    def build(inp):
        args = (inp["x"], inp["weights"], inp["up"], inp["down"], inp["idx"])
        return _fwd_or_grad(out, mode, 4), args if mode == FWD else args + (inp["cot_ffn"],)

    build.key = ("ffn", impl) + ((k_limit, ffn_limit) if impl == "pallas" else ())
    return build
