"""The counterfactual anchor test: how much does a model use what its anchor slots hold?

A rollout is stopped after `at_chunk` chunks and continued for `chunks_after` more in four ways
that differ only in one thing:

* `base`: as it was (the same noise as the uninterrupted rollout);
* `swap`: the anchor slots (keys, values, validity, latents, the EMA accumulators and the state)
  hold another scene's, taken from a rollout of a donor caption to the same chunk;
* `blank`: the anchor slots are masked for the next chunk, as if the mode had none (what the
  mode then writes into them is its own rule: `sink` refills them from that chunk, `adaptive`
  writes its new state);
* `noise`: nothing in the cache changes, the continuation draws other noise.

Each change is the mean absolute pixel difference (0..255) of a continuation from `base`. The
noise change is the yardstick: a model whose anchor is a primary scene reference changes more
under `swap` than under a new noise draw; one that ignores its anchor changes by 0.
"""

from __future__ import annotations

import jax
import numpy as np

# fold_in tags of the donor rollout's and the noise continuation's keys (any fixed, distinct ints).
_DONOR, _OTHER_NOISE = 7919, 104729
VARIANTS = ("swap", "blank", "noise")


def swap_anchor(carry, donor, state_frames: int):
  """`carry` with its anchor slots (the first `state_frames` slots of every per-slot leaf, the
  EMA accumulators and the state) taken from `donor`; the window and the text stay.

  Args:
    carry: `(state, cache)` of a rollout.
    donor: `(state, cache)` of another rollout with the same shapes.
    state_frames: `Fs`, the anchor slots.

  Returns:
    The new `(state, cache)`.
  """
  (_, cache), (d_state, d_cache) = carry, donor
  fs = int(state_frames)
  tokens = cache.k.shape[2] // cache.num_slots
  n = fs * tokens  # anchor tokens lead the k/v token axis

  def lead(a, b, axis, count):
    idx = [slice(None)] * a.ndim
    idx[axis] = slice(0, count)
    return a.at[tuple(idx)].set(b[tuple(idx)])

  cache = cache.replace(
    k=lead(cache.k, d_cache.k, 2, n),
    v=lead(cache.v, d_cache.v, 2, n),
    valid=lead(cache.valid, d_cache.valid, 1, fs),
    lat=lead(cache.lat, d_cache.lat, 1, fs),
    acc_k=d_cache.acc_k,
    acc_v=d_cache.acc_v,
  )
  return d_state, cache


def blank_anchor(carry, state_frames: int):
  """`carry` with its anchor slots masked (invalid); everything else unchanged."""
  state, cache = carry
  return state, cache.replace(valid=cache.valid.at[:, : int(state_frames)].set(False))


def has_anchor(config) -> bool:
  """Whether the anchor test applies: relative positions and a mode with anchor slots."""
  return config.positions != "absolute" and config.anchor != "none" and int(config.state_frames) > 0


def counterfactual(model, context, donor_context, key, *, at_chunk: int, chunks_after: int, config, sampler_config, to_pixels, return_videos: bool = False):
  """Runs the four continuations (module docstring) and measures their change from `base`.

  Args:
    model: the `WanDiT`.
    context: text embeddings `[B, L, D]`.
    donor_context: the donor captions' embeddings `[B, L, D]` (another scene per video).
    key: the rollout's key (the same one gives the uninterrupted rollout's noise).
    at_chunk: chunks generated before the intervention (>= 1).
    chunks_after: chunks generated after it.
    config: the `rollout` section (a mode with anchor slots, `has_anchor`).
    sampler_config: the `sampler` section.
    to_pixels: latents `[B, T, h, w, C]` -> uint8 frames `[B, T', H, W, 3]`.
    return_videos: also return the continuations' frames.

  Returns:
    `{variant: float [B, chunks_after]}`: per video and chunk after the intervention, the mean
    absolute pixel difference from `base` (0..255), for `swap`, `blank` and `noise`; with
    `return_videos`, `(changes, {"base" and each variant: frames})`.
  """
  import asvd  # noqa: PLC0415

  if not has_anchor(config):
    raise ValueError(f"the anchor test needs anchor slots: anchor={config.anchor!r}, positions={config.positions!r}")
  if at_chunk < 1 or chunks_after < 1:
    raise ValueError(f"the anchor test needs at_chunk >= 1 and chunks_after >= 1, got {at_chunk} and {chunks_after}")
  rc = config.copy_and_resolve_references()
  rc.probe = False
  kw = dict(config=rc, sampler_config=sampler_config, memory_check=False)
  _, carry = asvd.rollout(model, context, key, num_chunks=at_chunk, **kw)
  _, donor = asvd.rollout(model, donor_context, jax.random.fold_in(key, _DONOR), num_chunks=at_chunk, **kw)
  fs = int(rc.state_frames)

  def go(c, k):
    lat, _ = asvd.rollout(model, context, k, num_chunks=chunks_after, carry=c, start_chunk=at_chunk, **kw)
    return np.asarray(to_pixels(lat), np.float64)

  base = go(carry, key)
  runs = {"swap": go(swap_anchor(carry, donor, fs), key), "blank": go(blank_anchor(carry, fs), key), "noise": go(carry, jax.random.fold_in(key, _OTHER_NOISE))}
  b, t = base.shape[:2]
  per_chunk = t // chunks_after
  changes = {name: np.abs(x - base).reshape(b, chunks_after, per_chunk, -1).mean((2, 3)) for name, x in runs.items()}
  return (changes, {"base": base, **runs}) if return_videos else changes


__all__ = ["swap_anchor", "blank_anchor", "has_anchor", "counterfactual", "VARIANTS"]
