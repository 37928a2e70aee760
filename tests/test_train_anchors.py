"""Every anchor mode trains through `asvd train` with the same code (the adaptive state: the
default run in test_train.py)."""

import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
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


def test_ode_bank_is_sampled_once_and_shared_by_the_anchor_modes(tmp_path):
  """`train.causal_init.ode_bank`: the first run samples the teacher's trajectories into the file,
  a run of another anchor mode reads the same file (untouched); what it holds is the teacher's
  ODE of the recorded prompts; a bank of another setting is refused by name."""
  from flax import nnx

  from asvd.train import ode_bank, trainer
  from asvd.train import steps as st

  teacher, bank = tmp_path / "teacher_ck", tmp_path / "bank.npz"
  model = asvd.init_dit(asvd.load_config("configs/tiny.py").model, 5)
  asvd.save_dit(model, teacher)
  args = ["--config.train.stages=('causal_init',)", "--config.train.causal_init.steps=2", f"--config.train.dmd.teacher={teacher}", f"--config.train.causal_init.ode_bank={bank}", "--config.train.causal_init.ode_bank_size=5"]
  p = subprocess.run([*TRAIN, "--workdir", str(tmp_path / "a"), *args], capture_output=True, text=True, env=ENV)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "sampling 5 teacher trajectories" in p.stderr
  stamp = bank.stat().st_mtime_ns
  p = subprocess.run([*TRAIN, "--workdir", str(tmp_path / "b"), *args, "--config.rollout.anchor=sink"], capture_output=True, text=True, env=ENV)
  assert p.returncode == 0, p.stderr[-3000:]
  assert f"5 teacher trajectories from {bank}" in p.stderr and "sampling" not in p.stderr
  assert bank.stat().st_mtime_ns == stamp and len(lines(tmp_path / "b")) == 2

  cfg = asvd.load_config("configs/tiny.py", args[1:])
  lay = trainer.layout(cfg)
  with np.load(bank) as z:
    path, text, meta = z["path"], z["text"], json.loads(str(z["meta"]))
  assert path.shape == (5, len(lay.sigmas) + 1, cfg.train.horizon_frames, *lay.latent_hw, cfg.model.out_channels)
  # The first batch (train.batch_size prompts) is the teacher's ODE from the documented key.
  b = cfg.train.batch_size
  want = st.teacher_trajectory(model, lay, jnp.asarray(text[:b]), jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed + 17), 0), cfg.train.horizon_frames, 8, cfg.sampler.shift, 3.0)
  np.testing.assert_allclose(path[:b], np.asarray(want), atol=1e-4)
  assert float(np.abs(path[:, -1] - path[:, 0]).mean()) > 0.1  # clean results, not the noise

  # The step regresses on the bank's trajectories: no teacher is needed (none is given here),
  # and other trajectories give another loss.
  g, params = nnx.split(model)
  tx = st.optimizer(1e-3, cfg.train.optimizer)
  state = st.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), key=jax.random.PRNGKey(0))
  step = jax.jit(st.causal_init_step(g, tx, cfg, lay, None))
  losses = [float(step(state, {"text": jnp.asarray(text[:b]), "ode_path": jnp.asarray(x[:b])})[1]["loss"]) for x in (path, path[::-1])]
  assert np.isfinite(losses).all() and abs(losses[0] - losses[1]) > 1e-3 * losses[0], losses

  ok = ode_bank.meta_for(cfg, lay, params, str(teacher))
  assert ode_bank.load_or_sample(str(bank), ok, None, None, None, progress=False).path.shape == path.shape
  for key, over in (("ode_cfg_scale", "train.causal_init.ode_cfg_scale=2.0"), ("size", "train.causal_init.ode_bank_size=6"), ("teacher_weights", None)):
    other = asvd.load_config("configs/tiny.py", [*args[1:], f"--config.{over}"] if over else args[1:])
    params2 = jax.tree.map(lambda x: x * 1.01, params) if over is None else params
    with pytest.raises(asvd.UsageError, match=f"sampled with {key}="):
      ode_bank.load_or_sample(str(bank), ode_bank.meta_for(other, lay, params2, str(teacher)), None, None, None, progress=False)
  assert bank.stat().st_mtime_ns == stamp and meta["size"] == 5


def test_ode_bank_batches_depend_on_the_step_alone():
  """A resumed run draws what an uninterrupted one does; processes' shares make the global batch."""
  from asvd.train.ode_bank import OdeBank

  n = 20
  bank = OdeBank(np.arange(n, dtype=np.float32).reshape(n, 1), np.arange(n, dtype=np.float32).reshape(n, 1) + 100, {})
  one = bank.batch(7, 8, 3)
  assert np.array_equal(one["ode_path"], bank.batch(7, 8, 3)["ode_path"]) and len(set(one["ode_path"][:, 0])) == 8
  assert np.array_equal(one["text"] - 100, one["ode_path"])  # prompts stay with their trajectories
  assert not np.array_equal(one["ode_path"], bank.batch(8, 8, 3)["ode_path"])
  shares = [bank.batch(7, 8, 3, i, 2)["ode_path"] for i in range(2)]
  assert sorted(np.concatenate(shares)[:, 0]) == sorted(one["ode_path"][:, 0])
