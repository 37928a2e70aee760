"""Small config for CPU benchmarks (8 heads x 64, 6 layers, ffn 2048; 1,536 tokens at 6x32x32).

Args (after `:`): `f32` (default) or `bf16`, which selects bf16 params/activations with f32 accumulation.
"""

from asvd.config import base_config, config_arg


def get_config(arg=None):
  arg = config_arg(arg, {"f32": "float32", "bf16": "bfloat16 params and activations"}, __file__)
  c = base_config()
  c.name = "small"
  # No hand tuning: the defaults (attention "auto", scanned layers) are the fast path.
  c.model.update(
    dim=512,
    ffn_dim=2048,
    freq_dim=256,
    num_heads=8,
    num_layers=6,
    text_dim=512,
    text_len=64,
  )
  if arg == "bf16":
    c.model.update(dtype="bfloat16", param_dtype="bfloat16")
  c.rollout.latent_hw = (32, 32)
  return c
