"""The KV cache of a rollout: a static-shape pytree that never grows with the chunk count.

Layout (relative time, every mode): `Fs` anchor slots then `Wp` window slots, one latent frame
per slot, `T` tokens per frame. Keys are stored **un-rotated**; the model rotates them at read
time with the slot's fixed temporal index. The cache also holds the prompt's cross-attention
K/V (computed once per prompt; replacing them is all a prompt switch needs).

The absolute Self-Forcing preset uses the same class with `N = absolute_frames` slots, filled
in order and never evicted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from asvd.models.dit import KVSlots, TextKV


@struct.dataclass
class Cache:
  """Rollout cache.

  Attributes:
    k: `[L, B, N*T, H, Dh]` un-rotated keys; slots `[0, Fs)` are the anchor, then the window.
    v: `[L, B, N*T, H, Dh]` values.
    valid: bool `[B, N]` per-slot validity.
    lat: `[B, N, H, W, C]` the clean latent behind each slot (the state, sink or window frame;
      zeros for the EMA anchor), kept so the window can be re-encoded under a new prompt.
    text: the prompt's cross-attention K/V, `[L, B, Lt, H, Dh]` each.
    acc_k: float32 `[L, B, T, H, Dh]` the `ema` anchor's running average of keys (the anchor
      slot holds it cast to the cache dtype, so a bf16 cache does not lose the average to
      rounding over hundreds of folds); `[L, B, 0, H, Dh]` in the other modes.
    acc_v: the same for values.
    chunk: int32 `[]` chunks generated so far. Only the absolute preset reads it (for RoPE and
      where to write); relative modes carry it for inspection.
  """

  k: jax.Array
  v: jax.Array
  valid: jax.Array
  lat: jax.Array
  text: TextKV
  chunk: jax.Array
  acc_k: jax.Array
  acc_v: jax.Array

  @property
  def num_slots(self) -> int:
    return self.valid.shape[-1]

  def slots(self, positions: jax.Array, bias: jax.Array | None = None) -> KVSlots:
    """The slots as the model reads them (`bias`: a logit bias per slot, `KVSlots.bias`)."""
    return KVSlots(k=self.k, v=self.v, valid=self.valid, positions=positions, bias=bias)

  @staticmethod
  def logical_axes() -> Cache:
    """Logical axis names of every leaf (for `asvd.sharding.logical_sharding`)."""
    kv = ("layers", "batch", "tokens", "heads", "head_dim")
    return Cache(
      k=kv,
      v=kv,
      valid=("batch", "slots"),
      lat=("batch", "slots", "height", "width", "channels"),
      text=TextKV(k=("layers", "batch", "text", "heads", "head_dim"), v=("layers", "batch", "text", "heads", "head_dim")),
      chunk=(),
      acc_k=kv,
      acc_v=kv,
    )


def empty_cache(text: TextKV, num_slots: int, tokens: int, dtype, latent_shape, *, ema: bool = False) -> Cache:
  """A cache with every slot invalid (zeros), shaped after the text K/V `[L, B, Lt, H, Dh]`.

  `latent_shape` is one frame's `(H, W, C)`; `ema` allocates the float32 EMA accumulator.
  """
  layers, batch, _, heads, head_dim = text.k.shape
  shape = (layers, batch, num_slots * tokens, heads, head_dim)
  return Cache(
    k=jnp.zeros(shape, dtype),
    v=jnp.zeros(shape, dtype),
    valid=jnp.zeros((batch, num_slots), bool),
    lat=jnp.zeros((batch, num_slots, *latent_shape), jnp.float32),
    text=text,
    chunk=jnp.zeros((), jnp.int32),
    acc_k=jnp.zeros((layers, batch, tokens if ema else 0, heads, head_dim), jnp.float32),
    acc_v=jnp.zeros((layers, batch, tokens if ema else 0, heads, head_dim), jnp.float32),
  )


def frames_of(x: jax.Array, tokens: int) -> jax.Array:
  """`[L, B, F*T, H, Dh]` -> `[L, B, F, T, H, Dh]`."""
  nl, b, s, h, d = x.shape
  return x.reshape(nl, b, s // tokens, tokens, h, d)


def tokens_of(x: jax.Array) -> jax.Array:
  """`[L, B, F, T, H, Dh]` -> `[L, B, F*T, H, Dh]`."""
  nl, b, f, t, h, d = x.shape
  return x.reshape(nl, b, f * t, h, d)
