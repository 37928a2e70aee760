"""Trains the bundled PanWorld models with asvd's own stages and records how.

    python launch/panworld_bundle.py                    # all of it (about an hour on 2 cores)
    python launch/panworld_bundle.py --modes adaptive   # the teacher and one mode

The commands it runs (all `asvd train`, resumable: rerun this script after an interruption):

1. the teacher, once: `--config.train.stages='("teacher",)'` in `WORKDIR/teacher`;
2. per anchor mode (adaptive, sink, ema, none) in `WORKDIR/<mode>`: causal initialisation, then
   DMD, both from that one teacher (`--config.train.dmd.teacher`), `rollout.anchor=<mode>`; with
   the ODE init (`train.causal_init.method="ode"`) the modes share one bank of the teacher's
   trajectories, `WORKDIR/ode_bank.npz`, sampled by the first;
3. copies each mode's final DMD generator (its EMA) to `DEST/<mode>` and writes
   `DEST/record.json` (the commands, steps, final losses, wall times, the machine, the commit)
   and `benchmarks/results/panworld_train_<machine>.json` (seconds per step of each stage).

Every stage reads one PanWorld dataset, generated once in `WORKDIR/data`. `DEST` defaults to
the package's `asvd/assets/panworld`, which `asvd generate` and `asvd eval motion` run with no
flag; the script replaces there only asvd checkpoints and a `record.json` that asvd wrote
(`install`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from benchmarks import common  # noqa: E402

CONFIG = "configs/panworld.py"
MODES = ("adaptive", "sink", "ema", "none")


def _run(cmd: list[str], log: list) -> float:
  """Runs one `asvd ...` command (printed and recorded); returns its wall time in seconds."""
  shown = "asvd " + " ".join(shlex.quote(c) for c in cmd)
  print(f"\n$ {shown}", flush=True)
  t0 = time.perf_counter()
  rc = subprocess.call([sys.executable, "-m", "asvd.main", *cmd], cwd=_REPO)
  dt = time.perf_counter() - t0
  if rc != 0:
    sys.exit(f"panworld_bundle: `{shown}` failed (exit {rc}); rerun this script to resume")
  log.append({"command": shown, "seconds": round(dt, 1)})
  return dt


def _final(workdir: str, stage: str, n: int = 20) -> dict:
  """Mean of the last `n` logged values of each loss of `stage` (metrics.jsonl)."""
  rows = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if r.get("stage") == stage and "loss" in r:  # (sample rows hold sample/* metrics only)
        rows.append(r)
  keys = [k for k in rows[-1] if "loss" in k] if rows else []
  tail = rows[-n:]
  return {"steps": int(rows[-1]["step"]) if rows else 0, **{k: round(sum(r[k] for r in tail if k in r) / max(1, sum(k in r for r in tail)), 5) for k in keys}}


def install(sources: dict[str, str], dest: str):
  """Copies each mode's final model (`{mode: asvd checkpoint}`) to `dest/<mode>` and returns the
  `asvd.outputs.OutputDir` of `dest` (for `record.json`). Checked before anything is written:
  a `record.json` there that asvd did not write is refused (OutputDir), and `save_dit` replaces
  only an asvd checkpoint at `dest/<mode>` (atomically, the old one moved aside until the new one
  is in place), never a user's folder."""
  import asvd  # noqa: PLC0415
  from asvd.ckpt import dit_port  # noqa: PLC0415
  from asvd.outputs import OutputDir  # noqa: PLC0415

  out = OutputDir(dest, ["record.json"], flag="--dest")
  foreign = [m for m in sources if os.path.lexists(os.path.join(dest, m)) and not dit_port.is_asvd_checkpoint(os.path.join(dest, m))]
  if foreign:
    sys.exit(f"panworld_bundle: {', '.join(os.path.join(dest, m) for m in foreign)} exist(s) and are not asvd checkpoints; move them away")
  for mode, src in sources.items():
    asvd.save_dit(asvd.load_dit(src), os.path.join(dest, mode), overwrite=True)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="runs/panworld", help="training runs (default runs/panworld)")
  p.add_argument("--dest", default=os.path.join(_REPO, "asvd", "assets", "panworld"), help="where the final models go")
  p.add_argument("--modes", default=",".join(MODES), help="comma-separated anchor modes")
  p.add_argument("--no-progress", action="store_true")
  args, extra = p.parse_known_args()  # extra: --config.a.b=v overrides for every command
  modes = [m for m in args.modes.split(",") if m]
  if any(m not in MODES for m in modes):
    sys.exit(f"--modes {args.modes!r}: choose from {', '.join(MODES)}")
  wd = os.path.abspath(args.workdir)
  common_flags = ["--config", CONFIG, f"--config.train.data.data_dir={os.path.join(wd, 'data')}", *extra]
  if args.no_progress:
    common_flags.append("--no-progress")
  log, stages = [], []
  t_all = time.perf_counter()
  teacher_dir = os.path.join(wd, "teacher")
  dt = _run(["train", *common_flags, "--workdir", teacher_dir, "--config.train.stages=('teacher',)"], log)
  stages.append({"mode": "-", "stage": "teacher", "seconds": round(dt, 1), **_final(teacher_dir, "teacher")})
  teacher = os.path.join(teacher_dir, "teacher", "model")
  import asvd  # noqa: PLC0415

  # With the ODE init, the modes share one bank of the teacher's trajectories (sampled once).
  ode = asvd.load_config(os.path.join(_REPO, CONFIG), extra).train.causal_init.method == "ode"
  bank = [f"--config.train.causal_init.ode_bank={os.path.join(wd, 'ode_bank.npz')}"] if ode else []
  for mode in modes:
    mdir = os.path.join(wd, mode)
    for stage in ("causal_init", "dmd"):
      flags = [*common_flags, *bank, "--workdir", mdir, f"--config.rollout.anchor={mode}", f"--config.train.dmd.teacher={teacher}", f"--config.train.stages=('{stage}',)"]
      dt = _run(["train", *flags], log)
      stages.append({"mode": mode, "stage": stage, "seconds": round(dt, 1), **_final(mdir, stage)})
  total = time.perf_counter() - t_all

  out = install({m: os.path.join(wd, m, "dmd", "model") for m in modes}, args.dest)
  info = common.cpu_info()
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO, capture_output=True, text=True).stdout.strip()
  record = {
    "what": "the bundled PanWorld models (asvd/bundled.py): one teacher, then causal init + DMD per anchor mode",
    "config": CONFIG,
    "overrides": extra,
    "commands": [x["command"] for x in log],
    "stages": stages,
    "total_seconds": round(total, 1),
    "machine": info,
    "commit": commit,
    "date": common.timestamp(),
    "models": {m: f"{m}/ (from {os.path.join(args.workdir, m, 'dmd', 'model')})" for m in modes},
  }
  out.write_json("record.json", record)
  bench = {
    "benchmark": "panworld_train: wall seconds per step of each stage of the bundled PanWorld models (compile and checkpoints included)",
    "machine": info,
    "date": record["date"],
    "commit": commit,
    "rows": [{"mode": s["mode"], "stage": s["stage"], "steps": s["steps"], "seconds": s["seconds"], "s_per_step": round(s["seconds"] / max(1, s["steps"]), 3)} for s in stages],
    "total_seconds": record["total_seconds"],
  }
  out = os.path.join(_REPO, "benchmarks", "results", f"panworld_train_{common.default_device_name(info)}.json")
  with open(out, "w") as f:
    json.dump(bench, f, indent=2)
  print(f"\nwrote {args.dest} ({', '.join(modes)}) and record.json in {total / 60:.1f} min; timings in {out}")


if __name__ == "__main__":
  main()
