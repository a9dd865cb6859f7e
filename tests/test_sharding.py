"""Sharding: MeshConfig validation, the logical-rules table (coverage of every logical name, valid
specs, divisibility fallback), the MoE hook's single-device path, and -- in one subprocess with 8
fake CPU devices -- the same CE loss and gradients on 1 device and on three mesh shapes (a jitted
step with explicit in/out shardings and donation), plus the expert-parallel expert FFN vs the
single-device one (values and gradients, zero-token experts, both placements).

The subprocess runs this file as a script (module-scoped fixture, started by the first test that
needs it); the 1-device reference runs there too, on a 1-device mesh, so that every compile gets the
subprocess's cheap-codegen XLA flags."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

import star_elastic_jax as sej
from star_elastic_jax.errors import ConfigError
from star_elastic_jax.kernels.moe import expert_ffn
from star_elastic_jax.kernels.moe.expert_parallel import (
    placement_order,
    routed_expert_ffn,
)
from star_elastic_jax.model.model import NemotronH
from star_elastic_jax.model.params import Buffer, logical
from star_elastic_jax.train import sharding as sh

MESHES = ((8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2))
INIT_SHARDED_MESH = (1, 2, 2, 2)       # this mesh's state comes from init_sharded (no host copy)
BATCH, SEQ = 8, 16
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4                       # per leaf, relative to the leaf's max |grad|
# (mesh shape, placement, impl, T, E, experts that get tokens, with ffn_mask). Case 0: T = 30 is padded
# to the 8 token shards, shard 1 owns experts 4..7 of which only 5 is used. Case 1: strided, experts 0
# and 4 both live on shard 0, so shards 1..3 receive no rows; expert tensor parallelism (F over 2).
# Case 2: 6 experts on expert = 4 fall back to replicated experts (no exchange).
EP_CASES = (((2, 2, 2, 1), "contiguous", "ragged", 30, 8, (0, 1, 2, 5), False),
            ((1, 1, 4, 2), "strided", "dense", 24, 8, (0, 4, 6), True),
            ((1, 2, 4, 1), "contiguous", "auto", 20, 6, (0, 1, 3), True))
EP_H, EP_F, EP_K = 16, 12, 2
# Elastic limits under expert parallelism, through the Pallas kernels (interpret mode): (mesh, T, E,
# k_limit, ffn_limit). Case 0 splits the FFN over tensor = 2 (6 channels a shard; the limit 8 keeps
# 6 + 2), case 1 keeps it whole.
EP_LIMIT_CASES = (((1, 1, 4, 2), 24, 8, 8, 8), ((2, 2, 2, 1), 24, 8, 12, 5))


def tiny_cfg():
    # 8 experts so that expert = 2 divides with several experts per shard; every block kind once.
    return sej.ModelConfig.preset("tiny", n_routed_experts=8, hybrid_override_pattern="ME*-")


def host_state(cfg):
    return nnx.split(NemotronH(cfg, rngs=nnx.Rngs(0)))


def tokens_for(cfg):
    return np.random.default_rng(0).integers(0, cfg.vocab_size, (BATCH, SEQ)).astype(np.int32)


def make_step(graphdef):
    def loss_fn(state, tokens):
        logits = nnx.merge(graphdef, state)(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    return jax.value_and_grad(loss_fn)


def run_step(mesh, graphdef, state, tokens, *, copy=True):
    """The jitted step with explicit in/out shardings and the state donated (``copy``: put a fresh
    copy of ``state`` on its shardings first, so the caller's arrays survive the donation)."""
    ps = sh.param_shardings(state, mesh)
    bs = sh.batch_sharding(mesh, tokens.shape)
    step = sh.sharded_jit(make_step(graphdef), mesh, in_shardings=(ps, bs), out_shardings=(sh.replicated(mesh), ps),
                          donate_argnums=(0,))
    if copy:
        state = jax.device_put(jax.tree.map(np.asarray, state), ps)
    loss, grads = step(state, jax.device_put(tokens, bs))
    assert all(a.is_deleted() for a in jax.tree.leaves(state)), "the state was not donated"
    return loss, grads, ps


def flat(tree):
    return {jax.tree_util.keystr(p): np.array(v, copy=True) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def ep_inputs(T, E, used, with_mask):
    rng = np.random.default_rng(T)
    x = rng.standard_normal((T, EP_H)).astype(np.float32)
    idx = np.stack([rng.choice(used, size=EP_K, replace=False) for _ in range(T)]).astype(np.int32)
    w = rng.uniform(0.1, 2.0, (T, EP_K)).astype(np.float32)
    up = (rng.standard_normal((E, EP_F, EP_H)) / np.sqrt(EP_H)).astype(np.float32)
    down = (rng.standard_normal((E, EP_H, EP_F)) / np.sqrt(EP_F)).astype(np.float32)
    cot = rng.standard_normal((T, EP_H)).astype(np.float32)
    mask = (rng.uniform(size=EP_F) > 0.3).astype(np.float32) if with_mask else None
    return x, idx, w, up, down, cot, mask


def ep_value_and_grads(fn, x, idx, w, up, down, cot, mask):
    """``(fn(...), d sum(fn * cot) / d(x, w, up, down))`` in one jitted function."""
    def loss(x, w, up, down):
        y = fn(x, idx, w, up, down, mask)
        return jnp.sum(y * cot), y

    (_, y), g = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, w, up, down)
    return y, g


# ----------------------------------------------------------------------------------- worker
def _worker(out_path: str) -> None:
    """8 fake CPU devices: loss + grads on every mesh in MESHES and the EP expert FFN cases."""
    jax.config.update("jax_num_cpu_devices", 8)
    from star_elastic_jax.kernels.moe.expert_parallel import expert_ffn_parallel

    assert jax.device_count() == 8, jax.devices()
    out: dict[str, np.ndarray] = {}
    cfg = tiny_cfg()
    graphdef, state = host_state(cfg)
    tokens = tokens_for(cfg)
    for key, a in flat(state).items():
        out[f"host/{key}"] = a
    for shape in ((1, 1, 1, 1), *MESHES):  # (1, 1, 1, 1): a 1-device mesh over jax.devices()[:1]
        mesh = sh.make_mesh(sh.MeshConfig(*shape), devices=jax.devices()[:math.prod(shape)])
        tag = "x".join(map(str, shape))
        if shape == INIT_SHARDED_MESH:
            model = sh.init_sharded(cfg, mesh, seed=0)
            _, init_state = nnx.split(model)
            for key, a in flat(init_state).items():
                out[f"init/{tag}/{key}"] = a
            loss, grads, ps = run_step(mesh, graphdef, init_state, tokens, copy=False)
        else:
            loss, grads, ps = run_step(mesh, graphdef, state, tokens)
        out[f"loss/{tag}"] = np.asarray(loss)
        for (path, g), s in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ps)):
            assert g.sharding.is_equivalent_to(s, g.ndim), (path, g.sharding, s)
            out[f"grad/{tag}/{jax.tree_util.keystr(path)}"] = np.asarray(g)
    for i, (shape, placement, impl, T, E, used, with_mask) in enumerate(EP_CASES):
        mesh = sh.make_mesh(sh.MeshConfig(*shape))
        x, idx, w, up, down, cot, mask = ep_inputs(T, E, used, with_mask)
        order = placement_order(E, shape[2], placement) if E % shape[2] == 0 else np.arange(E)

        def fn(x, idx, w, up, down, mask, placement=placement, impl=impl):
            return expert_ffn_parallel(x, idx, w, up, down, impl=impl, ffn_mask=mask, placement=placement)

        with jax.set_mesh(mesh):
            y, g = jax.jit(lambda *a: ep_value_and_grads(fn, *a))(x, idx, w, up[order], down[order], cot, mask)
        inv = np.argsort(order)
        out[f"ep/{i}/y"] = np.asarray(y)
        for name, a in zip(("x", "w", "up", "down"), (g[0], g[1], np.asarray(g[2])[inv], np.asarray(g[3])[inv])):
            out[f"ep/{i}/{name}"] = np.asarray(a)
    for i, (shape, T, E, kl, fl) in enumerate(EP_LIMIT_CASES):
        mesh = sh.make_mesh(sh.MeshConfig(*shape))
        x, idx, w, up, down, _, _ = ep_inputs(T, E, tuple(range(E)), False)
        mask = (np.arange(EP_F) < fl).astype(np.float32)

        def limited(x, idx, w, up, down, mask, kl, fl):
            return expert_ffn_parallel(x, idx, w, up, down, impl="pallas", ffn_mask=mask, k_limit=kl, ffn_limit=fl)

        with jax.set_mesh(mesh):
            out[f"eplim/{i}"] = np.asarray(jax.jit(limited)(x, idx, w, up, down, mask, jnp.int32(kl), jnp.int32(fl)))
    np.savez(out_path, **out)


