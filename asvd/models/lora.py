"""LoRA for the Wan DiT: rank-r adapters on the blocks' linear layers, trained alone, merged back.

    model = add_lora(base, rank=16, key=0)      # same outputs as `base` (B starts at zero)
    graphdef, lora, frozen = split_lora(model)   # train `lora`; `frozen` holds every other weight
    plain = merge_lora(nnx.merge(graphdef, lora, frozen))   # W + (alpha/r) A @ B, no adapters left

The adapters sit on every attention projection (self and cross: q, k, v, o) and both FFN layers
of every block (`LoRAParam` variables, `DiTConfig.lora_rank` / `lora_alpha`). A merged model is
an ordinary `WanDiT`: `save_dit` / `asvd generate --checkpoint` need nothing LoRA-specific.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from asvd.models.dit import LoRAParam, WanDiT


def add_lora(model: WanDiT, rank: int, alpha: float | None = None, key=0) -> WanDiT:
  """`model` with fresh adapters of `rank` (scale `alpha / rank`, default 1) on its blocks."""
  if rank < 1:
    raise ValueError(f"LoRA rank {rank} must be >= 1")
  if model.cfg.lora_rank:
    raise ValueError(f"the model already has LoRA adapters (rank {model.cfg.lora_rank}); merge_lora first")
  cfg = dataclasses.replace(model.cfg, lora_rank=int(rank), lora_alpha=float(alpha or rank))
  key = jax.random.key(key) if isinstance(key, int) else key
  new = WanDiT(cfg, rngs=nnx.Rngs(params=key))
  base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  target = nnx.to_pure_dict(nnx.state(new, nnx.Param))

  def fill(t, b):
    if isinstance(t, dict):
      return {k: (fill(v, b[k]) if k in b else v) for k, v in t.items()}
    return jnp.asarray(b, t.dtype)

  state = nnx.state(new)
  nnx.replace_by_pure_dict(state, fill(target, base))
  nnx.update(new, state)
  return new


def split_lora(model: WanDiT):
  """`(graphdef, adapters, everything else)`; `nnx.merge(graphdef, adapters, rest)` rebuilds it."""
  return nnx.split(model, LoRAParam, ...)


def merge_lora(model: WanDiT) -> WanDiT:
  """An adapter-free `WanDiT` whose kernels include the adapters: `W + scale * A @ B`."""
  if not model.cfg.lora_rank:
    return model
  cfg = dataclasses.replace(model.cfg, lora_rank=0, lora_alpha=0.0)
  scale = (float(model.cfg.lora_alpha) or model.cfg.lora_rank) / model.cfg.lora_rank
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  def fold(d):
    if not isinstance(d, dict):
      return d
    out = {k: fold(v) for k, v in d.items() if k not in ("lora_a", "lora_b")}
    if "lora_a" in d:
      a, b = jnp.asarray(d["lora_a"], jnp.float32), jnp.asarray(d["lora_b"], jnp.float32)
      k = out["kernel"]
      out["kernel"] = (jnp.asarray(k, jnp.float32) + scale * jnp.matmul(a, b)).astype(k.dtype)
    return out

  plain = nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(params=0)))
  graphdef, state = nnx.split(plain)
  nnx.replace_by_pure_dict(state, fold(pure))
  return nnx.merge(graphdef, state)


__all__ = ["add_lora", "split_lora", "merge_lora", "LoRAParam"]
