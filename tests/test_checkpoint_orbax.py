"""Orbax model checkpoints: exact save/restore, atomic writes, verified reads."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import star_elastic_jax as sej
from star_elastic_jax.checkpoint import orbax as ckpt


def _leaves(model):
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))


@pytest.fixture(scope="module")
def tiny_model():
    return sej.NemotronH(sej.ModelConfig.preset("tiny"), rngs=nnx.Rngs(3))


def test_save_load_is_exact(tiny_model, tmp_path):
    d = ckpt.save_model(tiny_model, tmp_path / "ck", metadata={"note": "x"})
    restored = ckpt.load_model(d)
    assert restored.cfg == tiny_model.cfg
    a, b = _leaves(tiny_model), _leaves(restored)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
    assert ckpt.read_metadata(d) == {"note": "x"}
    tokens = jax.random.randint(jax.random.key(0), (1, 9), 0, 256)
    np.testing.assert_array_equal(np.asarray(tiny_model(tokens)), np.asarray(restored(tokens)))


def test_overwrite_leaves_no_temporaries(tiny_model, tmp_path):
    d = tmp_path / "ck"
    ckpt.save_model(tiny_model, d)
    ckpt.save_model(tiny_model, d, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_failed_save_keeps_previous_checkpoint(tiny_model, tmp_path, monkeypatch):
    d = tmp_path / "ck"
    ckpt.save_model(tiny_model, d, metadata={"version": 1})

    def boom(*a, **k):
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(ckpt, "_write_json", boom)
    with pytest.raises(RuntimeError):
        ckpt.save_model(tiny_model, d, metadata={"version": 2}, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert ckpt.read_metadata(d) == {"version": 1}
    ckpt.load_model(d)


def test_mismatched_state_is_a_checkpoint_error(tiny_model, tmp_path):
    d = ckpt.save_model(tiny_model, tmp_path / "ck")
    path = os.path.join(d, ckpt.CONFIG_NAME)
    data = json.load(open(path))
    data["config"]["hidden_size"] = 32
    json.dump(data, open(path, "w"))
    with pytest.raises(sej.CheckpointError):
        ckpt.load_model(d)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(sej.CheckpointError, match="checkpoint"):
        ckpt.load_model(tmp_path)
    (tmp_path / ckpt.STATE_DIR).mkdir()
    with pytest.raises(sej.CheckpointError, match="model_config.json"):
        ckpt.load_model(tmp_path)
