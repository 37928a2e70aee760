"""The `asvd` command line: a thin layer over the library.

    asvd generate --config configs/tiny.py --init random --chunks 8 --out out/
    asvd generate --weights Wan2.1-T2V-1.3B --prompt "a cat surfing" --out out/
    asvd decode out/latents.npy --vae Wan2.1-T2V-1.3B --out out/      (or --preview, no VAE)
    asvd convert SRC DST [--dtype bf16] [--overwrite]
    asvd eval attention --config configs/tiny.py --init random --chunks 6 --out out/
    asvd train --config configs/tiny.py --workdir runs/tiny     (rerun the same command to resume)
    asvd aot --config configs/wan_t2v_1_3b.py --topology v5p:2x2x2   (per-device memory, no TPU needed)

Config overrides: `--config.rollout.anchor=sink` (any key of the config file).
Errors are one line naming the flag, key, file or value at fault (exit status 2); `--debug`
shows the traceback instead.
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
  from asvd.config import parse_dtype  # noqa: PLC0415

  dtype = None if args.dtype is None else parse_dtype(args.dtype, "--dtype")
  model = dit_port.convert(args.src, args.dst, dtype=dtype, variant=args.variant, overwrite=args.overwrite)
  print(f"wrote {args.dst} ({model.cfg.num_layers} layers, dim {model.cfg.dim}, {model.cfg.param_dtype})")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="asvd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
  sub = p.add_subparsers(dest="command", required=True)

  c = sub.add_parser("convert", help="convert a diffusers/Wan/Self-Forcing DiT checkpoint to asvd (Orbax)")
  c.add_argument("src")
  c.add_argument("dst", help="a new folder (or an asvd checkpoint, with --overwrite)")
  c.add_argument("--dtype", default=None, help="store parameters in this dtype: f32 (default), bf16, f16 (or float32, bfloat16, ...)")
  c.add_argument("--variant", default=None, choices=["generator", "generator_ema"], help="Self-Forcing: which weights (default generator_ema, else generator)")
  c.add_argument("--overwrite", action="store_true", help="replace DST if it is an asvd checkpoint (never anything else)")
  c.set_defaults(func=_cmd_convert)

  from asvd import cli_aot, cli_generate, cli_train  # noqa: PLC0415

  cli_generate.add_commands(sub)
  cli_train.add_commands(sub)
  cli_aot.add_commands(sub)
  return p


def run(argv=None) -> int:
  from asvd.errors import AsvdError  # noqa: PLC0415

  argv = sys.argv[1:] if argv is None else list(argv)
  rest, overrides = _split_overrides(argv)
  args = build_parser().parse_args(rest)
  try:
    args.func(args, overrides)
  except KeyboardInterrupt:
    if args.debug:
      raise
    print(f"asvd {args.command}: interrupted", file=sys.stderr)
    return 130
  except (AsvdError, ValueError, OSError) as e:
    if args.debug:
      raise
    msg = str(e) if isinstance(e, AsvdError) else f"{type(e).__name__}: {e}"
    print(f"asvd {args.command}: error: {msg}", file=sys.stderr)
    return 2
  return 0


def main() -> None:
  """Console entry point. After an error the process ends at once (`os._exit`) once output is
  flushed: background threads of libraries (Orbax/tensorstore after a failed restore) would
  otherwise print tracebacks while the interpreter shuts down, burying the one-line error."""
  import os  # noqa: PLC0415

  code = run()
  if code:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


if __name__ == "__main__":
  main()
