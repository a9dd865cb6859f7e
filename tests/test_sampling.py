"""Sampling filters against a plain numpy implementation of their definitions, draws inside the kept
set, greedy = argmax, and reproducibility from a key."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from star_elastic_jax.errors import DataError
from star_elastic_jax.infer.sampling import SamplingParams, filter_logits, sample


def kept_numpy(logits, temperature, top_k=None, top_p=None, min_p=None):
    """The set of token ids each filter keeps, written from the definitions, row by row."""
    out = []
    for row in logits.astype(np.float64) / temperature:
        keep = np.ones(row.shape, bool)
        if top_k is not None:
            kth = np.sort(row)[::-1][top_k - 1]
            keep &= row >= kth
        if top_p is not None:
            x = np.where(keep, row, -np.inf)
            p = np.exp(x - x.max())
            p /= p.sum()
            order = np.argsort(-x, kind="stable")
            mass, chosen = 0.0, []
            for i in order:               # smallest prefix whose mass reaches top_p
                chosen.append(i)
                mass += p[i]
                if mass >= top_p:
                    break
            thr = min(x[i] for i in chosen)
            keep &= x >= thr
        if min_p is not None:
            x = np.where(keep, row, -np.inf)
            p = np.exp(x - x.max())
            p /= p.sum()
            keep &= p >= min_p * p.max()
        out.append(set(np.flatnonzero(keep).tolist()))
    return out


@pytest.mark.parametrize("params", [
    dict(temperature=1.0, top_k=5), dict(temperature=0.7, top_p=0.6), dict(temperature=1.3, min_p=0.2),
    dict(temperature=0.9, top_k=12, top_p=0.8, min_p=0.05), dict(temperature=1.0, top_k=1),
    dict(temperature=2.0, top_p=1.0),
])
def test_filters_keep_exactly_the_defined_sets(params, np_rng):
    logits = (np_rng.standard_normal((6, 50)) * 3).astype(np.float32)
    got = filter_logits(jnp.asarray(logits), SamplingParams(**params))
    want = kept_numpy(logits, **params)
    for b in range(6):
        assert set(np.flatnonzero(np.isfinite(np.asarray(got[b]))).tolist()) == want[b], b


def test_draws_stay_in_the_kept_set_and_are_reproducible(np_rng):
    logits = jnp.asarray((np_rng.standard_normal((4, 40)) * 2).astype(np.float32))
    p = SamplingParams(temperature=0.8, top_k=6, top_p=0.9)
    kept = kept_numpy(np.asarray(logits), 0.8, top_k=6, top_p=0.9)
    draws = np.stack([np.asarray(sample(logits, jax.random.PRNGKey(i), p)) for i in range(200)])
    for b in range(4):
        assert set(draws[:, b].tolist()) <= kept[b]
        assert len(set(draws[:, b].tolist())) > 1  # it does sample
    np.testing.assert_array_equal(sample(logits, jax.random.PRNGKey(3), p), sample(logits, jax.random.PRNGKey(3), p))


def test_temperature_sampling_follows_the_softmax(np_rng):
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
    p = SamplingParams(temperature=1.0)
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draws = np.asarray(jax.vmap(lambda k: sample(logits, k, p))(keys))[:, 0]
    freq = np.bincount(draws, minlength=4) / len(draws)
    want = np.exp([2.0, 1.0, 0.0, -1.0]) / np.exp([2.0, 1.0, 0.0, -1.0]).sum()
    assert np.abs(freq - want).max() < 0.03  # 4000 draws: a few standard errors


def test_greedy_is_argmax_with_the_first_index_on_ties():
    logits = jnp.asarray([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 1.0, 1.0]])
    assert sample(logits, jax.random.PRNGKey(0), SamplingParams()).tolist() == [1, 0]


@pytest.mark.parametrize("kw, field", [({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")},
                                                                                  "temperature"),
                                       ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.01}, "top_p"),
                                       ({"min_p": -0.5}, "min_p"), ({"top_k": 2.5}, "top_k")])
def test_bad_settings_name_the_field(kw, field):
    with pytest.raises(DataError, match=field):
        SamplingParams(**{"temperature": 1.0, **kw})
