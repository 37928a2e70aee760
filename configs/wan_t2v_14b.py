"""Wan2.1-T2V-14B (the DMD teacher in Self-Forcing): 40 layers, dim 5120, 40 heads.

Args (after `:`): `bf16` (default) or `f32`.
"""

from asvd.config import base_config


def get_config(arg="bf16"):
  c = base_config()
  c.name = "wan_t2v_14b"
  c.model.update(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
  if (arg or "bf16") == "bf16":
    c.model.update(dtype="bfloat16", param_dtype="bfloat16")
  c.model.remat = "full"
  return c
