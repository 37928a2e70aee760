"""Each training stage's step in-process on the tiny config: losses go down, the ODE init's
teacher trajectory, DMD's horizon weights, windows and replay, the data pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from train_helpers import assert_decreasing, fresh, like_trainer, run_fixed_key

import asvd
from asvd.train import losses, trainer
from asvd.train import steps as st

# ------------------------------------------------------------------------------------------------
# Each stage's step lowers its loss (same batch and key, so only the parameters change).
# ------------------------------------------------------------------------------------------------


def test_teacher_and_causal_init_losses_decrease(tiny):
  """(The teacher and ODE steps: the default run's programs, with its learning rates.)"""
  cfg, lay, batch = tiny
  assert cfg.train.teacher.lr == cfg.train.causal_init.lr == 1e-3
  g, tx, state = fresh(cfg, 1e-3)
  step, state, frozen = like_trainer(st.teacher_step(g, tx, cfg), state, st.Frozen())
  assert_decreasing(run_fixed_key(step, state, 4, batch, frozen))
  cfg_tf = cfg.copy_and_resolve_references()
  cfg_tf.train.causal_init.method = "teacher_forcing"
  g, tx, state = fresh(cfg_tf, 1e-3, seed=1)
  assert_decreasing(run_fixed_key(jax.jit(st.causal_init_step(g, tx, cfg_tf, lay)), state, 4, batch))
  # ODE regression from a (random) frozen teacher's trajectories.
  assert cfg.train.causal_init.method == "ode"
  g, tx, state = fresh(cfg, 1e-3, seed=1)
  _, teacher = nnx.split(asvd.init_dit(cfg.model, 7))
  step, state, frozen = like_trainer(st.causal_init_step(g, tx, cfg, lay, g), state, st.Frozen(teacher=teacher))
  assert_decreasing(run_fixed_key(step, state, 4, batch, frozen))


def test_causal_init_state_target_is_what_the_next_chunk_finds_in_the_slot(tiny):
  """`train.state_init_target="own_last_frame"` (the default): a chunk's state target is the state
  `write_given` puts in the slot when that chunk is the context, the cache the next chunk trains
  on; method.md's "last_frame" is the context's last frame, a chunk behind it."""
  from asvd import transition as tr

  cfg, lay, batch = tiny
  assert cfg.train.state_init_target == "own_last_frame" and lay.anchor == "adaptive"
  model = asvd.init_dit(cfg.model, 3)
  clips, text, key = batch["latents"], batch["text"], jax.random.PRNGKey(4)
  f, wp, fs = lay.chunk_frames, lay.window_frames, lay.state_frames
  for target_kind in ("own_last_frame", "last_frame"):
    for first in (0.0, 1.0):  # a chunk in context; a first chunk (empty cache)
      o, _, _, target = st._chunk_in_context(model, lay, clips, text, key, first, target_kind)
      chunk = clips[:, o + wp : o + wp + f]
      np.testing.assert_array_equal(target[:, fs:], chunk)
      slot, _ = tr.write_given(tr.frozen(model), lay, *tr.empty_carry(model, model.text_kv(text), lay), chunk, key)
      if target_kind == "own_last_frame":
        np.testing.assert_array_equal(target[:, :fs], slot)
      else:
        want = chunk[:, :fs] if first else clips[:, o + wp - fs : o + wp]
        np.testing.assert_array_equal(target[:, :fs], want)
        assert not np.array_equal(target[:, :fs], slot)


def test_causal_init_anchor_is_the_clip_start_or_the_context(tiny):
  """`train.causal_init.anchor_from`: "clip_start" (the default) writes the clip's first chunk
  before the context, so a sink holds the clip's frame 0 and an EMA anchor its evicted frames;
  "context" leaves the context's own first frame in the sink. The step reads the key."""
  from asvd import transition as tr

  cfg, _, batch = tiny
  assert cfg.train.causal_init.anchor_from == "clip_start"
  model = asvd.init_dit(cfg.model, 3)
  clips, text = batch["latents"], batch["text"]
  wp = cfg.rollout.window_frames
  for anchor in ("sink", "ema"):
    c = cfg.copy_and_resolve_references()
    c.rollout.anchor = anchor
    lay = tr.make_layout(c.rollout, model.cfg)
    for seed in range(3):
      key = jax.random.PRNGKey(seed)
      o, _, far, _ = st._chunk_in_context(model, lay, clips, text, key, 0.0, anchor_from="clip_start")
      o2, _, near, _ = st._chunk_in_context(model, lay, clips, text, key, 0.0, anchor_from="context")
      assert o == o2
      np.testing.assert_array_equal(np.asarray(far.lat[:, 1:]), np.asarray(clips[:, o : o + wp]))  # the window: the context
      if anchor == "sink":
        np.testing.assert_array_equal(np.asarray(far.lat[:, 0]), np.asarray(clips[:, 0]))
        np.testing.assert_array_equal(np.asarray(near.lat[:, 0]), np.asarray(clips[:, o]))
      else:  # the EMA anchor: the clip's first chunk, evicted by the context; none without it
        assert np.asarray(far.valid[:, 0]).all() and not np.asarray(near.valid[:, 0]).any()
  c = cfg.copy_and_resolve_references()
  c.rollout.anchor, c.train.causal_init.method = "sink", "teacher_forcing"
  lay = tr.make_layout(c.rollout, model.cfg)
  losses = []
  for where in ("clip_start", "context"):
    c.train.causal_init.anchor_from = where
    g, tx, state = fresh(c, 1e-3, seed=1)
    losses.append(float(jax.jit(st.causal_init_step(g, tx, c, lay))(state, batch)[1]["loss"]))
  assert losses[0] != losses[1], losses


def test_a_stage_may_have_its_own_adam_momentum(tiny):
  """`train.<stage>.b1` (None: `train.optimizer.b1`) sets that stage's Adam momentum only."""
  cfg, _, _ = tiny
  params = {"w": jnp.ones(3)}
  grads = [{"w": jnp.asarray([1.0, -2.0, 3.0])}, {"w": jnp.asarray([-3.0, 1.0, 0.5])}]

  def second_update(tx):
    state = tx.init(params)
    for g in grads:
      u, state = tx.update(g, state, params)
    return np.asarray(u["w"])

  c = cfg.copy_and_resolve_references()
  c.train.teacher.b1 = 0.9
  want = c.train.optimizer.copy_and_resolve_references()
  want.b1 = 0.9
  np.testing.assert_allclose(second_update(trainer._optimizer(c, "teacher")), second_update(st.optimizer(c.train.teacher.lr, want)), rtol=1e-6)
  assert cfg.train.optimizer.b1 == 0.0 and c.train.causal_init.b1 is None
  assert np.abs(second_update(trainer._optimizer(c, "teacher")) - second_update(trainer._optimizer(cfg, "teacher"))).max() > 1e-4
  np.testing.assert_allclose(second_update(trainer._optimizer(c, "causal_init")), second_update(st.optimizer(c.train.causal_init.lr, cfg.train.optimizer)), rtol=1e-6)


def test_frame_noise_gives_each_frame_its_own_sigma():
  """`frame_noise_prob`: the samples it picks see one noise level per frame (the input is
  `(1 - s) x0 + s eps` frame by frame, the timestep `1000 s`), the others one per sample."""
  x0 = jax.random.normal(jax.random.key(0), (64, 5, 2, 2, 3))
  seen = {}

  def predict(x_t, t):
    seen["x"], seen["t"] = x_t, t
    return jnp.zeros_like(x_t)

  for p in (0.0, 0.5, 1.0):
    losses.flow_matching_loss(predict, x0, jax.random.key(1), 1.0, p)
    t = np.asarray(seen["t"])
    per_frame = t.max(1) - t.min(1) > 1e-3
    assert per_frame.mean() == {0.0: 0.0, 1.0: 1.0}.get(p, per_frame.mean()) and (p != 0.5 or 0.3 < per_frame.mean() < 0.7), p
    s = (t / 1000.0)[:, :, None, None, None]
    eps = (np.asarray(seen["x"]) - (1 - s) * np.asarray(x0)) / s  # the noise, recovered frame by frame
    assert abs(eps.std() - 1.0) < 0.1 and abs(np.corrcoef(eps.ravel(), np.asarray(x0).ravel())[0, 1]) < 0.05


def test_teacher_text_dropout_trains_the_unconditional_prediction(tiny):
  """`train.teacher.text_dropout`: a dropped sample's text is the zeros CFG uses as its
  unconditional text. Dropping (almost) always, the loss no longer depends on the text; with the
  default 0.1 some samples of a batch keep it (the loss does depend on it)."""
  cfg, _, batch = tiny
  g, tx, state = fresh(cfg, 1e-3)
  other = {**batch, "text": batch["text"][::-1]}

  steps = {}

  def loss(p, b):
    if p not in steps:
      c = cfg.copy_and_resolve_references()
      c.train.teacher.text_dropout = p
      steps[p] = jax.jit(st.teacher_step(g, tx, c))
    return float(steps[p](state, b)[1]["loss"])

  assert loss(0.999999, batch) == loss(0.999999, other) == loss(0.999999, {**batch, "text": 0 * batch["text"]})
  assert cfg.train.teacher.text_dropout == 0.1 and loss(0.1, batch) != loss(0.1, other)


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
