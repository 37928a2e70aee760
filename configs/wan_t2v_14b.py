"""Wan2.1-T2V-14B (the DMD teacher in Self-Forcing): 40 layers, dim 5120, 40 heads.

Args (after `:`): `bf16` (default) or `f32`.
"""

from asvd.config import base_config, config_arg


def get_config(arg=None):
  arg = config_arg(arg, {"bf16": "bfloat16 params and activations", "f32": "float32"}, __file__)
  c = base_config()
  c.name = "wan_t2v_14b"
  c.model.update(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
  if arg == "bf16":
    c.model.update(dtype="bfloat16", param_dtype="bfloat16")
  c.model.remat = "full"
  return c
