"""Train states and the jitted step of every stage (teacher, causal initialisation, DMD).

Each step is a pure function `(state, batch) -> (state, metrics)` jitted with the state donated.
Models are an NNX graph definition plus parameter pytrees (`nnx.split` once); the steps merge
them inside. Every stage goes through the inference code: the teacher and critic are plain
bidirectional `WanDiT` calls, teacher forcing writes its context with `transition.write_given`
and predicts with `transition.flow`, DMD rolls out with `asvd.train.rollout.training_rollout`.

Metrics hold the loss and, per top-level parameter subtree (`blocks`, `head`, `text_embedding_1`,
...), the gradient, parameter and update norms, so a NaN or an explosion names where it began.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from asvd import transition as tr
from asvd.train import losses
from asvd.train import rollout as trr
from asvd.train.rollout import merge


@struct.dataclass
class TrainState:
  """Everything a stage's step changes. `critic`, `critic_opt` and `ema` are None outside DMD."""

  step: jax.Array  # int32 []
  params: Any  # the network being trained (nnx.State)
  opt_state: Any
  key: jax.Array  # raw uint32 [2] PRNG key
  critic: Any = None
  critic_opt: Any = None
  ema: Any = None


@struct.dataclass
class Frozen:
  """What a step reads but never trains, passed as an argument (not baked into the program):
  the non-adapter weights of LoRA runs (`generator`, `critic`) and DMD's frozen `teacher`."""

  generator: Any = None
  critic: Any = None
  teacher: Any = None


def optimizer(lr: float, opt_cfg) -> optax.GradientTransformation:
  """AdamW with Self-Forcing's betas (0, 0.999) by default, grad-norm clipping and accumulation."""
  tx = optax.chain(
    optax.clip_by_global_norm(float(opt_cfg.clip_norm)),
    optax.adamw(float(lr), b1=float(opt_cfg.b1), b2=float(opt_cfg.b2), eps=float(opt_cfg.eps), weight_decay=float(opt_cfg.weight_decay)),
  )
  k = int(opt_cfg.grad_accum)
  return optax.MultiSteps(tx, every_k_schedule=k) if k > 1 else tx


def subtree_norms(tree, prefix: str) -> dict[str, jax.Array]:
  """`{f"{prefix}/{subtree}": global norm}` per top-level entry of an nnx.State / dict."""
  pure = nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
  return {f"{prefix}/{k}": optax.tree.norm(v) for k, v in pure.items()}


def _apply(tx, grads, opt_state, params, tag: str):
  updates, opt_state = tx.update(grads, opt_state, params)
  new = optax.apply_updates(params, updates)
  m = {**subtree_norms(grads, f"{tag}_grad_norm"), **subtree_norms(params, f"{tag}_param_norm"), **subtree_norms(updates, f"{tag}_update_norm")}
  return new, opt_state, m


def _flow_fn(graphdef, params, frozen=None):
  model = merge(graphdef, params, frozen)
  return lambda x, t, text: model(x, t, text)


# ------------------------------------------------------------------------------------------------
# Teacher: bidirectional flow matching on clips of H latent frames.
# ------------------------------------------------------------------------------------------------


def teacher_step(graphdef, tx, cfg):
  h, shift = int(cfg.train.horizon_frames), float(cfg.sampler.shift)

  def step(state: TrainState, batch, frozen: Frozen | None = None):
    frozen = frozen or Frozen()
    key, sub = jax.random.split(state.key)
    x0, text = batch["latents"][:, :h], batch["text"]

    def loss_fn(p):
      f = _flow_fn(graphdef, p, frozen.generator)
      return losses.flow_matching_loss(lambda xt, t: f(xt, t, text), x0, sub, shift)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    params, opt_state, m = _apply(tx, grads, state.opt_state, state.params, "model")
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, key=key), {"loss": loss, **m}

  return step


