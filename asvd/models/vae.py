"""The Wan2.1 video VAE in Flax NNX, channels-last, with a functional streaming-decode cache.

`WanVAE` reproduces diffusers' `AutoencoderKLWan` (the Wan2.1 layout, `is_residual=False`):
a causal 3D-conv encoder and decoder built from RMS-normalised residual blocks, a single-head
spatial attention block in the middle, spatial / temporal resampling and 1x1x1 "quant" convs.

Layout is channels-last everywhere:

* pixels  `[B, T, H, W, C]` in [-1, 1] (C = 3),
* latents `[B, F, h, w, z_dim]`, **normalised** with the published per-channel
  `latents_mean` / `latents_std` (`z = (mu - mean) / std`), the form the DiT consumes.

Time is causal. With the Wan2.1 layout (two temporal /2 stages, `temporal_factor` 4) the first
latent frame covers 1 pixel frame and every later latent covers 4, so T = 1 + 4 (F - 1).

Every 3-tap causal conv sees the last 2 input frames of the previous call (a "feature cache"),
which is what lets the decoder run one latent frame at a time, as the reference does, and
what makes streaming decode possible. Here the cache is an explicit pytree of zero-initialised
arrays with static shapes (`DecodeCache`), so

    cache = vae.init_decode_cache(batch, h, w)
    for z_chunk in chunks:                        # any number of latent frames per chunk
      pixels, cache = vae.decode_chunk(z_chunk, cache)

yields the same pixels as `vae.decode(z)` on the whole latent video. The public methods run
jitted (the module is split into a static graph and a state pytree per call, merged inside
`jax.jit`), and they are pure functions of arrays, so they also work inside a caller's own
`jax.jit` / `jax.lax.scan`.

Weights: `load_vae` reads a diffusers `AutoencoderKLWan` folder or the original
`Wan2.1_VAE.pth` (see `asvd.ckpt.vae_port`); `init_vae` builds a randomly initialised model.
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

Array = jax.Array

# Frames of history a 3-tap causal conv needs from the previous call.
CACHE_T = 2
# The encoder consumes the first pixel frame alone, then pixel frames in chunks of this many
# (fixed in the reference implementation, whatever the temporal factor).
ENCODE_CHUNK = 4

# Published per-channel statistics of the Wan2.1 latent space.
WAN21_LATENTS_MEAN = (
  -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
  0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
  2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# ------------------------------------------------------------------------------------------------
# Config.
# ------------------------------------------------------------------------------------------------

# diffusers config.json keys that carry no information for this model.
_IGNORED_KEYS = frozenset({"dropout", "scale_factor_temporal", "scale_factor_spatial"})


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Static description of a `WanVAE`; field names follow diffusers' `AutoencoderKLWan`.

  The defaults are the published Wan2.1 VAE (126,892,531 parameters). As in diffusers,
  `attn_scales` adds attention blocks to the encoder's down path only (Wan2.1 uses none).
  """

  base_dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_scales: tuple[float, ...] = ()
  # One flag per down stage (len(dim_mult) - 1); diffusers spells it this way.
  temperal_downsample: tuple[bool, ...] = (False, True, True)
  latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
  latents_std: tuple[float, ...] = WAN21_LATENTS_STD
  decoder_base_dim: int | None = None
  in_channels: int = 3
  out_channels: int = 3

  def __post_init__(self):
    # Lists from JSON / ConfigDicts become tuples so the config stays hashable (it is static
    # metadata of the module graph, hence part of the jit cache key).
    casts = {
      "dim_mult": int,
      "attn_scales": float,
      "temperal_downsample": bool,
      "latents_mean": float,
      "latents_std": float,
    }
    for name, cast in casts.items():
      object.__setattr__(self, name, tuple(cast(v) for v in getattr(self, name)))
    if len(self.temperal_downsample) != len(self.dim_mult) - 1:
      raise ValueError(
        f"temperal_downsample needs one flag per down stage ({len(self.dim_mult) - 1}), "
        f"got {self.temperal_downsample}"
      )
    if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
      raise ValueError(
        f"latents_mean / latents_std need z_dim={self.z_dim} entries, got "
        f"{len(self.latents_mean)} / {len(self.latents_std)}"
      )

  @property
  def temporal_factor(self) -> int:
    """Pixel frames per latent frame after the first one."""
    return 2 ** sum(self.temperal_downsample)

  @property
  def spatial_factor(self) -> int:
    """Pixels per latent along H and W."""
    return 2 ** (len(self.dim_mult) - 1)

  @classmethod
  def from_any(cls, cfg: Any) -> VAEConfig:
    """Builds a config from a `VAEConfig`, a dict (e.g. diffusers' config.json) or a ConfigDict.

    Keys starting with "_" (diffusers bookkeeping) and keys without meaning here (dropout, the
    derived scale factors) are ignored; unsupported variants (Wan2.2's residual VAE, patching)
    and unknown keys raise.

    Args:
      cfg: the config.

    Returns:
      The `VAEConfig`.
    """
    if isinstance(cfg, VAEConfig):
      return cfg
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
      cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
      raise TypeError(f"expected a VAEConfig, dict or ConfigDict, got {type(cfg).__name__}")
    d = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in _IGNORED_KEYS}
    if d.pop("is_residual", False):
      raise ValueError("the residual (Wan2.2) VAE variant (is_residual=True) is not supported")
    if d.pop("patch_size", None) is not None:
      raise ValueError("patchified VAEs (patch_size != None, Wan2.2) are not supported")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown VAE config key(s): {unknown}")
    return cls(**d)


