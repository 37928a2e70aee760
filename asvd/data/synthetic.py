"""A synthetic latent-video dataset for smoke training: pans over smooth random fields.

Each clip is a smooth random field in latent space (C channels, `h x w`) that the "camera" pans
across at a speed and direction given by its caption; new content keeps entering from the edge
(the field is larger than the view). Captions come from a small grammar ("pan left slow") and
their text embeddings are a fixed random sequence per caption, standing in for a text encoder.
It is a TFDS builder (array_record, no TensorFlow needed), generated locally and deterministic
by seed, so the training stages run end to end on a fresh machine with no download.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import tensorflow_datasets as tfds

from asvd.data.features import clip_features

DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
SPEEDS = {"slow": 1, "fast": 2}
CAPTIONS = [f"pan {d} {s}" for d, s in itertools.product(DIRECTIONS, SPEEDS)]


@dataclasses.dataclass
class SyntheticPanConfig(tfds.core.BuilderConfig):
  frames: int = 9
  height: int = 8
  width: int = 8
  channels: int = 16
  text_len: int = 16
  text_dim: int = 32
  clips: int = 64
  seed: int = 0


def config_for(frames, height, width, channels, text_len, text_dim, clips, seed) -> SyntheticPanConfig:
  name = f"f{frames}_h{height}_w{width}_c{channels}_l{text_len}_d{text_dim}_n{clips}_s{seed}"
  return SyntheticPanConfig(
    name=name,
    frames=frames,
    height=height,
    width=width,
    channels=channels,
    text_len=text_len,
    text_dim=text_dim,
    clips=clips,
    seed=seed,
  )


def caption_embedding(caption_id: int, text_len: int, text_dim: int) -> np.ndarray:
  """The stand-in text embedding of a caption: a fixed random `[text_len, text_dim]` sequence."""
  rng = np.random.default_rng(1000 + caption_id)
  return rng.standard_normal((text_len, text_dim)).astype(np.float32)


def make_clip(rng: np.random.Generator, cfg: SyntheticPanConfig, caption_id: int) -> np.ndarray:
  """`[frames, h, w, C]` float32: a view panning over a smooth random field."""
  dy, dx = DIRECTIONS[CAPTIONS[caption_id].split()[1]]
  speed = SPEEDS[CAPTIONS[caption_id].split()[2]]
  margin = speed * cfg.frames
  big_h, big_w = cfg.height + 2 * margin, cfg.width + 2 * margin
  field = rng.standard_normal((big_h, big_w, cfg.channels)).astype(np.float32)
  for axis in (0, 1):  # smooth: a few passes of a 3-tap blur, then unit variance
    for _ in range(2):
      field = (np.roll(field, 1, axis) + field + np.roll(field, -1, axis)) / 3.0
  field = (field - field.mean()) / (field.std() + 1e-6)
  frames = []
  for t in range(cfg.frames):
    y, x = margin + dy * speed * t, margin + dx * speed * t
    frames.append(field[y : y + cfg.height, x : x + cfg.width])
  return np.stack(frames)


class SyntheticPan(tfds.core.GeneratorBasedBuilder):
  """Synthetic panning latent clips with caption embeddings (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [config_for(9, 8, 8, 16, 16, 32, 64, 0)]

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
      builder=self,
      features=clip_features(c, np.float32, caption_id=tfds.features.Scalar(dtype=np.int64)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    c = self.builder_config
    rng = np.random.default_rng(c.seed)
    for i in range(c.clips):
      cap = int(rng.integers(len(CAPTIONS)))
      yield i, {"latents": make_clip(rng, c, cap), "text": caption_embedding(cap, c.text_len, c.text_dim), "caption_id": cap}


__all__ = ["SyntheticPan", "SyntheticPanConfig", "config_for", "CAPTIONS", "caption_embedding"]