# ------------------------------------------------------------------------------------------------
# Causal initialisation: teacher forcing with the [anchor; window; chunk] geometry.
# ------------------------------------------------------------------------------------------------


def teacher_forcing_loss(model, lay: tr.Layout, latents, text_ctx, key, shift: float, first_chunk_prob: float):
  """Flow matching of one chunk (and the state) against a cache written from clean frames.

  From each clip `[B, T, ...]` a random offset `o` picks `Wp` context frames and the `F` frames
  after them. The context is written into an empty cache exactly as generated frames are
  (`transition.write_given`: in `adaptive` mode its last frame becomes the state, the
  `state_init_target="last_frame"` choice); the model then predicts the flow of the noised
  [state target; chunk] with `transition.flow`, the inference call. With probability
  `first_chunk_prob` a sample sees an empty cache instead (the first chunk of a video), whose
  state target is the chunk's first frame.
  """
  b, t_total = latents.shape[:2]
  f, wp, fs = lay.chunk_frames, lay.window_frames, lay.state_frames
  k_off, k_first, k_loss, k_ctx = jax.random.split(key, 4)
  o = jax.random.randint(k_off, (), 0, t_total - wp - f + 1)
  ctx_frames = jax.lax.dynamic_slice_in_dim(latents, o, wp, axis=1)
  chunk = jax.lax.dynamic_slice_in_dim(latents, o + wp, f, axis=1)
  text = model.text_kv(text_ctx)  # live: the text path learns
  fixed = tr.frozen(model)
  state, cache = tr.empty_carry(model, jax.lax.stop_gradient(text), lay)
  for start, g in tr.given_groups(wp, f):  # the context, chunk by chunk, as prefill writes it
    sub = dataclasses.replace(lay, chunk_frames=g)
    state, cache = tr.write_given(fixed, sub, state, cache, ctx_frames[:, start : start + g], jax.random.fold_in(k_ctx, start))
  cache = jax.lax.stop_gradient(cache)
  first = jax.random.bernoulli(k_first, first_chunk_prob, (b,))
  cache = cache.replace(valid=cache.valid & ~first[:, None])
  target = chunk
  if lay.anchor == "adaptive":
    state_target = jnp.where(first[:, None, None, None, None], chunk[:, :fs], ctx_frames[:, -fs:])
    target = jnp.concatenate([state_target, chunk], axis=1)

  def predict(xt, t):
    return tr.flow(model, lay, cache, xt, t, text)

  return losses.flow_matching_loss(predict, target, k_loss, shift)


def causal_init_step(graphdef, tx, cfg, lay: tr.Layout):
  shift = float(cfg.sampler.shift)
  p_first = float(cfg.train.causal_init.first_chunk_prob)

  def step(state: TrainState, batch, frozen: Frozen | None = None):
    frozen = frozen or Frozen()
    key, sub = jax.random.split(state.key)

    def loss_fn(p):
      return teacher_forcing_loss(merge(graphdef, p, frozen.generator), lay, batch["latents"], batch["text"], sub, shift, p_first)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    params, opt_state, m = _apply(tx, grads, state.opt_state, state.params, "model")
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, key=key), {"loss": loss, **m}

  return step


# ------------------------------------------------------------------------------------------------
# Self-Forcing DMD with the adaptive state.
# ------------------------------------------------------------------------------------------------


