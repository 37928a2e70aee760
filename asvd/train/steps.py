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
import numpy as np
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
  the non-adapter weights of LoRA runs (`generator`, `critic`), the frozen `teacher` (ODE init
  and DMD) and DMD's re-encoding `vae`."""

  generator: Any = None
  critic: Any = None
  teacher: Any = None
  vae: Any = None  # the Wan VAE that re-encodes mid-rollout windows' first latents (DMD)


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
  """Flow matching of the bidirectional teacher on `H`-frame clips. With probability
  `train.teacher.text_dropout` a sample's text is replaced by zeros (the unconditional text the
  CFG of the ODE initialisation and of DMD uses), so the teacher learns both predictions; with
  probability `train.teacher.frame_noise_prob` a sample's frames each get their own sigma."""
  h, shift = int(cfg.train.horizon_frames), float(cfg.sampler.shift)
  p_drop = float(cfg.train.teacher.get("text_dropout", 0.0))
  p_frame = float(cfg.train.teacher.get("frame_noise_prob", 0.0))

  def step(state: TrainState, batch, frozen: Frozen | None = None):
    frozen = frozen or Frozen()
    key, sub = jax.random.split(state.key)
    x0, text = batch["latents"][:, :h], batch["text"]
    if p_drop > 0:
      sub, k_drop = jax.random.split(sub)
      drop = jax.random.bernoulli(k_drop, p_drop, (text.shape[0],))
      text = jnp.where(drop[:, None, None], jnp.zeros_like(text), text)

    def loss_fn(p):
      f = _flow_fn(graphdef, p, frozen.generator)
      return losses.flow_matching_loss(lambda xt, t: f(xt, t, text), x0, sub, shift, p_frame)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    params, opt_state, m = _apply(tx, grads, state.opt_state, state.params, "model")
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, key=key), {"loss": loss, **m}

  return step


# ------------------------------------------------------------------------------------------------
# Causal initialisation with the [anchor; window; chunk] geometry: teacher forcing or ODE regression.
# ------------------------------------------------------------------------------------------------


def _context_cache(model, lay: tr.Layout, ctx_frames, text, key, first, clip_start=None):
  """The cache a chunk sees after the clean context `ctx_frames [B, Wp, ...]`, written into an
  empty cache exactly as generated frames are (`transition.write_given`, frozen weights, no
  gradient), and emptied for the samples where `first [B]` (the first chunk of a video).

  `clip_start [B, F, ...]`, the clip's first chunk, is written before the context when given:
  the `sink` then holds the clip's first frame and the `ema` anchor its evicted frames, a
  distant anchor as in a long rollout (the context moves on from it)."""
  fixed = tr.frozen(model)
  state, cache = tr.empty_carry(model, jax.lax.stop_gradient(text), lay)
  if clip_start is not None:
    state, cache = tr.write_given(fixed, lay, state, cache, clip_start, jax.random.fold_in(key, 2**31 - 1))
  for start, g in tr.given_groups(ctx_frames.shape[1], lay.chunk_frames):  # chunk by chunk, as prefill
    sub = dataclasses.replace(lay, chunk_frames=g)
    state, cache = tr.write_given(fixed, sub, state, cache, ctx_frames[:, start : start + g], jax.random.fold_in(key, start))
  cache = jax.lax.stop_gradient(cache)
  return cache.replace(valid=cache.valid & ~first[:, None])


