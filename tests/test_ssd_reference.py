"""Chunked SSD (``ssd_reference``) vs a float64 numpy token-by-token recurrence, document resets,
gradients, and the single-step decode update.

Oracle (SPEC 1.2 step 5): ``S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T``; ``y_t = S_t C_t + D x_t``;
head ``h`` reads B/C group ``h // (H / G)``; the state is zeroed before the first token of a document.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from star_elastic_jax.kernels.ssd import document_starts, ssd, ssd_reference, ssd_step

ATOL = 5e-5  # SPEC 1.3 acceptance (fp32 vs the recurrence)

ssd_jit = jax.jit(ssd_reference, static_argnames=("chunk_size",))
step_jit = jax.jit(ssd_step)


def ssd_oracle(x, dt, A, B, C, D, initial_state=None, segment_ids=None):
    """float64 numpy recurrence, one token at a time."""
    x, dt, A, B, C, D = (np.asarray(t, np.float64) for t in (x, dt, A, B, C, D))
    b, L, h, p = x.shape
    g, n = B.shape[-2:]
    grp = np.arange(h) // (h // g)
    S = np.zeros((b, h, p, n)) if initial_state is None else np.array(initial_state, np.float64)
    y = np.zeros((b, L, h, p))
    for t in range(L):
        if segment_ids is not None and t > 0:
            S[np.asarray(segment_ids)[:, t] != np.asarray(segment_ids)[:, t - 1]] = 0.0
        decay = np.exp(dt[:, t] * A)                                  # [b, h]
        Bh, Ch = B[:, t][:, grp], C[:, t][:, grp]                      # [b, h, n]
        S = decay[..., None, None] * S + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, :, None, :]
        y[:, t] = np.einsum("bhpn,bhn->bhp", S, Ch) + D[:, None] * x[:, t]
    return y, S


def random_inputs(rng, b, L, h, p, g, n, initial=False):
    x = rng.standard_normal((b, L, h, p)).astype(np.float32)
    dt = rng.uniform(0.01, 0.3, (b, L, h)).astype(np.float32)
    A = -rng.uniform(0.2, 3.0, (h,)).astype(np.float32)
    B = rng.standard_normal((b, L, g, n)).astype(np.float32)
    C = rng.standard_normal((b, L, g, n)).astype(np.float32)
    D = rng.standard_normal((h,)).astype(np.float32)
    s0 = rng.standard_normal((b, h, p, n)).astype(np.float32) if initial else None
    return x, dt, A, B, C, D, s0


# (b, L, h, p, g, n, chunk)
SHAPES = [
    (2, 21, 4, 8, 2, 16, 8),   # L not a multiple of the chunk (the tiny model's case)
    (1, 5, 2, 4, 1, 8, 8),     # L < chunk, single group
    (2, 32, 6, 4, 3, 8, 8),    # L a multiple of the chunk, 3 groups of 2 heads
    (1, 16, 4, 4, 1, 4, 16),   # L == chunk
    (1, 37, 8, 8, 4, 8, 16),   # 4 groups, ragged last chunk
    (2, 1, 2, 4, 2, 4, 4),     # one token, one head per group
    (1, 19, 3, 2, 3, 5, 1),    # chunk 1 (pure recurrence through the inter-chunk scan)
]


@pytest.mark.parametrize("initial", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_L{}_h{}_p{}_g{}_n{}_q{}".format(*s))
def test_matches_recurrence(shape, initial, np_rng):
    *dims, q = shape
    x, dt, A, B, C, D, s0 = random_inputs(np_rng, *dims, initial=initial)
    y, final = ssd_jit(x, dt, A, B, C, D, chunk_size=q, initial_state=s0)
    y_ref, final_ref = ssd_oracle(x, dt, A, B, C, D, initial_state=s0)
    assert y.dtype == jnp.float32 and final.dtype == jnp.float32
    assert y.shape == x.shape and final.shape == (dims[0], dims[2], dims[3], dims[5])
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(final), final_ref, rtol=0, atol=ATOL)


def test_dispatch_matches_reference(np_rng):
    x, dt, A, B, C, D, s0 = random_inputs(np_rng, 1, 13, 4, 4, 2, 4, initial=True)
    for impl in ("reference", "auto"):
        y, final = ssd(x, dt, A, B, C, D, chunk_size=4, initial_state=s0, impl=impl)
        y_ref, final_ref = ssd_oracle(x, dt, A, B, C, D, initial_state=s0)
        np.testing.assert_allclose(np.asarray(y), y_ref, rtol=0, atol=ATOL)
        np.testing.assert_allclose(np.asarray(final), final_ref, rtol=0, atol=ATOL)


def test_head_to_group_mapping_is_group_major(np_rng):
    """Heads 0..r-1 read group 0: with B/C of group 1 zeroed only heads r..h-1 lose their SSM term."""
    x, dt, A, B, C, D, _ = random_inputs(np_rng, 1, 9, 4, 2, 2, 3)
    B[:, :, 1] = 0.0
    y, _ = ssd_jit(x, dt, A, B, C, D, chunk_size=4)
    skip = D[:, None] * x  # output with no SSM contribution
    assert np.abs(np.asarray(y)[:, :, :2] - skip[:, :, :2]).max() > 1e-2
    np.testing.assert_allclose(np.asarray(y)[:, :, 2:], skip[:, :, 2:], atol=1e-6)


# ----------------------------------------------------------------------------- packing
# Row 0: a boundary exactly on a chunk boundary (8) and one mid-chunk (13).
# Row 1: a one-token document and documents that straddle chunks. Labels need not be ordered.
DOCS = [[8, 5, 11], [3, 1, 16, 4]]
PACK_Q = 8


def _segment_ids(lengths, labels=None):
    labels = labels or list(range(len(lengths)))
    return np.concatenate([np.full(n, lab, np.int32) for n, lab in zip(lengths, labels)])


@pytest.fixture(scope="module")
def packed_inputs():
    rng = np.random.default_rng(1234)
    L = sum(DOCS[0])
    assert all(sum(d) == L for d in DOCS)
    x, dt, A, B, C, D, s0 = random_inputs(rng, 2, L, 4, 4, 2, 8, initial=True)
    seg = np.stack([_segment_ids(DOCS[0], [7, 3, 9]), _segment_ids(DOCS[1])])
    return x, dt, A, B, C, D, s0, seg


def _split(lengths):
    starts = np.cumsum([0] + lengths[:-1])
    return [slice(s, s + n) for s, n in zip(starts, lengths)]


@pytest.mark.parametrize("initial", [False, True], ids=["zero_state", "initial_state"])
def test_packed_equals_separate_documents(packed_inputs, initial):
    x, dt, A, B, C, D, s0, seg = packed_inputs
    s0 = s0 if initial else None
    y, final = ssd_jit(x, dt, A, B, C, D, chunk_size=PACK_Q, initial_state=s0, segment_ids=seg)
    y, final = np.asarray(y), np.asarray(final)

    y_oracle, final_oracle = ssd_oracle(x, dt, A, B, C, D, initial_state=s0, segment_ids=seg)
    np.testing.assert_allclose(y, y_oracle, rtol=0, atol=ATOL)
    np.testing.assert_allclose(final, final_oracle, rtol=0, atol=ATOL)

    for row, lengths in enumerate(DOCS):
        for i, sl in enumerate(_split(lengths)):
            r = slice(row, row + 1)
            doc_s0 = s0[r] if (initial and i == 0) else None
            yd, fd = ssd_oracle(x[r, sl], dt[r, sl], A, B[r, sl], C[r, sl], D, initial_state=doc_s0)
            np.testing.assert_allclose(y[r, sl], yd, rtol=0, atol=ATOL, err_msg=f"row {row} doc {i}")
            if i == len(lengths) - 1:
                np.testing.assert_allclose(final[r], fd, rtol=0, atol=ATOL)


def test_packing_is_not_a_no_op(packed_inputs):
    """Without segment_ids the later documents see the earlier ones (so the test above can fail)."""
    x, dt, A, B, C, D, _, seg = packed_inputs
    y_seg, _ = ssd_jit(x, dt, A, B, C, D, chunk_size=PACK_Q, segment_ids=seg)
    y_all, _ = ssd_jit(x, dt, A, B, C, D, chunk_size=PACK_Q)
    sl = _split(DOCS[0])[1]
    assert np.abs(np.asarray(y_seg)[0, sl] - np.asarray(y_all)[0, sl]).max() > 100 * ATOL


def test_document_starts():
    seg = jnp.asarray([[4, 4, 1, 1, 1, 4], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(document_starts(seg)),
                                  [[False, False, True, False, False, True], [False] * 6])


# ----------------------------------------------------------------------------- gradients
def _scan_ssd(x, dt, A, B, C, D, initial_state, segment_ids):
    """Independent JAX recurrence (lax.scan over tokens), differentiable: the gradient oracle."""
    b, L, h, p = x.shape
    g = B.shape[2]
    grp = jnp.arange(h) // (h // g)
    keep = jnp.concatenate([jnp.ones((b, 1)), (segment_ids[:, 1:] == segment_ids[:, :-1]).astype(jnp.float32)], 1)

    def step(S, inp):
        xt, dtt, Bt, Ct, kt = inp
        S = kt[:, None, None, None] * S
        S = jnp.exp(dtt * A)[..., None, None] * S + (dtt[..., None] * xt)[..., None] * Bt[:, grp][:, :, None, :]
        return S, jnp.einsum("bhpn,bhn->bhp", S, Ct[:, grp]) + D[:, None] * xt

    final, ys = jax.lax.scan(step, initial_state, tuple(jnp.moveaxis(t, 1, 0) for t in (x, dt, B, C, keep)))
    return jnp.moveaxis(ys, 0, 1), final


def _loss(fn, wy, wf, x, dt, A, B, C, D, s0, seg):
    y, final = fn(x, dt, A, B, C, D, s0, seg)
    return jnp.sum(y * wy) + jnp.sum(final * wf)


def _chunked(x, dt, A, B, C, D, s0, seg):
    return ssd_reference(x, dt, A, B, C, D, chunk_size=PACK_Q, initial_state=s0, segment_ids=seg)


@pytest.fixture(scope="module")
def grads(packed_inputs):
    x, dt, A, B, C, D, s0, seg = packed_inputs
    rng = np.random.default_rng(99)
    wy = rng.standard_normal(x.shape).astype(np.float32)
    wf = rng.standard_normal(s0.shape).astype(np.float32)
    argnums = tuple(range(2, 9))  # x, dt, A, B, C, D, s0
    out = {}
    for name, fn in (("chunked", _chunked), ("scan", _scan_ssd)):
        g = jax.jit(jax.grad(functools.partial(_loss, fn), argnums=argnums))
        out[name] = [np.asarray(t) for t in g(wy, wf, x, dt, A, B, C, D, s0, seg)]
    return out


def test_gradients_finite_with_segments(grads):
    for name, g in zip(("x", "dt", "A", "B", "C", "D", "initial_state"), grads["chunked"]):
        assert np.all(np.isfinite(g)), name
        assert np.abs(g).max() > 0, name


def test_gradients_match_sequential_scan(grads):
    for name, got, want in zip(("x", "dt", "A", "B", "C", "D", "initial_state"), grads["chunked"], grads["scan"]):
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * scale, err_msg=name)


def test_scan_oracle_matches_numpy(packed_inputs):
    """The gradient oracle itself agrees with the float64 recurrence."""
    x, dt, A, B, C, D, s0, seg = packed_inputs
    y, final = jax.jit(_scan_ssd)(x, dt, A, B, C, D, s0, seg)
    y_ref, final_ref = ssd_oracle(x, dt, A, B, C, D, initial_state=s0, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(final), final_ref, rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- decode step
@pytest.mark.parametrize("initial", [False, True], ids=["zero_state", "initial_state"])
def test_repeated_step_equals_chunked(initial, np_rng):
    b, L, h, p, g, n, q = 2, 21, 4, 4, 2, 8, 8
    x, dt, A, B, C, D, s0 = random_inputs(np_rng, b, L, h, p, g, n, initial=True)
    s0 = s0 if initial else np.zeros_like(s0)
    y_chunk, final_chunk = ssd_jit(x, dt, A, B, C, D, chunk_size=q, initial_state=s0 if initial else None)
    state = jnp.asarray(s0)
    ys = []
    for t in range(L):
        yt, state = step_jit(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        assert state.dtype == jnp.float32
        ys.append(np.asarray(yt))
    np.testing.assert_allclose(np.stack(ys, 1), np.asarray(y_chunk), rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(state), np.asarray(final_chunk), rtol=0, atol=ATOL)
    y_ref, final_ref = ssd_oracle(x, dt, A, B, C, D, initial_state=s0)
    np.testing.assert_allclose(np.stack(ys, 1), y_ref, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(state), final_ref, rtol=0, atol=ATOL)
