"""LoRA adapters on the DiT: identity at start, merge == adapters, only adapters train."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import asvd
from asvd.models.lora import add_lora, merge_lora, split_lora


def inputs():
  x = jax.random.normal(jax.random.key(0), (1, 3, 8, 8, 16))
  t = jnp.array([[900.0, 500.0, 100.0]])
  ctx = jax.random.normal(jax.random.key(1), (1, 16, 32))
  return x, t, ctx


def test_add_merge_and_split(model):
  x, t, ctx = inputs()
  base_out = np.asarray(model(x, t, ctx))
  lora = add_lora(model, rank=4, alpha=8.0, key=3)
  np.testing.assert_array_equal(np.asarray(lora(x, t, ctx)), base_out)  # B = 0: the base model
  graphdef, adapters, rest = split_lora(lora)
  names = {jax.tree_util.keystr(k).split("'")[-2] for k, _ in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(adapters))}
  assert names == {"lora_a", "lora_b"}
  n_dense = 2 * 4 + 2  # q, k, v, o of both attentions, and the two FFN layers, per block
  assert len(jax.tree.leaves(adapters)) == 2 * n_dense * (1 if model.cfg.scan_layers else model.cfg.num_layers)
  # Train-like change of the adapters: the merged plain model computes the same function.
  adapters = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(9), a.shape, a.dtype), adapters)
  tuned = nnx.merge(graphdef, adapters, rest)
  got = np.asarray(tuned(x, t, ctx))
  assert np.abs(got - base_out).max() > 1e-3
  merged = merge_lora(tuned)
  assert merged.cfg.lora_rank == 0
  np.testing.assert_allclose(np.asarray(merged(x, t, ctx)), got, rtol=1e-4, atol=1e-4)


def test_only_adapters_get_gradients(model, cfg):
  from asvd.train import steps as st  # noqa: PLC0415

  graphdef, adapters, rest = split_lora(add_lora(model, rank=2))
  tx = st.optimizer(1e-3, cfg.train.optimizer)
  state = st.TrainState(step=jnp.int32(0), params=adapters, opt_state=tx.init(adapters), key=jax.random.PRNGKey(0))
  batch = {"latents": jax.random.normal(jax.random.key(2), (2, 9, 8, 8, 16)), "text": jax.random.normal(jax.random.key(3), (2, 16, 32))}
  c = cfg.copy_and_resolve_references()
  c.train.horizon_frames = 6
  new, m = jax.jit(st.teacher_step(graphdef, tx, c))(state, batch, st.Frozen(generator=rest))
  assert np.isfinite(float(m["loss"]))
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), new.params, state.params)
  assert any(jax.tree.leaves(changed))  # the adapters moved; the frozen rest is not even in the state
  assert jax.tree.structure(new.params) == jax.tree.structure(adapters)
  _ = asvd
