"""Tiny random-weight config: seconds on a CPU, for tests and smoke runs.

Args (after `:`): none.
"""

from asvd.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.name = "tiny"
  c.model.update(
    dim=64, ffn_dim=128, freq_dim=32, num_heads=2, num_layers=2, text_dim=32, text_len=16
  )
  c.rollout.latent_hw = (8, 8)
  return c
