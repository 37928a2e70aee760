"""The umT5 text encoder (encoder stack only) in Flax NNX.

Wan2.1 conditions its DiT on the last hidden state of umT5-XXL's encoder. This module holds the
architecture; `asvd.ckpt.umt5_port` imports weights from a transformers `UMT5EncoderModel` folder
or from Wan's own `models_t5_umt5-xxl-enc-bf16.pth`.

Architecture facts that matter for numerical parity (they differ from a "textbook" transformer):
  * umT5 gives EVERY layer its own relative-position-bias table `[num_buckets, num_heads]` (T5 v1
    shares layer 0's table). Buckets are bidirectional: half of them for keys to the right.
  * Attention logits are NOT scaled by 1/sqrt(head_dim); the scale is folded into the init.
  * Pre-norm residual blocks with T5's RMSNorm (no mean subtraction, no bias, statistics in fp32).
  * Gated-GELU feed-forward, GELU with the tanh approximation: `fc2(fc1(x) * gelu(gate(x)))`.
  * A final RMSNorm; no positional embedding besides the biases; no dropout at inference.

Parameter layout (the names follow Wan's original module names, so the .pth mapping is short):

  token_embedding.embedding            [vocab, dim]
  blocks.norm1.scale                   [layers, dim]
  blocks.attn.{q,k,v}.kernel           [layers, dim, dim_attn]
  blocks.attn.o.kernel                 [layers, dim_attn, dim]
  blocks.pos_embedding.embedding       [layers, num_buckets, num_heads]
  blocks.norm2.scale                   [layers, dim]
  blocks.ffn.{gate,fc1}.kernel         [layers, dim, dim_ffn]   (gate goes through GELU)
  blocks.ffn.fc2.kernel                [layers, dim_ffn, dim]
  norm.scale                           [dim]

The blocks are stacked on a leading layer axis (`nnx.vmap` at construction) and run with
`jax.lax.scan`, which keeps compile time flat in the number of layers (24 for XXL).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
  "UMT5Config",
  "UMT5Encoder",
  "init_text_encoder",
  "relative_position_buckets",
]

# Gated activations found in umT5-style configs ("gated-<act>"). transformers maps plain
# "gated-gelu" to the tanh approximation ("gelu_new"), and so does Wan's own GELU module.
_ACTIVATIONS = {
  "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
  "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
}
_HF_ACT_NAMES = {
  "gelu": "gelu_tanh",
  "gelu_new": "gelu_tanh",
  "gelu_pytorch_tanh": "gelu_tanh",
  "gelu_fast": "gelu_tanh",
  "relu": "relu",
  "silu": "silu",
  "swish": "silu",
}


@dataclasses.dataclass(frozen=True)
class UMT5Config:
  """Hyper-parameters of a umT5 encoder stack.

  The defaults are umT5-XXL as Wan2.1 ships it (`models_t5_umt5-xxl-enc-bf16.pth`).

  Attributes:
    vocab_size: rows of the token embedding (256384 for umT5; the tokenizer uses fewer ids).
    dim: model width (HF `d_model`).
    dim_attn: total attention width `num_heads * head_dim` (HF `num_heads * d_kv`).
    dim_ffn: hidden width of the gated feed-forward (HF `d_ff`).
    num_heads: attention heads.
    num_layers: encoder blocks.
    num_buckets: relative-position buckets per layer (HF `relative_attention_num_buckets`).
    max_distance: distance at which the logarithmic buckets saturate.
    eps: RMSNorm epsilon.
    activation: the gated activation, one of "gelu_tanh", "gelu_exact", "relu", "silu".
  """

  vocab_size: int = 256384
  dim: int = 4096
  dim_attn: int = 4096
  dim_ffn: int = 10240
  num_heads: int = 64
  num_layers: int = 24
  num_buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6
  activation: str = "gelu_tanh"

  def __post_init__(self):
    if self.dim_attn % self.num_heads:
      raise ValueError(f"dim_attn={self.dim_attn} is not divisible by num_heads={self.num_heads}")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"activation {self.activation!r} not in {sorted(_ACTIVATIONS)}")

  @property
  def head_dim(self) -> int:
    return self.dim_attn // self.num_heads

  @classmethod
  def umt5_xxl(cls) -> UMT5Config:
    """umT5-XXL encoder, as used by every Wan2.1 model."""
    return cls()

  @classmethod
  def tiny(cls, **overrides: Any) -> UMT5Config:
    """A few-thousand-parameter config for tests."""
    kw = dict(
      vocab_size=256, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, num_buckets=32
    )
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any]) -> UMT5Config:
    """Builds the config from a transformers `UMT5Config` dict (a parsed `config.json`).

    Args:
      hf: the config dict; needs `d_model`, `d_kv`, `d_ff`, `num_heads`, `num_layers`, `vocab_size`.

    Returns:
      The matching `UMT5Config`.

    Raises:
      ValueError: the config is not a gated umT5 encoder (e.g. T5 v1.0 with a ReLU FFN).
    """
    ff = str(hf.get("feed_forward_proj", "gated-gelu"))
    parts = ff.split("-")
    if len(parts) != 2 or parts[0] != "gated" or parts[1] not in _HF_ACT_NAMES:
      raise ValueError(
        f"feed_forward_proj={ff!r} is not supported; umT5 uses a gated FFN ('gated-gelu')"
      )
    return cls(
      vocab_size=int(hf["vocab_size"]),
      dim=int(hf["d_model"]),
      dim_attn=int(hf["num_heads"]) * int(hf["d_kv"]),
      dim_ffn=int(hf["d_ff"]),
      num_heads=int(hf["num_heads"]),
      num_layers=int(hf["num_layers"]),
      num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
      max_distance=int(hf.get("relative_attention_max_distance", 128)),
      eps=float(hf.get("layer_norm_epsilon", 1e-6)),
      activation=_HF_ACT_NAMES[parts[1]],
    )

  def num_params(self) -> int:
    """Parameter count, computed analytically (no arrays are built)."""
    per_layer = (
      3 * self.dim * self.dim_attn  # q, k, v
      + self.dim_attn * self.dim  # o
      + 3 * self.dim * self.dim_ffn  # gate, fc1, fc2
      + 2 * self.dim  # norm1, norm2
      + self.num_buckets * self.num_heads  # per-layer position bias
    )
    return self.vocab_size * self.dim + self.num_layers * per_layer + self.dim


# ------------------------------------------------------------------------------------------------
# Relative position buckets.
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def relative_position_buckets(
  q_len: int, k_len: int, num_buckets: int, max_distance: int
) -> np.ndarray:
  """Bidirectional T5 bucket index of every (query, key) pair.

  Keys to the right of the query use the upper half of the buckets. Within each half, the first
  quarter of all buckets are exact distances 0..max_exact-1 and the rest grow logarithmically up to
  `max_distance`, beyond which everything lands in the last bucket. Computed once on the host in
  numpy (the shape is static under jit). The log is taken in float32 and truncated, as both
  reference implementations do, so a distance that sits on a bucket edge rounds the same way.

  Args:
    q_len: number of query positions.
    k_len: number of key positions.
    num_buckets: buckets for both directions together.
    max_distance: distance at which the buckets saturate.

  Returns:
    A read-only int32 array `[q_len, k_len]` with values in `[0, num_buckets)`.
  """
  rel_qk = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
  half = num_buckets // 2
  bucket_qk = (rel_qk > 0).astype(np.int64) * half
  dist_qk = np.abs(rel_qk)
  max_exact = half // 2
  with np.errstate(divide="ignore"):  # log(0) for the diagonal; masked by `is_small` below
    ratio = np.log(dist_qk.astype(np.float32) / np.float32(max_exact))
    ratio = ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
  large_qk = max_exact + np.nan_to_num(ratio, neginf=0.0).astype(np.int64)
  large_qk = np.minimum(large_qk, half - 1)
  bucket_qk = bucket_qk + np.where(dist_qk < max_exact, dist_qk, large_qk)
  out = bucket_qk.astype(np.int32)
  out.flags.writeable = False
  return out


# ------------------------------------------------------------------------------------------------
# Modules.
# ------------------------------------------------------------------------------------------------


def _normal(std: float):
  """N(0, std^2) initializer that samples in float32 and then casts.

  Sampling in float32 makes one seed give the same weights (up to rounding) for every dtype.
  """

  def init(key, shape, dtype=jnp.float32):
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)

  return init


class RMSNorm(nnx.Module):
  """T5 layer norm: scale-only RMS normalisation with statistics in float32."""

  def __init__(self, dim: int, *, eps: float, dtype: Any):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((dim,), dtype=dtype))

  def __call__(self, x_bld: jax.Array) -> jax.Array:
    x32_bld = x_bld.astype(jnp.float32)
    var_bl1 = jnp.mean(jnp.square(x32_bld), axis=-1, keepdims=True)
    # Normalise in fp32 and only then drop to the model dtype, as both references do.
    y_bld = (x32_bld * jax.lax.rsqrt(var_bl1 + self.eps)).astype(self.dtype)
    return self.scale[...].astype(self.dtype) * y_bld


class RelativePositionBias(nnx.Module):
  """One layer's learned bias table, looked up by relative-position bucket."""

  def __init__(self, cfg: UMT5Config, *, dtype: Any, rngs: nnx.Rngs):
    self.num_buckets = cfg.num_buckets
    self.max_distance = cfg.max_distance
    std = (2 * cfg.num_buckets * cfg.num_heads) ** -0.5
    self.embedding = nnx.Param(_normal(std)(rngs.params(), (cfg.num_buckets, cfg.num_heads), dtype))

  def __call__(self, length: int) -> jax.Array:
    """Returns the float32 bias `[heads, length, length]` for a sequence of `length` tokens."""
    bucket_qk = relative_position_buckets(length, length, self.num_buckets, self.max_distance)
    table_nh = self.embedding[...].astype(jnp.float32)
    bias_qkh = jnp.take(table_nh, jnp.asarray(bucket_qk), axis=0)
    return jnp.transpose(bias_qkh, (2, 0, 1))


