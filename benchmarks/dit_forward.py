"""Forward-pass benchmark: asvd's JAX `WanDiT` against diffusers' `WanTransformer3DModel`.

Both models get the same config, the same weights (the JAX model is initialised, exported with
diffusers names and loaded into diffusers) and the same inputs, in one process. For every dtype
the script

1. measures the machine's matmul peak first (JAX and torch, per dtype);
2. checks that the two outputs agree;
3. times the two forwards round-robin (warm-up first, then `--repeats` rounds; medians reported);
4. reports achieved FLOP/s (analytic count, cross-checked with XLA's `cost_analysis`) and MFU
   against the measured peak, and writes JSON to `benchmarks/results/dit_forward_<device>.json`.

Run from the repository root (about 1-3 minutes for the small config on 2 cores):

    source .venv/bin/activate
    python benchmarks/dit_forward.py --device-name my-machine

bf16 means bf16 weights and activations with float32 accumulation on both sides; diffusers is
loaded the way its pipelines do it (`from_pretrained(torch_dtype=torch.bfloat16)`, which keeps
`_keep_in_fp32_modules` such as the norms and time embedder in float32).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from benchmarks import common  # noqa: E402

_DTYPES = {"f32": "float32", "bf16": "bfloat16"}
# Targets at the small config (see benchmarks/README.md).
_TARGETS = {"f32_speedup": 1.0, "bf16_speedup": 1.2, "bf16_mfu": 0.5}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/small.py", help="asvd config file (no :arg)")
  p.add_argument("--device-name", default=None, help="label for the results file (default: CPU)")
  p.add_argument("--dtypes", default="f32,bf16", help="comma-separated subset of f32,bf16")
  p.add_argument("--repeats", type=int, default=5, help="timed rounds per model and dtype")
  p.add_argument("--warmup", type=int, default=1, help="untimed rounds after compilation")
  p.add_argument("--frames", type=int, default=6, help="latent frames F")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
  p.add_argument(
    "--override", action="append", default=[], help="config override a.b=v (repeatable)"
  )
  p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax is imported")
  p.add_argument("--skip-diffusers", action="store_true", help="time the JAX model only")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def _peak_shapes(model_cfg, tokens):
  """The model's largest matmul (tokens x dim x ffn) and a 2048^3 square; the best counts."""
  return [(tokens, model_cfg.dim, model_cfg.ffn_dim), (2048, 2048, 2048)]


def _build_diffusers(model_cfg, state_dict, dtype_name, tmpdir):
  """diffusers model with our weights: f32 directly, bf16 through save/from_pretrained."""
  import numpy as np
  import torch
  from diffusers import WanTransformer3DModel

  c = model_cfg
  model = WanTransformer3DModel(
    patch_size=tuple(int(p) for p in c.patch_size),
    num_attention_heads=c.num_heads,
    attention_head_dim=c.dim // c.num_heads,
    in_channels=c.in_channels,
    out_channels=c.out_channels,
    text_dim=c.text_dim,
    freq_dim=c.freq_dim,
    ffn_dim=c.ffn_dim,
    num_layers=c.num_layers,
    cross_attn_norm=c.cross_attn_norm,
    eps=c.eps,
    rope_max_seq_len=c.rope_max_seq_len,
  )
  tensors = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state_dict.items()}
  model.load_state_dict(tensors, strict=True)
  if dtype_name == "bfloat16":
    path = os.path.join(tmpdir, "diffusers_dit")
    model.save_pretrained(path)
    model = WanTransformer3DModel.from_pretrained(path, torch_dtype=torch.bfloat16)
  return model.eval()


def _jax_model(model, dtype_name, model_cfg_overrides, config, seed):
  """(forward, state) of the JAX model in `dtype_name`, weights cast from the f32 `model`."""
  import jax
  from flax import nnx

  import asvd

  cfg = asvd.load_config(
    config, [*model_cfg_overrides, f"model.dtype={dtype_name}", f"model.param_dtype={dtype_name}"]
  )
  target = asvd.init_dit(cfg.model, seed)
  graphdef, state = nnx.split(target)
  src = nnx.state(model)
  state = jax.tree.map(lambda t, s: s.astype(t.dtype), state, src)
  forward = jax.jit(lambda st, x, t, c: nnx.merge(graphdef, st)(x, t, c))
  return forward, state


