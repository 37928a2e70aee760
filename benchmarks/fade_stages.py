"""Where PanWorld videos lose their look: contrast and sharpness at each stage of the recipe.

    python benchmarks/fade_stages.py --teacher runs/pw/teacher/teacher/model \
        --student adaptive=asvd/assets/panworld/adaptive --student init=runs/pw/adaptive/causal_init/model

Rows (the eight evaluation captions x `--seeds` seeds, relative to real clips of each caption,
means with bootstrap 95% intervals; `asvd/eval/fade.py`): the teacher's ODE samples as the causal
init draws them (Euler `ode_steps`, CFG `ode_cfg_scale`), the same with more steps and without
CFG, the teacher under the student's few-step sampler; per student, its rollout's chunk 0 (no
context), the last chunk of the first horizon and the last chunk. Writes
`results/fade_stages_<machine>.json`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from benchmarks import common  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/panworld.py")
  p.add_argument("--teacher", default=None, help="the teacher checkpoint (rows skipped without it)")
  p.add_argument("--student", action="append", default=[], metavar="NAME=PATH[:MODE]", help="a causal student (anchor mode MODE, default adaptive); repeat")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--multiple", type=float, default=6.0, help="rollout length in horizons")
  p.add_argument("--out", default=None, help="JSON path (default results/fade_stages_<machine>.json)")
  args, overrides = p.parse_known_args()
  import asvd  # noqa: PLC0415
  from asvd.eval import fade, report, stats  # noqa: PLC0415

  cfg = asvd.load_config(os.path.join(_REPO, args.config) if not os.path.exists(args.config) else args.config, overrides)
  prompts, seeds = list(report.PROMPTS), list(range(args.seeds))
  rows = []

  def add(stage, look, frames=None):
    row = {"stage": stage}
    for k, v in look.items():
      v = v if frames is None else v[:, frames]
      row[k] = stats.bootstrap(v.reshape(v.shape[0], -1).mean(1)).as_dict()
    rows.append(row)
    print(f"{stage:55s} contrast {stats.Interval(**row['contrast']).text()}  sharpness {stats.Interval(**row['sharpness']).text()}", flush=True)

  if args.teacher:
    teacher = asvd.load_dit(args.teacher)
    c = cfg.train.causal_init
    add(f"teacher ODE, {int(c.ode_steps)} Euler steps, CFG {float(c.ode_cfg_scale):g} (the causal init's)", fade.teacher_look(teacher, cfg, prompts, seeds))
    add(f"teacher ODE, {int(c.ode_steps)} Euler steps, no CFG", fade.teacher_look(teacher, cfg, prompts, seeds, cfg_scale=0.0))
    add(f"teacher ODE, 48 Euler steps, CFG {float(c.ode_cfg_scale):g}", fade.teacher_look(teacher, cfg, prompts, seeds, steps=48))
    add("teacher, the student's few-step sampler (whole clip)", fade.teacher_look(teacher, cfg, prompts, seeds, method="few_step"))
  h, f = int(cfg.train.horizon_frames), int(cfg.rollout.chunk_frames)
  chunks = math.ceil(args.multiple * h / f)
  for spec in args.student:
    name, _, rest = spec.partition("=")
    path, _, mode = rest.partition(":")
    scfg = asvd.load_config(args.config, [*overrides, f"--config.rollout.anchor={mode or 'adaptive'}"])
    look = fade.rollout_look(asvd.load_dit(path), scfg, prompts, seeds, chunks=chunks)
    add(f"{name}: chunk 0 (no context)", look, [0])
    add(f"{name}: chunk {math.ceil(h / f) - 1} (end of the first horizon)", look, [math.ceil(h / f) - 1])
    add(f"{name}: chunk {chunks - 1} ({args.multiple:g}x)", look, [chunks - 1])
  info = common.cpu_info()
  res = {
    "benchmark": "fade_stages: contrast and sharpness relative to real PanWorld clips at each stage of the recipe (8 captions x seeds, bootstrap 95%)",
    "machine": info,
    "date": common.timestamp(),
    "config": args.config,
    "overrides": overrides,
    "teacher": args.teacher,
    "students": args.student,
    "seeds": seeds,
    "rows": rows,
  }
  path = args.out or os.path.join(_REPO, "benchmarks", "results", f"fade_stages_{common.default_device_name(info)}.json")
  common.write_json(path, res)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
