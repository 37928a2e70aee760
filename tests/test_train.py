"""`asvd train` on the tiny config: the default run, its outputs, resume after SIGKILL/SIGTERM,
errors. (Each step's loss and the data pipeline: test_train_steps.py; anchor modes:
test_train_anchors.py.)"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_helpers import ENV, TRAIN, assert_decreasing, like_trainer, lines, run_fixed_key

import asvd
from asvd.train import steps as st
from asvd.train import trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One complete default run: teacher -> causal init -> DMD (the README's training command)."""
  work = tmp_path_factory.mktemp("train") / "run"
  # (Its time budget is a benchmark figure, not an assertion: machines differ 5x here.)
  p = subprocess.run([*TRAIN, "--workdir", str(work)], capture_output=True, text=True, env=ENV)
  assert p.returncode == 0, p.stderr[-3000:]
  return work


def test_default_run_writes_models_and_metrics(trained, tmp_path):
  for stage in ("teacher", "causal_init", "dmd"):
    assert (trained / stage / "model" / "asvd_dit.json").is_file()
  recs = [json.loads(x) for x in lines(trained)]
  assert [r["step"] for r in recs if r["stage"] == "teacher"] == list(range(1, 21))
  assert all("loss" in r and np.isfinite(r["loss"]) for r in recs)
  assert any("generator_loss" in r for r in recs if r["stage"] == "dmd")
  assert "model_grad_norm/blocks" in recs[0] and "model_update_norm/head" in recs[0]
  # The trained generator runs with `asvd generate --checkpoint`.
  p = subprocess.run([sys.executable, "-m", "asvd.main", "generate", "--config", "configs/tiny.py", "--checkpoint", str(trained / "dmd" / "model"), "--chunks", "2", "--out", str(tmp_path / "g")], capture_output=True, text=True, env=ENV)
  assert p.returncode == 0, p.stderr[-2000:]
  assert np.load(tmp_path / "g" / "latents.npy").shape == (1, 6, 8, 8, 16)


def test_tensorboard_scalars_and_sample_videos(trained):
  """TensorBoard's own reader sees every logged scalar and the sample videos; the samples are
  the trained networks run as inference runs them (the DMD sample at its last step is the
  exported EMA model's rollout), also written as mp4."""
  import io  # noqa: PLC0415

  from PIL import Image, ImageSequence  # noqa: PLC0415
  from tensorboard.backend.event_processing import event_accumulator  # noqa: PLC0415

  from asvd.data.pipeline import data_source  # noqa: PLC0415
  from asvd.train.writers import preview  # noqa: PLC0415
  from asvd.video import read_video  # noqa: PLC0415

  recs = [json.loads(x) for x in lines(trained)]
  cfg = asvd.load_config("configs/tiny.py")
  for stage, frames in (("teacher", 6), ("causal_init", 12), ("dmd", 12)):
    acc = event_accumulator.EventAccumulator(str(trained / "tensorboard" / stage), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    mine = [r for r in recs if r["stage"] == stage]
    got = acc.Scalars("loss")
    assert [e.step for e in got] == [r["step"] for r in mine]
    np.testing.assert_allclose([e.value for e in got], [r["loss"] for r in mine], rtol=1e-6)
    assert set(acc.Tags()["scalars"]) == set().union(*mine) - {"stage", "step"}
    imgs = acc.Images("sample")
    assert [e.step for e in imgs] == list(range(10, cfg.train[stage].steps + 1, 10))
    gif = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(Image.open(io.BytesIO(imgs[-1].encoded_image_string)))])
    assert gif.shape == (frames, 64, 64, 3)
    mp4 = read_video(str(trained / stage / "samples" / f"step_{imgs[-1].step:06d}.mp4"))
    assert mp4.shape == gif.shape and np.abs(mp4.astype(float) - gif).mean() < 6  # h264 is lossy
  text = jnp.asarray(data_source(cfg, (8, 8), str(trained / "data"))[0]["text"])[None]
  lat, _ = asvd.rollout(asvd.load_dit(trained / "dmd" / "model"), text, jax.random.PRNGKey(0), num_chunks=4, config=cfg.rollout, sampler_config=cfg.sampler)
  assert np.abs(preview(np.asarray(lat)[0]).astype(float) - gif).mean() < 0.5  # GIF palette


