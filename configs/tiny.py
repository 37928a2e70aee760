"""Tiny random-weight config: seconds on a CPU, for tests and smoke runs.

Args (after `:`): `f32` (default) or `bf16` (bf16 params/activations, f32 accumulation).
"""

from asvd.config import base_config, config_arg


def get_config(arg=None):
  arg = config_arg(arg, {"f32": "float32", "bf16": "bfloat16 params and activations"}, __file__)
  c = base_config()
  c.name = "tiny"
  c.model.update(
    dim=64, ffn_dim=128, freq_dim=32, num_heads=2, num_layers=2, text_dim=32, text_len=16
  )
  if arg == "bf16":
    c.model.update(dtype="bfloat16", param_dtype="bfloat16")
  c.rollout.latent_hw = (8, 8)
  return c
