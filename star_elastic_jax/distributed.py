"""Multi-host start-up: a validated, idempotent wrapper around ``jax.distributed.initialize``.

Every process of a multi-host run calls :func:`initialize` once, before any other JAX call (device
queries included). Where the coordinator, the process count and this process's id come from, in
order of precedence (per field):

1. explicit values: a :class:`DistributedConfig` passed in, or the command-line flags of
   :func:`add_flags` / :func:`config_from_args`;
2. the environment: ``STAR_ELASTIC_COORDINATOR`` (``host:port``), ``STAR_ELASTIC_NUM_PROCESSES``,
   ``STAR_ELASTIC_PROCESS_ID``, ``STAR_ELASTIC_LOCAL_DEVICE_IDS`` (``"0,1"``), and
   ``STAR_ELASTIC_COORDINATOR_PORT`` (the port used with an auto-detected SLURM coordinator host);
3. auto-detection (``auto=True``):

   * **SLURM** (``SLURM_PROCID`` and ``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS`` set, i.e. inside
     ``srun``): process id = ``SLURM_PROCID``, count = the step's task count, coordinator = the first
     host of ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``; forms ``node07``, ``a,b``,
     ``node[01-04]``, ``gpu[3,5-7],cpu1``) on port ``STAR_ELASTIC_COORDINATOR_PORT``, else a port
     derived from ``SLURM_JOB_ID`` (the scheme JAX's own SLURM detection uses). With several tasks per
     node, each task takes its local GPU ``SLURM_LOCALID`` unless SLURM already bound one GPU per task.
   * **Cloud TPU** (``TPU_WORKER_HOSTNAMES``, ``TPU_PROCESS_ADDRESSES``, ``MEGASCALE_COORDINATOR_ADDRESS``,
     ``TPU_ACCELERATOR_TYPE``, ``TPU_WORKER_ID`` or ``CLOUD_TPU_TASK_ID`` present): nothing is set here;
     ``jax.distributed.initialize()`` is called without arguments and JAX reads the pod's metadata
     (one process per TPU VM host; multislice through the ``MEGASCALE_*`` variables).

With none of these it is a single-process run and :func:`initialize` does nothing. Inconsistent
values (an id outside ``[0, num_processes)``, several processes without a coordinator, a malformed
address or integer) raise :class:`~star_elastic_jax.errors.ConfigError` naming the field, before JAX
is touched. On CPU the cross-process collectives are gloo (``jax_cpu_collectives_implementation``).

Data: each process then reads only its own shard, ``make_dataset(..., process_index=jax.process_index(),
process_count=jax.process_count())``, and the global batch is assembled with
``jax.make_array_from_process_local_data`` (``TrainStep.put_batch``).

``python -m star_elastic_jax.launcher [flags] -- train --config ... --workdir ...`` initializes
and then runs the ``star-elastic`` CLI with the remaining arguments (what the scripts in ``launch/``
use); it lives in :mod:`star_elastic_jax.launcher`, above the CLI, so this module never imports it.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from star_elastic_jax.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_COORDINATOR = "STAR_ELASTIC_COORDINATOR"
ENV_NUM_PROCESSES = "STAR_ELASTIC_NUM_PROCESSES"
ENV_PROCESS_ID = "STAR_ELASTIC_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "STAR_ELASTIC_LOCAL_DEVICE_IDS"
ENV_COORDINATOR_PORT = "STAR_ELASTIC_COORDINATOR_PORT"
ENV_VARS = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID, ENV_LOCAL_DEVICE_IDS, ENV_COORDINATOR_PORT)

# any of these means "a Cloud TPU VM / pod (or multislice) worker": JAX's cluster detection takes over
TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS",
                "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID")
SOURCES = ("explicit", "env", "slurm", "tpu", "single")
CPU_COLLECTIVES = "gloo"


# ============================================================================================ config
@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Arguments of ``jax.distributed.initialize``.

    ``num_processes`` ``None`` or 1 (and not a TPU pod): single process, :func:`initialize` is a no-op.
    ``auto``: with nothing set, let :func:`initialize` fill the fields from the environment
    (:meth:`from_env`); ``auto=False`` with nothing set means single process. ``source`` records where
    the values came from (one of :data:`SOURCES`); ``"tpu"`` calls ``jax.distributed.initialize()``
    without arguments (JAX's Cloud TPU detection).
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    auto: bool = True
    source: str = "explicit"
    initialization_timeout: int = 300

    def __post_init__(self):
        ids = self.local_device_ids
        if isinstance(ids, (int,)) and not isinstance(ids, bool):
            object.__setattr__(self, "local_device_ids", (ids,))
        elif isinstance(ids, str):
            object.__setattr__(self, "local_device_ids", _parse_ids(ids, "local_device_ids"))
        elif ids is not None:
            object.__setattr__(self, "local_device_ids", tuple(ids))
        if self.source not in SOURCES:
            raise ConfigError("distributed.source", self.source, f"one of {SOURCES}")

    @property
    def is_unset(self) -> bool:
        return self.coordinator_address is None and self.num_processes is None and self.process_id is None

    @property
    def multi_process(self) -> bool:
        """Whether :func:`initialize` will call ``jax.distributed.initialize``."""
        return self.source == "tpu" or (self.num_processes is not None and self.num_processes > 1)

    def validate(self) -> DistributedConfig:
        """ConfigError (naming the field) on malformed or inconsistent values; returns ``self``."""
        n, pid, addr = self.num_processes, self.process_id, self.coordinator_address
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError("distributed.num_processes", n, "a positive integer")
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid < 0):
            raise ConfigError("distributed.process_id", pid, "a non-negative integer")
        if pid is not None and n is not None and pid >= n:
            raise ConfigError("distributed.process_id", pid, f"must be < num_processes={n}")
        if pid is not None and pid > 0 and n is None:
            raise ConfigError("distributed.num_processes", None, f"must be set (> process_id={pid}) when "
                                                                 f"process_id is set ({ENV_NUM_PROCESSES})")
        if n is not None and n > 1:
            if pid is None:
                raise ConfigError("distributed.process_id", None, f"must be set with num_processes={n} "
                                                                  f"(--process-id or {ENV_PROCESS_ID})")
            if not addr:
                raise ConfigError("distributed.coordinator_address", addr,
                                  f"a 'host:port' reachable from every process is needed with num_processes={n} "
                                  f"(--coordinator or {ENV_COORDINATOR})")
        if addr is not None:
            _check_address(addr)
        if self.local_device_ids is not None:
            for d in self.local_device_ids:
                if isinstance(d, bool) or not isinstance(d, int) or d < 0:
                    raise ConfigError("distributed.local_device_ids", self.local_device_ids,
                                      "non-negative integer device ids, e.g. (0, 1) or '0,1'")
        t = self.initialization_timeout
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ConfigError("distributed.initialization_timeout", t, "a positive number of seconds")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, auto: bool = True) -> DistributedConfig:
        """The config from ``STAR_ELASTIC_*`` variables, else (``auto``) SLURM or Cloud TPU detection,
        else single process. Explicit variables win field by field over SLURM's (e.g. only
        ``STAR_ELASTIC_COORDINATOR`` set inside ``srun``: that address, SLURM's id and count)."""
        env = os.environ if environ is None else environ
        explicit = {
            "coordinator_address": _env_str(env, ENV_COORDINATOR),
            "num_processes": _env_int(env, ENV_NUM_PROCESSES),
            "process_id": _env_int(env, ENV_PROCESS_ID),
            "local_device_ids": (_parse_ids(env[ENV_LOCAL_DEVICE_IDS], ENV_LOCAL_DEVICE_IDS)
                                 if _env_str(env, ENV_LOCAL_DEVICE_IDS) else None),
        }
        port = _env_int(env, ENV_COORDINATOR_PORT)
        if port is not None and not 0 < port < 65536:
            raise ConfigError(ENV_COORDINATOR_PORT, port, "a TCP port in [1, 65535]")
        has_explicit = any(v is not None for v in explicit.values())
        if auto and is_slurm(env):
            slurm = slurm_values(env, port=port)
            merged = {k: (explicit[k] if explicit[k] is not None else slurm[k]) for k in explicit}
            return cls(**merged, auto=auto, source="slurm")
        if has_explicit:
            return cls(**explicit, auto=auto, source="env")
        if auto and is_tpu(env):
            return cls(auto=auto, source="tpu")
        return cls(num_processes=1, process_id=0, auto=auto, source="single")

    def resolved(self, environ: Mapping[str, str] | None = None) -> DistributedConfig:
        """Fields left unset filled from :meth:`from_env` (when ``auto``)."""
        if not self.auto:
            return self if not self.is_unset else dataclasses.replace(self, num_processes=1, process_id=0,
                                                                      source="single")
        env = DistributedConfig.from_env(environ, auto=True)
        if self.is_unset and self.local_device_ids is None:
            return dataclasses.replace(env, initialization_timeout=self.initialization_timeout)
        fill = {f: getattr(env, f) for f in ("coordinator_address", "num_processes", "process_id",
                                             "local_device_ids") if getattr(self, f) is None}
        return dataclasses.replace(self, **fill)