class Worker:
    def __init__(self, tmpdir):
        self.path = os.path.join(tmpdir, "worker.npz")
        # Cheap LLVM codegen: compiles ~3x faster on CPU; the loss tolerance covers codegen differences.
        flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.path], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._result = None

    def result(self) -> dict[str, np.ndarray]:
        if self._result is None:
            _, err = self.proc.communicate(timeout=600)
            assert self.proc.returncode == 0, err[-5000:]
            with np.load(self.path) as f:
                self._result = dict(f)
        return self._result


@pytest.fixture(scope="module")
def worker():
    with tempfile.TemporaryDirectory() as tmp:
        w = Worker(tmp)
        yield w
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.communicate()


# ----------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kwargs, n, field", [
    ({"fsdp": 3}, 8, "mesh.fsdp"),
    ({"data": 2, "fsdp": 2, "expert": 4}, 8, "mesh.expert"),
    ({"data": 2, "fsdp": 2}, 8, "mesh"),
    ({"data": -1, "tensor": 16}, 8, "mesh.tensor"),
])
def test_mesh_sizes_not_dividing_devices(kwargs, n, field):
    with pytest.raises(ConfigError) as e:
        sh.MeshConfig(**kwargs).resolve(n)
    assert isinstance(e.value, ValueError) and e.value.field == field


