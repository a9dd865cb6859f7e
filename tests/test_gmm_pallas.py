"""Pallas grouped matmul (gmm/tgmm + custom VJP) and the Pallas expert FFN.

Both backends run on CPU in interpret mode (Triton kernels with ``interpret=True``, Mosaic TPU kernels
with ``pltpu.InterpretParams()``) against independent oracles: a float64 numpy loop over the groups for
gmm/tgmm and their gradients, and :func:`expert_ffn_dense` for the FFN. Covered: empty groups (first,
middle, last), groups straddling tiles, rows past ``sum(group_sizes)``, static and traced
``k_limit``/``n_limit`` (outside: exactly 0), ``transpose_rhs``, K/N not multiples of the tiles, fp32
and bf16, the work-item metadata, argument errors, and lowering of the real GPU (Triton) and TPU
(Mosaic) kernels at a Nano-like shape via ``jax.export`` (no accelerator needed)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from star_elastic_jax.errors import ConfigError
from star_elastic_jax.kernels.moe.gmm import gmm, group_offsets, tgmm, work_items
from star_elastic_jax.kernels.moe.pallas_ffn import expert_ffn_pallas
from star_elastic_jax.kernels.moe.reference import expert_ffn_dense

# Tolerances are elementwise, relative to the oracle's max |value| (see _close); observed errors in brackets.
# fp32: the kernels accumulate in fp32 in another order than the float64 oracle; for K <= 200 O(1) terms
# that is ~1e-7 of the scale [<= 4e-7], so 1e-5 keeps a wide margin yet any wrong row, column or tile
# (an O(1) error) fails. The FFN chains two matmuls and relu2 [<= 1e-6]: twice that.
FP32_TOL = 1e-5
FFN_FP32_TOL = 2e-5
# bf16: the oracle gets the same bf16-rounded operands, the kernel accumulates in fp32 and rounds its
# output once to bf16 (relative 2^-9 ~ 2e-3) [<= 3.3e-3], so 1e-2.
BF16_TOL = 1e-2
# bf16 FFN: the fc1 output and relu2 are also rounded to bf16 before fc2 and the ffn_mask gradient sums
# many such rounded products, so errors compound [<= 1.1e-2, in d ffn_mask]; 3e-2 as in test_moe_blocked.
BF16_FFN_TOL = 3e-2

TRITON_TILING = (16, 32, 32)      # small tiles: many m/k/n tiles, partial ones, straddling groups
TPU_TILING = (16, 128, 128)       # Mosaic minimum lane tiles; K/N = 200/136 give partial k/n tiles


def _close(got, want, tol, what):
    """``|got - want| <= tol * max|want|`` elementwise, and exact zeros wherever the oracle is exactly 0
    (rows past the groups, columns past the limits, empty groups)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    assert np.all(np.isfinite(got)), what
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(np.abs(want).max(), 1e-30), err_msg=what)
    np.testing.assert_array_equal(got[want == 0], 0, err_msg=f"{what}: exact zeros")


def gmm_oracle(lhs, rhs, gs, cot, kl, nl, transpose_rhs):
    """float64 per-group loop: ``(out, d lhs, d rhs)`` of ``sum(gmm(lhs, rhs) * cot)``."""
    lhs, rhs, cot = (np.asarray(a, np.float64) for a in (lhs, rhs, cot))
    r = rhs.transpose(0, 2, 1) if transpose_rhs else rhs
    out, dlhs, dr = np.zeros((lhs.shape[0], r.shape[2])), np.zeros_like(lhs), np.zeros_like(r)
    o = 0
    for e, s in enumerate(gs):
        rows = slice(o, o + s)
        out[rows, :nl] = lhs[rows, :kl] @ r[e, :kl, :nl]
        dlhs[rows, :kl] = cot[rows, :nl] @ r[e, :kl, :nl].T
        dr[e, :kl, :nl] = lhs[rows, :kl].T @ cot[rows, :nl]
        o += s
    return out, dlhs, dr.transpose(0, 2, 1) if transpose_rhs else dr


