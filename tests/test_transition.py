"""The adaptive-state transition, cache modes and rollouts (tiny config)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from rollout_helpers import rcfg

import asvd
from asvd import sharding as shard_lib
from asvd import transition as tr
from asvd.models import dit as dit_lib


def noise_for(trans, batch=2, seed=0):
  lay = trans.layout
  return jax.random.normal(jax.random.key(seed), tr.noise_shape(lay, batch, 16))


def test_sampler_schedule(cfg):
  from asvd import sampler

  ts, sig = sampler.step_sigmas(cfg.sampler)
  np.testing.assert_allclose(ts, [1000.0, 937.5, 833.3333, 625.0], rtol=1e-5)
  np.testing.assert_allclose(sig, ts / 1000.0, rtol=1e-5)


class TransitionVariantsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_shapes_and_state_not_emitted(self):
    cfg = asvd.load_config("configs/tiny.py")
    model = asvd.init_dit(cfg.model, 0)
    ctx = jax.random.normal(jax.random.key(1), (1, 16, 32))
    state, cache, trans = asvd.make_transition(model, ctx, config=cfg.rollout)
    lay = trans.layout
    graphdef, params = nnx.split(model)
    fn = self.variant(lambda p, s, c, n: tr.transition_fn(nnx.merge(graphdef, p), lay, s, c, n))
    noise = noise_for(trans, batch=1)
    s1, c1, frames = fn(params, state, cache, noise)
    chex.assert_shape(frames, (1, 3, 8, 8, 16))
    chex.assert_shape(s1, (1, 1, 8, 8, 16))
    chex.assert_trees_all_equal_shapes(c1, cache)  # static shapes: the cache never grows
    # The emitted frames are the content part of x0, not the state: changing only the state's
    # noise changes the state but the frames only through attention (not a copy of the state).
    assert not np.allclose(np.asarray(s1[:, 0]), np.asarray(frames[:, 0]))


def test_rollout_equals_stream_bitwise(model, context, cfg):
  for anchor in ("adaptive", "sink", "ema"):
    rc = rcfg(cfg, anchor=anchor, scan_chunks=3)
    lat, carry = asvd.rollout(model, context, jax.random.key(7), num_chunks=4, config=rc)
    it = asvd.stream(model, context, jax.random.key(7), config=rc, num_chunks=4)
    chunks = list(it)
    np.testing.assert_array_equal(np.asarray(lat), np.concatenate(chunks, axis=1))
    # ... and the final carries (state, every cache leaf) agree bit for bit as well
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), carry, it.carry)
    assert all(jax.tree.leaves(same)), anchor
    assert it.next_chunk == 4


def test_each_chunk_gets_its_own_noise(model, context, cfg):
  """The documented noise contract, restated independently: chunk c's noise is
  `normal(fold_in(key, c))`, so chunk c of a rollout equals one transition on exactly that."""
  rc = rcfg(cfg, anchor="none")
  key = jax.random.key(21)
  lat, _ = asvd.rollout(model, context, key, num_chunks=3, config=rc)
  state, cache, trans = asvd.make_transition(model, context, config=rc)
  shape = tr.noise_shape(trans.layout, 2, 16)
  noises = [jax.random.normal(jax.random.fold_in(key, c), shape) for c in range(3)]
  assert not np.allclose(np.asarray(noises[0]), np.asarray(noises[1]))
  for c, nz in enumerate(noises):
    state, cache, frames = trans(state, cache, nz)
    np.testing.assert_allclose(np.asarray(frames), np.asarray(lat[:, 3 * c : 3 * c + 3]), rtol=1e-5, atol=1e-5)


def test_rollout_one_compile_for_any_num_chunks(model, context, cfg):
  rc = rcfg(cfg, scan_chunks=2)
  compiles = []
  import asvd.streaming as streaming

  streaming._PROGRAMS.clear()  # an earlier test may have built (and compiled) this very program
  orig = streaming._Program.__init__

  def counting(self, *a, **k):
    orig(self, *a, **k)
    seg = self.seg

    def wrapped(*args):
      before = seg._cache_size()
      out = seg(*args)
      compiles.append(seg._cache_size() - before)
      return out

    wrapped.lower = seg.lower  # the memory pre-flight compiles it ahead (the call then reuses it)
    self.seg = wrapped

  streaming._Program.__init__ = counting
  try:
    a, carry = asvd.rollout(model, context, 3, num_chunks=5, config=rc)  # segments 2 + 2 + 1 (padded)
  finally:
    streaming._Program.__init__ = orig
  assert sum(compiles) == 1, compiles
  assert a.shape[1] == 15
  assert int(carry[1].chunk) == 5  # padding chunks did not advance the carry
  b, _ = asvd.rollout(model, context, 3, num_chunks=3, config=rc)
  np.testing.assert_array_equal(np.asarray(a[:, :9]), np.asarray(b))


def test_positional_invariance(model, context, cfg):
  """Relative time: the transition at chunk 3 and at chunk 300 is the same function."""
  _, carry = asvd.rollout(model, context, 0, num_chunks=3, config=rcfg(cfg))
  state, cache = carry
  _, _, trans = asvd.make_transition(model, context, config=rcfg(cfg))
  noise = noise_for(trans, seed=5)
  out3 = trans(state, cache, noise)
  out300 = trans(state, cache.replace(chunk=jnp.int32(300)), noise)
  np.testing.assert_array_equal(np.asarray(out3[2]), np.asarray(out300[2]))
  np.testing.assert_array_equal(np.asarray(out3[0]), np.asarray(out300[0]))


def test_validity_fills_then_stays(model, context, cfg):
  rc = rcfg(cfg, anchor="none", chunk_frames=2, window_frames=5)
  state, cache, trans = asvd.make_transition(model, context, config=rc)
  seen = []
  for i in range(4):
    state, cache, _ = trans(state, cache, noise_for(trans, seed=i))
    seen.append(np.asarray(cache.valid[0]))
  # slots: [anchor (masked in 'none'), 5 window slots filling from the newest end]
  np.testing.assert_array_equal(seen[0], [0, 0, 0, 0, 1, 1])
  np.testing.assert_array_equal(seen[1], [0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(seen[2], [0, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(seen[3], [0, 1, 1, 1, 1, 1])


def test_window_shifts_in_newest_frames(model, context, cfg):
  rc = rcfg(cfg, anchor="none")
  state, cache, trans = asvd.make_transition(model, context, config=rc)
  t = trans.layout.tokens
  state, c1, _ = trans(state, cache, noise_for(trans, seed=1))
  state, c2, _ = trans(state, c1, noise_for(trans, seed=2))
  # With Wp = F = 3 the second chunk's K/V replace the first chunk's entirely.
  assert not np.allclose(np.asarray(c1.k[:, :, t:]), np.asarray(c2.k[:, :, t:]))
  rc4 = rcfg(cfg, anchor="none", window_frames=4)
  s, c, trans4 = asvd.make_transition(model, context, config=rc4)
  s, c1, _ = trans4(s, c, noise_for(trans4, seed=1))
  s, c2, _ = trans4(s, c1, noise_for(trans4, seed=2))
  # Window of 4 after two chunks of 3: the last frame of chunk 1 sits in the oldest window slot.
  np.testing.assert_array_equal(np.asarray(c2.k[:, :, t : 2 * t]), np.asarray(c1.k[:, :, 4 * t : 5 * t]))


def test_sink_frozen_after_first_chunk(model, context, cfg):
  rc = rcfg(cfg, anchor="sink")
  state, cache, trans = asvd.make_transition(model, context, config=rc)
  t = trans.layout.tokens
  state, c1, _ = trans(state, cache, noise_for(trans, seed=1))
  assert bool(c1.valid[:, 0].all())
  # The sink is the first generated frame's K/V: the first window slot's frame after chunk 1
  # (window = the 3 frames of chunk 1); that slot is masked, so the frame is not attended twice.
  np.testing.assert_array_equal(np.asarray(c1.k[:, :, :t]), np.asarray(c1.k[:, :, t : 2 * t]))
  np.testing.assert_array_equal(np.asarray(c1.valid), [[True, False, True, True]] * 2)
  c = c1
  for i in range(3):
    state, c, _ = trans(state, c, noise_for(trans, seed=10 + i))
    np.testing.assert_array_equal(np.asarray(c.k[:, :, :t]), np.asarray(c1.k[:, :, :t]))


def test_sink_disjoint_from_window_by_default(model, context, cfg):
  """LongLive keeps sink and window disjoint; `sink_in_window=True` is the knob for the other."""
  outs = {}
  for both in (False, True):
    rc = rcfg(cfg, anchor="sink", state_frames=2, window_frames=4, sink_in_window=both)
    state, cache, trans = asvd.make_transition(model, context, config=rc)
    frames = []
    for i in range(3):
      state, cache, f = trans(state, cache, noise_for(trans, seed=i))
      frames.append(np.asarray(f))
      if i == 0:  # window [pad, x0, x1, x2]: x0, x1 are the sink
        want = [True, True, False, both, both, True]
        np.testing.assert_array_equal(np.asarray(cache.valid[0]), want)
    np.testing.assert_array_equal(np.asarray(cache.valid[0]), [True] * 6)  # later frames all valid
    outs[both] = frames
  np.testing.assert_array_equal(outs[False][0], outs[True][0])  # the first chunk sees no cache
  assert not np.allclose(outs[False][1], outs[True][1])  # the second attends differently


def test_ema_accumulates_in_float32():
  """A bf16 cache keeps the EMA anchor's average in float32: after 40 folds at decay 0.99 it
  matches a float64 average of the evicted frames, where folding in bf16 drifts."""
  import ml_dtypes  # noqa: PLC0415

  cfg16 = asvd.load_config("configs/tiny.py:bf16")
  model16 = asvd.init_dit(cfg16.model, 3)
  rc = rcfg(cfg16, anchor="ema", ema_decay=0.99)
  ctx = jax.random.normal(jax.random.key(1), (1, 16, 32))
  state, cache, trans = asvd.make_transition(model16, ctx, config=rc)
  assert cache.k.dtype == jnp.bfloat16 and cache.acc_k.dtype == jnp.float32
  t, d = trans.layout.tokens, 0.99
  ref = ref16 = None
  for i in range(40):
    if bool(cache.valid[0, 1]):  # this chunk evicts the window's 3 frames, oldest first
      for j in range(3):
        e = np.asarray(cache.k[:, :, (1 + j) * t : (2 + j) * t], np.float64)
        ref = e if ref is None else d * ref + (1 - d) * e
        e16 = e.astype(ml_dtypes.bfloat16)
        ref16 = e16 if ref16 is None else (d * ref16.astype(np.float32) + (1 - d) * e16.astype(np.float32)).astype(ml_dtypes.bfloat16)
    state, cache, _ = trans(state, cache, noise_for(trans, batch=1, seed=i))
  scale = np.abs(ref).max()
  err = np.abs(np.asarray(cache.acc_k)[:, :, :t] - ref).max() / scale
  err16 = np.abs(ref16.astype(np.float64) - ref).max() / scale
  assert err < 1e-5, err
  assert err16 > 30 * err, (err16, err)  # the check can tell the two apart
  np.testing.assert_array_equal(np.asarray(cache.k[:, :, :t]), np.asarray(cache.acc_k).astype(jnp.bfloat16))


def test_context_noise_is_fresh(model, context, cfg):
  """With `context_timestep > 0` the clean re-run is noised with its own noise slot (not the
  chunk's initial noise); `context_sigma="table"` is Self-Forcing's training behaviour."""
  sc = cfg.sampler.copy_and_resolve_references()
  sc.context_timestep = 250
  state, cache, trans = asvd.make_transition(model, context, config=rcfg(cfg), sampler_config=sc)
  lay = trans.layout
  assert lay.noise_slots == 5 and lay.context_noise and abs(lay.context_sigma - 0.25) < 0.005  # table lookup
  noise = noise_for(trans, seed=3)
  other = noise.at[-1].set(jax.random.normal(jax.random.key(9), noise.shape[1:]))
  s1, c1, f1 = trans(state, cache, noise)
  s2, c2, f2 = trans(state, cache, other)
  np.testing.assert_array_equal(np.asarray(f1), np.asarray(f2))  # the frames never see it
  assert not np.allclose(np.asarray(c1.k), np.asarray(c2.k))  # the cache does
  sc.context_timestep, sc.context_sigma = 0, "table"
  lay = tr.make_layout(cfg.rollout, model.cfg, None, sc)
  assert lay.context_noise and lay.noise_slots == 5
  np.testing.assert_allclose(lay.context_sigma, 5 * 0.001 / (1 + 4 * 0.001))  # smallest table sigma
  sc.context_sigma = "exact"
  lay = tr.make_layout(cfg.rollout, model.cfg, None, sc)
  assert not lay.context_noise and lay.noise_slots == 4 and lay.context_sigma == 0.0


def test_ema_update_rule(model, context, cfg):
  decay = 0.75
  rc = rcfg(cfg, anchor="ema", ema_decay=decay)
  state, cache, trans = asvd.make_transition(model, context, config=rc)
  t = trans.layout.tokens
  state, c1, _ = trans(state, cache, noise_for(trans, seed=1))
  assert not bool(c1.valid[:, 0].any())  # nothing evicted yet
  state, c2, _ = trans(state, c1, noise_for(trans, seed=2))
  # chunk 2 evicts chunk 1's three frames (slots 1..3 of c1), oldest first.
  ev = [np.asarray(c1.k[:, :, (1 + j) * t : (2 + j) * t]) for j in range(3)]
  want = ev[0]
  for e in ev[1:]:
    want = decay * want + (1 - decay) * e
  np.testing.assert_allclose(np.asarray(c2.k[:, :, :t]), want, rtol=1e-5, atol=1e-6)
  assert bool(c2.valid[:, 0].all())


def test_adaptive_state_slot_holds_new_state_kv(model, context, cfg):
  rc = rcfg(cfg)
  state, cache, trans = asvd.make_transition(model, context, config=rc)
  lay = trans.layout
  s1, c1, frames = trans(state, cache, noise_for(trans, seed=3))
  # Recompute the clean re-run by hand: [s'; x] at t=0 with the old (empty) cache.
  _, aux = model(
    jnp.concatenate([s1, frames], axis=1),
    jnp.zeros((2, 4)),
    cache.text,
    positions=jnp.asarray(lay.z_positions()),
    slots=cache.slots(jnp.asarray(lay.slot_positions())),
    return_kv=True,
  )
  t = lay.tokens
  np.testing.assert_allclose(np.asarray(c1.k[:, :, :t]), np.asarray(aux["k"][:, :, :t]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(c1.k[:, :, t:]), np.asarray(aux["k"][:, :, t:]), atol=1e-5)


def test_state_position_leading_differs_and_runs(model, context, cfg):
  lay = tr.make_layout(rcfg(cfg, state_position="leading"), model.cfg, None, cfg.sampler)
  np.testing.assert_array_equal(lay.z_positions(), [4, 5, 6, 7])
  lay = tr.make_layout(rcfg(cfg), model.cfg, None, cfg.sampler)
  np.testing.assert_array_equal(lay.z_positions(), [0, 4, 5, 6])
  np.testing.assert_array_equal(lay.slot_positions(), [0, 1, 2, 3])


def test_none_with_big_window_matches_absolute_preset(model, context, cfg):
  """Where they coincide (window >= rollout, no anchor), rolling == absolute Self-Forcing."""
  n = 4
  rel = rcfg(cfg, anchor="none", window_frames=3 * n)
  ab = rcfg(cfg, anchor="none", positions="absolute", absolute_frames=3 * n)
  a, _ = asvd.rollout(model, context, 11, num_chunks=n, config=rel)
  b, _ = asvd.rollout(model, context, 11, num_chunks=n, config=ab)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_absolute_preset_refuses_overflow(model, context, cfg):
  ab = rcfg(cfg, anchor="none", positions="absolute")
  with pytest.raises(ValueError, match="absolute_frames.*at most 7 chunks"):
    asvd.rollout(model, context, 0, num_chunks=8, config=ab)
  with pytest.raises(ValueError, match="absolute_frames.*at most 7 chunks"):  # before any work
    asvd.stream(model, context, 0, config=ab, num_chunks=10)
  got = []
  with pytest.raises(ValueError, match="absolute_frames.*at most 7 chunks"):  # an endless stream
    for lat in asvd.stream(model, context, 0, config=ab):
      got.append(lat)
  assert len(got) == 7
  state, cache, step = asvd.make_transition(model, context, config=ab)
  noise = jnp.zeros(tr.noise_shape(step.layout, 2, 16))
  for _ in range(7):
    state, cache, _ = step(state, cache, noise)
  with pytest.raises(ValueError, match="absolute_frames.*at most 7 chunks, asked for chunks 7..7"):  # no silent clamp
    step(state, cache, noise)


def test_prompt_switching_only_changes_text(model, context, cfg):
  rc = rcfg(cfg)
  other = jax.random.normal(jax.random.key(99), context.shape)
  base, _ = asvd.rollout(model, context, 4, num_chunks=4, config=rc)
  same, _ = asvd.rollout(model, context, 4, num_chunks=4, config=rc, prompts=[(2, context)])
  np.testing.assert_array_equal(np.asarray(base), np.asarray(same))
  sw, carry = asvd.rollout(model, context, 4, num_chunks=4, config=rc, prompts=[(2, other)])
  np.testing.assert_array_equal(np.asarray(sw[:, :6]), np.asarray(base[:, :6]))  # before the switch
  assert not np.allclose(np.asarray(sw[:, 6:]), np.asarray(base[:, 6:]))
  np.testing.assert_allclose(np.asarray(carry[1].text.k), np.asarray(model.text_kv(other).k), atol=1e-6)
  streamed = list(asvd.stream(model, context, 4, config=rc, prompts=[(2, other)], num_chunks=4))
  np.testing.assert_array_equal(np.asarray(sw), np.concatenate(streamed, axis=1))


def test_resume_from_carry(model, context, cfg):
  rc = rcfg(cfg)
  full, _ = asvd.rollout(model, context, 8, num_chunks=4, config=rc)
  first, carry = asvd.rollout(model, context, 8, num_chunks=2, config=rc)
  rest, _ = asvd.rollout(model, context, 8, num_chunks=2, config=rc, carry=carry, start_chunk=2)
  np.testing.assert_array_equal(np.asarray(full), np.concatenate([first, rest], axis=1))


def test_probe_attention_share(model, context, cfg):
  rc = rcfg(cfg, probe=True)
  lat, _, share = asvd.rollout(model, context, 0, num_chunks=3, config=rc)
  chex.assert_shape(share, (3, cfg.model.num_layers, 2, 4 + 4))
  np.testing.assert_allclose(np.asarray(share.sum(-1)), 1.0, atol=1e-5)
  assert float(share[0, :, :, :4].max()) == 0.0  # nothing valid in the cache at chunk 0
  assert float(share[1, :, :, 0].min()) > 0.0  # the state slot is attended from chunk 1 on


def test_bad_rollout_config_errors(model, context, cfg):
  for kw, msg in (
    ({"anchor": "nope"}, "rollout.anchor"),
    ({"positions": "absolute"}, "anchor='none'"),
    ({"anchor": "ema", "state_frames": 2}, "state_frames=1"),
    ({"latent_hw": (7, 8)}, "latent_hw"),
    ({"state_position": "x"}, "state_position"),
  ):
    with pytest.raises(ValueError, match=msg):
      asvd.make_transition(model, context, config=rcfg(cfg, **kw))
  _, _, trans = asvd.make_transition(model, context, config=rcfg(cfg))
  with pytest.raises(ValueError, match="noise has shape"):
    s, c, _ = asvd.make_transition(model, context, config=rcfg(cfg))
    trans(s, c, jnp.zeros((4, 2, 3, 8, 8, 16)))
  with pytest.raises(ValueError, match="context must be"):
    asvd.rollout(model, context[..., :5], 0, num_chunks=1, config=rcfg(cfg))


def test_rollout_on_2x4_mesh_matches_single_device(model, cfg, context):
  ctx = context
  rc = rcfg(cfg, scan_chunks=2)
  single, _ = asvd.rollout(model, ctx, 5, num_chunks=2, config=rc)
  mesh = shard_lib.make_mesh((2, 4), ("data", "model"))  # batch over data, rest replicated
  sharded, carry = asvd.rollout(model, ctx, 5, num_chunks=2, config=rc, mesh=mesh)
  assert carry[1].k.sharding.spec[1] == "data"  # the batch axis of the cache is sharded
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=1e-5)


def test_block_causal_mask_helper():
  m = dit_lib.block_causal_mask(5, 2, first=1)
  np.testing.assert_array_equal(
    m.astype(int),
    [[1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]],
  )


def test_prefill_conditions_like_generated_frames(model, context, cfg):
  """Prefilling generated frames reproduces the cache (and the continuation) of the rollout."""
  for anchor in ("sink", "none", "adaptive"):
    rc = rcfg(cfg, anchor=anchor)
    lat, (state, cache) = asvd.rollout(model, context, 2, num_chunks=2, config=rc)
    st, pc = asvd.prefill(model, context, lat, config=rc)
    lay = tr.make_layout(rc, model.cfg, None, cfg.sampler)
    t = lay.tokens
    # window slots: identical K/V when the frames are the same (sink: also the anchor)
    fs = lay.state_frames
    if anchor != "adaptive":  # adaptive: the window frames attended to the generated state
      np.testing.assert_allclose(np.asarray(pc.k[:, :, fs * t :]), np.asarray(cache.k[:, :, fs * t :]), atol=2e-4, rtol=1e-3)
    np.testing.assert_array_equal(np.asarray(pc.valid), np.asarray(cache.valid))
    if anchor == "sink":
      np.testing.assert_allclose(np.asarray(pc.k[:, :, :t]), np.asarray(cache.k[:, :, :t]), atol=2e-4, rtol=1e-3)
      cont_a, _ = asvd.rollout(model, context, 2, num_chunks=1, config=rc, carry=(state, cache), start_chunk=2)
      cont_b, _ = asvd.rollout(model, context, 2, num_chunks=1, config=rc, carry=(st, pc), start_chunk=2)
      np.testing.assert_allclose(np.asarray(cont_a), np.asarray(cont_b), atol=1e-3, rtol=1e-3)
    if anchor == "adaptive":
      np.testing.assert_array_equal(np.asarray(st), np.asarray(lat[:, -1:]))
  # a single image (fewer frames than a chunk) is a valid condition
  img = jax.random.normal(jax.random.key(3), (2, 1, 8, 8, 16))
  st, pc = asvd.prefill(model, context, img, config=rcfg(cfg))
  np.testing.assert_array_equal(np.asarray(pc.valid[0]), [True, False, False, True])
  out = list(asvd.stream(model, context, 0, config=rcfg(cfg), carry=(st, pc), num_chunks=1))
  assert out[0].shape == (2, 3, 8, 8, 16)


def test_recache_on_switch_reencodes_window_only(model, context, cfg):
  other = jax.random.normal(jax.random.key(42), context.shape)
  rc = rcfg(cfg, anchor="sink", sink_in_window=True, recache_on_switch=True)  # every window frame valid
  lat_rc, (_, c_rc) = asvd.rollout(model, context, 4, num_chunks=2, config=rc, prompts=[(1, other)])
  _, (_, c0) = asvd.rollout(model, context, 4, num_chunks=1, config=rc)
  lay = tr.make_layout(rc, model.cfg, None, cfg.sampler)
  t = lay.tokens
  # By hand: chunk 0's frames (the window) re-run at t=0 under the new prompt, attending to the
  # sink and to each other.
  text = model.text_kv(other)
  slots = c0.replace(valid=c0.valid.at[:, 1:].set(False)).slots(jnp.arange(4))
  _, aux = model(c0.lat[:, 1:], jnp.zeros((2, 3)), text, positions=jnp.arange(1, 4), slots=slots, return_kv=True)
  recached = tr.recache(model, lay, c0, text)
  np.testing.assert_allclose(np.asarray(recached.k[:, :, t:]), np.asarray(aux["k"]), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(recached.k[:, :, :t]), np.asarray(c0.k[:, :, :t]))  # sink kept
  np.testing.assert_array_equal(np.asarray(c0.lat[:, 1:]), np.asarray(lat_rc[:, :3]))  # lat = the frames
  # The rollout with recache differs after the switch from the one without.
  lat_plain, _ = asvd.rollout(model, context, 4, num_chunks=2, config=rcfg(cfg, anchor="sink", sink_in_window=True), prompts=[(1, other)])
  np.testing.assert_array_equal(np.asarray(lat_rc[:, :3]), np.asarray(lat_plain[:, :3]))
  assert not np.allclose(np.asarray(lat_rc[:, 3:]), np.asarray(lat_plain[:, 3:]))
  assert bool(c_rc.valid.all())


def test_make_transition_with_mesh_shardings(model, cfg, context):
  ctx = context
  s0, c0, single = asvd.make_transition(model, ctx, config=rcfg(cfg))
  mesh = shard_lib.make_mesh((2, 4), ("data", "model"))
  s1, c1, sharded = asvd.make_transition(model, ctx, config=rcfg(cfg), mesh=mesh)
  noise = noise_for(single, seed=4)
  a = single(s0, c0, noise)
  b = sharded(s1, c1, noise)
  assert b[1].k.sharding.spec[1] == "data" and b[2].sharding.spec[0] == "data"
  chex.assert_trees_all_close(a, b, atol=1e-5, rtol=1e-5)
