"""The experiment config: ml_collections ``ConfigDict`` files (``configs/*.py``) frozen into hashable
dataclasses, validated before anything is built or compiled.

``configs/X.py`` defines ``get_config() -> ConfigDict`` with the sections below (every one optional
except ``model``, ``router`` and ``stages``); :func:`from_config_dict` turns it into a
:class:`TrainConfig`, raising a ``ConfigError`` / ``DataError`` / ``ChoiceError`` that names the field
(``stages[1].seq_len``, ``router.budgets``, ``mesh.fsdp`` ...) on the first problem.

Config files and ``--config.a.b=value`` overrides: :mod:`star_elastic_jax.train.overrides`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from star_elastic_jax.config import MOE_IMPLS, SSD_IMPLS, ModelConfig
from star_elastic_jax.data.pipeline import DataConfig
from star_elastic_jax.data.synthetic import SyntheticConfig
from star_elastic_jax.elastic.budget import validate_budgets
from star_elastic_jax.elastic.router import RouterConfig
from star_elastic_jax.errors import ChoiceError, ConfigError, DataError, StarElasticError
from star_elastic_jax.train.sharding import MeshConfig

TEACHER_DTYPES = ("float32", "bfloat16")
ROUTER_SCHEDULES = ("scaled", "constant")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One curriculum stage (SPEC 3.8): budget sampling, sequence length and token count.

    ``sampling``: ``"uniform"`` or one weight per router budget (normalised). ``batch_size`` is the
    global number of rows per optimizer step, split into ``micro_batches`` gradient-accumulation
    micro-batches, each with its own budget. ``tokens`` fixes the stage's number of steps:
    ``ceil(tokens / (batch_size * seq_len))``.
    """

    name: str
    sampling: str | tuple[float, ...] = "uniform"
    seq_len: int = 128
    tokens: int = 0
    batch_size: int = 8
    micro_batches: int = 1

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))

    @property
    def micro_rows(self) -> int:
        return self.batch_size // self.micro_batches

    def weights(self, n_budgets: int) -> tuple[float, ...] | None:
        """Normalised sampling weights (``None`` = uniform)."""
        if self.sampling == "uniform":
            return None
        total = float(sum(self.sampling))
        return tuple(float(w) / total for w in self.sampling)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW (SPEC 3.8): model LR ``lr`` with linear warmup and cosine decay to ``min_lr``; router LR
    ``router_lr`` (``router_schedule="scaled"``: the model schedule times ``router_lr / lr``, Megatron's
    param-group multiplier; ``"constant"``: flat). Global-norm clipping over model and router grads."""

    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 60
    router_lr: float = 1e-2
    router_schedule: str = "scaled"
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Cross-entropy pre-training of a parent from scratch (used when ``parent`` is None), then
    importance ranking on ``calib_batches`` batches. ``parent``: an existing Orbax model checkpoint
    to distil from instead; ``ranked``: it is already permuted (skip ranking)."""

    steps: int = 0
    seq_len: int = 128
    batch_size: int = 8
    micro_batches: int = 1
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=3e-3, min_lr=3e-4,
                                                                                 warmup_steps=20))
    calib_batches: int = 4
    parent: str | None = None
    ranked: bool = False


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax CheckpointManager: save every ``every`` steps (and at the end), keep the last ``keep``."""

    every: int = 100
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluate every budget (router argmax) every ``every`` steps on ``batches`` held-out batches."""

    every: int = 100
    batches: int = 2
    batch_size: int = 8
    at_start: bool = True  # also evaluate before the first step (the "start" row of the summary table)


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every: int = 10
    progress: bool = True
    tensorboard: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs (hashable; no ml_collections past :func:`from_config_dict`)."""

    model: ModelConfig
    router: RouterConfig
    stages: tuple[StageConfig, ...]
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    seed: int = 0
    max_seq_len: int | None = None  # None: the model's max_position_embeddings
    teacher_dtype: str = "float32"
    # cheap XLA codegen (LLVM opt level 0): compiles ~2x faster, steps run slower. For CPU tests/debugging.
    fast_compile: bool = False

    def __post_init__(self):
        self.validate()

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def seq_len_limit(self) -> int:
        m = self.model.max_position_embeddings
        return m if self.max_seq_len is None else min(m, self.max_seq_len)

    def stage_at(self, step: int) -> tuple[int, StageConfig, int]:
        """``(stage index, stage, first step of the stage)`` of global KD step ``step``."""
        start = 0
        for i, s in enumerate(self.stages):
            if step < start + s.steps:
                return i, s, start
            start += s.steps
        return len(self.stages) - 1, self.stages[-1], start - self.stages[-1].steps

    def validate(self, n_devices: int | None = None) -> None:
        """Raise the first problem, naming the field. ``n_devices`` also checks the mesh."""
        if not isinstance(self.model, ModelConfig):
            raise ConfigError("model", type(self.model).__name__, "a ModelConfig")
        if not isinstance(self.router, RouterConfig):
            raise ConfigError("router", type(self.router).__name__, "a RouterConfig")
        _check_router_for_model(self.router, self.model)
        _int("seed", self.seed, 0)
        if self.max_seq_len is not None:
            _int("max_seq_len", self.max_seq_len, 1)
        if not isinstance(self.fast_compile, bool):
            raise ConfigError("fast_compile", self.fast_compile, "true or false")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ConfigError("teacher_dtype", self.teacher_dtype, f"one of {TEACHER_DTYPES}")
        if not isinstance(self.stages, tuple) or not self.stages:
            raise ConfigError("stages", self.stages, "at least one stage")
        names = set()
        for i, st in enumerate(self.stages):
            _check_stage(f"stages[{i}]", st, self.router.n_budgets, self.seq_len_limit)
            if st.name in names:
                raise ConfigError(f"stages[{i}].name", st.name, "stage names must be unique")
            names.add(st.name)
        _check_optim("optim", self.optim)
        p = self.pretrain
        _int("pretrain.steps", p.steps, 0)
        if p.parent is None and p.steps == 0:
            raise ConfigError("pretrain.steps", 0, "> 0 (pre-train a parent with CE) or set pretrain.parent to a "
                                                   "parent checkpoint")
        if p.parent is not None and not isinstance(p.parent, str):
            raise ConfigError("pretrain.parent", p.parent, "a path to an Orbax model checkpoint, or None")
        _check_stage("pretrain", StageConfig("pretrain", "uniform", p.seq_len, 1, p.batch_size, p.micro_batches),
                     self.router.n_budgets, self.seq_len_limit)
        _check_optim("pretrain.optim", p.optim)
        _int("pretrain.calib_batches", p.calib_batches, 1)
        _int("checkpoint.every", self.checkpoint.every, 1)
        _int("checkpoint.keep", self.checkpoint.keep, 1)
        _int("eval.every", self.eval.every, 1)
        _int("eval.batches", self.eval.batches, 1)
        _int("eval.batch_size", self.eval.batch_size, 1)
        _int("log.every", self.log.every, 1)
        if n_devices is not None:
            self.mesh.resolve(n_devices)


def _int(field: str, v: Any, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(field, v, f"an integer >= {lo}")


def _check_router_for_model(rc: RouterConfig, cfg: ModelConfig) -> None:
    try:
        rc.validate_for(cfg)
    except ChoiceError as e:
        field = e.field if e.field.startswith("router.") else f"router.{e.field}"
        raise ChoiceError(field, e.value, e.valid) from None


def _check_stage(field: str, st: StageConfig, n_budgets: int, max_len: int) -> None:
    if not isinstance(st, StageConfig):
        raise ConfigError(field, st, "a StageConfig")
    if not isinstance(st.name, str) or not st.name:
        raise ConfigError(f"{field}.name", st.name, "a non-empty string")
    for name in ("seq_len", "tokens", "batch_size", "micro_batches"):
        _int(f"{field}.{name}", getattr(st, name), 1)
    if st.seq_len > max_len:
        raise DataError(f"{field}.seq_len", st.seq_len, f"must be <= the maximum sequence length {max_len} "
                                                        "(max_seq_len / the model's max_position_embeddings)")
    if st.batch_size % st.micro_batches:
        raise ConfigError(f"{field}.micro_batches", st.micro_batches,
                          f"must divide batch_size={st.batch_size} (rows per micro-batch)")
    if st.sampling != "uniform":
        w = st.sampling
        ok = isinstance(w, tuple) and len(w) == n_budgets and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 and math.isfinite(x) for x in w)
        if not ok or sum(w) <= 0:
            raise ChoiceError(f"{field}.sampling", w, f"'uniform' or {n_budgets} non-negative weights (one per "
                                                      "router budget, largest budget first) with a positive sum")


def _check_optim(field: str, o: OptimConfig) -> None:
    for name in ("lr", "router_lr", "eps", "clip_norm"):
        v = getattr(o, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"{field}.{name}", v, "a finite number > 0")
    for name in ("min_lr", "weight_decay"):
        v = getattr(o, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (v >= 0 and math.isfinite(v)):
            raise ConfigError(f"{field}.{name}", v, "a finite number >= 0")
    if o.min_lr > o.lr:
        raise ConfigError(f"{field}.min_lr", o.min_lr, f"must be <= lr={o.lr}")
    for name in ("b1", "b2"):
        v = getattr(o, name)
        if not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ConfigError(f"{field}.{name}", v, "a number in [0, 1)")
    _int(f"{field}.warmup_steps", o.warmup_steps, 0)
    if o.router_schedule not in ROUTER_SCHEDULES:
        raise ConfigError(f"{field}.router_schedule", o.router_schedule, f"one of {ROUTER_SCHEDULES}")


# ------------------------------------------------------------------------------------------ ConfigDict -> dataclass
def _plain(x: Any) -> Any:
    """ConfigDict / FrozenConfigDict / FieldReference -> plain python (dicts, lists)."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "get") and type(x).__name__ == "FieldReference":
        return _plain(x.get())
    return x


