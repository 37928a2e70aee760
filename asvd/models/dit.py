"""The causal Wan2.1 DiT in Flax NNX, with per-frame timesteps and an external KV cache.

`WanDiT` reproduces the Wan2.1 text-to-video transformer (diffusers `WanTransformer3DModel`)
in channels-last layout, and adds what a streaming, chunk-wise generator needs:

* **per-frame timesteps** `t [B, F]`: every latent frame gets its own AdaLN modulation, so an
  adaptive-state frame can carry a noise level of its own;
* **explicit positions**: 3D RoPE from the caller's temporal index per frame (or per token),
  never from a frame counter, which is what makes relative time possible;
* two call forms with identical math:
  (a) full sequence, optional frame-level attention mask (bidirectional teacher, block-causal);
  (b) cached: the queries also attend to externally supplied **un-rotated** K/V slots (with a
      validity flag and a temporal index per slot, `KVSlots`), and the call can return its own
      un-rotated K/V for the caller to store (`return_kv=True`).

Blocks are stacked with `nnx.vmap` (leading `layers` axis) and run by `jax.lax.scan`, with a
configurable remat policy; `scan_layers=False` keeps a plain Python loop for debugging.

Numerics follow Wan: LayerNorm eps 1e-6 (affine only before cross-attention), RMSNorm over the
full q/k width, GELU-tanh, cosine-first sinusoidal time embedding of the raw timestep in
[0, 1000], modulation added in float32, unmasked text padding. Matmuls take the activation
dtype and accumulate in float32 (`preferred_element_type`).
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
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from asvd import sharding as shard_lib
from asvd.models import attention as attn_lib
from asvd.models import rope as rope_lib

# ------------------------------------------------------------------------------------------------
# Config.
# ------------------------------------------------------------------------------------------------

_CP = jax.checkpoint_policies
_REMAT_POLICIES = {  # `model.remat` -> the `jax.checkpoint` policy of the layer scan
  "none": None,  # no rematerialisation
  "full": _CP.nothing_saveable,  # save only each block's input
  # The big matmul outputs: dots, and `Dense` outputs (a custom VJP on CPU bf16, see `_matmul`).
  "dots": _CP.save_from_both_policies(_CP.dots_with_no_batch_dims_saveable, _CP.save_only_these_names("dense_out")),
  "attn_out": _CP.save_only_these_names("attn_out"),  # the tensors tagged with checkpoint_name below
}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Static description of a `WanDiT` (the `model` section of a config).

  The field names follow diffusers' `WanTransformer3DModel` where one exists.
  """

  patch_size: tuple[int, int, int] = (1, 2, 2)
  in_channels: int = 16
  out_channels: int = 16
  dim: int = 1536
  ffn_dim: int = 8960
  freq_dim: int = 256
  num_heads: int = 12
  num_layers: int = 30
  text_dim: int = 4096
  text_len: int = 512
  eps: float = 1e-6
  cross_attn_norm: bool = True
  rope_max_seq_len: int = 1024
  rope_theta: float = 10000.0
  # Compute.
  dtype: str = "float32"  # activations
  param_dtype: str = "float32"
  attention: str = "auto"  # asvd.models.attention registry
  scan_layers: bool = True
  remat: str = "none"  # none | full | dots | attn_out
  # LoRA adapters on the blocks' linear layers (attention q/k/v/o, FFN); 0 = none.
  lora_rank: int = 0
  lora_alpha: float = 0.0  # scale = alpha / rank (0: alpha = rank)

  # Fields that choose how the network computes, not what it is: a checkpoint defines the
  # architecture, a config may still set these (`compute_settings`).
  COMPUTE_FIELDS = ("attention", "remat", "scan_layers")

  @property
  def lora_kw(self) -> dict:
    r = int(self.lora_rank)
    return {"lora_rank": r, "lora_scale": (float(self.lora_alpha) or r) / r} if r else {}

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @classmethod
  def from_config(cls, cfg: Any) -> DiTConfig:
    """Builds from a ConfigDict / dict / DiTConfig; unknown keys are an error naming them."""
    if isinstance(cfg, DiTConfig):
      return cfg
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown model config key(s) {unknown}; known: {sorted(names)}")
    if "patch_size" in d:
      d["patch_size"] = tuple(int(p) for p in d["patch_size"])
    out = cls(**d)
    out.validate()
    return out

  def validate(self) -> None:
    if self.dim % self.num_heads:
      raise ValueError(f"model.dim={self.dim} is not divisible by model.num_heads={self.num_heads}")
    if self.head_dim % 2 or self.head_dim < 6:
      raise ValueError(f"head dim {self.head_dim} must be even and >= 6 for 3D RoPE")
    if self.remat not in _REMAT_POLICIES:
      raise ValueError(f"model.remat={self.remat!r}; choose one of {sorted(_REMAT_POLICIES)}")
    attn_lib.get_attention(self.attention)
    for k in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, k))
      except TypeError as e:
        raise ValueError(f"model.{k}={getattr(self, k)!r} is not a dtype") from e


