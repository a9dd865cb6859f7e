"""An :class:`Engine` from a directory: an elastic checkpoint (its parent, budgets, choice lists and
trained router), a plain Orbax model checkpoint, or an HF NemotronH directory; with the tokenizer
saved beside the weights (``tokenizer.json``) or the built-in byte tokenizer."""
from __future__ import annotations

import os

from star_elastic_jax.errors import CheckpointError
from star_elastic_jax.infer.engine import Engine


def checkpoint_kind(path: str | os.PathLike) -> str:
    """``"elastic"``, ``"orbax"`` or ``"hf"`` (:class:`CheckpointError` for anything else)."""
    from star_elastic_jax.checkpoint.orbax import CONFIG_NAME, METADATA_NAME

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError("--ckpt", path, "an existing checkpoint directory (elastic, Orbax or HF)")
    if os.path.isfile(os.path.join(path, METADATA_NAME)):
        import json

        with open(os.path.join(path, METADATA_NAME)) as f:
            try:
                meta = json.load(f)
            except json.JSONDecodeError:
                meta = {}
        return "elastic" if isinstance(meta, dict) and "elastic" in meta else "orbax"
    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return "hf"
    raise CheckpointError("--ckpt", path, "an elastic or Orbax checkpoint (metadata.json) or an HF directory "
                                          "(config.json + safetensors)")


def load_engine(path: str | os.PathLike, *, verify: bool = True, max_len: int | None = None) -> Engine:
    """The engine of the checkpoint at ``path`` (read-only; verified against its manifest unless
    ``verify=False``). Fractions resolve as ``slice`` resolves them."""
    from star_elastic_jax.checkpoint.orbax import load_checkpoint_tokenizer

    kind = checkpoint_kind(path)
    tokenizer = load_checkpoint_tokenizer(path, verify=verify)
    if kind == "hf":
        from star_elastic_jax.checkpoint.hf import from_hf

        return Engine(from_hf(path), tokenizer=tokenizer, max_len=max_len)
    if kind == "orbax":
        from star_elastic_jax.checkpoint.orbax import load_model

        return Engine(load_model(path, verify=verify), tokenizer=tokenizer, max_len=max_len)
    from star_elastic_jax.checkpoint.elastic import load_elastic, read_elastic
    from star_elastic_jax.export.elastic import router_resolver

    ck = load_elastic(path, verify=verify)
    info = read_elastic(path, verify=False)  # verified by load_elastic
    return Engine(ck.model, tokenizer=tokenizer, budgets=ck.budgets, choice_lists=ck.choice_lists,
                  resolver_for=lambda budget: router_resolver(info, budget), max_len=max_len)


__all__ = ["checkpoint_kind", "load_engine"]