# ============================================================================================ env parsing
def _env_str(env: Mapping[str, str], name: str) -> str | None:
    v = env.get(name)
    return v.strip() if v is not None and v.strip() else None


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    v = _env_str(env, name)
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        raise ConfigError(name, v, "an integer") from None


def _parse_ids(text: str, field: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(p) for p in str(text).replace(" ", "").split(",") if p)
    except ValueError:
        raise ConfigError(field, text, "comma-separated non-negative device ids, e.g. '0,1'") from None
    if not ids or min(ids) < 0:
        raise ConfigError(field, text, "comma-separated non-negative device ids, e.g. '0,1'")
    return ids


def _check_address(addr: Any) -> None:
    if not isinstance(addr, str):
        raise ConfigError("distributed.coordinator_address", addr, "a 'host:port' string")
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("distributed.coordinator_address", addr,
                          "'host:port' with a TCP port in [1, 65535], e.g. '10.0.0.1:1234' or 'node01:29500'")


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist expression: ``node07`` -> ``node07``; ``a,b`` -> ``a``;
    ``node[01-04]`` -> ``node01``; ``gpu[3,5-7],cpu1`` -> ``gpu3``; ``rack[1-2]-n[01-04]`` -> ``rack1-n01``."""
    text = nodelist.strip()
    if not text or text[0] in "[],":
        raise ConfigError("SLURM_STEP_NODELIST", nodelist, "a non-empty SLURM hostlist, e.g. 'node[01-04]'")
    out, i, depth = [], 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "," and depth == 0:
            break
        if ch == "[":
            close = text.find("]", i)
            if close < 0:
                raise ConfigError("SLURM_STEP_NODELIST", nodelist, "balanced brackets, e.g. 'node[01-04]'")
            first = re.split(r"[,-]", text[i + 1:close], maxsplit=1)[0]
            if not first:
                raise ConfigError("SLURM_STEP_NODELIST", nodelist, "a non-empty range inside [...]")
            out.append(first)
            i = close + 1
            continue
        if ch == "]":
            raise ConfigError("SLURM_STEP_NODELIST", nodelist, "balanced brackets, e.g. 'node[01-04]'")
        out.append(ch)
        i += 1
    host = "".join(out)
    if not host:
        raise ConfigError("SLURM_STEP_NODELIST", nodelist, "a hostlist starting with a host name")
    return host


def slurm_port(env: Mapping[str, str]) -> int:
    """JAX's SLURM port scheme: ``SLURM_JOB_ID mod 4096`` into the range [61440, 65535] (every task of
    a job computes the same port; two jobs on one node rarely collide)."""
    job = _env_int(env, "SLURM_JOB_ID")
    return 61440 + (job % 4096 if job is not None else 0)


def _tasks_per_node(env: Mapping[str, str]) -> int | None:
    """First entry of ``SLURM_STEP_TASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE`` (``'8(x4)'``, ``'2,1'``)."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        v = _env_str(env, name)
        if v:
            m = re.match(r"\d+", v)
            if m:
                return int(m.group())
    return None


