"""3D rotary position embedding of Wan (interleaved pairs, separate ladders for t, h, w).

Each head's `Dh` channels are split into three groups for the temporal, height and width
axes: `h = w = 2 * (Dh // 6)` channels and `t = Dh - h - w` (44/42/42 for Dh = 128). Each group
rotates adjacent channel pairs `(2i, 2i+1)` as one complex number by `pos * theta^(-2i/n)`,
with `n` the group's channel count. Angles come from a float64 table (as the reference code
computes them) indexed by the caller's explicit per-token `(t, h, w)` indices.

Keys in the KV cache are stored un-rotated; `apply_rope` is applied at read time with whatever
indices the caller gives, so relative time is just a choice of indices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def axis_dims(head_dim: int) -> tuple[int, int, int]:
  """Channels per axis (t, h, w) for one head, as Wan splits them."""
  hw = 2 * (head_dim // 6)
  return head_dim - 2 * hw, hw, hw


@functools.lru_cache(maxsize=16)
def _tables(head_dim: int, max_pos: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
  """cos/sin tables `[3, max_pos, Dh // 2]` (float64 math, float32 storage).

  Row a holds the axis-a angles in that axis' own channel-pair slots and zeros elsewhere (so
  cos = 1, sin = 0: no rotation), which lets `rope_angles` sum the three axes with one gather.
  """
  dims = axis_dims(head_dim)
  pos = np.arange(max_pos, dtype=np.float64)
  cos = np.ones((3, max_pos, head_dim // 2))
  sin = np.zeros((3, max_pos, head_dim // 2))
  start = 0
  for a, n in enumerate(dims):
    inv = 1.0 / theta ** (np.arange(0, n, 2, dtype=np.float64) / n)  # [n/2]
    ang = np.outer(pos, inv)  # [max_pos, n/2]
    cos[a, :, start : start + n // 2] = np.cos(ang)
    sin[a, :, start : start + n // 2] = np.sin(ang)
    start += n // 2
  return cos.astype(np.float32), sin.astype(np.float32)


def rope_cos_sin(ids: jax.Array, head_dim: int, *, max_pos: int = 1024, theta: float = 10000.0):
  """cos and sin for explicit per-token indices.

  Args:
    ids: int `[..., S, 3]` (t, h, w) index of every token; each must be in [0, max_pos).
    head_dim: channels per head.
    max_pos: positions per axis in the table (Wan: 1024).
    theta: RoPE base.

  Returns:
    `(cos, sin)`, each float32 `[..., S, Dh // 2]`.
  """
  cos_t, sin_t = _tables(head_dim, max_pos, float(theta))
  cos_t, sin_t = jnp.asarray(cos_t), jnp.asarray(sin_t)
  # Each axis only touches its own pair slots, so the product of the three per-axis rotations is
  # a plain product of cos/sin factors where at most one factor differs from the identity.
  cos = cos_t[0][ids[..., 0]] * cos_t[1][ids[..., 1]] * cos_t[2][ids[..., 2]]
  sin = sin_t[0][ids[..., 0]] + sin_t[1][ids[..., 1]] + sin_t[2][ids[..., 2]]
  return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates adjacent channel pairs of `x` `[B, S, H, Dh]` by angles given as `[B|1, S, Dh/2]`
  (or `x` `[B, F, T, H, Dh]` by `[B|1, F, T, Dh/2]`)."""
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  x1, x2 = xf[..., 0], xf[..., 1]  # [..., H, Dh/2]
  c, s = cos[..., None, :], sin[..., None, :]
  out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def grid_ids(frame_pos: jax.Array, hp: int, wp: int) -> jax.Array:
  """Per-token (t, h, w) indices for frames at temporal indices `frame_pos`.

  Args:
    frame_pos: int `[F]` or `[B, F]` temporal index of each latent frame (after patching).
    hp: patches along height.
    wp: patches along width.

  Returns:
    int32 `[F * hp * wp, 3]` or `[B, F * hp * wp, 3]`, tokens ordered frame-major, then h, w.
  """
  frame_pos = jnp.asarray(frame_pos, jnp.int32)
  lead = frame_pos.shape[:-1]
  f = frame_pos.shape[-1]
  t = jnp.broadcast_to(frame_pos[..., :, None, None], (*lead, f, hp, wp))
  h = jnp.broadcast_to(jnp.arange(hp, dtype=jnp.int32)[:, None], (*lead, f, hp, wp))
  w = jnp.broadcast_to(jnp.arange(wp, dtype=jnp.int32)[None, :], (*lead, f, hp, wp))
  return jnp.stack([t, h, w], axis=-1).reshape(*lead, f * hp * wp, 3)
