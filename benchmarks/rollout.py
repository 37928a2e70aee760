"""Rollout cost per chunk at chunk 10, 100 and 1000, per anchor mode (a benchmark, not a test).

For each mode it streams chunks through the jitted transition and records the mean time per
chunk in windows starting at chunks 10, 100 and 1000, the live device memory there, the number of
compiles of the transition (must be 1), latent frames/s, and MFU against a bf16/f32 matmul peak
measured in the same run. The chunk-1000 / chunk-10 time ratio must be <= 1.05: relative time and
a static cache mean the 1000th chunk costs what the 10th does.

    python benchmarks/rollout.py --config configs/tiny.py --chunks 1010 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import asvd
from asvd import streaming


def matmul_peak(dtype, n=1024, reps=5) -> float:
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: jnp.einsum("ij,jk->ik", x, y, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()
  best = min(_timed(lambda: f(a, a).block_until_ready()) for _ in range(reps))
  return 2 * n**3 / best


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def live_bytes() -> int:
  return sum(x.nbytes for x in jax.live_arrays())


def bench_mode(model, context, cfg, anchor, chunks, marks, window):
  rc = cfg.rollout.copy_and_resolve_references()
  rc.anchor = anchor
  prog, params, carry = streaming._program(model, context, rc, cfg.sampler, None, 1)
  key = jax.random.key(0)
  lowered = prog.one.lower(params, carry, key, jnp.int32(0))
  flops = float((lowered.compile().cost_analysis() or {}).get("flops", 0.0))
  times, mem = np.zeros(chunks), {}
  for c in range(chunks):
    t0 = time.perf_counter()
    carry, ys = prog.one(params, carry, key, jnp.int32(c))
    jax.block_until_ready(ys)
    times[c] = time.perf_counter() - t0
    if c in marks:
      mem[c] = live_bytes()
  per = {m: float(np.median(times[m : m + window])) for m in marks if m + window <= chunks}
  f = int(rc.chunk_frames)
  return {
    "anchor": anchor,
    "seconds_per_chunk": {str(k): v for k, v in per.items()},
    "live_bytes": {str(k): int(v) for k, v in mem.items()},
    "ratio_last_first": per[max(per)] / per[min(per)],
    "compiles": int(prog.one._cache_size()),
    "latent_frames_per_s": f / per[max(per)],
    "flops_per_chunk": flops,
  }


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/tiny.py")
  p.add_argument("--chunks", type=int, default=1010)
  p.add_argument("--window", type=int, default=10)
  p.add_argument("--modes", default="adaptive,sink,ema,none")
  p.add_argument("--device-name", default=platform.processor() or platform.machine())
  p.add_argument("--out", default="benchmarks/results")
  a = p.parse_args()
  cfg = asvd.load_config(a.config)
  model = asvd.init_dit(cfg.model, 0)
  context = np.random.default_rng(0).standard_normal((1, cfg.model.text_len, cfg.model.text_dim)).astype(np.float32)
  peak = matmul_peak(jnp.dtype(cfg.model.dtype))
  marks = [m for m in (10, 100, 1000) if m + a.window <= a.chunks]
  rows = []
  for mode in a.modes.split(","):
    r = bench_mode(model, context, cfg, mode, a.chunks, marks, a.window)
    r["mfu"] = r["flops_per_chunk"] / r["seconds_per_chunk"][str(marks[-1])] / peak
    rows.append(r)
    print(json.dumps(r))
  res = {"config": a.config, "device": a.device_name, "backend": jax.default_backend(), "matmul_peak_flops": peak, "results": rows}
  os.makedirs(a.out, exist_ok=True)
  name = os.path.join(a.out, f"rollout_{os.path.splitext(os.path.basename(a.config))[0]}_{jax.default_backend()}.json")
  with open(name, "w") as fh:
    json.dump(res, fh, indent=2)
  print(f"wrote {name}")


if __name__ == "__main__":
  main()
