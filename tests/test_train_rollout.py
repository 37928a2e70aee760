"""Training through the inference transition: one live forward per chunk, no gradient through
the cache, replay == direct gradients, memory ~ one cache per chunk (tiny config)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import asvd
from asvd import transition as tr
from asvd.streaming import chunk_noise
from asvd.train import rollout as trr


@pytest.fixture(scope="module")
def setup(cfg, model, context):
  lay = tr.make_layout(cfg.rollout, model.cfg, None, cfg.sampler)
  graphdef, params = nnx.split(model)
  return context, lay, graphdef, params


def loss_of(frames, states):
  w = jnp.linspace(0.5, 1.5, frames.shape[1])[None, :, None, None, None]
  return jnp.sum(w * frames**2) * 1e-3 + jnp.sum(jnp.sin(states)) * 1e-3


def test_exit_at_last_step_is_inference_bit_for_bit(model, setup):
  ctx, lay, graphdef, params = setup
  state, cache = tr.initial_carry(model, ctx, lay)
  noise = jax.random.normal(jax.random.key(0), tr.noise_shape(lay, 2, 16))
  run = jax.jit(lambda p, s, c, n, e: tr.transition_fn(nnx.merge(graphdef, p), lay, s, c, n, exit_step=e))
  infer = jax.jit(lambda p, s, c, n: tr.transition_fn(nnx.merge(graphdef, p), lay, s, c, n))
  for _ in range(2):  # a fresh cache, then a filled one
    a = run(params, state, cache, noise, jnp.int32(len(lay.timesteps) - 1))
    b = infer(params, state, cache, noise)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    state, cache, _ = b
  # Earlier exits give other (fewer-step) outputs, all from one compile.
  outs = [np.asarray(run(params, state, cache, noise, jnp.int32(e))[2]) for e in range(4)]
  assert all(not np.allclose(outs[i], outs[3]) for i in range(3))
  assert run._cache_size() == 1


def test_exactly_one_forward_carries_gradient(model, setup):
  """The gradient equals that of a single forward at the exit step on the (constant) input the
  earlier steps produced, with the text K/V from the live parameters."""
  ctx, lay, graphdef, params = setup
  state, cache = tr.initial_carry(model, ctx, lay)
  noise = jax.random.normal(jax.random.key(0), tr.noise_shape(lay, 2, 16))
  e = 2
  cot = jax.random.normal(jax.random.key(3), (2, lay.z_frames, 8, 8, 16))

  def via_transition(p):
    m = nnx.merge(graphdef, p)
    x0, _ = tr.denoise(m, lay, cache, noise, exit_step=e, text=m.text_kv(ctx))
    return jnp.sum(x0 * cot)

  # By hand: run steps 0..e-1 as inference (no gradient), then one live forward.
  fwd = jax.jit(lambda z, t: model(z, t, cache.text, positions=jnp.asarray(lay.z_positions()), slots=cache.slots(jnp.asarray(lay.slot_positions()))))
  z = noise[0]
  for i in range(e):
    v = fwd(z, jnp.full((2, lay.z_frames), lay.timesteps[i]))
    z = (1 - lay.sigmas[i + 1]) * (z - lay.sigmas[i] * v) + lay.sigmas[i + 1] * noise[i + 1]

  def one_forward(p):
    m = nnx.merge(graphdef, p)
    t = jnp.full((2, lay.z_frames), lay.timesteps[e])
    v = m(z, t, m.text_kv(ctx), positions=jnp.asarray(lay.z_positions()), slots=cache.slots(jnp.asarray(lay.slot_positions())))
    return jnp.sum((z - lay.sigmas[e] * v) * cot)

  g1, g2 = jax.jit(jax.grad(via_transition))(params), jax.jit(jax.grad(one_forward))(params)
  assert_trees_close(g1, g2)


def assert_trees_close(a, b, rel=1e-5):
  """Leaf by leaf: max |a - b| <= rel * max |b| (float order differs between jit and eager)."""
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.abs(x - y).max() <= rel * np.abs(y).max() + 1e-12, (jax.tree_util.keystr(path), np.abs(x - y).max(), np.abs(y).max())


def test_rollout_gradient_paths(model, setup):
  ctx, lay, graphdef, params = setup
  state, cache = tr.initial_carry(model, ctx, lay)
  key = jax.random.key(5)
  prefix = jax.random.normal(jax.random.key(8), (2, 3, 8, 8, 16))  # a filled cache to start from
  state, cache = asvd.prefill(model, ctx, prefix, config=asvd.load_config("configs/tiny.py").rollout)

  def loss(p, state, k, v, lat):
    carry = (state, cache.replace(k=k, v=v, lat=lat))
    frames, states, _ = trr.training_rollout(p, graphdef, lay, carry, ctx, key, num_chunks=3, exit_step=1)
    return loss_of(frames, states)

  gp, *gc = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(params, state, cache.k, cache.v, cache.lat)
  flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(gp)}
  for name in ("text_embedding_1", "cross_attn']['k", "cross_attn']['v", "self_attn']['q", "head"):
    hits = [k for k in flat if name in k]
    assert hits and all(np.abs(flat[k]).max() > 0 for k in hits), name  # the text path learns too
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(gc))  # nothing through the cache


def test_grad_from_chunk(model, setup):
  ctx, lay, graphdef, params = setup
  carry = tr.initial_carry(model, ctx, lay)

  def loss(p, first_chunk_only, g):
    frames, states, _ = trr.training_rollout(p, graphdef, lay, carry, ctx, jax.random.key(2), num_chunks=3, exit_step=3, grad_from_chunk=g)
    return jnp.where(first_chunk_only, loss_of(frames[:, :3], states[:, :1]), loss_of(frames[:, 3:], states[:, 1:]))

  grad = jax.jit(jax.grad(loss))  # grad_from_chunk is traced: one compile
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(grad(params, True, 1)))
  assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(grad(params, False, 1)))
  assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(grad(params, True, 0)))


def test_training_rollout_frames_equal_inference(model, setup, cfg):
  ctx, lay, graphdef, params = setup
  carry = tr.initial_carry(model, ctx, lay)
  frames, _, final = trr.training_rollout(params, graphdef, lay, carry, ctx, jax.random.key(4), num_chunks=3, exit_step=3)
  lat, ref_carry = asvd.rollout(model, ctx, jax.random.key(4), num_chunks=3, config=cfg.rollout)
  np.testing.assert_allclose(np.asarray(frames), np.asarray(lat), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(final[1].k), np.asarray(ref_carry[1].k), rtol=1e-5, atol=1e-5)


def test_replay_equals_direct_gradient(model, setup):
  ctx, lay, graphdef, params = setup
  carry = tr.initial_carry(model, ctx, lay)
  key, e = jax.random.key(6), jnp.int32(2)

  def direct(p):
    frames, states, _ = trr.training_rollout(p, graphdef, lay, carry, ctx, key, num_chunks=4, exit_step=e, grad_from_chunk=1)
    return loss_of(frames, states)

  g_direct = jax.jit(jax.grad(direct))(params)
  frames, states, _ = trr.training_rollout(params, graphdef, lay, carry, ctx, key, num_chunks=4, exit_step=e)
  cot_f, cot_s = jax.grad(loss_of, argnums=(0, 1))(frames, states)
  g_replay, final = jax.jit(lambda p: trr.replay_grads(p, graphdef, lay, carry, ctx, key, cot_f, cot_s, exit_step=e, grad_from_chunk=1))(params)
  assert_trees_close(g_replay, g_direct)


def test_backward_memory_grows_by_about_one_cache_per_chunk(model, setup):
  ctx, lay, graphdef, params = setup
  carry = tr.initial_carry(model, ctx, lay)
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(carry[1]))

  def temp_bytes(n):
    def loss(p):
      frames, states, _ = trr.training_rollout(p, graphdef, lay, carry, ctx, jax.random.key(0), num_chunks=n, exit_step=1)
      return loss_of(frames, states)

    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

  # Measured: exactly one cache (196,608 B) per chunk; without remat, 3.7 MB (`remat=False`):
  # remat is what keeps it low, and a rollout whose remat stopped working fails here.
  per_chunk = (temp_bytes(6) - temp_bytes(2)) / 4
  assert per_chunk <= 1.5 * cache_bytes, (per_chunk, cache_bytes)


def test_sample_exit_step():
  draws = {int(trr.sample_exit_step(jax.random.key(i), 4)) for i in range(40)}
  assert draws == {0, 1, 2, 3}
  assert int(trr.sample_exit_step(jax.random.key(0), 4, last_step_only=True)) == 3
  _ = chunk_noise