def _chunk_in_context(model, lay: tr.Layout, clips, text_ctx, key, first_chunk_prob: float, state_target: str = "own_last_frame", anchor_from: str = "context"):
  """The geometry both causal-init losses train on, from clean clips `[B, T, ...]`.

  A random offset `o` picks `Wp` context frames and the `F` frames after them; the context is
  written into an empty cache exactly as generated frames are (`_context_cache`; in `adaptive`
  mode its last frame becomes the state). With probability `first_chunk_prob` a sample sees an
  empty cache instead (the first chunk of a video). Returns `(o, text, cache, target)`: the live
  text K/V (the text path learns), the cache, and the clean `[state target; chunk]` (the chunk
  alone outside `adaptive` mode), the state's target by `train.state_init_target`:
  "last_frame" (method.md), the context's last frame (the chunk's first for a first chunk);
  "own_last_frame", the chunk's own last frame, i.e. what the state slot holds in this stage's
  caches (`write_given` puts the last given frame there), so that the state a chunk emits is what
  the next chunk was trained to find in the slot. `anchor_from` (`train.causal_init.anchor_from`):
  "clip_start" writes the clip's first chunk before the context (`sink` / `ema`: the anchor is
  the clip's start, up to the clip's length away from the chunk), "context" does not (the
  anchor is the context's own first frame, next to the chunk).
  """
  b, t_total = clips.shape[:2]
  f, wp, fs = lay.chunk_frames, lay.window_frames, lay.state_frames
  k_off, k_first, k_ctx = jax.random.split(key, 3)
  o = jax.random.randint(k_off, (), 0, t_total - wp - f + 1)
  ctx_frames = jax.lax.dynamic_slice_in_dim(clips, o, wp, axis=1)
  chunk = jax.lax.dynamic_slice_in_dim(clips, o + wp, f, axis=1)
  text = model.text_kv(text_ctx)
  first = jax.random.bernoulli(k_first, first_chunk_prob, (b,))
  distant = anchor_from == "clip_start" and lay.anchor in ("sink", "ema")
  cache = _context_cache(model, lay, ctx_frames, text, k_ctx, first, clips[:, :f] if distant else None)
  if lay.anchor == "adaptive":
    if state_target == "own_last_frame":
      target = chunk[:, -fs:]
    else:
      target = jnp.where(first[:, None, None, None, None], chunk[:, :fs], ctx_frames[:, -fs:])
    chunk = jnp.concatenate([target, chunk], axis=1)
  return o, text, cache, chunk


def teacher_forcing_loss(model, lay: tr.Layout, latents, text_ctx, key, shift: float, first_chunk_prob: float, state_target: str = "own_last_frame", anchor_from: str = "context"):
  """Flow matching of one chunk (and the state) against a cache written from clean data frames
  (`_chunk_in_context`); the model predicts the flow of the noised [state target; chunk] with
  `transition.flow`, the inference call."""
  k_geom, k_loss = jax.random.split(key)
  _, text, cache, target = _chunk_in_context(model, lay, latents, text_ctx, k_geom, first_chunk_prob, state_target, anchor_from)

  def predict(xt, t):
    return tr.flow(model, lay, cache, xt, t, text)

  return losses.flow_matching_loss(predict, target, k_loss, shift)


# ODE regression (CausVid / Self-Forcing `ode_init`): the frozen bidirectional teacher samples a
# clip of `H` latent frames by its probability-flow ODE (Euler, many steps, CFG) and records it at
# the student's few denoising sigmas; the causal student learns to map each recorded point of a
# chunk straight to the teacher's clean result, with the teacher's clean frames as its context.


