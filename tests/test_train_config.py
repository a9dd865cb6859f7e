"""Training configs: the three config files freeze and carry their recipes, ``--config.a.b=value``
overrides, and bad input (budgets, sequence length, mesh, empty data) fails with an error naming the
field before anything is compiled. No XLA compilation happens in this file."""
from __future__ import annotations

import os

import jax
import pytest

from star_elastic_jax.cli import main
from star_elastic_jax.errors import ChoiceError, ConfigError, DataError
from star_elastic_jax.train.config import TrainConfig, from_config_dict
from star_elastic_jax.train.overrides import apply_overrides, load_config_file
from star_elastic_jax.train.optim import model_schedule, router_schedule
from star_elastic_jax.train.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(name="tiny", *overrides):
    return apply_overrides(load_config_file(os.path.join(ROOT, "configs", f"{name}.py")), list(overrides))


@pytest.fixture
def no_compile(monkeypatch):
    """Any jax.jit call fails the test: errors must come before compilation."""
    def boom(*a, **k):
        raise AssertionError("jax.jit was called before the input was validated")

    monkeypatch.setattr(jax, "jit", boom)


@pytest.mark.parametrize("name", ["tiny", "small", "nano_v3_30b"])
def test_config_files_freeze(name):
    cfg = from_config_dict(config(name))
    assert isinstance(cfg, TrainConfig) and hash(cfg) is not None
    assert cfg.router.budgets == (1.0, 0.78, 0.577)
    assert [s.sampling for s in cfg.stages] == ["uniform", (0.5, 0.3, 0.2)]
    assert all(s.steps >= 1 and s.batch_size % s.micro_batches == 0 for s in cfg.stages)


def test_nano_config_is_the_paper_recipe():
    cfg = from_config_dict(config("nano_v3_30b"))
    assert cfg.model.hidden_size == 2688 and cfg.model.compute_dtype == "bfloat16"
    assert cfg.router.choice_dict == {"hidden": (2688, 1920, 1392), "mamba_heads": (64, 48, 32),
                                      "experts": (128, 96, 64), "expert_ffn": (1856, 1328, 960)}
    assert [s.seq_len for s in cfg.stages] == [8192, 49152]
    assert [s.tokens for s in cfg.stages] == [100_000_000_000, 60_000_000_000]
    assert [s.batch_size for s in cfg.stages] == [1536, 512]
    o = cfg.optim
    assert (o.lr, o.min_lr, o.router_lr, o.warmup_steps, o.b1, o.b2, o.weight_decay, o.clip_norm) == \
        (1e-4, 1e-5, 1e-2, 60, 0.9, 0.98, 0.0, 1.0)
    r = cfg.router
    assert (r.tau_decay, r.tau_min, r.scaler_end, r.hard_sample_prob, r.dead_zone, r.router_loss_weight) == \
        (0.9997, 0.05, 10.0, 0.004, 0.05, 1.0)
    assert cfg.teacher_dtype == "bfloat16" and cfg.pretrain.parent is not None
    assert 9_900 < cfg.total_steps < 10_500  # tau reaches its 0.05 floor near the end (SPEC 3.6)
    # LR: warmup to 1e-4, cosine to 1e-5; router x100
    ms, rs = model_schedule(o, cfg.total_steps), router_schedule(o, cfg.total_steps)
    assert float(ms(60)) == pytest.approx(1e-4) and float(ms(cfg.total_steps)) == pytest.approx(1e-5)
    assert float(rs(60)) == pytest.approx(1e-2)


def test_overrides_coerce_to_the_existing_type():
    c = config("tiny", "--config.stages.0.seq_len=64", "--config.pretrain.steps", "7",
               "--config.router.budgets=1.0,0.7", "--config.optim.lr=2", "--config.log.progress=false",
               "--config.pretrain.parent=/some/ckpt", "--config.stages.1.sampling=(0.6, 0.4)",
               "--config.model.overrides.hybrid_override_pattern=ME*-", "--config.eval.at_start=0",
               "--config.data.synthetic.max_digits=2")
    assert c.stages[0]["seq_len"] == 64 and c.pretrain.steps == 7 and tuple(c.router.budgets) == (1.0, 0.7)
    assert c.optim.lr == 2.0 and isinstance(c.optim.lr, float) and c.log.progress is False
    assert c.pretrain.parent == "/some/ckpt"
    cfg = from_config_dict(c)
    assert cfg.model.hybrid_override_pattern == "ME*-" and cfg.eval.at_start is False
    assert cfg.stages[1].weights(2) == pytest.approx((0.6, 0.4)) and cfg.data.synthetic.max_digits == 2


@pytest.mark.parametrize("override, field", [
    ("--config.nope=1", "nope"),
    ("--config.optim.nope=1", "optim.nope"),
    ("--config.stages.5.seq_len=1", "stages.5"),
    ("--config.pretrain.steps=many", "pretrain.steps"),
    ("--config.log.progress=maybe", "log.progress"),
    ("--config.model.overrides.not_a_field=3", "model.overrides.not_a_field"),
])
def test_bad_overrides_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        config("tiny", override)
    assert e.value.field == field


@pytest.mark.parametrize("overrides, err, field", [
    (["--config.router.budgets=()"], ChoiceError, "router.budgets"),
    (["--config.router.budgets=0.5,1.0,0.7"], ChoiceError, "router.budgets"),
    (["--config.router.budgets=1.2,0.78,0.577"], ChoiceError, "router.budgets"),
    (["--config.router.budgets=1.0,0.78,0.0"], ChoiceError, "router.budgets"),
    (["--config.stages.0.seq_len=5000"], DataError, "stages[0].seq_len"),
    (["--config.max_seq_len=100"], DataError, "stages[0].seq_len"),
    (["--config.stages.1.sampling=(0.5, 0.5)"], ChoiceError, "stages[1].sampling"),
    (["--config.stages.0.micro_batches=3"], ConfigError, "stages[0].micro_batches"),
    (["--config.pretrain.steps=0"], ConfigError, "pretrain.steps"),
    (["--config.optim.min_lr=1.0"], ConfigError, "optim.min_lr"),
    (["--config.router.choice_lists.hidden=(48, 32)"], ChoiceError, "router.choice_lists['hidden']"),
])
def test_invalid_configs_raise_naming_the_field(overrides, err, field, no_compile):
    with pytest.raises(err) as e:
        from_config_dict(config("tiny", *overrides))
    assert e.value.field == field, e.value


def test_mesh_not_dividing_the_device_count_fails_before_compiling(tmp_path, no_compile):
    cfg = from_config_dict(config("tiny", "--config.mesh.fsdp=2"))  # valid on its own
    with pytest.raises(ConfigError) as e:
        train(cfg, tmp_path / "run", progress=False)
    assert e.value.field == "mesh.fsdp" and "device count 1" in str(e.value)
    assert not (tmp_path / "run").exists()


def test_empty_dataset_fails_before_compiling(tmp_path, no_compile):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = from_config_dict(config("tiny", f"--config.data.source={empty}"))
    with pytest.raises(DataError) as e:
        train(cfg, tmp_path / "run", progress=False)
    assert e.value.field == "dataset"


def test_cli_reports_config_errors(tmp_path, capsys, no_compile):
    rc = main(["train", "--config", os.path.join(ROOT, "configs", "tiny.py"), "--workdir", str(tmp_path),
               "--config.router.budgets=0.5,0.9"])
    assert rc == 2
    assert "router.budgets" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # unknown flags on other subcommands are still argparse errors
        main(["info", "--config", "tiny", "--config.x=1"])
