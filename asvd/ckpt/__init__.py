"""Checkpoint import/export (PyTorch formats, safetensors, Orbax)."""

from asvd.ckpt.common import CheckpointError

__all__ = ["CheckpointError"]
