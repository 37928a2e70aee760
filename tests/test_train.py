"""`asvd train` on the tiny config: stages, losses, resume after SIGKILL, errors, data."""

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

import asvd
from asvd.train import losses, trainer
from asvd.train import steps as st

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
TRAIN = [sys.executable, "-m", "asvd.main", "train", "--config", "configs/tiny.py", "--no-progress"]


def lines(path):
  return (path / "metrics.jsonl").read_text().splitlines()


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


def test_sigkill_and_rerun_reproduces_metrics_bit_exactly(trained, tmp_path):
  work = tmp_path / "run"
  proc = subprocess.Popen([*TRAIN, "--workdir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
  ck = work / "causal_init" / "checkpoints"
  deadline = time.time() + 600  # a wait, not a speed target (slow machines)
  while time.time() < deadline:  # kill mid-stage, once a causal-init checkpoint is complete
    if ck.is_dir() and any(d.isdigit() and int(d) >= 5 for d in os.listdir(ck)):
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert len(lines(work)) < len(lines(trained))
  p = subprocess.run([*TRAIN, "--workdir", str(work)], capture_output=True, text=True, env=ENV)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resumed at step" in p.stderr or "done (20 steps), skipping" in p.stderr
  assert lines(work) == lines(trained)


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
  ):
    with pytest.raises(asvd.UsageError, match=re.escape(named)):
      trainer.check_config(asvd.load_config("configs/tiny.py", over))


# ------------------------------------------------------------------------------------------------
# Each stage's step lowers its loss (same batch and key, so only the parameters change).
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(cfg):
  from asvd.data.synthetic import caption_embedding, config_for, make_clip  # noqa: PLC0415

  rng = np.random.default_rng(0)
  c = config_for(9, 8, 8, 16, 16, 32, 2, 0)
  batch = {
    "latents": jnp.asarray(np.stack([make_clip(rng, c, i) for i in (0, 5)])),
    "text": jnp.asarray(np.stack([caption_embedding(i, 16, 32) for i in (0, 5)])),
  }
  return cfg, trainer.layout(cfg), batch


def run_fixed_key(step, state, n, *args, name="loss"):
  key, out = state.key, []
  for _ in range(n):
    new, m = step(state.replace(key=key), *args)
    state = new.replace(key=key)
    out.append(float(m[name]))
  return out


def assert_decreasing(vals):
  assert all(b < a for a, b in zip(vals, vals[1:], strict=False)), vals


def fresh(cfg, lr, seed=0):
  model = asvd.init_dit(cfg.model, seed)
  g, p = nnx.split(model)
  tx = st.optimizer(lr, cfg.train.optimizer)
  return g, tx, st.TrainState(step=jnp.int32(0), params=p, opt_state=tx.init(p), key=jax.random.PRNGKey(seed))


def test_teacher_and_causal_init_losses_decrease(tiny):
  cfg, lay, batch = tiny
  g, tx, state = fresh(cfg, 1e-3)
  assert_decreasing(run_fixed_key(jax.jit(st.teacher_step(g, tx, cfg)), state, 4, batch))
  cfg_tf = cfg.copy_and_resolve_references()
  cfg_tf.train.causal_init.method = "teacher_forcing"
  g, tx, state = fresh(cfg_tf, 1e-3, seed=1)
  assert_decreasing(run_fixed_key(jax.jit(st.causal_init_step(g, tx, cfg_tf, lay)), state, 4, batch))
  # ODE regression from a (random) frozen teacher's trajectories.
  assert cfg.train.causal_init.method == "ode"
  g, tx, state = fresh(cfg, 1e-3, seed=1)
  _, teacher = nnx.split(asvd.init_dit(cfg.model, 7))
  step = jax.jit(st.causal_init_step(g, tx, cfg, lay, g))
  assert_decreasing(run_fixed_key(step, state, 4, batch, st.Frozen(teacher=teacher)))


def test_ode_trajectory_is_the_teachers_euler_ode_recorded_at_the_student_sigmas(tiny):
  """Against a plain Python loop of Euler steps with CFG, written here from the formulas."""
  cfg, lay, batch = tiny
  steps, shift, scale = 6, float(cfg.sampler.shift), 3.0
  grid, record = st.ode_grid(lay, steps, shift)
  assert grid[0] == 1.0 and grid[-1] == 0.0 and np.all(np.diff(grid) < 0)
  np.testing.assert_array_equal(grid[record], np.asarray(lay.sigmas))  # the student's sigmas are grid points
  teacher = asvd.init_dit(cfg.model, 3)
  key = jax.random.PRNGKey(4)
  path = st.teacher_trajectory(teacher, lay, batch["text"], key, 6, steps, shift, scale)
  assert path.shape == (2, len(lay.sigmas) + 1, 6, *lay.latent_hw, 16)
  x = np.asarray(jax.random.normal(key, (2, 6, *lay.latent_hw, 16)))
  cond_kv, unc_kv = teacher.text_kv(batch["text"]), teacher.text_kv(jnp.zeros_like(batch["text"]))
  seen = {}
  u = np.linspace(1, 0, steps + 1)
  sig = sorted(set((shift * u / (1 + (shift - 1) * u)).tolist()) | set(lay.sigmas), reverse=True)
  for s, s_next in zip(sig[:-1], sig[1:], strict=True):
    seen[s] = x
    t = jnp.full((2, 6), 1000.0 * s)
    c, n = np.asarray(teacher(jnp.asarray(x), t, cond_kv)), np.asarray(teacher(jnp.asarray(x), t, unc_kv))
    x = x + (s_next - s) * (c + scale * (c - n))
  want = np.stack([seen[s] for s in lay.sigmas] + [x], axis=1)
  np.testing.assert_allclose(np.asarray(path), want, atol=2e-5, rtol=0)


def test_dmd_generator_and_critic_losses_decrease(tiny, trained):
  """From the run's own teacher and causal init (random networks give DMD nothing to match)."""
  cfg, lay, batch = tiny
  g, params = nnx.split(asvd.load_dit(trained / "causal_init" / "model"))
  _, teacher = nnx.split(asvd.load_dit(trained / "teacher" / "model"))
  tx = st.optimizer(1e-3, cfg.train.optimizer)
  state = st.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), key=jax.random.PRNGKey(0))
  state = state.replace(critic=teacher, critic_opt=tx.init(teacher), ema=state.params)
  gen, critic = st.dmd_steps(g, g, tx, tx, cfg, lay)
  frozen = st.Frozen(teacher=teacher)
  assert_decreasing(run_fixed_key(jax.jit(gen), state, 4, batch, frozen))
  assert_decreasing(run_fixed_key(jax.jit(critic), state, 4, batch, frozen, name="critic_loss"))


