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


# ---------------------------------------------------------------------- elastic budgets and storage
PAPER_STORAGE_NOTE = "paper [SE]: 126.1 GB separate (30B+23B+12B) vs 58.9 GB nested = 2.14x"


def _shown_axes(cfg: ModelConfig, resolved) -> list[str]:
    from star_elastic_jax.elastic.axes import AXES, PER_LAYER_AXES

    axes = ["hidden"] + [a for a in PER_LAYER_AXES if any(k in cfg.hybrid_override_pattern for k in AXES[a].kinds)]
    if any(not all(r.keep) for r in resolved):
        axes.append("depth")
    return axes


def _axis_value(cfg: ModelConfig, r, axis: str) -> str:
    from star_elastic_jax.elastic.axes import AXES, layers_of

    if axis == "hidden":
        return str(r.hidden)
    if axis == "depth":
        return str(sum(r.keep))
    vals = [getattr(r.layer_sizes[i], AXES[axis].layer_field) for i in layers_of(cfg, axis) if r.keep[i]]
    if not vals:
        return "-"
    return str(vals[0]) if len(set(vals)) == 1 else f"{min(vals)}..{max(vals)}"


def budget_table(cfg: ModelConfig, rows, *, depth_order=None) -> str:
    """One row per ``(label, ElasticChoice)``: the resolved per-axis sizes (``a..b`` for per-layer
    ranges), exact total and active parameters, active fraction of the full model, BF16 bytes."""
    from star_elastic_jax.config import count_params
    from star_elastic_jax.elastic.choice import resolve_choice

    resolved = [resolve_choice(cfg, c, depth_order=depth_order) for _, c in rows]
    axes = _shown_axes(cfg, resolved)
    full_active = cfg.param_count().active
    out = [("budget", *axes, "total", "active", "active frac", "bf16 bytes")]
    for (label, _), r in zip(rows, resolved):
        pc = count_params(cfg, r.layer_sizes, hidden=r.hidden, keep=r.keep)
        out.append((str(label), *(_axis_value(cfg, r, a) for a in axes), f"{pc.total:,}", f"{pc.active:,}",
                    f"{pc.active / full_active:.4f}", f"{pc.total * 2:,} ({human_bytes(pc.total * 2)})"))
    return format_table(out)


def distinct_choices(cfg: ModelConfig, rows, *, depth_order=None) -> list[tuple[str, object]]:
    """``rows`` without repeats of the same sub-model (equal resolved sizes), first label kept."""
    from star_elastic_jax.elastic.choice import resolve_choice

    seen, out = set(), []
    for label, c in rows:
        r = resolve_choice(cfg, c, depth_order=depth_order)
        if r not in seen:
            seen.add(r)
            out.append((label, c))
    return out


def storage_summary(cfg: ModelConfig, rows, *, depth_order=None) -> str:
    """Nested (one full BF16 model) vs separate (one BF16 checkpoint per distinct sub-model, the full
    parent always among them, since the nested checkpoint holds it too)."""
    from star_elastic_jax.elastic.budget import choice_param_count
    from star_elastic_jax.elastic.choice import ElasticChoice

    distinct = distinct_choices(cfg, [("full", ElasticChoice())] + list(rows), depth_order=depth_order)
    nested = cfg.param_count().total * 2
    separate = sum(choice_param_count(cfg, c, depth_order=depth_order).total * 2 for _, c in distinct)
    labels = ", ".join(str(label) for label, _ in distinct)
    return (f"storage, BF16 parameters: nested {nested:,} B ({human_bytes(nested)}) vs separate {separate:,} B "
            f"({human_bytes(separate)}, {len(distinct)} distinct sub-model(s): {labels}) -> separate/nested = "
            f"{separate / nested:.2f}x   [{PAPER_STORAGE_NOTE}]")


def measured_storage_summary(nested: int, sizes: dict) -> str:
    separate = sum(sizes.values())
    per = ", ".join(f"{label} {human_bytes(b)}" for label, b in sizes.items())
    return (f"storage measured on disk: nested checkpoint {nested:,} B ({human_bytes(nested)}) vs separately sliced "
            f"checkpoints {separate:,} B ({human_bytes(separate)}: {per}) -> separate/nested = "
            f"{separate / nested:.2f}x")


def cache_table(cfg: ModelConfig, rows=(), *, depth_order=None, seq_len: int | None = None) -> str:
    """The generation cache per budget (exact, :func:`star_elastic_jax.infer.cache.cache_bytes_split`):
    KV bytes per token, Mamba conv + SSM bytes per sequence, and one sequence of ``seq_len`` tokens
    (default: ``min(max_position_embeddings, 8192)``)."""
    from star_elastic_jax.infer.cache import cache_bytes_split

    n = seq_len or min(cfg.max_position_embeddings, 8192)
    out = [("budget", "KV / token", "Mamba state / seq", f"one {n}-token seq")]
    for label, choice in [("full", None)] + [(lab, c) for lab, c in rows]:
        per_tok, per_seq = cache_bytes_split(cfg, choice, depth_order=depth_order)
        out.append((label, human_bytes(per_tok), human_bytes(per_seq), human_bytes(per_seq + n * per_tok)))
    return (f"generation cache ({cfg.compute_dtype} KV and conv, {cfg.mamba_ssm_cache_dtype} SSM state):\n"
            + format_table(out))
