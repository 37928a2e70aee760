"""Helpers of the training tests (test_train.py, test_train_steps.py, test_train_anchors.py)."""

import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

import asvd
from asvd.train import steps as st

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
TRAIN = [sys.executable, "-m", "asvd.main", "train", "--config", "configs/tiny.py", "--no-progress"]


def lines(path):
  """The lines of a workdir's metrics.jsonl."""
  return (path / "metrics.jsonl").read_text().splitlines()


def run_fixed_key(step, state, n, *args, name="loss"):
  """`n` steps with the same key (and the caller's same batch): only the parameters change."""
  key, out = state.key, []
  for _ in range(n):
    new, m = step(state.replace(key=key), *args)
    state = new.replace(key=key)
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