# ------------------------------------------------------------------------------------------------
# Layers.
# ------------------------------------------------------------------------------------------------

# PyTorch's default conv/linear init (kaiming-uniform with a = sqrt(5)) is U(+-1/sqrt(fan_in)).
_kernel_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class CausalConv3d(nnx.Module):
  """3D conv, zero-padded in space and causally in time from a cache of past input frames.

  A temporal padding `p` of the reference means `2p` past frames on the left and none on the
  right; those past frames come from `cache` (zeros at the start of a video).
  """

  def __init__(
    self,
    in_dim: int,
    out_dim: int,
    kernel_size: int | tuple[int, int, int],
    *,
    stride_t: int = 1,
    padding: int | tuple[int, int, int] = 0,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    ks = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    pad = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
    self.in_dim = in_dim
    self.stride_t = stride_t
    self.pad_hw = (pad[1], pad[2])
    self.cache_t = 2 * pad[0]  # causal left context in frames
    # [kt, kh, kw, in, out]
    self.kernel = nnx.Param(_kernel_init(rngs.params(), (*ks, in_dim, out_dim), dtype))
    self.bias = nnx.Param(jnp.zeros((out_dim,), dtype))

  def init_cache(self, batch: int, h: int, w: int, dtype: Any) -> Array | None:
    """Zero history `[B, cache_t, h, w, in_dim]`, or None for convs without temporal context."""
    if not self.cache_t:
      return None
    return jnp.zeros((batch, self.cache_t, h, w, self.in_dim), dtype)

  def __call__(self, x_bthwc: Array, cache: Array | None = None) -> tuple[Array, Array | None]:
    """Applies the conv.

    Args:
      x_bthwc: input frames `[B, T, H, W, in_dim]`.
      cache: the last `cache_t` input frames of the previous call `[B, cache_t, H, W, in_dim]`;
        None means "start of the video" (zeros).

    Returns:
      `(y [B, T', H, W, out_dim], new_cache)`; new_cache holds the last `cache_t` frames of
      `concat(cache, x)` (None when the conv has no temporal context).
    """
    new_cache = None
    if self.cache_t:
      if cache is None:
        cache = self.init_cache(x_bthwc.shape[0], x_bthwc.shape[2], x_bthwc.shape[3], x_bthwc.dtype)
      x_bthwc = jnp.concatenate([cache.astype(x_bthwc.dtype), x_bthwc], axis=1)
      # The cache keeps its own dtype (a bf16 cache under an f32 decode halves its bytes).
      new_cache = x_bthwc[:, -self.cache_t :].astype(cache.dtype)
    ph, pw = self.pad_hw
    y = jax.lax.conv_general_dilated(
      x_bthwc,
      self.kernel[...],
      window_strides=(self.stride_t, 1, 1),
      padding=((0, 0), (ph, ph), (pw, pw)),
      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
    )
    if new_cache is not None and new_cache.dtype == x_bthwc.dtype:
      # A data dependency of the new history on the conv's output, so that it is written only
      # after the old history's last read: XLA otherwise computes it from `x` early and, in a
      # loop that carries the cache (the decoder's per-latent scan), protects the carried
      # buffer with two copies of every cache entry per step (7.7 GB per chunk at 480x832;
      # temporaries 4.36 -> 4.05 GB). Not for a cache of another dtype: there the late write
      # keeps the full-precision input alive through the conv (+0.46 GB of temporaries, more
      # than the half-size copies cost). (`0 * y` is not folded away; a non-finite output
      # would poison the cache, as it would the pixels.)
      new_cache = new_cache + 0 * y[:1, :1, :1, :1, :1]
    return y + self.bias[...], new_cache


class Conv2d(nnx.Module):
  """Per-frame 2D conv on `[N, H, W, C]` with explicit (possibly asymmetric) zero padding."""

  def __init__(
    self,
    in_dim: int,
    out_dim: int,
    *,
    stride: int = 1,
    padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1)),
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.stride = stride
    self.padding = padding
    # [kh, kw, in, out]
    self.kernel = nnx.Param(_kernel_init(rngs.params(), (3, 3, in_dim, out_dim), dtype))
    self.bias = nnx.Param(jnp.zeros((out_dim,), dtype))

  def __call__(self, x_nhwc: Array) -> Array:
    y = jax.lax.conv_general_dilated(
      x_nhwc,
      self.kernel[...],
      window_strides=(self.stride, self.stride),
      padding=self.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + self.bias[...]


class RMSNorm(nnx.Module):
  """`x / ||x||_2 * sqrt(C) * gamma` over channels (torch `F.normalize`, eps 1e-12 on the norm)."""

  def __init__(self, dim: int, *, dtype: Any = jnp.float32):
    self.scale = math.sqrt(dim)
    self.gamma = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x: Array) -> Array:
    # The sum of squares runs in float32 so bf16 activations do not overflow / lose the norm.
    x32 = x.astype(jnp.float32)
    sq = jnp.sum(jnp.square(x32), axis=-1, keepdims=True)
    # max(||x||, 1e-12) == sqrt(max(||x||^2, 1e-24))
    normed = (x32 * jax.lax.rsqrt(jnp.maximum(sq, 1e-24))).astype(x.dtype)
    return normed * self.scale * self.gamma[...]


