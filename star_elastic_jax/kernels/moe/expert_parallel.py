"""Dropless expert-parallel routed-expert FFN (``shard_map`` + ``all_to_all``).

Layout inside the ``shard_map`` (mesh axes ``data, fsdp, expert, tensor``; any may be absent or 1):

* tokens ``x [T, H]``, ``idx / weights [T, k]`` are split over the *token axes*
  ``(data, fsdp, expert)`` and replicated over ``tensor``;
* expert weights ``up [E, F, H]`` / ``down [E, H, F]`` are split on dim 0 over ``expert`` (``E / EP``
  local experts per shard) and, when ``F`` divides, on the FFN dim over ``tensor`` (expert tensor
  parallelism: every tensor shard computes its slice of the FFN and the partial outputs are
  ``psum``-ed over ``tensor``); the ``embed`` dim arrives gathered (FSDP all-gather is inserted by
  XLA at the ``shard_map`` boundary, its transpose is the reduce-scatter of the gradient).

Per shard, each of the ``A = T_local * k`` (token, slot) assignments is written to a send buffer
``[EP, A, H]`` row ``(dest, pos)`` where ``dest`` is the expert shard that owns its expert and
``pos`` its rank among the local assignments going to ``dest``; one tiled ``all_to_all`` over
``expert`` delivers the rows, every shard runs its local experts on the ``EP * A`` received rows with
the single-device :func:`~star_elastic_jax.kernels.moe.reference.expert_ffn` (``k = 1``, weight 1
for real rows and 0 for padding), a second ``all_to_all`` brings the results home, and the routing
weights are applied and the ``k`` slots summed in fp32 -- the same arithmetic as the reference.

**Dropless memory bound.** Shapes must be static, so the buffers are sized for the worst case: all
``A`` local assignments may go to one shard (send side ``[EP * A, H]``) and one shard may receive
all ``A`` assignments of every source (receive side ``[EP * A, H]``), so each MoE layer holds
``2 * EP * T_local * k * H`` activation elements in flight plus the ``[EP * A, F / TP]`` hidden
activations, and the expert GEMMs run on ``EP * A`` rows of which on average ``A`` are real
(padding rows are routed to local expert 0 with weight 0). No token is ever dropped. For Nano
(``T_local = 4096``, ``k = 6``, ``H = 2688``, ``EP = 8``, bf16) that is ~1.06 GB per buffer, ~2.1 GB
per MoE layer (transient under per-layer remat). Exact sizing needs data-dependent shapes (a count
exchange, then ``lax.ragged_all_to_all`` on GPU/TPU would shrink the send side to ``A`` rows): future
work. The ``shard_map`` runs with ``check_vma=False`` so that any per-shard kernel works (the blocked
CPU kernel's ``fori_loop`` carry is not vma-typed); its unchecked transpose rules are exact here.

**Expert placement.** ``placement="contiguous"``: expert ``e`` lives on shard ``e // (E / EP)``
(the layout of a plain ``NamedSharding`` on dim 0 of the natural-order weights; the model uses it).
``placement="strided"`` (SPEC D25): expert ``e`` lives on shard ``e % EP`` as local expert
``e // EP``, which keeps every elastic prefix ``E' < E`` balanced across shards. It needs the
weights *stored* in placement order (``w[placement_order(E, EP, "strided")]``, so that the
contiguous dim-0 shard ``s`` holds experts ``s, s + EP, ...``); ``idx`` stays in natural expert ids.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from star_elastic_jax.errors import ConfigError
from star_elastic_jax.kernels.moe.reference import expert_ffn
from star_elastic_jax.sharding_rules import mesh_axes_of

# The mesh axes come from the one rules table: tokens are split like the activations' batch dim,
# experts like the experts' leading dim, the expert FFN like its ``expert_mlp`` dim.
TOKEN_AXES = mesh_axes_of("batch")
(EXPERT_AXIS,) = mesh_axes_of("expert")
(TENSOR_AXIS,) = mesh_axes_of("expert_mlp")
PLACEMENTS = ("contiguous", "strided")


def placement_order(n_experts: int, ep: int, placement: str = "contiguous") -> np.ndarray:
    """Storage order for ``placement``: stored row ``r`` holds natural expert ``order[r]``.

    Contiguous is the identity; strided puts experts ``s, s + ep, s + 2 ep, ...`` in block ``s``."""
    _check_placement(placement)
    if n_experts % ep:
        raise ConfigError("expert", ep, f"must divide the number of experts {n_experts}")
    if placement == "contiguous":
        return np.arange(n_experts)
    return np.arange(n_experts).reshape(n_experts // ep, ep).T.reshape(-1)


def _check_placement(placement: str) -> None:
    if placement not in PLACEMENTS:
        raise ConfigError("placement", placement, f"one of {PLACEMENTS}")


def active_mesh():
    """The mesh set by ``jax.set_mesh`` (abstract inside a trace), or None when none is active."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return mesh


