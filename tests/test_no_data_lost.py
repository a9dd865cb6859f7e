"""Nothing is ever lost (issue 9, items 1 and 2).

Item 1: every command and library function that writes a directory refuses an output that would
destroy what it did not create. Each case runs every writer -- the CLI's ``convert`` (both ways),
``slice`` (Orbax and ``--hf``), ``export-hf`` (plain and ``--elastic``), the PyTorch-only
``slice_hf``, and the library's ``to_hf``, ``save_model``, ``save_params``, ``save_elastic``,
``slice_checkpoint``, ``export_elastic_hf``, ``slice_hf`` -- and asserts that every pre-existing
file is unchanged (sha256 of the whole scratch tree before and after) and that a CLI error is one
line with exit code 2.

Item 2: a damaged checkpoint of every kind (Orbax model, elastic, HF export, elastic HF export) --
a byte flipped, a file truncated or deleted, the manifest or a metadata file removed -- is one
``CheckpointError`` naming the file, before any array is used, and nothing is written.
"""
from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest
from flax import nnx

import star_elastic_jax as sej
from star_elastic_jax.export.elastic import export_elastic_hf, slice_checkpoint
from star_elastic_jax.checkpoint.orbax import flat_params, load_params, save_model, save_params
from star_elastic_jax.cli import main as cli_main
from star_elastic_jax.errors import CheckpointError, OutputError
from star_elastic_jax.export import slice_hf as torch_slicer
from star_elastic_jax.manifest import MANIFEST_NAME

SMALL = sej.ElasticChoice(hidden=48, mamba_heads=4, experts=2, expert_ffn=16)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """One checkpoint of every kind we write, from one tiny model."""
    root = tmp_path_factory.mktemp("sources")
    cfg = sej.ModelConfig.preset("tiny")
    model = sej.NemotronH(cfg, rngs=nnx.Rngs(0))
    paths = {"root": str(root)}
    paths["hf"] = sej.to_hf(model, root / "hf", dtype="float32")
    paths["ckpt"] = save_model(model, root / "ckpt")
    paths["el"] = sej.save_elastic(model, root / "el", budgets={"full": sej.ElasticChoice(), "small": SMALL})
    paths["elhf"] = export_elastic_hf(paths["el"], root / "elhf", dtype="float32")
    return {"paths": paths, "model": model, "cfg": cfg}


def tree_digest(*roots) -> dict[str, str]:
    """sha256 of every file, and the target of every symlink, under ``roots``."""
    out = {}
    for root in roots:
        for d, dirs, files in os.walk(root):
            for name in dirs + files:
                p = os.path.join(d, name)
                if os.path.islink(p):
                    out[p] = "link:" + os.readlink(p)
                elif name in files:
                    with open(p, "rb") as f:
                        out[p] = hashlib.sha256(f.read()).hexdigest()
    return out


def run_cli(argv, capsys, main=cli_main) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return rc, err


# Every writer: name -> (the input it reads or None, a call writing `out`, CLI or library).
def _cli(args):
    return lambda s, out, overwrite, capsys: run_cli([*args(s), out, *(["--overwrite"] if overwrite else [])], capsys)


def _slicer_cli(s, out, overwrite, capsys):
    argv = ["--in", s["paths"]["elhf"], "--budget", "small", "--out", out] + (["--overwrite"] if overwrite else [])
    return run_cli(argv, capsys, main=torch_slicer.main)


CLI_WRITERS = {
    "convert-from-hf": ("hf", _cli(lambda s: ["convert", "--from-hf", s["paths"]["hf"], "--out"])),
    "convert-to-hf": ("ckpt", _cli(lambda s: ["convert", "--ckpt", s["paths"]["ckpt"], "--to-hf"])),
    "slice": ("el", _cli(lambda s: ["slice", "--ckpt", s["paths"]["el"], "--budget", "small", "--out"])),
    "slice-hf": ("el", _cli(lambda s: ["slice", "--hf", "--ckpt", s["paths"]["el"], "--budget", "small", "--out"])),
    "export-hf": ("ckpt", _cli(lambda s: ["export-hf", "--ckpt", s["paths"]["ckpt"], "--out"])),
    "export-hf-elastic": ("el", _cli(lambda s: ["export-hf", "--elastic", "--ckpt", s["paths"]["el"], "--out"])),
    "slice_hf-cli": ("elhf", _slicer_cli),
}
LIB_WRITERS = {
    "to_hf": (None, lambda s, out, ow: sej.to_hf(s["model"], out, dtype="float32", overwrite=ow)),
    "save_model": (None, lambda s, out, ow: save_model(s["model"], out, overwrite=ow)),
    "save_params": (None, lambda s, out, ow: save_params(s["cfg"], flat_params(s["model"]), out, overwrite=ow)),
    "save_elastic": (None, lambda s, out, ow: sej.save_elastic(s["model"], out, {"small": SMALL}, overwrite=ow)),
    "slice_checkpoint": ("el", lambda s, out, ow: slice_checkpoint(s["paths"]["el"], "small", out, overwrite=ow)),
    "export_elastic_hf": ("el", lambda s, out, ow: export_elastic_hf(s["paths"]["el"], out, overwrite=ow)),
    "slice_hf": ("elhf", lambda s, out, ow: torch_slicer.slice_hf(s["paths"]["elhf"], "small", out, overwrite=ow)),
}
ALL = sorted(CLI_WRITERS) + sorted(LIB_WRITERS)
WITH_INPUT = [w for w in ALL if (CLI_WRITERS.get(w) or LIB_WRITERS[w])[0] is not None]


