"""Run outputs a person reads: ``metrics.jsonl`` (one JSON object per line), TensorBoard scalars
(tensorboardX) and the tqdm progress bar (step, tokens/s, loss per budget, ETA). Only process 0 writes."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterable, Mapping

import numpy as np


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.ndarray):
        return _jsonable(v.item()) if v.ndim == 0 else [_jsonable(x) for x in v.tolist()]
    return v


class MetricsWriter:
    """Appends JSON lines to ``path`` and (optionally) scalars to a TensorBoard run in ``tb_dir``."""

    def __init__(self, path: str, tb_dir: str | None = None, *, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self._tb = None
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if tb_dir is not None:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(tb_dir)
        self._f = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, record: Mapping[str, Any], *, tb_prefix: str | None = None, tb_tag: str | None = None) -> None:
        """One JSON line; numeric fields also go to TensorBoard as ``{tb_prefix}/{key}[/{tb_tag}]``."""
        if not self.enabled:
            return
        rec = {k: _jsonable(v) for k, v in record.items()}
        self._f.write(json.dumps(rec) + "\n")
        if self._tb is not None and tb_prefix is not None:
            step = int(rec["step"])
            for k, v in rec.items():
                if k in ("step",) or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                tag = f"{tb_prefix}/{k}" + (f"/{tb_tag}" if tb_tag else "")
                self._tb.add_scalar(tag, v, step)

    def truncate_after(self, step: int) -> None:
        """Drop lines with ``step > step`` (a resumed run rewrites them; TensorBoard keeps both)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        self._f.close()
        kept = [r for r in read_jsonl(self.path, torn_tail_ok=True) if int(r.get("step", 0)) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def flush(self) -> None:
        """Everything written so far reaches the disk (called before each checkpoint save starts)."""
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(path: str, *, torn_tail_ok: bool = False) -> list[dict]:
    """The records of a JSON-lines file. ``torn_tail_ok``: a malformed *last* line (the half-written
    row of a killed process, after its last committed checkpoint) is dropped instead of raising."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if torn_tail_ok and i == len(lines) - 1:
                break
            raise
    return out


class Progress:
    """tqdm bar over steps with a postfix ``tok/s`` and an EMA of the loss per budget (ETA from tqdm)."""

    def __init__(self, total: int, initial: int, desc: str, *, enabled: bool = True, ema: float = 0.9):
        self.enabled = enabled
        self.ema_decay = ema
        self.ema: dict[str, float] = {}
        self._bar = None
        self._t = time.perf_counter()
        self._tokens = 0
        self.tokens_per_s = 0.0
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=0.5)

    def update(self, steps: int, tokens: int, losses: Iterable[tuple[str, float]]) -> float:
        """Advance ``steps``; returns tokens/s since the previous update."""
        now = time.perf_counter()
        self._tokens += tokens
        dt = now - self._t
        if dt > 0:
            self.tokens_per_s = self._tokens / dt
        self._t, self._tokens = now, 0
        for name, v in losses:
            if not math.isfinite(v):
                self.ema[name] = v
            else:
                old = self.ema.get(name)
                self.ema[name] = v if old is None or not math.isfinite(old) else \
                    self.ema_decay * old + (1 - self.ema_decay) * v
        if self._bar is not None:
            post = {"tok/s": f"{self.tokens_per_s:,.0f}"}
            post.update({k: f"{v:.4f}" for k, v in sorted(self.ema.items(), key=lambda kv: kv[0], reverse=True)})
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(steps)
        return self.tokens_per_s

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        elif self.enabled:
            print(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