class ResidualBlock(nnx.Module):
  """norm-SiLU-conv3d twice plus a (1x1x1 conv when the width changes) shortcut."""

  def __init__(self, in_dim: int, out_dim: int, *, dtype: Any, rngs: nnx.Rngs):
    self.norm1 = RMSNorm(in_dim, dtype=dtype)
    self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1, dtype=dtype, rngs=rngs)
    self.norm2 = RMSNorm(out_dim, dtype=dtype)
    self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1, dtype=dtype, rngs=rngs)
    self.conv_shortcut = (
      CausalConv3d(in_dim, out_dim, 1, dtype=dtype, rngs=rngs) if in_dim != out_dim else None
    )

  def init_cache(self, batch: int, h: int, w: int, dtype: Any) -> dict[str, Array]:
    return {
      "conv1": self.conv1.init_cache(batch, h, w, dtype),
      "conv2": self.conv2.init_cache(batch, h, w, dtype),
    }

  def __call__(self, x_bthwc: Array, cache: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    shortcut = x_bthwc if self.conv_shortcut is None else self.conv_shortcut(x_bthwc)[0]
    h = jax.nn.silu(self.norm1(x_bthwc))
    h, c1 = self.conv1(h, cache["conv1"])
    # Dropout of the reference is inference-inactive and omitted.
    h = jax.nn.silu(self.norm2(h))
    h, c2 = self.conv2(h, cache["conv2"])
    return h + shortcut, {"conv1": c1, "conv2": c2}


class AttentionBlock(nnx.Module):
  """Single-head self-attention over the H*W positions of each frame (no temporal mixing)."""

  def __init__(self, dim: int, *, dtype: Any, rngs: nnx.Rngs):
    self.norm = RMSNorm(dim, dtype=dtype)
    # The reference uses 1x1 Conv2d's; channels-last they are plain dense layers [in, out].
    self.to_qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, param_dtype=dtype, rngs=rngs)

  def init_cache(self, batch: int, h: int, w: int, dtype: Any) -> dict[str, Array]:
    del batch, h, w, dtype  # per-frame: nothing to carry
    return {}

  def __call__(self, x_bthwc: Array, cache: dict[str, Array] | None = None):
    b, t, h, w, c = x_bthwc.shape
    x_nlc = self.norm(x_bthwc).reshape(b * t, h * w, c)
    qkv = self.to_qkv(x_nlc)
    # [N, L, 1 head, C] each; the channel order of the fused projection is q | k | v.
    q, k, v = (a[:, :, None, :] for a in jnp.split(qkv, 3, axis=-1))
    o_nlc = jax.nn.dot_product_attention(q, k, v)[:, :, 0, :]
    o = self.proj(o_nlc).reshape(b, t, h, w, c)
    return o + x_bthwc, cache