def is_slurm(env: Mapping[str, str] | None = None) -> bool:
    """Inside a SLURM job step (``srun``): a task id and a task count are set."""
    env = os.environ if env is None else env
    return ("SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env)
            and ("SLURM_STEP_NODELIST" in env or "SLURM_JOB_NODELIST" in env or "SLURM_NODELIST" in env))


def slurm_values(env: Mapping[str, str], *, port: int | None = None) -> dict:
    """``coordinator_address, num_processes, process_id, local_device_ids`` from SLURM's variables."""
    n = _env_int(env, "SLURM_STEP_NUM_TASKS")
    n = _env_int(env, "SLURM_NTASKS") if n is None else n
    pid = _env_int(env, "SLURM_PROCID")
    nodelist = _env_str(env, "SLURM_STEP_NODELIST") or _env_str(env, "SLURM_JOB_NODELIST") \
        or _env_str(env, "SLURM_NODELIST") or ""
    host = first_slurm_host(nodelist)
    port = slurm_port(env) if port is None else port
    local_ids = None
    tpn = _tasks_per_node(env)
    local = _env_int(env, "SLURM_LOCALID")
    if tpn is not None and tpn > 1 and local is not None:
        visible = _env_str(env, "CUDA_VISIBLE_DEVICES")
        # SLURM bound one GPU to this task (--gpus-per-task=1 / --gpu-bind): it is local device 0
        local_ids = None if visible is not None and "," not in visible else (local,)
    return {"coordinator_address": f"{host}:{port}", "num_processes": n, "process_id": pid,
            "local_device_ids": local_ids}