def ode_grid(lay: tr.Layout, steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
  """`(sigmas [N + 1], record [K])`: the teacher's Euler grid from 1 to 0 (`steps` shifted-uniform
  steps, with the student's `K` sigmas inserted) and the grid index of each student sigma."""
  u = np.linspace(1.0, 0.0, int(steps) + 1)
  grid = shift * u / (1.0 + (shift - 1.0) * u)
  grid = np.unique(np.concatenate([grid, np.asarray(lay.sigmas, np.float64)]))[::-1]
  record = np.asarray([int(np.argmin(np.abs(grid - s))) for s in lay.sigmas])
  return grid, record


def teacher_trajectory(teacher, lay: tr.Layout, text_ctx, key, frames: int, steps: int, shift: float, cfg_scale: float):
  """The teacher's ODE sample of `frames` latent frames from fresh noise, recorded at the
  student's sigmas: `[B, K + 1, frames, H, W, C]` (index `K` is the clean result). CFG in
  Self-Forcing's form `cond + s (cond - uncond)`, the unconditional text all zeros."""
  b, c = text_ctx.shape[0], teacher.cfg.out_channels
  grid, record = ode_grid(lay, steps, shift)
  text = teacher.text_kv(text_ctx)
  uncond = teacher.text_kv(jnp.zeros_like(text_ctx))
  x = jax.random.normal(key, (b, frames, *lay.latent_hw, c), jnp.float32)

  def euler(x, sig):
    s, s_next = sig[0], sig[1]
    t = jnp.full((b, frames), 1000.0 * s, jnp.float32)
    cond = teacher(x, t, text).astype(jnp.float32)
    v = cond + cfg_scale * (cond - teacher(x, t, uncond).astype(jnp.float32))
    return x + (s_next - s) * v, x

  sig = jnp.asarray(np.stack([grid[:-1], grid[1:]], axis=1), jnp.float32)
  x0, xs = jax.lax.scan(euler, x, sig)  # xs[i]: the sample at grid[i]
  path = jnp.concatenate([xs[record], x0[None]], axis=0)  # [K + 1, B, frames, ...]
  return jax.lax.stop_gradient(jnp.moveaxis(path, 0, 1))


def ode_regression_loss(model, lay: tr.Layout, path, text_ctx, key, first_chunk_prob: float, state_target: str = "own_last_frame", anchor_from: str = "context"):
  """Mean squared error of the student's `x0` from a recorded point of the teacher's ODE.

  `path [B, K + 1, T, ...]` is `teacher_trajectory`. A random offset picks `Wp` context frames of
  the clean result (written as `teacher_forcing_loss` writes them) and the chunk after them; a
  random step `k` per sample gives the chunk's input (its point at sigma `k`) and timestep. The
  target is the chunk's clean result; in `adaptive` mode the state (target as in teacher forcing)
  joins at the same sigma, noised with fresh noise, since the teacher has no state.
  """
  b, f, fz = path.shape[0], lay.chunk_frames, lay.z_frames
  k_geom, k_step, k_eps = jax.random.split(key, 3)
  o, text, cache, target = _chunk_in_context(model, lay, path[:, -1], text_ctx, k_geom, first_chunk_prob, state_target, anchor_from)
  k = jax.random.randint(k_step, (b,), 0, len(lay.sigmas))
  sigma = jnp.asarray(lay.sigmas, jnp.float32)[k]
  x_t = jax.lax.dynamic_slice_in_dim(path[jnp.arange(b), k], o + lay.window_frames, f, axis=1)  # [B, F, ...]
  if fz > f:  # adaptive: the state joins at the same sigma, noised with fresh noise
    st = target[:, : fz - f]
    x_t = jnp.concatenate([losses.noised(st, jax.random.normal(k_eps, st.shape), sigma), x_t], axis=1)
  t_bf = jnp.broadcast_to(jnp.asarray(lay.timesteps, jnp.float32)[k][:, None], x_t.shape[:2])
  v = tr.flow(model, lay, cache, x_t, t_bf, text).astype(jnp.float32)
  x0 = x_t - sigma.reshape(-1, 1, 1, 1, 1) * v
  return jnp.mean(jnp.square(x0 - target))


def causal_init_step(graphdef, tx, cfg, lay: tr.Layout, teacher_graphdef=None):
  """Causal initialisation by `train.causal_init.method`: "teacher_forcing" (flow matching on
  data clips) or "ode" (regression on trajectories the frozen teacher, `frozen.teacher` with
  graph `teacher_graphdef`, samples inside the step from the batch's prompts, or the batch's
  `ode_path` drawn from a bank of them, `asvd.train.ode_bank`)."""
  c = cfg.train.causal_init
  shift, p_first, method = float(cfg.sampler.shift), float(c.first_chunk_prob), str(c.method)
  h, st_target = int(cfg.train.horizon_frames), str(cfg.train.state_init_target)
  anchor_from = str(c.get("anchor_from", "context"))

  def step(state: TrainState, batch, frozen: Frozen | None = None):
    frozen = frozen or Frozen()
    key, sub, k_ode = jax.random.split(state.key, 3)
    if method == "ode" and "ode_path" in batch:  # a batch of the bank (asvd.train.ode_bank)
      path = batch["ode_path"]
    elif method == "ode":
      teacher = nnx.merge(teacher_graphdef, frozen.teacher)
      path = teacher_trajectory(teacher, lay, batch["text"], k_ode, h, int(c.ode_steps), shift, float(c.ode_cfg_scale))

    def loss_fn(p):
      model = merge(graphdef, p, frozen.generator)
      if method == "ode":
        return ode_regression_loss(model, lay, path, batch["text"], sub, p_first, st_target, anchor_from)
      return teacher_forcing_loss(model, lay, batch["latents"], batch["text"], sub, shift, p_first, st_target, anchor_from)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    params, opt_state, m = _apply(tx, grads, state.opt_state, state.params, "model")
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, key=key), {"loss": loss, **m}

  return step