class Resample(nnx.Module):
  """Spatial x2 / /2 (per-frame 2D conv), optionally with a causal temporal x2 / /2.

  Modes: "upsample2d", "upsample3d" (nearest-neighbour x2 then a 3x3 conv to `out_dim`, the 3d
  variant first doubling the frame count with a causal (3,1,1) conv to 2*dim channels that are
  interleaved in time), "downsample2d", "downsample3d" (right/bottom zero pad then a stride-2
  3x3 conv, the 3d variant then halving the frames with a stride-2 (3,1,1) conv over the last
  frame of the previous call plus the current frames).

  The first call of a video (`first=True`) skips the temporal part: the first frame of a video
  is neither duplicated (decoder) nor merged (encoder), giving the 1 + 4k frame structure.
  """

  def __init__(
    self, dim: int, mode: str, out_dim: int | None = None, *, dtype: Any, rngs: nnx.Rngs
  ):
    if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
      raise ValueError(f"unknown resample mode {mode!r}")
    self.mode = mode
    self.dim = dim
    if mode.startswith("upsample"):
      out_dim = dim // 2 if out_dim is None else out_dim
      self.resample = Conv2d(dim, out_dim, dtype=dtype, rngs=rngs)
    else:
      # torch ZeroPad2d((0, 1, 0, 1)): one extra row / column at the bottom / right.
      self.resample = Conv2d(dim, dim, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)
    if mode == "upsample3d":
      self.time_conv = CausalConv3d(
        dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), dtype=dtype, rngs=rngs
      )
    elif mode == "downsample3d":
      self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride_t=2, dtype=dtype, rngs=rngs)
    else:
      self.time_conv = None

  def init_cache(self, batch: int, h: int, w: int, dtype: Any) -> dict[str, Array]:
    if self.mode == "upsample3d":
      return {"time_conv": self.time_conv.init_cache(batch, h, w, dtype)}
    if self.mode == "downsample3d":
      # The last (spatially downsampled) frame of the previous call.
      return {"time_conv": jnp.zeros((batch, 1, h // 2, w // 2, self.dim), dtype)}
    return {}

  def __call__(
    self, x_bthwc: Array, cache: dict[str, Array], *, first: bool = False
  ) -> tuple[Array, dict[str, Array]]:
    cache = dict(cache)
    if self.mode == "upsample3d" and not first:
      y, cache["time_conv"] = self.time_conv(x_bthwc, cache["time_conv"])
      b, t, h, w, c2 = y.shape
      # Channels [phase 0 | phase 1] -> frames (t0 p0, t0 p1, t1 p0, ...).
      y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5)
      x_bthwc = y.reshape(b, 2 * t, h, w, c2 // 2)

    b, t, h, w, c = x_bthwc.shape
    x_nhwc = x_bthwc.reshape(b * t, h, w, c)
    if self.mode.startswith("upsample"):
      # nearest-exact with an integer factor 2 is plain pixel repetition.
      x_nhwc = jnp.repeat(jnp.repeat(x_nhwc, 2, axis=1), 2, axis=2)
    x_nhwc = self.resample(x_nhwc)
    x_bthwc = x_nhwc.reshape(b, t, *x_nhwc.shape[1:])

    if self.mode == "downsample3d":
      last = x_bthwc[:, -1:]
      if not first:
        x_bthwc, _ = self.time_conv(
          jnp.concatenate([cache["time_conv"].astype(x_bthwc.dtype), x_bthwc], axis=1)
        )
      cache["time_conv"] = last
    return x_bthwc, cache


class MidBlock(nnx.Module):
  """residual -> attention -> residual at the lowest resolution."""

  def __init__(self, dim: int, *, dtype: Any, rngs: nnx.Rngs):
    self.resnets = nnx.List(
      [
        ResidualBlock(dim, dim, dtype=dtype, rngs=rngs),
        ResidualBlock(dim, dim, dtype=dtype, rngs=rngs),
      ]
    )
    self.attentions = nnx.List([AttentionBlock(dim, dtype=dtype, rngs=rngs)])

  def init_cache(self, batch: int, h: int, w: int, dtype: Any) -> dict[str, Any]:
    return {"resnets": [r.init_cache(batch, h, w, dtype) for r in self.resnets]}

  def __call__(self, x: Array, cache: dict[str, Any]) -> tuple[Array, dict[str, Any]]:
    x, c0 = self.resnets[0](x, cache["resnets"][0])
    x, _ = self.attentions[0](x)
    x, c1 = self.resnets[1](x, cache["resnets"][1])
    return x, {"resnets": [c0, c1]}


class Encoder(nnx.Module):
  """Pixels `[B, T, H, W, in]` -> `[B, F, H/s, W/s, 2 z_dim]` (mean | log-variance)."""

  def __init__(self, cfg: VAEConfig, *, dtype: Any, rngs: nnx.Rngs):
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1, dtype=dtype, rngs=rngs)
    layers = []
    scale = 1.0
    last = len(cfg.dim_mult) - 1
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(cfg.num_res_blocks):
        layers.append(ResidualBlock(in_dim, out_dim, dtype=dtype, rngs=rngs))
        if scale in cfg.attn_scales:
          layers.append(AttentionBlock(out_dim, dtype=dtype, rngs=rngs))
        in_dim = out_dim
      if i != last:
        mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
        layers.append(Resample(out_dim, mode, dtype=dtype, rngs=rngs))
        scale /= 2.0
    self.down_blocks = nnx.List(layers)
    self.mid_block = MidBlock(dims[-1], dtype=dtype, rngs=rngs)
    self.norm_out = RMSNorm(dims[-1], dtype=dtype)
    self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1, dtype=dtype, rngs=rngs)

  def init_cache(self, batch: int, h: int, w: int, dtype: Any) -> dict[str, Any]:
    """Zero cache for pixel frames of size h x w."""
    cache = {"conv_in": self.conv_in.init_cache(batch, h, w, dtype), "down_blocks": []}
    for layer in self.down_blocks:
      cache["down_blocks"].append(layer.init_cache(batch, h, w, dtype))
      if isinstance(layer, Resample):
        h, w = h // 2, w // 2
    cache["mid_block"] = self.mid_block.init_cache(batch, h, w, dtype)
    cache["conv_out"] = self.conv_out.init_cache(batch, h, w, dtype)
    return cache

  def __call__(
    self, x: Array, cache: dict[str, Any], *, first: bool
  ) -> tuple[Array, dict[str, Any]]:
    new = {"down_blocks": []}
    x, new["conv_in"] = self.conv_in(x, cache["conv_in"])
    for layer, c in zip(self.down_blocks, cache["down_blocks"]):
      if isinstance(layer, Resample):
        x, c = layer(x, c, first=first)
      else:
        x, c = layer(x, c)
      new["down_blocks"].append(c)
    x, new["mid_block"] = self.mid_block(x, cache["mid_block"])
    x = jax.nn.silu(self.norm_out(x))
    x, new["conv_out"] = self.conv_out(x, cache["conv_out"])
    return x, new


class UpBlock(nnx.Module):
  """`num_res_blocks + 1` residual blocks, then an optional `Resample` (in `upsamplers[0]`)."""

  def __init__(
    self,
    in_dim: int,
    out_dim: int,
    num_res_blocks: int,
    mode: str | None,
    *,
    dtype: Any,
    rngs: nnx.Rngs,
  ):
    blocks = []
    for _ in range(num_res_blocks + 1):
      blocks.append(ResidualBlock(in_dim, out_dim, dtype=dtype, rngs=rngs))
      in_dim = out_dim
    self.resnets = nnx.List(blocks)
    self.upsamplers = (
      nnx.List([Resample(out_dim, mode, dtype=dtype, rngs=rngs)]) if mode is not None else None
    )

  def init_cache(self, batch: int, h: int, w: int, dtype: Any) -> dict[str, Any]:
    return {
      "resnets": [r.init_cache(batch, h, w, dtype) for r in self.resnets],
      "upsamplers": [u.init_cache(batch, h, w, dtype) for u in (self.upsamplers or ())],
    }

  def __call__(
    self, x: Array, cache: dict[str, Any], *, first: bool
  ) -> tuple[Array, dict[str, Any]]:
    new = {"resnets": [], "upsamplers": []}
    for r, c in zip(self.resnets, cache["resnets"]):
      x, c = r(x, c)
      new["resnets"].append(c)
    for u, c in zip(self.upsamplers or (), cache["upsamplers"]):
      x, c = u(x, c, first=first)
      new["upsamplers"].append(c)
    return x, new


class Decoder(nnx.Module):
  """Latents (un-normalised, after post_quant_conv) `[B, F, h, w, z]` -> pixels."""

  def __init__(self, cfg: VAEConfig, *, dtype: Any, rngs: nnx.Rngs):
    base = cfg.decoder_base_dim or cfg.base_dim
    dims = [base * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    temporal_up = cfg.temperal_downsample[::-1]
    self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1, dtype=dtype, rngs=rngs)
    self.mid_block = MidBlock(dims[0], dtype=dtype, rngs=rngs)
    blocks = []
    last = len(cfg.dim_mult) - 1
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      # Every Resample halves the width it outputs, so later stages start at half width.
      if i > 0:
        in_dim //= 2
      mode = None
      if i != last:
        mode = "upsample3d" if temporal_up[i] else "upsample2d"
      blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, mode, dtype=dtype, rngs=rngs))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm(dims[-1], dtype=dtype)
    self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1, dtype=dtype, rngs=rngs)

  def init_cache(self, batch: int, h: int, w: int, dtype: Any) -> dict[str, Any]:
    """Zero cache for latent frames of size h x w."""
    cache = {
      "conv_in": self.conv_in.init_cache(batch, h, w, dtype),
      "mid_block": self.mid_block.init_cache(batch, h, w, dtype),
      "up_blocks": [],
    }
    for block in self.up_blocks:
      cache["up_blocks"].append(block.init_cache(batch, h, w, dtype))
      if block.upsamplers is not None:
        h, w = 2 * h, 2 * w
    cache["conv_out"] = self.conv_out.init_cache(batch, h, w, dtype)
    return cache

  def __call__(
    self, x: Array, cache: dict[str, Any], *, first: bool
  ) -> tuple[Array, dict[str, Any]]:
    new = {"up_blocks": []}
    x, new["conv_in"] = self.conv_in(x, cache["conv_in"])
    x, new["mid_block"] = self.mid_block(x, cache["mid_block"])
    for block, c in zip(self.up_blocks, cache["up_blocks"]):
      x, c = block(x, c, first=first)
      new["up_blocks"].append(c)
    x = jax.nn.silu(self.norm_out(x))
    x, new["conv_out"] = self.conv_out(x, cache["conv_out"])
    return x, new


