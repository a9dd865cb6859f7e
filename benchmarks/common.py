"""Shared helpers for the benchmark scripts: timing, environment report, markdown tables.

Timing rules every benchmark follows:

* warm up first (``warmup`` untimed calls), then time ``repeats`` calls and report the **median**;
  when comparing implementations, interleave them (:func:`time_interleaved`) so load drift on a
  shared machine affects all of them alike;
* JAX dispatch is asynchronous, so every timed call ends with :func:`block` on its result
  (``jax.block_until_ready`` on every array leaf); torch CPU calls are synchronous, and CUDA
  tensors are synchronised explicitly;
* compilation is never inside a timed call: compile ahead of time with :func:`aot_compile`
  (which reports its own wall time) and time the compiled executable.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence


# ---------------------------------------------------------------------------------------- timing
def block(result: Any) -> Any:
    """Wait until ``result`` is computed: JAX arrays (any pytree) and torch CUDA tensors."""
    if "jax" in sys.modules:
        import jax

        leaves = jax.tree_util.tree_leaves(result)
        if any(isinstance(x, jax.Array) for x in leaves):
            jax.block_until_ready(result)
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    return result


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall times (seconds) of the timed repeats of one benchmarked call."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    def per_second(self, items: float) -> float:
        """Throughput, e.g. tokens/s, at the median time."""
        return items / self.median


def time_fn(fn: Callable[[], Any], *, repeats: int, warmup: int = 1,
            sync: Callable[[Any], Any] = block) -> Timing:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed (each ending in ``sync``)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(max(warmup, 0)):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return Timing(tuple(times))


def time_interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
                     sync: Callable[[Any], Any] = block) -> dict[str, Timing]:
    """Like :func:`time_fn` for several functions, alternating them within each repeat.

    Interleaving means slow drifts of machine load (other jobs, thermal throttling) hit every
    function alike, so the ratios between them stay meaningful on a shared machine.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(max(warmup, 0)):
        for fn in fns.values():
            sync(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            sync(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: Timing(tuple(t)) for name, t in times.items()}


def aot_compile(jitted: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Trace, lower and compile ``jitted`` (a ``jax.jit`` function) for these arguments.

    Returns ``(compiled, seconds)``; ``compiled(*args)`` runs the executable with no tracing or
    compilation, so timing it excludes compile time.
    """
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - t0


# ---------------------------------------------------------------------------------- environment
def cpu_cores() -> int:
    """CPU cores this process may run on (respects affinity / cgroup cpusets where visible)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def environment() -> dict[str, str]:
    """Versions and devices of whatever of jax / flax / torch / transformers is imported."""
    env = {"python": platform.python_version(), "platform": platform.platform(terse=True),
           "cpu cores": str(cpu_cores())}
    if "jax" in sys.modules:
        import jax

        env["jax"] = jax.__version__
        d = jax.devices()[0]
        env["jax device"] = f"{d.platform}: {d.device_kind} x{jax.device_count()}"
    if "flax" in sys.modules:
        import flax

        env["flax"] = flax.__version__
    if "torch" in sys.modules:
        import torch

        env["torch"] = torch.__version__
        env["torch threads"] = str(torch.get_num_threads())
    if "transformers" in sys.modules:
        import transformers

        env["transformers"] = transformers.__version__
    return env


# ------------------------------------------------------------------------------------- printing
def fmt(x: Any, digits: int = 4) -> str:
    """Compact number formatting for tables: floats to ``digits`` significant digits."""
    if x is None:
        return "-"
    if isinstance(x, float):
        if x == 0 or 1e-3 <= abs(x) < 1e6:
            return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:,.0f}"
        return f"{x:.{max(digits - 1, 1)}e}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells go through :func:`fmt`, numeric columns right-aligned."""
    cells = [[fmt(c) for c in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) and bool(rows)
               for i in range(len(headers))]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(values, widths, numeric)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in cells])


def print_environment(extra: dict[str, str] | None = None) -> None:
    """Print :func:`environment` (plus ``extra``) as a two-column markdown table."""
    env = {**environment(), **(extra or {})}
    print(markdown_table(["environment", "value"], [[k, v] for k, v in env.items()]))