# ------------------------------------------------------------------------------------------------
# Self-Forcing DMD with the adaptive state.
# ------------------------------------------------------------------------------------------------


def reencode_first(vae, frames, starts) -> jax.Array:
  """Image latents for windows starting mid-rollout (method.md, Training 4): the rollout's
  latents up to each start `s` decoded by the causal Wan VAE (one pass: pixel frames never
  depend on later latents), the last pixel frame of latent `s` encoded as a one-frame image
  latent. Returns `[B, len(starts), h, w, C]`, without gradient (as Self-Forcing and LongLive)."""
  frames = jax.lax.stop_gradient(frames)
  px = vae.decode_fn(frames[:, : max(starts) + 1])  # [B, 1 + 4 max(starts), H, W, 3]
  imgs = jnp.stack([px[:, vae.num_pixel_frames(s + 1) - 1] for s in starts], axis=1)
  b, n = imgs.shape[:2]
  z = vae.encode_fn(imgs.reshape(b * n, 1, *imgs.shape[2:]))  # [B n, 1, h, w, C]
  return jax.lax.stop_gradient(z.reshape(b, n, *z.shape[2:]).astype(frames.dtype))


def dmd_windows(frames, states, lay: tr.Layout, horizon: int, state_dmd: bool, vae=None):
  """The `H`-frame windows the teacher scores, `[W, B, H, ...]`, and their end frames.

  With `state_dmd`, a window that starts at a chunk boundary after the first chunk starts with
  the state that sat in the anchor when that chunk was made (the state produced with the chunk
  before), in place of its first frame. With a `vae` (a Wan teacher, whose first latent encodes
  one pixel frame), every other window starting mid-rollout has its first latent re-encoded as
  an image latent (`reencode_first`).
  """
  total, f = frames.shape[1], lay.chunk_frames
  starts = losses.window_starts(total, horizon, f)
  h = min(horizon, total)
  use_state = [state_dmd and lay.anchor == "adaptive" and s >= f and s % f == 0 for s in starts]
  redo = [s for s, u in zip(starts, use_state, strict=True) if s > 0 and not u] if vae is not None else []
  firsts = reencode_first(vae, frames, redo) if redo else None
  out = []
  for s, u in zip(starts, use_state, strict=True):
    w = frames[:, s : s + h]
    if u:
      w = jnp.concatenate([states[:, s // f - 1, -1:], w[:, 1:]], axis=1)
    elif s in redo:
      w = jnp.concatenate([firsts[:, redo.index(s)][:, None], w[:, 1:]], axis=1)
    out.append(w)
  return jnp.stack(out), [s + h for s in starts]


def _x0(graphdef, params, x_t, sigma_b, text, frozen=None):
  b, f = x_t.shape[:2]
  v = merge(graphdef, params, frozen)(x_t, jnp.broadcast_to(1000.0 * sigma_b[:, None], (b, f)), text)
  return x_t - sigma_b.reshape(-1, 1, 1, 1, 1) * v


def dmd_window_loss(frames, states, score_graphdef, critic_params, frozen: Frozen, lay, text, key, dcfg, cfg, critic_graphdef=None, vae=None):
  """The horizon-weighted DMD loss of a rollout's frames (and states): method.md, Training 3.

  `score_graphdef` is the teacher's graph; `critic_graphdef` the critic's (differs with LoRA);
  `vae` re-encodes the first latent of windows starting mid-rollout (`dmd_windows`).
  """
  critic_graphdef = score_graphdef if critic_graphdef is None else critic_graphdef
  k_sig, k_eps = jax.random.split(key)
  horizon = int(cfg.train.horizon_frames)
  wins, ends = dmd_windows(frames, states, lay, horizon, bool(cfg.train.state_dmd), vae)
  weights = losses.horizon_weights(ends, horizon, float(cfg.train.horizon_alpha))
  uncond = jnp.zeros_like(text)  # the empty / negative prompt of the synthetic data

  def window(total, xs):  # a scan over windows: the program does not grow with their number
    x, weight, i = xs
    b = x.shape[0]
    sigma = losses.shifted_sigma(jax.random.fold_in(k_sig, i), (b,), float(cfg.sampler.shift), float(dcfg.min_sigma), float(dcfg.max_sigma))
    x_t = losses.noised(jax.lax.stop_gradient(x), jax.random.normal(jax.random.fold_in(k_eps, i), x.shape), sigma)
    fake = _x0(critic_graphdef, jax.lax.stop_gradient(critic_params), x_t, sigma, text, frozen.critic)
    cond = _x0(score_graphdef, frozen.teacher, x_t, sigma, text)
    unc = _x0(score_graphdef, frozen.teacher, x_t, sigma, uncond)
    real = cond + float(dcfg.cfg_scale) * (cond - unc)  # Self-Forcing's form: scale 3 == 4 in standard CFG
    g = losses.dmd_gradient(jax.lax.stop_gradient(x), jax.lax.stop_gradient(fake), jax.lax.stop_gradient(real))
    return total + weight * losses.dmd_loss(x, g).astype(jnp.float32), None

  n = wins.shape[0]
  total, _ = jax.lax.scan(window, jnp.zeros((), jnp.float32), (wins, weights, jnp.arange(n)))
  return total / n


def dmd_steps(gen_graphdef, score_graphdef, gen_tx, critic_tx, cfg, lay: tr.Layout, critic_graphdef=None, vae_graphdef=None):
  """`(generator_step, critic_step)` of DMD, each `(state, batch, frozen) -> (state, metrics)`.

  `frozen.teacher` holds the teacher's parameters (graph `score_graphdef`); the critic has graph
  `critic_graphdef` (default the teacher's; LoRA adds adapters) and, with LoRA, its frozen rest
  in `frozen.critic`, as the generator's in `frozen.generator`. With `vae_graphdef`,
  `frozen.vae` is the Wan VAE that re-encodes mid-rollout windows' first latents.
  """
  dcfg = cfg.train.dmd
  critic_graphdef = score_graphdef if critic_graphdef is None else critic_graphdef

  def vae_of(frozen):
    return None if vae_graphdef is None else nnx.merge(vae_graphdef, frozen.vae)

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
      return dmd_window_loss(frames, states, score_graphdef, state.critic, frozen, lay, text, k_loss, dcfg, cfg, critic_graphdef, vae_of(frozen))

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
    wins, _ = dmd_windows(jax.lax.stop_gradient(frames), jax.lax.stop_gradient(states), lay, int(cfg.train.horizon_frames), bool(cfg.train.state_dmd), vae_of(frozen))

    def loss_fn(p):
      f = _flow_fn(critic_graphdef, p, frozen.critic)

      def window(total, xs):  # a scan over windows, as in `dmd_window_loss`
        x, i = xs
        return total + losses.flow_matching_loss(lambda xt, t: f(xt, t, text), x, jax.random.fold_in(k_fm, i), float(cfg.sampler.shift)), None

      n = wins.shape[0]
      total, _ = jax.lax.scan(window, jnp.zeros((), jnp.float32), (wins, jnp.arange(n)))
      return total / n

    loss, grads = jax.value_and_grad(loss_fn)(state.critic)
    critic, critic_opt, m = _apply(critic_tx, grads, state.critic_opt, state.critic, "critic")
    return state.replace(step=state.step + 1, critic=critic, critic_opt=critic_opt, key=key), {"critic_loss": loss, **m}

  generator_step.grads = generator_grads
  return generator_step, critic_step


__all__ = ["TrainState", "Frozen", "optimizer", "teacher_step", "causal_init_step", "dmd_steps", "teacher_forcing_loss", "ode_grid", "teacher_trajectory", "ode_regression_loss", "reencode_first", "dmd_windows", "dmd_window_loss", "subtree_norms"]
