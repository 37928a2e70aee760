"""asvd: streaming autoregressive video diffusion with an adaptive state, in JAX/Flax NNX.

The public API is importable from the top-level package; submodules are imported lazily so that
`import asvd` stays fast and never pulls in torch.
"""

import importlib

__version__ = "0.1.0"

# name -> module that defines it.
_LAZY = {
  # Configs.
  "load_config": "asvd.config",
  # The causal Wan DiT.
  "WanDiT": "asvd.models.dit",
  "init_dit": "asvd.models.dit",
  "load_dit": "asvd.ckpt.dit_port",
  "save_dit": "asvd.ckpt.dit_port",
  # The adaptive-state transition and rollouts.
  "make_transition": "asvd.transition",
  "rollout": "asvd.streaming",
  "stream": "asvd.streaming",
  "prefill": "asvd.streaming",
  # VAE and text encoder.
  "WanVAE": "asvd.models.vae",
  "load_vae": "asvd.ckpt.vae_port",
  "TAEHV": "asvd.models.taehv",
  "load_taehv": "asvd.ckpt.taehv_port",
  "load_decoder": "asvd.pipeline",
  "UMT5Encoder": "asvd.models.umt5",
  "load_text_encoder": "asvd.ckpt.umt5_port",
  "load_tokenizer": "asvd.text.tokenizer",
  "encode_prompts": "asvd.text.tokenizer",
  # Video files.
  "write_mp4": "asvd.video",
  "latent_preview": "asvd.video",
  # Errors.
  "AsvdError": "asvd.errors",
  "UsageError": "asvd.errors",
  "CheckpointError": "asvd.ckpt.common",
  "OutOfMemoryError": "asvd.memory",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'asvd' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
