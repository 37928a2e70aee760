"""Wan2.1-T2V-1.3B (Self-Forcing's base): 30 layers, dim 1536, 12 heads, 480x832.

Args (after `:`): `bf16` (default for real runs on accelerators) or `f32`.
"""

from asvd.config import base_config, config_arg


def get_config(arg=None):
  arg = config_arg(arg, {"bf16": "bfloat16 params and activations", "f32": "float32"}, __file__)
  c = base_config()
  c.name = "wan_t2v_1_3b"
  if arg == "bf16":
    c.model.update(dtype="bfloat16", param_dtype="bfloat16")
  # Rematerialise each layer in training's backward passes (no effect on inference): the DMD
  # generator step's temporaries on a v5p-8 (fsdp 8, batch 1) go from 62.3 to 12.5 GiB per chip,
  # the critic step's from over 270 GiB (the compiler refuses it) to 8.5 GiB (`asvd aot`, README).
  c.model.remat = "full"
  return c