@functools.partial(jax.jit, static_argnames=("backend", "tiling", "transpose_rhs", "static"))
def gmm_vjp(lhs, rhs, gs, cot, kl, nl, *, backend, tiling, transpose_rhs, static):
    """``(out, d lhs, d rhs)``; limits are the Python ints ``static`` if given, else the traced kl/nl."""
    lim = dict(zip(("k_limit", "n_limit"), static or (kl, nl)))
    f = functools.partial(gmm, group_sizes=gs, transpose_rhs=transpose_rhs, backend=backend, interpret=True,
                          tiling=tiling, **lim)
    out, pull = jax.vjp(lambda a, b: f(a, b), lhs, rhs)
    return (out, *pull(cot.astype(out.dtype)))


# name: (backend, group_sizes, M, K, N, transpose_rhs, limits, traced limits?, dtype)
HOLES = [0, 5, 17, 0, 0, 30, 3, 0]      # first, middle and last empty; sizes not tile multiples; sum 55
GMM_CASES = {
    "triton_holes_fp32": ("triton", HOLES, 64, 72, 40, False, None, False, np.float32),
    "triton_transposed_static_limits": ("triton", HOLES, 64, 72, 40, True, (50, 23), False, np.float32),
    "triton_traced_limits": ("triton", HOLES, 60, 72, 40, False, (37, 17), True, np.float32),
    "triton_k_limit_0": ("triton", HOLES, 64, 72, 40, True, (0, 40), False, np.float32),
    "triton_bf16_traced": ("triton", [9, 0, 22, 1, 0, 16], 56, 80, 48, True, (65, 33), True, jnp.bfloat16),
    "tpu_fp32_traced_transposed": ("mosaic_tpu", [0, 21, 0, 19, 2], 48, 200, 136, True, (150, 70), True,
                                   np.float32),
    "tpu_bf16": ("mosaic_tpu", [7, 0, 30, 0], 48, 200, 136, False, None, False, jnp.bfloat16),
}


@pytest.mark.parametrize("case", sorted(GMM_CASES))
def test_gmm_values_and_grads(case, np_rng):
    backend, gs, M, K, N, tr, limits, traced, dtype = GMM_CASES[case]
    E = len(gs)
    lhs = jnp.asarray(np_rng.standard_normal((M, K)), dtype)
    rhs = jnp.asarray(np_rng.standard_normal((E, N, K) if tr else (E, K, N)) / np.sqrt(K), dtype)
    cot = jnp.asarray(np_rng.standard_normal((M, N)), dtype)
    kl, nl = limits or (K, N)
    tiling = TRITON_TILING if backend == "triton" else TPU_TILING
    got = gmm_vjp(lhs, rhs, jnp.asarray(gs, jnp.int32), cot, jnp.int32(kl), jnp.int32(nl), backend=backend,
                  tiling=tiling, transpose_rhs=tr, static=None if traced else limits)
    want = gmm_oracle(lhs, rhs, gs, cot, kl, nl, tr)
    tol = FP32_TOL if dtype == np.float32 else BF16_TOL
    for g, w, name in zip(got, want, ("out", "d lhs", "d rhs")):
        assert g.dtype == dtype, name
        _close(g, w, tol, f"{case}: {name}")


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_tgmm(backend, np_rng):
    gs = [0, 13, 0, 24, 0]                # empty first/middle/last, 11 rows past the groups
    M, K, N = 48, 144, 136
    lhs, grad = np_rng.standard_normal((M, K)).astype(np.float32), np_rng.standard_normal((M, N)).astype(np.float32)
    tiling = TRITON_TILING if backend == "triton" else TPU_TILING
    f = jax.jit(lambda a, b, g, kl: tgmm(a, b, g, k_limit=kl, n_limit=101, backend=backend, interpret=True,
                                         tiling=tiling))
    got = f(lhs, grad, jnp.asarray(gs, jnp.int32), jnp.int32(130))
    want = np.zeros((len(gs), K, N))
    o = 0
    for e, s in enumerate(gs):
        want[e, :130, :101] = lhs[o:o + s, :130].astype(np.float64).T @ grad[o:o + s, :101]
        o += s
    _close(got, want, FP32_TOL, f"tgmm {backend}")


