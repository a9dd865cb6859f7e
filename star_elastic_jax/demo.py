"""``star-elastic demo``: the tiny model end to end on CPU, checked against transformers."""
from __future__ import annotations

import os

import numpy as np


def run_demo(workdir: str, seed: int = 0) -> int:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from star_elastic_jax.checkpoint.hf import to_hf
    from star_elastic_jax.config import ModelConfig
    from star_elastic_jax.model.model import NemotronH
    from star_elastic_jax.report import count_summary, layer_table

    cfg = ModelConfig.preset("tiny")
    print("== tiny preset ==")
    print(layer_table(cfg))
    print(count_summary(cfg))

    model = NemotronH(cfg, rngs=nnx.Rngs(seed))
    tokens = jax.random.randint(jax.random.key(seed), (2, 21), 0, cfg.vocab_size)
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    print(f"\n== forward == tokens {tuple(tokens.shape)} -> logits {tuple(logits.shape)} {logits.dtype}")

    out = os.path.join(workdir, "tiny-hf")
    to_hf(model, out, dtype="float32", overwrite=True)  # a rerun replaces its own earlier export
    print(f"\n== exported to HF format == {out}: {sorted(os.listdir(out))}")
    try:
        import torch
        from transformers import NemotronHForCausalLM
    except ImportError:
        print("transformers/torch not installed: pip install -e '.[torch]' to compare against PyTorch")
        return 1
    hf = NemotronHForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ref = hf(torch.from_numpy(np.array(tokens))).logits.numpy()
    diff = float(np.abs(ref - np.asarray(logits)).max())
    scale = float(np.abs(ref).max())
    ok = diff <= 1e-4 * scale
    print(f"\n== transformers NemotronHForCausalLM reload == max |logit diff| {diff:.3e} "
          f"(max |logit| {scale:.3f}; bound 1e-4 x max = {1e-4 * scale:.3e}) -> {'OK' if ok else 'MISMATCH'}")
    _ = jnp  # jax.numpy imported for users reading the demo as an example
    return 0 if ok else 1
