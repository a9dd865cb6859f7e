"""The ``small`` preset (14 blocks, 16 experts, 45M parameters, 26M active): a single-accelerator run of the whole
recipe, sized for one GPU/TPU host (CPU works but is slow; see the README's throughput table).

    star-elastic train --config configs/small.py --workdir runs/small
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(preset="small", overrides={})
    c.data = dict(source="synthetic", tokenizer="byte", synthetic=dict(max_digits=6, max_items=12))
    c.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1)
    # "auto": the Pallas kernels on GPU/TPU, the pure-JAX reference on CPU; "reference" | "pallas" pin one
    c.kernels = dict(ssd="auto", moe="auto")
    c.router = dict(
        budgets=(1.0, 0.78, 0.577),
        choice_lists=dict(hidden=(512, 448, 384, 320), mamba_heads=(16, 12, 8), experts=(16, 12, 8),
                          expert_ffn=(256, 192, 128)),
        tau_decay=0.999,           # 0.05 floor after ~3,000 steps, the length of both stages
        dead_zone=0.05,
        hard_sample_prob=0.004,
    )
    c.optim = dict(lr=3e-4, min_lr=3e-5, warmup_steps=60, router_lr=1e-2, router_schedule="scaled",
                   b1=0.9, b2=0.98, weight_decay=0.0, clip_norm=1.0)
    c.stages = [
        dict(name="stage1", sampling="uniform", seq_len=1024, tokens=2000 * 32 * 1024, batch_size=32,
             micro_batches=4),
        dict(name="stage2", sampling=(0.5, 0.3, 0.2), seq_len=4096, tokens=1000 * 8 * 4096, batch_size=8,
             micro_batches=2),
    ]
    c.pretrain = dict(steps=5000, seq_len=1024, batch_size=32, micro_batches=1, calib_batches=16, parent=None,
                      ranked=False, optim=dict(lr=1e-3, min_lr=1e-4, warmup_steps=200, router_lr=1e-2))
    c.checkpoint = dict(every=250, keep=3, async_save=True)
    c.eval = dict(every=250, batches=4, batch_size=16)
    c.log = dict(every=10, progress=True, tensorboard=True)
    c.teacher_dtype = "float32"
    return c
