"""Helpers of the training tests (test_train.py, test_train_steps.py, test_train_anchors.py)."""

import sys

import jax
import jax.numpy as jnp
from cli_env import ENV  # noqa: F401  (the training tests import it from here)
from flax import nnx

import asvd
from asvd.train import steps as st
from asvd.train import trainer

TRAIN = [sys.executable, "-m", "asvd.main", "train", "--config", "configs/tiny.py", "--no-progress"]


def lines(path):
  """The lines of a workdir's metrics.jsonl."""
  return (path / "metrics.jsonl").read_text().splitlines()


def run_fixed_key(step, state, n, *args, name="loss"):
  """`n` steps with the same key (and the caller's same batch): only the parameters change.
  The caller's `state` stays usable when `step` donates its input (as the trainer's do)."""
  key, out = state.key, []
  state = jax.tree.map(jnp.copy, state)
  for _ in range(n):
    state, m = step(state.replace(key=jnp.copy(key)), *args)
    out.append(float(m[name]))
  return out


def assert_decreasing(vals):
  assert all(b < a for a, b in zip(vals, vals[1:], strict=False)), vals


def fresh(cfg, lr, seed=0):
  """`(graphdef, optimizer, TrainState)` of a new random tiny model."""
  model = asvd.init_dit(cfg.model, seed)
  g, p = nnx.split(model)
  tx = st.optimizer(lr, cfg.train.optimizer)
  return g, tx, st.TrainState(step=jnp.int32(0), params=p, opt_state=tx.init(p), key=jax.random.PRNGKey(seed))


def like_trainer(step, state, frozen):
  """`(jitted step, state, frozen)`: `step` jitted and its inputs placed as `asvd train` does
  (state donated, all on device 0), so that it is the same program as a run's: the session's
  compilation cache serves it once the default run (test_train.py) has compiled it."""
  state, frozen = jax.device_put((state, frozen), jax.devices()[0])
  return trainer._jit_step(step, None, None, state, frozen), state, frozen
