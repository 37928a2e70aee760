"""The `asvd` command line: a thin layer over the library.

    asvd generate --config configs/tiny.py --init random --chunks 8 --out out/
    asvd convert SRC DST [--dtype bfloat16]
    asvd eval attention --config configs/tiny.py --init random --chunks 6 --out out/

Config overrides: `--config.rollout.anchor=sink` (any key of the config file).
"""

from __future__ import annotations

import argparse
import sys


def _split_overrides(argv):
  rest, overrides = [], []
  for a in argv:
    (overrides if a.startswith("--config.") else rest).append(a)
  return rest, overrides


def _cmd_convert(args, _overrides):
  from asvd.ckpt import dit_port  # noqa: PLC0415

  model = dit_port.convert(args.src, args.dst, dtype=args.dtype, variant=args.variant)
  print(f"wrote {args.dst} ({model.cfg.num_layers} layers, dim {model.cfg.dim}, {model.cfg.param_dtype})")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="asvd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)

  c = sub.add_parser("convert", help="convert a diffusers/Wan/Self-Forcing DiT checkpoint to asvd (Orbax)")
  c.add_argument("src")
  c.add_argument("dst")
  c.add_argument("--dtype", default=None, help="store parameters in this dtype (default float32)")
  c.add_argument("--variant", default=None, help="Self-Forcing: generator or generator_ema")
  c.set_defaults(func=_cmd_convert)

  try:
    from asvd import cli_generate  # noqa: PLC0415

    cli_generate.add_commands(sub)
  except ImportError as e:  # pragma: no cover - only while the module is missing
    if "cli_generate" not in str(e):
      raise
  return p


def run(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  rest, overrides = _split_overrides(argv)
  args = build_parser().parse_args(rest)
  try:
    args.func(args, overrides)
  except (ValueError, FileNotFoundError) as e:
    print(f"asvd {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(run())
