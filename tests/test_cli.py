"""The `asvd` command line: generate, eval attention, clear errors before compiling."""

import json
import os
import subprocess
import sys

import numpy as np

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def asvd_cli(*args):
  return subprocess.run([sys.executable, "-m", "asvd.main", *args], capture_output=True, text=True, env=ENV)


def test_generate_random_writes_latents(tmp_path):
  out = tmp_path / "gen"
  p = asvd_cli("generate", "--config", "configs/tiny.py", "--init", "random", "--chunks", "3", "--seed", "1", "--out", str(out), "--config.rollout.anchor=ema")
  assert p.returncode == 0, p.stderr
  lat = np.load(out / "latents.npy")
  assert lat.shape == (1, 9, 8, 8, 16)
  assert np.isfinite(lat).all()
  meta = json.loads((out / "generate.json").read_text())
  assert meta["overrides"] == ["--config.rollout.anchor=ema"]
  assert "chunk" in p.stderr  # the tqdm progress bar


def test_eval_attention_writes_png(tmp_path):
  p = asvd_cli("eval", "attention", "--config", "configs/tiny.py", "--init", "random", "--chunks", "2", "--out", str(tmp_path))
  assert p.returncode == 0, p.stderr
  assert (tmp_path / "attention_share.png").read_bytes()[:4] == b"\x89PNG"
  groups = json.loads((tmp_path / "attention_share.json").read_text())
  assert set(groups) == {"anchor", "window[0]", "window[1]", "window[2]", "self"}


def test_bad_arguments_fail_fast(tmp_path):
  p = asvd_cli("generate", "--config", "configs/tiny.py", "--init", "random", "--out", str(tmp_path), "--config.rollout.anchr=sink")
  assert p.returncode == 2 and "anchr" in p.stderr
  p = asvd_cli("generate", "--config", "configs/tiny.py", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path))
  assert p.returncode == 2 and "missing" in p.stderr
  p = asvd_cli("generate", "--config", "configs/nope.py", "--init", "random", "--out", str(tmp_path))
  assert p.returncode == 2 and "nope.py" in p.stderr
  p = asvd_cli("generate", "--config", "configs/tiny.py", "--out", str(tmp_path))
  assert p.returncode == 2 and "--init random" in p.stderr
