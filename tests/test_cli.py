"""The star-elastic CLI: every subcommand has --help; info, convert both ways and demo run."""
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from star_elastic_jax.cli import build_parser, main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("sub", [[], ["info"], ["convert"], ["demo"]])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main(sub + ["--help"])
    assert e.value.code == 0
    assert "usage: star-elastic" in capsys.readouterr().out


def test_every_subcommand_is_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {"info", "convert", "demo"}
    for name, p in sub.choices.items():
        assert p.description, name


def test_info_nano_counts(capsys):
    assert main(["info", "--config", "nano-v3-30b"]) == 0
    out = capsys.readouterr().out
    assert "31,577,937,344" in out and "3,580,073,408" in out
    assert out.count(" moe ") == 23 and out.count(" mamba2 ") == 23 and out.count(" attention ") == 6


def test_info_bad_preset_is_clean_error(capsys):
    assert main(["info", "--config", "no-such-preset"]) == 2
    assert "config='no-such-preset'" in capsys.readouterr().err


def test_convert_round_trip_is_bit_exact(tmp_path):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    import star_elastic_jax as sej

    torch.manual_seed(0)
    cfg = sej.ModelConfig.preset("tiny")
    hf = NemotronHForCausalLM(NemotronHConfig(**cfg.to_hf())).to(torch.bfloat16)
    for mod in hf.modules():  # like NVIDIA's checkpoints (and HF's keep-in-fp32 rule): the bias stays fp32
        if hasattr(mod, "e_score_correction_bias"):
            mod.e_score_correction_bias.data = torch.randn(mod.e_score_correction_bias.shape) * 0.1
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    assert main(["convert", "--from-hf", str(src), "--out", str(tmp_path / "orbax")]) == 0
    assert main(["info", "--ckpt", str(tmp_path / "orbax")]) == 0
    assert main(["convert", "--ckpt", str(tmp_path / "orbax"), "--to-hf", str(tmp_path / "back"),
                 "--dtype", "bfloat16", "--max-shard-size", "40KB"]) == 0
    a = load_file(os.path.join(src, "model.safetensors"))
    back = {}
    for name in os.listdir(tmp_path / "back"):
        if name.endswith(".safetensors"):
            back.update(load_file(os.path.join(tmp_path / "back", name)))
    assert os.path.exists(tmp_path / "back" / "model.safetensors.index.json")
    assert set(a) == set(back)
    for k in a:
        assert a[k].dtype == back[k].dtype, k
        assert np.array_equal(a[k].view(np.uint8), back[k].view(np.uint8)), k


def test_convert_missing_out_is_clean_error(tmp_path, capsys):
    assert main(["convert", "--from-hf", str(tmp_path)]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_console_script(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "star-elastic")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "star_elastic_jax.cli"]
    out = subprocess.run(cmd + ["demo", "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "-> OK" in out.stdout and "175,560" in out.stdout
