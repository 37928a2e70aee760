"""Nothing is lost: asvd never deletes or overwrites what it did not write (convert, save_dit,
output folders), and writes atomically."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from cli_env import ENV

import asvd
from asvd.ckpt import dit_port
from asvd.errors import OutputError
from asvd.outputs import OutputDir


def cli(*args):
  return subprocess.run([sys.executable, "-m", "asvd.main", *args], capture_output=True, text=True, env=ENV)


@pytest.fixture(scope="module")
def source(tmp_path_factory, model):
  """An asvd checkpoint of the tiny model, to convert from."""
  path = tmp_path_factory.mktemp("src") / "tiny_ckpt"
  asvd.save_dit(model, path)
  return path


def params_of(m):
  return jax.tree.leaves(jax.tree.map(np.asarray, dit_port.to_flat(m)))


def test_convert_refuses_a_foreign_destination(source, tmp_path):
  dst = tmp_path / "mine"
  dst.mkdir()
  (dst / "notes.txt").write_text("my notes")
  p = cli("convert", str(source), str(dst))
  assert p.returncode == 2
  assert "not an asvd checkpoint" in p.stderr and "notes.txt" in p.stderr
  assert "Traceback" not in p.stderr
  assert (dst / "notes.txt").read_text() == "my notes"
  p = cli("convert", str(source), str(dst), "--overwrite")  # --overwrite never covers foreign data
  assert p.returncode == 2 and (dst / "notes.txt").read_text() == "my notes"
  f = tmp_path / "file.bin"
  f.write_bytes(b"123")
  assert cli("convert", str(source), str(f)).returncode == 2 and f.read_bytes() == b"123"


def test_convert_refuses_source_as_destination(source):
  before = sorted(os.listdir(source))
  p = cli("convert", str(source), str(source), "--overwrite")
  assert p.returncode == 2 and "source" in p.stderr
  p = cli("convert", str(source), str(source / "params" / "inner"))
  assert p.returncode == 2 and "source" in p.stderr
  assert sorted(os.listdir(source)) == before
  assert asvd.load_dit(source).cfg.dim == 64  # still loads


def test_overwrite_replaces_only_an_asvd_checkpoint_atomically(source, model, tmp_path):
  dst = tmp_path / "ck"
  old = tmp_path / "ck.old"  # a user's folder whose name save_dit once used for its swap
  old.mkdir()
  (old / "keep.txt").write_text("x")
  assert cli("convert", str(source), str(dst), "--dtype", "bf16").returncode == 0
  assert asvd.load_dit(dst).cfg.param_dtype == "bfloat16"
  p = cli("convert", str(source), str(dst))
  assert p.returncode == 2 and "--overwrite" in p.stderr
  other = asvd.init_dit(model.cfg, jax.random.key(7))
  with pytest.raises(asvd.CheckpointError, match="overwrite"):
    asvd.save_dit(other, dst)
  asvd.save_dit(other, dst, overwrite=True)
  for a, b in zip(params_of(asvd.load_dit(dst)), params_of(other), strict=True):
    np.testing.assert_array_equal(a, b)
  assert (old / "keep.txt").read_text() == "x"
  assert sorted(os.listdir(tmp_path)) == ["ck", "ck.old"]  # no temporary folder left behind


def test_checkpoints_save_and_load_by_relative_paths(model, tmp_path, monkeypatch):
  """A relative path (as typed on a command line) works both ways (Orbax wants absolute ones)."""
  monkeypatch.chdir(tmp_path)
  asvd.save_dit(model, "runs/ck")
  assert sorted(os.listdir(tmp_path / "runs")) == ["ck"]
  for a, b in zip(params_of(asvd.load_dit("runs/ck")), params_of(model), strict=True):
    np.testing.assert_array_equal(a, b)


def test_convert_dtype_aliases_and_errors(source, tmp_path):
  p = cli("convert", str(source), str(tmp_path / "a"), "--dtype", "int8")
  assert p.returncode == 2 and "--dtype" in p.stderr and "bf16" in p.stderr
  assert not (tmp_path / "a").exists()


def test_output_dir_never_overwrites_foreign_files(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "video.mp4").write_bytes(b"my holiday")
  with pytest.raises(OutputError, match="video.mp4.*asvd did not write"):
    OutputDir(out, ["video.mp4", "latents.npy"])
  assert (out / "video.mp4").read_bytes() == b"my holiday"
  d = OutputDir(out, ["latents.npy"])  # another name is fine, and asvd's own file may be replaced
  d.save_npy("latents.npy", np.zeros(3))
  OutputDir(out, ["latents.npy"]).save_npy("latents.npy", np.ones(3))
  np.testing.assert_array_equal(np.load(out / "latents.npy"), np.ones(3))
  assert json.loads((out / ".asvd_outputs").read_text()) == ["latents.npy"]
  assert oct((out / "latents.npy").stat().st_mode & 0o777) != oct(0o600)  # usual permissions


def test_output_dir_location_errors(tmp_path):
  f = tmp_path / "afile"
  f.write_text("x")
  with pytest.raises(OutputError, match="is a file"):
    OutputDir(f / "sub", ["a"])
  with pytest.raises(OutputError, match="not a folder"):
    OutputDir(f, ["a"])


def test_generate_keeps_a_users_file_and_fails_before_work(tmp_path):
  out = tmp_path / "o"
  out.mkdir()
  (out / "preview.mp4").write_bytes(b"mine")
  p = cli("generate", "--config", "configs/tiny.py", "--init", "random", "--chunks", "1", "--out", str(out))
  assert p.returncode == 2 and "preview.mp4" in p.stderr and "--out" in p.stderr
  assert "random weights" not in p.stderr  # refused before the model was built
  assert (out / "preview.mp4").read_bytes() == b"mine"
  assert not (out / "latents.npy").exists()
