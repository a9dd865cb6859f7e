"""Blocked (sorted, per-expert padded row blocks) expert FFN vs the dense one-hot oracle: values and
gradients (x, weights, up, down, ffn_mask), zero-token experts, one expert taking every token,
ffn_mask, bf16, the padded block layout, and the ``blocked`` / ``auto`` dispatch."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import star_elastic_jax as sej
from star_elastic_jax.kernels.moe import blocked, expert_ffn, expert_ffn_blocked, expert_ffn_dense, reference

RTOL, ATOL = 1e-5, 1e-5          # fp32 values (relative to the output scale, see _close)
GRAD_RTOL = 1e-4                 # fp32 gradients (longer reductions: E*T terms in dup/ddown)
BF16_TOL = 3e-2                  # bf16 inputs and matmuls vs the fp32 oracle on the same rounded inputs:
                                 # bf16 keeps 8 mantissa bits (~4e-3 per rounding), and fc1 output and relu2
                                 # are rounded to bf16 before fc2, so errors of a few 1e-3..1e-2 of scale


def make_inputs(rng, T, H, E, F, k, used, dtype=np.float32):
    """Random inputs where only experts in ``used`` receive tokens (distinct experts per token)."""
    x = rng.standard_normal((T, H)).astype(np.float32)
    idx = np.stack([rng.choice(used, size=k, replace=False) for _ in range(T)]).astype(np.int32)
    w = rng.uniform(0.1, 2.0, (T, k)).astype(np.float32)
    up = (rng.standard_normal((E, F, H)) / np.sqrt(H)).astype(np.float32)
    down = (rng.standard_normal((E, H, F)) / np.sqrt(F)).astype(np.float32)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return cast(x), jnp.asarray(idx), jnp.asarray(w), cast(up), cast(down)


def _close(got, want, rtol, what=""):
    """``|got - want| <= rtol * max|want| + ATOL`` elementwise (scale-relative, robust near zero)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    assert np.all(np.isfinite(got)), what
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.abs(want).max() + ATOL, err_msg=what)


@functools.cache
def blocked_fn(block_rows):
    return functools.partial(expert_ffn_blocked, block_rows=block_rows)


@functools.partial(jax.jit, static_argnums=0)
def evaluate(fn, x, idx, w, up, down, mask, cot):
    """One compile per (fn, shapes): ``(fn(..., None), fn(..., mask), grads)`` where ``grads`` are those
    of ``sum(fn(..., mask) * cot)`` w.r.t. x, weights, up, down and ffn_mask."""
    def loss(x, w, up, down, mask):
        y = fn(x, idx, w, up, down, mask)
        return jnp.sum(y * cot), y

    (_, y), g = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(x, w, up, down, mask)
    return fn(x, idx, w, up, down, None), y, g


def check_against_dense(fn, x, idx, w, up, down, mask, cot, what, *, rtol=RTOL, grad_rtol=GRAD_RTOL,
                        oracle_cast=None):
    """``fn`` vs the dense oracle (on ``oracle_cast`` of the float inputs, if given); returns ``fn``'s grads."""
    y0, y, g = evaluate(fn, x, idx, w, up, down, mask, cot)
    c = oracle_cast or (lambda a: a)
    w0, wy, wg = evaluate(expert_ffn_dense, c(x), idx, w, c(up), c(down), c(mask), cot)
    for got, want, name in ((y0, w0, "values, no mask"), (y, wy, "values, mask")):
        assert got.dtype == jnp.float32 and got.shape == x.shape, name
        _close(got, want, rtol, f"{what}: {name}")
    for name, a, b in zip(("x", "weights", "up", "down", "ffn_mask"), g, wg):
        _close(a, b, grad_rtol, f"{what}: d{name}")
    return g


