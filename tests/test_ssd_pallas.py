"""Pallas SSD (``ssd_pallas``) vs the pure-JAX reference: outputs and all gradients, on the Triton
kernels (interpret mode) and the Mosaic TPU kernels (``pltpu.InterpretParams``), plus argument
validation and cross-platform lowering to real Triton / Mosaic custom calls.

Oracles: ``ssd_reference`` (outputs and ``jax.vjp`` with random cotangents) and, for the forward,
the float64 token-by-token recurrence of ``test_ssd_reference``. Elastic heads are checked against
the reference run on the active heads *sliced out*: heads only interact through the shared B/C,
which inactive heads must neither read into outputs nor write gradients into.

Tolerances are relative to ``max|reference|`` of each compared array:
* fp32 values: ``1e-5``. Both sides compute in fp32 and differ only in summation order and in how
  decays are formed (kernel: ``exp(acs_t - acs_s)``; reference: direct segment sums), i.e. a few
  fp32 ulps times the accumulation depth; observed <= ~2e-6.
* bf16 inputs: the kernels and the reference both upcast the same bf16 values to fp32, so fp32-typed
  results (y, final state, dA, dD, d initial_state) keep the fp32 bound. Gradients w.r.t. bf16 inputs
  are rounded to bf16 on both sides (the kernel's reference here is fed the upcast values and so
  stays fp32): they differ by at most one bf16 rounding, 2**-8 relative; we allow 2**-7.
"""
from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from test_ssd_reference import random_inputs, ssd_oracle

from star_elastic_jax.errors import ConfigError
from star_elastic_jax.kernels.ssd.pallas import ssd_pallas
from star_elastic_jax.kernels.ssd.reference import ssd_reference

TOL_F32 = 1e-5
TOL_BF16_GRAD = 2.0 ** -7
ORACLE_ATOL = 5e-5  # SPEC 1.3 acceptance vs the float64 recurrence

# Shared dims: L = 37 is not a multiple of any kernel chunk used (8, 16, 32).
BATCH, SEQ, P, GROUPS, N = 2, 37, 8, 2, 12   # p, n also exercise Triton's power-of-two padding
HEAD_LIMIT = 2                                # of 3 heads per group when h = 6
# Row 0: documents start at token 1, at 16 (a chunk boundary for chunks 8 and 16) and at 21.
# Row 1: starts at 8 (boundary for chunk 8), a one-token document at 8, and at 30.
SEGMENTS = np.array([[0] * 1 + [1] * 15 + [2] * 5 + [3] * 16,
                     [5] * 8 + [6] * 1 + [7] * 21 + [8] * 7], np.int32)
GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")
PER_HEAD_AXIS = {"x": 2, "dt": 2, "A": 0, "D": 0, "initial_state": 1}   # B, C are per group


@dataclasses.dataclass(frozen=True)
class Case:
    backend: str
    dtype: str = "float32"
    heads: int = 4
    head_limit: str | None = None   # None, "static" (Python int) or "traced" (jit argument)
    initial: bool = False
    segments: bool = False
    chunk: int = 16
    default_backend: bool = False   # backend=None on this CPU host: Triton in interpret mode

    def __str__(self):
        flags = [self.backend, self.dtype, f"h{self.heads}", f"q{self.chunk}",
                 f"limit_{self.head_limit}" if self.head_limit else "", "init" if self.initial else "",
                 "segments" if self.segments else "", "default" if self.default_backend else ""]
        return "-".join(f for f in flags if f)


CASES = [
    Case("triton", initial=True, segments=True, default_backend=True),
    Case("triton", dtype="bfloat16"),
    Case("triton", heads=6, head_limit="static", initial=True, segments=True),
    Case("triton", heads=6, head_limit="traced", segments=True, chunk=32),
    Case("mosaic_tpu", initial=True, segments=True, chunk=8),
    Case("mosaic_tpu", dtype="bfloat16", heads=6, head_limit="static"),
    Case("mosaic_tpu", heads=6, head_limit="traced", initial=True, segments=True, chunk=8),
]


@jax.jit
def _reference_fwd_vjp(x, dt, A, B, C, D, s0, seg, wy, wf):
    """Reference outputs and cotangents; one compilation serves every case (same shapes)."""
    fn = lambda *args: ssd_reference(*args[:6], chunk_size=16, initial_state=args[6], segment_ids=seg)
    out, vjp = jax.vjp(fn, x, dt, A, B, C, D, s0)
    return out, vjp((wy, wf))