@pytest.mark.parametrize("kwargs, field", [
    ({"data": -1, "fsdp": -1}, "mesh.fsdp"),
    ({"expert": 0}, "mesh.expert"),
    ({"tensor": -2}, "mesh.tensor"),
    ({"data": 1.5}, "mesh.data"),
])
def test_mesh_config_rejects_bad_sizes(kwargs, field):
    with pytest.raises(ConfigError) as e:
        sh.MeshConfig(**kwargs)
    assert e.value.field == field


def test_mesh_config_resolves_and_make_mesh_validates_before_compiling():
    assert sh.MeshConfig().resolve(8) == (8, 1, 1, 1)
    assert sh.MeshConfig(data=2, fsdp=-1, expert=2).resolve(8) == (2, 2, 2, 1)
    assert sh.MeshConfig(data=1, fsdp=2, expert=2, tensor=2).resolve(8) == (1, 2, 2, 2)
    mesh = sh.make_mesh(sh.MeshConfig(), devices=jax.devices()[:1])
    assert mesh.axis_names == sh.MESH_AXES and mesh.axis_types == (AxisType.Auto,) * 4
    with pytest.raises(ConfigError, match="mesh.fsdp"):
        sh.make_mesh(sh.MeshConfig(fsdp=2), devices=jax.devices()[:1])


def _variables(model):
    return [(".".join(map(str, p)), v) for p, v in nnx.to_flat_state(nnx.state(model))]


def test_rules_cover_every_logical_name_of_the_model():
    """Fails when a parameter without logical names, or with a name missing from the table, appears."""
    rules = dict(sh.LOGICAL_RULES)
    assert len(rules) == len(sh.LOGICAL_RULES), "one rule per logical name"
    for preset in ("tiny", "small"):
        model = nnx.eval_shape(lambda p=preset: NemotronH(sej.ModelConfig.preset(p), rngs=nnx.Rngs(0)))
        for path, v in _variables(model):
            assert isinstance(v, (nnx.Param, Buffer)), path
            names = v.get_metadata().get("out_sharding")
            assert names is not None and len(names) == len(v.shape), (path, names)
            for n in names:
                assert n is None or n in rules, f"{path}: logical name {n!r} has no rule in LOGICAL_RULES"
            for axis in jax.tree.leaves([rules.get(n) for n in names]):
                assert axis in sh.MESH_AXES, (path, axis)
        routers = [v for p, v in _variables(model) if p.endswith("mixer.gate_weight")]
        assert routers and all(v.get_metadata()["out_sharding"] == (None, "embed") for v in routers)