# ------------------------------------------------------------------------------------------------
# Pytrees that flow through the call.
# ------------------------------------------------------------------------------------------------


@struct.dataclass
class KVSlots:
  """Externally held self-attention K/V that the queries attend to (call form (b)).

  Keys are stored **un-rotated**; the model rotates them at read time with `positions`.

  Attributes:
    k: `[L, B, N * T, H, Dh]` keys of N slots of T tokens (one latent frame each), per layer.
    v: `[L, B, N * T, H, Dh]` values.
    valid: bool `[B, N]`; invalid slots get no attention.
    positions: int `[N]` or `[B, N]` temporal RoPE index of each slot.
    bias: float `[N]`, added to the attention logits of every key of each slot (every query,
      every layer and head), or None. A probe for how much a slot's share of attention matters
      (`rollout.anchor_bias`); None leaves the computation exactly as without it.
  """

  k: jax.Array
  v: jax.Array
  valid: jax.Array
  positions: jax.Array
  bias: jax.Array | None = None

  @property
  def num_slots(self) -> int:
    return self.valid.shape[-1]


@struct.dataclass
class TextKV:
  """Cross-attention K/V of a prompt, computed once (`WanDiT.text_kv`). `[L, B, Lt, H, Dh]`."""

  k: jax.Array
  v: jax.Array


# ------------------------------------------------------------------------------------------------
# Layers.
# ------------------------------------------------------------------------------------------------


def _param(value, names):
  # Logical axis names only; the mesh mapping happens in asvd.sharding (no eager sharding).
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


class LoRAParam(nnx.Param):
  """Low-rank adapter weights (`lora_a [din, r]`, `lora_b [r, dout]`). A LoRA run trains only
  these (`nnx.split(model, LoRAParam, ...)`); `asvd.models.lora.merge_lora` folds them back."""


class Dense(nnx.Module):
  """`y = x @ W + b` with float32 accumulation; W is `[din, dout]`.

  With `lora_rank = r > 0` it adds `scale * (x @ A) @ B` (A Gaussian, B zero: the adapter
  starts as the identity of the base layer).
  """

  def __init__(self, din, dout, *, rngs, names=(None, None), dtype, param_dtype, std=None, lora_rank=0, lora_scale=1.0):
    key = rngs.params()
    if std is None:  # xavier uniform, as Wan initialises its linears
      lim = math.sqrt(6.0 / (din + dout))
      w = jax.random.uniform(key, (din, dout), jnp.float32, -lim, lim)
    else:
      w = std * jax.random.normal(key, (din, dout), jnp.float32)
    self.kernel = _param(w.astype(param_dtype), names)
    self.bias = _param(jnp.zeros((dout,), param_dtype), (names[1],))
    self.dtype = dtype
    self.lora_rank, self.lora_scale = int(lora_rank), float(lora_scale)
    if self.lora_rank:
      a = jax.random.normal(rngs.params(), (din, self.lora_rank), jnp.float32) / math.sqrt(din)
      self.lora_a = LoRAParam(a.astype(param_dtype), out_sharding=(names[0], None), eager_sharding=False)
      self.lora_b = LoRAParam(jnp.zeros((self.lora_rank, dout), param_dtype), out_sharding=(None, names[1]), eager_sharding=False)

  def __call__(self, x, out_dtype=None):
    xd = x.astype(self.dtype)
    y = _matmul(xd, self.kernel[...].astype(self.dtype))
    if self.lora_rank:
      h = jnp.einsum("...i,ir->...r", xd, self.lora_a[...].astype(self.dtype), preferred_element_type=jnp.float32)
      y = y + self.lora_scale * jnp.einsum("...r,ro->...o", h.astype(self.dtype), self.lora_b[...].astype(self.dtype), preferred_element_type=jnp.float32)
    return (y + self.bias[...].astype(jnp.float32)).astype(out_dtype or self.dtype)


def _tile_transpose(a):
  """`a [m, n]` -> `[n, m]`, as a copy: a transpose of 4-D tiles, which XLA:CPU keeps in bf16 and
  does not fold into the dot that consumes it (a plain `a.T` is folded back into the dot's
  dimension numbers, which is the slow form `_matmul` avoids)."""
  m, n = a.shape
  p, q = (next(t for t in (16, 8, 4, 2, 1) if d % t == 0) for d in (m, n))
  return a.reshape(m // p, p, n // q, q).transpose(2, 3, 0, 1).reshape(n, m)


@jax.custom_vjp
def _matmul_transposed_grads(x, w):
  return jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32)