# ------------------------------------------------------------------------------------------------
# Streaming-decode cache.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeCache:
  """Decoder state between `WanVAE.decode_chunk` calls (a pytree with static shapes).

  Attributes:
    convs: nested dicts / lists mirroring the decoder, one `[B, 2, h_l, w_l, C_l]` array of past
      input frames per causal conv (zeros at the start of a video).
    started: static; False until the first chunk was decoded (the first latent frame of a
      video yields one pixel frame, every later one `temporal_factor`). Being metadata, it
      selects one of two compiled programs under `jax.jit`.
  """

  convs: Any
  started: bool = False


jax.tree_util.register_dataclass(DecodeCache, data_fields=["convs"], meta_fields=["started"])


# ------------------------------------------------------------------------------------------------
# The model.
# ------------------------------------------------------------------------------------------------


class WanVAE(nnx.Module):
  """The Wan2.1 VAE (diffusers `AutoencoderKLWan` layout and key names), channels-last."""

  def __init__(self, config: Any = None, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    """Builds the model.

    Args:
      config: a `VAEConfig`, dict or ConfigDict with diffusers' constructor names; None is the
        published Wan2.1 VAE.
      dtype: parameter and compute dtype (norms accumulate in float32 regardless).
      rngs: parameter initialisation keys.
    """
    cfg = VAEConfig.from_any(config if config is not None else VAEConfig())
    self.config = cfg
    self.dtype = jnp.dtype(dtype)
    self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
    self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1, dtype=dtype, rngs=rngs)
    self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1, dtype=dtype, rngs=rngs)
    self.decoder = Decoder(cfg, dtype=dtype, rngs=rngs)

  # -- helpers -------------------------------------------------------------------------------

  def _stats(self) -> tuple[Array, Array]:
    mean = jnp.asarray(self.config.latents_mean, jnp.float32)
    std = jnp.asarray(self.config.latents_std, jnp.float32)
    return mean, std

  @property
  def latent_channels(self) -> int:
    """Channels of the latents it decodes (TAEHV has the same attribute)."""
    return self.config.z_dim

  def num_pixel_frames(self, num_latent_frames: int, *, first: bool = True) -> int:
    """Pixel frames produced by decoding `num_latent_frames` (as the first chunk or a later one)."""
    tf = self.config.temporal_factor
    if first and num_latent_frames:
      return 1 + tf * (num_latent_frames - 1)
    return tf * num_latent_frames

  # -- traceable implementations (pure functions of the module's arrays) ---------------------

  def encode_fn(self, x_bthwc: Array) -> Array:
    """Un-jitted `encode` (for use inside a caller's own transform)."""
    cfg = self.config
    if x_bthwc.ndim != 5 or x_bthwc.shape[-1] != cfg.in_channels:
      raise ValueError(f"expected pixels [B, T, H, W, {cfg.in_channels}], got {x_bthwc.shape}")
    b, t, h, w, c = x_bthwc.shape
    if (t - 1) % ENCODE_CHUNK:
      raise ValueError(f"the encoder takes 1 + {ENCODE_CHUNK}k frames, got T={t}")
    s = cfg.spatial_factor
    if h % s or w % s:
      raise ValueError(f"H and W must be multiples of {s}, got {h}x{w}")
    x = x_bthwc.astype(self.dtype)
    cache = self.encoder.init_cache(b, h, w, self.dtype)
    # The first frame alone (no temporal merge), then chunks of 4 frames, as the reference.
    y0, cache = self.encoder(x[:, :1], cache, first=True)
    outs = [y0]
    n = (t - 1) // ENCODE_CHUNK
    if n:
      chunks = x[:, 1:].reshape(b, n, ENCODE_CHUNK, h, w, c).swapaxes(0, 1)  # [n, B, 4, H, W, C]

      def step(carry, chunk_bthwc):
        y, carry = self.encoder(chunk_bthwc, carry, first=False)
        return carry, y

      _, ys = jax.lax.scan(step, cache, chunks)  # [n, B, f, h, w, 2z]
      ys = ys.swapaxes(0, 1)
      outs.append(ys.reshape(b, -1, *ys.shape[3:]))
    moments, _ = self.quant_conv(jnp.concatenate(outs, axis=1))
    mu = moments[..., : cfg.z_dim].astype(jnp.float32)
    mean, std = self._stats()
    return ((mu - mean) / std).astype(self.dtype)

  def decode_chunk_fn(self, z_bfhwc: Array, cache: DecodeCache) -> tuple[Array, DecodeCache]:
    """Un-jitted `decode_chunk` (for use inside a caller's own transform)."""
    cfg = self.config
    if z_bfhwc.ndim != 5 or z_bfhwc.shape[-1] != cfg.z_dim:
      raise ValueError(f"expected latents [B, F, h, w, {cfg.z_dim}], got {z_bfhwc.shape}")
    b, f = z_bfhwc.shape[:2]
    mean, std = self._stats()
    z = (z_bfhwc.astype(jnp.float32) * std + mean).astype(self.dtype)
    x, _ = self.post_quant_conv(z)
    convs = cache.convs
    outs = []
    if not cache.started and f:
      y0, convs = self.decoder(x[:, :1], convs, first=True)
      outs.append(y0)
      x = x[:, 1:]
    if x.shape[1]:
      # One latent frame per step, as the reference (bounded activation memory).
      def step(carry, x_bhwc):
        y, carry = self.decoder(x_bhwc[:, None], carry, first=False)
        return carry, y

      convs, ys = jax.lax.scan(step, convs, x.swapaxes(0, 1))  # [F, B, tf, H, W, C]
      ys = ys.swapaxes(0, 1)
      outs.append(ys.reshape(b, -1, *ys.shape[3:]))
    if outs:
      pixels = jnp.clip(jnp.concatenate(outs, axis=1), -1.0, 1.0)
    else:
      s = cfg.spatial_factor
      pixels = jnp.zeros((b, 0, z.shape[2] * s, z.shape[3] * s, cfg.out_channels), self.dtype)
    return pixels, DecodeCache(convs=convs, started=cache.started or f > 0)

  def decode_fn(self, z_bfhwc: Array) -> Array:
    """Un-jitted `decode` (for use inside a caller's own transform)."""
    b, _, h, w, _ = z_bfhwc.shape
    pixels, _ = self.decode_chunk_fn(z_bfhwc, self.init_decode_cache(b, h, w))
    return pixels

  # -- public, jitted ----------------------------------------------------------------------

  def init_decode_cache(self, batch: int, h: int, w: int, dtype: Any = None) -> DecodeCache:
    """A fresh streaming-decode cache.

    Args:
      batch: batch size.
      h: latent height.
      w: latent width.
      dtype: the cache's dtype (default: the model's). `bfloat16` under a float32 decode halves
        the cache (3.8 -> 1.9 GB at 480x832); past frames are then rounded to bf16 before the
        causal convs read them, and the decode is no longer bit-exact with an f32 cache.

    Returns:
      A `DecodeCache` of zeros (nothing decoded yet).
    """
    dtype = self.dtype if dtype is None else jnp.dtype(dtype)
    return DecodeCache(convs=self.decoder.init_cache(batch, h, w, dtype), started=False)

  def encode(self, x_bthwc: Array) -> Array:
    """Encodes pixels to normalised latent means (jitted).

    Args:
      x_bthwc: pixels `[B, T, H, W, 3]` in [-1, 1], T = 1 + 4k, H and W multiples of
        `config.spatial_factor`.

    Returns:
      Normalised latents `[B, F, H/8, W/8, z_dim]` (Wan2.1: F = 1 + k), `(mu - mean) / std`.
    """
    graphdef, state = nnx.split(self)
    return _encode_jit(graphdef, state, jnp.asarray(x_bthwc))

  def decode(self, z_bfhwc: Array) -> Array:
    """Decodes a whole latent video (jitted); same pixels as streaming it chunk by chunk.

    Args:
      z_bfhwc: normalised latents `[B, F, h, w, z_dim]`.

    Returns:
      Pixels `[B, 1 + tf (F - 1), 8h, 8w, 3]` clipped to [-1, 1] (tf = 4 for Wan2.1).
    """
    graphdef, state = nnx.split(self)
    return _decode_jit(graphdef, state, jnp.asarray(z_bfhwc))

  def decode_chunk(self, z_bfhwc: Array, cache: DecodeCache) -> tuple[Array, DecodeCache]:
    """Decodes the next latent frames of a video (jitted).

    Args:
      z_bfhwc: normalised latents `[B, F, h, w, z_dim]`, any F >= 0.
      cache: from `init_decode_cache` or the previous call. It is donated: its buffers hold
        the returned cache, so use only the returned one afterwards.

    Returns:
      `(pixels, cache)`: pixels `[B, 1 + tf (F - 1), 8h, 8w, 3]` for the first chunk of a video,
      `[B, tf F, 8h, 8w, 3]` for later ones, clipped to [-1, 1]; the updated cache.
    """
    graphdef, state = nnx.split(self)
    return _decode_chunk_jit(graphdef, state, jnp.asarray(z_bfhwc), cache)

  def lower_decode_chunk(self, z_bfhwc, cache: DecodeCache):
    """`decode_chunk`'s program lowered for `z_bfhwc` and `cache` (arrays or ShapeDtypeStructs);
    compiled, it is the executable `decode_chunk` then runs (`asvd.pipeline.check_decoder_memory`)."""
    graphdef, state = nnx.split(self)
    return _decode_chunk_jit.lower(graphdef, state, z_bfhwc, cache)