# (T, H, E, F, k, experts that receive tokens, block_rows); most share one shape (one oracle compile)
CASES = {
    "holes_b4": (12, 8, 6, 8, 2, [0, 1, 3, 4], 4),           # experts 2 and 5 (the last) get nothing
    "first_empty_b3": (12, 8, 6, 8, 2, [1, 2, 3, 4, 5], 3),  # expert 0 empty; block size not a power of 2
    "block_rows_1": (12, 8, 6, 8, 2, [0, 1, 2, 3, 4, 5], 1),  # no padding at all
    "default_block_rows": (12, 8, 6, 8, 2, [1, 3, 5], None),  # half the experts empty
    "one_expert_takes_all": (12, 8, 6, 8, 1, [2], 4),        # every token to expert 2
    "one_expert_one_block": (12, 8, 6, 8, 1, [5], 64),       # ... the last one, in one mostly padding block
    "every_expert_k_eq_E": (12, 8, 3, 8, 3, [0, 1, 2], 4),   # k == E: each token to every expert
    "single_token": (1, 8, 6, 8, 2, [1, 4], 8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_values_and_gradients_match_dense(case, np_rng):
    T, H, E, F, k, used, B = CASES[case]
    x, idx, w, up, down = make_inputs(np_rng, T, H, E, F, k, used)
    mask = jnp.asarray(np_rng.uniform(0.0, 1.5, F).astype(np.float32).round(1))  # some exact zeros
    cot = jnp.asarray(np_rng.standard_normal((T, H)).astype(np.float32))
    g = check_against_dense(blocked_fn(B), x, idx, w, up, down, mask, cot, case)
    for e in sorted(set(range(E)) - set(used)):  # experts with no tokens: exactly zero gradient
        assert not np.any(np.asarray(g[2][e])) and not np.any(np.asarray(g[3][e])), e


def test_gradients_without_mask(np_rng):
    """The ``ffn_mask=None`` backward (a separate code path from the masked one)."""
    T, H, E, F, k, used, B = CASES["holes_b4"]
    x, idx, w, up, down = make_inputs(np_rng, T, H, E, F, k, used)
    cot = jnp.asarray(np_rng.standard_normal((T, H)).astype(np.float32))

    @functools.partial(jax.jit, static_argnums=0)
    def g(fn, x, w, up, down):
        return jax.grad(lambda x, w, up, down: jnp.sum(fn(x, idx, w, up, down) * cot), argnums=(0, 1, 2, 3))(
            x, w, up, down)

    got = g(blocked_fn(B), x, w, up, down)
    for name, a, b in zip(("x", "weights", "up", "down"), got, g(expert_ffn_dense, x, w, up, down)):
        _close(a, b, GRAD_RTOL, f"d{name}")
    assert not np.any(np.asarray(got[2][2])) and not np.any(np.asarray(got[3][5]))


# Random routings at one fixed shape (compiled once per block size): any routing, including
# repeated experts within a token's slots (the router never emits those; the contract allows them).
_T, _H, _E, _F, _K = 24, 8, 6, 8, 3


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), n_used=st.integers(1, _E), B=st.sampled_from([1, 5, 16]),
       concentrate=st.booleans())
def test_random_routings(seed, n_used, B, concentrate):
    rng = np.random.default_rng(seed)
    used = rng.choice(_E, size=n_used, replace=False)
    p = rng.dirichlet(np.full(n_used, 0.2 if concentrate else 5.0))
    idx = jnp.asarray(rng.choice(used, size=(_T, _K), p=p).astype(np.int32))
    x = jnp.asarray(rng.standard_normal((_T, _H)).astype(np.float32))
    w = jnp.asarray(rng.uniform(0.1, 2.0, (_T, _K)).astype(np.float32))
    up = jnp.asarray((rng.standard_normal((_E, _F, _H)) / np.sqrt(_H)).astype(np.float32))
    down = jnp.asarray((rng.standard_normal((_E, _H, _F)) / np.sqrt(_F)).astype(np.float32))
    mask = jnp.asarray(rng.uniform(0.0, 1.0, _F).astype(np.float32))
    cot = jnp.asarray(rng.standard_normal((_T, _H)).astype(np.float32))
    g = check_against_dense(blocked_fn(B), x, idx, w, up, down, mask, cot, f"B={B}")
    for e in sorted(set(range(_E)) - set(np.asarray(idx).ravel().tolist())):
        assert not np.any(np.asarray(g[2][e])) and not np.any(np.asarray(g[3][e]))


def test_bf16_inputs(np_rng):
    """bf16 x/up/down/ffn_mask: matmuls in bf16, combine in fp32. Compared with the fp32 oracle on
    the same bf16-rounded inputs at the looser ``BF16_TOL`` (relative to the output / gradient scale)."""
    T, H, E, F, k = 48, 32, 8, 24, 2
    x, idx, w, up, down = make_inputs(np_rng, T, H, E, F, k, list(range(E)), dtype=jnp.bfloat16)
    mask = jnp.asarray(np_rng.uniform(0.5, 1.0, F), jnp.bfloat16)
    cot = jnp.asarray(np_rng.standard_normal((T, H)).astype(np.float32))
    g = check_against_dense(blocked_fn(8), x, idx, w, up, down, mask, cot, "bf16", rtol=BF16_TOL,
                            grad_rtol=BF16_TOL, oracle_cast=lambda a: a.astype(jnp.float32))
    assert [a.dtype for a in g] == [jnp.bfloat16, jnp.float32, jnp.bfloat16, jnp.bfloat16, jnp.bfloat16]


