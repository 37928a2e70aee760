"""Shared helpers for the asvd benchmarks: environment, machine info, timing, peaks, FLOPs.

Nothing here imports jax or torch at module level: `configure_env` must run before the first
`import jax` so that `JAX_PLATFORMS` / `XLA_FLAGS` take effect.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# CPU flags that decide which matmul kernels are available (x86: AMX / AVX-512 BF16).
_INTERESTING_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx2", "fma")


def configure_env(xla_flags: str = "", platform_name: str = "cpu") -> None:
  """Sets the JAX platform and appends `xla_flags` to `XLA_FLAGS`; call before importing jax."""
  os.environ.setdefault("JAX_PLATFORMS", platform_name)
  if xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip()


def cpu_info() -> dict[str, Any]:
  """Model name, visible core count and the matmul-relevant ISA flags of this machine."""
  from asvd import host  # noqa: PLC0415

  model, flags = platform.processor() or platform.machine(), host.cpu_flags()
  try:
    with open("/proc/cpuinfo") as f:
      m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
    if m:
      model = m.group(1).strip()
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {
    "model": model,
    "cores": cores,
    "isa": sorted(f for f in _INTERESTING_FLAGS if f in flags),
    "machine": platform.machine(),
  }


def default_device_name(info: Mapping[str, Any]) -> str:
  """A file-name-safe label such as `amd-epyc-2c` from `cpu_info()`."""
  name = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*$", "", str(info["model"]).lower())
  name = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cpu"
  return f"{name}-{info['cores']}c"


def load_average() -> list[float] | None:
  """The 1/5/15-minute load averages (a hint of contention from other processes)."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def timestamp() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------
# Timing.
# ------------------------------------------------------------------------------------------------


def summarize(times: Sequence[float], cpu_times: Sequence[float] | None = None) -> dict[str, Any]:
  """Median / min / max of a list of seconds, the raw list and, if given, the median CPU time.

  CPU time (user + system of this process, all threads) is less sensitive to other processes
  on a shared machine than wall time, but counts spin-waiting threads too.
  """
  out = {
    "median_s": statistics.median(times),
    "min_s": min(times),
    "max_s": max(times),
    "runs_s": [round(t, 4) for t in times],
  }
  if cpu_times:
    out["cpu_median_s"] = statistics.median(cpu_times)
  return out


def interleaved_times(
  fns: Mapping[str, Callable[[], Any]],
  repeats: int,
  warmup: int = 1,
  gap_s: float = 0.0,
  cpu_times: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
  """Wall-clock seconds of each callable, run round-robin so that drift hits all alike.

  Args:
    fns: name -> a callable that runs the work to completion (block on async results inside).
    repeats: timed rounds.
    warmup: untimed rounds first.
    gap_s: sleep before each timed call, so that the previous library's worker threads stop
      spin-waiting before the next one starts.
    cpu_times: if given, filled with name -> process CPU seconds of each timed call.

  Returns:
    name -> list of `repeats` durations in seconds.
  """
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  out: dict[str, list[float]] = {k: [] for k in fns}
  if cpu_times is not None:
    cpu_times.update({k: [] for k in fns})
  for _ in range(repeats):
    for name, fn in fns.items():
      if gap_s:
        time.sleep(gap_s)
      c0, t0 = time.process_time(), time.perf_counter()
      fn()
      out[name].append(time.perf_counter() - t0)
      if cpu_times is not None:
        cpu_times[name].append(time.process_time() - c0)
  return out


# ------------------------------------------------------------------------------------------------
# Matmul peaks.
# ------------------------------------------------------------------------------------------------


def _peak_entry(
  per_shape: dict, m: int, k: int, n: int, fn: Callable[[], Any], repeats: int, name: str | None = None,
  slow_s: float = 2.0,
):
  """Times `fn` (an `[m, k] @ [k, n]` matmul) into `per_shape[name or "MxKxN"]`.

  A kernel whose first call takes longer than `slow_s` is timed by that one call only: such a
  figure can only lose the "best" to a real kernel, and repeating it would turn a benchmark of
  seconds into one of many minutes (torch's bf16 `matmul` on a CPU without native bf16 runs at
  under 1 GFLOP/s).
  """
  flop = 2 * m * k * n
  key = name or f"{m}x{k}x{n}"
  c0, t0 = time.process_time(), time.perf_counter()
  fn()
  first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
  if first > slow_s:
    per_shape[key] = {"gflops": flop / first / 1e9, "gflops_per_cpu_s": flop / first_cpu / 1e9, "calls": 1}
    return
  cpu: dict[str, list[float]] = {}
  times = interleaved_times({"mm": fn}, repeats, warmup=1, cpu_times=cpu)
  per_shape[key] = {
    "gflops": flop / statistics.median(times["mm"]) / 1e9,
    "gflops_per_cpu_s": flop / statistics.median(cpu["mm"]) / 1e9,
    "calls": repeats,
  }


def _best(per_shape: dict) -> dict:
  best = max(per_shape, key=lambda s: per_shape[s]["gflops"])
  return {
    "gflops": per_shape[best]["gflops"],
    "gflops_per_cpu_s": max(v["gflops_per_cpu_s"] for v in per_shape.values()),
    "shape": best,
    "per_shape": per_shape,
  }


def jax_matmul_peak(dtype: str, shapes: Sequence[tuple[int, int, int]], repeats: int = 5) -> dict:
  """Best achieved FLOP/s of a single jitted `[M,K] @ [K,N]` in JAX over `shapes`.

  bf16 is measured as bf16 inputs with float32 accumulation and output
  (`preferred_element_type=float32`), which is how the model's matmuls are written. A bf16-output
  dot is not used: XLA:CPU upcasts it to an f32 matmul.

  Args:
    dtype: "float32" or "bfloat16".
    shapes: (M, K, N) triples to try.
    repeats: timed calls per shape (the median is used).

  Returns:
    dict with `gflops` (best wall-clock GFLOP/s), `gflops_per_cpu_s` (best GFLOP per second of
    process CPU time, the contention-robust figure), `shape` (M x K x N of the best) and
    `per_shape`.
  """
  import jax
  import jax.numpy as jnp

  dt = jnp.dtype(dtype)
  mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  per_shape = {}
  for m, k, n in shapes:
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (m, k), jnp.float32).astype(dt)
    b = jax.random.normal(kb, (k, n), jnp.float32).astype(dt)
    c = mm.lower(a, b).compile()  # compiled first: `_peak_entry` times the first call too
    fn = lambda a=a, b=b, c=c: c(a, b).block_until_ready()
    _peak_entry(per_shape, m, k, n, fn, repeats)
  return _best(per_shape)


