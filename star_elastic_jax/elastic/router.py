"""The budget router (SPEC 3.6): budget -> per-axis distribution over candidate sizes.

For every elastic axis a small static MLP maps the (one-hot) budget to logits over that axis'
choice list (index 0 = full size):

    u = onehot(budget)                        [n_budgets]   (interpolated between trained budgets)
    z = W2 LeakyReLU_0.1(W1 u)                [k]           (or [n_layers_of_type, k], heterogeneous)
    pi = softmax((s(t) z + g) / tau(t))       g ~ Gumbel(0, 1)

No biases, no token input, init N(0, 0.1). ``tau(t) = max(tau0 decay^t, tau_min)`` and the logit
scaler ``s(t)`` grows linearly from ``scaler_start`` to ``scaler_end`` over training. Modes:

* ``soft`` (default): ``pi`` as above; masks are the mixtures ``sum_i pi_i I_i``.
* ``hard_st``: straight-through hard sample, ``onehot(argmax pi) + pi - stop_gradient(pi)`` (forward
  one-hot, gradient of the soft sample). In ``soft`` mode ``hard_sample_prob`` switches a whole
  step to ``hard_st`` with that probability (SPEC's 0.004).
* eval (``train=False``): one-hot argmax of the noiseless logits (multiplier 1).

Randomness: every draw comes from one key per (step, micro-batch), :func:`router_key`, so all
data-parallel ranks sample the same budget and the same Gumbel noise.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_elastic_jax.config import ModelConfig
from star_elastic_jax.elastic.axes import AXES, PER_LAYER_AXES, WIDTH_AXES, full_size, layers_of
from star_elastic_jax.elastic.choice import ElasticChoice
from star_elastic_jax.elastic.masks import ElasticMasks, build_masks
from star_elastic_jax.errors import ChoiceError
from star_elastic_jax.model.params import linear, logical

MODES = ("soft", "hard_st")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """Router hyper-parameters (hashable; a static jit argument).

    ``budgets``: trained active-parameter fractions, strictly descending, each in (0, 1].
    ``choice_lists``: ``((axis, (size_0, size_1, ...)), ...)``, sizes strictly descending with
    ``size_0`` the axis' full size (a mapping is accepted and converted). ``heterogeneous_axes``:
    per-layer axes whose router emits one distribution per block of that type.
    """

    budgets: tuple[float, ...]
    choice_lists: tuple[tuple[str, tuple[int, ...]], ...]
    heterogeneous_axes: tuple[str, ...] = ()
    hidden_width: int = 256
    tau0: float = 1.0
    tau_decay: float = 0.9997
    tau_min: float = 0.05
    scaler_start: float = 1.0
    scaler_end: float = 10.0
    mode: str = "soft"
    hard_sample_prob: float = 0.0
    dead_zone: float = 0.05
    identity_weight: float = 10.0
    router_loss_weight: float = 1.0
    init_std: float = 0.1

    def __post_init__(self):
        cl = self.choice_lists
        if isinstance(cl, Mapping):
            cl = tuple(cl.items())
        try:
            cl = tuple((str(a), tuple(s)) for a, s in cl)
        except (TypeError, ValueError):
            raise ChoiceError("choice_lists", self.choice_lists, "pairs (axis, sizes) or a mapping axis -> sizes") \
                from None
        object.__setattr__(self, "choice_lists", cl)
        object.__setattr__(self, "budgets", tuple(self.budgets) if isinstance(self.budgets, (list, tuple))
                           else self.budgets)
        object.__setattr__(self, "heterogeneous_axes", tuple(self.heterogeneous_axes))
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        from star_elastic_jax.elastic.budget import validate_budgets

        object.__setattr__(self, "budgets", validate_budgets(self.budgets, "budgets"))
        if not self.choice_lists:
            raise ChoiceError("choice_lists", self.choice_lists, "at least one elastic axis")
        seen = set()
        for axis, sizes in self.choice_lists:
            if axis not in WIDTH_AXES:
                raise ChoiceError("choice_lists", axis, f"axes must be among {WIDTH_AXES} (depth is not routed)")
            if axis in seen:
                raise ChoiceError("choice_lists", axis, "each axis may appear once")
            seen.add(axis)
            if not sizes:
                raise ChoiceError(f"choice_lists[{axis!r}]", sizes, "must list at least one size")
            for v in sizes:
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                    raise ChoiceError(f"choice_lists[{axis!r}]", sizes, "sizes must be integers")
            if list(sizes) != sorted(set(sizes), reverse=True):
                raise ChoiceError(f"choice_lists[{axis!r}]", sizes, "sizes must be unique and descending "
                                                                   "(index 0 = the full size)")
        for axis in self.heterogeneous_axes:
            if axis not in PER_LAYER_AXES:
                raise ChoiceError("heterogeneous_axes", axis, f"only per-layer axes {PER_LAYER_AXES} can be "
                                                              "heterogeneous")
            if axis not in seen:
                raise ChoiceError("heterogeneous_axes", axis, "must also appear in choice_lists")
        if self.mode not in MODES:
            raise ChoiceError("mode", self.mode, f"one of {MODES}")
        _positive_int("hidden_width", self.hidden_width)
        for name, lo, hi in (("tau0", 0, math.inf), ("tau_min", 0, math.inf), ("tau_decay", 0, 1),
                             ("init_std", 0, math.inf)):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and lo < v <= hi):
                raise ChoiceError(name, v, f"a number in ({lo}, {hi}]")
        for name in ("scaler_start", "scaler_end", "identity_weight", "router_loss_weight", "dead_zone"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ChoiceError(name, v, "a finite number >= 0")
        if not (isinstance(self.hard_sample_prob, (int, float)) and 0 <= self.hard_sample_prob <= 1):
            raise ChoiceError("hard_sample_prob", self.hard_sample_prob, "a probability in [0, 1]")

    def validate_for(self, cfg: ModelConfig) -> None:
        """Check every size of every list against ``cfg`` (``ElasticChoice.resolve``); index 0 must be
        the axis' full size so that the b = 1 identity target is the parent."""
        for axis, sizes in self.choice_lists:
            ax = AXES[axis]
            if ax.kinds and not layers_of(cfg, axis):
                raise ChoiceError("choice_lists", axis, f"the model has no '{ax.kinds}' block for this axis")
            fulls = {full_size(cfg, axis, i) for i in layers_of(cfg, axis)} if ax.per_layer else \
                {full_size(cfg, axis)}
            if fulls != {sizes[0]}:
                raise ChoiceError(f"choice_lists[{axis!r}]", sizes,
                                  f"index 0 must be the full size {sorted(fulls)} of every block")
            for v in sizes:
                try:
                    ElasticChoice(**{axis: int(v)}).resolve(cfg)
                except ChoiceError as e:
                    raise ChoiceError(f"choice_lists[{axis!r}]", sizes, f"size {v}: {e}") from None

    # ------------------------------------------------------------------ helpers
    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.choice_lists)

    @property
    def choice_dict(self) -> dict[str, tuple[int, ...]]:
        return dict(self.choice_lists)

    @property
    def n_budgets(self) -> int:
        return len(self.budgets)

    @classmethod
    def default(cls, cfg: ModelConfig, budgets: Sequence[float] = (1.0, 0.78, 0.577),
                choice_lists: Mapping[str, Sequence[int]] | None = None, **kw: Any) -> "RouterConfig":
        """A config with ``choice_lists`` (default: ``elastic.budget.default_choice_lists(cfg)``)."""
        if choice_lists is None:
            from star_elastic_jax.elastic.budget import default_choice_lists

            choice_lists = default_choice_lists(cfg)
        rc = cls(budgets=tuple(budgets), choice_lists=tuple((a, tuple(s)) for a, s in choice_lists.items()), **kw)
        rc.validate_for(cfg)
        return rc


