"""The Star Elastic recipe for Nemotron 3 Nano 30B-A3B (SPEC 3.2, 3.6-3.8), for a cluster.

Budgets 1.0 / 0.78 / 0.577 of active parameters (30B-A3.6B -> 23B-A2.8B -> 12B-A2.0B) over the SPEC 3.2
choice lists; stage 1: uniform budgets at 8K tokens (100B tokens, GBS 1536); stage 2: 0.5 / 0.3 / 0.2 at
49K (60B tokens, GBS 512); one continuous tau / scaler schedule (tau 0.9997^t, floor 0.05 at ~10K
steps; scaler 1 -> 10); AdamW (0.9, 0.98), wd 0, clip 1.0; model LR 1e-4 (60 warmup steps, cosine to
1e-5), router LR 1e-2 (the x100 param group); KD only (forward KL, T = 1) from the frozen BF16 parent.

The parent is NVIDIA's checkpoint converted to Orbax first:

    star-elastic convert --from-hf nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 --out checkpoints/nano-v3-30b
    star-elastic train --config configs/nano_v3_30b.py --workdir runs/nano \\
        --config.pretrain.parent=checkpoints/nano-v3-30b --config.data.source=/data/blend/*.jsonl \\
        --config.data.tokenizer=/data/nano/tokenizer.json
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(preset="nano-v3-30b", overrides=dict(compute_dtype="bfloat16"))
    # the 70% reasoning/SFT + 30% pre-training blend (SPEC 3.3): point data.source at it
    c.data = dict(source="synthetic", tokenizer="byte")
    c.mesh = dict(data=-1, fsdp=8, expert=8, tensor=1)
    # "auto": the Pallas kernels on GPU/TPU, the pure-JAX reference on CPU; "reference" | "pallas" pin one
    c.kernels = dict(ssd="auto", moe="auto")
    c.router = dict(
        budgets=(1.0, 0.78, 0.577),
        choice_lists=dict(hidden=(2688, 1920, 1392), mamba_heads=(64, 48, 32), experts=(128, 96, 64),
                          expert_ffn=(1856, 1328, 960)),
        hidden_width=256, tau0=1.0, tau_decay=0.9997, tau_min=0.05, scaler_start=1.0, scaler_end=10.0,
        mode="soft", hard_sample_prob=0.004, dead_zone=0.05, identity_weight=10.0, router_loss_weight=1.0,
    )
    c.optim = dict(lr=1e-4, min_lr=1e-5, warmup_steps=60, router_lr=1e-2, router_schedule="scaled",
                   b1=0.9, b2=0.98, weight_decay=0.0, clip_norm=1.0)
    c.stages = [
        # 100e9 / (1536 * 8192) = 7,948 steps; 24 micro-batches of 64 sequences, each with its own budget
        dict(name="stage1", sampling="uniform", seq_len=8192, tokens=100_000_000_000, batch_size=1536,
             micro_batches=24),
        # 60e9 / (512 * 49152) = 2,385 steps
        dict(name="stage2", sampling=(0.5, 0.3, 0.2), seq_len=49152, tokens=60_000_000_000, batch_size=512,
             micro_batches=8),
    ]
    # calibration: 16 x 64 sequences of 8K = 1024 x 8192 tokens (SPEC 3.3); no CE pre-training
    c.pretrain = dict(steps=0, seq_len=8192, batch_size=64, micro_batches=1, calib_batches=16,
                      parent="checkpoints/nano-v3-30b", ranked=False)
    c.checkpoint = dict(every=250, keep=3, async_save=True)
    c.eval = dict(every=500, batches=4, batch_size=64)
    c.log = dict(every=1, progress=True, tensorboard=True)
    c.teacher_dtype = "bfloat16"
    return c
