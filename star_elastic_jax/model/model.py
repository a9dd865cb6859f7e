"""NemotronH: embeddings -> [pre-norm block + residual] x L -> norm_f -> lm_head -> fp32 logits."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from star_elastic_jax.config import ModelConfig
from star_elastic_jax.errors import DataError
from star_elastic_jax.kernels.ssd import document_starts
from star_elastic_jax.model.attention import Attention
from star_elastic_jax.model.masks import BlockMasks, ElasticMasks, HiddenMasks
from star_elastic_jax.model.mamba2 import Mamba2Mixer
from star_elastic_jax.model.mlp import MLP
from star_elastic_jax.model.moe import MoE
from star_elastic_jax.model.norms import RMSNorm
from star_elastic_jax.model.params import logical, normal


def make_mixer(cfg: ModelConfig, index: int, *, rngs: nnx.Rngs, param_dtype):
    sizes = cfg.layer_sizes(index)
    if sizes.kind == "M":
        return Mamba2Mixer(cfg, sizes, rngs=rngs, param_dtype=param_dtype)
    if sizes.kind == "*":
        return Attention(cfg, sizes, rngs=rngs, param_dtype=param_dtype)
    if sizes.kind == "E":
        return MoE(cfg, sizes, rngs=rngs, param_dtype=param_dtype)
    return MLP(cfg.hidden_size, sizes.mlp_ffn, std=cfg.initializer_range, rngs=rngs, param_dtype=param_dtype)


class Block(nnx.Module):
    """``h = x + mixer(RMSNorm(x))`` (one pre-norm, no post-norm)."""

    def __init__(self, cfg: ModelConfig, index: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.kind = cfg.hybrid_override_pattern[index]
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, param_dtype=param_dtype)
        self.mixer = make_mixer(cfg, index, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None, hidden: HiddenMasks | None = None,
                 masks: BlockMasks | None = None) -> jax.Array:
        """``hidden`` masks the block's input and output channels and corrects its pre-norm;
        ``masks`` are the block's own: its depth ``keep`` weight and its mixer's masks."""
        if hidden is None:
            return x + self.mixer(self.norm(x), segment_ids)
        m = hidden.mask.astype(x.dtype)
        out = self.mixer(self.norm(x * m, hidden.norm), segment_ids, None if masks is None else masks.mixer) * m
        if masks is not None:
            out = out * masks.keep.astype(out.dtype)
        return x + out


class NemotronH(nnx.Module):
    """The Nemotron-H hybrid Mamba2 / attention / MoE causal LM.

    ``model(tokens)`` returns fp32 logits ``[batch, seq, vocab]``. ``segment_ids [batch, seq]``
    marks packed documents: attention, the conv window and the SSM state never cross them.
    Parameters are stored in ``param_dtype`` (fp32 master weights by default); activations run in
    ``cfg.compute_dtype``; norms, the SSM, router and softmax always run in fp32.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 depth_order: tuple[int, ...] | None = None):
        self.cfg = cfg
        # Blocks in the order the depth axis drops them (least important first); set by ranking.
        self.depth_order = None if depth_order is None else tuple(int(i) for i in depth_order)
        V, H = cfg.vocab_size, cfg.hidden_size
        self.embeddings = logical(normal(rngs, (V, H), cfg.initializer_range, param_dtype), ("vocab", "embed"))
        self.layers = nnx.List([Block(cfg, i, rngs=rngs, param_dtype=param_dtype)
                                for i in range(cfg.num_hidden_layers)])
        self.norm_f = RMSNorm(H, cfg.layer_norm_epsilon, param_dtype=param_dtype)
        self.lm_head = logical(normal(rngs, (V, H), cfg.initializer_range, param_dtype), ("vocab", "embed"))

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None, elastic=None) -> jax.Array:
        """Logits ``[b, L, V]`` fp32. ``elastic``: an ``ElasticChoice`` (hard masks) or an
        ``ElasticMasks`` pytree (hard or soft); ``None`` runs the full model."""
        check_tokens(tokens, segment_ids, self.cfg)
        if segment_ids is not None:
            # Documents are runs of equal ids; renumber runs so a reused label (0, 1, 0) never
            # joins two documents in attention or the conv window (the SSM resets on any change).
            segment_ids = jnp.cumsum(document_starts(segment_ids), axis=1)
        masks = self.elastic_masks(elastic)
        cdt = jnp.dtype(self.cfg.compute_dtype)
        x = jnp.take(self.embeddings[...], tokens, axis=0).astype(cdt)
        hidden = None if masks is None else masks.hidden
        if hidden is not None:
            x = x * hidden.mask.astype(cdt)  # masked == sliced needs the embedding output masked too
        for i, layer in enumerate(self.layers):
            x = layer(x, segment_ids, hidden, None if masks is None else masks.layers[i])
        x = self.norm_f(x, None if hidden is None else hidden.norm)
        return jnp.einsum("bld,vd->blv", x, self.lm_head[...].astype(cdt), preferred_element_type=jnp.float32)


    def elastic_masks(self, elastic) -> ElasticMasks | None:
        """Normalise the ``elastic`` argument to an :class:`ElasticMasks` pytree (or None). A choice
        (anything with ``masks(cfg, depth_order=...)``, i.e. an ``ElasticChoice``) builds its own."""
        if elastic is None or isinstance(elastic, ElasticMasks):
            return elastic
        if callable(getattr(elastic, "masks", None)):
            return elastic.masks(self.cfg, depth_order=self.depth_order)
        raise DataError("elastic", type(elastic).__name__, "an ElasticChoice, an ElasticMasks, or None")


