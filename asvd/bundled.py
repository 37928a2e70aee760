"""The bundled PanWorld models: what `asvd generate` and `asvd eval motion` run with no flag.

`asvd/assets/panworld/<mode>/` holds one asvd checkpoint per anchor mode (`adaptive`, `sink`,
`ema`, `none`), all trained by asvd's own stages from one teacher on PanWorld
(`configs/panworld.py`); `record.json` says how (the commands, steps, final losses, wall times
and the machine). `launch/panworld_bundle.py` re-runs the recorded commands.
"""

from __future__ import annotations

import json
import os

from asvd.errors import UsageError

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "panworld")
CONFIG = "configs/panworld.py"
MODES = ("adaptive", "sink", "ema", "none")
DEFAULT_PROMPT = "camera pans left quickly over a snowy forest, a red ball bounces"
HORIZON_MULTIPLE = 6  # the default video: 6x the training horizon


def model_path(mode: str = "adaptive", root: str | None = None) -> str:
  """The bundled checkpoint of `mode`; one clear error when it is not there."""
  if mode not in MODES:
    raise UsageError(f"no bundled model {mode!r}: choose one of {', '.join(MODES)}")
  path = os.path.join(root or ROOT, mode)
  if not os.path.isdir(path):
    raise UsageError(f"the bundled {mode} model is missing ({path}): reinstall asvd, or train it with `python launch/panworld_bundle.py`")
  return path


def record(root: str | None = None) -> dict:
  """How the bundled models were trained (`record.json`), or {} when there is none."""
  try:
    with open(os.path.join(root or ROOT, "record.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def config_for(mode: str, overrides=()):
  """The bundled config with `rollout.anchor = mode` (then `overrides`)."""
  from asvd.config import load_config  # noqa: PLC0415

  return load_config(CONFIG, [*overrides, f"--config.rollout.anchor={mode}"])
