"""Pans over random fields: the PanWorld teacher's motion warm-up (`train.teacher.motion_warmup`).

A clip here is a smooth random latent field (every channel independent Gaussian noise, blurred
`blur` times by a 3-tap box filter along each axis, then normalised to zero mean and unit
variance), seen through a window that moves by a random PanWorld caption's camera velocity in
whole tokens per frame. Nothing in such a clip can be predicted from its caption except the
motion, and nothing in one frame predicts the next except by following that motion. A teacher
trained on it first learns to take direction and speed from the text and to copy content along
them, and it keeps that on PanWorld, where the world's look alone lets a teacher ignore the
direction for thousands of steps (README "PanWorld": without the warm-up, a 4,000-step teacher
at whole-token speeds still denoised the same with every caption's direction reversed).
"""

from __future__ import annotations

import numpy as np

from asvd.data import panworld
from asvd.errors import UsageError

BLUR = 3  # box-filter passes: structures a few tokens wide, so a shift by 1-2 tokens is visible


def field_clip(rng: np.random.Generator, velocity: tuple[int, int], frames: int, hw: tuple[int, int], channels: int, blur: int = BLUR) -> np.ndarray:
  """float32 `[frames, h, w, channels]`: a window moving by `velocity` (whole tokens per frame,
  `(dy, dx)`, the camera's; the field moves the other way) over a fresh random field."""
  (dy, dx), (h, w) = velocity, hw
  my, mx = abs(dy) * (frames - 1), abs(dx) * (frames - 1)  # room for the window's whole path
  pad = blur  # np.roll wraps around: keep the window `blur` tokens off the field's edges
  f = rng.standard_normal((h + 2 * (my + pad), w + 2 * (mx + pad), channels)).astype(np.float32)
  for axis in (0, 1):
    for _ in range(blur):
      f = (np.roll(f, 1, axis) + f + np.roll(f, -1, axis)) / 3.0
  f = (f - f.mean()) / f.std()
  y0, x0 = my + pad, mx + pad
  return np.stack([f[y0 + dy * t : y0 + dy * t + h, x0 + dx * t : x0 + dx * t + w] for t in range(frames)])


class FieldSource:
  """Random-access field pans `{"latents": [T, h, w, C], "text": [L, D], "caption"}`: example `i`
  is a fixed draw (caption, field) from `seed`, so a resumed run reads the same clips."""

  def __init__(self, clips: int, frames: int, latent_hw, channels: int, token_speeds: dict, table: dict, seed: int, blur: int = BLUR):
    self._n, self._frames, self._hw, self._channels = int(clips), int(frames), tuple(latent_hw), int(channels)
    self._speeds, self._table, self._seed, self._blur = token_speeds, table, int(seed), int(blur)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i):
    rng = np.random.default_rng((self._seed, int(i)))
    spec = panworld.sample_spec(rng)
    lat = field_clip(rng, spec.velocity(self._speeds), self._frames, self._hw, self._channels, self._blur)
    return {"latents": lat, "text": self._table[spec.caption], "caption": spec.caption}


def token_speeds(config) -> dict[str, int]:
  """PanWorld's camera speeds in latent positions per frame (what `field_clip` shifts by). Data
  other than PanWorld, or speeds that are not whole DiT tokens (e.g. the default 1 and 2 pixels
  with 2x2-pixel tokens: a field cannot move by part of a token), are one UsageError."""
  from asvd.models import pixel_codec  # noqa: PLC0415

  if config.train.data.name != "panworld":
    raise UsageError(f"train.teacher.motion_warmup warms a PanWorld teacher up on its captions' motion; train.data.name={config.train.data.name!r} has no such captions")
  codec = pixel_codec.from_config(config)
  latent_px = codec.patch if codec is not None else 0  # pixels per latent position
  token_px = latent_px * max(int(config.model.patch_size[1]), int(config.model.patch_size[2]))  # pixels per DiT token
  px = panworld.world(config)["speeds"]
  if token_px < 1 or any(v % token_px for v in px.values()):
    raise UsageError(
      f"train.teacher.motion_warmup pans fields by whole tokens: train.data.world_speeds={tuple(px.values())} pixels per frame"
      f" are not multiples of the {token_px}-pixel token (pipeline.pixel_patch x model.patch_size); e.g. world_speeds=({token_px}, {2 * token_px})"
    )
  return {k: v // latent_px for k, v in px.items()}


def warmup_source(config, latent_hw, data_dir: str) -> FieldSource:
  """The field pans of a PanWorld config (`train.data`'s clips, frames and seed; its captions'
  embeddings from the data's text path, written under `data_dir`)."""
  d, m = config.train.data, config.model
  speeds = token_speeds(config)
  table = panworld.caption_table(config, data_dir)
  return FieldSource(int(d.clips), int(d.frames), latent_hw, int(m.in_channels), speeds, table, int(d.seed) + 1)


__all__ = ["BLUR", "FieldSource", "field_clip", "token_speeds", "warmup_source"]