def test_block_layout(np_rng):
    """Every block holds one expert's rows; real rows are the expert-sorted assignments; padding
    rows are flagged and not referenced by any assignment; the static bound holds."""
    T, k, E, B = 37, 3, 9, 4
    idx = np.stack([np_rng.choice([0, 2, 3, 7], size=k, replace=False) for _ in range(T)]).astype(np.int32)
    be, row_assign, valid, assign_row, sched = jax.jit(blocked._layout, static_argnums=(1, 2))(jnp.asarray(idx), E, B)
    be, row_assign, valid, assign_row = map(np.asarray, (be, row_assign, valid, assign_row))
    blk_start, nblk, experts, n_nonempty = map(np.asarray, sched)
    flat = idx.ravel()
    sizes = np.bincount(flat, minlength=E)
    n_used = int(np.sum(-(-sizes // B)))
    assert be.shape == (blocked.num_blocks(T * k, E, B),) and n_used <= be.shape[0]
    np.testing.assert_array_equal(nblk, -(-sizes // B))
    np.testing.assert_array_equal(experts[:n_nonempty], [0, 2, 3, 7])
    for e in range(E):
        assert np.all(be[blk_start[e]:blk_start[e] + nblk[e]] == e)
    assert np.all(np.diff(be[:n_used]) >= 0)
    real = row_assign[valid]
    np.testing.assert_array_equal(real, np.argsort(flat, kind="stable"))       # stable sort order
    rows_expert = np.repeat(be, B)
    np.testing.assert_array_equal(flat[real], rows_expert[valid])              # each row in its expert's block
    assert not valid[n_used * B:].any()                                        # unused blocks: all padding
    np.testing.assert_array_equal(row_assign[assign_row], np.arange(T * k))    # assignment -> its row
    assert valid[assign_row].all()
    for e in range(E):                                                         # whole blocks per expert
        assert np.sum(be[:n_used] == e) == -(-sizes[e] // B)


def test_default_block_rows():
    assert blocked.default_block_rows(2048 * 4, 16) == 64     # small preset, 2x1024 tokens
    assert blocked.default_block_rows(2048 * 6, 128) == 16    # Nano-like ratios
    assert blocked.default_block_rows(256 * 4, 16) == 16      # small preset, 2x128 tokens
    for n, e in [(1, 1), (4, 128), (10**7, 1)]:
        assert blocked.default_block_rows(n, e) in (16, 32, 64, 128, 256)


def test_zero_tokens():
    out = expert_ffn_blocked(jnp.zeros((0, 8)), jnp.zeros((0, 2), jnp.int32), jnp.zeros((0, 2)),
                             jnp.ones((3, 4, 8)), jnp.ones((3, 8, 4)))
    assert out.shape == (0, 8) and out.dtype == jnp.float32


def test_dispatch_blocked_reference_and_auto(np_rng, monkeypatch):
    """``impl="blocked"`` runs the blocked path; ``"reference"`` resolves to it on CPU, to ragged
    elsewhere; ``"auto"`` to the reference on CPU and to the Pallas kernels on GPU/TPU."""
    x, idx, w, up, down = make_inputs(np_rng, 9, 8, 4, 6, 2, [0, 1, 3])
    want = expert_ffn_dense(x, idx, w, up, down)
    _close(jax.jit(expert_ffn, static_argnames="impl")(x, idx, w, up, down, impl="blocked"), want, RTOL)
    called = []
    monkeypatch.setattr(reference, "expert_ffn_blocked", lambda *a: called.append("blocked") or want)
    monkeypatch.setattr(reference, "expert_ffn_ragged", lambda *a: called.append("ragged") or want)
    monkeypatch.setattr(reference, "_expert_ffn_pallas", lambda *a, **kw: called.append("pallas") or want)
    for impl in ("reference", "auto"):
        for backend in ("cpu", "gpu", "tpu"):
            monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
            expert_ffn(x, idx, w, up, down, impl=impl)
    assert called == ["blocked", "ragged", "ragged", "blocked", "pallas", "pallas"]


def test_config_accepts_blocked():
    cfg = sej.ModelConfig.preset("tiny").with_updates(moe_impl="blocked")
    assert cfg.moe_impl == "blocked"
    with pytest.raises(sej.ConfigError):
        sej.ModelConfig.preset("tiny").with_updates(moe_impl="megablocks")


def test_config_lists_exactly_the_dispatchable_impls():
    from star_elastic_jax.config import MOE_IMPLS
    from star_elastic_jax.kernels.moe.reference import _IMPLS

    assert set(MOE_IMPLS) == set(_IMPLS)


def test_output_width_may_differ_from_input_width():
    """``down [E, O, F]`` with O != H (importance ranking reads fc2 inputs through an identity)."""
    import numpy as np

    from star_elastic_jax.kernels.moe import expert_ffn_blocked, expert_ffn_dense

    r = np.random.default_rng(0)
    T, k, E, H, F = 9, 2, 4, 8, 6
    x = jnp.asarray(r.normal(size=(T, H)), jnp.float32)
    idx = jnp.asarray(r.integers(0, E, (T, k)), jnp.int32)
    w = jnp.asarray(r.uniform(size=(T, k)), jnp.float32)
    up = jnp.asarray(r.normal(size=(E, F, H)), jnp.float32)
    eye = jnp.broadcast_to(jnp.eye(F), (E, F, F))
    np.testing.assert_allclose(np.asarray(expert_ffn_blocked(x, idx, w, up, eye, block_rows=4)),
                               np.asarray(expert_ffn_dense(x, idx, w, up, eye)), rtol=1e-5, atol=1e-5)