def test_sigterm_sigkill_and_reruns_reproduce_metrics_bit_exactly(trained, tmp_path):
  """The default run's first two stages, stopped by SIGTERM in the teacher stage (it saves where
  it stopped and exits 143), rerun and killed by SIGKILL mid causal init, rerun to the end: the
  metrics of the uninterrupted run, bit for bit (each resume restores the last checkpoint; a DMD
  stage after them would start fresh either way)."""
  work = tmp_path / "run"
  two = [*TRAIN, "--workdir", str(work), "--config.train.stages=('teacher','causal_init')"]

  def wait_for(ready):  # a wait, not a speed target (slow machines)
    deadline = time.time() + 600
    while time.time() < deadline and not ready():
      time.sleep(0.1)

  proc = subprocess.Popen(two, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
  wait_for(lambda: (work / "metrics.jsonl").is_file() and len(lines(work)) >= 3)  # training has begun
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143 and "stopped by SIGTERM at step" in err, err[-2000:]
  stopped = json.loads(lines(work)[-1])
  ck = work / stopped["stage"] / "checkpoints"
  assert max(int(d) for d in os.listdir(ck) if d.isdigit()) == stopped["step"]  # saved where it stopped

  proc = subprocess.Popen(two, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
  ck = work / "causal_init" / "checkpoints"
  wait_for(lambda: ck.is_dir() and any(d.isdigit() and int(d) >= 5 for d in os.listdir(ck)))  # a complete causal-init checkpoint
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  want = [x for x in lines(trained) if json.loads(x)["stage"] != "dmd"]  # same seeds per stage
  assert len(lines(work)) < len(want)
  p = subprocess.run(two, capture_output=True, text=True, env=ENV)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resumed at step" in p.stderr or "done (20 steps), skipping" in p.stderr
  assert lines(work) == want


def test_truncated_checkpoint_is_one_clear_error(trained, tmp_path):
  work = tmp_path / "run"
  shutil.copytree(trained, work)
  ck = work / "dmd" / "checkpoints"
  latest = max(int(d) for d in os.listdir(ck) if d.isdigit())
  for root, _, files in os.walk(ck / str(latest) / "state"):
    for f in files:
      if f != "_METADATA":
        os.remove(os.path.join(root, f))
  before = lines(work)
  p = subprocess.run([*TRAIN, "--workdir", str(work), "--config.train.dmd.steps=12"], capture_output=True, text=True, env=ENV)
  assert p.returncode == 2, p.stderr[-2000:]
  assert f"checkpoints/{latest}: cannot restore" in p.stderr and "Traceback" not in p.stderr
  assert lines(work) == before  # nothing half-restored, no metrics rewritten


def test_workdir_with_another_config_is_refused(trained, tmp_path):
  work = tmp_path / "run"
  shutil.copytree(trained, work)
  p = subprocess.run([*TRAIN, "--workdir", str(work), "--config.train.horizon_alpha=4.0"], capture_output=True, text=True, env=ENV)
  assert p.returncode == 2 and "train.horizon_alpha" in p.stderr
  # Other stages (and more steps) are the same run going on, not another config.
  p = subprocess.run([*TRAIN, "--workdir", str(work), "--config.train.stages=('dmd',)"], capture_output=True, text=True, env=ENV)
  assert p.returncode == 0 and "dmd:" in p.stdout, p.stderr[-2000:]


def test_workdir_holding_user_files_is_refused(tmp_path):
  work = tmp_path / "mine"
  work.mkdir()
  (work / "metrics.jsonl").write_text("my own notes, not JSON\n")
  p = subprocess.run([*TRAIN, "--workdir", str(work)], capture_output=True, text=True, env=ENV)
  assert p.returncode == 2 and "--workdir" in p.stderr and "did not make" in p.stderr
  assert (work / "metrics.jsonl").read_text() == "my own notes, not JSON\n"
  assert sorted(os.listdir(work)) == ["metrics.jsonl"]


def test_dmd_without_a_teacher_is_one_error(tmp_path):
  p = subprocess.run([*TRAIN, "--workdir", str(tmp_path / "w"), "--config.train.stages=('dmd',)", "--config.train.dmd.steps=1"], capture_output=True, text=True, env=ENV)
  assert p.returncode == 2 and "train.dmd.teacher" in p.stderr and "Traceback" not in p.stderr


def test_non_finite_loss_names_step_and_subtree(tmp_path):
  p = subprocess.run([*TRAIN, "--workdir", str(tmp_path / "nan"), "--config.train.stages=('teacher',)", "--config.train.teacher.lr=1e30", "--config.train.optimizer.clip_norm=1e30"], capture_output=True, text=True, env=ENV)
  assert p.returncode == 2, p.stderr[-2000:]
  assert "teacher step" in p.stderr and "non-finite" in p.stderr and "Traceback" not in p.stderr


def test_bad_train_config_errors(tmp_path):
  p = subprocess.run([*TRAIN, "--workdir", str(tmp_path / "x"), "--config.train.stages=('dmd','teacher')"], capture_output=True, text=True, env=ENV)
  assert p.returncode == 2 and "train.stages" in p.stderr
  p = subprocess.run([*TRAIN, "--workdir", str(tmp_path / "x"), "--config.train.data.frames=4"], capture_output=True, text=True, env=ENV)
  assert p.returncode == 2 and "train.data.frames" in p.stderr
  # Checked before any work (in-process: the same check_config the CLI calls first).
  for over, named in (
    (["train.causal_init.method=odee"], "train.causal_init.method"),
    (["train.horizon_frames=4", "train.data.frames=9"], "train.horizon_frames"),  # ODE init: H >= Wp + F
    (["rollout.anchor=none", "rollout.positions=absolute", "train.stages=('dmd',)", "train.sample_chunks=8"], "train.sample_chunks"),
    (["train.dmd.reencode_vae=/nonexistent/vae.pth"], "train.dmd.reencode_vae"),
    (["train.teacher.text_dropout=1.0"], "train.teacher.text_dropout"),
    (["mesh.rules.tokens=ctx"], "mesh.rules.tokens"),
  ):
    with pytest.raises(asvd.UsageError, match=re.escape(named)):
      trainer.check_config(asvd.load_config("configs/tiny.py", over))


def test_dmd_generator_and_critic_losses_decrease(tiny, trained):
  """From the run's own teacher and causal init (random networks give DMD nothing to match),
  with the trainer's optimizers and jitted steps: the run's programs (its compilation cache)."""
  cfg, lay, batch = tiny
  g, params = nnx.split(asvd.load_dit(trained / "causal_init" / "model"))
  _, teacher = nnx.split(asvd.load_dit(trained / "teacher" / "model"))
  tx, critic_tx = trainer._optimizer(cfg, "dmd"), trainer._optimizer(cfg, "dmd", "critic")
  critic = jax.tree.map(jnp.copy, teacher)
  state = st.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), key=jax.random.PRNGKey(0), critic=critic, critic_opt=critic_tx.init(critic), ema=jax.tree.map(jnp.copy, params))
  gen, critic_step = st.dmd_steps(g, g, tx, critic_tx, cfg, lay)
  for fn, name in ((gen, "loss"), (critic_step, "critic_loss")):
    step, s, frozen = like_trainer(fn, state, st.Frozen(teacher=teacher))
    assert_decreasing(run_fixed_key(step, s, 4, batch, frozen, name=name))