def test_horizon_weights_and_windows():
  np.testing.assert_allclose(losses.horizon_weights([6, 9, 12], 6, 0.0), [1, 1, 1])  # alpha 0: plain DMD
  w = np.array([1.0, 1.5**2, 2.0**2])
  np.testing.assert_allclose(losses.horizon_weights([6, 9, 12], 6, 2.0), w / w.mean(), rtol=1e-6)
  assert losses.window_starts(12, 6, 3) == [0, 3, 6]
  assert losses.window_starts(4, 6, 3) == [0]
  lay = trainer.layout(asvd.load_config("configs/tiny.py"))
  frames = jnp.arange(9.0).reshape(1, 9, 1, 1, 1) * jnp.ones((1, 9, 8, 8, 16))
  states = 100.0 + jnp.arange(3.0).reshape(1, 3, 1, 1, 1, 1) * jnp.ones((1, 3, 1, 8, 8, 16))
  wins, ends = st.dmd_windows(frames, states, lay, 6, True)
  assert ends == [6, 9]
  np.testing.assert_array_equal(np.asarray(wins[0, 0, :, 0, 0, 0]), [0, 1, 2, 3, 4, 5])
  np.testing.assert_array_equal(np.asarray(wins[1, 0, :, 0, 0, 0]), [100, 4, 5, 6, 7, 8])  # the state of chunk 0
  wins, _ = st.dmd_windows(frames, states, lay, 6, False)
  np.testing.assert_array_equal(np.asarray(wins[1, 0, :, 0, 0, 0]), [3, 4, 5, 6, 7, 8])


def test_data_pipeline_deterministic_resumable_sharded(tmp_path, cfg):
  from asvd.data.pipeline import make_iterator  # noqa: PLC0415

  def it(seed, pi=0, pc=1):
    return make_iterator(cfg, (8, 8), batch_size=2, seed=seed, data_dir=str(tmp_path), process_index=pi, process_count=pc)

  a, b = it(0), it(0)
  for _ in range(3):
    np.testing.assert_array_equal(next(a)["latents"], next(b)["latents"])
  state = a.get_state()
  want = next(a)["latents"]
  c = it(0)
  c.set_state(state)
  np.testing.assert_array_equal(next(c)["latents"], want)
  assert not np.array_equal(next(it(1))["latents"], next(it(0))["latents"])  # the seed matters
  # Two processes with batches of 2 read different examples, and together the global batch of
  # one process with batches of 4 (the same run on any number of processes).
  p0, p1, one = it(0, 0, 2), it(0, 1, 2), make_iterator(cfg, (8, 8), batch_size=4, seed=0, data_dir=str(tmp_path))
  for _ in range(3):
    a0, a1, g = next(p0), next(p1), next(one)
    assert not {x.tobytes() for x in a0["latents"]} & {x.tobytes() for x in a1["latents"]}
    np.testing.assert_array_equal(np.concatenate([a0["latents"], a1["latents"]]), g["latents"])


