"""Generation engine (issue 11): prefill + decode against one full forward, stopping rules against a
host-side oracle, nested budgets against physically sliced models, the cache's exact size, and bad
input refused before anything compiles.

Reference for "decode equals forward": our own training forward (``NemotronH.__call__``, which is
itself exact against transformers in test_hf_parity.py) over the whole concatenated sequence.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import star_elastic_jax as sej
from star_elastic_jax.errors import ChoiceError, DataError
from star_elastic_jax.infer import Engine, cache_bytes, cache_bytes_split, decode, init_cache, prefill

from hf_fixtures import forward, random_model

CFG = sej.ModelConfig.preset("tiny")         # chunk_size 8
REL = 1e-5


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=3)


def _forward_at(m, seq, segs=None, width=48):
    """Forward logits of ``seq`` (causal: zero padding after it changes nothing before it), at one
    padded width so that every call compiles once per model."""
    n = len(seq)
    assert n <= width
    toks = np.zeros((1, width), np.int32)
    toks[0, :n] = seq
    s = None
    if segs is not None:
        s = np.full((1, width), segs[-1], np.int32)
        s[0, :n] = segs
    return forward(m, toks, s)[0, :n]


def _rel(got, want):
    return float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max())


def _check_against_forward(m, prompts, cont, segs=None):
    """Prefill the right-padded ``prompts``, decode ``cont``; compare every step's logits with the
    forward over prompt + continuation of each row."""
    B = len(prompts)
    T = max(len(p) for p in prompts)
    N = cont.shape[1]
    toks = np.zeros((B, T), np.int32)
    seg = None if segs is None else np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):
        toks[b, :len(p)] = p
        if segs is not None:
            seg[b, :len(p)] = segs[b]
    lens = np.asarray([len(p) for p in prompts], np.int32)
    cache = init_cache(m.cfg, B, T + N)
    logits, cache = jax.jit(prefill)(m, jnp.asarray(toks), jnp.asarray(lens), cache,
                                     None if seg is None else jnp.asarray(seg))
    steps = [np.asarray(logits)]
    step = jax.jit(decode)
    for j in range(N - 1):
        lg, cache = step(m, jnp.asarray(cont[:, j]), cache)
        steps.append(np.asarray(lg))
    for b, p in enumerate(prompts):
        seq = np.concatenate([p, cont[b]])[None]
        s = None if segs is None else np.concatenate([segs[b], np.full(N, segs[b][-1])])[None]
        want = _forward_at(m, seq[0], None if s is None else s[0])
        for j in range(N):
            err = _rel(steps[j][b], want[len(p) - 1 + j])
            assert err <= REL, f"row {b} (prompt {len(p)}), step {j}: rel err {err:.2e}"
    return steps


def test_prefill_and_decode_equal_the_forward_for_unequal_prompts(model, np_rng):
    """One batch with prompt lengths 1, chunk - 1, chunk, chunk + 1 and 2.5 chunks."""
    q = CFG.chunk_size
    lengths = [1, q - 1, q, q + 1, 2 * q + q // 2]
    prompts = [np_rng.integers(0, CFG.vocab_size, n).astype(np.int32) for n in lengths]
    cont = np_rng.integers(0, CFG.vocab_size, (len(prompts), 7)).astype(np.int32)
    _check_against_forward(model, prompts, cont)


def test_packed_documents_do_not_leak_into_the_states(model, np_rng):
    """A prompt packing two documents continues only the last one: its logits equal the forward of
    the packed sequence with segment ids, and the forward of the last document alone."""
    a, b = (np_rng.integers(0, CFG.vocab_size, n).astype(np.int32) for n in (11, 6))
    prompt = np.concatenate([a, b])
    segs = [np.concatenate([np.zeros(11, np.int32), np.ones(6, np.int32)])]
    cont = np_rng.integers(0, CFG.vocab_size, (1, 5)).astype(np.int32)
    steps = _check_against_forward(model, [prompt], cont, segs)
    alone = _forward_at(model, np.concatenate([b, cont[0]]))
    for j in range(5):
        assert _rel(steps[j][0], alone[len(b) - 1 + j]) <= REL


def test_prefill_continues_from_a_given_cache(model, np_rng):
    """Prefill in two pieces (the second starting from the first's cache, unequal rows) equals the
    forward over the whole prompt: the SSD starts from the cached state, the conv from the cached
    columns, attention reads the cached keys."""
    B, T1, T2 = 2, 9, 6
    toks = np_rng.integers(0, CFG.vocab_size, (B, T1 + T2)).astype(np.int32)
    len1 = np.asarray([9, 4], np.int32)
    len2 = np.asarray([6, 3], np.int32)
    first = np.zeros((B, T1), np.int32)
    second = np.zeros((B, T2), np.int32)
    rows = []
    for b in range(B):
        row = toks[b, :len1[b] + len2[b]]
        first[b, :len1[b]] = row[:len1[b]]
        second[b, :len2[b]] = row[len1[b]:]
        rows.append(row)
    cache = init_cache(CFG, B, 20)
    _, cache = prefill(model, jnp.asarray(first), jnp.asarray(len1), cache)
    logits, cache = prefill(model, jnp.asarray(second), jnp.asarray(len2), cache, fresh=False)
    assert np.asarray(cache.lengths).tolist() == (len1 + len2).tolist()
    for b in range(B):
        want = _forward_at(model, rows[b])[-1]
        assert _rel(logits[b], want) <= REL


def test_a_model_without_attention_decodes_exactly(np_rng):
    cfg = dataclasses.replace(CFG, hybrid_override_pattern="MEM-M")
    m = random_model(cfg, seed=5)
    prompts = [np_rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in (3, 10)]
    _check_against_forward(m, prompts, np_rng.integers(0, cfg.vocab_size, (2, 4)).astype(np.int32))


# ------------------------------------------------------------------------------------------- stopping
def _oracle(m, prompt, n, eos=(), stop=(), pad=0):
    """Greedy by full forwards, one token at a time, stopping as documented."""
    return _oracle_run(m, prompt, n, eos, stop, pad)[0]


def _oracle_run(m, prompt, n, eos=(), stop=(), pad=0):
    seq = list(prompt)
    new = []
    for _ in range(n):
        tok = int(np.argmax(_forward_at(m, np.asarray(seq))[-1]))
        new.append(tok)
        seq.append(tok)
        if tok in eos or any(len(new) >= len(s) and tuple(new[-len(s):]) == tuple(s) for s in stop):
            break
    return new + [pad] * (n - len(new)), len(new)


def test_greedy_generate_matches_a_forward_loop_with_eos_and_stop_sequences(model, np_rng):
    prompts = [np_rng.integers(3, CFG.vocab_size, n).astype(np.int32) for n in (5, 9)]
    free = [_oracle(model, p, 12) for p in prompts]
    # Stop row 0 at its 4th token by EOS, row 1 at its tokens 6-7 by a stop sequence.
    eos = (free[0][3],)
    stop = (tuple(free[1][5:7]),)
    ids = np.zeros((2, 9), np.int32)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    engine = Engine(model)
    out = engine.generate(ids, 12, lengths=[5, 9], eos_token_id=eos, stop=stop, pad_token_id=1)
    for b, p in enumerate(prompts):
        want = _oracle(model, p, 12, eos=eos, stop=stop, pad=1)
        got = out[b, len(p):len(p) + 12].tolist()
        assert got == want, (b, got, want)
        assert out[b, :len(p)].tolist() == p.tolist()
    assert engine.stats.new_tokens == sum(_oracle_run(model, p, 12, eos, stop, 1)[1] for p in prompts)


def test_streaming_gives_the_same_tokens_in_chunks(model, np_rng):
    ids = np_rng.integers(3, CFG.vocab_size, (2, 6)).astype(np.int32)
    engine = Engine(model)
    whole = engine.generate(ids, 10, temperature=0.9, top_k=20, seed=7)[:, 6:]
    chunks = list(engine.stream(ids, 10, stream_chunk=3, temperature=0.9, top_k=20, seed=7))
    assert [c.shape[1] for c in chunks] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), whole)
    other = engine.generate(ids, 10, temperature=0.9, top_k=20, seed=8)[:, 6:]
    assert not np.array_equal(other, whole)


# -------------------------------------------------------------------------------------------- nested
BUDGETS = {"0.78": sej.ElasticChoice(hidden=56, mamba_heads=6, experts=3, expert_ffn=24),
           "0.577": sej.ElasticChoice(hidden=48, mamba_heads=4, experts=2, expert_ffn=16, mlp_ffn=64)}


def _live_bytes():
    return sum(a.nbytes for a in jax.live_arrays())


def test_every_budget_on_the_parent_equals_the_sliced_model_without_copying(model, np_rng):
    ids = np_rng.integers(3, CFG.vocab_size, (2, 10)).astype(np.int32)
    lens = [10, 4]
    engine = Engine(model, budgets=BUDGETS)
    outs = {}
    for name, choice in BUDGETS.items():
        outs[name] = engine.generate(ids, 16, lengths=lens, elastic=name)
        sliced = Engine(sej.slice_model(model, choice)).generate(ids, 16, lengths=lens)
        np.testing.assert_array_equal(outs[name], sliced, err_msg=name)
    full = engine.generate(ids, 16, lengths=lens)
    assert not np.array_equal(full, outs["0.577"])  # the budgets do differ
    # Switching budgets three times neither compiles again nor adds live buffers.
    compiled = len(engine._compiled)
    buffers, live = len(jax.live_arrays()), _live_bytes()
    for _ in range(3):
        for name in BUDGETS:
            np.testing.assert_array_equal(engine.generate(ids, 16, lengths=lens, elastic=name), outs[name])
    assert len(engine._compiled) == compiled
    assert len(jax.live_arrays()) == buffers and _live_bytes() == live
    params = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    assert all(engine.params[p] is params[p] for p in params)  # the engine holds the model's own arrays


def test_fractions_resolve_against_the_choice_lists(model):
    lists = {"hidden": [64, 48], "mamba_heads": [8, 4]}
    engine = Engine(model, budgets=BUDGETS, choice_lists=lists)
    r = engine.resolve(0.6)
    assert r.hidden in (64, 48) and r.choice is not None
    with pytest.raises(ChoiceError):
        engine.resolve("huge")


# --------------------------------------------------------------------------------------------- cache
def test_cache_bytes_is_exact():
    for choice in (None, BUDGETS["0.577"]):
        sub = CFG if choice is None else sej.slice_model(random_model(CFG, 0), choice).cfg
        arrays = jax.tree.leaves(init_cache(sub, 3, 40))
        assert cache_bytes(CFG, 3, 40, choice) == sum(a.nbytes for a in arrays)
    per_tok, per_seq = cache_bytes_split(CFG)
    assert cache_bytes(CFG, 2, 100) == 2 * (per_seq + 100 * per_tok) + 16


def test_nano_cache_matches_the_spec():
    """SPEC 1.4: KV 6,144 B/token in bf16; SSM 48.2 MB per sequence (fp32); conv K-1 = 3 columns."""
    nano = dataclasses.replace(sej.ModelConfig.preset("nano-v3-30b"), compute_dtype="bfloat16")
    per_tok, per_seq = cache_bytes_split(nano)
    assert per_tok == 6144
    n_m = nano.hybrid_override_pattern.count("M")
    assert per_seq == n_m * (64 * 64 * 128 * 4 + 6144 * 3 * 2)
    assert round(n_m * 64 * 64 * 128 * 4 / 1e6, 1) == 48.2


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, field", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 30, "max_len": 20}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
    ({"temperature": 1.0, "top_p": 1.5}, "top_p"),
    ({"temperature": 1.0, "top_k": 0}, "top_k"),
    ({"input_ids": np.zeros((1, 0), np.int32)}, "input_ids"),
    ({"input_ids": np.asarray([[5, 999]])}, "input_ids"),
    ({"input_ids": np.asarray([[5, -1]])}, "input_ids"),
    ({"lengths": [0]}, "lengths"),
    ({"elastic": "0.3x"}, "elastic"),
    ({"elastic": sej.ElasticChoice(hidden=1000)}, "hidden"),
    ({"max_len": 10 ** 6, "max_new_tokens": 4}, "max_len"),
])
def test_bad_input_is_refused_before_compiling(model, kwargs, field):
    engine = Engine(model)
    call = {"input_ids": np.asarray([[5, 6, 7]]), "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError) as e:
        engine.generate(call.pop("input_ids"), call.pop("max_new_tokens"), **call)
    assert isinstance(e.value, (DataError, ChoiceError)) and field in str(e.value)
    assert engine._compiled == {}


def test_engine_steps_at_a_budget_equal_the_sliced_forward(model, np_rng):
    engine = Engine(model, budgets=BUDGETS)
    sub = sej.slice_model(model, BUDGETS["0.577"])
    ids = np_rng.integers(0, CFG.vocab_size, (2, 9)).astype(np.int32)
    nxt = np_rng.integers(0, CFG.vocab_size, 2).astype(np.int32)
    logits, cache = engine.prefill(ids, lengths=[9, 5], elastic="0.577", max_len=12)
    step, cache = engine.decode(nxt, cache, elastic="0.577")
    for b, n in enumerate((9, 5)):
        want = _forward_at(sub, np.concatenate([ids[b, :n], nxt[b:b + 1]]))
        assert _rel(logits[b], want[n - 1]) <= REL and _rel(step[b], want[n]) <= REL
    with pytest.raises(DataError, match="cache"):
        engine.prefill(ids, cache=engine.new_cache(3, 12, elastic="0.577"), elastic="0.577")


def test_engines_of_one_config_share_their_compiled_functions_but_not_weights(model, np_rng):
    import gc
    import weakref

    ids = np_rng.integers(3, CFG.vocab_size, (1, 5)).astype(np.int32)
    first = sej.generate(model, ids, 6)
    other = random_model(CFG, seed=9)
    e1, e2 = Engine(model), Engine(other)
    assert e1._steps(None) is e2._steps(None)                      # one executable per config and budget
    assert not np.array_equal(e2.generate(ids, 6), first)          # ... run on each engine's own weights
    np.testing.assert_array_equal(sej.generate(model, ids, 6), first)
    probe = weakref.ref(e2)
    del e2
    gc.collect()
    assert probe() is None  # nothing shared keeps an engine (and its weights) alive