def _build(cls, data: Any, field: str, **fixed: Any):
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(field, data, f"a dict of {cls.__name__} fields")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{field}.{unknown[0]}", data[unknown[0]], f"unknown field; valid: {sorted(names)}")
    kwargs = dict(fixed)
    for k, v in data.items():
        if isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except StarElasticError as e:
        f = e.field if e.field.startswith(field + ".") else f"{field}.{e.field}"
        raise type(e)(f, e.value, e.valid) from None
    except TypeError as e:
        raise ConfigError(field, data, f"invalid {cls.__name__} fields ({e})") from None


def model_config_from(data: Mapping[str, Any]) -> ModelConfig:
    """``{"preset": name, "overrides": {...}}`` or ``{"hf_config": path, "overrides": {...}}``."""
    data = dict(data or {})
    unknown = sorted(set(data) - {"preset", "hf_config", "overrides"})
    if unknown:
        raise ConfigError(f"model.{unknown[0]}", data[unknown[0]], "valid keys: preset, hf_config, overrides")
    overrides = dict(data.get("overrides") or {})
    try:
        if data.get("hf_config"):
            return ModelConfig.from_hf(data["hf_config"]).with_updates(**overrides)
        return ModelConfig.preset(data.get("preset", "tiny"), **overrides)
    except ConfigError as e:
        raise ConfigError(f"model.{e.field}", e.value, e.valid) from None
    except TypeError as e:
        raise ConfigError("model.overrides", overrides, f"ModelConfig fields ({e})") from None