def torch_matmul_peak(dtype: str, shapes: Sequence[tuple[int, int, int]], repeats: int = 5) -> dict:
  """Best achieved FLOP/s of a torch matmul (bf16 in and out, f32 accumulation inside).

  Two layouts per shape: `torch.matmul(a, b)` with `b [K, N]`, and `F.linear(a, w)` with
  `w [N, K]`, which is what `nn.Linear` (every projection in diffusers) runs. They can differ by
  orders of magnitude: on an AVX2 CPU without native bf16, torch 2.13's bf16 `matmul` of a
  row-major `b` takes a reference kernel (0.5 GFLOP/s) while `linear` takes oneDNN (14 GFLOP/s).
  The best of both is the peak, so that diffusers' MFU is taken against the kernel it uses.
  Entries are keyed `"MxKxN matmul"` / `"MxKxN linear"`.
  """
  import torch

  dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  gen = torch.Generator().manual_seed(0)
  per_shape = {}
  with torch.inference_mode():
    for m, k, n in shapes:
      a = torch.randn(m, k, generator=gen).to(dt)
      b = torch.randn(k, n, generator=gen).to(dt)
      w = b.t().contiguous()  # [N, K], nn.Linear's weight layout
      fns = {"matmul": lambda a=a, b=b: torch.matmul(a, b), "linear": lambda a=a, w=w: torch.nn.functional.linear(a, w)}
      for layout, fn in fns.items():
        _peak_entry(per_shape, m, k, n, fn, repeats, name=f"{m}x{k}x{n} {layout}")
  return _best(per_shape)


# ------------------------------------------------------------------------------------------------
# FLOPs of the Wan DiT forward.
# ------------------------------------------------------------------------------------------------


def dit_flops(
  model_cfg: Any, batch: int, frames: int, height: int, width: int, text_len: int
) -> dict:
  """Analytic matmul FLOPs (2 per multiply-add) of one `WanDiT` forward, by component.

  With tokens S = (F/pt)(H/ph)(W/pw), width D, FFN width Dff, text length Lt, L layers:

    patch_embed  2 B S (C pt ph pw) D
    time_embed   2 B F' (freq D + D D + 6 D D)       F' = latent frames after patching
    text_embed   2 B Lt (text_dim D + D D)
    per layer:
      self q,k,v,o      4 * 2 B S D D
      self attention    2 * 2 B S S D               (q k^T and p v, summed over heads)
      cross q,o         2 * 2 B S D D
      cross k,v (text)  2 * 2 B Lt D D
      cross attention   2 * 2 B S Lt D
      ffn               2 * 2 B S D Dff
    head         2 B S D (C_out pt ph pw)

  Norms, softmax, RoPE, GELU and modulation are not counted (the usual MFU convention).

  Returns:
    dict of component -> FLOPs, plus `per_layer`, `total` and `tokens`.
  """
  c = model_cfg
  pt, ph, pw = (int(p) for p in c.patch_size)
  f_lat = frames // pt
  s = f_lat * (height // ph) * (width // pw)
  d, dff, lt = c.dim, c.ffn_dim, text_len
  b = batch
  patch = math.prod((pt, ph, pw))
  layer = {
    "self_qkvo": 4 * 2 * b * s * d * d,
    "self_attention": 2 * 2 * b * s * s * d,
    "cross_q_o": 2 * 2 * b * s * d * d,
    "cross_kv_text": 2 * 2 * b * lt * d * d,
    "cross_attention": 2 * 2 * b * s * lt * d,
    "ffn": 2 * 2 * b * s * d * dff,
  }
  per_layer = sum(layer.values())
  out = {
    "tokens": s,
    "patch_embed": 2 * b * s * c.in_channels * patch * d,
    "time_embed": 2 * b * f_lat * (c.freq_dim * d + d * d + 6 * d * d),
    "text_embed": 2 * b * lt * (c.text_dim * d + d * d),
    **{f"layers.{k}": v * c.num_layers for k, v in layer.items()},
    "head": 2 * b * s * d * c.out_channels * patch,
    "per_layer": per_layer,
  }
  out["total"] = sum(v for k, v in out.items() if k not in ("tokens", "per_layer"))
  return out


# ------------------------------------------------------------------------------------------------
# Output.
# ------------------------------------------------------------------------------------------------


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON, creating the folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=False, default=str)
    f.write("\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)