def test_dmd_replay_equals_direct_gradient(tiny):
  cfg, lay, batch = tiny
  g, tx, state = fresh(cfg, 1e-3)
  _, teacher = nnx.split(asvd.init_dit(cfg.model, 7))
  _, critic = nnx.split(asvd.init_dit(cfg.model, 8))
  state = state.replace(critic=critic, critic_opt=tx.init(critic), ema=state.params)
  out = {}
  for replay in (False, True):
    c = cfg.copy_and_resolve_references()
    c.train.dmd.update(replay=replay, rollout_chunks=4, grad_from_chunk=1)
    gen, _ = st.dmd_steps(g, g, tx, tx, c, lay)
    out[replay] = jax.jit(gen.grads)(state, batch, st.Frozen(teacher=teacher), jax.random.key(3))
  np.testing.assert_allclose(float(out[True][0]), float(out[False][0]), rtol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(out[True][1]), jax.tree.leaves(out[False][1]), strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max() + 1e-12, jax.tree_util.keystr(path)
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(out[True][1]))


def test_sigterm_saves_and_resumes(trained, tmp_path):
  work = tmp_path / "run"
  proc = subprocess.Popen([*TRAIN, "--workdir", str(work), "--config.train.stages=('teacher',)"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
  deadline = time.time() + 600  # a wait, not a speed target
  while time.time() < deadline:  # stop it once training has begun
    if (work / "metrics.jsonl").is_file() and len(lines(work)) >= 3:
      break
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  stopped = [json.loads(x)["step"] for x in lines(work)]
  if proc.returncode == 0:  # it finished before the signal landed: nothing to resume
    assert stopped[-1] == 20
  else:
    assert proc.returncode == 143 and "stopped by SIGTERM at step" in err, err[-2000:]
    ck = work / "teacher" / "checkpoints"
    assert max(int(d) for d in os.listdir(ck) if d.isdigit()) == stopped[-1]  # saved where it stopped
  p = subprocess.run([*TRAIN, "--workdir", str(work), "--config.train.stages=('teacher',)"], capture_output=True, text=True, env=ENV)
  assert p.returncode == 0, p.stderr[-2000:]
  want = [x for x in lines(trained) if json.loads(x)["stage"] == "teacher"]
  assert lines(work) == want


@pytest.mark.parametrize("anchor", ["sink", "ema", "none"])
def test_every_anchor_mode_trains_with_the_same_code(tmp_path, anchor):
  lora = ["--config.train.lora.rank=4"] if anchor == "none" else []  # one of them with LoRA adapters
  # No teacher stage: DMD is told where the teacher is (an asvd checkpoint of a random one).
  teacher = tmp_path / "teacher_ck"
  asvd.save_dit(asvd.init_dit(asvd.load_config("configs/tiny.py").model, 5), teacher)
  method = ["--config.train.causal_init.method=teacher_forcing"] if anchor == "ema" else []  # others: ODE
  args = [*lora, *method, "--config.train.stages=('causal_init','dmd')", "--config.train.causal_init.steps=2", "--config.train.dmd.steps=2", f"--config.rollout.anchor={anchor}", f"--config.train.dmd.teacher={teacher}", "--config.train.optimizer.grad_accum=2"]
  p = subprocess.run([*TRAIN, "--workdir", str(tmp_path / "run"), *args, "--config.train.dmd.teacher_dtype=bfloat16"], capture_output=True, text=True, env=ENV)
  assert p.returncode == 0, p.stderr[-3000:]
  recs = [json.loads(x) for x in lines(tmp_path / "run")]
  assert [r["stage"] for r in recs] == ["causal_init"] * 2 + ["dmd"] * 2
  meta = json.loads((tmp_path / "run" / "dmd" / "model" / "asvd_dit.json").read_text())
  assert meta["model"]["lora_rank"] == 0  # LoRA runs export merged, plain models
  if lora:
    assert any("lora" in k for k in recs[-1]) is False and "generator_grad_norm/blocks" in recs[2]