def test_default_backend_on_cpu(np_rng):
    """``backend=None`` on a CPU host runs the Triton kernels in interpret mode (default tiling)."""
    gs, lhs = [5, 0, 12], np_rng.standard_normal((20, 24)).astype(np.float32)
    rhs = np_rng.standard_normal((3, 24, 16)).astype(np.float32)
    got = jax.jit(gmm)(lhs, rhs, jnp.asarray(gs, jnp.int32))
    _close(got, gmm_oracle(lhs, rhs, gs, np.zeros((20, 16)), 24, 16, False)[0], FP32_TOL, "default backend")


@pytest.mark.parametrize("backend,platform", [pytest.param("triton", "gpu", marks=pytest.mark.gpu),
                                              pytest.param("mosaic_tpu", "tpu", marks=pytest.mark.tpu)])
def test_compiled_kernels_on_hardware(backend, platform, np_rng):
    """The compiled (not interpreted) kernels at a Nano-like shape with default tiling, where the hardware exists."""
    if jax.default_backend() != platform:
        pytest.skip(f"needs a {platform}")
    E, M, K, N = 128, 3072, 2688, 1856
    gs = np_rng.multinomial(M - 40, np_rng.dirichlet(np.ones(E)))   # 40 rows past the groups
    gs[[0, 5, E - 1]] = 0
    gs[1] += M - 40 - gs.sum()
    lhs = jnp.asarray(np_rng.standard_normal((M, K)), jnp.bfloat16)
    rhs = jnp.asarray(np_rng.standard_normal((E, N, K)) / np.sqrt(K), jnp.bfloat16)
    cot = jnp.asarray(np_rng.standard_normal((M, N)), jnp.bfloat16)

    @jax.jit
    def f(lhs, rhs, gs, cot, kl, nl):
        out, pull = jax.vjp(lambda a, b: gmm(a, b, gs, k_limit=kl, n_limit=nl, transpose_rhs=True, backend=backend),
                            lhs, rhs)
        return (out, *pull(cot))

    got = f(lhs, rhs, jnp.asarray(gs, jnp.int32), cot, jnp.int32(2000), jnp.int32(1500))
    want = gmm_oracle(lhs, rhs, gs, cot, 2000, 1500, True)
    for g, w, name in zip(got, want, ("out", "d lhs", "d rhs")):
        _close(g, w, BF16_TOL, f"{backend} compiled: {name}")


@functools.partial(jax.jit, static_argnames=("m", "bm", "visit_empty"))
def _items(gs, *, m, bm, visit_empty):
    return work_items(group_offsets(gs, m), m, bm, visit_empty=visit_empty)


