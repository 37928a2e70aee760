"""TAEHV: the tiny autoencoder for Wan2.1 latents (`taew2_1.pth`), in Flax NNX, streaming.

A stack of per-frame 2D convs whose only temporal links are (a) `MemBlock`s, which see their own
input one frame earlier, (b) `TGrow` (decoder: one frame -> `s` frames, by a 1x1 conv to `s`
times the channels) and (c) `TPool` (encoder: `s` frames -> one, the reverse). So a chunk of
frames is processed in parallel over time, and streaming needs only each MemBlock's last input
frame: `DecodeMemory`, a pytree carried between chunks. Decoding chunk by chunk equals decoding
the whole video.

Frames match the Wan VAE's: the first latent decodes to one pixel frame (the decoder's first
`t_upscale - 1 = 3` output frames of a video are dropped), every later latent to four. Pixels
are in [-1, 1] at the API, as the Wan VAE's (TAEHV itself works in [0, 1]).

The layers are kept in the reference's `nn.Sequential` order, so checkpoint keys map by index
(`decoder.{i}.conv.0.weight`, ...; `asvd/ckpt/taehv_port.py`). Architecture facts (block order,
channel widths, Clamp = 3 tanh(x / 3), nearest x2 upsampling, the TGrow channel order) come from
the reference implementation (madebyollin/taehv); the code is ours.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

Array = jax.Array
_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # torch's default


@dataclasses.dataclass(frozen=True)
class TAEHVConfig:
  """`taew2_1`: 16 latent channels, decoder widths (256, 128, 64, 64), time x4 (x1, x2, x2)."""

  latent_channels: int = 16
  image_channels: int = 3
  decoder_channels: tuple[int, int, int, int] = (256, 128, 64, 64)
  encoder_channels: int = 64
  decoder_time_upscale: tuple[bool, bool, bool] = (False, True, True)
  decoder_space_upscale: tuple[bool, bool, bool] = (True, True, True)
  encoder_time_downscale: tuple[bool, bool, bool] = (True, True, False)

  @property
  def t_upscale(self) -> int:
    return 2 ** sum(self.decoder_time_upscale)

  @property
  def t_downscale(self) -> int:
    return 2 ** sum(self.encoder_time_downscale)

  @property
  def spatial_factor(self) -> int:
    return 2 ** sum(self.decoder_space_upscale)


class Conv(nnx.Module):
  """Per-frame 2D conv (`[N, H, W, C]`), 'same' padding for odd kernels."""

  def __init__(self, n_in, n_out, *, kernel=3, stride=1, bias=True, dtype=jnp.float32, rngs: nnx.Rngs):
    self.stride, self.pad = stride, kernel // 2
    self.weight = nnx.Param(_init(rngs.params(), (kernel, kernel, n_in, n_out), dtype))
    self.bias = nnx.Param(jnp.zeros((n_out,), dtype)) if bias else None

  def __call__(self, x):
    p = self.pad
    y = jax.lax.conv_general_dilated(x, self.weight[...], (self.stride, self.stride), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if self.bias is None else y + self.bias[...]


class MemBlock(nnx.Module):
  """`relu(conv(relu(conv(relu(conv([x; past])))) + skip(x))`, `past` = its input one frame earlier."""

  def __init__(self, n_in, n_out, *, dtype, rngs):
    self.conv = nnx.List([Conv(2 * n_in, n_out, dtype=dtype, rngs=rngs), Conv(n_out, n_out, dtype=dtype, rngs=rngs), Conv(n_out, n_out, dtype=dtype, rngs=rngs)])
    self.skip = Conv(n_in, n_out, kernel=1, bias=False, dtype=dtype, rngs=rngs) if n_in != n_out else None

  def __call__(self, x, past):
    h = jax.nn.relu(self.conv[0](jnp.concatenate([x, past], axis=-1)))
    h = self.conv[2](jax.nn.relu(self.conv[1](h)))
    return jax.nn.relu(h + (x if self.skip is None else self.skip(x)))


class TGrow(nnx.Module):
  """One frame -> `stride` frames: a 1x1 conv to `stride * C` channels, split in channel order."""

  def __init__(self, n, stride, *, dtype, rngs):
    self.stride = stride
    self.conv = Conv(n, n * stride, kernel=1, bias=False, dtype=dtype, rngs=rngs)


class TPool(nnx.Module):
  """`stride` frames -> one: their channels concatenated (earliest first), a 1x1 conv."""

  def __init__(self, n, stride, *, dtype, rngs):
    self.stride = stride
    self.conv = Conv(n * stride, n, kernel=1, bias=False, dtype=dtype, rngs=rngs)


def _decoder_layers(cfg: TAEHVConfig, dtype, rngs):
  """The decoder in the reference's order: `[(kind, module or None)]`."""
  n = cfg.decoder_channels
  out = [("clamp", None), ("conv", Conv(cfg.latent_channels, n[0], dtype=dtype, rngs=rngs)), ("relu", None)]
  for i in range(3):
    out += [("mem", MemBlock(n[i], n[i], dtype=dtype, rngs=rngs)) for _ in range(3)]
    out += [("up", 2 if cfg.decoder_space_upscale[i] else 1), ("grow", TGrow(n[i], 2 if cfg.decoder_time_upscale[i] else 1, dtype=dtype, rngs=rngs))]
    out += [("conv", Conv(n[i], n[i + 1], bias=False, dtype=dtype, rngs=rngs))]
  return out + [("relu", None), ("conv", Conv(n[3], cfg.image_channels, dtype=dtype, rngs=rngs))]