def _positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ChoiceError(name, v, "a positive integer")


# ---------------------------------------------------------------------- schedules (pure, traceable)
def tau(rc: RouterConfig, step) -> jax.Array:
    """Gumbel-softmax temperature ``max(tau0 * decay^step, tau_min)`` (fp32; ``step`` may be traced)."""
    step = jnp.asarray(step, jnp.float32)
    # exp(step * log(decay)) with log(decay) in float64: float32(0.9997) would drift 5e-5 by step 5000
    return jnp.maximum(rc.tau0 * jnp.exp(step * math.log(rc.tau_decay)), jnp.float32(rc.tau_min))


def scaler(rc: RouterConfig, step, total_steps) -> jax.Array:
    """Logit scaler, linear from ``scaler_start`` (step 0) to ``scaler_end`` (step ``total_steps``), held
    after."""
    step = jnp.asarray(step, jnp.float32)
    total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
    frac = jnp.clip(step / total, 0.0, 1.0)
    return rc.scaler_start + (rc.scaler_end - rc.scaler_start) * frac


def router_key(base_key: jax.Array, step, microbatch) -> jax.Array:
    """The key of one (step, micro-batch): identical on every data-parallel rank (``step`` and
    ``microbatch`` may be traced). Split it for the budget draw and the Gumbel noise."""
    return jax.random.fold_in(jax.random.fold_in(base_key, step), microbatch)


