"""The TFDS features every training dataset shares: clips of latents and a text embedding."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds


def clip_features(c, text_dtype, **extra) -> tfds.features.FeaturesDict:
  """`{"latents": [frames, height, width, channels] f32, "text": [text_len, text_dim], **extra}`
  for a builder config `c` with those fields."""
  return tfds.features.FeaturesDict(
    {
      "latents": tfds.features.Tensor(shape=(c.frames, c.height, c.width, c.channels), dtype=np.float32),
      "text": tfds.features.Tensor(shape=(c.text_len, c.text_dim), dtype=text_dtype),
      **extra,
    }
  )