def _matmul_fwd(x, w):
  return _matmul_transposed_grads(x, w), (x, w)


def _matmul_bwd(res, dy):
  x, w = res
  dy = dy.astype(x.dtype)
  dx = jnp.einsum("...o,oi->...i", dy, _tile_transpose(w), preferred_element_type=jnp.float32)
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # [S, Din], [S, Dout]
  dw = jnp.einsum("is,so->io", _tile_transpose(x2), dy2, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul_transposed_grads.defvjp(_matmul_fwd, _matmul_bwd)


def _matmul(x, w):
  """`x [..., Din] @ w [Din, Dout]` in float32 (accumulation and result).

  On CPU with 16-bit operands the gradients come from a custom VJP that transposes `x` and `w`
  first: autodiff's `dW = x^T dy` contracts the left operand over its major dimension, which
  XLA:CPU cannot hand to its bf16 matmul kernel, so it converts both operands to f32 and runs a
  generic dot (4x slower than the forward matmul; the whole small-config gradient 16% faster
  with this, CPU time). The cotangent is rounded to the operands' dtype first (autodiff would
  upcast the bf16 operand instead), as a TPU's default-precision matmul rounds f32 inputs to
  bf16. Elsewhere (and in f32, where it gains nothing) plain autodiff. The output is named
  `dense_out` so that the `dots` remat policy still saves it.
  """
  if jnp.dtype(x.dtype).itemsize == 2 and attn_lib.tracing_platform() == "cpu":
    return checkpoint_name(_matmul_transposed_grads(x, w), "dense_out")
  return jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32)


# Logical names of activations (asvd.sharding.DEFAULT_RULES maps them to mesh axes).
_RESIDUAL = ("batch", "frames", "act_tokens", "act_embed")  # [B, F, T, D]
_HEADS = attn_lib.Q_NAMES  # queries / attention output [B, F, T, H, Dh]
_KV_HEADS = ("batch", "kv_tokens", "heads", "head_dim")  # keys / values [B, N*T + S, H, Dh]
_KV_FRAMES = ("batch", "frames", "kv_tokens", "heads", "head_dim")  # own keys / values [B, F, T, H, Dh]: whole
_SMALL = ("batch", None, "act_embed")  # time / text embeddings [B, F or L, D]: width whole


def _layer(i, tree, n: int):
  """Layer `i` (traced) of a pytree of `[n, ...]` stacks, by a `lax.switch` over static slices.

  Not `stack[i]` (a dynamic slice, as `lax.scan` slices its `xs`): XLA:CPU has no bf16 dynamic
  slice, so it converts the whole bf16 stack (all layers' weights, or the whole KV cache) to f32
  before the loop, every call: 2x their bytes of temporaries (7 GB at 1.3B) and the traffic.
  Static slices in a switch stay bf16 and cost nothing on other platforms."""
  branches = [functools.partial(lambda j: jax.tree.map(lambda a: a[j], tree), j) for j in range(n)]
  return jax.lax.switch(i, branches)


def _with_key_bias(q, k, v, bias_s):
  """`(q, k, v)` widened so that any attention backend adds `bias_s[j]` to every logit of key
  token j: `q' = [q sqrt(D'/Dh), sqrt(D'), 0..]`, `k' = [k, bias, 0..]`, `v' = [v, 0..]`, so
  `q'.k' / sqrt(D') = q.k / sqrt(Dh) + bias` under the backends' own `1/sqrt(head dim)` scale
  (the output's extra columns are zeros and are cut off). The width grows by 8 (128 on TPU,
  whose kernels tile the head dimension by 128).

  Args:
    q: `[..., Sq, H, Dh]` queries (any leading layout the backends take).
    k: `[B, Sk, H, Dh]` keys; v: `[B, Sk, H, Dh]` values.
    bias_s: float `[Sk]` per key token.
  """
  dh = q.shape[-1]
  extra = 128 if attn_lib.tracing_platform() == "tpu" else 8
  dp = dh + extra
  pad_q = jnp.zeros((*q.shape[:-1], extra), q.dtype).at[..., 0].set(dp**0.5)
  q = jnp.concatenate([(q.astype(jnp.float32) * (dp / dh) ** 0.5).astype(q.dtype), pad_q], axis=-1)
  kb = jnp.zeros((*k.shape[:-1], extra), jnp.float32).at[..., 0].set(bias_s[None, :, None])
  k = jnp.concatenate([k, kb.astype(k.dtype)], axis=-1)
  v = jnp.concatenate([v, jnp.zeros((*v.shape[:-1], extra), v.dtype)], axis=-1)
  return q, k, v