@pytest.mark.parametrize("shape", [(2, 2, 2, 2), (1, 8, 1, 1), (1, 1, 8, 1), (1, 1, 1, 8)])
def test_every_parameter_gets_a_valid_sharding(shape):
    """On abstract meshes (no devices needed): every spec divides its dim, uses an axis at most once,
    and indivisible dims fall back to replicated instead of raising."""
    mesh = AbstractMesh(shape, sh.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    model = nnx.eval_shape(lambda: NemotronH(sej.ModelConfig.preset("tiny"), rngs=nnx.Rngs(0)))
    specs = dict(_variables_of(sh.param_specs(model, mesh)))
    assert set(specs) == {p for p, _ in _variables(model)}
    for path, v in _variables(model):
        spec = specs[path]
        assert isinstance(spec, P) and len(spec) <= len(v.shape), path
        used = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
        assert len(used) == len(set(used)), (path, spec)
        for entry, dim in zip(spec, v.shape):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
            assert dim % int(np.prod([sizes[a] for a in axes])) == 0, (path, spec, v.shape)
    # tiny has 4 experts and 2 KV heads: expert = 8 replicates experts; tensor = 8 replicates kv
    if shape == (1, 1, 8, 1):
        assert specs["layers.3.mixer.experts_up"] == P()
    if shape == (2, 2, 2, 2):
        assert specs["layers.3.mixer.experts_up"] == P("expert", "tensor", "fsdp")
        assert specs["embeddings"] == P("tensor", "fsdp")
        assert specs["layers.1.mixer.k_proj"] == P(None, "fsdp")
        assert specs["layers.3.mixer.gate_weight"] == P(None, "fsdp")
    assert sh.logical_to_spec(("batch", None), (4, 16), AbstractMesh((8, 1, 1, 1), sh.MESH_AXES)) == P()
    assert sh.logical_to_spec(("batch", None), (4, 16), AbstractMesh((2, 2, 2, 1), sh.MESH_AXES)) == \
        P(("data", "fsdp"))


def _variables_of(state):
    return [(".".join(map(str, p)), v.get_value()) for p, v in nnx.to_flat_state(state)]


class Small(nnx.Module):
    """A router-like module: logical names outside the NemotronH tree still map through the table."""

    def __init__(self, names=(None, "embed")):
        self.w = logical(jnp.zeros((4, 8)), names)
        self.b = logical(jnp.zeros((4,)), (None,), kind=Buffer)


def test_abstract_model_and_shard_model_on_one_device():
    cfg = sej.ModelConfig.preset("tiny")
    mesh = sh.make_mesh(sh.MeshConfig(), devices=jax.devices()[:1])
    _, abstract = sh.abstract_model(cfg, mesh)
    leaves = jax.tree.leaves(abstract)
    assert leaves and all(isinstance(a, jax.ShapeDtypeStruct) and a.sharding.mesh == mesh for a in leaves)
    model = sh.shard_model(Small(), mesh)
    assert all(isinstance(a.sharding, jax.sharding.NamedSharding) for a in jax.tree.leaves(nnx.state(model)))
    assert sh.batch_sharding(mesh).spec == P()
    x = jnp.ones((2, 3, 4))
    assert sh.constrain(x, ("batch", None, None)) is x  # no active mesh: identity
    with jax.set_mesh(mesh):
        # ("batch", None, "embed") would put fsdp on two dims: a rules conflict, now an error (see below)
        y = jax.jit(lambda a: sh.constrain(a, ("batch", None, "act_embed")) * 2)(x)
    np.testing.assert_array_equal(y, 2 * x)


def test_unknown_logical_name_is_a_config_error():
    mesh = AbstractMesh((2, 2, 2, 1), sh.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    assert sh.param_specs(Small(), mesh)["w"].get_value() == P(None, "fsdp")
    with pytest.raises(ConfigError, match="bogus"):
        sh.param_specs(Small(("embed", "bogus")), mesh)


def test_moe_single_device_path_is_the_plain_expert_ffn(np_rng):
    x = jnp.asarray(np_rng.standard_normal((6, 8)), jnp.float32)
    idx = jnp.asarray(np_rng.integers(0, 4, (6, 2)), jnp.int32)
    w = jnp.ones((6, 2), jnp.float32)
    up, down = jnp.ones((4, 5, 8)), jnp.ones((4, 8, 5))
    a = jax.make_jaxpr(lambda *t: routed_expert_ffn(*t, impl="ragged"))(x, idx, w, up, down)
    b = jax.make_jaxpr(lambda *t: expert_ffn(*t, impl="ragged"))(x, idx, w, up, down)
    assert str(a) == str(b)
    with jax.set_mesh(sh.make_mesh(sh.MeshConfig(), devices=jax.devices()[:1])):  # 1-device mesh: same path
        c = jax.make_jaxpr(lambda *t: routed_expert_ffn(*t, impl="ragged"))(x, idx, w, up, down)
        d = jax.make_jaxpr(lambda *t: expert_ffn(*t, impl="ragged"))(x, idx, w, up, down)
    assert str(c) == str(d) and "shard_map" not in str(c)


# ------------------------------------------------------- 8-device checks (results of the worker)
def test_same_loss_and_grads_on_one_and_eight_devices(worker):
    res = worker.result()
    loss1 = float(res["loss/1x1x1x1"])
    assert np.isfinite(loss1) and loss1 > 0
    grads1 = {k.split("/", 2)[2]: v for k, v in res.items() if k.startswith("grad/1x1x1x1/")}
    assert len(grads1) == len([k for k in res if k.startswith("host/")]) > 20
    for shape in MESHES:
        tag = "x".join(map(str, shape))
        loss = float(res[f"loss/{tag}"])
        assert abs(loss - loss1) <= LOSS_RTOL * abs(loss1), (shape, loss, loss1)
        for key, g1 in grads1.items():
            g = res[f"grad/{tag}/{key}"]
            assert g.shape == g1.shape, key
            np.testing.assert_allclose(g, g1, rtol=0, atol=GRAD_RTOL * np.abs(g1).max() + 1e-8,
                                       err_msg=f"{shape} {key}")
    tag = "x".join(map(str, INIT_SHARDED_MESH))
    for key in grads1:  # sharded init == host init (partitionable threefry; ulp-level codegen diffs)
        np.testing.assert_allclose(res[f"init/{tag}/{key}"], res[f"host/{key}"], rtol=1e-6, atol=1e-9, err_msg=key)


def test_two_logical_axes_on_one_mesh_axis_is_an_error_naming_both():
    from star_elastic_jax.errors import ConfigError

    mesh = sh.make_mesh(sh.MeshConfig(), devices=jax.devices()[:1])
    with pytest.raises(ConfigError, match="'mamba_inner' and 'mlp' both map to mesh axis 'tensor'"):
        sh.logical_to_spec(("mamba_inner", "mlp"), (4, 4), mesh, where="w")
    with pytest.raises(ConfigError, match="'batch' and 'expert' both map to mesh axis 'expert'"):
        sh.logical_to_spec(("batch", "expert"), (8, 8), mesh)
    assert sh.logical_to_spec(("expert", "expert_mlp", "embed"), (8, 4, 4), mesh) == P()


@pytest.mark.parametrize("case", range(len(EP_LIMIT_CASES)))
def test_expert_parallel_passes_the_elastic_limits_to_the_kernels(worker, case):
    """Hidden channels past k_limit are exactly zero only if the limit reached the kernel (x is not
    masked), and the FFN limit is split correctly over tensor shards: EP == one device."""
    _, T, E, kl, fl = EP_LIMIT_CASES[case]
    x, idx, w, up, down, _, _ = ep_inputs(T, E, tuple(range(E)), False)
    mask = (np.arange(EP_F) < fl).astype(np.float32)
    want = np.asarray(jax.jit(lambda *a: expert_ffn(*a[:5], impl="pallas", ffn_mask=a[5], k_limit=a[6],
                                                    ffn_limit=a[7]))(x, idx, w, up, down, mask, jnp.int32(kl),
                                                                     jnp.int32(fl)))
    got = worker.result()[f"eplim/{case}"]
    if kl < EP_H:
        assert np.all(got[:, kl:] == 0) and np.abs(got[:, :kl]).max() > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("case", range(len(EP_CASES)))
def test_expert_parallel_matches_single_device(worker, case):
    _, _, _, T, E, used, with_mask = EP_CASES[case]
    x, idx, w, up, down, cot, mask = ep_inputs(T, E, used, with_mask)
    assert set(range(E)) - set(used), "some experts must receive zero tokens"

    def fn(x, idx, w, up, down, mask):
        return expert_ffn(x, idx, w, up, down, impl="dense", ffn_mask=mask)

    y, g = jax.jit(lambda *a: ep_value_and_grads(fn, *a))(x, idx, w, up, down, cot, mask)
    res = worker.result()
    for name, want in zip(("y", "x", "w", "up", "down"), (y, *g)):
        want = np.asarray(want)
        np.testing.assert_allclose(res[f"ep/{case}/{name}"], want, rtol=0, atol=1e-5 * np.abs(want).max(),
                                   err_msg=f"case {case} {name}")


if __name__ == "__main__":
    _worker(sys.argv[1])