def _axis_size(mesh, name: str) -> int:
    return int(dict(zip(mesh.axis_names, mesh.axis_sizes)).get(name, 1))


def uses_expert_parallel(mesh) -> bool:
    """True when ``mesh`` is one of ours (has an ``expert`` axis), spans more than one device and is
    not already (partly) manual, i.e. we are not inside a caller's own ``shard_map``.

    With ``expert == 1`` the ``shard_map`` still pays: every shard runs the MoE on its own tokens
    instead of XLA gathering all tokens for the global sort of the single-device path."""
    return (mesh is not None and EXPERT_AXIS in mesh.axis_names and math.prod(mesh.axis_sizes) > 1
            and all(t != AxisType.Manual for t in mesh.axis_types))


def expert_ffn_parallel(x, idx, weights, up, down, *, mesh=None, impl: str = "ragged", ffn_mask=None,
                        placement: str = "contiguous", k_limit=None, ffn_limit=None):
    """Expert-parallel :func:`expert_ffn`: same contract (``x [T, H]``, ``idx / weights [T, k]``,
    ``up [E, F, H]``, ``down [E, H, F]``, ``ffn_mask [F]``; returns fp32 ``[T, H]``), same result.

    ``mesh``: a Mesh / AbstractMesh (default: the active one). ``impl`` is the per-shard
    :func:`expert_ffn` implementation. ``T`` need not divide the token shards (padded rows carry
    weight 0); ``E`` not divisible by the ``expert`` axis falls back to replicated experts (every
    shard computes its own tokens, no exchange); ``F`` not divisible by ``tensor`` replicates the FFN
    dim (the tensor shards then compute redundantly). Those fallbacks match ``train.sharding``'s rules.

    ``k_limit`` / ``ffn_limit`` (elastic, see :func:`expert_ffn`) reach the per-shard kernels: the
    hidden dim is never split here; when the FFN dim is split over ``tensor`` (contiguous blocks of
    ``F / tp`` channels), each shard gets the part of the kept prefix that falls in its block.
    """
    _check_placement(placement)
    mesh = active_mesh() if mesh is None else mesh
    if mesh is None:
        raise ConfigError("mesh", None, "expert_ffn_parallel needs a mesh (pass one or use jax.set_mesh)")
    T = idx.shape[0]
    E, F, _ = up.shape
    ep = _axis_size(mesh, EXPERT_AXIS)
    if E % ep:
        if placement == "strided":
            raise ConfigError("expert", ep, f"strided placement needs it to divide the number of experts {E}")
        ep = 1  # replicated experts (matches the rules table's divisibility fallback)
    tp = _axis_size(mesh, TENSOR_AXIS)
    tensor = TENSOR_AXIS if tp > 1 and F % tp == 0 else None
    token_axes = tuple(a for a in TOKEN_AXES if _axis_size(mesh, a) > 1)
    n_tok = math.prod(_axis_size(mesh, a) for a in token_axes)
    pad = (-T) % n_tok
    if pad:  # padded rows: token 0's zeros, routed anywhere with weight 0 -> contribute exactly 0
        x = jnp.pad(x, ((0, pad), (0, 0)))
        idx = jnp.pad(idx, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
    tok = P(token_axes or None)
    expert = EXPERT_AXIS if ep > 1 else None
    in_specs = (P(token_axes or None, None), tok, tok, P(expert, tensor, None), P(expert, None, tensor))
    # cast before the boundary, so the FSDP all-gather moves compute-dtype weights (the kernels cast anyway)
    args = (x, idx, weights, up.astype(x.dtype), down.astype(x.dtype))
    extra_names = []
    for name, value in (("ffn_mask", ffn_mask), ("k_limit", k_limit), ("ffn_limit", ffn_limit)):
        if value is None or (name != "ffn_mask" and isinstance(value, int)):
            continue  # python-int limits are static: closed over below
        in_specs = in_specs + ((P(tensor),) if name == "ffn_mask" else (P(),))
        args = args + (value,)
        extra_names.append(name)

    def local(x, idx, weights, up, down, *extra):
        kw = {"ffn_mask": None, "k_limit": k_limit, "ffn_limit": ffn_limit}
        kw.update(zip(extra_names, extra))
        if tensor is not None and kw["ffn_limit"] is not None:
            f_local = F // tp
            kw["ffn_limit"] = jnp.clip(jnp.asarray(kw["ffn_limit"], jnp.int32) - jax.lax.axis_index(tensor) * f_local,
                                       0, f_local)
        out = _local_dispatch(x, idx, weights, up, down, kw["ffn_mask"], ep=ep, impl=impl, placement=placement,
                              expert_axis=EXPERT_AXIS if ep > 1 else None, k_limit=kw["k_limit"],
                              ffn_limit=kw["ffn_limit"])
        return out if tensor is None else jax.lax.psum(out, tensor)

    # check_vma=False: per-shard kernels (e.g. the blocked fori_loop with a zeros carry) need not be
    # vma-typed; the unchecked transpose (output ct divided by, input ct psum-ed over unmentioned
    # axes, psum transposed to psum) is exact for this body (outputs are replicated over tensor).
    fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P(token_axes or None, None), check_vma=False)
    out = fn(*args)
    return out[:T] if pad else out