def check_tokens(tokens, segment_ids, cfg: ModelConfig) -> None:
    """Shape checks that must fail in Python, before tracing reaches XLA."""
    if tokens.ndim != 2:
        raise DataError("tokens.shape", tuple(tokens.shape), "must be [batch, seq]")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise DataError("tokens.dtype", str(tokens.dtype), "must be an integer dtype")
    if tokens.shape[1] > cfg.max_position_embeddings:
        raise DataError("tokens.shape[1]", tokens.shape[1],
                        f"must be <= max_position_embeddings={cfg.max_position_embeddings}")
    if segment_ids is not None and tuple(segment_ids.shape) != tuple(tokens.shape):
        raise DataError("segment_ids.shape", tuple(segment_ids.shape), f"must equal tokens.shape={tokens.shape}")


def abstract_model(cfg: ModelConfig, *, param_dtype=jnp.float32, depth_order=None) -> NemotronH:
    """``NemotronH(cfg)`` traced abstractly (``nnx.eval_shape``): every leaf a ShapeDtypeStruct, no
    initialiser run, nothing compiled. The one way to get a config's parameter shapes."""
    return nnx.eval_shape(lambda: NemotronH(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype, depth_order=depth_order))


def model_from_params(cfg: ModelConfig, params: dict, *, depth_order=None, param_dtype=jnp.float32,
                      where: str = "params") -> NemotronH:
    """Build a NemotronH from a flat ``{nnx path: array}`` dict without running initialisers.

    Every leaf of ``cfg``'s model must be present with its exact shape; errors name the path.
    Arrays keep their own dtype (a bf16 checkpoint stays bf16); ``param_dtype`` only shapes the
    abstract model used for the check.
    """
    from star_elastic_jax.errors import CheckpointError

    graphdef, state = nnx.split(abstract_model(cfg, param_dtype=param_dtype, depth_order=depth_order))
    flat = list(nnx.to_flat_state(state))
    missing = [p for p, _ in flat if tuple(p) not in params]
    if missing:
        raise CheckpointError(where, ".".join(map(str, missing[0])), f"{len(missing)} parameter(s) missing")
    extra = sorted(set(params) - {tuple(p) for p, _ in flat})
    if extra:
        raise CheckpointError(where, ".".join(map(str, extra[0])), "is not a parameter of this config")
    for p, var in flat:
        value = params[tuple(p)]
        want = var.get_value()
        if tuple(value.shape) != tuple(want.shape):
            raise CheckpointError(".".join(map(str, p)), tuple(value.shape), f"expected shape {tuple(want.shape)}")
        var.set_value(jnp.asarray(value))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
