"""Every anchor mode trains through `asvd train` with the same code (the adaptive state: the
default run in test_train.py)."""

import json
import subprocess

import pytest
from train_helpers import ENV, TRAIN, lines

import asvd

# Each anchor mode through one stage, and each anchor-dependent stage (and both causal-init
# methods) for some non-adaptive anchor; the teacher stage does not depend on the anchor.
RUNS = {
  "sink": "causal_init",  # ODE regression on the teacher's trajectories
  "ema": "causal_init",  # teacher forcing
  "none": "dmd",  # with LoRA adapters; the generator starts from scratch (no causal init here)
}


@pytest.mark.parametrize("anchor", list(RUNS))
def test_every_anchor_mode_trains_with_the_same_code(tmp_path, anchor):
  stages = (RUNS[anchor],)
  lora = ["--config.train.lora.rank=4"] if anchor == "none" else []
  # No teacher stage: DMD (and the ODE init) are told where the teacher is (an asvd checkpoint
  # of a random one).
  teacher = tmp_path / "teacher_ck"
  asvd.save_dit(asvd.init_dit(asvd.load_config("configs/tiny.py").model, 5), teacher)
  method = ["--config.train.causal_init.method=teacher_forcing"] if anchor == "ema" else []
  args = [*lora, *method, f"--config.train.stages={stages!r}", "--config.train.causal_init.steps=2", "--config.train.dmd.steps=2", f"--config.rollout.anchor={anchor}", f"--config.train.dmd.teacher={teacher}", "--config.train.optimizer.grad_accum=2"]
  p = subprocess.run([*TRAIN, "--workdir", str(tmp_path / "run"), *args, "--config.train.dmd.teacher_dtype=bfloat16"], capture_output=True, text=True, env=ENV)
  assert p.returncode == 0, p.stderr[-3000:]
  if stages == ("causal_init",):  # no teacher in this workdir: the student starts from the named one
    assert f"causal_init: starting from {teacher}" in p.stderr
  recs = [json.loads(x) for x in lines(tmp_path / "run")]
  assert [r["stage"] for r in recs] == [s for s in stages for _ in range(2)]
  meta = json.loads((tmp_path / "run" / stages[-1] / "model" / "asvd_dit.json").read_text())
  assert meta["model"]["lora_rank"] == 0  # LoRA runs export merged, plain models
  if lora:
    assert not any("lora" in k for k in recs[-1])
    assert any("generator_grad_norm/blocks" in r for r in recs)