# The graph definition is static (hashable), the state is a pytree of arrays: one compiled
# program per (model structure, input shapes, cache.started).
@functools.partial(jax.jit, static_argnums=0)
def _encode_jit(graphdef, state, x):
  return nnx.merge(graphdef, state).encode_fn(x)


@functools.partial(jax.jit, static_argnums=0)
def _decode_jit(graphdef, state, z):
  return nnx.merge(graphdef, state).decode_fn(z)


# The cache is donated: the decode writes the new history into the old one's buffers (at
# 480x832 the f32 cache is 3.8 GB; without donation a second copy lives in the loop).
@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _decode_chunk_jit(graphdef, state, z, cache):
  return nnx.merge(graphdef, state).decode_chunk_fn(z, cache)


# ------------------------------------------------------------------------------------------------
# Entry points.
# ------------------------------------------------------------------------------------------------


def init_vae(config: Any = None, key: Array | int = 0, *, dtype: Any = jnp.float32) -> WanVAE:
  """A randomly initialised `WanVAE`.

  Args:
    config: `VAEConfig`, dict or ConfigDict with diffusers' names (base_dim, z_dim, dim_mult,
      num_res_blocks, attn_scales, temperal_downsample, latents_mean, latents_std); None is the
      published Wan2.1 layout.
    key: PRNG key or integer seed.
    dtype: parameter / compute dtype.

  Returns:
    The model.
  """
  cfg = VAEConfig.from_any(config if config is not None else VAEConfig())
  if isinstance(key, int):
    key = jax.random.key(key)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: WanVAE(cfg, dtype=dtype, rngs=nnx.Rngs(0))))
  flat, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
  names = [str(getattr(kp[-1], "key", kp[-1])) for kp, _ in flat]
  shapes = [sds.shape for _, sds in flat]

  # All kernels come from one uniform draw, sliced: the module's per-parameter initialisers
  # would compile one threefry kernel per parameter shape (tens of seconds on CPU).
  @jax.jit
  def make(key):
    total = sum(math.prod(s) for n, s in zip(names, shapes) if n == "kernel")
    u = jax.random.uniform(key, (total,), jnp.float32, -1.0, 1.0)
    leaves, off = [], 0
    for n, shape in zip(names, shapes):
      if n == "kernel":  # U(+-1/sqrt(fan_in)), PyTorch's default for convs and linears
        size = math.prod(shape)
        leaves.append(
          (u[off : off + size].reshape(shape) / math.sqrt(size // shape[-1])).astype(dtype)
        )
        off += size
      elif n == "gamma":
        leaves.append(jnp.ones(shape, dtype))
      else:
        leaves.append(jnp.zeros(shape, dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)

  nnx.replace_by_pure_dict(state, make(key))
  return nnx.merge(graphdef, state)


def count_params(model: nnx.Module) -> int:
  """Number of parameter scalars (works on `nnx.eval_shape` models too)."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return int(sum(np.prod(leaf.shape) for leaf in leaves))