def write(name, s, out, overwrite, capsys):
    """Run writer ``name``; returns ``(ok, message)``. CLI errors must be one line with exit 2."""
    if name in CLI_WRITERS:
        rc, err = CLI_WRITERS[name][1](s, out, overwrite, capsys)
        if rc == 0:
            return True, ""
        assert rc == 2 and err.startswith("error:") and "\n" not in err, (rc, err)
        return False, err
    try:
        LIB_WRITERS[name][1](s, out, overwrite)
    except (OutputError, torch_slicer.SliceError) as e:
        return False, str(e)
    return True, ""


def refused(name, s, out, capsys, *, overwrite=False, scratch, match):
    """``name`` writing ``out`` is refused with ``match`` and leaves every file as it was."""
    roots = [s["paths"]["root"], str(scratch)]
    before = tree_digest(*roots)
    ok, msg = write(name, s, str(out), overwrite, capsys)
    assert not ok, f"{name} wrote {out}"
    assert match in msg, msg
    assert tree_digest(*roots) == before


@pytest.fixture
def scratch(tmp_path):
    d = tmp_path / "scratch"
    d.mkdir()
    (d / "sentinel.txt").write_text("a user's file")
    return d


def foreign_dir(scratch):
    d = scratch / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("not a checkpoint")
    (d / "sub").mkdir()
    (d / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return d


# ---------------------------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("name", ALL)
def test_foreign_directory_is_refused_with_and_without_overwrite(name, src, scratch, capsys):
    out = foreign_dir(scratch)
    refused(name, src, out, capsys, scratch=scratch, match="not empty")
    refused(name, src, out, capsys, overwrite=True, scratch=scratch, match="did not write")


@pytest.mark.parametrize("name", ALL)
def test_our_checkpoint_is_replaced_only_with_overwrite_and_only_if_it_holds_nothing_else(name, src, scratch,
                                                                                          capsys):
    out = scratch / "ours"
    shutil.copytree(src["paths"]["ckpt"], out)
    refused(name, src, out, capsys, scratch=scratch, match="not empty")
    (out / "user_notes.txt").write_text("added by a person")
    refused(name, src, out, capsys, overwrite=True, scratch=scratch, match="user_notes.txt")
    os.remove(out / "user_notes.txt")
    sentinel = tree_digest(scratch / "sentinel.txt")
    before_sources = tree_digest(src["paths"]["root"])
    ok, msg = write(name, src, str(out), True, capsys)
    assert ok, msg
    assert os.path.isfile(out / MANIFEST_NAME)
    assert tree_digest(scratch / "sentinel.txt") == sentinel and tree_digest(src["paths"]["root"]) == before_sources
    assert sorted(os.listdir(scratch)) == ["ours", "sentinel.txt"]  # no staging or swapped-out leftovers


@pytest.mark.parametrize("name", ALL)
def test_paths_that_are_never_an_output(name, src, scratch, capsys, monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# a user's file")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(scratch)
    refused(name, src, ".", capsys, scratch=scratch, match="current directory")
    refused(name, src, "~", capsys, scratch=scratch, match="home directory")
    refused(name, src, str(home), capsys, scratch=scratch, match="home directory")
    refused(name, src, "/", capsys, scratch=scratch, match="filesystem root")
    assert (home / ".bashrc").read_text() == "# a user's file"
    (scratch / "file.txt").write_text("x")
    refused(name, src, scratch / "file.txt", capsys, scratch=scratch, match="not a directory")
    refused(name, src, scratch / "file.txt" / "out", capsys, scratch=scratch, match="is not a directory")
    refused(name, src, scratch / "no" / "such" / "out", capsys, scratch=scratch, match="does not exist")
    os.symlink(foreign_dir(scratch), scratch / "link")
    refused(name, src, scratch / "link", capsys, overwrite=True, scratch=scratch, match="symbolic link")


@pytest.mark.parametrize("name", WITH_INPUT)
def test_output_overlapping_the_input_is_refused(name, src, scratch, capsys):
    key = (CLI_WRITERS.get(name) or LIB_WRITERS[name])[0]
    inp = src["paths"][key]
    for out, match in ((inp, "is the input"), (os.path.join(inp, "sub"), "lies inside the input"),
                       (src["paths"]["root"], "contains the input")):
        refused(name, src, out, capsys, scratch=scratch, match=match)
        refused(name, src, out, capsys, overwrite=True, scratch=scratch, match=match)
    os.symlink(inp, scratch / "to_input")
    refused(name, src, scratch / "to_input", capsys, overwrite=True, scratch=scratch, match="is the input")


def test_new_output_in_an_existing_empty_directory_is_written(src, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    save_model(src["model"], out)
    cfg, _ = load_params(out)
    assert cfg == src["cfg"]


# ---------------------------------------------------------------------------------------------- item 2
def _largest(path):
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f != MANIFEST_NAME]
    return max(files, key=os.path.getsize)


def flip(path):
    f = _largest(path)
    data = bytearray(open(f, "rb").read())
    data[len(data) // 2] ^= 0x40
    open(f, "wb").write(bytes(data))
    return os.path.basename(f)


def truncate(path):
    f = _largest(path)
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    return os.path.basename(f)


def delete(path):
    f = _largest(path)
    os.remove(f)
    return os.path.basename(f)


def no_manifest(path):
    os.remove(os.path.join(path, MANIFEST_NAME))
    return MANIFEST_NAME


METADATA = {"ckpt": "metadata.json", "el": "metadata.json", "hf": "config.json", "elhf": "config.json"}


def no_metadata(kind):
    def damage(path):
        os.remove(os.path.join(path, METADATA[kind]))
        return METADATA[kind]
    return damage


def _readers(kind, path, out):
    """Library reader and CLI command of each checkpoint kind (the CLI ones also write ``out``)."""
    return {
        "ckpt": (lambda: load_params(path), ["convert", "--ckpt", path, "--to-hf", out]),
        "el": (lambda: sej.load_elastic(path), ["slice", "--ckpt", path, "--budget", "small", "--out", out]),
        "hf": (lambda: sej.from_hf(path), ["convert", "--from-hf", path, "--out", out]),
        "elhf": (lambda: torch_slicer.slice_hf(path, "small", out), ["--in", path, "--budget", "small", "--out", out]),
    }[kind]


@pytest.mark.parametrize("kind", ["ckpt", "el", "hf", "elhf"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "no_manifest", "no_metadata"])
def test_damaged_checkpoint_is_one_clear_error(kind, damage, src, tmp_path, capsys):
    path = str(tmp_path / "damaged")
    shutil.copytree(src["paths"][kind], path)
    fn = {"flip": flip, "truncate": truncate, "delete": delete, "no_manifest": no_manifest,
          "no_metadata": no_metadata(kind)}[damage]
    name = fn(path)
    before = tree_digest(str(tmp_path))
    out = str(tmp_path / "out")
    read, argv = _readers(kind, path, out)
    with pytest.raises((CheckpointError, torch_slicer.SliceError)) as e:
        read()
    assert name in str(e.value), str(e.value)
    main = torch_slicer.main if kind == "elhf" else cli_main
    rc, err = run_cli(argv, capsys, main=main)
    assert rc == 2 and err.startswith("error:") and "\n" not in err and name in err, (rc, err)
    assert not os.path.exists(out)
    assert tree_digest(str(tmp_path)) == before


def test_no_verify_reads_a_checkpoint_without_its_manifest(src, tmp_path, capsys):
    path = str(tmp_path / "ck")
    shutil.copytree(src["paths"]["ckpt"], path)
    no_manifest(path)
    with pytest.raises(CheckpointError, match=MANIFEST_NAME):
        load_params(path)
    cfg, params = load_params(path, verify=False)
    want = flat_params(src["model"])
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(params[k]), np.asarray(v))
    rc, err = run_cli(["convert", "--ckpt", path, "--to-hf", tmp_path / "hf", "--no-verify"], capsys)
    assert rc == 0, err


def test_hf_checkpoint_from_elsewhere_is_read_unverified(src, tmp_path):
    """An HF directory with neither our manifest nor its config.json key (NVIDIA's, a hub's) loads."""
    import json

    path = tmp_path / "foreign"
    shutil.copytree(src["paths"]["hf"], path)
    os.remove(path / MANIFEST_NAME)
    cfg_path = path / "config.json"
    data = json.loads(cfg_path.read_text())
    data.pop("star_elastic_manifest")
    cfg_path.write_text(json.dumps(data))
    model = sej.from_hf(path)
    assert model.cfg == src["cfg"]
