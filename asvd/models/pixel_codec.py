"""An exact "VAE" for pixel-space models: space-to-depth.

Small procedural datasets (PanWorld, asvd/data/panworld.py) need no learned autoencoder: each
`p x p` patch of RGB pixels becomes one latent position with `3 p^2` channels, scaled so the
channels of the data have about unit scale (pixels in [-1, 1] times `scale`). It is invertible
(decode(encode(x)) == x up to float rounding), has no temporal compression (one latent frame per
video frame), and offers the streaming interface the pipeline uses for the Wan VAE and TAEHV
(`init_decode_cache` / `decode_chunk`, `encode`, `decode`, `latent_channels`), so rollouts,
`asvd generate --vae`-style decoding and the training data path treat it like any decoder.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class PixelCodec:
  """Space-to-depth by `patch` pixels, latents = pixels in [-1, 1] times `scale`."""

  patch: int = 4
  scale: float = 1.0

  def __post_init__(self):
    if self.patch < 1 or self.scale <= 0:
      raise ValueError(f"PixelCodec(patch={self.patch}, scale={self.scale}): patch must be >= 1 and scale > 0")

  @property
  def latent_channels(self) -> int:
    return 3 * self.patch * self.patch

  @property
  def spatial_factor(self) -> int:
    return self.patch

  def encode(self, x_bthwc):
    """Pixels `[B, T, H, W, 3]` in [-1, 1] (H, W multiples of `patch`) -> latents
    `[B, T, H/p, W/p, 3 p^2]` (the patch's rows, then columns, then RGB, fastest last). A
    numpy input gives a numpy output (no device work: data pipelines call it per example)."""
    xp = np if isinstance(x_bthwc, np.ndarray) else jnp
    x = xp.asarray(x_bthwc, xp.float32)
    b, t, h, w, c = x.shape
    p = self.patch
    if h % p or w % p or c != 3:
      raise ValueError(f"PixelCodec.encode: pixels {x.shape} need H, W multiples of {p} and 3 channels")
    z = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
    return z.reshape(b, t, h // p, w // p, p * p * c) * self.scale

  def decode(self, z_bfhwc):
    """Latents `[B, F, h, w, 3 p^2]` -> pixels `[B, F, p h, p w, 3]` clipped to [-1, 1]."""
    z = jnp.asarray(z_bfhwc, jnp.float32) / self.scale
    b, f, h, w, c = z.shape
    p = self.patch
    if c != self.latent_channels:
      raise ValueError(f"PixelCodec.decode: latents with {c} channels, this codec has {self.latent_channels}")
    x = z.reshape(b, f, h, w, p, p, 3).transpose(0, 1, 2, 4, 3, 5, 6)
    return jnp.clip(x.reshape(b, f, h * p, w * p, 3), -1.0, 1.0)

  def init_decode_cache(self, batch: int, h: int, w: int, dtype=None):
    """No state: each frame decodes alone (the streaming interface of the other decoders)."""
    del batch, h, w, dtype
    return ()

  def decode_chunk(self, z_bfhwc, cache):
    """`(pixels, cache)` of the next latent frames: `decode` frame for frame."""
    return self.decode(z_bfhwc), cache

  def to_uint8(self, z_bfhwc) -> np.ndarray:
    """Latents -> uint8 frames `[B, F, H, W, 3]`."""
    return np.asarray(jnp.round((self.decode(z_bfhwc) + 1.0) * 127.5), np.uint8)


def from_config(config) -> PixelCodec | None:
  """The codec of a pixel-space config (`pipeline.pixel_patch` > 0, `pipeline.pixel_scale`), else
  None."""
  p = config.get("pipeline", {}) if config is not None else {}
  patch = int(p.get("pixel_patch", 0) or 0)
  return PixelCodec(patch, float(p.get("pixel_scale", 1.0))) if patch > 0 else None


__all__ = ["PixelCodec", "from_config"]