def _layer_norm(x, eps, scale=None, bias=None):
  """LayerNorm in float32 (Wan's FP32LayerNorm); returns float32."""
  x = x.astype(jnp.float32)
  mu = x.mean(-1, keepdims=True)
  var = jnp.square(x - mu).mean(-1, keepdims=True)
  y = (x - mu) * jax.lax.rsqrt(var + eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y


def _rms_norm(x, scale, eps):
  x = x.astype(jnp.float32)
  y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps)
  return y * scale.astype(jnp.float32)


class Attention(nnx.Module):
  """Multi-head attention with RMSNorm on q and k over the full width (Wan's qk_norm)."""

  def __init__(self, cfg: DiTConfig, *, rngs):
    d, kw = cfg.dim, {"rngs": rngs, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype, **cfg.lora_kw}
    self.q = Dense(d, d, names=("embed", "heads"), **kw)
    self.k = Dense(d, d, names=("embed", "heads"), **kw)
    self.v = Dense(d, d, names=("embed", "heads"), **kw)
    self.o = Dense(d, d, names=("heads", "embed"), **kw)
    self.norm_q = _param(jnp.ones((d,), cfg.param_dtype), ("heads",))
    self.norm_k = _param(jnp.ones((d,), cfg.param_dtype), ("heads",))
    self.num_heads, self.eps, self.dtype = cfg.num_heads, cfg.eps, cfg.dtype

  def _heads(self, x):
    return x.reshape(*x.shape[:-1], self.num_heads, -1)

  def project_q(self, x):
    return self._heads(_rms_norm(self.q(x, jnp.float32), self.norm_q[...], self.eps).astype(self.dtype))

  def project_kv(self, x):
    k = _rms_norm(self.k(x, jnp.float32), self.norm_k[...], self.eps).astype(self.dtype)
    return self._heads(k), self._heads(self.v(x))


