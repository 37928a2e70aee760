"""The `splash` backend: Pallas splash attention on TPU (`jax.experimental.pallas.ops.tpu`).

The cached call's mask is key-only (slot validity, `frame_mask [B, 1, Fk]`): it becomes splash's
dynamic segment ids (queries in segment 1, valid keys 1, invalid keys and padding 0), with a
static full block mask, so one compiled kernel serves every chunk. Sequences are padded to the
block size. Query-dependent frame masks (traced arrays) cannot be a static splash mask; they go
to the `flash` backend. The kernel has its own VJP (training), and `interpret=True` runs it on
any platform (the parity test on CPU).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

BLOCK = 512


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, sq: int, sk: int, block_q: int, block_k: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk_lib  # noqa: PLC0415
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib  # noqa: PLC0415

  mask = mask_lib.MultiHeadMask([mask_lib.FullMask((sq, sk)) for _ in range(heads)])
  blocks = sk_lib.BlockSizes(
    block_q=block_q, block_kv=block_k, block_kv_compute=block_k,
    block_q_dkv=block_q, block_kv_dkv=block_k, block_kv_dkv_compute=block_k, block_q_dq=block_q, block_kv_dq=block_k,
  )  # fmt: skip
  # Concrete mask tables even when first built while tracing (under `shard_map` they would
  # otherwise be tracers of that trace, kept by the cache and leaked into the next).
  with jax.ensure_compile_time_eval():
    kernel = sk_lib.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
  return kernel, sk_lib.SegmentIds


def _pad_to(x, n, axis):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n - x.shape[axis])
  return jnp.pad(x, pad)


def splash_attention(q, k, v, frame_mask=None, probe=False, *, block: int = BLOCK, interpret: bool = False):
  """Signature of `asvd.models.attention`; f32 softmax statistics inside the kernel."""
  b, sk = q.shape[0], k.shape[1]
  if frame_mask is not None and frame_mask.shape[-2] != 1:
    from asvd.models.flash_attention import flash_attention  # noqa: PLC0415

    return flash_attention(q, k, v, frame_mask, probe)
  if frame_mask is None:
    kv_valid = jnp.ones((b, sk), bool)
  else:
    fk = frame_mask.shape[-1]
    kv_valid = jnp.repeat(jnp.broadcast_to(jnp.asarray(frame_mask, bool)[:, 0], (b, fk)), sk // fk, axis=1)
  # Under a mesh, `attention.attend` calls this once per shard (a Mosaic kernel is not
  # partitioned by GSPMD).
  return _splash_local(q, k, v, kv_valid, block=block, interpret=interpret), None


def _splash_local(q, k, v, kv_valid, *, block: int, interpret: bool):
  """Splash on one shard: `[b, Sq, h, Dh]` queries, `[b, Sk]` key validity."""
  b, sq, h, dh = q.shape
  sk = k.shape[1]
  bq, bk = min(block, -(-sq // 128) * 128), min(block, -(-sk // 128) * 128)
  sqp, skp = -(-sq // bq) * bq, -(-sk // bk) * bk
  kernel, segment_ids = _kernel(h, sqp, skp, bq, bk, interpret)
  kv_seg = _pad_to(kv_valid.astype(jnp.int32), skp, 1)  # padding: segment 0, never attended
  q_seg = jnp.ones((b, sqp), jnp.int32)
  hm = lambda x, n: _pad_to(jnp.transpose(x, (0, 2, 1, 3)), n, 2)  # noqa: E731  [B, H, S, Dh]
  qh = hm(q * jnp.asarray(dh**-0.5, q.dtype), sqp)

  def one(qb, kb, vb, qs, ks):
    return kernel(qb, kb, vb, segment_ids=segment_ids(q=qs, kv=ks))

  # bf16 products are exact at any precision, and Mosaic rejects an fp32-precision bf16 matmul
  # (a process-wide `jax_default_matmul_precision="highest"` would otherwise break the kernel).
  prec = "default" if q.dtype == jnp.bfloat16 else None
  with jax.default_matmul_precision(prec) if prec else contextlib.nullcontext():
    o = jax.vmap(one)(qh, hm(k, skp), hm(v, skp), q_seg, kv_seg)  # [B, H, Sqp, Dh]
  return jnp.transpose(o[:, :, :sq], (0, 2, 1, 3)).astype(q.dtype)


__all__ = ["splash_attention"]
