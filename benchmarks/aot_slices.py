"""Which TPU slices the real-size programs fit: `asvd aot` for each row below, compiled on this
CPU for the slice (libtpu's topology descriptions; the `tpu` extra), one process per row (a
compiler crash ends only its row).

    python benchmarks/aot_slices.py                 # every row missing from benchmarks/results/aot/
    python benchmarks/aot_slices.py --rows dmd_v5p8_full --force
    python benchmarks/aot_slices.py --table         # the markdown table from the stored results

Each row writes `benchmarks/results/aot/<row>.json` (`asvd aot --json`: per-device arguments,
temporaries, outputs, donated bytes, FLOPs; a program the TPU compiler refuses as too large is
stored with the temporaries it reported, one it crashes on with the signal). Each DMD row takes
2-7 minutes and about 5 GB of host memory on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "aot")
V5P8 = ["--topology", "v5p:2x2x2", "--config.mesh.fsdp=-1"]
# One sample's tokens split 4 ways (`act_tokens` over context), parameters over fsdp 2.
CTX4 = ["--topology", "v5p:2x2x2", "--config.mesh.fsdp=2", "--config.mesh.context=4"]
# ... and the cached K/V's token axis split over context too (each shard keeps 1/4 of the cache).
KV_CTX = ["--config.mesh.rules.tokens=context"]
NONE = ["--config.model.remat=none"]
B8 = ["--config.train.batch_size=8"]
T14 = ["--teacher-config", "configs/wan_t2v_14b.py"]

# name -> (what, asvd aot arguments after --config configs/wan_t2v_1_3b.py)
ROWS = {
  "transition_v5p8": ("rollout transition, batch 1", [*V5P8, "--programs", "transition"]),
  "dmd_v5p8_none": ("DMD generator step, batch 1, no layer remat", [*V5P8, "--programs", "dmd", *NONE]),
  "critic_v5p8_none": ("DMD critic step, batch 1, no layer remat", [*V5P8, "--programs", "critic", *NONE]),
  "dmd_v5p8_b8_none": ("DMD generator step, batch 8, no layer remat", [*V5P8, "--programs", "dmd", *NONE, *B8]),
  "dmd_v5p8_b8_replay_none": ("DMD generator step by chunk replay, batch 8, no layer remat", [*V5P8, "--programs", "dmd", *NONE, *B8, "--config.train.dmd.replay=True"]),
  "critic_v5p8_b8_none": ("DMD critic step, batch 8, no layer remat", [*V5P8, "--programs", "critic", *NONE, *B8]),
  "dmd_v5p8_full": ("DMD generator step, batch 1 (config default: remat full)", [*V5P8, "--programs", "dmd"]),
  "critic_v5p8_full": ("DMD critic step, batch 1 (remat full)", [*V5P8, "--programs", "critic"]),
  "critic_v5p8_b8_full": ("DMD critic step, batch 8 (remat full)", [*V5P8, "--programs", "critic", *B8]),
  "dmd_v5p8_ctx4_full": ("DMD generator step, batch 1, fsdp 2 x context 4 (remat full)", [*CTX4, "--programs", "dmd"]),
  "critic_v5p8_ctx4_full": ("DMD critic step, batch 1, fsdp 2 x context 4 (remat full)", [*CTX4, "--programs", "critic"]),
  "critic_v5p8_ctx4_none": ("DMD critic step, batch 1, fsdp 2 x context 4, no layer remat", [*CTX4, "--programs", "critic", *NONE]),
  "transition_v5p8_ctx4": ("rollout transition, batch 1, fsdp 2 x context 4", [*CTX4, "--programs", "transition"]),
  "dmd_v5p8_ctx4kv_full": ("DMD generator step, batch 1, fsdp 2 x context 4, KV cache over context (remat full)", [*CTX4, *KV_CTX, "--programs", "dmd"]),
  "transition_v5p8_ctx4kv": ("rollout transition, batch 1, fsdp 2 x context 4, KV cache over context", [*CTX4, *KV_CTX, "--programs", "transition"]),
  "dmd14_v5p8_full": ("DMD steps with a 14B teacher and critic, batch 1 (remat full)", [*V5P8, "--programs", "dmd,critic", *T14]),
}


def run_row(name: str) -> dict:
  what, extra = ROWS[name]
  path = os.path.join(OUT, f"{name}.json")
  cmd = [sys.executable, "-m", "asvd.main", "aot", "--config", "configs/wan_t2v_1_3b.py", *extra, "--json", path]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(HERE))
  if p.returncode < 0 or not os.path.exists(path):  # a crash: no JSON of its own
    last = [x for x in p.stderr.splitlines() if "Check failed" in x or "error" in x.lower()][-1:] or [f"exit {p.returncode}"]
    rec = {"config": "configs/wan_t2v_1_3b.py", "overrides": extra, "crashed": f"signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}", "stderr": last[0][:300]}
    with open(path, "w") as f:
      json.dump(rec, f, indent=2)
  with open(path) as f:
    rec = json.load(f)
  rec["row"], rec["what"] = name, what
  with open(path, "w") as f:
    json.dump(rec, f, indent=2)
  return rec


def table() -> str:
  gib = 2.0**30
  lines = [
    "| row | what | program | arguments GiB | temporaries GiB | total GiB | fits 95 GiB | TFLOP/step/chip |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for name, (what, _) in ROWS.items():
    path = os.path.join(OUT, f"{name}.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      rec = json.load(f)
    if "crashed" in rec:
      lines.append(f"| `{name}` | {what} | — | — | — | — | the TPU compiler crashed ({rec['crashed']}) | — |")
      continue
    hbm = rec["hbm_bytes"]
    for p in rec["programs"]:
      if p.get("refused"):
        lines.append(f"| `{name}` | {what} | {p['program']} | — | ≥ {p['temporaries'] / gib:.1f} | ≥ {p['total'] / gib:.1f} | **no** (the compiler refused it) | — |")
      else:
        fits = "yes" if p["total"] <= hbm else "**no**"
        lines.append(f"| `{name}` | {what} | {p['program']} | {p['arguments'] / gib:.2f} | {p['temporaries'] / gib:.2f} | {p['total'] / gib:.2f} | {fits} | {p['flops'] / 1e12:.1f} |")
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", default="", help=f"comma-separated, from: {', '.join(ROWS)} (default: those without a result)")
  ap.add_argument("--force", action="store_true", help="run rows that have a result too")
  ap.add_argument("--table", action="store_true", help="only print the table of the stored results")
  args = ap.parse_args()
  os.makedirs(OUT, exist_ok=True)
  if not args.table:
    rows = [r for r in args.rows.split(",") if r] or list(ROWS)
    bad = [r for r in rows if r not in ROWS]
    if bad:
      sys.exit(f"--rows {','.join(bad)}: choose from {', '.join(ROWS)}")
    for r in rows:
      if args.force or not os.path.exists(os.path.join(OUT, f"{r}.json")):
        print(f"[aot_slices] {r} ...", file=sys.stderr, flush=True)
        run_row(r)
  print(table())


if __name__ == "__main__":
  main()
