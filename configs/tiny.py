"""Tiny end-to-end run on CPU (a few minutes): CE pre-training of the ``tiny`` preset on the built-in
synthetic reasoning corpus, importance ranking, then two elastic KD stages (uniform, then 0.5/0.3/0.2)
over the budgets 1.0 / 0.78 / 0.577 of active parameters.

    star-elastic train --config configs/tiny.py --workdir /tmp/tiny-run
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(preset="tiny", overrides={})
    c.data = dict(source="synthetic", tokenizer="byte", synthetic=dict(max_digits=3, max_items=6))
    c.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1)
    # "auto": the Pallas kernels on GPU/TPU, the pure-JAX reference on CPU; "reference" | "pallas" pin one
    c.kernels = dict(ssd="auto", moe="auto")
    c.router = dict(
        budgets=(1.0, 0.78, 0.577),
        # index 0 = the full size of every axis (the b = 1 target). The fine FFN lists reach well below
        # 0.577 so that no axis bottoms out while the router trades sizes against each other.
        choice_lists=dict(hidden=(64, 56, 48, 40), mamba_heads=(8, 6, 4, 2), experts=(4, 3, 2),
                          expert_ffn=(32, 24, 16, 8), mlp_ffn=(128, 96, 64, 32)),
        tau_decay=0.995,           # 0.22 after 300 steps (the paper's 0.9997 spans ~10K steps)
        dead_zone=0.02,
        # the tiny student's KD loss (~0.01 per token) is ~100x a real model's, so the budget term
        # gets a larger weight than the paper's 1.0 to hold each budget against the pull of KD
        router_loss_weight=5.0,
    )
    c.optim = dict(lr=1e-3, min_lr=1e-4, warmup_steps=20, router_lr=1e-2, router_schedule="constant",
                   b1=0.9, b2=0.98, weight_decay=0.0, clip_norm=1.0)
    c.stages = [
        dict(name="stage1", sampling="uniform", seq_len=128, tokens=200 * 8 * 128, batch_size=8, micro_batches=2),
        dict(name="stage2", sampling=(0.5, 0.3, 0.2), seq_len=256, tokens=100 * 4 * 256, batch_size=4,
             micro_batches=2),
    ]
    c.pretrain = dict(steps=300, seq_len=128, batch_size=8, micro_batches=1, calib_batches=4, parent=None,
                      ranked=False, optim=dict(lr=3e-3, min_lr=3e-4, warmup_steps=20, router_lr=1e-2))
    c.checkpoint = dict(every=100, keep=3, async_save=True)
    c.eval = dict(every=50, batches=2, batch_size=8)
    c.log = dict(every=10, progress=True, tensorboard=True)
    c.teacher_dtype = "float32"
    return c