def _local_dispatch(x, idx, weights, up, down, ffn_mask, *, ep, impl, placement, expert_axis, k_limit=None,
                    ffn_limit=None):
    """One shard: route the local assignments to their expert shards, run, return, combine (fp32).

    Returns the *partial* (this tensor shard's FFN slice) fp32 ``[T_local, H]``."""
    Tl, k = idx.shape
    H = x.shape[1]
    w32 = weights.astype(jnp.float32)
    if expert_axis is None:  # every expert is local: the single-device kernel on local tokens
        return expert_ffn(x, idx, w32, up, down, impl=impl, ffn_mask=ffn_mask, k_limit=k_limit, ffn_limit=ffn_limit)
    n_local = up.shape[0]
    A = Tl * k
    flat = idx.reshape(A)
    if placement == "strided":
        dest, local_e = flat % ep, flat // ep
    else:
        dest, local_e = flat // n_local, flat % n_local
    # rank of each assignment among the local ones with the same destination
    onehot = jax.nn.one_hot(dest, ep, dtype=jnp.int32)
    pos = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), dest[:, None], axis=1)[:, 0] - 1
    slot = dest * A + pos  # row in the [EP * A] send buffer; unique per assignment
    rows = x[jnp.arange(A) // k]
    send_x = jnp.zeros((ep * A, H), x.dtype).at[slot].set(rows, unique_indices=True)
    send_e = jnp.zeros((ep * A,), jnp.int32).at[slot].set(local_e, unique_indices=True)
    send_v = jnp.zeros((ep * A,), jnp.float32).at[slot].set(1.0, unique_indices=True)

    def exchange(a):
        return jax.lax.all_to_all(a, expert_axis, 0, 0, tiled=True)

    recv_x, recv_e, recv_v = exchange(send_x), exchange(send_e), exchange(send_v)
    # k = 1, weight 1 (real) / 0 (padding): the unweighted expert output of each real row, which the
    # reference also rounds to x.dtype before weighting, so the return trip in x.dtype is lossless.
    out = expert_ffn(recv_x, recv_e[:, None], recv_v[:, None], up, down, impl=impl, ffn_mask=ffn_mask,
                     k_limit=k_limit, ffn_limit=ffn_limit)
    back = exchange(out.astype(x.dtype))
    y = back[slot].astype(jnp.float32) * w32.reshape(A, 1)
    return y.reshape(Tl, k, H).sum(axis=1)


def routed_expert_ffn(x, idx, weights, up, down, *, impl: str = "ragged", ffn_mask=None, k_limit=None,
                      ffn_limit=None):
    """The MoE block's entry point: :func:`expert_ffn` unless a multi-device mesh with an ``expert``
    axis is active (``jax.set_mesh``), then :func:`expert_ffn_parallel` on that mesh.

    The elastic limits (see :func:`expert_ffn`) reach the kernels on both paths (see
    :func:`expert_ffn_parallel` for the one case that refuses a limit)."""
    mesh = active_mesh()
    if not uses_expert_parallel(mesh):
        return expert_ffn(x, idx, weights, up, down, impl=impl, ffn_mask=ffn_mask, k_limit=k_limit,
                          ffn_limit=ffn_limit)
    return expert_ffn_parallel(x, idx, weights, up, down, mesh=mesh, impl=impl, ffn_mask=ffn_mask, k_limit=k_limit,
                               ffn_limit=ffn_limit)