def with_kernels(model: ModelConfig, kernels: Mapping[str, Any] | None) -> ModelConfig:
    """Apply the ``kernels`` section (``ssd`` / ``moe``: "auto", "reference", "pallas", ...; the one
    place a run picks its kernels) to the model config's ``ssd_impl`` / ``moe_impl``."""
    kernels = dict(kernels or {})
    fields = {"ssd": ("ssd_impl", SSD_IMPLS), "moe": ("moe_impl", MOE_IMPLS)}
    updates = {}
    for key, value in kernels.items():
        if key not in fields:
            raise ConfigError(f"kernels.{key}", value, f"valid keys: {sorted(fields)}")
        field, valid = fields[key]
        if value not in valid:
            raise ConfigError(f"kernels.{key}", value, f"one of {valid}")
        updates[field] = value
    return model.with_updates(**updates) if updates else model


def from_config_dict(config: Any) -> TrainConfig:
    """Freeze an ml_collections ConfigDict (or plain dict) into a validated :class:`TrainConfig`."""
    d = _plain(config)
    if not isinstance(d, Mapping):
        raise ConfigError("config", type(config).__name__, "a ConfigDict")
    known = {f.name for f in dataclasses.fields(TrainConfig)} | {"kernels"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(unknown[0], d[unknown[0]], f"unknown config section; valid: {sorted(known)}")
    model = with_kernels(model_config_from(d.get("model") or {}), d.get("kernels"))
    r = dict(d.get("router") or {})
    budgets = validate_budgets(r.pop("budgets", None), "router.budgets")
    lists = r.pop("choice_lists", None)
    if "heterogeneous_axes" in r:
        r["heterogeneous_axes"] = tuple(r["heterogeneous_axes"])
    try:
        if lists is None:
            router = RouterConfig.default(model, budgets=tuple(budgets), **r)
        else:
            router = RouterConfig(budgets=tuple(budgets),
                                  choice_lists=tuple((a, tuple(s)) for a, s in dict(lists).items()), **r)
    except ChoiceError as e:
        raise ChoiceError(e.field if e.field.startswith("router.") else f"router.{e.field}", e.value, e.valid) \
            from None
    except TypeError as e:
        raise ConfigError("router", r, f"RouterConfig fields ({e})") from None
    data_d = dict(d.get("data") or {})
    synth = _build(SyntheticConfig, data_d.pop("synthetic", None), "data.synthetic")
    data = _build(DataConfig, data_d, "data", synthetic=synth)
    stages_raw = d.get("stages")
    if not isinstance(stages_raw, (list, tuple)) or not stages_raw:
        raise ConfigError("stages", stages_raw, "a non-empty list of stages")
    stages = []
    for i, s in enumerate(stages_raw):
        s = dict(s or {})
        if isinstance(s.get("sampling"), (list, tuple)):
            s["sampling"] = tuple(float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x
                                  for x in s["sampling"])
        stages.append(_build(StageConfig, s, f"stages[{i}]"))
    pre = dict(d.get("pretrain") or {})
    pre_optim = _build(OptimConfig, pre.pop("optim", None), "pretrain.optim") if "optim" in pre else None
    pretrain = _build(PretrainConfig, pre, "pretrain", **({"optim": pre_optim} if pre_optim else {}))
    kwargs = dict(
        model=model, router=router, stages=tuple(stages), data=data,
        mesh=_build(MeshConfig, d.get("mesh"), "mesh"),
        optim=_build(OptimConfig, d.get("optim"), "optim"),
        pretrain=pretrain,
        checkpoint=_build(CheckpointConfig, d.get("checkpoint"), "checkpoint"),
        eval=_build(EvalConfig, d.get("eval"), "eval"),
        log=_build(LogConfig, d.get("log"), "log"),
    )
    for k in ("seed", "max_seq_len", "teacher_dtype", "fast_compile"):
        if k in d:
            kwargs[k] = d[k]
    return TrainConfig(**kwargs)
