"""Functional train / eval steps: ``nnx.split`` once, ``jax.jit`` over the state with explicit in/out
shardings and donation, ``nnx.merge`` inside.

Train state (a plain dict pytree; the checkpoint saves exactly this)::

    {"step": int32[],                    # optimizer steps taken in this phase
     "rng": uint32[2],                   # base key data (threefry); router noise = fold_in(fold_in(key, step), mb)
     "params": {"model": State, "router": State},   # nnx.Param leaves only (router absent for CE)
     "buffers": State,                   # non-trainable model variables (MoE correction bias): not optimized
     "opt_state": ...}                   # optax state of make_optimizer

Two modes:

* ``"kd"`` (SPEC 3.7): per micro-batch, the frozen teacher (the permuted parent, no masks, its own
  ``teacher`` argument: not in the optimizer, not donated) gives logits; the router samples soft
  masks for the micro-batch's budget; loss = ``KL(teacher || student) + router_loss`` (the router
  loss carries ``router_loss_weight``).
* ``"ce"``: next-token cross entropy of the full model (pre-training a parent; no teacher, no router).

A step takes a batch ``[n_micro, rows, L]`` and one budget index per micro-batch (sampled on the
host, :func:`budget_indices`), runs the micro-batches in a ``lax.scan`` and averages their
gradients (gradient accumulation), then clips and applies AdamW once.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from star_elastic_jax.config import ModelConfig
from star_elastic_jax.elastic.router import BudgetRouter, RouterConfig, router_key, scaler, tau
from star_elastic_jax.errors import ConfigError, DataError
from star_elastic_jax.model.model import NemotronH, abstract_model
from star_elastic_jax.train import sharding as sh
from star_elastic_jax.train.config import OptimConfig
from star_elastic_jax.train.losses import ce_loss, kd_loss, router_loss
from star_elastic_jax.train.optim import make_optimizer, opt_state_shardings, schedules

MODES = ("kd", "ce")
# jitted steps shared by every TrainStep with the same static key (a rebuilt trainer, e.g. after a
# restore, reuses the compiled executables instead of compiling again)
_JIT_CACHE: dict = {}
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
STEP_BATCH_KEYS = ("tokens", "targets", "segment_ids", "loss_mask")


def budget_indices(seed: int, step: int, n_micro: int, n_budgets: int,
                   weights: Sequence[float] | None) -> np.ndarray:
    """One budget index per micro-batch of ``step``, from a numpy RNG keyed by (seed, step, micro-batch):
    identical on every process, and a pure function of the step (so resuming needs no RNG state).
    ``weights=None``: uniform (stage 1); else proportional to ``weights`` (stage 2)."""
    out = np.empty((n_micro,), np.int32)
    for mb in range(n_micro):
        rng = np.random.default_rng([int(seed), int(step), int(mb)])
        out[mb] = rng.integers(n_budgets) if weights is None else rng.choice(n_budgets, p=np.asarray(weights))
    return out


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@dataclasses.dataclass
class TrainStep:
    """Builds the state, its shardings and the jitted steps for one phase (``mode`` ``"kd"``/``"ce"``)
    on ``mesh``. ``total_steps`` drives the LR schedules and the router's logit scaler."""

    mode: str
    model_cfg: ModelConfig
    optim: OptimConfig
    total_steps: int
    mesh: Any
    router_cfg: RouterConfig | None = None
    teacher_dtype: str = "float32"
    fast_compile: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError("mode", self.mode, f"one of {MODES}")
        if self.mode == "kd" and self.router_cfg is None:
            raise ConfigError("router", None, "KD mode needs a RouterConfig")
        if self.mode == "ce":
            self.router_cfg = None
        abstract = abstract_model(self.model_cfg)
        self.model_graphdef, a_params, a_buffers = nnx.split(abstract, nnx.Param, ...)
        self.tx = make_optimizer(self.optim, self.total_steps)
        self.schedules = schedules(self.optim, self.total_steps)
        rep = sh.replicated(self.mesh)
        self._rep = rep
        params_sh = {"model": sh.param_shardings(a_params, self.mesh)}
        a_all = {"model": a_params}
        if self.router_cfg is not None:
            a_router = nnx.eval_shape(lambda: BudgetRouter(self.model_cfg, self.router_cfg, rngs=nnx.Rngs(0)))
            self.router_graphdef, a_rparams = nnx.split(a_router, nnx.Param)
            params_sh["router"] = sh.param_shardings(a_rparams, self.mesh)  # replicated by its logical rules
            a_all["router"] = a_rparams
        self.buffers_sharding = sh.param_shardings(a_buffers, self.mesh)
        self.params_sharding = params_sh
        self.state_sharding = {
            "step": rep, "rng": rep, "params": params_sh, "buffers": self.buffers_sharding,
            "opt_state": opt_state_shardings(self.tx, a_all, params_sh, rep),
        }
        self.teacher_sharding = (params_sh["model"], self.buffers_sharding)
        self._abstract_params = a_all
        self._abstract_buffers = a_buffers
        self._key = (self.mode, self.model_cfg, self.optim, self.total_steps, self.mesh, self.router_cfg,
                     self.teacher_dtype, self.fast_compile)
        self._jit_kwargs = {"compiler_options": FAST_COMPILE} if self.fast_compile else {}

    # ------------------------------------------------------------------------------------------ state
    def abstract_state(self) -> dict:
        """ShapeDtypeStructs with this mesh's shardings: the restore target (any saved mesh restores
        onto this one)."""
        abstract = {
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)).astype(jnp.uint32)),
            "params": self._abstract_params, "buffers": self._abstract_buffers,
            "opt_state": jax.eval_shape(self.tx.init, self._abstract_params),
        }
        return _with_shardings(abstract, self.state_sharding)

    def init_state(self, model: NemotronH, router: BudgetRouter | None = None, *, seed: int = 0) -> dict:
        """The initial state from a model (and router), placed on the state shardings. The model's
        arrays are copied (the step donates the state; ``model`` stays usable)."""
        if model.cfg != self.model_cfg:
            raise ConfigError("model", "config mismatch", "the model must be built from this step's ModelConfig")
        _, m_params, m_buffers = nnx.split(model, nnx.Param, ...)
        params = {"model": m_params}
        if self.router_cfg is not None:
            if router is None:
                raise ConfigError("router", None, "KD mode needs a BudgetRouter")
            params["router"] = nnx.split(router, nnx.Param)[1]
        params = sh.put(params, self.params_sharding)
        buffers = sh.put(m_buffers, self.buffers_sharding)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_sharding["opt_state"])(params)
        key = jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32)
        return {"step": sh.put(jnp.zeros((), jnp.int32), self._rep),
                "rng": sh.put(key, self._rep), "params": params, "buffers": buffers, "opt_state": opt_state}

    def teacher_from(self, model: NemotronH) -> tuple:
        """The frozen teacher ``(params, buffers)`` (floating params cast to ``teacher_dtype``), sharded
        like the student. Never donated, never optimized."""
        _, t_params, t_buffers = nnx.split(model, nnx.Param, ...)
        dt = jnp.dtype(self.teacher_dtype)
        cast = lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
        return sh.put((jax.tree.map(cast, t_params), t_buffers), self.teacher_sharding)

    def model_from_state(self, state: Mapping) -> NemotronH:
        return nnx.merge(self.model_graphdef, state["params"]["model"], state["buffers"])

    def router_from_state(self, state: Mapping) -> BudgetRouter:
        return nnx.merge(self.router_graphdef, state["params"]["router"])

    # ------------------------------------------------------------------------------------------ batches
    def batch_sharding(self, n_micro: int, rows: int, seq_len: int) -> NamedSharding:
        spec = sh.batch_sharding(self.mesh, (rows, seq_len)).spec
        return NamedSharding(self.mesh, P(None, *spec))

    def put_batch(self, batch: Mapping[str, np.ndarray], n_micro: int) -> dict:
        """A per-process batch ``{key: [rows, L]}`` -> global ``[n_micro, rows / n_micro, L]`` arrays."""
        out = {}
        for k in STEP_BATCH_KEYS:
            if k not in batch:
                raise DataError("batch", sorted(batch), f"needs the keys {STEP_BATCH_KEYS}")
            a = np.asarray(batch[k])
            if a.ndim != 2 or a.shape[0] % n_micro:
                raise DataError(f"batch[{k!r}].shape", a.shape, f"[rows, L] with rows divisible by {n_micro}")
            a = a.reshape(n_micro, a.shape[0] // n_micro, a.shape[1])
            n_proc = jax.process_count()
            gshape = (n_micro, a.shape[1] * n_proc, a.shape[2])
            out[k] = jax.make_array_from_process_local_data(self.batch_sharding(*gshape), a, gshape)
        return out

    # ------------------------------------------------------------------------------------------ losses
    def _student_loss(self, params, buffers, teacher_logits, mb, budget_idx, key, step):
        model = nnx.merge(self.model_graphdef, params["model"], buffers)
        if self.mode == "ce":
            logits = model(mb["tokens"], mb["segment_ids"])
            loss = ce_loss(logits, mb["targets"], mb["loss_mask"])
            return loss, {"ce_loss": loss}
        rc = self.router_cfg
        router = nnx.merge(self.router_graphdef, params["router"])
        probs = router.probs(router.index_vector(budget_idx), step=step, key=key, total_steps=self.total_steps,
                             train=True)
        logits = model(mb["tokens"], mb["segment_ids"], elastic=router.masks(probs))
        kd = kd_loss(logits, teacher_logits, mb["loss_mask"])
        budget = jnp.asarray(rc.budgets, jnp.float32)[budget_idx]
        r_loss, r_metrics = router_loss(self.model_cfg, rc, probs, budget)
        metrics = {"kd_loss": kd, "router_loss": r_loss, "active_frac": r_metrics["router/active_frac"]}
        for a in rc.axes:
            metrics[f"size/{a}"] = jnp.mean(r_metrics[f"router/size/{a}"])
        return kd + r_loss, metrics

    def _teacher_logits(self, teacher, mb):
        if teacher is None:
            return None
        t_model = nnx.merge(self.model_graphdef, *teacher)
        return jax.lax.stop_gradient(t_model(mb["tokens"], mb["segment_ids"]))

    def _step_fn(self, state, teacher, batch, budget_idx):
        step = state["step"]
        base_key = jax.random.wrap_key_data(state["rng"])
        n_micro = budget_idx.shape[0]
        grad_fn = jax.value_and_grad(self._student_loss, has_aux=True)

        def body(acc, xs):
            mb, bidx, i = xs
            key = router_key(base_key, step, i)
            t_logits = self._teacher_logits(teacher, mb)
            (loss, metrics), grads = grad_fn(state["params"], state["buffers"], t_logits, mb, bidx, key, step)
            acc = jax.tree.map(jnp.add, acc, grads)
            return acc, dict(metrics, loss=loss, budget=bidx)

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        grads, metrics = jax.lax.scan(body, zeros, (batch, budget_idx, jnp.arange(n_micro)))
        grads = jax.tree.map(lambda g: g / n_micro, grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, grad_norm=grad_norm, lr=self.schedules["model"](step))
        if self.router_cfg is not None:
            metrics.update(tau=tau(self.router_cfg, step), scaler=scaler(self.router_cfg, step, self.total_steps),
                           router_lr=self.schedules["router"](step))
        new_state = dict(state, step=step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    # ------------------------------------------------------------------------------------------ jitted steps
    def train_step(self, n_micro: int, rows: int, seq_len: int):
        """``step(state, teacher, batch, budget_idx) -> (state, metrics)``, jitted with explicit shardings;
        ``state`` is donated. ``rows``: global rows per micro-batch. CE mode: pass ``teacher=None``."""
        sig = self._key + ("train", n_micro, rows, seq_len)
        if sig not in _JIT_CACHE:
            bs = self.batch_sharding(n_micro, rows, seq_len)
            batch_sh = {k: bs for k in STEP_BATCH_KEYS}
            teacher_sh = None if self.mode == "ce" else self.teacher_sharding
            fn = self._step_fn if self.mode == "kd" else (lambda s, t, b, i: self._step_fn(s, None, b, i))
            _JIT_CACHE[sig] = sh.sharded_jit(fn, self.mesh,
                                              in_shardings=(self.state_sharding, teacher_sh, batch_sh, self._rep),
                                              out_shardings=(self.state_sharding, self._rep), donate_argnums=(0,),
                                              **self._jit_kwargs)
        return _JIT_CACHE[sig]

    def _eval_fn(self, params, buffers, teacher, batch, budget_idx):
        model = nnx.merge(self.model_graphdef, params["model"], buffers)
        if self.mode == "ce":
            return {"ce_loss": ce_loss(model(batch["tokens"], batch["segment_ids"]), batch["targets"],
                                       batch["loss_mask"])}
        rc = self.router_cfg
        router = nnx.merge(self.router_graphdef, params["router"])
        probs = router.probs(router.index_vector(budget_idx), train=False)  # argmax, multiplier 1
        logits = model(batch["tokens"], batch["segment_ids"], elastic=router.masks(probs))
        t_logits = self._teacher_logits(teacher, batch)
        _, r = router_loss(self.model_cfg, rc, probs, jnp.asarray(rc.budgets, jnp.float32)[budget_idx])
        out = {"kd_loss": kd_loss(logits, t_logits, batch["loss_mask"]),
               "ce_loss": ce_loss(logits, batch["targets"], batch["loss_mask"]),
               "active_frac": r["router/active_frac"]}
        out.update({f"size/{a}": jnp.mean(r[f"router/size/{a}"]) for a in rc.axes})
        return out

    def eval_step(self, rows: int, seq_len: int):
        """``evaluate(params, buffers, teacher, batch, budget_idx) -> metrics`` on one ``[rows, L]`` batch;
        KD mode runs the router's argmax sub-model of budget ``budget_idx`` (hard masks)."""
        sig = self._key + ("eval", rows, seq_len)
        if sig not in _JIT_CACHE:
            bs = sh.batch_sharding(self.mesh, (rows, seq_len))
            teacher_sh = None if self.mode == "ce" else self.teacher_sharding
            fn = self._eval_fn if self.mode == "kd" else (lambda p, b, t, x, i: self._eval_fn(p, b, None, x, i))
            _JIT_CACHE[sig] = sh.sharded_jit(fn, self.mesh,
                                              in_shardings=(self.params_sharding, self.buffers_sharding, teacher_sh,
                                                            {k: bs for k in STEP_BATCH_KEYS}, self._rep),
                                              out_shardings=self._rep, **self._jit_kwargs)
        return _JIT_CACHE[sig]

    def put_eval_batch(self, batch: Mapping[str, np.ndarray]) -> dict:
        out = {}
        for k in STEP_BATCH_KEYS:
            a = np.asarray(batch[k])
            gshape = (a.shape[0] * jax.process_count(), a.shape[1])
            out[k] = jax.make_array_from_process_local_data(sh.batch_sharding(self.mesh, gshape), a, gshape)
        return out