def dmd_windows(frames, states, lay: tr.Layout, horizon: int, state_dmd: bool):
  """The `H`-frame windows the teacher scores, `[W, B, H, ...]`, and their end frames.

  With `state_dmd`, a window that starts at a chunk boundary after the first chunk starts with
  the state that sat in the anchor when that chunk was made (the state produced with the chunk
  before), in place of its first frame.
  """
  total, f = frames.shape[1], lay.chunk_frames
  starts = losses.window_starts(total, horizon, f)
  h = min(horizon, total)
  out = []
  for s in starts:
    w = frames[:, s : s + h]
    if state_dmd and lay.anchor == "adaptive" and s >= f and s % f == 0:
      w = jnp.concatenate([states[:, s // f - 1, -1:], w[:, 1:]], axis=1)
    out.append(w)
  return jnp.stack(out), [s + h for s in starts]


def _x0(graphdef, params, x_t, sigma_b, text, frozen=None):
  b, f = x_t.shape[:2]
  v = merge(graphdef, params, frozen)(x_t, jnp.broadcast_to(1000.0 * sigma_b[:, None], (b, f)), text)
  return x_t - sigma_b.reshape(-1, 1, 1, 1, 1) * v


def dmd_window_loss(frames, states, score_graphdef, critic_params, frozen: Frozen, lay, text, key, dcfg, cfg, critic_graphdef=None):
  """The horizon-weighted DMD loss of a rollout's frames (and states): method.md, Training 3.

  `score_graphdef` is the teacher's graph; `critic_graphdef` the critic's (differs with LoRA).
  """
  critic_graphdef = score_graphdef if critic_graphdef is None else critic_graphdef
  k_sig, k_eps = jax.random.split(key)
  horizon = int(cfg.train.horizon_frames)
  wins, ends = dmd_windows(frames, states, lay, horizon, bool(cfg.train.state_dmd))
  weights = losses.horizon_weights(ends, horizon, float(cfg.train.horizon_alpha))
  uncond = jnp.zeros_like(text)  # the empty / negative prompt of the synthetic data
  total = 0.0
  for i in range(wins.shape[0]):
    x = wins[i]
    b = x.shape[0]
    sigma = losses.shifted_sigma(jax.random.fold_in(k_sig, i), (b,), float(cfg.sampler.shift), float(dcfg.min_sigma), float(dcfg.max_sigma))
    x_t = losses.noised(jax.lax.stop_gradient(x), jax.random.normal(jax.random.fold_in(k_eps, i), x.shape), sigma)
    fake = _x0(critic_graphdef, jax.lax.stop_gradient(critic_params), x_t, sigma, text, frozen.critic)
    cond = _x0(score_graphdef, frozen.teacher, x_t, sigma, text)
    unc = _x0(score_graphdef, frozen.teacher, x_t, sigma, uncond)
    real = cond + float(dcfg.cfg_scale) * (cond - unc)  # Self-Forcing's form: scale 3 == 4 in standard CFG
    g = losses.dmd_gradient(jax.lax.stop_gradient(x), jax.lax.stop_gradient(fake), jax.lax.stop_gradient(real))
    total = total + weights[i] * losses.dmd_loss(x, g)
  return total / wins.shape[0]


def dmd_steps(gen_graphdef, score_graphdef, gen_tx, critic_tx, cfg, lay: tr.Layout, critic_graphdef=None):
  """`(generator_step, critic_step)` of DMD, each `(state, batch, frozen) -> (state, metrics)`.

  `frozen.teacher` holds the teacher's parameters (graph `score_graphdef`); the critic has graph
  `critic_graphdef` (default the teacher's; LoRA adds adapters) and, with LoRA, its frozen rest
  in `frozen.critic`, as the generator's in `frozen.generator`.
  """
  dcfg = cfg.train.dmd
  critic_graphdef = score_graphdef if critic_graphdef is None else critic_graphdef

  def carry_fn(p, frozen, text_ctx):
    model = merge(gen_graphdef, jax.lax.stop_gradient(p), frozen.generator)
    return tr.empty_carry(model, model.text_kv(text_ctx), lay)

  def rollout_args(state, batch, frozen, key):
    k_exit, k_roll, k_loss = jax.random.split(key, 3)
    exit_step = trr.sample_exit_step(k_exit, len(lay.timesteps), bool(dcfg.last_step_only))
    carry = carry_fn(state.params, frozen, batch["text"])
    kw = dict(exit_step=exit_step, grad_from_chunk=int(dcfg.grad_from_chunk), frozen=frozen.generator)
    return carry, k_roll, k_loss, kw

  def generator_grads(state, batch, frozen, key):
    """`(loss, grads)`: directly (`jax.grad` through the remat'ed rollout) or, with
    `train.dmd.replay`, by replaying the chunks with the loss's cotangents (O(one chunk))."""
    carry, k_roll, k_loss, kw = rollout_args(state, batch, frozen, key)
    text = batch["text"]
    n = int(dcfg.rollout_chunks)

    def window_loss(frames, states):
      return dmd_window_loss(frames, states, score_graphdef, state.critic, frozen, lay, text, k_loss, dcfg, cfg, critic_graphdef)

    if not bool(dcfg.replay):

      def loss_fn(p):
        frames, states, _ = trr.training_rollout(p, gen_graphdef, lay, carry, text, k_roll, num_chunks=n, **kw)
        return window_loss(frames, states)

      return jax.value_and_grad(loss_fn)(state.params)
    frames, states, _ = trr.training_rollout(jax.lax.stop_gradient(state.params), gen_graphdef, lay, carry, text, k_roll, num_chunks=n, remat=False, **kw)
    loss, (cot_f, cot_s) = jax.value_and_grad(window_loss, argnums=(0, 1))(frames, states)
    grads, _ = trr.replay_grads(state.params, gen_graphdef, lay, carry, text, k_roll, cot_f, cot_s, **kw)
    return loss, grads

  def generator_step(state: TrainState, batch, frozen: Frozen):
    key, sub = jax.random.split(state.key)
    loss, grads = generator_grads(state, batch, frozen, sub)
    params, opt_state, m = _apply(gen_tx, grads, state.opt_state, state.params, "generator")
    start = int(dcfg.ema_start)
    decay = jnp.where(state.step >= start, float(dcfg.ema_decay), 0.0)  # EMA begins as a copy at ema_start
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
    # The iteration counter (`step`) is advanced by the critic step, which runs every iteration.
    return state.replace(params=params, opt_state=opt_state, ema=ema, key=key), {"loss": loss, "generator_loss": loss, **m}

  def critic_step(state: TrainState, batch, frozen: Frozen):
    """Flow matching of the critic on freshly generated (gradient-free) windows."""
    key, k_gen, k_exit, k_fm = jax.random.split(state.key, 4)
    text = batch["text"]
    exit_step = trr.sample_exit_step(k_exit, len(lay.timesteps), bool(dcfg.last_step_only))
    frames, states, _ = trr.training_rollout(
      jax.lax.stop_gradient(state.params), gen_graphdef, lay, carry_fn(state.params, frozen, text), text, k_gen,
      num_chunks=int(dcfg.rollout_chunks), exit_step=exit_step, remat=False, frozen=frozen.generator,
    )  # fmt: skip
    wins, _ = dmd_windows(jax.lax.stop_gradient(frames), jax.lax.stop_gradient(states), lay, int(cfg.train.horizon_frames), bool(cfg.train.state_dmd))

    def loss_fn(p):
      f = _flow_fn(critic_graphdef, p, frozen.critic)
      per = [losses.flow_matching_loss(lambda xt, t: f(xt, t, text), wins[i], jax.random.fold_in(k_fm, i), float(cfg.sampler.shift)) for i in range(wins.shape[0])]
      return sum(per) / len(per)

    loss, grads = jax.value_and_grad(loss_fn)(state.critic)
    critic, critic_opt, m = _apply(critic_tx, grads, state.critic_opt, state.critic, "critic")
    return state.replace(step=state.step + 1, critic=critic, critic_opt=critic_opt, key=key), {"critic_loss": loss, **m}

  generator_step.grads = generator_grads
  return generator_step, critic_step


__all__ = ["TrainState", "Frozen", "optimizer", "teacher_step", "causal_init_step", "dmd_steps", "teacher_forcing_loss", "dmd_windows", "dmd_window_loss", "subtree_norms"]
