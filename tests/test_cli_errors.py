"""Bad input gets one line naming the flag, key, file or value at fault (exit 2), before any
model is built or compiled; `--debug` shows the traceback."""

import subprocess
import sys

import pytest
from cli_env import ENV

TINY = ["--config", "configs/tiny.py", "--init", "random", "--chunks", "1"]


def cli(*args):
  return subprocess.run([sys.executable, "-m", "asvd.main", *args], capture_output=True, text=True, env=ENV)


def assert_one_line_error(p, *needles):
  assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
  assert "Traceback" not in p.stderr, p.stderr[-2000:]
  assert "random weights" not in p.stderr, "the model was built before the error"
  for n in needles:
    assert n in p.stderr, (n, p.stderr[-2000:])


@pytest.mark.parametrize(
  "args, needles",
  [
    (["--seed", "-1"], ["--seed", "-1"]),
    (["--seed", "99999999999999999999"], ["--seed"]),
    (["--fps", "-5"], ["--fps"]),
    (["--fps", "0"], ["--fps"]),
    (["--chunks", "0"], ["--chunks"]),
    (["--config.rollout.batch_size=0"], ["rollout.batch_size"]),
    (["--config.rollout.latent_hw=(8,)"], ["rollout.latent_hw"]),
    (["--config.rollout.anchor=sinc"], ["rollout.anchor", "sinc"]),
    (["--config.model.attention=cudnn"], ["model.attention", "cudnn", "cpu"]),
    (["--config.sampler.context_sigma=fuzzy"], ["sampler.context_sigma"]),
    (["--config.runtime.memory_limit_gib=-1"], ["runtime.memory_limit_gib", "-1"]),
    (["--config.mesh.rules.tokens=ctx"], ["mesh.rules.tokens", "'ctx'", "context"]),
  ],
)
def test_generate_flag_errors(tmp_path, args, needles):
  p = cli("generate", *TINY, "--out", str(tmp_path / "o"), *args)
  assert_one_line_error(p, *needles)


def test_config_arguments_are_validated(tmp_path):
  p = cli("generate", "--config", "configs/wan_t2v_1_3b.py:fp16", "--init", "random", "--out", str(tmp_path))
  assert_one_line_error(p, "wan_t2v_1_3b.py", "'fp16'", "'bf16'", "'f32'")
  p = cli("generate", "--config", "configs/tiny.py:bf17", "--init", "random", "--out", str(tmp_path))
  assert_one_line_error(p, "tiny.py", "'bf17'")


def test_output_location_errors_come_first(tmp_path):
  f = tmp_path / "afile"
  f.write_text("x")
  p = cli("generate", *TINY, "--out", str(f / "sub"))
  assert_one_line_error(p, "--out", "is a file")
  p = cli("eval", "attention", *TINY, "--out", str(f))
  assert_one_line_error(p, "--out", "not a folder")


def test_checkpoint_with_architecture_override_is_refused(tmp_path, model):
  import asvd  # noqa: PLC0415

  ck = tmp_path / "ck"
  asvd.save_dit(model, ck)
  p = cli("generate", "--config", "configs/tiny.py", "--checkpoint", str(ck), "--out", str(tmp_path / "o"), "--config.model.dim=128")
  assert_one_line_error(p, "--config.model.dim", "checkpoint defines the architecture")
  p = cli("generate", "--config", "configs/tiny.py", "--checkpoint", str(ck), "--out", str(tmp_path / "o"), "--config.model.attention=cudnn")
  assert_one_line_error(p, "model.attention", "cudnn")


def test_compute_overrides_apply_to_checkpoints(tmp_path, model):
  import asvd  # noqa: PLC0415
  from asvd import cli_generate  # noqa: PLC0415

  ck = tmp_path / "ck"
  asvd.save_dit(model, ck)
  cfg = asvd.load_config("configs/tiny.py", ["--config.model.attention=blocked", "--config.model.remat=full", "--config.model.scan_layers=False"])
  loaded = cli_generate._load_dit(cfg, str(ck), 0)
  assert (loaded.cfg.attention, loaded.cfg.remat, loaded.cfg.scan_layers) == ("blocked", "full", False)


def test_debug_shows_the_traceback(tmp_path):
  p = cli("--debug", "generate", *TINY, "--out", str(tmp_path / "o"), "--config.rollout.batch_size=0")
  assert p.returncode != 0 and "Traceback" in p.stderr and "rollout.batch_size" in p.stderr


def test_decode_errors(tmp_path):
  p = cli("decode", str(tmp_path / "none.npy"), "--preview", "--out", str(tmp_path / "o"))
  assert_one_line_error(p, "none.npy")
  p = cli("decode", str(tmp_path / "none.npy"), "--out", str(tmp_path / "o"))  # neither --vae nor --preview
  assert p.returncode == 2 and "--vae" in p.stderr
