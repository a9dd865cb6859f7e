"""SSD forward/backward Pallas kernels for TPUs, lowered through Mosaic.

Grid ``(batch, head, chunk)``: batch and head are ``parallel`` (megacore-splittable), the chunk axis
is ``arbitrary`` (sequential), and the ``[p, n]`` fp32 state is carried across it in a VMEM scratch
buffer. Pallas double-buffers the chunk blocks, so the HBM reads of chunk ``c+1`` overlap the math of
chunk ``c``. The forward writes the state entering every chunk (the backward's residual); the backward
visits the chunks in reverse through its index maps (``chunk = c - 1 - i``) carrying the state
cotangent in the scratch buffer.

Layouts (made by the wrapper) respect Mosaic's block rule -- the last two block dims divisible by
(8, 128) or equal to the array's: x/y ``[b, h, Lp, p]`` blocks ``(q, p)``; dt ``[b, h, 1, Lp]`` and
document ids ``[b, 1, Lp]`` blocks ``(1, q)`` (lane-dense rows, hence ``q % 128 == 0`` when compiled
with more than one chunk); B/C ``[b, g, Lp, n]``, read through ``head // (h/g)`` in the index map.

Elastic heads: ``A``, ``D`` and the head limit are scalar-prefetch (SMEM) operands. A static limit
never gets here: the wrapper transposes only the active heads (the transposes are needed anyway), so
the grid covers exactly those. A traced limit keeps the full grid; inactive heads do no math, write
zeros, and their *input* index maps repeat the block of the last active step (the group's last
active head at the last visited chunk), so the pipeline issues no new DMA for them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from star_elastic_jax.kernels.ssd.chunk_math import chunk_backward, chunk_forward

_F32 = jnp.float32
_PRECISION = lax.Precision.HIGHEST   # exact fp32 matmuls (multi-pass on the MXU)


class _Layout:
    """Grid and block specs shared by both kernels. Every grid head is a model head: a static head
    limit never reaches this module (the wrapper slices the active heads while it transposes)."""

    def __init__(self, x_shape, n_state, q, heads_per_group, traced, reverse):
        self.b, self.h, self.seq, self.p = x_shape
        self.n, self.q, self.r, self.traced, self.reverse = n_state, q, heads_per_group, traced, reverse
        self.n_chunks = self.seq // q

    def chunk_of(self, i):
        return self.n_chunks - 1 - i if self.reverse else i

    def input_indices(self, j, i, hl_ref):
        """``(head, chunk)`` whose input blocks step ``(j, i)`` reads. Inactive heads (traced limit)
        repeat the previous active step's blocks -- the group's last active head at the last visited
        chunk -- and identical consecutive block indices make the pipeline skip the copy."""
        chunk = self.chunk_of(i)
        if not self.traced:
            return j, chunk
        limit = hl_ref[0]
        active = lax.rem(j, self.r) < limit
        last_active = j - lax.rem(j, self.r) + jnp.maximum(limit - 1, 0)
        return jnp.where(active, j, last_active), jnp.where(active, chunk, self.chunk_of(self.n_chunks - 1))

    def spec(self, kind):
        """Block spec by kind; index maps get ``(b, head, step, *scalar-prefetch refs)``."""
        q, p, n, r = self.q, self.p, self.n, self.r
        inp, chunk_of = self.input_indices, self.chunk_of

        def head_chunk(index_fn):
            return lambda bi, j, i, hl_ref, *_: index_fn(bi, *inp(j, i, hl_ref))

        maps = {
            "x": ((None, None, q, p), head_chunk(lambda bi, hd, c: (bi, hd, c, 0))),
            "dt": ((None, None, 1, q), head_chunk(lambda bi, hd, c: (bi, hd, 0, c))),
            "doc": ((None, 1, q), head_chunk(lambda bi, hd, c: (bi, 0, c))),
            "bc": ((None, None, q, n), head_chunk(lambda bi, hd, c: (bi, lax.div(hd, r), c, 0))),
            "state": ((None, None, p, n), head_chunk(lambda bi, hd, c: (bi, hd, 0, 0))),
            "states": ((None, None, None, p, n), head_chunk(lambda bi, hd, c: (bi, hd, c, 0, 0))),
            # Outputs: every step owns its block (inactive heads write zeros there).
            "x_out": ((None, None, q, p), lambda bi, j, i, *_: (bi, j, chunk_of(i), 0)),
            "dt_out": ((None, None, 1, q), lambda bi, j, i, *_: (bi, j, 0, chunk_of(i))),
            "part_out": ((None, None, q, n), lambda bi, j, i, *_: (bi, j, chunk_of(i), 0)),
            "state_out": ((None, None, p, n), lambda bi, j, i, *_: (bi, j, 0, 0)),
            "states_out": ((None, None, None, p, n), lambda bi, j, i, *_: (bi, j, chunk_of(i), 0, 0)),
        }
        block, index_map = maps[kind]
        return pl.BlockSpec(block, index_map)

    def call(self, kernel, in_specs, args, outputs, prefetch, interpret, name):
        """Run ``kernel`` over the ``(b, h, chunk)`` grid; ``outputs`` lists ``(spec kind, shape)``."""
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch), grid=(self.b, self.h, self.n_chunks), in_specs=in_specs,
            out_specs=[self.spec(kind) for kind, _ in outputs],
            scratch_shapes=[pltpu.VMEM((self.p, self.n), _F32)])
        return pl.pallas_call(
            kernel, grid_spec=grid_spec, out_shape=[jax.ShapeDtypeStruct(shape, _F32) for _, shape in outputs],
            name=name, interpret=pltpu.InterpretParams() if interpret else False,
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        )(*prefetch, *args)


def _split_refs(refs, names, n_out):
    """Kernel refs after the prefetch refs: named inputs, outputs, scratch."""
    present = [name for name, keep in names if keep]
    ins = dict(zip(present, refs[:len(present)]))
    return ins, refs[-1 - n_out:-1], refs[-1]


def _when_active(layout, hl_ref, run, zero):
    """Run ``run`` on active heads; with a traced limit inactive heads only ``zero`` their outputs."""
    if not layout.traced:
        run()
        return
    active = lax.rem(pl.program_id(1), layout.r) < hl_ref[0]
    pl.when(active)(run)
    pl.when(jnp.logical_not(active))(zero)


def _fwd_kernel(hl_ref, a_ref, d_ref, *refs, layout, has_doc, has_init):
    ins, (y_ref, final_ref, states_ref), state_scr = _split_refs(
        refs, [("x", True), ("dt", True), ("doc", has_doc), ("b", True), ("c", True), ("s0", has_init)], 3)
    head = pl.program_id(1)
    step = pl.program_id(2)

    def run():
        @pl.when(step == 0)
        def _():
            state_scr[...] = ins["s0"][...].astype(_F32) if has_init else jnp.zeros(state_scr.shape, _F32)

        state = state_scr[...]
        states_ref[...] = state
        y, state = chunk_forward(ins["x"][...], ins["dt"][...], ins["doc"][...] if has_doc else None,
                                 ins["b"][...], ins["c"][...], state, a_ref[head], d_ref[head],
                                 precision=_PRECISION)
        y_ref[...] = y
        state_scr[...] = state
        final_ref[...] = state   # resident block: written back once, after the last chunk

    def zero():
        for ref in (y_ref, final_ref, states_ref):
            ref[...] = jnp.zeros(ref.shape, _F32)

    _when_active(layout, hl_ref, run, zero)


def _bwd_kernel(hl_ref, a_ref, d_ref, *refs, layout, has_doc):
    names = [("x", True), ("dt", True), ("doc", has_doc), ("b", True), ("c", True), ("states", True),
             ("dy", True), ("dfinal", True)]
    ins, outs, dstate_scr = _split_refs(refs, names, 6)
    dx_ref, ddt_ref, da_ref, db_ref, dc_ref, ds0_ref = outs
    head = pl.program_id(1)
    step = pl.program_id(2)

    def run():
        @pl.when(step == 0)
        def _():
            dstate_scr[...] = ins["dfinal"][...].astype(_F32)

        dx, ddt, da, db, dc, dstate = chunk_backward(
            ins["x"][...], ins["dt"][...], ins["doc"][...] if has_doc else None, ins["b"][...],
            ins["c"][...], ins["states"][...], ins["dy"][...], dstate_scr[...], a_ref[head], d_ref[head],
            precision=_PRECISION)
        dx_ref[...] = dx
        ddt_ref[...] = ddt
        da_ref[...] = da
        db_ref[...] = db
        dc_ref[...] = dc
        dstate_scr[...] = dstate
        ds0_ref[...] = dstate    # resident block: the value after the last step (chunk 0) is kept

    def zero():
        for ref in outs:
            ref[...] = jnp.zeros(ref.shape, _F32)

    _when_active(layout, hl_ref, run, zero)


def _prefetch(a_vec, d_vec, hl):
    hl = jnp.zeros((1,), jnp.int32) if hl is None else hl
    return [hl, a_vec.astype(_F32), d_vec.astype(_F32)]


def _chunk_inputs(layout, x, dt, doc, b_mat, c_mat):
    specs = [layout.spec("x"), layout.spec("dt")] + ([layout.spec("doc")] if doc is not None else [])
    args = [x, dt] + ([doc] if doc is not None else [])
    return specs + [layout.spec("bc")] * 2, args + [b_mat, c_mat]


def forward(x, dt, doc, b_mat, c_mat, a_vec, d_vec, s0, hl, *, q, heads_per_group, interpret):
    """Forward kernel on ``[b, h, Lp, p]``-layout inputs (see the module docstring for layouts).

    ``doc``/``s0``/``hl`` may be None; ``hl`` (``int32[1]``) is the traced head limit.
    Returns fp32 ``(y [b, h, Lp, p], final [b, h, p, n], states [b, h, c, p, n])``.
    """
    layout = _Layout(x.shape, b_mat.shape[-1], q, heads_per_group, hl is not None, False)
    specs, args = _chunk_inputs(layout, x, dt, doc, b_mat, c_mat)
    if s0 is not None:
        specs, args = specs + [layout.spec("state")], args + [s0]
    b, h, seq, p, n = layout.b, layout.h, layout.seq, layout.p, layout.n
    outputs = [("x_out", (b, h, seq, p)), ("state_out", (b, h, p, n)),
               ("states_out", (b, h, layout.n_chunks, p, n))]
    kernel = functools.partial(_fwd_kernel, layout=layout, has_doc=doc is not None, has_init=s0 is not None)
    return layout.call(kernel, specs, args, outputs, _prefetch(a_vec, d_vec, hl), interpret,
                       "ssd_fwd_mosaic")


def backward(x, dt, doc, b_mat, c_mat, a_vec, d_vec, states, dy, dfinal, hl, *, q, heads_per_group,
             interpret):
    """Backward kernel. Returns fp32 ``(dx [b, h, Lp, p], ddt [b, h, 1, Lp], da [b, h, 1, Lp],
    db_part [b, h, Lp, n], dc_part [b, h, Lp, n], ds0 [b, h, p, n])``: B/C partials per head (the
    caller sums each group's heads), ``da`` the cotangent of ``dt*A``.
    """
    layout = _Layout(x.shape, b_mat.shape[-1], q, heads_per_group, hl is not None, True)
    specs, args = _chunk_inputs(layout, x, dt, doc, b_mat, c_mat)
    specs += [layout.spec("states"), layout.spec("x"), layout.spec("state")]
    args += [states, dy, dfinal]
    b, h, seq, p, n = layout.b, layout.h, layout.seq, layout.p, layout.n
    outputs = [("x_out", (b, h, seq, p)), ("dt_out", (b, h, 1, seq)), ("dt_out", (b, h, 1, seq)),
               ("part_out", (b, h, seq, n)), ("part_out", (b, h, seq, n)), ("state_out", (b, h, p, n))]
    kernel = functools.partial(_bwd_kernel, layout=layout, has_doc=doc is not None)
    return layout.call(kernel, specs, args, outputs, _prefetch(a_vec, d_vec, hl), interpret,
                       "ssd_bwd_mosaic")