def _pallas_fwd_vjp(case, diff_args, wy, wf, seg, head_limit):
    def fn(*args, limit):
        return ssd_pallas(*args[:6], chunk_size=case.chunk, initial_state=args[6] if case.initial else None,
                          segment_ids=seg, head_limit=limit,
                          backend=None if case.default_backend else case.backend,
                          interpret=not case.default_backend)

    @jax.jit
    def run(diff_args, wy, wf, traced_limit):
        limit = traced_limit if case.head_limit == "traced" else head_limit
        out, vjp = jax.vjp(lambda *a: fn(*a, limit=limit), *diff_args)
        return out, vjp((wy, wf))

    return run(diff_args, wy, wf, jnp.int32(head_limit) if case.head_limit == "traced" else None)


def _assert_close(got, want, tol, name):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, name
    scale = max(float(np.abs(want).max()), 1e-6)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale, err_msg=name)


def _split_heads(arr, axis, active):
    """``(active part, inactive part)`` of ``arr`` along its head axis."""
    return np.compress(active, arr, axis=axis), np.compress(~active, arr, axis=axis)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case):
    rng = np.random.default_rng(zlib.crc32(str(case).encode()))
    x, dt, A, B, C, D, s0 = random_inputs(rng, BATCH, SEQ, case.heads, P, GROUPS, N, initial=True)
    if case.dtype == "bfloat16":    # B/C/x/dt in bf16; A, D and the state stay fp32 as in the model
        x, dt, B, C = (jnp.asarray(t, jnp.bfloat16) for t in (x, dt, B, C))
    wy = rng.standard_normal((BATCH, SEQ, case.heads, P)).astype(np.float32)
    wf = rng.standard_normal(s0.shape).astype(np.float32)
    seg = SEGMENTS if case.segments else None
    r = case.heads // GROUPS
    limit = HEAD_LIMIT if case.head_limit else r
    active = np.arange(case.heads) % r < limit

    diff_args = (x, dt, A, B, C, D) + ((s0,) if case.initial else ())
    (y, final), grads = _pallas_fwd_vjp(case, diff_args, wy, wf, seg, limit)
    grads = dict(zip(GRAD_NAMES, grads))

    # Reference on the active heads only, fp32 copies of the (possibly bf16-rounded) inputs.
    f32 = lambda t: np.asarray(t, np.float32)
    sliced = {name: _split_heads(f32(t), PER_HEAD_AXIS[name], active)[0]
              for name, t in zip(GRAD_NAMES, (x, dt, A, B, C, D, s0)) if name in PER_HEAD_AXIS}
    s0_ref = sliced["initial_state"] if case.initial else np.zeros_like(sliced["initial_state"])
    seg_ref = SEGMENTS if case.segments else np.zeros_like(SEGMENTS)
    (y_ref, final_ref), ref_grads = _reference_fwd_vjp(
        sliced["x"], sliced["dt"], sliced["A"], f32(B), f32(C), sliced["D"], s0_ref, seg_ref,
        wy[:, :, active], wf[:, active])

    assert y.dtype == jnp.float32 and final.dtype == jnp.float32
    assert y.shape == x.shape and final.shape == s0.shape
    y_on, y_off = _split_heads(np.asarray(y), 2, active)
    final_on, final_off = _split_heads(np.asarray(final), 1, active)
    _assert_close(y_on, y_ref, TOL_F32, "y")
    _assert_close(final_on, final_ref, TOL_F32, "final_state")
    assert not y_off.any() and not final_off.any(), "inactive heads must output exact zeros"

    for name, want in zip(GRAD_NAMES, ref_grads):
        if name not in grads:
            continue
        got = grads[name]
        assert got.dtype == diff_args[GRAD_NAMES.index(name)].dtype, name
        tol = TOL_BF16_GRAD if got.dtype == jnp.bfloat16 else TOL_F32
        if name in PER_HEAD_AXIS:
            got, got_off = _split_heads(np.asarray(got, np.float32), PER_HEAD_AXIS[name], active)
            assert not got_off.any(), f"d{name} of inactive heads must be exactly zero"
        _assert_close(got, want, tol, f"d{name}")

    if case.dtype == "float32" and not case.head_limit:
        y_64, final_64 = ssd_oracle(x, dt, A, B, C, D, initial_state=s0 if case.initial else None,
                                    segment_ids=seg)
        np.testing.assert_allclose(np.asarray(y), y_64, rtol=0, atol=ORACLE_ATOL)
        np.testing.assert_allclose(np.asarray(final), final_64, rtol=0, atol=ORACLE_ATOL)


# ----------------------------------------------------------------------------- argument errors
def _small_args(seq=9, heads=4, groups=2):
    x = np.zeros((1, seq, heads, 8), np.float32)
    return (x, np.zeros((1, seq, heads), np.float32), -np.ones((heads,), np.float32),
            np.zeros((1, seq, groups, 16), np.float32), np.zeros((1, seq, groups, 16), np.float32),
            np.ones((heads,), np.float32))


