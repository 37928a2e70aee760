"""The few-step flow-matching schedule of Self-Forcing (shift 5, warped timesteps).

Flow matching: `x_t = (1 - sigma) x0 + sigma eps`, the model predicts `v = eps - x0`, so
`x0 = x_t - sigma v`. The scheduler's table holds 1000 sigmas linearly spaced from 1 down to
1/1000 (the trailing 0 dropped), shifted by `s sigma / (1 + (s - 1) sigma)`; timesteps are
`1000 sigma`. "Warping" a nominal timestep t picks table entry `1000 - t`, so the default
[1000, 750, 500, 250] become [1000, 937.5, 833.33, 625] (sigmas 1, 0.9375, 0.8333, 0.625).
"""

from __future__ import annotations

import numpy as np


def shifted_sigma_table(shift: float, num_train_timesteps: int = 1000) -> np.ndarray:
  """`[N]` float64 shifted sigmas, from 1 down to the smallest (N = num_train_timesteps)."""
  sig = np.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=np.float64)[:-1]
  return shift * sig / (1.0 + (shift - 1.0) * sig)


def denoising_timesteps(cfg) -> np.ndarray:
  """The model-conditioning timesteps of the few-step sampler (`sampler` config section)."""
  ts = np.asarray(cfg.timesteps, np.float64)
  n = int(cfg.num_train_timesteps)
  if cfg.warp:
    table = shifted_sigma_table(float(cfg.shift), n) * n
    idx = (n - ts).astype(np.int64)
    if idx.min() < 0 or idx.max() >= n:
      raise ValueError(f"sampler.timesteps {tuple(cfg.timesteps)} must lie in (0, {n}] to be warped")
    return table[idx]
  return ts


def sigma_of(t: np.ndarray | float, cfg) -> np.ndarray:
  """Sigma of a timestep by nearest entry of the shifted table (as the reference scheduler)."""
  n = int(cfg.num_train_timesteps)
  table = shifted_sigma_table(float(cfg.shift), n)
  t = np.atleast_1d(np.asarray(t, np.float64))
  return table[np.abs(table[None, :] * n - t[:, None]).argmin(-1)]


def step_sigmas(cfg) -> tuple[np.ndarray, np.ndarray]:
  """`(timesteps [steps], sigmas [steps])`, float32-ready."""
  ts = denoising_timesteps(cfg)
  return ts, sigma_of(ts, cfg)
