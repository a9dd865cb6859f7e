"""Device mesh, the logical-axis rules table, and parameter / batch shardings.

The mesh has four axes, ``data, fsdp, expert, tensor`` (:data:`MESH_AXES`), all ``AxisType.Auto``
(SPEC 6: in Explicit mode a matmul whose contracting dims are sharded on both sides raises, so we
let GSPMD propagate from the parameter and batch shardings). Every parameter carries logical axis
names (``out_sharding`` metadata, see ``model.params.logical``); :data:`LOGICAL_RULES` is the single
table mapping them to mesh axes:

* ``embed -> fsdp``: every weight's hidden dim is FSDP-sharded (gathered for use by XLA).
* ``vocab, mamba_inner, mamba_heads, q_heads, mlp, expert_mlp -> tensor``: Megatron-style tensor
  parallelism of heads / FFN width (Mamba heads group-major, SPEC D4).
* ``mamba_bc, kv_heads -> None``: B/C are concatenated groups ([B; C] would split B from C) and
  there are only 2 KV heads; both stay replicated.
* ``expert -> expert``: experts split on dim 0; the MoE runs them with dropless all-to-all
  dispatch (:mod:`star_elastic_jax.kernels.moe.expert_parallel`).
* ``batch -> (data, fsdp, expert)``: activations' batch dim; the expert axis also carries data
  parallelism outside the MoE, which is what makes the MoE's all-to-all exchange tokens.

**Divisibility fallback.** A dim that is not divisible by the product of its mesh axes is not an
error: the longest prefix of the rule's axes whose size product divides the dim is used (for a
single axis: the dim is replicated), and size-1 axes are dropped. Two logical names of one array that
map to the same mesh axis are a table error (``ConfigError`` naming both), never a silent drop. So e.g. 2 KV heads, 4 experts on ``expert = 8`` or a batch of 4
on ``data = 8`` all run, just less sharded. (The expert-parallel MoE applies the same fallback.)
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from star_elastic_jax.errors import ConfigError
from star_elastic_jax.sharding_rules import LOGICAL_RULES, MESH_AXES, RULES, mesh_axes_of

__all__ = ["LOGICAL_RULES", "MESH_AXES", "MeshConfig", "make_mesh", "logical_to_spec", "logical_sharding",
           "param_specs", "param_shardings", "put", "shard_model", "init_sharded", "batch_sharding", "constrain",
           "replicated", "sharded_jit"]

_RULES = RULES  # the one table: star_elastic_jax/sharding_rules.py


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes. At most one may be ``-1`` (filled from the device count); the others >= 1."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    def __post_init__(self):
        fill = [f for f in MESH_AXES if getattr(self, f) == -1]
        for f in MESH_AXES:
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (v < 1 and v != -1):
                raise ConfigError(f"mesh.{f}", v, "must be a positive int, or -1 to fill from the device count")
        if len(fill) > 1:
            raise ConfigError(f"mesh.{fill[1]}", -1, f"at most one mesh axis may be -1 (already mesh.{fill[0]})")

    def resolve(self, n_devices: int) -> tuple[int, int, int, int]:
        """The four sizes for ``n_devices`` devices; ConfigError (naming the field) if they do not fit."""
        sizes = [getattr(self, f) for f in MESH_AXES]
        fixed = 1
        for f, v in zip(MESH_AXES, sizes):
            if v == -1:
                continue
            if n_devices % (fixed * v):
                raise ConfigError(f"mesh.{f}", v, f"the product of the fixed mesh sizes must divide the device "
                                                  f"count {n_devices} (got {fixed * v} through mesh.{f})")
            fixed *= v
        if -1 in sizes:
            sizes[sizes.index(-1)] = n_devices // fixed
        elif fixed != n_devices:
            raise ConfigError("mesh", dict(zip(MESH_AXES, sizes)),
                              f"data*fsdp*expert*tensor must equal the device count {n_devices} "
                              f"(got {fixed}); set one axis to -1 to fill")
        return tuple(int(s) for s in sizes)  # type: ignore[return-value]

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def make_mesh(mesh_cfg: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``data, fsdp, expert, tensor`` mesh (all axes Auto) over ``devices`` (default: all)."""
    mesh_cfg = MeshConfig() if mesh_cfg is None else mesh_cfg
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_cfg.resolve(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# ------------------------------------------------------------------------- logical -> mesh
def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh, *,
                    where: str = "array") -> P:
    """PartitionSpec for an array with logical axis ``names`` and ``shape`` on ``mesh``, with the
    divisibility fallback of the module docstring. Unknown logical names raise ConfigError."""
    if names is None:
        return P()
    if len(names) != len(shape):
        raise ConfigError(f"{where}.out_sharding", tuple(names), f"needs one name per dim of shape {tuple(shape)}")
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    used: dict[str, str] = {}  # mesh axis -> the logical name of this array that maps to it
    spec: list[Any] = []
    for name, dim in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in _RULES:
            raise ConfigError(f"{where}.out_sharding", name,
                              f"logical axis name has no rule in train.sharding.LOGICAL_RULES ({sorted(_RULES)})")
        axes = mesh_axes_of(name)
        for a in axes:
            if a in used:
                raise ConfigError(f"{where}.out_sharding", tuple(names),
                                  f"logical axes {used[a]!r} and {name!r} both map to mesh axis {a!r} in "
                                  "LOGICAL_RULES; one array may use each mesh axis once")
        owners = {a: name for a in axes}
        axes = tuple(a for a in axes if sizes.get(a, 1) > 1)
        while axes and dim % math.prod(sizes[a] for a in axes):
            axes = axes[:-1]  # longest dividing prefix
        used.update(owners)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def logical_sharding(names, shape, mesh, *, where: str = "array") -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, where=where))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _state_of(tree):
    return nnx.state(tree) if isinstance(tree, nnx.Module) else tree


