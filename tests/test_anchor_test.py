"""The counterfactual anchor test (asvd/eval/anchor_test.py) on the tiny config: the swap moves
exactly the anchor slots, the blank masks exactly them, and each continuation changes the video
by a measured amount against the same continuation left alone."""

import jax
import numpy as np
import pytest
from rollout_helpers import rcfg

import asvd
from asvd.eval import anchor_test


def _carry(model, context, cfg, anchor, seed, chunks=3):
  return asvd.rollout(model, context, jax.random.key(seed), num_chunks=chunks, config=rcfg(cfg, anchor=anchor))[1]


@pytest.mark.parametrize("anchor", ["adaptive", "sink", "ema"])
def test_swap_moves_exactly_the_anchor_slots(model, context, cfg, anchor):
  own = _carry(model, context, cfg, anchor, 0)
  donor = _carry(model, context[::-1], cfg, anchor, 1)
  state, cache = anchor_test.swap_anchor(own, donor, 1)
  (_, o), (d_state, d) = own, donor
  n = o.k.shape[2] // o.num_slots  # one anchor slot: its tokens lead the token axis
  for name in ("k", "v"):
    a, b, c = (np.asarray(getattr(x, name)) for x in (cache, o, d))
    np.testing.assert_array_equal(a[:, :, :n], c[:, :, :n])
    np.testing.assert_array_equal(a[:, :, n:], b[:, :, n:])
    assert not np.array_equal(b[:, :, :n], c[:, :, :n])  # the two scenes' anchors differ
  np.testing.assert_array_equal(np.asarray(cache.lat)[:, 1:], np.asarray(o.lat)[:, 1:])
  np.testing.assert_array_equal(np.asarray(cache.lat)[:, :1], np.asarray(d.lat)[:, :1])
  np.testing.assert_array_equal(np.asarray(cache.valid), np.concatenate([np.asarray(d.valid)[:, :1], np.asarray(o.valid)[:, 1:]], 1))
  for name in ("acc_k", "acc_v"):
    np.testing.assert_array_equal(np.asarray(getattr(cache, name)), np.asarray(getattr(d, name)))
  np.testing.assert_array_equal(np.asarray(state), np.asarray(d_state))
  np.testing.assert_array_equal(np.asarray(cache.text.k), np.asarray(o.text.k))  # the prompt stays


def test_blank_masks_exactly_the_anchor_slots(model, context, cfg):
  own = _carry(model, context, cfg, "sink", 0)
  _, cache = anchor_test.blank_anchor(own, 1)
  valid = np.asarray(own[1].valid)
  assert valid[:, 0].all() and not np.asarray(cache.valid)[:, 0].any()
  np.testing.assert_array_equal(np.asarray(cache.valid)[:, 1:], valid[:, 1:])
  np.testing.assert_array_equal(np.asarray(cache.k), np.asarray(own[1].k))


@pytest.mark.parametrize("anchor", ["adaptive", "sink"])
def test_counterfactual_measures_each_change_against_the_untouched_continuation(model, context, cfg, anchor):
  rc = rcfg(cfg, anchor=anchor)
  r = anchor_test.counterfactual(model, context, context[::-1], jax.random.key(3), at_chunk=2, chunks_after=2, config=rc, sampler_config=cfg.sampler, to_pixels=np.asarray)
  assert set(r) == set(anchor_test.VARIANTS)
  for name, x in r.items():
    assert x.shape == (context.shape[0], 2) and (x > 1e-4).all(), (name, x)
  # The untouched continuation is the uninterrupted rollout's next chunks (the same noise).
  _, videos = anchor_test.counterfactual(model, context, context[::-1], jax.random.key(3), at_chunk=2, chunks_after=2, config=rc, sampler_config=cfg.sampler, to_pixels=np.asarray, return_videos=True)
  lat, _ = asvd.rollout(model, context, jax.random.key(3), num_chunks=4, config=rc)
  f = int(rc.chunk_frames)
  np.testing.assert_array_equal(videos["base"], np.asarray(lat)[:, 2 * f :])
  np.testing.assert_allclose(np.abs(videos["noise"] - videos["base"]).reshape(2, 2, -1).mean(-1), r["noise"], rtol=1e-6)


def test_anchor_test_refuses_modes_without_an_anchor(model, context, cfg):
  assert not anchor_test.has_anchor(rcfg(cfg, anchor="none")) and anchor_test.has_anchor(rcfg(cfg, anchor="ema"))
  with pytest.raises(ValueError, match="needs anchor slots"):
    anchor_test.counterfactual(model, context, context, jax.random.key(0), at_chunk=1, chunks_after=1, config=rcfg(cfg, anchor="none"), sampler_config=cfg.sampler, to_pixels=np.asarray)
