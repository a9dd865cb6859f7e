"""Error types. Every user-facing validation error is a ``ValueError`` subclass that names
the offending field, the value it had, and what would have been valid."""
from __future__ import annotations

from typing import Any


class StarElasticError(ValueError):
    """Base class for every validation error raised by star_elastic_jax."""

    def __init__(self, field: str, value: Any, valid: str, *, context: str = ""):
        self.field = field
        self.value = value
        self.valid = valid
        where = f"{context}: " if context else ""
        super().__init__(f"{where}{field}={value!r} is invalid; {valid}")


class ConfigError(StarElasticError):
    """A model or experiment config field is malformed or inconsistent."""


class CheckpointError(StarElasticError):
    """A checkpoint is missing a tensor, has a wrong shape/dtype, or is malformed."""


class ChoiceError(StarElasticError):
    """An elastic choice or budget is invalid for the model it is applied to."""


class OutputError(StarElasticError):
    """An output path is unsafe: it would overwrite or delete files star_elastic_jax did not write,
    overlaps an input, or cannot be created."""


class DataError(StarElasticError):
    """A dataset, tokenizer or batch is unusable."""