def param_specs(tree, mesh):
    """PartitionSpecs for a Module / nnx.State (concrete or abstract): same structure, each Variable
    holding its spec (from its ``out_sharding`` names; no names -> replicated)."""
    state = _state_of(tree)

    def spec(path, v):
        if not _is_var(v):
            return P()
        names = v.get_metadata().get("out_sharding")
        where = jax.tree_util.keystr(path, simple=True, separator=".")
        return v.replace(logical_to_spec(names, v.shape, mesh, where=where))

    return jax.tree_util.tree_map_with_path(spec, state, is_leaf=_is_var)


def param_shardings(tree, mesh):
    """NamedShardings for a Module / nnx.State: a tree with the structure of ``nnx.state(model)``,
    usable as ``jax.jit`` in/out shardings of that state and as a ``jax.device_put`` target."""
    specs = param_specs(tree, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def put(tree, shardings):
    """``jax.device_put(tree, shardings)`` that also works when the shardings span several processes.

    Multi-process, a process-local array (e.g. a checkpoint every process restored) cannot be
    transferred to another host's devices, so each process builds its own shards from the host copy
    (every process holds the same value); an array that already spans processes is resharded by a
    jitted identity. The result never aliases the input (train steps donate their state)."""
    if jax.process_count() == 1:
        return jax.device_put(jax.tree.map(jnp.array, tree), shardings)

    def one(x, s):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.jit(lambda a: a, out_shardings=s)(x)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def shard_model(model: nnx.Module, mesh) -> nnx.Module:
    """Move ``model``'s Variables onto their shardings (in place; returns the model)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
    return model


def abstract_model(cfg, mesh, *, seed: int = 0, param_dtype=None, **kwargs):
    """``(graphdef, abstract state)`` of a NemotronH with ``ShapeDtypeStruct`` leaves carrying their
    NamedShardings (the target for a sharded restore)."""
    from star_elastic_jax.model.model import NemotronH

    make = _maker(NemotronH, cfg, seed, param_dtype, kwargs)
    graphdef, state = nnx.split(nnx.eval_shape(make))
    shardings = param_shardings(state, mesh)
    state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings)
    return graphdef, state


def _maker(cls, cfg, seed, param_dtype, kwargs):
    if param_dtype is not None:
        kwargs = dict(kwargs, param_dtype=param_dtype)
    return lambda: cls(cfg, rngs=nnx.Rngs(seed), **kwargs)


def init_sharded(cfg, mesh, *, seed: int = 0, param_dtype=None, **kwargs) -> nnx.Module:
    """Initialise a NemotronH directly into its shardings (a jitted init with ``out_shardings``: no
    host copy of the full model). Same values as the unsharded init (partitionable threefry)."""
    from star_elastic_jax.model.model import NemotronH

    make = _maker(NemotronH, cfg, seed, param_dtype, kwargs)
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = param_shardings(abstract, mesh)
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------- batches, steps
def batch_sharding(mesh, shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding of a ``[batch, seq, ...]`` array: batch over ``(data, fsdp, expert)``. With ``shape``
    the divisibility fallback applies (e.g. batch 4 on ``data = 8`` shards over a prefix)."""
    if shape is None:
        axes = tuple(a for a in _RULES["batch"] if dict(zip(mesh.axis_names, mesh.axis_sizes)).get(a, 1) > 1)
        return NamedSharding(mesh, P(axes) if axes else P())
    names = ("batch",) + (None,) * (len(shape) - 1)
    return logical_sharding(names, shape, mesh, where="batch")


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` of an activation to its logical ``names`` under the active mesh
    (``jax.set_mesh``); the identity when none is active. E.g. ``constrain(h, ("batch", None, None))``
    after the embedding keeps FSDP activations batch-sharded (without it GSPMD may propagate the
    weights' ``embed -> fsdp`` onto the hidden dim and reshard, "involuntary full rematerialization")."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or any(t == AxisType.Manual for t in mesh.axis_types):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, where="activation"))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def sharded_jit(fn: Callable, mesh, *, in_shardings, out_shardings, donate_argnums=(), **jit_kwargs) -> Callable:
    """``jax.jit(fn, in_shardings=..., out_shardings=..., donate_argnums=...)`` that traces and runs
    under ``jax.set_mesh(mesh)`` and the logical rules, so the MoE picks its expert-parallel path."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums,
                     **jit_kwargs)

    def call(*args, **kwargs):
        with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
            return jitted(*args, **kwargs)

    call.jitted = jitted  # type: ignore[attr-defined]
    return call
