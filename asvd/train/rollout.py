"""Training rollouts through the inference transition (Self-Forcing's stochastic truncation).

The trainer never re-implements the transition: every chunk here is `transition.transition_fn`
with an `exit_step`, so training and inference run the same functions.

* `training_rollout`: a `lax.scan` over chunks of the transition with one live forward per chunk
  (at the rollout's shared exit step) and per-chunk rematerialisation that keeps only the live
  forward's input (`"exit_input"`) and the carry, so the backward pass holds about one cache per
  chunk. Text K/V are computed from the live parameters inside, so the text embedding and the
  cross-attention get gradient. Chunks before `grad_from_chunk` carry none.
* `replay_grads`: the same gradient for rollouts of any length in O(one chunk) memory. No
  gradient crosses the cache, so the gradient of a loss of the frames is a sum of per-chunk
  vector-Jacobian products; given the loss's cotangents on the frames (and states), the chunks
  are re-run in order, carrying the cache, and each chunk's VJP is accumulated.
* `sample_exit_step`: one exit step per rollout (uniform over the steps, or the last one with
  `last_step_only`), shared by every chunk as Self-Forcing does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from asvd import transition as tr
from asvd.streaming import chunk_noise


def sample_exit_step(key: jax.Array, steps: int, last_step_only: bool = False) -> jax.Array:
  """int32 exit step in `[0, steps)` (or `steps - 1`), drawn once per rollout."""
  if last_step_only:
    return jnp.int32(steps - 1)
  return jax.random.randint(key, (), 0, steps, jnp.int32)


def merge(graphdef, params, frozen=None):
  """The model from its trainable `params` and, for LoRA runs, the `frozen` rest."""
  return nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)


def _chunk(graphdef, lay, shape, key, exit_step, grad_from_chunk, frozen=None):
  """One training chunk: `(params, text, carry, c) -> (carry, (frames, state))`."""

  def run(params, text, carry, c):
    state, cache = carry
    model = merge(graphdef, params, frozen)
    noise = chunk_noise(key, c, shape)
    new_state, cache, frames = tr.transition_fn(model, lay, state, cache, noise, exit_step=exit_step, text=text)
    live = c >= grad_from_chunk
    frames = jnp.where(live, frames, jax.lax.stop_gradient(frames))
    new_state = jnp.where(live, new_state, jax.lax.stop_gradient(new_state))
    return (jax.lax.stop_gradient(new_state), cache), (frames, new_state)

  return run


def training_rollout(
  params,
  graphdef,
  lay: tr.Layout,
  carry,
  context,
  key: jax.Array,
  *,
  num_chunks: int,
  exit_step,
  grad_from_chunk=0,
  start_chunk: int = 0,
  remat: bool = True,
  frozen=None,
):
  """Rolls the generator out with gradient through one forward per chunk.

  Args:
    params: the generator's parameters (`nnx.split(model)[1]`), the differentiated argument.
    graphdef: its graph definition.
    lay: the layout (`transition.make_layout`).
    carry: `(state, cache)` to start from (`transition.initial_carry`); carries no gradient.
    context: text embeddings `[B, L, text_dim]`.
    key: noise key; chunk `c` uses `fold_in(key, c)` as at inference.
    num_chunks: chunks to generate (static).
    exit_step: int32 exit step shared by every chunk (`sample_exit_step`), may be traced.
    grad_from_chunk: chunks with index below this carry no gradient (may be traced).
    start_chunk: index of the first chunk (noise keys continue from there).
    remat: rematerialise each chunk in the backward pass (keep only `exit_input` and the carry).
    frozen: the non-trainable rest of the model (LoRA: `split_lora`), closed over, no gradient.

  Returns:
    `(frames [B, num_chunks*F, H, W, C], states [B, num_chunks, Fs, H, W, C], final carry)`.
  """
  b = carry[1].valid.shape[0]
  shape = tr.noise_shape(lay, b, carry[1].lat.shape[-1])
  text = merge(graphdef, params, frozen).text_kv(jnp.asarray(context))  # live: the text path learns
  step = _chunk(graphdef, lay, shape, key, exit_step, grad_from_chunk, frozen)
  if remat:
    step = jax.checkpoint(step, policy=jax.checkpoint_policies.save_only_these_names("exit_input"))

  def body(carry, c):
    return step(params, text, carry, c)

  carry, (frames, states) = jax.lax.scan(body, carry, start_chunk + jnp.arange(num_chunks))
  return _join(frames), jnp.moveaxis(states, 0, 1), carry


def _join(frames_cbf):
  """`[chunks, B, F, ...]` -> `[B, chunks*F, ...]`."""
  fr = jnp.moveaxis(frames_cbf, 0, 1)
  return fr.reshape(fr.shape[0], -1, *fr.shape[3:])


def replay_grads(
  params,
  graphdef,
  lay: tr.Layout,
  carry,
  context,
  key: jax.Array,
  frames_cot,
  states_cot=None,
  *,
  exit_step,
  grad_from_chunk=0,
  start_chunk: int = 0,
  frozen=None,
):
  """Gradient of a loss of a rollout's frames, chunk by chunk, in O(one chunk) memory.

  Equals `jax.grad` of `loss(training_rollout(params, ...))` when `frames_cot` (and
  `states_cot`) are the loss's cotangents on the frames `[B, n*F, ...]` (and states
  `[B, n, Fs, ...]`) of the same rollout.

  Returns:
    `(grads like params, final carry)`.
  """
  f = lay.chunk_frames
  b, total = frames_cot.shape[:2]
  n = total // f
  shape = tr.noise_shape(lay, b, carry[1].lat.shape[-1])
  text, text_vjp = jax.vjp(lambda p: merge(graphdef, p, frozen).text_kv(jnp.asarray(context)), params)
  step = _chunk(graphdef, lay, shape, key, exit_step, grad_from_chunk, frozen)
  cot_f = jnp.moveaxis(frames_cot.reshape(b, n, f, *frames_cot.shape[2:]), 1, 0)  # [n, B, F, ...]
  if states_cot is None:
    states_cot = jnp.zeros((b, n, lay.state_frames, *frames_cot.shape[2:]), frames_cot.dtype)
  cot_s = jnp.moveaxis(states_cot, 1, 0)  # [n, B, Fs, ...]
  zeros = jax.tree.map(jnp.zeros_like, (params, text))

  def body(acc, xs):
    carry, (g_params, g_text) = acc
    c, cf, cs = xs
    (new_carry, out), vjp = _vjp_with_carry(step, params, text, carry, c)
    gp, gt = vjp((cf, cs))
    return (new_carry, jax.tree.map(jnp.add, (g_params, g_text), (gp, gt))), None

  (carry, (g_params, g_text)), _ = jax.lax.scan(body, (carry, zeros), (start_chunk + jnp.arange(n), cot_f, cot_s))
  (g_from_text,) = text_vjp(g_text)
  return jax.tree.map(jnp.add, g_params, g_from_text), carry


def _vjp_with_carry(step, params, text, carry, c):
  """`((new carry, outputs), vjp of outputs w.r.t. (params, text))` for one chunk."""

  def outputs(p, t):
    new_carry, out = step(p, t, carry, c)
    return out, new_carry

  out, vjp, new_carry = jax.vjp(outputs, params, text, has_aux=True)
  return (new_carry, out), vjp


__all__ = ["training_rollout", "replay_grads", "sample_exit_step", "merge"]
