"""The generation engine: one parent copy of the weights, every nested budget compiled once.

An :class:`Engine` holds the parent's parameters as they are (its device arrays, never copied) and,
per budget, the jitted prefill and decode loop of that budget's *sliced view*: inside the compiled
function the parent's arrays are cut to the budget's prefix by the same axes table that
``slice`` writes to disk (:func:`elastic.slicing.slice_params`), so XLA reads only the kept
prefix of each weight and a budget's tokens equal those of the physically sliced model. Switching
budgets selects another executable; nothing is reloaded or copied.

The decode loop runs on the device (``lax.while_loop``): each row stops at an EOS id, at a stop
sequence or after ``max_new_tokens``; the host sees the tokens once per call (or once per chunk
when streaming).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_elastic_jax.config import ModelConfig
from star_elastic_jax.elastic.choice import ElasticChoice, ResolvedChoice, ensure_resolved
from star_elastic_jax.errors import DataError
from star_elastic_jax.infer.cache import HybridCache, init_cache
from star_elastic_jax.infer.sampling import SamplingParams, sample
from star_elastic_jax.infer.steps import decode, prefill


@dataclasses.dataclass(frozen=True)
class StopRule:
    """Static stopping settings: EOS ids, stop-token sequences, the padding id."""

    eos: tuple[int, ...] = ()
    stop: tuple[tuple[int, ...], ...] = ()
    pad: int = 0


@dataclasses.dataclass
class GenerationStats:
    """Timings of the last :meth:`Engine.generate` call (wall seconds, compile time excluded
    when the budget's functions were already compiled)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s else 0.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _LoopState:
    step: jax.Array      # scalar int32: tokens generated so far (all rows in lockstep)
    token: jax.Array     # [B] the last token of each row
    cache: HybridCache
    out: jax.Array       # [B, max_new] generated ids, pad after a row stops
    done: jax.Array      # [B] bool
    count: jax.Array     # [B] tokens generated before (and including) each row's stop
    key: jax.Array


def _is_stop(out, step, token, rule: StopRule):
    """Whether writing ``token`` at ``step`` ends each row (EOS, or a stop sequence now complete)."""
    hit = jnp.zeros(token.shape, bool)
    for e in rule.eos:
        hit = hit | (token == e)
    for seq in rule.stop:
        n = len(seq)
        window = jax.lax.dynamic_slice_in_dim(out, jnp.maximum(step + 1 - n, 0), n, axis=1)
        hit = hit | ((step + 1 >= n) & jnp.all(window == jnp.asarray(seq, out.dtype)[None], axis=1))
    return hit


class Engine:
    """Generation on one model at any of its nested budgets.

    ``model``: a :class:`NemotronH` (the permuted parent of an elastic checkpoint, or any plain
    model). ``budgets`` / ``choice_lists``: the stored budgets (name -> choice) and choice lists
    that names and fractions resolve against (as ``slice`` does); ``resolver_for``: optional
    ``budget -> ChoiceResolver | None`` choosing the trained router for a budget, else the search
    (:func:`star_elastic_jax.export.elastic.router_resolver` bound to the checkpoint). ``tokenizer``: for the text
    helpers. ``max_len``: the cache length (default: prompt + new tokens of each call).
    """

    def __init__(self, model, *, tokenizer=None, budgets: Mapping[str, ElasticChoice] | None = None,
                 choice_lists: Mapping[str, Sequence[int]] | None = None, resolver_for: Callable | None = None,
                 max_len: int | None = None):
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.depth_order = getattr(model, "depth_order", None)
        self.tokenizer = tokenizer
        self.budgets = dict(budgets or {})
        self.choice_lists = None if choice_lists is None else {k: list(v) for k, v in choice_lists.items()}
        self.resolver_for = resolver_for
        if max_len is not None:
            _check_positive("max_len", max_len)
        self.max_len = max_len
        _, state = nnx.split(model)
        # References to the model's own arrays: the engine adds no copy of the weights.
        self.params = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(state)}
        self._compiled: dict[Any, Any] = {}
        self._named: dict[Any, ResolvedChoice] = {}
        self.stats = GenerationStats()

    # ------------------------------------------------------------------------------------ budgets
    def resolve(self, elastic, *, field: str = "elastic") -> ResolvedChoice | None:
        """``None`` (the full model), a stored budget name, a fraction, an :class:`ElasticChoice` or
        a :class:`ResolvedChoice` -> the resolved choice (``None`` for the full model). ``field``
        names the argument in errors."""
        if elastic is None:
            return None
        if isinstance(elastic, (ElasticChoice, ResolvedChoice)):
            r = ensure_resolved(self.cfg, elastic, depth_order=self.depth_order)
        elif isinstance(elastic, (str, int, float)) and not isinstance(elastic, bool) and elastic in self._named:
            r = self._named[elastic]  # a name or fraction already resolved (the search runs once)
        else:
            from star_elastic_jax.elastic.budget import resolve_budget_rule

            resolver = None if self.resolver_for is None else self.resolver_for(elastic)
            choice, _ = resolve_budget_rule(self, elastic, resolver=resolver, field=field)
            r = ensure_resolved(self.cfg, choice, depth_order=self.depth_order)
            self._named[elastic] = r
        return r

    def _view(self, r: ResolvedChoice | None):
        """``(sub_cfg, build)``: the budget's config and a traceable ``params -> sliced module``."""
        from star_elastic_jax.elastic.slicing import slice_params, sliced_config
        from star_elastic_jax.model.model import abstract_model

        parent = self.cfg  # closures below must not hold the engine (they outlive it, see _shared)
        cfg = parent if r is None else sliced_config(parent, r)
        graphdef, abstract = nnx.split(abstract_model(cfg))
        flat = list(nnx.to_flat_state(abstract))

        def build(params):
            if r is not None:
                params = slice_params(parent, params, r)[1]
            return nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(params[tuple(p)])) for p, v in flat]))

        return cfg, build

    def _shared(self, key, make):
        """The jitted functions for ``key``, shared by every engine of the same config and depth
        order (they take the parameters as arguments, so no engine keeps another's weights alive)."""
        full = (self.cfg, self.depth_order) + key
        if full not in _SHARED:
            _SHARED[full] = make()
        self._compiled[key] = _SHARED[full]
        return _SHARED[full]

    def _functions(self, r: ResolvedChoice | None, sampling: SamplingParams, rule: StopRule):
        return self._shared((r, sampling, rule), lambda: self._make_functions(r, sampling, rule))

    def _make_functions(self, r: ResolvedChoice | None, sampling: SamplingParams, rule: StopRule):
        cfg, build = self._view(r)

        def prefill_fn(params, tokens, lengths, cache, segment_ids, rng):
            logits, cache = prefill(build(params), tokens, lengths, cache, segment_ids, fresh=True)
            return sample(logits, jax.random.fold_in(rng, 0), sampling), logits, cache

        def loop_fn(params, state: _LoopState, stop_at):
            model = build(params)

            def cond(s: _LoopState):
                return (s.step < stop_at) & ~jnp.all(s.done)

            def body(s: _LoopState):
                logits, cache = decode(model, s.token, s.cache)
                tok = sample(logits, jax.random.fold_in(s.key, s.step), sampling)
                tok = jnp.where(s.done, rule.pad, tok)
                out = jax.lax.dynamic_update_slice_in_dim(s.out, tok[:, None], s.step, axis=1)
                done = s.done | _is_stop(out, s.step, tok, rule)
                return _LoopState(step=s.step + 1, token=tok, cache=cache, out=out, done=done,
                                  count=s.count + (~s.done).astype(jnp.int32), key=s.key)

            return jax.lax.while_loop(cond, body, state)

        return cfg, jax.jit(prefill_fn, donate_argnums=(3,)), jax.jit(loop_fn, donate_argnums=(1,))

    # ------------------------------------------------------------------------------- single steps
    def _steps(self, r: ResolvedChoice | None):
        def make():
            cfg, build = self._view(r)
            pre = jax.jit(lambda params, tokens, lengths, cache, seg, fresh: prefill(
                build(params), tokens, lengths, cache, seg, fresh=fresh), static_argnums=(5,), donate_argnums=(3,))
            dec = jax.jit(lambda params, tokens, cache: decode(build(params), tokens, cache), donate_argnums=(2,))
            return cfg, pre, dec

        return self._shared(("steps", r), make)

    def new_cache(self, batch: int, max_len: int, *, elastic=None) -> HybridCache:
        """An empty cache for ``batch`` rows of up to ``max_len`` tokens at budget ``elastic``."""
        _check_positive("batch", batch)
        _check_positive("max_len", max_len)
        return init_cache(self._steps(self.resolve(elastic))[0], batch, max_len)

    def prefill(self, input_ids, *, lengths=None, cache: HybridCache | None = None, elastic=None,
                max_len: int | None = None, segment_ids=None):
        """``(last-token logits [B, V] fp32, cache)``: the prompts (right-padded, ``lengths``) run
        from ``cache`` (default: a new one of ``max_len``, default the prompt length) at budget
        ``elastic``. ``cache`` is donated (consumed)."""
        tokens, lens, seg = self._check_prompt(input_ids, lengths, segment_ids)
        r = self.resolve(elastic)
        cfg, pre, _ = self._steps(r)
        fresh = cache is None
        if fresh:
            cache = init_cache(cfg, tokens.shape[0], max_len or tokens.shape[1])
        elif cache.batch != tokens.shape[0]:
            raise DataError("cache", f"batch {cache.batch}", f"the prompts' batch ({tokens.shape[0]})")
        room = cache.max_len
        if room is not None and int((np.asarray(cache.lengths) + lens).max()) > room:
            raise DataError("input_ids", tuple(tokens.shape), f"the cache holds {room} positions per row")
        return pre(self.params, jnp.asarray(tokens), jnp.asarray(lens), cache,
                   None if seg is None else jnp.asarray(seg), fresh)

    def decode(self, tokens, cache: HybridCache, *, elastic=None):
        """``(logits [B, V] fp32, cache)`` after one token per row (``tokens [B]``) at budget
        ``elastic`` (the one the cache was built for). ``cache`` is donated (consumed)."""
        tokens = np.asarray(tokens).reshape(-1)
        if tokens.shape[0] != cache.batch or np.any((tokens < 0) | (tokens >= self.cfg.vocab_size)):
            raise DataError("tokens", tokens.tolist(), f"{cache.batch} token ids in [0, {self.cfg.vocab_size})")
        return self._steps(self.resolve(elastic))[2](self.params, jnp.asarray(tokens, jnp.int32), cache)

    # --------------------------------------------------------------------------------- generation
    def generate(self, input_ids, max_new_tokens: int, *, lengths=None, elastic=None, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 eos_token_id: int | Sequence[int] | None = None, stop: Sequence[Sequence[int]] | None = None,
                 seed: int = 0, max_len: int | None = None, pad_token_id: int | None = None,
                 segment_ids=None) -> np.ndarray:
        """``[B, T + max_new_tokens]`` int32: each row's prompt, then its new tokens, then
        ``pad_token_id`` after the row stopped (its EOS / stop sequence included).

        ``input_ids [B, T]``; with ``lengths [B]`` the rows are right-padded prompts of
        ``lengths[b]`` tokens, and row ``b`` of the result is ``prompt[:lengths[b]] + new``, padded
        to the common width. ``segment_ids [B, T]``: packed documents (the new tokens continue the
        last one). ``elastic``: see :meth:`resolve`. ``max_len``: the cache length."""
        req = self._prepare(input_ids, max_new_tokens, lengths, elastic, temperature, top_k, top_p, min_p,
                            eos_token_id, stop, seed, max_len, pad_token_id, segment_ids)
        chunks = list(self._run(req, max_new_tokens))
        B, T = req["tokens"].shape
        new = np.concatenate(chunks, axis=1)
        out = np.full((B, T + max_new_tokens), req["rule"].pad, np.int32)
        for b in range(B):
            n = int(req["lengths"][b])
            out[b, :n] = req["tokens"][b, :n]
            out[b, n:n + new.shape[1]] = new[b]
        return out

    def stream(self, input_ids, max_new_tokens: int, *, stream_chunk: int = 16, lengths=None, elastic=None,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               min_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
               stop: Sequence[Sequence[int]] | None = None, seed: int = 0, max_len: int | None = None,
               pad_token_id: int | None = None, segment_ids=None) -> Iterator[np.ndarray]:
        """As :meth:`generate`, but yield the new tokens ``[B, n]`` in chunks of up to
        ``stream_chunk`` steps: the device loop returns to the host once per chunk. The same seed
        gives the same tokens as :meth:`generate`. Ends early when every row has stopped."""
        _check_positive("stream_chunk", stream_chunk)
        req = self._prepare(input_ids, max_new_tokens, lengths, elastic, temperature, top_k, top_p, min_p,
                            eos_token_id, stop, seed, max_len, pad_token_id, segment_ids)
        return self._run(req, stream_chunk)

    def _prepare(self, input_ids, max_new_tokens, lengths, elastic, temperature, top_k, top_p, min_p,
                 eos_token_id, stop, seed, max_len, pad_token_id, segment_ids) -> dict:
        """Every check, before anything is traced or compiled."""
        tokens, lens, seg = self._check_prompt(input_ids, lengths, segment_ids)
        _check_positive("max_new_tokens", max_new_tokens)
        sampling = SamplingParams(temperature, top_k, top_p, min_p)
        rule = self._stop_rule(eos_token_id, stop, pad_token_id)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise DataError("seed", seed, "an integer")
        limit = max_len or self.max_len or int(lens.max()) + max_new_tokens
        _check_positive("max_len", limit)
        if int(lens.max()) + max_new_tokens > limit:
            raise DataError("max_new_tokens", max_new_tokens, f"the longest prompt ({int(lens.max())} tokens) plus "
                            f"max_new_tokens must fit max_len={limit}")
        if limit > self.cfg.max_position_embeddings:
            raise DataError("max_len", limit, f"must be <= max_position_embeddings={self.cfg.max_position_embeddings}")
        return {"tokens": tokens, "lengths": lens, "seg": seg, "sampling": sampling, "rule": rule, "seed": int(seed),
                "max_len": int(limit), "max_new": int(max_new_tokens), "choice": self.resolve(elastic)}

    def _run(self, req: dict, chunk: int) -> Iterator[np.ndarray]:
        cfg, prefill_fn, loop_fn = self._functions(req["choice"], req["sampling"], req["rule"])
        rule, max_new = req["rule"], req["max_new"]
        B = req["tokens"].shape[0]
        rng = jax.random.PRNGKey(req["seed"])
        seg = None if req["seg"] is None else jnp.asarray(req["seg"])
        t0 = time.perf_counter()
        tok, _, cache = prefill_fn(self.params, jnp.asarray(req["tokens"]), jnp.asarray(req["lengths"]),
                                   init_cache(cfg, B, req["max_len"]), seg, rng)
        out = jnp.full((B, max_new), rule.pad, jnp.int32).at[:, 0].set(tok)
        state = _LoopState(step=jnp.int32(1), token=tok, cache=cache, out=out,
                           done=_is_stop(out, jnp.int32(0), tok, rule), count=jnp.ones((B,), jnp.int32),
                           key=jax.random.fold_in(rng, 1))
        jax.block_until_ready(state.out)
        t1 = time.perf_counter()
        self.stats = GenerationStats(prompt_tokens=int(req["lengths"].sum()), new_tokens=B, prefill_s=t1 - t0)
        emitted, step = 0, 1
        while True:
            stop_at = min(emitted + chunk, max_new)
            if stop_at > step and not bool(np.all(np.asarray(state.done))):
                state = loop_fn(self.params, state, jnp.int32(stop_at))
                step = int(state.step)
            new = np.asarray(state.out[:, emitted:step])
            self.stats.decode_s = time.perf_counter() - t1
            self.stats.new_tokens = int(np.asarray(state.count).sum())
            if new.shape[1]:
                yield new
            emitted = step
            if step >= max_new or bool(np.all(np.asarray(state.done))):
                if step < max_new:  # every row stopped: the rest is padding
                    yield np.full((B, max_new - step), rule.pad, np.int32)
                return

    # ---------------------------------------------------------------------------------- text helpers
    def generate_text(self, prompts: Sequence[str], max_new_tokens: int, **kw) -> list[str]:
        """Encode ``prompts`` (bos + text) with the engine's tokenizer, generate, decode the new text."""
        tok = self._require_tokenizer()
        ids, lens = self.encode_prompts(prompts)
        kw.setdefault("eos_token_id", tok.eos_id)
        kw.setdefault("pad_token_id", tok.pad_id)
        out = self.generate(ids, max_new_tokens, lengths=lens, **kw)
        return [tok.decode(out[b, int(lens[b]):].tolist()) for b in range(len(prompts))]

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ``[B, T]`` ids (bos + text) and their lengths."""
        from star_elastic_jax.data.tokenizers import encode_document

        tok = self._require_tokenizer()
        rows = [encode_document(tok, p, add_bos=True, add_eos=False) for p in prompts]
        if not rows or any(len(r) == 0 for r in rows):
            raise DataError("prompt", "", "must not be empty")
        T = max(len(r) for r in rows)
        ids = np.full((len(rows), T), tok.pad_id or 0, np.int32)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = r
        return ids, np.asarray([len(r) for r in rows], np.int32)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise DataError("tokenizer", None, "this engine has no tokenizer; pass tokenizer= or use token ids")
        return self.tokenizer

    # -------------------------------------------------------------------------------------- checks
    def _check_prompt(self, input_ids, lengths, segment_ids):
        tokens = np.asarray(input_ids)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError("input_ids", f"shape {tokens.shape} dtype {tokens.dtype}", "an integer array [batch, seq]")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise DataError("input_ids", tuple(tokens.shape), "a non-empty prompt in every row")
        if lengths is None:
            lens = np.full((tokens.shape[0],), tokens.shape[1], np.int32)
        else:
            lens = np.asarray(lengths).astype(np.int64).reshape(-1)
            if lens.shape[0] != tokens.shape[0]:
                raise DataError("lengths", lens.tolist(), f"one length per row ({tokens.shape[0]})")
            if np.any(lens < 1) or np.any(lens > tokens.shape[1]):
                raise DataError("lengths", lens.tolist(), f"every length in [1, {tokens.shape[1]}] (no empty prompt)")
            lens = lens.astype(np.int32)
        V = self.cfg.vocab_size
        valid = np.arange(tokens.shape[1])[None] < lens[:, None]
        bad = valid & ((tokens < 0) | (tokens >= V))
        if bad.any():
            b, t = map(int, np.argwhere(bad)[0])
            raise DataError("input_ids", int(tokens[b, t]), f"token ids must be in [0, vocab_size={V}) "
                                                            f"(row {b}, position {t})")
        seg = None
        if segment_ids is not None:
            seg = np.asarray(segment_ids)
            if seg.shape != tokens.shape:
                raise DataError("segment_ids.shape", seg.shape, f"must equal input_ids.shape={tokens.shape}")
        return np.where(valid, tokens, 0).astype(np.int32), lens, seg

    def _stop_rule(self, eos_token_id, stop, pad_token_id) -> StopRule:
        V = self.cfg.vocab_size
        eos = () if eos_token_id is None else tuple(int(e) for e in np.atleast_1d(eos_token_id))
        for e in eos:
            if not 0 <= e < V:
                raise DataError("eos_token_id", e, f"in [0, vocab_size={V})")
        seqs = tuple(tuple(int(t) for t in s) for s in (stop or ()))
        for s in seqs:
            if not s or any(not 0 <= t < V for t in s):
                raise DataError("stop", list(s), f"a non-empty sequence of token ids in [0, {V})")
        pad = 0 if pad_token_id is None else int(pad_token_id)
        if not 0 <= pad < V:
            raise DataError("pad_token_id", pad, f"in [0, vocab_size={V})")
        return StopRule(eos=eos, stop=seqs, pad=pad)


def _check_positive(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(field, value, "an integer >= 1")


def generate(model, input_ids, max_new_tokens: int, *, elastic=None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, stop: Sequence[Sequence[int]] | None = None,
             seed: int = 0, max_len: int | None = None, pad_token_id: int | None = None, lengths=None) -> np.ndarray:
    """Generate from ``model`` (a :class:`NemotronH`): ``[B, T + max_new_tokens]`` int32 (the prompt,
    the new tokens, ``pad_token_id`` after a row stops). ``elastic``: a budget name or fraction
    (resolved by the exhaustive search over the config's choice lists), an :class:`ElasticChoice`,
    or None. Each (config, budget, sampling, stop rule) compiles once per process; the compiled
    functions hold no weights."""
    engine = Engine(model)  # cheap: the compiled functions are shared per config (see Engine._shared)
    return engine.generate(input_ids, max_new_tokens, lengths=lengths, elastic=elastic, temperature=temperature,
                           top_k=top_k, top_p=top_p, min_p=min_p, eos_token_id=eos_token_id, stop=stop, seed=seed,
                           max_len=max_len, pad_token_id=pad_token_id)


# (cfg, depth_order, budget, sampling, stop rule) -> jitted functions; they hold no parameters.
_SHARED: dict[Any, Any] = {}


__all__ = ["Engine", "GenerationStats", "StopRule", "generate"]
