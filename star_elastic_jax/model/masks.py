"""The typed elastic-mask pytree the masked forward reads (SPEC 3.5). ``elastic/masks.py`` builds
it (hard masks of a choice, soft mixtures of the router); the model's blocks read named fields.

It is a registered dataclass pytree, so it can be a traced ``jax.jit`` argument or be built inside
the trace. Every field is a leaf. The integer *limits* the kernels use to skip work
(:class:`MambaMasks.head_limit`, :class:`MoEMasks.hidden_limit` / ``ffn_limit``) are Python ints
when the masks are built from a choice inside the trace (static: a Pallas grid shrinks), arrays
when they are traced, and ``None`` for router masks (training needs the gradients of masked-out
units, so nothing may be skipped).

``norm`` fields are ``[eps_factor, scale]`` of the RMSNorm over a masked axis (``elastic/masks.py``
explains the correction that makes a masked model equal its sliced model).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Union

import jax

Array = Any  # jax.Array, numpy array or (limits) int


def _pytree(cls):
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


@_pytree
class HiddenMasks:
    """The hidden (embedding) channels: ``mask [H]`` and the norm factors of every pre-norm."""

    mask: Array
    norm: Array


@_pytree
class MambaMasks:
    """An ``M`` block's heads: ``mask [n_heads * head_dim]`` (z and the x conv), the gated norm's
    factors, and ``head_limit``: active heads per B/C group."""

    mask: Array
    norm: Array
    head_limit: Array | None = None


@_pytree
class AttentionMasks:
    """A ``*`` block's query heads: ``heads [n_q]`` (multiplies each head's output)."""

    heads: Array


@_pytree
class MoEMasks:
    """An ``E`` block: ``experts [E]`` (router scores; masked experts are never selected),
    ``ffn [F]`` (every expert's fc1 output), and the kernels' ``hidden_limit`` / ``ffn_limit``."""

    experts: Array
    ffn: Array
    hidden_limit: Array | None = None
    ffn_limit: Array | None = None


@_pytree
class MLPMasks:
    """A ``-`` block's FFN channels: ``ffn [I]`` (fc1 output)."""

    ffn: Array


MixerMasks = Union[MambaMasks, AttentionMasks, MoEMasks, MLPMasks]


@_pytree
class BlockMasks:
    """One block: ``keep`` (depth: 1 kept, 0 identity) and its mixer's masks."""

    keep: Array
    mixer: MixerMasks


@_pytree
class ElasticMasks:
    """The whole model: the hidden masks and one :class:`BlockMasks` per block, in model order."""

    hidden: HiddenMasks
    layers: tuple[BlockMasks, ...]

    def without_limits(self) -> "ElasticMasks":
        """The same masks with every kernel limit removed (what a router would give)."""
        def strip(b: BlockMasks) -> BlockMasks:
            m = b.mixer
            if isinstance(m, MambaMasks):
                m = dataclasses.replace(m, head_limit=None)
            elif isinstance(m, MoEMasks):
                m = dataclasses.replace(m, hidden_limit=None, ffn_limit=None)
            return dataclasses.replace(b, mixer=m)

        return dataclasses.replace(self, layers=tuple(strip(b) for b in self.layers))
