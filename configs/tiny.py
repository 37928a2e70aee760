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
  # `asvd train --config configs/tiny.py --workdir DIR`: teacher -> causal init -> DMD with the
  # adaptive state on the synthetic panning dataset, in about 2 minutes on 2 CPU cores.
  t = c.train
  t.update(horizon_frames=6, batch_size=2, checkpoint_every=5, keep=2, sample_every=10, sample_chunks=4)
  t.data.update(frames=9, clips=32)
  t.teacher.update(steps=20, lr=1e-3)
  t.causal_init.update(steps=20, lr=1e-3, ode_steps=8)
  t.dmd.update(steps=10, generator_lr=1e-4, critic_lr=1e-4, rollout_chunks=3, ema_start=0)
  return c
