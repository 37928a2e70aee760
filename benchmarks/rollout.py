"""Rollout cost per chunk at chunk 10, 100 and 1000, per anchor mode (a benchmark, not a test).

Also the public APIs a caller uses, `asvd.stream` and `asvd.rollout`, timed at chunks 20 and 300
(`--public-marks`): the chunk-300 / chunk-20 ratio must be <= 1.05 for both.

For each mode it runs chunks through the jitted transition and records the median time per
chunk in windows starting at chunks 10, 100 and 1000 (timed alternately from carries saved at
each mark, 5 rounds), the live device memory there, the number of
compiles of the transition (must be 1), latent frames/s, and MFU (analytic matmul FLOPs) against a bf16/f32 matmul peak
measured in the same run. The chunk-1000 / chunk-10 time ratio must be <= 1.05: relative time and
a static cache mean the 1000th chunk costs what the 10th does.

    python benchmarks/rollout.py --config configs/tiny.py --chunks 1010 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import asvd
from asvd import streaming

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from benchmarks.real_size import analytic_forward  # noqa: E402


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


def bench_mode(model, context, cfg, anchor, chunks, marks, window, rounds_per_mark=5):
  rc = cfg.rollout.copy_and_resolve_references()
  rc.anchor = anchor
  prog, params, carry = streaming._program(model, context, rc, cfg.sampler, None, 1)
  key = jax.random.key(0)
  # Analytic matmul FLOPs of the chunk's forwards (XLA's cost analysis counts the scanned layers
  # once, so it undercounts by the number of layers).
  flops = (len(prog.lay.timesteps) + 1) * analytic_forward(cfg, prog.lay)
  # Run to the last mark, keeping a copy of the carry at each mark (and the live memory there);
  # then time windows from the marks alternately, so that load from other processes hits every
  # mark alike.
  marks = [m for m in marks if m + window <= chunks]
  saved, mem = {}, {}
  for c in range(max(marks) + 1):
    if c in marks:  # live memory of the run itself (the saved copies excluded)
      mem[c] = live_bytes() - sum(x.nbytes for x in jax.tree.leaves(saved))
      saved[c] = jax.tree.map(jnp.copy, carry)
    if c < max(marks):
      carry, ys = prog.one(params, carry, key, jnp.int32(c))
      jax.block_until_ready(ys)
  rounds = {m: [] for m in marks}
  for _ in range(rounds_per_mark):
    for m in marks:
      cm = jax.tree.map(jnp.copy, saved[m])
      per_chunk = []
      for c in range(m, m + window):
        t0 = time.perf_counter()
        cm, ys = prog.one(params, cm, key, jnp.int32(c))
        jax.block_until_ready(ys)
        per_chunk.append(time.perf_counter() - t0)
      rounds[m].append(float(np.median(per_chunk)))
  per = {m: float(np.median(v)) for m, v in rounds.items()}
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


def bench_public(model, context, cfg, anchor, marks, window, rounds=5):
  """Seconds per chunk of the public APIs at each mark: `asvd.stream` (one `next()` per chunk,
  as a caller iterates) and `asvd.rollout` (a `window`-chunk call continuing from a carry).

  The carry at each mark is kept (the transition is pure), and windows starting at the marks
  are timed alternately, `rounds` times: a load spike from another process on a shared machine
  then hits both marks alike instead of posing as growth with the chunk index. Medians.
  """
  rc = cfg.rollout.copy_and_resolve_references()
  rc.anchor = anchor
  kw = dict(config=rc, sampler_config=cfg.sampler)
  carries, s = {}, asvd.stream(model, context, 0, num_chunks=max(marks), **kw)
  for c in range(max(marks) + 1):
    if c in marks:
      carries[c] = s.carry
    if c < max(marks):
      jax.block_until_ready(next(s))
  stream, roll = {m: [] for m in marks}, {m: [] for m in marks}
  for _ in range(rounds):
    for m in marks:
      it = asvd.stream(model, context, 0, carry=carries[m], start_chunk=m, num_chunks=window, **kw)
      per = []
      for _ in range(window):
        t0 = time.perf_counter()
        jax.block_until_ready(next(it))
        per.append(time.perf_counter() - t0)
      stream[m].append(float(np.median(per)))
      t0 = time.perf_counter()
      lat, _ = asvd.rollout(model, context, 0, num_chunks=window, carry=carries[m], start_chunk=m, **kw)
      jax.block_until_ready(lat)
      roll[m].append((time.perf_counter() - t0) / window)
  st = {m: float(np.median(v)) for m, v in stream.items()}
  ro = {m: float(np.median(v)) for m, v in roll.items()}
  lo, hi = min(marks), max(marks)
  return {
    "stream_seconds_per_chunk": {str(k): v for k, v in st.items()},
    "stream_ratio": st[hi] / st[lo],
    "rollout_seconds_per_chunk": {str(k): v for k, v in ro.items()},
    "rollout_ratio": ro[hi] / ro[lo],
  }


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/tiny.py")
  p.add_argument("--chunks", type=int, default=1010)
  p.add_argument("--window", type=int, default=10)
  p.add_argument("--modes", default="adaptive,sink,ema,none")
  p.add_argument("--public-marks", default="20,300", help="chunks where stream/rollout are timed ('' = skip)")
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
    if a.public_marks:
      r.update(bench_public(model, context, cfg, mode, [int(m) for m in a.public_marks.split(",")], a.window))
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