def is_tpu(env: Mapping[str, str] | None = None) -> bool:
    """A Cloud TPU VM (pod slice or multislice worker)."""
    env = os.environ if env is None else env
    return any(_env_str(env, v) for v in TPU_ENV_VARS)


# ============================================================================================ initialize
_INITIALIZED: DistributedConfig | None = None


def is_initialized() -> bool:
    """``initialize`` ran a multi-process start-up in this process (or someone else called
    ``jax.distributed.initialize``)."""
    import jax

    return _INITIALIZED is not None or jax.distributed.is_initialized()


def set_cpu_collectives(impl: str = CPU_COLLECTIVES) -> None:
    """Cross-process collectives of the CPU backend (gloo; ``mpi`` is kept if already chosen). Must run
    before the CPU backend is created; harmless on GPU/TPU hosts."""
    import jax

    current = getattr(jax.config, "jax_cpu_collectives_implementation", None)
    if current != "mpi" and current != impl:
        jax.config.update("jax_cpu_collectives_implementation", impl)


def initialize(cfg: DistributedConfig | None = None, **overrides: Any) -> DistributedConfig:
    """Start JAX's distributed runtime for this process; returns the config used.

    ``cfg`` (default: all fields from the environment, :meth:`DistributedConfig.from_env`); keyword
    ``overrides`` replace fields (``initialize(num_processes=2, process_id=0, coordinator_address=...)``).
    Idempotent: a second call returns the first call's config (a conflicting one raises ConfigError).
    Single process: nothing to start, no JAX call. Cloud TPU: ``jax.distributed.initialize()``
    auto-detects everything.
    """
    global _INITIALIZED
    cfg = DistributedConfig() if cfg is None else cfg
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    cfg = cfg.resolved().validate()
    if _INITIALIZED is not None:
        prev = _INITIALIZED
        if cfg.multi_process and cfg.source != "tpu" and (
                (cfg.num_processes, cfg.process_id) != (prev.num_processes, prev.process_id)):
            raise ConfigError("distributed", (cfg.num_processes, cfg.process_id),
                              f"already initialized as process {prev.process_id} of {prev.num_processes}")
        return prev
    if not cfg.multi_process:
        logger.debug("star_elastic_jax.distributed: single process (%s), nothing to initialize", cfg.source)
        return cfg

    import jax

    if jax.distributed.is_initialized():  # someone called jax.distributed.initialize directly
        _INITIALIZED = dataclasses.replace(cfg, num_processes=jax.process_count(), process_id=jax.process_index())
        return _INITIALIZED
    set_cpu_collectives()
    if cfg.source == "tpu":
        jax.distributed.initialize(initialization_timeout=cfg.initialization_timeout)
        cfg = dataclasses.replace(cfg, num_processes=jax.process_count(), process_id=jax.process_index())
    else:
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id,
                                   local_device_ids=list(cfg.local_device_ids) if cfg.local_device_ids else None,
                                   initialization_timeout=cfg.initialization_timeout)
    logger.info("star_elastic_jax.distributed: process %s of %s (%s, coordinator %s)", cfg.process_id,
                cfg.num_processes, cfg.source, cfg.coordinator_address)
    _INITIALIZED = cfg
    return cfg


def shutdown() -> None:
    """``jax.distributed.shutdown()`` if :func:`initialize` started the runtime."""
    global _INITIALIZED
    if _INITIALIZED is not None:
        import jax

        jax.distributed.shutdown()
        _INITIALIZED = None


# ============================================================================================ flags
def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--coordinator``, ``--num-processes``, ``--process-id``, ``--local-device-ids``, ``--no-auto``."""
    g = parser.add_argument_group("multi-host (default: STAR_ELASTIC_* env vars, else SLURM / Cloud TPU detection)")
    g.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help=f"address of process 0's coordinator service (env {ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, metavar="N", default=None,
                   help=f"number of processes (env {ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, metavar="I", default=None,
                   help=f"this process's id in [0, N) (env {ENV_PROCESS_ID})")
    g.add_argument("--local-device-ids", metavar="IDS", default=None,
                   help=f"comma-separated local devices this process uses (env {ENV_LOCAL_DEVICE_IDS})")
    g.add_argument("--no-auto", dest="auto", action="store_false",
                   help="no environment / SLURM / TPU detection: only the flags")
    return parser


def config_from_args(args: argparse.Namespace) -> DistributedConfig:
    ids = getattr(args, "local_device_ids", None)
    return DistributedConfig(coordinator_address=getattr(args, "coordinator", None),
                             num_processes=getattr(args, "num_processes", None),
                             process_id=getattr(args, "process_id", None),
                             local_device_ids=_parse_ids(ids, "--local-device-ids") if ids else None,
                             auto=getattr(args, "auto", True))
