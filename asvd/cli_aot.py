"""`asvd aot`: compile the rollout and training programs for a TPU slice (or the local devices)
without running them, and print per-device memory and FLOPs (a thin layer over asvd.aot)."""

from __future__ import annotations

import json
import os
import sys


def add_commands(sub) -> None:
  a = sub.add_parser("aot", help="memory plan: compile for a TPU slice on this machine and print per-device bytes (exit 1 if it does not fit)")
  a.add_argument("--config", required=True, help="configs/X.py[:arg]; --config.mesh.fsdp=-1 etc. choose the mesh")
  a.add_argument("--topology", default=None, help="a TPU slice, e.g. v5p:2x2x2, v5e:4x4 (needs the tpu extra); default: the local devices")
  a.add_argument("--programs", default="transition,dmd,critic", help="comma-separated: transition, dmd (generator step), critic")
  a.add_argument("--teacher-config", default=None, help="another teacher (and critic) architecture, e.g. configs/wan_t2v_14b.py")
  a.add_argument("--hbm-gib", type=float, default=None, help="memory per device to check against (default: the TPU's HBM, or what the local device reports)")
  a.add_argument("--json", default=None, help="also write the numbers to this JSON file")
  a.set_defaults(func=cmd_aot)


def cmd_aot(args, overrides) -> None:
  if args.topology:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the slice; run nothing on a TPU here
  import asvd  # noqa: PLC0415
  from asvd import aot  # noqa: PLC0415

  cfg = asvd.load_config(args.config, overrides)
  teacher = asvd.load_config(args.teacher_config) if args.teacher_config else None
  programs = tuple(p.strip() for p in args.programs.split(",") if p.strip())
  plans, hbm, mesh = aot.plan(cfg, topology=args.topology, programs=programs, teacher_cfg=teacher)
  hbm = hbm if args.hbm_gib is None else args.hbm_gib * 2**30
  fits = aot.report(plans, hbm, mesh, args.topology)
  if args.json:
    rec = {"config": args.config, "overrides": overrides, "topology": args.topology, "mesh": dict(mesh.shape), "hbm_bytes": hbm, "teacher_config": args.teacher_config}
    rec["programs"] = [{**p.__dict__, "total": p.total} for p in plans]
    with open(args.json, "w") as f:
      json.dump(rec, f, indent=2)
  if not fits:
    worst = max(plans, key=lambda p: (bool(p.refused), p.total))
    at_least = "at least " if worst.refused else ""
    there = f"the {hbm / 2**30:.0f} GiB there" if hbm else "what the device has"
    print(f"asvd aot: {worst.program} needs {at_least}{worst.total / 2**30:.2f} GiB per device, more than {there}; shard more (--config.mesh.fsdp=..., tensor=..., context=...), use a bigger slice, or smaller activations (train.batch_size, train.dmd.replay=True)", file=sys.stderr)
    sys.exit(1)