def test_work_items_match_enumeration(np_rng):
    """The metadata lists exactly the overlapping (group, m-tile) pairs in row order, within the bound."""
    E, M = 6, 40
    cases = [np.zeros(E, int), np.full(E, M // E), [M, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 8]]
    cases += [np_rng.integers(0, 3, E) * np_rng.integers(0, 7, E) for _ in range(8)]
    for gs in cases:
        for bm, visit_empty in ((4, False), (8, True)):
            items = _items(jnp.asarray(gs, jnp.int32), m=M, bm=bm, visit_empty=visit_empty)
            want, o = [], 0
            for e, s in enumerate(gs):
                if s:
                    want += [(e, t) for t in range(o // bm, (o + s - 1) // bm + 1)]
                elif visit_empty:
                    want.append((e, min(o // bm, M // bm - 1)))
                o += s
            n = int(items.count)
            assert n == len(want) <= items.group.shape[0] == M // bm + E - 1, (gs, bm)
            assert list(zip(np.asarray(items.group[:n]).tolist(), np.asarray(items.tile[:n]).tolist())) == want


# ------------------------------------------------------------------------------ expert FFN
def ffn_inputs(rng, T, H, E, F, k, used, dtype=np.float32):
    x = jnp.asarray(rng.standard_normal((T, H)), dtype)
    idx = jnp.asarray(np.stack([rng.choice(used, size=k, replace=False) for _ in range(T)]), jnp.int32)
    w = jnp.asarray(rng.uniform(0.1, 2.0, (T, k)), jnp.float32)
    up = jnp.asarray(rng.standard_normal((E, F, H)) / np.sqrt(H), dtype)
    down = jnp.asarray(rng.standard_normal((E, H, F)) / np.sqrt(F), dtype)
    mask = jnp.asarray(rng.uniform(0.0, 1.5, (F,)) * (rng.uniform(size=F) > 0.3), dtype)
    return x, idx, w, up, down, mask


def ffn_and_grads(fn, x, idx, w, up, down, mask, cot):
    """``fn(...)`` and the grads of ``sum(fn(...) * cot)`` w.r.t. x, weights, up, down, ffn_mask."""
    def loss(x, w, up, down, mask):
        y = fn(x, idx, w, up, down, mask)
        return jnp.sum(y * cot), y
    (_, y), g = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(x, w, up, down, mask)
    return (y, *g)


NAMES = ("out", "d x", "d weights", "d up", "d down", "d ffn_mask")
# name: (backend, T, H, E, F, k, experts that get tokens, k_limit, ffn_limit, dtype)
FFN_CASES = {
    "triton_limits_traced": ("triton", 24, 40, 7, 24, 2, [0, 2, 3, 5], 29, 13, np.float32),
    "triton_bf16_no_limits": ("triton", 24, 40, 7, 24, 2, [1, 2, 4, 6], None, None, jnp.bfloat16),
    "tpu_limits": ("mosaic_tpu", 12, 136, 4, 144, 2, [0, 2], 130, 100, np.float32),
}


@pytest.mark.parametrize("case", sorted(FFN_CASES))
def test_expert_ffn_pallas_vs_dense(case, np_rng):
    backend, T, H, E, F, k, used, kl, fl, dtype = FFN_CASES[case]
    x, idx, w, up, down, mask = ffn_inputs(np_rng, T, H, E, F, k, used, dtype)
    cot = jnp.asarray(np_rng.standard_normal((T, H)), jnp.float32)
    tiling = TRITON_TILING if backend == "triton" else TPU_TILING

    @jax.jit
    def run(x, w, up, down, mask, kl_, fl_):
        fn = functools.partial(expert_ffn_pallas, k_limit=None if kl is None else kl_,
                               ffn_limit=None if fl is None else fl_, backend=backend, interpret=True, tiling=tiling)
        return ffn_and_grads(fn, x, idx, w, up, down, mask, cot)

    got = run(x, w, up, down, mask, jnp.int32(kl or H), jnp.int32(fl or F))
    kl, fl = kl or H, fl or F
    # oracle: the dense FFN on the sliced weights, zero-padded back (outputs and grads outside are 0)
    oracle = jax.jit(functools.partial(ffn_and_grads, expert_ffn_dense))
    s = oracle(x[:, :kl], idx, w, up[:, :fl, :kl], down[:, :kl, :fl], mask[:fl], cot[:, :kl])
    want = [jnp.zeros(a.shape, jnp.float32).at[tuple(slice(0, d) for d in b.shape)].set(b)
            for a, b in zip((cot, x, w, up, down, mask), s)]
    tol = FFN_FP32_TOL if dtype == np.float32 else BF16_FFN_TOL
    for g, wv, name in zip(got, want, NAMES):
        _close(g, wv, tol, f"{case}: {name}")


# ------------------------------------------------------------------------------ errors
def test_errors():
    lhs, rhs, gs = jnp.zeros((8, 16)), jnp.zeros((3, 16, 32)), jnp.zeros((3,), jnp.int32)
    bad = [
        ({"rhs": jnp.zeros((3, 8, 32))}, "rhs.shape"),               # contraction mismatch
        ({"rhs": jnp.zeros((3, 16, 32)), "transpose_rhs": True}, "rhs.shape"),
        ({"group_sizes": jnp.zeros((4,), jnp.int32)}, "group_sizes.shape"),
        ({"group_sizes": jnp.zeros((3,), jnp.float32)}, "group_sizes"),
        ({"rhs": jnp.zeros((3, 16, 32), jnp.bfloat16)}, "rhs.dtype"),
        ({"lhs": jnp.zeros((8, 16, 1))}, "lhs.shape"),
        ({"backend": "cuda"}, "backend"),
        ({"k_limit": -1}, "k_limit"),
        ({"k_limit": 17}, "k_limit"),
        ({"n_limit": 33}, "n_limit"),
        ({"n_limit": jnp.float32(3)}, "n_limit"),
        ({"n_limit": jnp.zeros((2,), jnp.int32)}, "n_limit"),
        ({"tiling": (16, 24, 32), "backend": "triton"}, "tiling"),
        ({"tiling": (16, 64, 32), "backend": "mosaic_tpu"}, "tiling"),
        ({"tiling": (16, 32)}, "tiling"),
    ]
    for kw, field in bad:
        args = {"lhs": lhs, "rhs": rhs, "group_sizes": gs, "interpret": True} | kw
        with pytest.raises(ConfigError, match=field):
            gmm(args.pop("lhs"), args.pop("rhs"), args.pop("group_sizes"), **args)
    with pytest.raises(ConfigError, match="grad.shape"):
        tgmm(lhs, jnp.zeros((9, 4)), gs, interpret=True)
    with pytest.raises(ConfigError, match="ffn_mask"):
        expert_ffn_pallas(jnp.zeros((4, 16)), jnp.zeros((4, 2), jnp.int32), jnp.zeros((4, 2)),
                          jnp.zeros((3, 8, 16)), jnp.zeros((3, 16, 8)), jnp.zeros((9,)), interpret=True)


# ------------------------------------------------------------------------------ lowering (no accelerator)
TRITON_CALL = "__gpu$xla.gpu.triton"
# Nano-like: 512 tokens x top-6, d 2688, FFN 1856, 128 experts
NANO = {"T": 512, "k": 6, "H": 2688, "F": 1856, "E": 128}


def _nano_args():
    T, k, H, F, E = (NANO[n] for n in ("T", "k", "H", "F", "E"))
    S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    return (S((T, H), bf), S((T, k), jnp.int32), S((T, k), jnp.float32), S((E, F, H), bf), S((E, H, F), bf),
            S((F,), bf), S((), jnp.int32), S((), jnp.int32))


def _lowering_fns(backend):
    def ffn(x, idx, w, up, down, mask, kl, fl):
        return expert_ffn_pallas(x, idx, w, up, down, mask, k_limit=kl, ffn_limit=fl, backend=backend)

    def ffn_grad(x, idx, w, up, down, mask, kl, fl):
        def loss(x, w, up, down, mask):
            return jnp.sum(ffn(x, idx, w, up, down, mask, kl, fl))
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, w, up, down, mask)

    def gmm_fwd_bwd(x, idx, w, up, down, mask, kl, fl):  # fc1 alone on T*k rows, traced group sizes and limits
        xs = jnp.repeat(x, NANO["k"], axis=0)
        gs = jnp.bincount(idx.reshape(-1), length=NANO["E"]).astype(jnp.int32)
        f = functools.partial(gmm, group_sizes=gs, k_limit=kl, n_limit=fl, transpose_rhs=True, backend=backend)
        out, pull = jax.vjp(f, xs, up)
        return out, pull(out)

    return {"ffn": (ffn, 2), "ffn_grad": (ffn_grad, 6), "gmm_fwd_bwd": (gmm_fwd_bwd, 3)}


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_kernels_lower_for_gpu_and_tpu(backend):
    """Export for CUDA / TPU from a CPU host: the kernels lower to Triton / Mosaic custom calls
    (forward: fc1 + fc2; backward adds d lhs and d rhs per gmm)."""
    for name, (fn, n_calls) in _lowering_fns(backend).items():
        if backend == "triton":
            exp = jax.export.export(jax.jit(fn), platforms=["cuda"],
                                    disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])
            assert exp(*_nano_args()).mlir_module().count(TRITON_CALL) == n_calls, name
        else:
            exp = jax.export.export(jax.jit(fn), platforms=["tpu"])
            assert exp(*_nano_args()).mlir_module().count("tpu_custom_call") == n_calls, name