class Block(nnx.Module):
  """One Wan transformer block: modulated self-attention, text cross-attention, modulated FFN."""

  def __init__(self, cfg: DiTConfig, *, rngs):
    d = cfg.dim
    kw = {"rngs": rngs, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype}
    mod = jax.random.normal(rngs.params(), (6, d), jnp.float32) / math.sqrt(d)
    self.modulation = _param(mod.astype(cfg.param_dtype), (None, "embed"))
    self.self_attn = Attention(cfg, rngs=rngs)
    self.cross_attn = Attention(cfg, rngs=rngs)
    if cfg.cross_attn_norm:
      self.norm_cross_scale = _param(jnp.ones((d,), cfg.param_dtype), ("embed",))
      self.norm_cross_bias = _param(jnp.zeros((d,), cfg.param_dtype), ("embed",))
    self.ffn_in = Dense(d, cfg.ffn_dim, names=("embed", "mlp"), **kw, **cfg.lora_kw)
    self.ffn_out = Dense(cfg.ffn_dim, d, names=("mlp", "embed"), **kw, **cfg.lora_kw)
    self.cfg = cfg

  def text_kv(self, ctx_bld):
    """Cross-attention K/V `[B, Lt, H, Dh]` of the embedded text."""
    return self.cross_attn.project_kv(ctx_bld)

  def __call__(self, x_bftd, e_bf6d, rope, text_kv, slots, frame_mask, probe, key_bias=None):
    """Runs the block.

    Args:
      x_bftd: hidden states `[B, F, T, D]` (T tokens per latent frame).
      e_bf6d: float32 time projection `[B, F, 6, D]` (per-frame modulation).
      rope: `(cos_q, sin_q, cos_c, sin_c)`: angles of the own tokens `[B|1, S, Dh/2]` and of the
        cached slots (or None).
      text_kv: `(k, v)` `[B, Lt, H, Dh]` of the prompt.
      slots: `(k, v)` un-rotated cached K/V of this layer `[B, N*T, H, Dh]`, or None.
      frame_mask: bool `[B|1, F, N + F]` (`[B, 1, N + F]`: key-only; `[B|1, F, F]` without slots), or None.
      probe: also return the attention share per key frame.
      key_bias: float32 `[N + F]` logit bias per key frame (`KVSlots.bias`), or None.

    Returns:
      `(x_bftd, (k_own, v_own, share))`: new hidden states, this call's un-rotated K/V
      `[B, F*T, H, Dh]`, and the attention share `[B, N + F]` (or None).
    """
    cfg = self.cfg
    b, f, t, d = x_bftd.shape
    # Under a mesh (asvd.sharding.activation_sharding) the residual stream is pinned at block
    # boundaries: batch over data/fsdp, tokens over context, width whole.
    x_bftd = shard_lib.constrain(x_bftd, _RESIDUAL)
    mod = self.modulation[...].astype(jnp.float32)[None, None] + e_bf6d  # [B, F, 6, D]
    shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, :, i, None, :] for i in range(6))

    # 1. Self-attention over [cached slots; own tokens]. Queries keep the residual stream's
    # [B, F, T] layout (split the same way under a mesh); keys and values are flattened.
    h = (_layer_norm(x_bftd, cfg.eps) * (1 + scale) + shift).astype(cfg.dtype)
    q = self.self_attn.project_q(h)  # [B, F, T, H, Dh]
    # Projected where the tokens are (split over context under a mesh), then gathered whole:
    # un-rotated, this is what a cache stores.
    k_own, v_own = (shard_lib.constrain(a, _KV_FRAMES).reshape(b, f * t, *a.shape[3:]) for a in self.self_attn.project_kv(h))
    cos_q, sin_q, cos_c, sin_c = rope
    q = rope_lib.apply_rope(q, cos_q.reshape(cos_q.shape[0], f, t, -1), sin_q.reshape(sin_q.shape[0], f, t, -1))
    q = shard_lib.constrain(q, _HEADS)
    k = rope_lib.apply_rope(k_own, cos_q, sin_q)
    v = v_own
    if slots is not None:
      # Cached slots split over context (`tokens` rule) are gathered here, as stored (before RoPE).
      k_c, v_c = (shard_lib.constrain(a, _KV_HEADS) for a in slots)
      k = jnp.concatenate([rope_lib.apply_rope(k_c.astype(cfg.dtype), cos_c, sin_c), k], axis=1)
      v = jnp.concatenate([v_c.astype(cfg.dtype), v], axis=1)
    # Keys and values whole on every context shard (`kv_tokens`: all-gathered), heads over tensor.
    k, v = shard_lib.constrain(k, _KV_HEADS), shard_lib.constrain(v, _KV_HEADS)
    dh = q.shape[-1]
    if key_bias is not None:
      q, k, v = _with_key_bias(q, k, v, jnp.repeat(key_bias, k.shape[1] // key_bias.shape[0]))
    o, share = attn_lib.attend(cfg.attention, q, k, v, frame_mask, probe)
    o = o[..., :dh]
    o = checkpoint_name(shard_lib.constrain(o, _HEADS), "attn_out")
    o = self.self_attn.o(o.reshape(b, f, t, d), jnp.float32)
    x_bftd = (x_bftd.astype(jnp.float32) + o * gate).astype(cfg.dtype)

    # 2. Text cross-attention (affine pre-norm, no gate, padding tokens attended).
    h = x_bftd
    if cfg.cross_attn_norm:
      h = _layer_norm(h, cfg.eps, self.norm_cross_scale[...], self.norm_cross_bias[...])
    q = shard_lib.constrain(self.cross_attn.project_q(h.astype(cfg.dtype)), _HEADS)
    o, _ = attn_lib.attend(cfg.attention, q, text_kv[0].astype(cfg.dtype), text_kv[1].astype(cfg.dtype))
    o = self.cross_attn.o(o.reshape(b, f, t, d))
    x_bftd = x_bftd + o

    # 3. Feed-forward.
    h = (_layer_norm(x_bftd, cfg.eps) * (1 + c_scale) + c_shift).astype(cfg.dtype)
    h = jax.nn.gelu(self.ffn_in(h, jnp.float32), approximate=True).astype(cfg.dtype)
    h = checkpoint_name(h, "ffn_hidden")
    h = self.ffn_out(h, jnp.float32)
    x_bftd = (x_bftd.astype(jnp.float32) + h * c_gate).astype(cfg.dtype)
    return shard_lib.constrain(x_bftd, _RESIDUAL), (k_own, v_own, share)


def sinusoidal_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Wan's timestep embedding: `[cos | sin]` of `t * 10000^(-i / (dim/2))`, float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  ang = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)


# ------------------------------------------------------------------------------------------------
# The model.
# ------------------------------------------------------------------------------------------------


class WanDiT(nnx.Module):
  """Wan2.1 DiT with per-frame timesteps, explicit RoPE positions and an external KV cache.

  Call: `model(x, t, context)` with latents `x [B, F, H, W, C]`, timesteps `t [B, F]` (or `[B]`)
  in [0, 1000] and text embeddings `context [B, L, text_dim]`; returns the flow prediction
  (eps - x0) as float32 with the shape of `x`. See `__call__` for the cached form.
  """

  def __init__(self, cfg: DiTConfig | Any, *, rngs: nnx.Rngs):
    cfg = DiTConfig.from_config(cfg)
    self.cfg = cfg
    d = cfg.dim
    kw = {"rngs": rngs, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype}
    patch_in = cfg.in_channels * math.prod(cfg.patch_size)
    self.patch_embedding = Dense(patch_in, d, names=(None, "embed"), **kw)
    self.text_embedding_1 = Dense(cfg.text_dim, d, names=(None, "embed"), std=0.02, **kw)
    self.text_embedding_2 = Dense(d, d, names=("embed", None), std=0.02, **kw)
    self.time_embedding_1 = Dense(cfg.freq_dim, d, names=(None, "embed"), std=0.02, **kw)
    self.time_embedding_2 = Dense(d, d, names=("embed", None), std=0.02, **kw)
    self.time_projection = Dense(d, 6 * d, names=("embed", None), **kw)
    if cfg.scan_layers:

      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_blocks(r):
        return Block(cfg, rngs=r)

      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    head_mod = jax.random.normal(rngs.params(), (2, d), jnp.float32) / math.sqrt(d)
    self.head_modulation = _param(head_mod.astype(cfg.param_dtype), (None, "embed"))
    self.head = Dense(d, cfg.out_channels * math.prod(cfg.patch_size), names=("embed", None), **kw)

  # -- pieces ------------------------------------------------------------------------------------

  def embed_text(self, context):
    """Text MLP: `[B, L, text_dim]` -> `[B, text_len, D]`, zero-padding `L` up to `text_len` as Wan
    does, so the result never depends on how much padding the caller added."""
    if context.shape[-1] != self.cfg.text_dim:
      raise ValueError(
        f"context has width {context.shape[-1]} but model.text_dim={self.cfg.text_dim} "
        f"(context shape {context.shape}, expected [B, L, {self.cfg.text_dim}])"
      )
    n, lt = context.shape[-2], self.cfg.text_len
    if n > lt:
      raise ValueError(f"context has {n} tokens (shape {context.shape}); model.text_len={lt} is the most")
    if n < lt:  # Wan pads every prompt with zero rows to text_len; they are attended (bias != 0)
      context = jnp.pad(context, [(0, 0)] * (context.ndim - 2) + [(0, lt - n), (0, 0)])
    h = shard_lib.constrain(self.text_embedding_1(context, jnp.float32), _SMALL)
    return shard_lib.constrain(self.text_embedding_2(jax.nn.gelu(h, approximate=True)), _SMALL)

  def text_kv(self, context) -> TextKV:
    """Cross-attention K/V of every layer for a prompt, computed once and reused per chunk."""
    ctx = self.embed_text(context)
    if self.cfg.scan_layers:
      graphdef, state = nnx.split(self.blocks)

      def one(st):
        return nnx.merge(graphdef, st).text_kv(ctx)

      k, v = jax.lax.map(one, state)
    else:
      kv = [blk.text_kv(ctx) for blk in self.blocks]
      k, v = jnp.stack([a for a, _ in kv]), jnp.stack([b for _, b in kv])
    return TextKV(k=k, v=v)

  def time_embed(self, t_bf):
    """`[B, F]` timesteps -> (`temb [B, F, D]`, `e [B, F, 6, D]`), both float32."""
    s = sinusoidal_embedding(t_bf, self.cfg.freq_dim)
    h = shard_lib.constrain(self.time_embedding_1(s, jnp.float32), _SMALL)
    temb = shard_lib.constrain(self.time_embedding_2(jax.nn.silu(h), jnp.float32), _SMALL)
    e = shard_lib.constrain(self.time_projection(jax.nn.silu(temb), jnp.float32), _SMALL)
    return temb, e.reshape(*e.shape[:-1], 6, self.cfg.dim)

  def patchify(self, x):
    """`[B, F, H, W, C]` -> tokens `[B, f, h*w, D]` (patch embedding)."""
    pt, ph, pw = self.cfg.patch_size
    b, f, hh, ww, c = x.shape
    x = x.reshape(b, f // pt, pt, hh // ph, ph, ww // pw, pw, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, f // pt, (hh // ph) * (ww // pw), -1)
    return shard_lib.constrain(self.patch_embedding(x), _RESIDUAL)

  def unpatchify(self, y, f, hp, wp):
    """Head output `[B, f, hp*wp, pt*ph*pw*C]` -> `[B, F, H, W, C]`."""
    pt, ph, pw = self.cfg.patch_size
    b = y.shape[0]
    y = y.reshape(b, f, hp, wp, pt, ph, pw, -1)
    return y.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, f * pt, hp * ph, wp * pw, -1)

  def check_inputs(self, x, t):
    cfg = self.cfg
    if x.ndim != 5:
      raise ValueError(f"x must be [B, F, H, W, C] latents, got shape {x.shape}")
    b, f, hh, ww, c = x.shape
    pt, ph, pw = cfg.patch_size
    if c != cfg.in_channels:
      raise ValueError(f"x has {c} channels (shape {x.shape}) but model.in_channels={cfg.in_channels}")
    if f % pt or hh % ph or ww % pw:
      raise ValueError(f"x shape {x.shape}: F, H, W must be divisible by patch size {cfg.patch_size}")
    t = jnp.asarray(t)
    if t.ndim == 0:
      t = jnp.full((b, f), t)
    elif t.ndim == 1:
      if t.shape[0] != b:
        raise ValueError(f"t of shape {t.shape} must be [B]={b} or [B, F]=({b}, {f})")
      t = jnp.broadcast_to(t[:, None], (b, f))
    elif t.shape != (b, f):
      raise ValueError(f"t of shape {t.shape} must be [B, F]=({b}, {f}) (one timestep per frame)")
    return t[:, ::pt]

  # -- forward -----------------------------------------------------------------------------------

  def __call__(
    self,
    x,
    t,
    context,
    *,
    positions=None,
    token_ids=None,
    frame_mask=None,
    slots: KVSlots | None = None,
    return_kv: bool = False,
    probe: bool = False,
  ):
    """Predicts the flow `eps - x0`.

    Args:
      x: latents `[B, F, H, W, C]`.
      t: timesteps `[B, F]` (one per latent frame), `[B]` or a scalar, in [0, 1000].
      context: text embeddings `[B, L, text_dim]`, or a precomputed `TextKV`.
      positions: int `[F]` or `[B, F]` temporal RoPE index of each frame (default 0..F-1).
      token_ids: int `[S, 3]` or `[B, S, 3]` explicit (t, h, w) RoPE indices per token (overrides
        `positions`; S = F * H/2 * W/2, frame-major).
      frame_mask: bool `[F, F]` or `[B, F, F]`: frame i may attend own frame j (default all).
        Slots are governed by `slots.valid`.
      slots: cached un-rotated K/V to attend to (call form (b)).
      return_kv: also return this call's un-rotated K/V `[L, B, S, H, Dh]`.
      probe: also return the attention share per key frame `[L, B, N + F]` (slots first).

    Returns:
      `flow` float32 with the shape of `x`; with `return_kv` or `probe` a tuple
      `(flow, aux)` where `aux` is a dict with `k`, `v` and/or `share`.
    """
    cfg = self.cfg
    t_bf = self.check_inputs(x, t)
    b, f_in, hh, ww, _ = x.shape
    pt, ph, pw = cfg.patch_size
    f, hp, wp = f_in // pt, hh // ph, ww // pw
    tokens = hp * wp

    # RoPE angles of own tokens and of the cached slots.
    if token_ids is None:
      pos = jnp.arange(f, dtype=jnp.int32) if positions is None else jnp.asarray(positions)
      if pos.shape[-1] != f:
        raise ValueError(f"positions has shape {pos.shape}; expected [{f}] or [B, {f}]")
      token_ids = rope_lib.grid_ids(pos, hp, wp)
    token_ids = jnp.asarray(token_ids)
    if token_ids.shape[-2:] != (f * tokens, 3):
      raise ValueError(f"token_ids has shape {token_ids.shape}; expected [{f * tokens}, 3]")
    rope_kw = {"max_pos": cfg.rope_max_seq_len, "theta": cfg.rope_theta}
    cos_q, sin_q = rope_lib.rope_cos_sin(token_ids, cfg.head_dim, **rope_kw)
    if cos_q.ndim == 2:
      cos_q, sin_q = cos_q[None], sin_q[None]
    cos_c = sin_c = None
    n = 0
    if slots is not None:
      n = slots.num_slots
      if slots.k.shape[2] != n * tokens:
        raise ValueError(
          f"slots hold {slots.k.shape[2]} tokens for {n} slots but a frame of x has {tokens} tokens"
        )
      cos_c, sin_c = rope_lib.rope_cos_sin(rope_lib.grid_ids(slots.positions, hp, wp), cfg.head_dim, **rope_kw)
      if cos_c.ndim == 2:
        cos_c, sin_c = cos_c[None], sin_c[None]

    # Frame-level mask over [slots; own frames].
    own = jnp.ones((1, f, f), bool) if frame_mask is None else jnp.asarray(frame_mask, bool)
    if own.ndim == 2:
      own = own[None]
    if slots is not None and frame_mask is None:
      # Key-only (one row for every query frame): kernels skip or cut invalid slots, no dense mask.
      valid = slots.valid.astype(bool)[:, None, :]  # [B, 1, N]
      mask = jnp.concatenate([valid, jnp.ones((valid.shape[0], 1, f), bool)], axis=-1)
    elif slots is not None:
      slot_mask = jnp.broadcast_to(slots.valid[:, None, :].astype(bool), (slots.valid.shape[0], f, n))
      own = jnp.broadcast_to(own, (slot_mask.shape[0], f, f))
      mask = jnp.concatenate([slot_mask, own], axis=-1)
    else:
      mask = None if frame_mask is None else own
    key_bias = None
    if slots is not None and slots.bias is not None:  # [N + F]: the own frames get none
      key_bias = jnp.concatenate([jnp.broadcast_to(jnp.asarray(slots.bias, jnp.float32), (n,)), jnp.zeros((f,), jnp.float32)])

    temb, e = self.time_embed(t_bf)  # [B, f, D], [B, f, 6, D]
    h = self.patchify(x.astype(cfg.dtype)).reshape(b, f, tokens, cfg.dim)
    text = context if isinstance(context, TextKV) else None
    ctx = None if text is not None else self.embed_text(jnp.asarray(context))

    def run_block(blk, h, layer_slots, layer_text):
      tkv = blk.text_kv(ctx) if layer_text is None else layer_text
      return blk(h, e, (cos_q, sin_q, cos_c, sin_c), tkv, layer_slots, mask, probe, key_bias)

    slot_xs = None if slots is None else (slots.k, slots.v)
    text_xs = None if text is None else (text.k, text.v)
    if cfg.scan_layers:
      graphdef, state = nnx.split(self.blocks)
      stacks = (state, slot_xs, text_xs)

      def body(h, i):
        st, layer_slots, layer_text = _layer(i, stacks, cfg.num_layers)
        h, (k, v, share) = run_block(nnx.merge(graphdef, st), h, layer_slots, layer_text)
        return h, (k if return_kv else None, v if return_kv else None, share)

      policy = _REMAT_POLICIES[cfg.remat]
      if policy is not None:
        body = jax.checkpoint(body, policy=policy)
      h, (ks, vs, shares) = jax.lax.scan(body, h, jnp.arange(cfg.num_layers))
    else:
      outs = []
      for i, blk in enumerate(self.blocks):
        ls = None if slot_xs is None else (slot_xs[0][i], slot_xs[1][i])
        lt = None if text_xs is None else (text_xs[0][i], text_xs[1][i])
        h, o = run_block(blk, h, ls, lt)
        outs.append(o)
      ks = jnp.stack([o[0] for o in outs]) if return_kv else None
      vs = jnp.stack([o[1] for o in outs]) if return_kv else None
      shares = jnp.stack([o[2] for o in outs]) if probe else None

    # Head: 2-vector modulation from the (pre-projection) time embedding.
    hm = self.head_modulation[...].astype(jnp.float32)[None, None] + temb[:, :, None, :]
    shift, scale = hm[:, :, 0, None, :], hm[:, :, 1, None, :]
    y = (_layer_norm(h, cfg.eps) * (1 + scale) + shift).astype(cfg.dtype)
    flow = self.unpatchify(self.head(y, jnp.float32), f, hp, wp)
    if not (return_kv or probe):
      return flow
    aux = {}
    if return_kv:
      aux["k"], aux["v"] = ks, vs
    if probe:
      aux["share"] = shares
    return flow, aux


# ------------------------------------------------------------------------------------------------
# Construction helpers.
# ------------------------------------------------------------------------------------------------


def compute_settings(model_config: Any) -> dict:
  """`{attention, remat, scan_layers}` of a `model` config section: what to pass as overrides
  when loading a checkpoint so the config still chooses how it computes."""
  cfg = DiTConfig.from_config(model_config)
  return {k: getattr(cfg, k) for k in DiTConfig.COMPUTE_FIELDS}


def init_dit(model_config: Any, key: jax.Array | int = 0) -> WanDiT:
  """A randomly initialised `WanDiT`.

  Args:
    model_config: the `model` section of a config (ConfigDict, dict or `DiTConfig`).
    key: a `jax.random.key` / PRNGKey or an int seed.

  Returns:
    The model (eager arrays).
  """
  if isinstance(key, int):
    key = jax.random.key(key)
  return WanDiT(DiTConfig.from_config(model_config), rngs=nnx.Rngs(params=key))


def abstract_dit(model_config: Any) -> WanDiT:
  """The model with `ShapeDtypeStruct` leaves (no memory): for shapes, counts and loading."""
  cfg = DiTConfig.from_config(model_config)
  return nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(params=0)))


def count_params(model: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def block_causal_mask(num_frames: int, chunk: int, first: int = 0) -> np.ndarray:
  """Frame mask `[F, F]`: a frame sees every frame up to the end of its own chunk.

  Args:
    num_frames: F.
    chunk: frames per chunk.
    first: size of a lone leading block (e.g. an anchor/state frame), 0 for none.
  """
  block = np.empty(num_frames, np.int64)
  block[:first] = 0
  block[first:] = (np.arange(num_frames - first) // chunk) + (1 if first else 0)
  return block[None, :] <= block[:, None]


def stack_layers(per_layer: list[Mapping]) -> dict:
  """Stacks per-layer pure dicts (python-loop layout) into the scanned layout."""
  return jax.tree.map(lambda *xs: np.stack(xs), *per_layer)


def unstack_layers(stacked: Mapping, num_layers: int) -> list[dict]:
  """Splits a scanned-layout pure dict into per-layer dicts."""
  return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)]