def sample_budget_index(key: jax.Array, weights: Sequence[float] | jax.Array | None, n_budgets: int) -> jax.Array:
    """Index of the budget of one micro-batch: uniform when ``weights`` is None (stage 1), else
    proportional to ``weights`` (stage 2: 0.5/0.3/0.2)."""
    if weights is None:
        return jax.random.randint(key, (), 0, n_budgets)
    w = jnp.asarray(weights, jnp.float32)
    if w.shape != (n_budgets,):
        raise ChoiceError("budget_weights", weights, f"one weight per budget ({n_budgets})")
    return jax.random.categorical(key, jnp.log(w))


# ---------------------------------------------------------------------- the module
class _AxisRouter(nnx.Module):
    """``Linear(n_budgets -> width) -> LeakyReLU(0.1) -> Linear(width -> n_layers * k)``, no biases."""

    def __init__(self, n_budgets: int, width: int, n_out: int, std: float, *, rngs: nnx.Rngs):
        self.w_in = logical(std * jax.random.normal(rngs.params(), (width, n_budgets), jnp.float32),
                            ("router_hidden", "router_budgets"))
        self.w_out = logical(std * jax.random.normal(rngs.params(), (n_out, width), jnp.float32),
                             ("router_choices", "router_hidden"))

    def __call__(self, u: jax.Array) -> jax.Array:
        h = jax.nn.leaky_relu(linear(u.astype(jnp.float32), self.w_in[...]), 0.1)
        return linear(h, self.w_out[...])


