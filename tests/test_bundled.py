"""The bundled PanWorld models (asvd/assets/panworld) as shipped: every anchor mode is there, an
asvd checkpoint of the bundled config's architecture within 20 MB, the modes are distinct models
from one teacher, and record.json says how they were trained, within the hour."""

import os
import shlex

import jax
import numpy as np
from flax import nnx

import asvd
from asvd import bundled
from asvd.ckpt import dit_port
from asvd.models.dit import DiTConfig


def test_the_bundle_is_complete_and_recorded():
  rec = bundled.record()
  commands = [shlex.split(c) for c in rec["commands"]]
  assert rec["config"] == bundled.CONFIG and set(rec["models"]) == set(bundled.MODES)
  cfg = bundled.config_for("adaptive")
  leaves = {}
  for mode in bundled.MODES:
    path = bundled.model_path(mode)
    assert dit_port.is_asvd_checkpoint(path)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    assert size <= 20 * 2**20, (mode, size)
    model = asvd.load_dit(path)
    assert model.cfg == DiTConfig.from_config(cfg.model), mode
    leaves[mode] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(nnx.state(model))])
    # Trained by the recorded commands: causal init then DMD in the mode's own workdir, with its anchor.
    stages = [a for c in commands if f"--config.rollout.anchor={mode}" in c for a in c if a.startswith("--config.train.stages=")]
    assert stages == ["--config.train.stages=('causal_init',)", "--config.train.stages=('dmd',)"], (mode, stages)
  assert sum("--config.train.stages=('teacher',)" in c for c in commands) == 1
  assert all(any(a.startswith("--config.train.dmd.teacher=") for a in c) for c in commands if any(a.startswith("--config.rollout.anchor=") for a in c))
  for a in bundled.MODES:  # four distinct models
    for b in bundled.MODES:
      if a < b:
        # ema and none differ the least: the ema anchor holds only frames evicted from the window,
        # so their causal inits (a context never evicted) train alike; only DMD's rollouts differ.
        assert np.abs(leaves[a] - leaves[b]).max() > (1e-5 if {a, b} == {"ema", "none"} else 1e-3), (a, b)
  assert {s["stage"] for s in rec["stages"]} == {"teacher", "causal_init", "dmd"} and rec["total_seconds"] <= 3600