def _encoder_layers(cfg: TAEHVConfig, dtype, rngs):
  c = cfg.encoder_channels
  out = [("conv", Conv(cfg.image_channels, c, dtype=dtype, rngs=rngs)), ("relu", None)]
  for i in range(3):
    out += [("pool", TPool(c, 2 if cfg.encoder_time_downscale[i] else 1, dtype=dtype, rngs=rngs)), ("conv", Conv(c, c, stride=2, bias=False, dtype=dtype, rngs=rngs))]
    out += [("mem", MemBlock(c, c, dtype=dtype, rngs=rngs)) for _ in range(3)]
  return out + [("conv", Conv(c, cfg.latent_channels, dtype=dtype, rngs=rngs))]


@struct.dataclass
class DecodeMemory:
  """What a streaming decode carries between chunks: each MemBlock's last input frame
  (`{layer index: [B, H_i, W_i, C_i]}`; None before the first chunk) and whether the video has
  started (the first chunk drops the decoder's first `t_upscale - 1` frames)."""

  last: dict | None
  started: bool = struct.field(pytree_node=False, default=False)


def _run(layers, kinds, x_bthwc, last):
  """Applies the layers to a chunk `[B, T, H, W, C]`, parallel over time; `last` holds each
  MemBlock's input from the frame before the chunk (None: the start of a video, zeros, as the
  reference pads). Returns `(y, new last)`."""
  new = {}
  for i, (kind, arg) in enumerate(kinds):
    b, t = x_bthwc.shape[:2]
    if kind == "clamp":
      x_bthwc = 3.0 * jnp.tanh(x_bthwc / 3.0)
    elif kind == "relu":
      x_bthwc = jax.nn.relu(x_bthwc)
    elif kind == "up":
      if arg > 1:
        x_bthwc = jnp.repeat(jnp.repeat(x_bthwc, arg, axis=2), arg, axis=3)
    else:
      m = layers[i]
      flat = x_bthwc.reshape(b * t, *x_bthwc.shape[2:])
      if kind == "conv":
        y = m(flat)
        x_bthwc = y.reshape(b, t, *y.shape[1:])
      elif kind == "mem":
        prev = jnp.zeros_like(x_bthwc[:, :1]) if last is None else last[i][:, None].astype(x_bthwc.dtype)
        past = jnp.concatenate([prev, x_bthwc[:, :-1]], axis=1)
        new[i] = x_bthwc[:, -1]
        y = m(flat, past.reshape(flat.shape))
        x_bthwc = y.reshape(x_bthwc.shape[:-1] + (y.shape[-1],))
      elif kind == "grow":
        y = m.conv(flat)  # [B T, H, W, s C]: channel group j is frame t s + j
        s, c = m.stride, y.shape[-1] // m.stride
        y = y.reshape(b, t, *y.shape[1:3], s, c)
        x_bthwc = jnp.moveaxis(y, 4, 2).reshape(b, t * s, *y.shape[2:4], c)
      elif kind == "pool":
        s, c = m.stride, x_bthwc.shape[-1]
        g = jnp.moveaxis(x_bthwc.reshape(b, t // s, s, *x_bthwc.shape[2:]), 2, 4)  # [B, T/s, H, W, s, C]
        y = m.conv(g.reshape(b * (t // s), *g.shape[2:4], s * c))
        x_bthwc = y.reshape(b, t // s, *y.shape[1:])
  return x_bthwc, new


class TAEHV(nnx.Module):
  """Decoder (and encoder) of TAEHV for Wan2.1 latents."""

  def __init__(self, config: TAEHVConfig | None = None, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.cfg = config or TAEHVConfig()
    self.dtype = dtype
    dec, enc = _decoder_layers(self.cfg, dtype, rngs), _encoder_layers(self.cfg, dtype, rngs)
    self._dec_kinds = tuple((k, a if k == "up" else None) for k, a in dec)
    self._enc_kinds = tuple((k, None) for k, _ in enc)
    self.decoder = nnx.Dict({str(i): m for i, (k, m) in enumerate(dec) if k in ("conv", "mem", "grow")})
    self.encoder = nnx.Dict({str(i): m for i, (k, m) in enumerate(enc) if k in ("conv", "mem", "pool")})

  # -- decoding -----------------------------------------------------------------------------------

  def init_decode_cache(self, batch: int = 1, h: int = 0, w: int = 0, dtype: Any = None) -> DecodeMemory:
    """The memory at the start of a video: nothing yet (the MemBlocks see zeros, as the
    reference pads). The Wan VAE's signature; sizes and dtype are not needed here (the memory
    is the MemBlocks' inputs, in the model's dtype)."""
    del batch, h, w, dtype
    return DecodeMemory(last=None, started=False)

  def decode_chunk(self, z_bfhwc: Array, memory: DecodeMemory) -> tuple[Array, DecodeMemory]:
    """`decode_chunk_fn` through a jit cached per model graph (two compiles: first and later).
    The memory is donated: use only the returned one afterwards."""
    graphdef, state = nnx.split(self)
    return _decode_chunk_jit(graphdef)(state, jnp.asarray(z_bfhwc), memory)

  def lower_decode_chunk(self, z_bfhwc, memory: DecodeMemory):
    """`decode_chunk`'s program lowered for `z_bfhwc` and `memory` (arrays or ShapeDtypeStructs);
    compiled, it is the executable `decode_chunk` then runs (`asvd.pipeline.check_decoder_memory`)."""
    graphdef, state = nnx.split(self)
    return _decode_chunk_jit(graphdef).lower(state, z_bfhwc, memory)

  def decode_chunk_fn(self, z_bfhwc: Array, memory: DecodeMemory) -> tuple[Array, DecodeMemory]:
    """Latents `[B, f, h, w, C]` -> pixels `[B, T, H, W, 3]` in [-1, 1] and the new memory;
    `T = 4 f - 3` for the first chunk of a video, `4 f` after (the Wan VAE's counts)."""
    layers = {int(k): v for k, v in self.decoder.items()}
    x, new = _run(layers, self._dec_kinds, z_bfhwc.astype(self.dtype), memory.last)
    if not memory.started:
      x = x[:, self.cfg.t_upscale - 1 :]
    px = 2.0 * jnp.clip(x.astype(jnp.float32), 0.0, 1.0) - 1.0
    return px, DecodeMemory(last=new, started=True)

  def decode(self, z_bfhwc: Array) -> Array:
    """A whole video of latents -> pixels (one chunk from zero memory)."""
    return self.decode_chunk_fn(z_bfhwc, self.init_decode_cache())[0]

  @property
  def latent_channels(self) -> int:
    return self.cfg.latent_channels

  def num_pixel_frames(self, num_latent_frames: int, *, first: bool = True) -> int:
    return self.cfg.t_upscale * num_latent_frames - (self.cfg.t_upscale - 1 if first else 0)

  # -- encoding -----------------------------------------------------------------------------------

  def encode(self, x_bthwc: Array) -> Array:
    """Pixels `[B, T, H, W, 3]` in [-1, 1] -> latents `[B, ceil(T / 4), H/8, W/8, C]` (the last
    frame repeated to a multiple of 4, as the reference pads)."""
    x = (jnp.asarray(x_bthwc, jnp.float32) + 1.0) / 2.0
    t, d = x.shape[1], self.cfg.t_downscale
    if t % d:
      x = jnp.concatenate([x, jnp.repeat(x[:, -1:], d - t % d, axis=1)], axis=1)
    layers = {int(k): v for k, v in self.encoder.items()}
    return _run(layers, self._enc_kinds, x.astype(self.dtype), None)[0].astype(jnp.float32)


@functools.lru_cache(maxsize=8)
def _decode_chunk_jit(graphdef):
  def decode_chunk(state, z, memory):
    return nnx.merge(graphdef, state).decode_chunk_fn(z, memory)

  return jax.jit(decode_chunk, donate_argnums=2)  # the memory's buffers are reused


def init_taehv(config: TAEHVConfig | None = None, key: int = 0, *, dtype: Any = jnp.float32) -> TAEHV:
  return TAEHV(config, dtype=dtype, rngs=nnx.Rngs(key))


__all__ = ["TAEHV", "TAEHVConfig", "DecodeMemory", "init_taehv"]