class BudgetRouter(nnx.Module):
    """One static router per elastic axis (SPEC 3.6). fp32 parameters, logical names
    ``("router_hidden", "router_budgets")`` and ``("router_choices", "router_hidden")`` (replicate them)."""

    def __init__(self, model_cfg: ModelConfig, router_cfg: RouterConfig, *, rngs: nnx.Rngs):
        router_cfg.validate_for(model_cfg)
        self.model_cfg = model_cfg
        self.router_cfg = router_cfg
        routers = {}
        for axis, sizes in router_cfg.choice_lists:
            n_out = len(sizes) * self.n_layers(axis)
            routers[axis] = _AxisRouter(router_cfg.n_budgets, router_cfg.hidden_width, n_out, router_cfg.init_std,
                                        rngs=rngs)
        self.routers = nnx.Dict(routers)

    # ------------------------------------------------------------------ shapes
    def n_layers(self, axis: str) -> int:
        """Blocks the axis' router emits a distribution for (1 unless heterogeneous)."""
        return len(layers_of(self.model_cfg, axis)) if axis in self.router_cfg.heterogeneous_axes else 1

    def is_heterogeneous(self, axis: str) -> bool:
        return axis in self.router_cfg.heterogeneous_axes

    # ------------------------------------------------------------------ budget input
    def budget_vector(self, budget: float) -> jax.Array:
        """``[n_budgets]`` input for a concrete budget: one-hot of a trained budget, linear
        interpolation between the two neighbouring trained budgets, the largest budget's one-hot
        above it; below the smallest trained budget is a :class:`ChoiceError`."""
        return jnp.asarray(budget_vector(self.router_cfg.budgets, budget))

    def index_vector(self, index) -> jax.Array:
        """One-hot input of trained budget ``index`` (traceable)."""
        return jax.nn.one_hot(index, self.router_cfg.n_budgets, dtype=jnp.float32)

    # ------------------------------------------------------------------ logits / probs
    def logits(self, budget_vec: jax.Array) -> dict[str, jax.Array]:
        """Unscaled logits per axis: ``[k]``, or ``[n_layers, k]`` for a heterogeneous axis."""
        out = {}
        for axis, sizes in self.router_cfg.choice_lists:
            z = self.routers[axis](budget_vec)
            out[axis] = z.reshape(self.n_layers(axis), len(sizes)) if self.is_heterogeneous(axis) else z
        return out

    def probs(self, budget_vec: jax.Array, *, step=0, key: jax.Array | None = None, total_steps=1,
              train: bool = True) -> dict[str, jax.Array]:
        """Per-axis weights over the choice list (see the module docstring for the modes)."""
        rc = self.router_cfg
        logits = self.logits(budget_vec)
        if not train:
            return {a: jax.nn.one_hot(jnp.argmax(z, -1), z.shape[-1], dtype=jnp.float32) for a, z in logits.items()}
        if key is None:
            raise ChoiceError("key", None, "training-mode router probs need a PRNG key (router_key(...))")
        s, t = scaler(rc, step, total_steps), tau(rc, step)
        keys = jax.random.split(key, len(logits) + 1)
        soft, hard = {}, {}
        for (axis, z), k in zip(logits.items(), keys[:-1]):
            g = jax.random.gumbel(k, z.shape, jnp.float32)
            p = jax.nn.softmax((s * z + g) / t, axis=-1)
            soft[axis] = p
            hard[axis] = straight_through(p)
        if rc.mode == "hard_st":
            return hard
        if rc.hard_sample_prob > 0:
            use_hard = jax.random.uniform(keys[-1], ()) < rc.hard_sample_prob
            return {a: jnp.where(use_hard, hard[a], soft[a]) for a in soft}
        return soft

    def expected_sizes(self, probs: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """``d = pi . choices`` per axis (scalar, or ``[n_layers]`` heterogeneous)."""
        choices = self.router_cfg.choice_dict
        return {a: p @ jnp.asarray(choices[a], jnp.float32) for a, p in probs.items()}

    # ------------------------------------------------------------------ masks / choices
    def masks(self, probs: Mapping[str, jax.Array]) -> ElasticMasks:
        """The masked forward's ElasticMasks for these weights (differentiable in ``probs``)."""
        choices = self.router_cfg.choice_dict
        return build_masks(self.model_cfg, {a: (list(choices[a]), p) for a, p in probs.items()})

    def choice(self, budget: float) -> ElasticChoice:
        """The argmax sub-model for a concrete ``budget`` (heterogeneous axes give per-layer tuples)."""
        logits = self.logits(self.budget_vector(budget))
        choices = self.router_cfg.choice_dict
        sizes: dict[str, Any] = {}
        for axis, z in logits.items():
            idx = np.asarray(jnp.argmax(z, -1))
            if self.is_heterogeneous(axis):
                sizes[axis] = tuple(int(choices[axis][i]) for i in idx)
            else:
                sizes[axis] = int(choices[axis][int(idx)])
        return ElasticChoice(**sizes)


def straight_through(p: jax.Array) -> jax.Array:
    """``onehot(argmax p) + p - stop_gradient(p)``: forward one-hot, backward the gradient of ``p``."""
    hard = jax.nn.one_hot(jnp.argmax(p, -1), p.shape[-1], dtype=p.dtype)
    return hard + p - jax.lax.stop_gradient(p)


def budget_vector(budgets: Sequence[float], budget: float) -> np.ndarray:
    """``[len(budgets)]`` router input for ``budget`` (``budgets`` descending, SPEC 3.6)."""
    from star_elastic_jax.elastic.budget import validate_fraction

    b = validate_fraction(budget)
    n = len(budgets)
    u = np.zeros((n,), np.float32)
    if b >= budgets[0]:
        u[0] = 1.0
        return u
    if b < budgets[-1]:
        raise ChoiceError("budget", budget, f"must be >= the smallest trained budget {budgets[-1]} "
                                            f"(trained: {list(budgets)})")
    for i in range(n - 1):
        hi, lo = budgets[i], budgets[i + 1]
        if lo <= b <= hi:
            if b == lo:
                u[i + 1] = 1.0
            else:
                w = (b - hi) / (lo - hi)
                u[i], u[i + 1] = 1.0 - w, w
            return u
    raise AssertionError("unreachable")  # pragma: no cover
