"""SSD forward/backward Pallas kernels for GPUs, lowered through Triton.

One program per ``(batch, head)``; it walks the chunks with ``lax.fori_loop`` and keeps the ``[p, n]``
fp32 state in registers, so the inter-chunk recurrence costs no HBM round trip (unlike mamba_ssm's
separate state-passing kernel). The forward stores the state entering every chunk (the backward's
only residual); the backward walks the chunks in reverse carrying the state cotangent.

Arrays stay in the model's ``[b, L, h, ...]`` layout: a program's block is one head's (or group's)
``[L, p]`` strided slice, and chunks are ``pl.ds`` row windows of it, so the wrapper never transposes.
Per-token scalars (``dt``, document ids) are loaded as ``[q, 1]`` columns.

Triton constraints honoured here: every loaded/stored tile is a power of two and every ``dot`` dim is
>= 16 (the wrapper pads ``p``, ``n`` and the chunk); no scalar prefetch or scratch (a traced head
limit is an ordinary ``int32[1]`` input). ``plgpu.CompilerParams`` must be given: without it JAX 0.10
lowers ``pallas_call`` on CUDA through Mosaic GPU instead of Triton.

Elastic heads: a static head limit shrinks the grid to the active heads (``head_of`` maps a program
to its head inside the index maps, so nothing is gathered) and the full-size outputs alias zero
buffers; a traced limit keeps the full grid and inactive programs only write zeros.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from star_elastic_jax.kernels.ssd.chunk_math import chunk_backward, chunk_forward

_F32 = jnp.float32
# 3xTF32 keeps fp32 accuracy (the reference parity bar is 5e-5) on tensor cores; plain TF32 (Triton's
# default for fp32) would lose ~3 decimal digits. CPU interpret mode only knows exact fp32.
_GPU_PRECISION = lax.DotAlgorithmPreset.TF32_TF32_F32_X3
_INTERPRET_PRECISION = lax.Precision.HIGHEST
# Starting points for the H100 target shape (p 64, n 128); tune with the benchmark. A program holds
# the [p, n] state plus several [q, q] and [q, n] fp32 tiles in registers: at q = 128 that is ~350
# registers per thread with 8 warps (spills), at q = 64 ~150. The chunk length does not change the
# math, so the wrapper caps it here.
MAX_CHUNK = 64
NUM_WARPS = 8
NUM_STAGES = 2


def _launch(kernel, grid, in_specs, out_specs, out_shape, args, aliases, interpret, name):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        input_output_aliases=aliases, interpret=interpret, name=name,
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
    )(*args)


def _split_refs(refs, names):
    """Name the kernel refs; ``names`` lists them in order, ``None`` entries are absent refs."""
    it = iter(refs)
    return {name: (next(it) if present else None) for name, present in names}, list(it)


def _zero_fill(ref, q, n_chunks):
    """Write zeros over a ``[L, w]`` ref, one ``[q, w]`` chunk at a time (tiles must be powers of 2)."""
    def body(ci, carry):
        ref[pl.ds(pl.multiple_of(ci * q, q), q), :] = jnp.zeros((q, ref.shape[1]), ref.dtype)
        return carry
    lax.fori_loop(0, n_chunks, body, 0)


def _run_if_active(run, zero, head, heads_per_group, hl_ref):
    """Static head limit (``hl_ref`` None): every program is active. Traced: skip inactive heads."""
    if hl_ref is None:
        run()
        return
    active = lax.rem(head, heads_per_group) < hl_ref[0]
    pl.when(active)(run)
    pl.when(jnp.logical_not(active))(zero)


def _fwd_kernel(*refs, q, n_chunks, r, head_of, traced, has_doc, has_init, precision):
    names = [("a", True), ("d", True), ("hl", traced), ("x", True), ("dt", True), ("doc", has_doc),
             ("b", True), ("c", True), ("s0", has_init)]
    ins, rest = _split_refs(refs, names)
    y_ref, final_ref, states_ref = rest[-3:]      # earlier extras are aliased zero buffers
    head = head_of(pl.program_id(1))
    a_coef, d_coef = ins["a"][head], ins["d"][head]
    p, n = final_ref.shape

    def run():
        def body(ci, state):
            rows = pl.ds(pl.multiple_of(ci * q, q), q)
            doc = ins["doc"][rows, :] if has_doc else None
            states_ref[ci] = state
            y, state = chunk_forward(ins["x"][rows, :], ins["dt"][rows, :], doc, ins["b"][rows, :],
                                     ins["c"][rows, :], state, a_coef, d_coef, precision=precision)
            y_ref[rows, :] = y
            return state
        s0 = ins["s0"][...].astype(_F32) if has_init else jnp.zeros((p, n), _F32)
        final_ref[...] = lax.fori_loop(0, n_chunks, body, s0)

    def zero():
        _zero_fill(y_ref, q, n_chunks)
        final_ref[...] = jnp.zeros((p, n), _F32)

    _run_if_active(run, zero, head, r, ins["hl"])


def _bwd_kernel(*refs, q, n_chunks, r, head_of, traced, has_doc, precision):
    names = [("a", True), ("d", True), ("hl", traced), ("x", True), ("dt", True), ("doc", has_doc),
             ("b", True), ("c", True), ("states", True), ("dy", True), ("dfinal", True)]
    ins, rest = _split_refs(refs, names)
    dx_ref, ddt_ref, da_ref, db_ref, dc_ref, ds0_ref = rest[-6:]
    head = head_of(pl.program_id(1))
    a_coef, d_coef = ins["a"][head], ins["d"][head]

    def run():
        def body(i, dstate):
            ci = n_chunks - 1 - i
            rows = pl.ds(pl.multiple_of(ci * q, q), q)
            doc = ins["doc"][rows, :] if has_doc else None
            dx, ddt, da, db, dc, dstate = chunk_backward(
                ins["x"][rows, :], ins["dt"][rows, :], doc, ins["b"][rows, :], ins["c"][rows, :],
                ins["states"][ci], ins["dy"][rows, :], dstate, a_coef, d_coef, precision=precision)
            dx_ref[rows, :] = dx
            ddt_ref[rows, :] = ddt
            da_ref[rows, :] = da
            db_ref[rows, :] = db
            dc_ref[rows, :] = dc
            return dstate
        ds0_ref[...] = lax.fori_loop(0, n_chunks, body, ins["dfinal"][...].astype(_F32))

    def zero():
        for ref in (dx_ref, ddt_ref, da_ref, db_ref, dc_ref):
            _zero_fill(ref, q, n_chunks)
        ds0_ref[...] = jnp.zeros(ds0_ref.shape, _F32)

    _run_if_active(run, zero, head, r, ins["hl"])


class _Layout:
    """Grid and index maps shared by the two kernels. Arrays: x/y ``[b, Lp, h, p]``, dt ``[b, Lp, h]``,
    doc ``[b, Lp, 1]``, B/C ``[b, Lp, g, n]``, states ``[b, H, c, p, n]`` (``H`` = heads in the grid)."""

    def __init__(self, x_shape, n_state, q, heads_per_group, head_limit):
        self.b, self.seq, self.h, self.p = x_shape
        self.n, self.q, self.r = n_state, q, heads_per_group
        self.n_chunks = self.seq // q
        self.static_limit = head_limit is not None and head_limit < heads_per_group
        limit = head_limit if self.static_limit else heads_per_group
        self.grid_heads = self.h // heads_per_group * limit
        if limit == heads_per_group:
            self.head_of: Callable = lambda j: j
        else:
            self.head_of = lambda j: lax.div(j, limit) * heads_per_group + lax.rem(j, limit)

    def spec(self, kind):
        head_of, r = self.head_of, self.r
        seq, p, n, c, h = self.seq, self.p, self.n, self.n_chunks, self.h
        return {
            "scalar_per_head": pl.BlockSpec((h,), lambda bi, j: (0,)),
            "hl": pl.BlockSpec((1,), lambda bi, j: (0,)),
            "x": pl.BlockSpec((None, seq, None, p), lambda bi, j: (bi, 0, head_of(j), 0)),
            "dt": pl.BlockSpec((None, seq, 1), lambda bi, j: (bi, 0, head_of(j))),
            "doc": pl.BlockSpec((None, seq, 1), lambda bi, j: (bi, 0, 0)),
            "bc": pl.BlockSpec((None, seq, None, n), lambda bi, j: (bi, 0, lax.div(head_of(j), r), 0)),
            "bc_part": pl.BlockSpec((None, seq, None, n), lambda bi, j: (bi, 0, j, 0)),
            "state": pl.BlockSpec((None, None, p, n), lambda bi, j: (bi, head_of(j), 0, 0)),
            "states": pl.BlockSpec((None, None, c, p, n), lambda bi, j: (bi, j, 0, 0, 0)),
        }[kind]

    def outputs(self, kinds_shapes, first_arg):
        """Out specs/shapes; with a static head limit the full-size outputs alias zero inputs."""
        specs = [self.spec(kind) for kind, _, _ in kinds_shapes]
        shapes = [jax.ShapeDtypeStruct(shape, _F32) for _, shape, _ in kinds_shapes]
        extra_specs, extra_args, aliases = [], [], {}
        if self.static_limit:
            for i, (kind, shape, full_size) in enumerate(kinds_shapes):
                if full_size:
                    aliases[first_arg + len(extra_args)] = i
                    extra_specs.append(self.spec(kind))
                    extra_args.append(jnp.zeros(shape, _F32))
        return specs, shapes, extra_specs, extra_args, aliases


def _common(layout, x, dt, doc, b_mat, c_mat, a_vec, d_vec, hl):
    specs = [layout.spec("scalar_per_head")] * 2 + ([layout.spec("hl")] if hl is not None else [])
    args = [a_vec.astype(_F32), d_vec.astype(_F32)] + ([hl] if hl is not None else [])
    specs += [layout.spec("x"), layout.spec("dt")] + ([layout.spec("doc")] if doc is not None else [])
    args += [x, dt] + ([doc] if doc is not None else [])
    return specs + [layout.spec("bc")] * 2, args + [b_mat, c_mat]


def forward(x, dt, doc, b_mat, c_mat, a_vec, d_vec, s0, hl, *, q, heads_per_group, head_limit,
            interpret):
    """Forward kernel on padded ``[b, Lp, h, p]``-layout inputs.

    ``doc``/``s0``/``hl`` may be None; ``hl`` (``int32[1]``) is the traced head limit, ``head_limit``
    the static one (None when traced or unlimited). Returns ``(y [b, Lp, h, p], final [b, h, p, n],
    states [b, H, c, p, n])``, fp32, ``H`` the heads in the grid.
    """
    layout = _Layout(x.shape, b_mat.shape[-1], q, heads_per_group, head_limit)
    specs, args = _common(layout, x, dt, doc, b_mat, c_mat, a_vec, d_vec, hl)
    if s0 is not None:
        specs, args = specs + [layout.spec("state")], args + [s0]
    b, seq, h, p, n = layout.b, layout.seq, layout.h, layout.p, layout.n
    out_specs, out_shape, extra_specs, extra_args, aliases = layout.outputs(
        [("x", (b, seq, h, p), True), ("state", (b, h, p, n), True),
         ("states", (b, layout.grid_heads, layout.n_chunks, p, n), False)], len(args))
    kernel = functools.partial(
        _fwd_kernel, q=q, n_chunks=layout.n_chunks, r=heads_per_group, head_of=layout.head_of,
        traced=hl is not None, has_doc=doc is not None, has_init=s0 is not None,
        precision=_INTERPRET_PRECISION if interpret else _GPU_PRECISION)
    return _launch(kernel, (b, layout.grid_heads), specs + extra_specs, out_specs, out_shape,
                   args + extra_args, aliases, interpret, "ssd_fwd_triton")


def backward(x, dt, doc, b_mat, c_mat, a_vec, d_vec, states, dy, dfinal, hl, *, q, heads_per_group,
             head_limit, interpret):
    """Backward kernel. Returns ``(dx [b, Lp, h, p], ddt [b, Lp, h], da [b, Lp, h],
    db_part [b, Lp, H, n], dc_part [b, Lp, H, n], ds0 [b, h, p, n])``, fp32, where the B/C partials
    are per grid head (the caller sums each group's heads) and ``da`` is the cotangent of ``dt*A``.
    """
    layout = _Layout(x.shape, b_mat.shape[-1], q, heads_per_group, head_limit)
    specs, args = _common(layout, x, dt, doc, b_mat, c_mat, a_vec, d_vec, hl)
    specs += [layout.spec("states"), layout.spec("x"), layout.spec("state")]
    args += [states, dy, dfinal]
    b, seq, h, p, n, hg = layout.b, layout.seq, layout.h, layout.p, layout.n, layout.grid_heads
    out_specs, out_shape, extra_specs, extra_args, aliases = layout.outputs(
        [("x", (b, seq, h, p), True), ("dt", (b, seq, h), True), ("dt", (b, seq, h), True),
         ("bc_part", (b, seq, hg, n), False), ("bc_part", (b, seq, hg, n), False),
         ("state", (b, h, p, n), True)], len(args))
    kernel = functools.partial(
        _bwd_kernel, q=q, n_chunks=layout.n_chunks, r=heads_per_group, head_of=layout.head_of,
        traced=hl is not None, has_doc=doc is not None,
        precision=_INTERPRET_PRECISION if interpret else _GPU_PRECISION)
    return _launch(kernel, (b, hg), specs + extra_specs, out_specs, out_shape, args + extra_args,
                   aliases, interpret, "ssd_bwd_triton")
