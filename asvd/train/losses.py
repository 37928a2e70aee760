"""Losses of the training stages: flow matching, teacher forcing, DMD with horizon weighting.

Flow matching (Wan): `x_t = (1 - sigma) x0 + sigma eps`, the model predicts `v = eps - x0` at
timestep `1000 sigma`, so `x0 = x_t - sigma v`. Training sigmas are drawn uniformly and shifted,
`s sigma / (1 + (s - 1) sigma)` (shift `s = sampler.shift`), then clamped to
`[train.min_sigma, train.max_sigma]` for DMD as Self-Forcing does (0.02, 0.98).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shifted_sigma(key: jax.Array, shape, shift: float, lo: float = 0.0, hi: float = 1.0) -> jax.Array:
  """Uniform sigmas, shifted toward noise, clamped to `[lo, hi]`."""
  u = jax.random.uniform(key, shape, jnp.float32)
  s = shift * u / (1.0 + (shift - 1.0) * u)
  return jnp.clip(s, lo, hi)


def noised(x0, eps, sigma):
  """`x_t` for sigmas per sample `[B]` or per frame `[B, F]` (broadcast over the rest)."""
  s = sigma.reshape(*sigma.shape, *([1] * (x0.ndim - sigma.ndim)))
  return (1.0 - s) * x0 + s * eps


def flow_matching_loss(predict, x0, key: jax.Array, shift: float, frame_noise_prob: float = 0.0):
  """Mean squared error of the flow (`eps - x0`) at a random shifted sigma per sample.

  Args:
    predict: `(x_t [B, F, ...], t [B, F]) -> v`, the model's flow prediction.
    x0: clean latents `[B, F, H, W, C]`.
    key: randomness (sigma and eps).
    shift: the sigma shift.
    frame_noise_prob: the share of samples whose frames each get their own sigma (Diffusion
      Forcing's noise): cleaner frames beside noisier ones, so the model learns early to carry
      content from frame to frame (motion); the others share one sigma, as sampling does.
  """
  k1, k2, k3, k4 = jax.random.split(key, 4)
  b, f = x0.shape[:2]
  sigma_bf = jnp.broadcast_to(shifted_sigma(k1, (b,), shift)[:, None], (b, f))
  if frame_noise_prob > 0:
    own = jax.random.bernoulli(k4, frame_noise_prob, (b,))
    sigma_bf = jnp.where(own[:, None], shifted_sigma(k3, (b, f), shift), sigma_bf)
  eps = jax.random.normal(k2, x0.shape, jnp.float32)
  v = predict(noised(x0, eps, sigma_bf), 1000.0 * sigma_bf)
  return jnp.mean(jnp.square(v.astype(jnp.float32) - (eps - x0)))


def horizon_weights(window_ends, horizon: int, alpha: float) -> jax.Array:
  """`w(e) = (e / H) ** alpha` for windows ending at latent frame `e`, normalised to mean 1."""
  e = jnp.asarray(window_ends, jnp.float32)
  w = (e / float(horizon)) ** alpha
  return w / jnp.mean(w)


def window_starts(total_frames: int, horizon: int, chunk_frames: int) -> list[int]:
  """Start frames of the `H`-frame windows the teacher scores: one window ending at every chunk
  boundary from `H` on (a rollout shorter than `H` is one window of all of it)."""
  h = min(horizon, total_frames)
  ends = range(h, total_frames + 1, chunk_frames) if total_frames >= h else [total_frames]
  starts = [e - h for e in ends]
  if starts[-1] != total_frames - h:
    starts.append(total_frames - h)
  return starts


def dmd_gradient(x, x0_fake, x0_real):
  """Self-Forcing's DMD direction `(x0_fake - x0_real) / mean|x - x0_real|` (per sample; NaNs 0)."""
  axes = tuple(range(1, x.ndim))
  norm = jnp.mean(jnp.abs(x - x0_real), axis=axes, keepdims=True)
  g = (x0_fake - x0_real) / norm
  return jnp.nan_to_num(g)


def dmd_loss(x, grad):
  """`0.5 * mean(||x - sg(x - grad)||^2)`: its gradient w.r.t. `x` is `grad / numel`."""
  target = jax.lax.stop_gradient(x - grad)
  return 0.5 * jnp.mean(jnp.square(x - target))


__all__ = [
  "shifted_sigma",
  "noised",
  "flow_matching_loss",
  "horizon_weights",
  "window_starts",
  "dmd_gradient",
  "dmd_loss",
]
