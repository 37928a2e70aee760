"""`asvd train`: the training stages from the command line (a thin layer over asvd.train)."""

from __future__ import annotations

import sys

from asvd.errors import UsageError


def add_commands(sub) -> None:
  t = sub.add_parser("train", help="train: teacher -> causal init -> Self-Forcing DMD with the adaptive state (resumable)")
  t.add_argument("--config", required=True, help="configs/X.py[:arg]; override keys with --config.train.dmd.steps=...")
  t.add_argument("--workdir", required=True, help="run folder: checkpoints, metrics.jsonl, final models; rerun to resume")
  t.add_argument("--no-progress", action="store_true", help="no progress bar")
  from asvd import distributed  # noqa: PLC0415

  distributed.add_flags(t)
  t.set_defaults(func=cmd_train)


def cmd_train(args, overrides) -> None:
  import asvd  # noqa: PLC0415
  from asvd import distributed  # noqa: PLC0415
  from asvd.cli_generate import _runtime, print_bf16_hint  # noqa: PLC0415
  from asvd.train import trainer  # noqa: PLC0415

  cfg = asvd.load_config(args.config, overrides)
  trainer.check_config(cfg)  # a bad config stops every process before any connects
  how = distributed.from_args(args)
  if how != "single process":
    import jax  # noqa: PLC0415

    print(f"[asvd] process {jax.process_index()} of {jax.process_count()} ({how}), {jax.device_count()} devices in all", file=sys.stderr)
  trainer.check_config(cfg)
  _runtime(cfg)
  print_bf16_hint(cfg)
  out = trainer.train(cfg, args.workdir, progress=not args.no_progress)
  if len(out) < len(cfg.train.stages) or None in out.values():
    print("stopped; run the same command to resume", file=sys.stderr)
    sys.exit(143)
  for stage, path in out.items():
    print(f"{stage}: {path}")
  if not out:
    raise UsageError("no stage ran")
