"""What every tensor read from a checkpoint must be (one definition for the Orbax and HF readers):
floating point (float types convert; an int32 weight is an error, never zeros) and finite (NaN/inf
is an error naming the tensor, or a warning with ``allow_nonfinite``)."""
from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from star_elastic_jax.errors import CheckpointError


def check_float_dtype(name: str, dtype: Any, where: str = "") -> None:
    if not jnp.issubdtype(dtype, jnp.floating):  # jnp knows bfloat16 and the fp8 types; numpy does not
        raise CheckpointError(name, str(np.dtype(dtype)), "tensors must be floating point (float32, bfloat16, "
                                                          f"float16){' in ' + where if where else ''}")


def check_finite(name: str, array: Any, *, allow_nonfinite: bool = False, where: str = "") -> None:
    """Counts non-finite values where the array lives (numpy on host, a jax.Array on its device)."""
    if isinstance(array, np.ndarray):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    else:
        bad = int(jax.device_get(jnp.size(array) - jnp.isfinite(array).sum()))
    if not bad:
        return
    msg = f"{bad} of {np.size(array)} values are NaN or infinite"
    if allow_nonfinite:
        warnings.warn(f"{where + ': ' if where else ''}{name}: {msg} (loaded anyway: allow_nonfinite)", stacklevel=3)
        return
    raise CheckpointError(name, "non-finite", f"{msg}{' in ' + where if where else ''}; pass --allow-nonfinite "
                                              "(allow_nonfinite=True) to load it anyway")


def check_tensor(name: str, array: Any, *, allow_nonfinite: bool = False, where: str = "") -> None:
    check_float_dtype(name, array.dtype, where)
    check_finite(name, array, allow_nonfinite=allow_nonfinite, where=where)
