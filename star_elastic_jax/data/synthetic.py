"""A built-in synthetic reasoning corpus: arithmetic and sorting problems with a worked trace.

Every example is ``{"prompt", "think", "answer", "text", "kind"}`` where ``text`` is the
training string::

    {prompt}\\n<think>\\n{trace}\\n</think>\\n{answer}

(the tokenizer adds ``bos``/``eos`` around it). Example ``i`` is a pure function of
``(seed, split, i)``, so the corpus is a grain random-access data source (``len`` +
``__getitem__``) that needs no storage and is identical on every host.

**Held-out split by construction.** A problem belongs to the eval split iff
``crc32(prompt) % EVAL_MODULUS == 0``; each split draws problems by rejection sampling until the
prompt falls in its own split. The test is on the prompt string alone, so no eval problem can
ever appear in any train example, for any seed or difficulty setting.

All text is printable ASCII, so the byte tokenizer's reserved control bytes never occur.
"""
from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from star_elastic_jax.errors import DataError

KINDS = ("add", "sub", "mul", "sort")
SPLITS = ("train", "eval")
EVAL_MODULUS = 16  # 1/16 of the problem space is held out for evaluation
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_MAX_TRIES = 10_000


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Difficulty and size of the synthetic corpus (frozen: usable as a jit/static key).

    ``min_digits``/``max_digits``: operand length for add/sub and the first mul operand;
    ``max_mul_digits``: length of the second mul operand; ``min_items``/``max_items``/
    ``max_item``: list length and value range for sort. ``seed`` picks *which* problems exist
    (the pipeline's shuffle seed is separate).
    """

    kinds: tuple[str, ...] = KINDS
    seed: int = 0
    num_train: int = 100_000
    num_eval: int = 1_000
    min_digits: int = 1
    max_digits: int = 4
    max_mul_digits: int = 2
    min_items: int = 3
    max_items: int = 8
    max_item: int = 99

    def __post_init__(self):
        object.__setattr__(self, "kinds", tuple(self.kinds))
        if not self.kinds:
            raise DataError("kinds", self.kinds, f"a non-empty subset of {KINDS}")
        for k in self.kinds:
            if k not in KINDS:
                raise DataError("kinds", k, f"each kind must be one of {KINDS}")
        for name in ("num_train", "num_eval", "min_digits", "max_digits", "max_mul_digits", "min_items",
                     "max_items", "max_item"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DataError(name, v, "must be a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise DataError("seed", self.seed, "must be a non-negative integer")
        if self.min_digits > self.max_digits:
            raise DataError("min_digits", self.min_digits, f"must be <= max_digits={self.max_digits}")
        if self.min_items > self.max_items:
            raise DataError("min_items", self.min_items, f"must be <= max_items={self.max_items}")


def split_of(prompt: str) -> str:
    """The split a problem belongs to, decided by its prompt string alone."""
    return "eval" if zlib.crc32(prompt.encode("ascii")) % EVAL_MODULUS == 0 else "train"


def format_text(prompt: str, think: str, answer: str) -> str:
    return f"{prompt}\n{THINK_OPEN}\n{think}\n{THINK_CLOSE}\n{answer}"


def prompt_prefix(prompt: str) -> str:
    """The generation prefix for evaluation: the prompt and the opening ``<think>`` line."""
    return f"{prompt}\n{THINK_OPEN}\n"


class SyntheticReasoning:
    """Deterministic synthetic reasoning problems; a grain ``RandomAccessDataSource``."""

    def __init__(self, seed: int | None = None, split: str = "train", kinds: tuple[str, ...] | None = None,
                 *, config: SyntheticConfig | None = None, **difficulty: Any):
        cfg = config or SyntheticConfig()
        changes = dict(difficulty)
        if seed is not None:
            changes["seed"] = seed
        if kinds is not None:
            changes["kinds"] = tuple(kinds)
        if changes:
            unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(SyntheticConfig)})
            if unknown:
                raise DataError("synthetic", unknown[0],
                                f"known options: {[f.name for f in dataclasses.fields(SyntheticConfig)]}")
            cfg = dataclasses.replace(cfg, **changes)
        if split not in SPLITS:
            raise DataError("split", split, f"one of {SPLITS}")
        self.config = cfg
        self.split = split
        self._domain = SPLITS.index(split)

    def __len__(self) -> int:
        return self.config.num_train if self.split == "train" else self.config.num_eval

    def __repr__(self) -> str:
        return f"SyntheticReasoning(split={self.split!r}, len={len(self)}, config={self.config})"

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range for a {self.split} corpus of {len(self)}")
        return self.example(i)

    def example(self, i: int) -> dict:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, self._domain, int(i)])
        for _ in range(_MAX_TRIES):
            kind = cfg.kinds[int(rng.integers(len(cfg.kinds)))]
            prompt, think, answer = _GENERATORS[kind](rng, cfg)
            if split_of(prompt) == self.split:
                return {"kind": kind, "prompt": prompt, "think": think, "answer": answer,
                        "text": format_text(prompt, think, answer)}
        raise DataError("synthetic", cfg, f"the problem space is too small to hold a {self.split} split; "
                                          "raise max_digits/max_items/max_item")


# --------------------------------------------------------------------------- generators
def _number(rng, lo_digits: int, hi_digits: int) -> int:
    d = int(rng.integers(lo_digits, hi_digits + 1))
    return int(rng.integers(0 if d == 1 else 10 ** (d - 1), 10 ** d))


def _digits(n: int, width: int) -> list[int]:
    return [int(c) for c in str(n).zfill(width)][::-1]  # least significant first


def _add(rng, cfg):
    a, b = _number(rng, cfg.min_digits, cfg.max_digits), _number(rng, cfg.min_digits, cfg.max_digits)
    return f"Compute {a}+{b}.", _add_trace(a, b), str(a + b)


def _add_trace(a: int, b: int) -> str:
    w = max(len(str(a)), len(str(b)))
    da, db, carry, lines = _digits(a, w), _digits(b, w), 0, []
    for x, y in zip(da, db):
        s = x + y + carry
        lines.append(f"{x}+{y}+{carry}={s}, write {s % 10} carry {s // 10}")
        carry = s // 10
    if carry:
        lines.append(f"write the final carry {carry}")
    return "\n".join(lines)


def _sub(rng, cfg):
    a, b = _number(rng, cfg.min_digits, cfg.max_digits), _number(rng, cfg.min_digits, cfg.max_digits)
    a, b = max(a, b), min(a, b)
    w = len(str(a))
    da, db, borrow, lines = _digits(a, w), _digits(b, w), 0, []
    for x, y in zip(da, db):
        top = x - borrow
        if top < y:
            lines.append(f"{x}-{borrow}-{y} is negative, borrow: {top + 10}-{y}={top + 10 - y}, write {top + 10 - y}")
            borrow = 1
        else:
            lines.append(f"{x}-{borrow}-{y}={top - y}, write {top - y}")
            borrow = 0
    return f"Compute {a}-{b}.", "\n".join(lines), str(a - b)


def _mul(rng, cfg):
    a = _number(rng, cfg.min_digits, cfg.max_digits)
    b = _number(rng, 1, cfg.max_mul_digits)
    lines, total = [], 0
    for k, d in enumerate(_digits(b, len(str(b)))):
        part = a * d * 10 ** k
        lines.append(f"{a}*{d * 10 ** k}={part}")
        lines.append(f"running sum {total}+{part}={total + part}")
        total += part
    return f"Compute {a}*{b}.", "\n".join(lines), str(a * b)


def _sort(rng, cfg):
    n = int(rng.integers(cfg.min_items, cfg.max_items + 1))
    items = [int(v) for v in rng.integers(0, cfg.max_item + 1, size=n)]
    rest, out, lines = list(items), [], []
    while rest:
        m = min(rest)
        lines.append(f"smallest of {' '.join(map(str, rest))} is {m}")
        rest.remove(m)
        out.append(m)
    return f"Sort ascending: {' '.join(map(str, items))}.", "\n".join(lines), " ".join(map(str, out))


_GENERATORS = {"add": _add, "sub": _sub, "mul": _mul, "sort": _sort}

# --------------------------------------------------------------------------- checking
_ARITH = re.compile(r"^Compute (\d+)([+*-])(\d+)\.$")
_SORT = re.compile(r"^Sort ascending: (\d+(?: \d+)*)\.$")


def solve(prompt: str) -> str:
    """The exact answer to a synthetic prompt (the first line of ``prompt`` is used)."""
    line = prompt.strip().split("\n", 1)[0].strip()
    m = _ARITH.match(line)
    if m:
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        return str(a + b if op == "+" else a - b if op == "-" else a * b)
    m = _SORT.match(line)
    if m:
        return " ".join(map(str, sorted(int(v) for v in m.group(1).split())))
    raise DataError("prompt", line[:80], "a synthetic prompt: 'Compute a+b.', 'Compute a-b.', 'Compute a*b.' "
                                         "or 'Sort ascending: x y z.'")


def extract_answer(generated: str) -> str | None:
    """The answer line after the last ``</think>``; ``None`` if the trace was never closed."""
    pos = generated.rfind(THINK_CLOSE)
    if pos < 0:
        return None
    rest = generated[pos + len(THINK_CLOSE):].lstrip(" \t\r\n")
    rest = re.split(r"[\n\x00-\x02]", rest, maxsplit=1)[0]
    return rest.strip()


def check_answer(example_or_prompt: Mapping | str, generated_text: str) -> bool:
    """True iff the text after the last ``</think>`` in ``generated_text`` is exactly the answer.

    ``example_or_prompt`` is a corpus example (its ``answer`` is used) or a prompt string (solved
    here). ``generated_text`` may or may not include the prompt; only its first line after
    ``</think>`` counts, so trailing text after a newline or an ``eos`` is ignored.
    """
    if isinstance(example_or_prompt, Mapping):
        answer = str(example_or_prompt["answer"])
    else:
        answer = solve(example_or_prompt)
    got = extract_answer(generated_text)
    return got is not None and got == answer
