"""THE key-mapping table between HF NemotronH checkpoints and our parameter tree, both directions.

Each entry maps one HF tensor to one or more of our leaves:
- ``parts`` > 1: the HF tensor is the concatenation of our leaves along ``axis`` (Mamba in_proj,
  conv1d), in that order;
- ``per_expert``: the HF on-disk layout has one tensor per expert (``{e}`` in the key); our leaf is
  the stack over experts (and transformers' in-memory layout is that same stack, fused).
``hf_extra_dims`` re-inserts singleton dims the HF tensor has (conv1d weight ``[C, 1, K]``).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

from star_elastic_jax.config import ModelConfig

Path = tuple  # an nnx state path, e.g. ("layers", 3, "mixer", "in_proj_x")


@dataclasses.dataclass(frozen=True)
class KeyMap:
    hf: str                      # key suffix after the layer prefix (or the full key for globals)
    ours: tuple[str, ...]        # dotted leaf paths relative to the layer (or the model)
    axis: int = 0                # concat axis when len(ours) > 1
    per_expert: bool = False     # HF on-disk: one tensor per expert, key contains "{e}"
    hf_extra_dims: tuple[int, ...] = ()  # singleton dims the HF tensor has and ours lacks
    fp32: bool = False           # always stored/loaded as fp32 (buffers)
    needs: str = ""              # config flag that must be true for the key to exist


GLOBAL_KEYS = (
    KeyMap("backbone.embeddings.weight", ("embeddings",)),
    KeyMap("backbone.norm_f.weight", ("norm_f.weight",)),
    KeyMap("lm_head.weight", ("lm_head",)),
)

LAYER_KEYS = {
    "M": (
        KeyMap("mixer.in_proj.weight", ("mixer.in_proj_z", "mixer.in_proj_x", "mixer.in_proj_bc", "mixer.in_proj_dt")),
        KeyMap("mixer.conv1d.weight", ("mixer.conv_x_weight", "mixer.conv_bc_weight"), hf_extra_dims=(1,)),
        KeyMap("mixer.conv1d.bias", ("mixer.conv_x_bias", "mixer.conv_bc_bias"), needs="use_conv_bias"),
        KeyMap("mixer.dt_bias", ("mixer.dt_bias",)),
        KeyMap("mixer.A_log", ("mixer.A_log",)),
        KeyMap("mixer.D", ("mixer.D",)),
        KeyMap("mixer.norm.weight", ("mixer.norm_weight",)),
        KeyMap("mixer.out_proj.weight", ("mixer.out_proj",)),
    ),
    "*": (
        KeyMap("mixer.q_proj.weight", ("mixer.q_proj",)),
        KeyMap("mixer.k_proj.weight", ("mixer.k_proj",)),
        KeyMap("mixer.v_proj.weight", ("mixer.v_proj",)),
        KeyMap("mixer.o_proj.weight", ("mixer.o_proj",)),
    ),
    "E": (
        KeyMap("mixer.gate.weight", ("mixer.gate_weight",)),
        KeyMap("mixer.gate.e_score_correction_bias", ("mixer.e_score_correction_bias",), fp32=True),
        KeyMap("mixer.experts.{e}.up_proj.weight", ("mixer.experts_up",), per_expert=True),
        KeyMap("mixer.experts.{e}.down_proj.weight", ("mixer.experts_down",), per_expert=True),
        KeyMap("mixer.shared_experts.up_proj.weight", ("mixer.shared_experts.up_proj",)),
        KeyMap("mixer.shared_experts.down_proj.weight", ("mixer.shared_experts.down_proj",)),
    ),
    "-": (
        KeyMap("mixer.up_proj.weight", ("mixer.up_proj",)),
        KeyMap("mixer.down_proj.weight", ("mixer.down_proj",)),
    ),
}
LAYER_NORM_KEY = KeyMap("norm.weight", ("norm.weight",))
ONDISK_LAYER_PREFIX = "backbone.layers.{i}."
# transformers' in-memory prefix ("backbone." -> "model.") and its fused expert keys.
INMEMORY_RENAMES = (("backbone.", "model."),)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One concrete HF tensor <-> our leaf paths."""

    hf_key: str
    paths: tuple[Path, ...]
    km: KeyMap
    expert: int | None = None  # set for per-expert on-disk keys


def _path(prefix: Path, dotted: str) -> Path:
    return prefix + tuple(dotted.split("."))


def entries(cfg: ModelConfig, *, fused_experts: bool = False) -> Iterator[Entry]:
    """Every HF tensor key of ``cfg`` in on-disk order with its leaves.

    ``fused_experts=True`` yields one key per expert leaf (transformers' in-memory layout,
    ``...experts.up_proj`` without ``.weight``) instead of one per expert.
    """
    yield Entry(GLOBAL_KEYS[0].hf, (_path((), GLOBAL_KEYS[0].ours[0]),), GLOBAL_KEYS[0])
    for i, kind in enumerate(cfg.hybrid_override_pattern):
        prefix = ONDISK_LAYER_PREFIX.format(i=i)
        base: Path = ("layers", i)
        for km in (LAYER_NORM_KEY,) + LAYER_KEYS[kind]:
            if km.needs and not getattr(cfg, km.needs):
                continue
            paths = tuple(_path(base, o) for o in km.ours)
            if not km.per_expert:
                yield Entry(prefix + km.hf, paths, km)
            elif fused_experts:
                yield Entry(prefix + km.hf.replace(".{e}", "").replace(".weight", ""), paths, km)
            else:
                for e in range(cfg.layer_sizes(i).experts):
                    yield Entry(prefix + km.hf.format(e=e), paths, km, expert=e)
    for km in GLOBAL_KEYS[1:]:
        yield Entry(km.hf, (_path((), km.ours[0]),), km)


def to_inmemory_key(key: str) -> str:
    for old, new in INMEMORY_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key
