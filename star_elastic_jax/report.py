"""Human-readable summaries (layer tables, parameter counts) shared by the CLI and the demo."""
from __future__ import annotations

from star_elastic_jax.config import BLOCK_NAMES, ModelConfig, block_param_count, per_layer_sizes


def describe_block(cfg: ModelConfig, kind: str) -> str:
    if kind == "M":
        return (f"{cfg.mamba_num_heads} heads x {cfg.mamba_head_dim}, {cfg.n_groups} groups, "
                f"state {cfg.ssm_state_size}, conv {cfg.conv_kernel}")
    if kind == "*":
        return f"{cfg.num_attention_heads} q / {cfg.num_key_value_heads} kv heads x {cfg.head_dim}"
    if kind == "E":
        return (f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, ffn {cfg.moe_intermediate_size}, "
                f"shared {cfg.moe_shared_expert_intermediate_size}")
    return f"ffn {cfg.intermediate_size}"


def layer_table(cfg: ModelConfig) -> str:
    """One row per block: index, type, shape summary, total and active parameters (incl. its norm)."""
    rows = [("#", "type", "mixer", "shape", "params", "active")]
    for i, s in enumerate(per_layer_sizes(cfg)):
        total, active = block_param_count(cfg, cfg.hidden_size, s)
        rows.append((str(i), s.kind, BLOCK_NAMES[s.kind], describe_block(cfg, s.kind), f"{int(total):,}",
                     f"{int(active):,}"))
    emb = cfg.vocab_size * cfg.hidden_size
    rows.append(("", "", "embeddings+lm_head+norm_f", f"vocab {cfg.vocab_size} x hidden {cfg.hidden_size}",
                 f"{2 * emb + cfg.hidden_size:,}", f"{2 * emb + cfg.hidden_size:,}"))
    return format_table(rows)


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {i for i in range(len(widths)) if all(r[i].replace(",", "").replace(".", "").isdigit()
                                                 for r in rows[1:] if r[i])}
    lines = []
    for n, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def count_summary(cfg: ModelConfig) -> str:
    pc = cfg.param_count()
    return (f"total parameters: {pc.total:,}   active per token: {pc.active:,}   "
            f"(bf16 size {human_bytes(pc.total * 2)})")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
