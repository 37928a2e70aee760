"""The `asvd` command line: generate, eval attention, clear errors before compiling."""

import json
import subprocess
import sys

import numpy as np
from cli_env import ENV

from asvd.video import latent_preview


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
  assert "compiling" in p.stderr and "compiled + chunk 1 in" in p.stderr  # compile reported apart
  assert "os.fork()" not in p.stderr  # ffmpeg is spawned without forking the JAX process
  assert "no native bf16" not in p.stderr  # an f32 run gets no bf16 hint
  assert "preview.mp4 (a preview" in p.stdout
  # The preview without a VAE: one RGB frame per latent frame, the fixed projection, upscaled 8x.
  frames = read_video(out / "preview.mp4")
  assert frames.shape == (9, 64, 64, 3)
  want = latent_preview(lat[0])
  assert np.abs(frames.astype(float) - want).mean() < 6  # H.264 is lossy; a wrong projection is far off
  assert np.abs(frames.astype(float) - latent_preview(lat[0, ::-1])).mean() > 3 * np.abs(frames.astype(float) - want).mean()


def test_decode_preview_and_rerun(tmp_path):
  lat = np.random.default_rng(0).standard_normal((1, 6, 4, 5, 16)).astype(np.float32)
  np.save(tmp_path / "lat.npy", lat)
  p = asvd_cli("decode", str(tmp_path / "lat.npy"), "--preview", "--out", str(tmp_path / "d"))
  assert p.returncode == 0, p.stderr
  assert read_video(tmp_path / "d" / "preview.mp4").shape == (6, 32, 40, 3)
  p = asvd_cli("decode", str(tmp_path / "lat.npy"), "--preview", "--out", str(tmp_path / "d"))
  assert p.returncode == 0, p.stderr  # asvd may replace what it wrote itself


def read_video(path):
  from asvd.video import read_video as read  # noqa: PLC0415  (ffmpeg without forking pytest)

  return read(str(path))


def test_eval_attention_writes_png(tmp_path):
  p = asvd_cli("eval", "attention", "--config", "configs/tiny.py", "--init", "random", "--chunks", "2", "--out", str(tmp_path))
  assert p.returncode == 0, p.stderr
  assert (tmp_path / "attention_share.png").read_bytes()[:4] == b"\x89PNG"
  groups = json.loads((tmp_path / "attention_share.json").read_text())
  assert set(groups) == {"anchor", "window[0]", "window[1]", "window[2]", "self"}
  shares = np.array([groups[k] for k in groups])  # [groups, chunks, layers]
  np.testing.assert_allclose(shares.sum(0), 1.0, atol=1e-5)


def test_bad_arguments_fail_fast(tmp_path):
  p = asvd_cli("generate", "--config", "configs/tiny.py", "--init", "random", "--out", str(tmp_path), "--config.rollout.anchr=sink")
  assert p.returncode == 2 and "anchr" in p.stderr
  p = asvd_cli("generate", "--config", "configs/tiny.py", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path))
  assert p.returncode == 2 and "missing" in p.stderr
  p = asvd_cli("generate", "--config", "configs/nope.py", "--init", "random", "--out", str(tmp_path))
  assert p.returncode == 2 and "nope.py" in p.stderr
  p = asvd_cli("generate", "--config", "configs/tiny.py", "--out", str(tmp_path))
  assert p.returncode == 2 and "--init random" in p.stderr


def test_bf16_hint_only_for_bf16_on_a_cpu_without_native_bf16(tmp_path):
  from asvd.host import bf16_hint, cpu_flags  # noqa: PLC0415

  avx2 = {"fpu", "sse2", "avx2", "fma"}
  assert "no native bf16" in bf16_hint("bfloat16", "cpu", avx2)
  assert bf16_hint("float32", "cpu", avx2) is None
  assert bf16_hint("bfloat16", "gpu", avx2) is None
  assert bf16_hint("bfloat16", "cpu", avx2 | {"avx512f", "avx512_bf16"}) is None  # Zen 4/5, Cooper Lake on
  assert bf16_hint("bfloat16", "cpu", avx2 | {"amx_bf16", "amx_tile"}) is None  # Sapphire Rapids on
  assert bf16_hint("bfloat16", "cpu", {"fp", "asimd", "bf16"}) is None  # ARM (Graviton 3, Neoverse V1)
  assert bf16_hint("bfloat16", "cpu", set()) is None  # unknown: say nothing
  x86 = tmp_path / "x86"
  x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n")
  arm = tmp_path / "arm"
  arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
  assert cpu_flags(str(x86)) == avx2 and cpu_flags(str(arm)) == {"fp", "asimd", "bf16"}
  assert cpu_flags(str(tmp_path / "none")) == set()
  assert {"fpu", "fp"} & cpu_flags(), "this Linux machine's own /proc/cpuinfo"