def _linear(n_in: int, n_out: int, std: float, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  """A bias-free linear layer with a normal(std) init (T5 has no biases)."""
  return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=dtype, kernel_init=_normal(std), rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention without 1/sqrt(d) scaling; bias and mask are added to the logits."""

  def __init__(self, cfg: UMT5Config, *, dtype: Any, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.head_dim
    self.dtype = dtype

    def linear(n_in, n_out, std):
      return _linear(n_in, n_out, std, dtype, rngs)

    # T5's init puts the missing 1/sqrt(d) of the logits into q's scale.
    self.q = linear(cfg.dim, cfg.dim_attn, (cfg.dim * cfg.dim_attn) ** -0.5)
    self.k = linear(cfg.dim, cfg.dim_attn, cfg.dim**-0.5)
    self.v = linear(cfg.dim, cfg.dim_attn, cfg.dim**-0.5)
    self.o = linear(cfg.dim_attn, cfg.dim, cfg.dim_attn**-0.5)

  def __call__(self, x_bld: jax.Array, bias_bhqk: jax.Array) -> jax.Array:
    """Attends over the sequence.

    Args:
      x_bld: normalised input `[B, L, dim]`.
      bias_bhqk: float32 additive bias, position bias plus the key-padding mask, broadcastable to
        `[B, heads, L, L]`; masked keys hold a large negative number.

    Returns:
      `[B, L, dim]` in the model dtype.
    """
    b, seq_len, _ = x_bld.shape
    heads_shape = (b, seq_len, self.num_heads, self.head_dim)
    q_blhd = self.q(x_bld).reshape(heads_shape)
    k_blhd = self.k(x_bld).reshape(heads_shape)
    v_blhd = self.v(x_bld).reshape(heads_shape)
    # Logits and softmax in fp32: with no 1/sqrt(d) scaling the logits get large.
    logits_bhqk = jnp.einsum("bqhd,bkhd->bhqk", q_blhd, k_blhd, preferred_element_type=jnp.float32)
    probs_bhqk = jax.nn.softmax(logits_bhqk + bias_bhqk, axis=-1).astype(self.dtype)
    out_blhd = jnp.einsum("bhqk,bkhd->bqhd", probs_bhqk, v_blhd)
    return self.o(out_blhd.reshape(b, seq_len, self.num_heads * self.head_dim))


class GatedFeedForward(nnx.Module):
  """`fc2(fc1(x) * act(gate(x)))` (Wan: gate/fc1/fc2; transformers: wi_0/wi_1/wo)."""

  def __init__(self, cfg: UMT5Config, *, dtype: Any, rngs: nnx.Rngs):
    self.act = _ACTIVATIONS[cfg.activation]

    def linear(n_in, n_out):
      return _linear(n_in, n_out, n_in**-0.5, dtype, rngs)

    self.gate = linear(cfg.dim, cfg.dim_ffn)
    self.fc1 = linear(cfg.dim, cfg.dim_ffn)
    self.fc2 = linear(cfg.dim_ffn, cfg.dim)

  def __call__(self, x_bld: jax.Array) -> jax.Array:
    return self.fc2(self.fc1(x_bld) * self.act(self.gate(x_bld)))


class UMT5Block(nnx.Module):
  """Pre-norm self-attention (with this layer's own position bias) then pre-norm gated FFN."""

  def __init__(self, cfg: UMT5Config, *, dtype: Any, rngs: nnx.Rngs):
    self.norm1 = RMSNorm(cfg.dim, eps=cfg.eps, dtype=dtype)
    self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
    self.pos_embedding = RelativePositionBias(cfg, dtype=dtype, rngs=rngs)
    self.norm2 = RMSNorm(cfg.dim, eps=cfg.eps, dtype=dtype)
    self.ffn = GatedFeedForward(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, x_bld: jax.Array, mask_bias_b11k: jax.Array) -> jax.Array:
    """One block.

    Args:
      x_bld: residual stream `[B, L, dim]`.
      mask_bias_b11k: float32 `[B, 1, 1, L]`, 0 for valid keys and a large negative for padding.

    Returns:
      The updated residual stream `[B, L, dim]`.
    """
    bias_bhqk = self.pos_embedding(x_bld.shape[1])[None] + mask_bias_b11k
    x_bld = x_bld + self.attn(self.norm1(x_bld), bias_bhqk)
    return x_bld + self.ffn(self.norm2(x_bld))


class UMT5Encoder(nnx.Module):
  """The umT5 encoder stack: `encoder(token_ids [B, L], mask [B, L]) -> [B, L, dim]`.

  Calling the module runs a jitted pure function (the module is split into graphdef + state and
  merged inside `jax.jit`), so plain eager use compiles once per input shape. Inside your own
  `jax.jit` / `nnx.jit` use `forward`, or call the module as usual (the inner jit is inlined).

  The output at padded positions is whatever the network computes there (as in transformers and
  Wan); `asvd.text.encode_prompts` zeroes those rows the way Wan does before the DiT sees them.
  """

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
    """Builds a randomly initialised encoder (T5's init scheme).

    Args:
      cfg: the architecture.
      rngs: random streams; only `params` is used.
      dtype: parameter and compute dtype (norm statistics, position bias, logits and softmax
        stay float32 regardless).
    """
    self.cfg = cfg
    self.dtype = dtype
    self.token_embedding = nnx.Embed(
      cfg.vocab_size,
      cfg.dim,
      dtype=dtype,
      param_dtype=dtype,
      embedding_init=_normal(1.0),
      rngs=rngs,
    )

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs) -> UMT5Block:
      return UMT5Block(cfg, dtype=dtype, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.norm = RMSNorm(cfg.dim, eps=cfg.eps, dtype=dtype)

  def forward(self, token_ids_bl: jax.Array, mask_bl: jax.Array | None = None) -> jax.Array:
    """The traceable forward pass (no jit of its own).

    Args:
      token_ids_bl: int `[B, L]` token ids.
      mask_bl: `[B, L]`, nonzero for real tokens and 0 for padding keys; None means all valid.

    Returns:
      `[B, L, dim]` hidden states in the model dtype.
    """
    token_ids_bl = jnp.asarray(token_ids_bl)
    if not jnp.issubdtype(token_ids_bl.dtype, jnp.integer):
      raise TypeError(f"token ids must be integers, got {token_ids_bl.dtype}")
    if mask_bl is None:
      mask_bl = jnp.ones(token_ids_bl.shape, dtype=jnp.bool_)
    valid_bl = jnp.asarray(mask_bl) != 0
    # Masked keys get the most negative float32: exp() underflows to an exact 0 in the softmax,
    # and a row with every key masked still gives finite (uniform) weights instead of NaN.
    mask_bias_b11k = jnp.where(valid_bl, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]

    x_bld = self.token_embedding(token_ids_bl).astype(self.dtype)
    block_def, block_state = nnx.split(self.blocks)

    def layer(x_bld, state):
      return nnx.merge(block_def, state)(x_bld, mask_bias_b11k), None

    x_bld, _ = jax.lax.scan(layer, x_bld, block_state)
    return self.norm(x_bld)

  def __call__(self, token_ids_bl: jax.Array, mask_bl: jax.Array | None = None) -> jax.Array:
    """Jitted forward pass; see `forward` for the arguments."""
    graphdef, state = nnx.split(self)
    token_ids_bl = jnp.asarray(token_ids_bl)
    if mask_bl is None:
      mask_bl = jnp.ones(token_ids_bl.shape, dtype=jnp.int32)
    return _forward_jit(graphdef, state, token_ids_bl, jnp.asarray(mask_bl))


@functools.partial(jax.jit, static_argnums=0)
def _forward_jit(graphdef, state, token_ids_bl, mask_bl):
  return nnx.merge(graphdef, state).forward(token_ids_bl, mask_bl)


def init_text_encoder(
  cfg: UMT5Config, key: jax.Array | int = 0, *, dtype: Any = jnp.float32
) -> UMT5Encoder:
  """A randomly initialised encoder.

  Args:
    cfg: the architecture, e.g. `UMT5Config.tiny()` or `UMT5Config.umt5_xxl()`.
    key: a `jax.random` key or an int seed.
    dtype: parameter and compute dtype.

  Returns:
    The encoder.
  """
  return UMT5Encoder(cfg, rngs=nnx.Rngs(params=key), dtype=dtype)
