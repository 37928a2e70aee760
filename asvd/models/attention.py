"""Attention kernels, selected by name (`model.attention` in the config).

Every kernel has the same signature:

    fn(q, k, v, frame_mask=None, probe=False) -> (out, share)

* `q` `[B, Sq, H, Dh]`, `k`/`v` `[B, Sk, H, Dh]` (already normed and rotated);
* `frame_mask` bool `[B|1, Fq, Fk]` at latent-frame granularity: query frame i may attend key
  frame j. Tokens per frame are `Sq // Fq` and `Sk // Fk`. `Fq = 1` is a key-only mask (the
  same row for every query: the cached call's slot validity). None = everything visible;
* `probe` asks for the attention share per key frame `[B, Fk]` (mean over heads and query
  tokens of the softmax mass on each key frame); kernels that never materialise the
  probabilities return None and the caller falls back to `xla` for probing.

Backends:
* `xla`: reference einsum attention, f32 scores and softmax, f32 accumulation. Always kept; every
  other backend is tested against it.
* `dot_product`: `jax.nn.dot_product_attention` with XLA's own choice of implementation.
* `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, the fused flash kernel on
  NVIDIA GPUs (bf16/fp16 inputs); key-only masks become key lengths, never a dense bias.
* `flash` (`asvd/models/flash_attention.py`): online softmax over frame-aligned key tiles with
  a custom VJP; memory flat in the sequence lengths, masked tiles skipped.
* `splash` (`asvd/models/splash_attention.py`): Pallas splash attention on TPU; slot validity
  as segment ids.
* `auto` (the default): `cudnn` on NVIDIA GPUs (f32 inputs: `dot_product`), `splash` on TPU,
  `flash` elsewhere (`xla` while the f32 scores take at most `DENSE_SCORES_MAX_BYTES`).
* `blocked`: exact attention one head and one query block at a time, so the f32 score tile stays
  in cache; 1.7x faster than `xla` on CPUs (benchmarks/README.md). It does not tile over keys.
Register more with `register_attention`.

The model calls them through `attend`, which keeps the queries' frame structure
(`[B, F, T, H, Dh]`) and, under a mesh, runs the kernel per shard.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from asvd import sharding as shard_lib

_NEG = -1e30
# Logical axes of the queries `attend` takes (and of its output) `[B, F, T, H, Dh]`: the same
# batch and token split as the residual stream (`asvd.sharding.DEFAULT_RULES`).
Q_NAMES = ("batch", "frames", "act_tokens", "heads", "head_dim")
_REGISTRY: dict[str, Callable] = {}


_PLATFORMS: dict[str, tuple[str, ...]] = {}  # backends that run only on some platforms


def register_attention(name: str, fn: Callable, platforms: tuple[str, ...] | None = None) -> None:
  """Adds a kernel under `name` (see the module docstring for the signature).

  Args:
    name: the `model.attention` value that selects it.
    fn: the kernel.
    platforms: the JAX platforms it runs on (e.g. `("gpu",)`); None = every platform.
  """
  _REGISTRY[name] = fn
  if platforms:
    _PLATFORMS[name] = tuple(platforms)
  else:
    _PLATFORMS.pop(name, None)


def get_attention(name: str) -> Callable:
  if name not in _REGISTRY:
    raise ValueError(
      f"unknown attention backend {name!r} (config key model.attention); "
      f"available: {sorted(_REGISTRY)}"
    )
  return _REGISTRY[name]


def check_available(name: str, platform: str | None = None) -> None:
  """Raises a one-line error if backend `name` is unknown or cannot run on `platform`
  (default: this process's JAX backend), before anything is loaded or compiled."""
  get_attention(name)
  need = _PLATFORMS.get(name)
  if need:
    import jax  # noqa: PLC0415

    here = platform or jax.default_backend()
    if here not in need:
      ok = sorted(n for n in _REGISTRY if here in _PLATFORMS.get(n, (here,)))
      raise ValueError(
        f"model.attention={name!r} runs on {'/'.join(need)} only; this process runs on {here}: "
        f"use one of {ok}"
      )


def available_attention() -> list[str]:
  return sorted(_REGISTRY)


def _xla(q, k, v, frame_mask=None, probe=False):
  b, sq, h, dh = q.shape
  sk = k.shape[1]
  scale = dh**-0.5
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if frame_mask is not None:
    fq, fk = frame_mask.shape[-2:]
    s = s.reshape(b, h, fq, sq // fq, fk, sk // fk)
    s = jnp.where(frame_mask[:, None, :, None, :, None], s, _NEG)
    s = s.reshape(b, h, sq, sk)
  p = jax.nn.softmax(s, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  share = None
  if probe:
    fk = frame_mask.shape[-1] if frame_mask is not None else 1
    share = p.reshape(b, h, sq, fk, sk // fk).sum(-1).mean(axis=(1, 2))  # [B, Fk]
  return out.astype(q.dtype), share


def _dpa(q, k, v, frame_mask=None, probe=False, *, implementation=None):
  """`jax.nn.dot_product_attention`. A key-only mask (`[B|1, 1, Fk]`, the cached call: slot
  validity) never becomes a dense bias: valid key frames are moved first (attention does not
  depend on the order of its keys) and `key_value_seq_lengths` cuts the rest, which cuDNN's
  flash kernel takes natively. Query-dependent masks fall back to a dense `[B, 1, Sq, Sk]` mask."""
  b, sq, h, dh = q.shape
  if frame_mask is None:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation).astype(q.dtype), None
  fq, fk = frame_mask.shape[-2:]
  if fq == 1:
    valid = jnp.broadcast_to(jnp.asarray(frame_mask, bool)[:, 0], (b, fk))
    order = jnp.argsort(~valid, axis=-1, stable=True)  # valid frames first, each in its order
    tk = k.shape[1] // fk
    take = lambda x: jnp.take_along_axis(x.reshape(b, fk, tk, h, dh), order[:, :, None, None, None], axis=1).reshape(b, fk * tk, h, dh)  # noqa: E731
    lens = valid.sum(-1).astype(jnp.int32) * tk
    out = jax.nn.dot_product_attention(q, take(k), take(v), key_value_seq_lengths=lens, implementation=implementation)
    return out.astype(q.dtype), None
  mask = jnp.repeat(jnp.repeat(frame_mask, sq // fq, axis=1), k.shape[1] // fk, axis=2)[:, None]
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  return out.astype(q.dtype), None


def _blocked(q, k, v, frame_mask=None, probe=False, *, block_q=512):
  """CPU-friendly exact attention: one head and one query block at a time (`lax.map`).

  Same math as `_xla` (f32 scores and softmax, f32 accumulation), but
  * head-major operands, so every dot is a plain `[Tq, Dh] x [Dh, Sk]` / `[Tq, Sk] x [Sk, Dh]`
    matmul (`_xla`'s `bqhd,bkhd->bhqk` makes XLA:CPU transpose the probabilities and emit
    strided batched dots);
  * the f32 score tile of one step is `[B, block_q, Sk]` (3 MB at 512 x 1536) instead of
    `[B, H, Sq, Sk]` (75 MB), so max / exp / sum / normalise run from cache, not from DRAM.
  """
  b, sq, h, dh = q.shape
  sk = k.shape[1]
  tq = max(t for t in range(1, min(sq, block_q) + 1) if sq % t == 0)  # largest divisor <= block_q
  nb = sq // tq
  scale = dh**-0.5
  # [H * nb, B, tq, Dh] query tiles, head-major; [H, B, Sk, Dh] keys and values.
  qt = jnp.transpose(q.reshape(b, nb, tq, h, dh), (3, 1, 0, 2, 4)).reshape(h * nb, b, tq, dh)
  kt = jnp.transpose(k, (2, 0, 1, 3))
  vt = jnp.transpose(v, (2, 0, 1, 3))
  if frame_mask is not None:
    fq, fk = frame_mask.shape[-2:]
    # Token-level rows of the frame mask: [B|1, Sq, Fk] -> per tile [B|1, tq, Fk].
    rows = jnp.repeat(frame_mask, sq // fq, axis=1).reshape(frame_mask.shape[0], nb, tq, fk)

  def step(i):
    hi, bi = i // nb, i % nb
    s = jnp.einsum("bqd,bkd->bqk", qt[i], kt[hi], preferred_element_type=jnp.float32) * scale
    if frame_mask is not None:
      m = jnp.repeat(rows[:, bi], sk // fk, axis=-1)  # [B|1, tq, Sk]
      s = jnp.where(m, s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bqk,bkd->bqd", p.astype(v.dtype), vt[hi], preferred_element_type=jnp.float32)

  o = jax.lax.map(step, jnp.arange(h * nb))  # [H * nb, B, tq, Dh]
  o = jnp.transpose(o.reshape(h, nb, b, tq, dh), (2, 1, 3, 0, 4)).reshape(b, sq, h, dh)
  return o.astype(q.dtype), None


register_attention("xla", _xla)
register_attention("dot_product", functools.partial(_dpa, implementation=None))
register_attention("blocked", _blocked)
register_attention("cudnn", functools.partial(_dpa, implementation="cudnn"), platforms=("gpu", "cuda"))


def _flash(q, k, v, frame_mask=None, probe=False):
  from asvd.models.flash_attention import flash_attention  # noqa: PLC0415

  return flash_attention(q, k, v, frame_mask, probe)


register_attention("flash", _flash)


def _splash(q, k, v, frame_mask=None, probe=False):
  from asvd.models.splash_attention import splash_attention  # noqa: PLC0415

  return splash_attention(q, k, v, frame_mask, probe)


register_attention("splash", _splash, platforms=("tpu",))

_AUTO_PLATFORM: list[str] = []  # set by `auto_platform` (ahead-of-time compiles for another platform)


@contextlib.contextmanager
def auto_platform(platform: str):
  """`with auto_platform("tpu"):` makes `auto` choose for that platform while tracing (compiling
  ahead of time for a TPU slice on a CPU host)."""
  _AUTO_PLATFORM.append(platform)
  try:
    yield
  finally:
    _AUTO_PLATFORM.pop()


def tracing_platform() -> str:
  """The platform programs are being traced for: `auto_platform`'s, else the default backend."""
  return _AUTO_PLATFORM[-1] if _AUTO_PLATFORM else jax.default_backend()


# On CPU, `auto` keeps dense `xla` attention while its f32 scores [B, H, Sq, Sk] stay this small:
# tiling pays off only once the scores would not fit in memory, and below this the plain einsums
# run as fast and compile ~1.6x faster (tiny models, tests); any real video size is far above it
# (the 1.3B chunk's scores are 7 GB).
DENSE_SCORES_MAX_BYTES = 16 * 2**20


def auto_choice(dtype, platform: str | None = None, scores: int | None = None) -> str:
  """The backend `auto` uses for inputs of `dtype` on `platform` (default: the one tracing).

  Args:
    dtype: the query/key dtype.
    platform: a JAX platform name; default: `auto_platform`'s, else the default backend.
    scores: the number of attention scores `B * H * Sq * Sk` (None: assume large).
  """
  p = platform or tracing_platform()
  if p in ("gpu", "cuda"):
    return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "dot_product"
  if p == "tpu":
    return "splash"
  if scores is not None and 4 * scores <= DENSE_SCORES_MAX_BYTES:
    return "xla"
  return "flash"


def _auto(q, k, v, frame_mask=None, probe=False):
  b, sq, h, _ = q.shape
  return _REGISTRY[auto_choice(q.dtype, scores=b * h * sq * k.shape[1])](q, k, v, frame_mask, probe)


register_attention("auto", _auto)


def attend(name: str, q, k, v, frame_mask=None, probe=False):
  """Backend `name` on frame-structured queries; under a mesh, one call per shard.

  Args:
    name: a registered backend.
    q: queries `[B, F, T, H, Dh]` (F frames of T tokens).
    k: keys `[B, Sk, H, Dh]`.
    v: values `[B, Sk, H, Dh]`.
    frame_mask: bool `[B|1, F, Fk]` or `[B|1, 1, Fk]`, or None (see the module docstring).
    probe: also return the attention share per key frame `[B, Fk]` (from `xla` when the
      backend gives none).

  Returns:
    `(out [B, F, T, H, Dh], share [B, Fk] or None)`.

  Under `sharding.activation_sharding` the kernel runs under `jax.shard_map` on each device's
  block: batch over data/fsdp, heads over tensor, and each frame's tokens over context, as the
  residual stream is split (`act_tokens`), so the queries are never resharded; keys and values
  are whole on every shard (the caller gathered them). Every query row is independent, so a
  shard attends its queries to all keys with the frame mask unchanged (its frames keep their
  index, with T / context tokens each); the probe's share, a mean over queries and heads, is
  averaged over the shards. This is also what lets kernels GSPMD cannot partition (Pallas
  splash, cuDNN) run on a mesh.
  """
  fn = get_attention(name)

  def local(q, k, v, mask):
    lead = q.shape[:3]
    q4 = q.reshape(lead[0], lead[1] * lead[2], *q.shape[3:])
    out, share = fn(q4, k, v, mask, probe)
    if probe and share is None:  # kernels without probabilities: probe with the reference
      _, share = _REGISTRY["xla"](q4, k, v, mask, True)
    return out.reshape(q.shape), share

  active = shard_lib.active()
  if active is None:
    return local(q, k, v, frame_mask)
  mesh, rules = active
  P = jax.sharding.PartitionSpec
  qs = shard_lib.spec_for(Q_NAMES, mesh, rules, q.shape)
  kvs = P(qs[0], None, qs[3], None)
  mask_b = None if frame_mask is None or frame_mask.shape[0] == 1 else qs[0]
  split = [a for e in (qs[2], qs[3]) if e is not None for a in ((e,) if isinstance(e, str) else e)]

  def per_shard(q, k, v, *mask):
    with shard_lib.activation_sharding(None):  # the kernel sees plain local arrays
      out, share = local(q, k, v, mask[0] if mask else None)
    if not probe:
      return out
    if split:
      share = jax.lax.pmean(share, tuple(split))  # equal query and head counts per shard
    return out, share

  args, specs = (q, k, v), (qs, kvs, kvs)
  if frame_mask is not None:
    args, specs = (*args, frame_mask), (*specs, P(mask_b, None, None))
  out_specs = (qs, P(qs[0], None)) if probe else qs
  res = jax.shard_map(per_shard, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False)(*args)
  return res if probe else (res, None)
