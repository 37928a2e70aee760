"""Decode cost per chunk: the Wan2.1 VAE against TAEHV, next to the DiT's cost for the same chunk.

Per streaming chunk of 3 latent frames (12 pixel frames; a later chunk, caches warm), at
480x832 (compile-only) and at a small size (also timed on this CPU):

* the analytic FLOPs of the chunk decode (its convs and dots, counted from their shapes in the
  traced program, loop bodies times their trip counts), and XLA's FLOPs of the compiled one
  (the Wan VAE scans over latent frames, and XLA counts a loop body once, so its count is
  multiplied by the scan's trip count, the chunk's frames; TAEHV has no loop);
* the bytes of the streaming cache each carries between chunks (the Wan VAE also with a bf16
  cache under its f32 decode, `config.pipeline.decode_cache_dtype`), the temporaries, and the
  peak (arguments + temporaries + outputs - donated: the cache is donated, so the new cache
  reuses the old one's buffers);
* CPU seconds per chunk at the small size (median of 3 after a warm-up);
* the ratio decode / DiT per chunk, with the DiT's analytic FLOPs of the adaptive chunk
  (`benchmarks/real_size.py`).

    JAX_PLATFORMS=cpu python benchmarks/decode.py     # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def jaxpr_flops(closed) -> float:
  """Analytic FLOPs of a traced program: 2 x the multiply-adds of its convs and dots, from their
  shapes (not XLA's cost model); a scan's body counts its trip count times, a `cond` its
  costliest branch."""
  total = 0.0
  for eqn in closed.jaxpr.eqns:
    name = eqn.primitive.name
    out = eqn.outvars[0].aval
    if name == "conv_general_dilated":
      rhs, spec = eqn.invars[1].aval, eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
      total += 2.0 * math.prod(out.shape) * rhs.shape[spec[1]] * math.prod(rhs.shape[d] for d in spec[2:])
    elif name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      total += 2.0 * math.prod(out.shape) * math.prod(eqn.invars[0].aval.shape[d] for d in contract)
    subs = [v for v in eqn.params.values() if hasattr(v, "jaxpr") and hasattr(v, "consts")]
    if name == "cond":
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
    elif subs:
      total += sum(jaxpr_flops(j) for j in subs) * (eqn.params["length"] if name == "scan" else 1)
  return total


def measure(decoder, name: str, h: int, w: int, frames: int, timed: bool, cache_dtype=None) -> dict:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  graphdef, state = nnx.split(decoder)
  cache = decoder.init_decode_cache(1, h, w, cache_dtype)
  z = jnp.zeros((1, frames, h, w, 16), jnp.float32)
  # A later chunk: the cache has seen a first chunk (its static "started" flag is set).
  _, cache = jax.eval_shape(lambda s, z, c: nnx.merge(graphdef, s).decode_chunk_fn(z, c), state, z[:, :1], cache)
  cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), cache)
  fn = jax.jit(lambda s, z, c: nnx.merge(graphdef, s).decode_chunk_fn(z, c), donate_argnums=2)  # as decode_chunk
  analytic = jaxpr_flops(jax.make_jaxpr(fn)(state, z, cache))
  compiled = fn.lower(state, z, cache).compile()
  mem = compiled.memory_analysis()
  loops = frames if name == "wan_vae" else 1  # the VAE's per-latent-frame scan body is counted once
  row = {
    "decoder": name if cache_dtype is None else f"{name} ({jnp.dtype(cache_dtype).name} cache)",
    "latent_hw": [h, w],
    "gflop_per_chunk": _flops(compiled) * loops / 1e9,
    "analytic_gflop_per_chunk": analytic / 1e9,
    "cache_mb": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) / 1e6,
    "temporaries_mb": mem.temp_size_in_bytes / 1e6,
    "peak_mb": (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes) / 1e6,
    "params_m": sum(x.size for x in jax.tree.leaves(state)) / 1e6,
  }
  if timed:
    _, cache = jax.block_until_ready(compiled(state, z, cache))
    ts = []
    for _ in range(3):
      t0 = time.process_time()
      _, cache = jax.block_until_ready(compiled(state, z, cache))  # the old cache was donated
      ts.append(time.process_time() - t0)
    row["cpu_s_per_chunk"] = sorted(ts)[1]
  return row


def main(argv=None):
  import asvd  # noqa: PLC0415
  from asvd.models.taehv import init_taehv  # noqa: PLC0415
  from asvd.models.vae import init_vae  # noqa: PLC0415
  from benchmarks.real_size import analytic_forward  # noqa: PLC0415

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.path.join(_REPO, "benchmarks", "results", "decode_cpu.json"))
  p.add_argument("--untimed", action="store_true", help="compile only (no CPU time at the small size)")
  a = p.parse_args(argv)
  from asvd import transition as tr  # noqa: PLC0415
  from asvd.models.dit import DiTConfig  # noqa: PLC0415

  rows = []
  for (h, w), timed in (((60, 104), False), ((16, 16), True)):
    cfg = asvd.load_config("configs/wan_t2v_1_3b.py", [f"rollout.latent_hw=({h}, {w})"])
    lay = tr.make_layout(cfg.rollout, DiTConfig.from_config(cfg.model), None, cfg.sampler)
    dit = (len(lay.timesteps) + 1) * analytic_forward(cfg, lay) / 1e9
    vae = init_vae(None, 0)
    for name, dec, cdt in (("wan_vae", vae, None), ("wan_vae", vae, "bfloat16"), ("taehv", init_taehv(None, 0), None)):
      r = measure(dec, name, h, w, 3, timed and not a.untimed, cdt)
      r["dit_gflop_per_chunk"] = dit
      r["decode_over_dit"] = r["gflop_per_chunk"] / dit
      rows.append(r)
      print(json.dumps(r))
  lines = ["| decoder | latent h x w | GFLOP/chunk (XLA) | analytic GFLOP/chunk | decode / DiT | cache MB | temporaries MB | peak MB | params M | CPU s/chunk |", "|" + " --- |" * 10]
  for r in rows:
    cpu = f"{r['cpu_s_per_chunk']:.2f}" if "cpu_s_per_chunk" in r else "—"
    lines.append(f"| {r['decoder']} | {r['latent_hw'][0]} x {r['latent_hw'][1]} | {r['gflop_per_chunk']:.0f} | {r['analytic_gflop_per_chunk']:.0f} | {100 * r['decode_over_dit']:.1f}% | {r['cache_mb']:.0f} | {r['temporaries_mb']:.0f} | {r['peak_mb']:.0f} | {r['params_m']:.1f} | {cpu} |")
  print("\n".join(lines))
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump({"chunk_latent_frames": 3, "results": rows, "table": lines}, f, indent=2)
  print(f"-> {a.out}")


if __name__ == "__main__":
  main()