def _with(**replace):
    """``_small_args()`` with some positions replaced, e.g. ``_with(a1=...)`` for ``dt``."""
    args = list(_small_args())
    for key, value in replace.items():
        args[int(key[1:])] = value
    return tuple(args)


BAD = [
    ("backend", _small_args(), {"backend": "cuda"}),
    ("chunk_size", _small_args(), {"chunk_size": 0}),
    ("chunk_size", _small_args(), {"chunk_size": -8}),
    ("chunk_size", _small_args(), {"chunk_size": 8.0}),
    ("head_limit", _small_args(), {"head_limit": 0}),
    ("head_limit", _small_args(), {"head_limit": 3}),        # 2 heads per group
    ("head_limit", _small_args(), {"head_limit": True}),
    ("head_limit", _small_args(), {"head_limit": 1.5}),
    ("head_limit", _small_args(), {"head_limit": jnp.float32(1.0)}),
    ("x.shape", _with(a0=np.zeros((1, 9, 4), np.float32)), {}),
    ("dt.shape", _with(a1=np.zeros((1, 9, 3), np.float32)), {}),
    ("A.shape", _with(a2=np.zeros((3,), np.float32)), {}),
    ("C.shape", _with(a4=np.zeros((1, 9, 2, 8), np.float32)), {}),
    ("D.shape", _with(a5=np.zeros((4, 1), np.float32)), {}),
    ("B.shape[2]", _with(a3=np.zeros((1, 9, 3, 16), np.float32), a4=np.zeros((1, 9, 3, 16), np.float32)), {}),
    ("initial_state.shape", _small_args(), {"initial_state": np.zeros((1, 4, 8, 8), np.float32)}),
    ("segment_ids.shape", _small_args(), {"segment_ids": np.zeros((1, 10), np.int32)}),
    # Compiled Mosaic needs lane-aligned (1, q) blocks for dt/doc rows: q % 128 == 0 unless q >= L.
    ("chunk_size", _small_args(seq=200), {"backend": "mosaic_tpu", "chunk_size": 64}),
]


@pytest.mark.parametrize("field, args, kwargs", BAD, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD)])
def test_bad_arguments_raise_config_error(field, args, kwargs, monkeypatch):
    def no_kernels(*_, **__):
        raise AssertionError("validation must fail before any kernel is traced")

    monkeypatch.setattr(pl, "pallas_call", no_kernels)
    kwargs = {"chunk_size": 8, **kwargs}
    with pytest.raises(ConfigError) as err:
        ssd_pallas(*args, **kwargs)
    assert err.value.field == field
    assert isinstance(err.value, ValueError)


# ----------------------------------------------------------------------------- lowering
MARKERS = {"triton": ("cuda", "__gpu$xla.gpu.triton"), "mosaic_tpu": ("tpu", "tpu_custom_call")}


@pytest.mark.parametrize("head_limit", [None, "static", "traced"])
@pytest.mark.parametrize("backend", sorted(MARKERS))
def test_lowers_to_platform_kernels(backend, head_limit):
    """Forward and gradient lower to real Triton / Mosaic custom calls at a Nano-like shape."""
    b, seq, h, p, g, n = 1, 256, 16, 64, 8, 128
    spec = jax.ShapeDtypeStruct
    args = (spec((b, seq, h, p), jnp.bfloat16), spec((b, seq, h), jnp.float32), spec((h,), jnp.float32),
            spec((b, seq, g, n), jnp.bfloat16), spec((b, seq, g, n), jnp.bfloat16), spec((h,), jnp.float32),
            spec((b, h, p, n), jnp.float32), spec((b, seq), jnp.int32), spec((), jnp.int32))

    def forward(x, dt, A, B, C, D, s0, seg, limit):
        limit = {None: None, "static": 1, "traced": limit}[head_limit]
        return ssd_pallas(x, dt, A, B, C, D, chunk_size=128, initial_state=s0, segment_ids=seg,
                          head_limit=limit, backend=backend)

    def loss(*args):
        y, final = forward(*args)
        return jnp.sum(y) + jnp.sum(final)

    platform, marker = MARKERS[backend]
    kwargs = {} if platform == "tpu" else {
        "disabled_checks": [jax.export.DisabledSafetyCheck.custom_call(marker)]}
    for fn, kernels in ((forward, 1), (jax.grad(loss, argnums=tuple(range(7))), 2)):
        exported = jax.export.export(jax.jit(fn), platforms=[platform], **kwargs)(*args)
        assert exported.mlir_module().count(marker) == kernels
