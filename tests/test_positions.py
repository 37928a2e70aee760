"""`rollout.positions="absolute_rolling"`: the peers' sink positions (the sink keeps its frame
index while the window's and the chunk's grow), beside asvd's relative time."""

import jax
import numpy as np
import pytest
from rollout_helpers import rcfg

import asvd
from asvd import transition as tr
from asvd.errors import UsageError


def test_the_sink_keeps_its_index_while_the_chunks_grow(model, cfg):
  lay = tr.make_layout(rcfg(cfg, anchor="sink", positions="absolute_rolling"), model.cfg)
  rel = tr.make_layout(rcfg(cfg, anchor="sink"), model.cfg)
  _, cache = tr.empty_carry(model, model.text_kv(np.zeros((1, 16, 32), np.float32)), lay)
  for c, (slots, z) in {0: ([0, 0, 0, 0], [0, 1, 2]), 1: ([0, 0, 1, 2], [3, 4, 5]), 7: ([0, 18, 19, 20], [21, 22, 23])}.items():
    s, zz = tr._positions(lay, cache.replace(chunk=np.int32(c)))
    assert (np.asarray(s).tolist(), np.asarray(zz).tolist()) == (slots, z), c
    # Relative time: the same layout at every chunk.
    s, zz = tr._positions(rel, cache.replace(chunk=np.int32(c)))
    assert (np.asarray(s).tolist(), np.asarray(zz).tolist()) == ([0, 1, 2, 3], [4, 5, 6])


def test_without_a_sink_absolute_positions_change_nothing(model, context, cfg):
  """RoPE attention depends only on distances: with no anchor, the window and chunk at absolute
  indices attend exactly as at the relative ones, chunk after chunk."""
  rel, _ = asvd.rollout(model, context, jax.random.key(2), num_chunks=5, config=rcfg(cfg, anchor="none"))
  ab, _ = asvd.rollout(model, context, jax.random.key(2), num_chunks=5, config=rcfg(cfg, anchor="none", positions="absolute_rolling"))
  np.testing.assert_allclose(np.asarray(ab), np.asarray(rel), atol=2e-4)


def test_with_a_sink_only_the_sinks_distance_differs(model, context, cfg):
  rel, _ = asvd.rollout(model, context, jax.random.key(2), num_chunks=4, config=rcfg(cfg, anchor="sink"))
  ab, _ = asvd.rollout(model, context, jax.random.key(2), num_chunks=4, config=rcfg(cfg, anchor="sink", positions="absolute_rolling"))
  rel, ab = np.asarray(rel), np.asarray(ab)
  np.testing.assert_allclose(ab[:, :3], rel[:, :3], atol=2e-5)  # chunk 0: no slot yet
  assert np.abs(ab[:, 6:] - rel[:, 6:]).max() > 1e-3  # later: the sink is farther away


def test_absolute_rolling_checks(model, context, cfg):
  with pytest.raises(UsageError, match="anchor to 'sink' or 'none'"):
    tr.make_layout(rcfg(cfg, anchor="adaptive", positions="absolute_rolling"), model.cfg)
  small = model.cfg.rope_max_seq_len // 3
  with pytest.raises(UsageError, match="rope_max_seq_len"):
    asvd.rollout(model, context, jax.random.key(0), num_chunks=small + 1, config=rcfg(cfg, anchor="sink", positions="absolute_rolling"))
  s = asvd.stream(model, context, jax.random.key(0), config=rcfg(cfg, anchor="sink", positions="absolute_rolling"), start_chunk=small - 1)
  next(s)  # the last chunk that fits
  with pytest.raises(UsageError, match="rope_max_seq_len"):
    next(s)