def _xla_flops(config, overrides, shapes):
  """XLA's own FLOP count of the forward, for cross-checking `common.dit_flops`.

  XLA counts a loop body once, so this lowers (without compiling) a copy with the layers
  unrolled (`scan_layers=False`) and the loop-free reference attention (`attention=xla`); the
  count is a property of the math, not of the kernel being timed. It includes elementwise work.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import asvd
  from asvd.models.dit import abstract_dit

  cfg = asvd.load_config(config, [*overrides, "model.scan_layers=False", "model.attention=xla"])
  graphdef, state = nnx.split(abstract_dit(cfg.model))
  f = jax.jit(lambda st, x, t, c: nnx.merge(graphdef, st)(x, t, c))
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  cost = f.lower(state, *args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"flops": float(cost["flops"]), "transcendentals": float(cost.get("transcendentals", 0))}


def _measure_peaks(dtypes, shapes, with_torch):
  """dtype -> {"jax": ..., "torch": ...} matmul peaks (see common.jax_matmul_peak)."""
  out = {}
  for d in dtypes:
    out[d] = {"jax": common.jax_matmul_peak(_DTYPES[d], shapes)}
    if with_torch:
      out[d]["torch"] = common.torch_matmul_peak(_DTYPES[d], shapes)
  return out


def _combine_peaks(first, last):
  """Per library and dtype, the larger of two peak measurements.

  On a shared machine a peak measured while another process holds a core is too low and would
  inflate MFU (even past 100%); the larger of the two is the conservative choice.
  """
  out = {}
  for d, libs in first.items():
    out[d] = {}
    for lib, p in libs.items():
      q = last[d][lib]
      out[d][lib] = {
        "gflops": max(p["gflops"], q["gflops"]),
        "gflops_per_cpu_s": max(p["gflops_per_cpu_s"], q["gflops_per_cpu_s"]),
      }
  return out


def _add_mfu(r, gflop, peak, jax_peak):
  """Adds MFU figures to a timing summary `r` (wall-clock and CPU-time based)."""
  r["mfu"] = r["gflops"] / peak["gflops"]
  r["mfu_vs_jax_peak"] = r["gflops"] / jax_peak["gflops"]
  # The same ratio on CPU time: GFLOP per CPU-second of the model over that of the matmul.
  r["mfu_cpu"] = gflop / r["cpu_median_s"] / peak["gflops_per_cpu_s"]


def _table_row(d, e, peak):
  """One markdown row of the results table."""
  jx, df = e["jax"], e.get("diffusers")
  ms = lambda r: f"{r['median_s'] * 1e3:.0f} ({r['min_s'] * 1e3:.0f})"
  return [
    d,
    f"{peak['jax']['gflops']:.0f}",
    f"{peak['torch']['gflops']:.0f}" if "torch" in peak else "-",
    ms(jx),
    ms(df) if df else "-",
    f"{e['speedup_median']:.2f}x ({e['speedup_min']:.2f}x)" if df else "-",
    f"{jx['gflops']:.0f}",
    f"{jx['mfu']:.0%}",
    f"{df['gflops']:.0f}" if df else "-",
    f"{df['mfu']:.0%}" if df else "-",
    f"{e['speedup_cpu']:.2f}x" if df else "-",
    f"{jx['mfu_cpu']:.0%}",
  ]


def main(argv=None) -> dict:
  args = parse_args(argv)
  common.configure_env(args.xla_flags)
  info = common.cpu_info()
  threads = args.threads or info["cores"]

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  import asvd
  from asvd.ckpt.dit_port import export_state_dict

  torch.set_num_threads(threads)
  dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  for d in dtypes:
    if d not in _DTYPES:
      raise SystemExit(f"--dtypes: unknown {d!r}; choose from {sorted(_DTYPES)}")
  device = args.device_name or common.default_device_name(info)
  out_path = args.out or os.path.join(_REPO, "benchmarks", "results", f"dit_forward_{device}.json")
  t_start = time.perf_counter()
  load_before = common.load_average()

  cfg = asvd.load_config(args.config, args.override)
  mc = cfg.model
  if mc.dtype != "float32" or mc.param_dtype != "float32":
    raise SystemExit("--config: give the f32 config; the dtypes come from --dtypes")
  hh, ww = (int(v) for v in cfg.rollout.latent_hw)
  b, f, lt = args.batch, args.frames, mc.text_len
  flops = common.dit_flops(mc, b, f, hh, ww, lt)
  gflop = flops["total"] / 1e9
  print(
    f"asvd dit_forward | {args.config} | latents [{b}, {f}, {hh}, {ww}, {mc.in_channels}] "
    f"({flops['tokens']} tokens) | {gflop:.1f} GFLOP | {info['model']}, {info['cores']} cores, "
    f"torch threads {threads} | load {load_before}",
    flush=True,
  )

  # 1. Matmul peaks, before anything else (measured again at the end; see _combine_peaks).
  shapes = _peak_shapes(mc, flops["tokens"])
  peaks_first = _measure_peaks(dtypes, shapes, not args.skip_diffusers)
  for d, p in peaks_first.items():
    print(
      f"peak {d}: " + ", ".join(f"{lib} {v['gflops']:.0f} GFLOP/s" for lib, v in p.items()),
      flush=True,
    )

  # 2. Models and inputs (f32 source of truth).
  model32 = asvd.init_dit(mc, args.seed)
  state_dict = None if args.skip_diffusers else export_state_dict(model32, "diffusers")
  rng = np.random.default_rng(args.seed)
  x_np = rng.standard_normal((b, f, hh, ww, mc.in_channels)).astype(np.float32)
  ctx_np = rng.standard_normal((b, lt, mc.text_dim)).astype(np.float32)
  t_value = 750.0
  t_np = np.full((b, f), t_value, np.float32)

  results = {}
  with tempfile.TemporaryDirectory() as tmpdir:
    for d in dtypes:
      dn = _DTYPES[d]
      jdt = jnp.dtype(dn)
      forward, state = _jax_model(model32, dn, args.override, args.config, args.seed)
      x, ctx, t = jnp.asarray(x_np, jdt), jnp.asarray(ctx_np, jdt), jnp.asarray(t_np)
      t0 = time.perf_counter()
      compiled = forward.lower(state, x, t, ctx).compile()
      compile_s = time.perf_counter() - t0
      y_jax = np.asarray(compiled(state, x, t, ctx), np.float32)
      fns = {"jax": lambda f_=compiled, s=state, a=(x, t, ctx): f_(s, *a).block_until_ready()}
      entry = {"jax_compile_s": compile_s}

      if not args.skip_diffusers:
        tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dn]
        dmodel = _build_diffusers(mc, state_dict, dn, tmpdir)
        xt = torch.from_numpy(x_np).permute(0, 4, 1, 2, 3).contiguous().to(tdt)
        ct = torch.from_numpy(ctx_np).to(tdt)
        tt = torch.full((b,), t_value, dtype=torch.float32)

        def run_diffusers(m=dmodel, xt=xt, tt=tt, ct=ct):
          with torch.inference_mode():
            return m(xt, tt, ct, return_dict=False)[0]

        y_dif = run_diffusers().float().permute(0, 2, 3, 4, 1).numpy()
        err = y_jax - y_dif
        entry["agreement"] = {
          "max_abs_diff": float(np.abs(err).max()),
          "rel_l2": float(np.linalg.norm(err) / max(np.linalg.norm(y_dif), 1e-30)),
        }
        fns["diffusers"] = run_diffusers

      cpu = {}
      times = common.interleaved_times(fns, args.repeats, args.warmup, gap_s=0.2, cpu_times=cpu)
      for name, ts in times.items():
        entry[name] = common.summarize(ts, cpu[name])
        entry[name]["gflops"] = gflop / entry[name]["median_s"]
      if "diffusers" in entry:
        entry["speedup_median"] = entry["diffusers"]["median_s"] / entry["jax"]["median_s"]
        entry["speedup_min"] = entry["diffusers"]["min_s"] / entry["jax"]["min_s"]
        entry["speedup_cpu"] = entry["diffusers"]["cpu_median_s"] / entry["jax"]["cpu_median_s"]
      results[d] = entry
      msg = f"{d}: jax {entry['jax']['median_s'] * 1e3:.0f} ms"
      if "diffusers" in entry:
        msg += (
          f", diffusers {entry['diffusers']['median_s'] * 1e3:.0f} ms, "
          f"speedup {entry['speedup_median']:.2f}x, max|diff| "
          f"{entry['agreement']['max_abs_diff']:.2e}"
        )
      print(msg, flush=True)

  # 3. Peaks again; MFU is taken against the larger of the two measurements.
  peaks_last = _measure_peaks(dtypes, shapes, not args.skip_diffusers)
  peaks = _combine_peaks(peaks_first, peaks_last)
  for d, entry in results.items():
    for name in ("jax", "diffusers"):
      if name in entry:
        _add_mfu(entry[name], gflop, peaks[d]["jax" if name == "jax" else "torch"], peaks[d]["jax"])

  # 4. FLOP cross-check.
  xla = _xla_flops(
    args.config, args.override, [(b, f, hh, ww, mc.in_channels), (b, f), (b, lt, mc.text_dim)]
  )

  targets = {}
  if "f32" in results and "speedup_median" in results["f32"]:
    targets["f32_speedup>=1.0"] = results["f32"]["speedup_median"] >= _TARGETS["f32_speedup"]
  if "bf16" in results:
    if "speedup_median" in results["bf16"]:
      targets["bf16_speedup>=1.2"] = results["bf16"]["speedup_median"] >= _TARGETS["bf16_speedup"]
    targets["bf16_mfu>=0.5"] = results["bf16"]["jax"]["mfu"] >= _TARGETS["bf16_mfu"]

  report = {
    "benchmark": "dit_forward",
    "device": device,
    "timestamp": common.timestamp(),
    "machine": info,
    "versions": {
      "jax": jax.__version__,
      "torch": torch.__version__,
      "diffusers": __import__("diffusers").__version__,
      "asvd": asvd.__version__,
    },
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "torch_threads": threads,
    "config": args.config,
    "overrides": args.override,
    "model": {
      k: mc[k] for k in ("dim", "num_heads", "num_layers", "ffn_dim", "text_dim", "attention")
    },
    "inputs": {"latents": [b, f, hh, ww, mc.in_channels], "context": [b, lt, mc.text_dim]},
    "flops": {
      **flops,
      "xla_cost_analysis": xla,
      "analytic_over_xla": flops["total"] / xla["flops"],
    },
    "peaks_gflops": peaks,
    "peaks_first_gflops": peaks_first,
    "peaks_last_gflops": peaks_last,
    "results": results,
    "targets_met": targets,
    "repeats": args.repeats,
    "load_average": {"before": load_before, "after": common.load_average()},
    "wall_s": time.perf_counter() - t_start,
  }
  common.write_json(out_path, report)

  rows = [_table_row(d, e, peaks[d]) for d, e in results.items()]
  header = [
    "dtype", "JAX peak GFLOP/s", "torch peak GFLOP/s", "JAX ms median (min)",
    "diffusers ms median (min)", "speedup median (min)", "JAX GFLOP/s", "JAX MFU",
    "diffusers GFLOP/s", "diffusers MFU (torch peak)", "speedup (CPU time)", "JAX MFU (CPU time)",
  ]  # fmt: skip
  print()
  print(common.markdown_table(header, rows))
  print(
    f"\nFLOPs: analytic {gflop:.2f} G, XLA cost_analysis {xla['flops'] / 1e9:.2f} G "
    f"(incl. elementwise). Peaks first/last (GFLOP/s): "
    + "; ".join(
      f"{d} {lib} {peaks_first[d][lib]['gflops']:.0f}/{peaks_last[d][lib]['gflops']:.0f}"
      for d in peaks_first
      for lib in peaks_first[d]
    )
    + f". Targets: {targets}. Load {report['load_average']}. "
    f"Wall {report['wall_s']:.0f} s. -> {out_path}"
  )
  return report


if __name__ == "__main__":
  main()
