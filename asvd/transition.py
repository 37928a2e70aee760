"""The adaptive-state transition: `(state, cache, noise) -> (state, cache, frames)`.

This is the whole method in one pure function (see `docs` in method.md, "The transition"):

1. `z = noise[0]`: in `adaptive` mode `Fs` state frames followed by `F` chunk frames; in the other
   modes only the `F` chunk frames.
2. Few-step sampling (Self-Forcing): at each step predict the flow with queries = `z`'s tokens and
   keys = the valid cache slots + `z`'s own tokens (bidirectional inside the block); `x0 = z -
   sigma_i v`; unless last, re-noise with fresh noise: `z = (1 - sigma_{i+1}) x0 + sigma_{i+1}
   noise[i+1]`.
3. Split `x0` into the new state `s'` and the content `x`.
4. A clean re-run on `[s'; x]` at the context timestep writes the cache (no gradient):
   `adaptive` overwrites the anchor slots with `s'`'s K/V; every mode shifts `x`'s K/V into the
   window, evicting the oldest frames; `sink` fills the anchor once with the first generated
   frames; `ema` folds evicted frames into the anchor; `none` leaves the anchor masked.
5. Emit `x` (the state is never part of the output).

Relative time: temporal RoPE indices are fixed per slot (anchor `0..Fs-1`, window
`Fs..Fs+Wp-1`, chunk `Fs+Wp..Fs+Wp+F-1`; the new state takes the anchor's indices, or with
`state_position="leading"` the indices just before the chunk, which then shifts by `Fs`), so the
transition is the same function at every chunk. `positions="absolute"` (with `anchor="none"`)
is the released Self-Forcing inference: a 21-frame cache filled in order, RoPE from the
absolute frame index.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from asvd import kv_cache, sampler
from asvd import sharding as shard_lib
from asvd.errors import UsageError
from asvd.kv_cache import Cache
from asvd.models.dit import WanDiT

ANCHORS = ("adaptive", "sink", "ema", "none")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static geometry of one transition, derived from the `rollout` and `sampler` sections."""

  anchor: str
  absolute: bool
  chunk_frames: int  # F
  state_frames: int  # Fs (anchor slots; 0 in the absolute preset)
  window_frames: int  # Wp (the whole 21-frame buffer in the absolute preset)
  state_position: str
  ema_decay: float
  latent_hw: tuple[int, int]
  tokens: int  # tokens per latent frame
  timesteps: tuple[float, ...]
  sigmas: tuple[float, ...]
  context_timestep: float
  context_sigma: float
  context_noise: bool = False  # the clean re-run's input is re-noised (fresh noise, last slot)
  sink_in_window: bool = False  # sink: the sink frames also enter the window
  anchor_bias: float = 0.0  # logit bias on the anchor slots' keys (`rollout.anchor_bias`)
  # positions="absolute_rolling": RoPE from absolute frame indices with the rolling window (the
  # sink keeps its index while the chunks' grow, as the peers); rollouts stop at `max_frames`.
  absolute_rolling: bool = False
  max_frames: int = 0

  @property
  def num_slots(self) -> int:
    return self.state_frames + self.window_frames

  @property
  def noise_slots(self) -> int:
    """Noise tensors per chunk: one per step, plus one for a noised clean re-run."""
    return len(self.timesteps) + int(self.context_noise)

  @property
  def z_frames(self) -> int:
    """Frames denoised jointly: `Fs + F` in adaptive mode, `F` otherwise."""
    return self.chunk_frames + (self.state_frames if self.anchor == "adaptive" else 0)

  def slot_positions(self) -> np.ndarray:
    return np.arange(self.num_slots, dtype=np.int32)

  def z_positions(self) -> np.ndarray:
    """Temporal indices of the jointly denoised frames (relative layout)."""
    fs, base, f = self.state_frames, self.num_slots, self.chunk_frames
    if self.anchor != "adaptive":
      return np.arange(base, base + f, dtype=np.int32)
    if self.state_position == "anchor":
      return np.concatenate([np.arange(fs), np.arange(base, base + f)]).astype(np.int32)
    return np.arange(base, base + fs + f, dtype=np.int32)  # "leading"


def make_layout(config, model_cfg, latent_hw=None, sampler_config=None) -> Layout:
  """Validates the `rollout` config (named keys in errors) and derives the static layout.

  `sampler_config` defaults to asvd's Self-Forcing schedule (`base_config().sampler`).
  """
  if sampler_config is None:
    from asvd.config import base_config  # noqa: PLC0415

    sampler_config = base_config().sampler
  r = config
  bs = r.get("batch_size", 1)
  if not isinstance(bs, int) or bs < 1:
    raise UsageError(f"rollout.batch_size={bs!r} must be an integer >= 1")
  anchor = r.anchor
  if anchor not in ANCHORS:
    raise UsageError(f"rollout.anchor={anchor!r}; choose one of {ANCHORS}")
  if r.positions not in ("relative", "absolute", "absolute_rolling"):
    raise UsageError(f"rollout.positions={r.positions!r}; choose 'relative', 'absolute' or 'absolute_rolling'")
  if r.positions == "absolute_rolling" and anchor not in ("sink", "none"):
    raise UsageError(f"rollout.positions='absolute_rolling' is the peers' sink baseline: set rollout.anchor to 'sink' or 'none' (got {anchor!r})")
  if r.state_position not in ("anchor", "leading"):
    raise UsageError(f"rollout.state_position={r.state_position!r}; choose 'anchor' or 'leading'")
  f, fs, wp = int(r.chunk_frames), int(r.state_frames), int(r.window_frames)
  if f < 1:
    raise UsageError(f"rollout.chunk_frames={f} must be >= 1")
  if fs < 0 or wp < 0:
    raise UsageError(f"rollout.state_frames={fs} and rollout.window_frames={wp} must be >= 0")
  absolute = r.positions == "absolute"
  if absolute:
    if anchor != "none":
      raise UsageError("rollout.positions='absolute' is the Self-Forcing preset: set rollout.anchor='none'")
    fs, wp = 0, int(r.absolute_frames)
  elif anchor in ("adaptive", "sink", "ema") and fs < 1:
    raise UsageError(f"rollout.anchor={anchor!r} needs rollout.state_frames >= 1")
  if anchor == "sink" and fs > f:
    raise UsageError(f"rollout.anchor='sink' fills {fs} anchor slots from the first chunk of {f} frames")
  if anchor == "ema" and fs != 1:
    raise UsageError("rollout.anchor='ema' keeps one running average: set rollout.state_frames=1")
  if not 0.0 <= float(r.ema_decay) < 1.0:
    raise UsageError(f"rollout.ema_decay={r.ema_decay} must be in [0, 1)")
  raw_hw = latent_hw if latent_hw is not None else r.latent_hw
  try:
    hw = tuple(int(v) for v in raw_hw)
  except (TypeError, ValueError):
    hw = ()
  if len(hw) != 2 or min(hw) < 1:
    raise UsageError(f"rollout.latent_hw={raw_hw!r} must be two positive integers (latent H, W)")
  _, ph, pw = model_cfg.patch_size
  if hw[0] % ph or hw[1] % pw:
    raise UsageError(f"rollout.latent_hw={hw} must be divisible by the patch size {(ph, pw)}")
  tokens = (hw[0] // ph) * (hw[1] // pw)
  positions_needed = (fs + wp + f + (fs if r.state_position == "leading" else 0)) if not absolute else wp
  hp, wq = hw[0] // ph, hw[1] // pw
  if max(positions_needed, hp, wq) > model_cfg.rope_max_seq_len:
    raise UsageError(
      f"RoPE positions up to {max(positions_needed, hp, wq)} exceed model.rope_max_seq_len="
      f"{model_cfg.rope_max_seq_len}"
    )
  s = sampler_config
  ts, sig = sampler.step_sigmas(s)
  t_ctx = float(s.context_timestep)
  mode = s.get("context_sigma", "exact")
  if mode not in ("exact", "table"):
    raise UsageError(f"sampler.context_sigma={mode!r}; choose 'exact' or 'table'")
  if not 0.0 <= t_ctx <= float(s.num_train_timesteps):
    raise UsageError(f"sampler.context_timestep={t_ctx} must be in [0, {s.num_train_timesteps}]")
  context_noise = t_ctx > 0 or mode == "table"
  try:
    anchor_bias = float(r.get("anchor_bias", 0.0))
  except (TypeError, ValueError):
    anchor_bias = float("nan")
  if not np.isfinite(anchor_bias):
    raise UsageError(f"rollout.anchor_bias={r.get('anchor_bias')!r} must be a finite number (a logit bias; 0 is off)")
  if anchor_bias and (absolute or fs == 0):
    raise UsageError(f"rollout.anchor_bias={anchor_bias} biases the anchor slots, and this layout has none (positions={r.positions!r}, state_frames={fs})")
  return Layout(
    anchor=anchor,
    absolute=absolute,
    chunk_frames=f,
    state_frames=fs,
    window_frames=wp,
    state_position=r.state_position,
    ema_decay=float(r.ema_decay),
    latent_hw=hw,
    tokens=tokens,
    timesteps=tuple(float(v) for v in ts),
    sigmas=tuple(float(v) for v in sig),
    context_timestep=t_ctx,
    context_sigma=float(sampler.sigma_of(t_ctx, s)[0]) if context_noise else 0.0,
    context_noise=context_noise,
    sink_in_window=bool(r.get("sink_in_window", False)),
    anchor_bias=anchor_bias,
    absolute_rolling=r.positions == "absolute_rolling",
    max_frames=int(model_cfg.rope_max_seq_len),
  )


# ------------------------------------------------------------------------------------------------
# The transition.
# ------------------------------------------------------------------------------------------------


def _slots(lay: Layout, cache: Cache, slot_pos):
  """The cache's slots as the model reads them, with the anchor's logit bias when one is set."""
  bias = None
  if lay.anchor_bias:
    bias = jnp.asarray([lay.anchor_bias] * lay.state_frames + [0.0] * (lay.num_slots - lay.state_frames), jnp.float32)
  return cache.slots(slot_pos, bias)


def _positions(lay: Layout, cache: Cache):
  """(slot positions [N], z positions [Fz]) for this chunk."""
  if lay.absolute:
    start = cache.chunk * lay.chunk_frames
    return jnp.arange(lay.num_slots, dtype=jnp.int32), start + jnp.arange(lay.chunk_frames, dtype=jnp.int32)
  if lay.absolute_rolling:  # video frame g at index g: the sink at 0.., the window just before the chunk
    start = cache.chunk * lay.chunk_frames
    win = jnp.maximum(start - lay.window_frames + jnp.arange(lay.window_frames, dtype=jnp.int32), 0)  # the last Wp frames
    slots = jnp.concatenate([jnp.arange(lay.state_frames, dtype=jnp.int32), win])
    return slots, start + jnp.arange(lay.chunk_frames, dtype=jnp.int32)
  return jnp.asarray(lay.slot_positions()), jnp.asarray(lay.z_positions())


def flow(model: WanDiT, lay: Layout, cache: Cache, z, t_bf, text=None, probe: bool = False):
  """The model's flow prediction for the jointly denoised frames `z [B, Fz, H, W, C]` at
  timesteps `t_bf [B, Fz]`, attending to the valid cache slots with the layout's positions.

  This is the one model call of the method; sampling and teacher-forced training both use it.
  """
  slot_pos, z_pos = _positions(lay, cache)
  txt = cache.text if text is None else text
  return model(z, t_bf, txt, positions=z_pos, slots=_slots(lay, cache, slot_pos), probe=probe)


def frozen(model: WanDiT) -> WanDiT:
  """The same model with every parameter behind `stop_gradient` (forward unchanged)."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.lax.stop_gradient(state))


def denoise(
  model: WanDiT,
  lay: Layout,
  cache: Cache,
  noise: jax.Array,
  probe: bool = False,
  *,
  exit_step: jax.Array | int | None = None,
  text=None,
):
  """Steps 1-2: few-step sampling of `z` against the cache. Returns `(x0 [B, Fz, ...], share)`.

  Args:
    model, lay, cache, noise: as in `transition_fn`.
    probe: also return the attention share of the last denoising step.
    exit_step: None for inference. For training (Self-Forcing's stochastic gradient
      truncation), an int32 in `[0, steps)`, possibly traced (one compile serves every value):
      the steps before it run on stop-gradient parameters (a scan whose steps past the exit are
      skipped by `lax.cond`, so no compute is wasted), then one live forward at `exit_step`
      returns `x0` with gradient. At `exit_step = steps - 1` the result equals inference.
    text: the prompt's cross-attention K/V for the live forward (training computes them from
      the live parameters so that the text path gets gradient); default `cache.text`.
  """
  b, fz = noise.shape[1], noise.shape[2]
  steps = len(lay.timesteps)
  ts = jnp.asarray(lay.timesteps, jnp.float32)
  sig = jnp.asarray(lay.sigmas, jnp.float32)

  def predict(m, c, z, t, want_probe, txt):
    out = flow(m, lay, c, z, jnp.full((b, fz), t, jnp.float32), txt, probe=want_probe)
    return out if want_probe else (out, None)

  def renoise(m, c, z, t, s, s_next, eps, txt):
    """One sampler step that is not the last: predict `x0`, re-noise to `s_next` with fresh `eps`."""
    v, _ = predict(m, c, z, t, False, txt)
    return (1.0 - s_next) * (z - s * v) + s_next * eps

  if exit_step is None:

    def step(z, xs):
      return renoise(model, cache, z, *xs, cache.text), None

    # All but the last step in a scan (one traced model call); the last one may probe.
    z = noise[0].astype(jnp.float32)
    if steps > 1:
      # step i re-noises to sigma_{i+1} with noise[i+1]
      z, _ = jax.lax.scan(step, z, (ts[:-1], sig[:-1], sig[1:], noise[1:steps]))
    v, aux = predict(model, cache, z, ts[-1], probe, cache.text)
    x0 = z - sig[-1] * v
    return x0, (aux["share"] if probe else None)

  # Training: everything before the exit forward carries no gradient.
  exit_step = jnp.asarray(exit_step, jnp.int32)
  fixed, cache_sg = frozen(model), jax.lax.stop_gradient(cache)
  noise = jax.lax.stop_gradient(noise)

  def pre_step(z, xs):
    i, *step_xs = xs
    run = lambda z: renoise(fixed, cache_sg, z, *step_xs, cache_sg.text)
    return jax.lax.cond(i < exit_step, run, lambda z: z, z), None

  z = noise[0].astype(jnp.float32)
  if steps > 1:
    z, _ = jax.lax.scan(pre_step, z, (jnp.arange(steps - 1), ts[:-1], sig[:-1], sig[1:], noise[1:steps]))
  # Per-chunk remat saves this (the live forward's input) and recomputes only that forward.
  z = checkpoint_name(jax.lax.stop_gradient(z), "exit_input")
  live_text = cache_sg.text if text is None else text
  v, aux = predict(model, cache_sg, z, ts[exit_step], probe, live_text)
  x0 = z - sig[exit_step] * v
  return x0, (aux["share"] if probe else None)


def write_cache(model: WanDiT, lay: Layout, cache: Cache, x0: jax.Array, noise: jax.Array | None) -> Cache:
  """Step 4: the clean re-run at the context timestep writes the cache (no gradient).

  `noise[-1]` noises the re-run's input when `lay.context_noise`; otherwise `noise` is unused.
  """
  x0 = jax.lax.stop_gradient(x0)
  slot_pos, z_pos = _positions(lay, cache)
  b, fz = x0.shape[:2]
  x_in = x0
  if lay.context_noise:  # noised to the context level with the chunk's own fresh noise slot
    x_in = (1.0 - lay.context_sigma) * x0 + lay.context_sigma * noise[-1]
  t_bf = jnp.full((b, fz), lay.context_timestep, jnp.float32)
  _, aux = frozen(model)(x_in, t_bf, cache.text, positions=z_pos, slots=_slots(lay, cache, slot_pos), return_kv=True)
  k_new = kv_cache.frames_of(jax.lax.stop_gradient(aux["k"]).astype(cache.k.dtype), lay.tokens)
  v_new = kv_cache.frames_of(jax.lax.stop_gradient(aux["v"]).astype(cache.v.dtype), lay.tokens)
  k_old, v_old = kv_cache.frames_of(cache.k, lay.tokens), kv_cache.frames_of(cache.v, lay.tokens)
  fs, f = lay.state_frames, lay.chunk_frames
  valid = cache.valid

  if lay.absolute:  # write the chunk at its absolute frame index; nothing is evicted
    start = cache.chunk * f
    k = jax.lax.dynamic_update_slice_in_dim(k_old, k_new, start, axis=2)
    v = jax.lax.dynamic_update_slice_in_dim(v_old, v_new, start, axis=2)
    valid = jax.lax.dynamic_update_slice_in_dim(valid, jnp.ones((b, f), bool), start, axis=1)
    lat = jax.lax.dynamic_update_slice_in_dim(cache.lat, x0.astype(jnp.float32), start, axis=1)
    return cache.replace(k=kv_cache.tokens_of(k), v=kv_cache.tokens_of(v), valid=valid, lat=lat, chunk=cache.chunk + 1)

  # Content K/V (the last F frames of z) enter the window; the oldest frames fall out.
  kx, vx = k_new[:, :, -f:], v_new[:, :, -f:]
  anc_valid = valid[:, :fs]
  x_valid = jnp.ones((b, f), bool)
  if lay.anchor == "sink" and not lay.sink_in_window:
    # LongLive: the frames that fill the sink now are kept out of the window (the window slots
    # they would take stay masked until they age out), so no frame is attended twice.
    x_valid = x_valid.at[:, :fs].set(anc_valid[:, :1])
  win_k = jnp.concatenate([k_old[:, :, fs:], kx], axis=2)  # [L, B, Wp + F, T, H, Dh]
  win_v = jnp.concatenate([v_old[:, :, fs:], vx], axis=2)
  win_valid = jnp.concatenate([valid[:, fs:], x_valid], axis=1)
  evicted_k, evicted_v, evicted_valid = win_k[:, :, :f], win_v[:, :, :f], win_valid[:, :f]
  win_k, win_v, win_valid = win_k[:, :, f:], win_v[:, :, f:], win_valid[:, f:]
  x_lat = x0[:, -f:].astype(jnp.float32)
  win_lat = jnp.concatenate([cache.lat[:, fs:], x_lat], axis=1)[:, f:]

  anc_k, anc_v = k_old[:, :, :fs], v_old[:, :, :fs]
  anc_lat = cache.lat[:, :fs]
  acc_k, acc_v = cache.acc_k, cache.acc_v
  if lay.anchor == "adaptive":  # the new state's K/V replace the old state's
    anc_k, anc_v = k_new[:, :, :fs], v_new[:, :, :fs]
    anc_valid = jnp.ones_like(anc_valid)
    anc_lat = x0[:, :fs].astype(jnp.float32)
  elif lay.anchor == "sink":  # the first generated frames, frozen afterwards
    keep = anc_valid[None, :, :, None, None, None]
    anc_k = jnp.where(keep, anc_k, kx[:, :, :fs])
    anc_v = jnp.where(keep, anc_v, vx[:, :, :fs])
    anc_lat = jnp.where(anc_valid[:, :, None, None, None], anc_lat, x_lat[:, :fs])
    anc_valid = jnp.ones_like(anc_valid)
  elif lay.anchor == "ema":  # running average of evicted frames, oldest first, in float32
    d = lay.ema_decay
    have = anc_valid[:, 0]  # [B]
    for j in range(f):
      ev = evicted_valid[:, j]  # [B]
      ek = evicted_k[:, :, j].astype(jnp.float32)  # [L, B, T, H, Dh]
      evv = evicted_v[:, :, j].astype(jnp.float32)
      h5, e5 = have[None, :, None, None, None], ev[None, :, None, None, None]
      acc_k = jnp.where(e5, jnp.where(h5, d * acc_k + (1 - d) * ek, ek), acc_k)
      acc_v = jnp.where(e5, jnp.where(h5, d * acc_v + (1 - d) * evv, evv), acc_v)
      have = have | ev
    anc_valid = have[:, None]
    anc_k, anc_v = acc_k[:, :, None].astype(cache.k.dtype), acc_v[:, :, None].astype(cache.v.dtype)
  # "none": anchor slots stay invalid.
  k = jnp.concatenate([anc_k, win_k], axis=2)
  v = jnp.concatenate([anc_v, win_v], axis=2)
  valid = jnp.concatenate([anc_valid, win_valid], axis=1)
  lat = jnp.concatenate([anc_lat, win_lat], axis=1)
  return cache.replace(
    k=kv_cache.tokens_of(k), v=kv_cache.tokens_of(v), valid=valid, lat=lat, acc_k=acc_k, acc_v=acc_v, chunk=cache.chunk + 1
  )


def write_given(model: WanDiT, lay: Layout, state, cache: Cache, x, key=None):
  """Writes given clean frames `x [B, g, H, W, C]` (g = `lay.chunk_frames`) into the cache as
  if the transition had generated them: the clean re-run of step 4, with, in `adaptive` mode,
  the last given frame as the state (what a chunk learns to emit with the causal init's default
  `train.state_init_target = "own_last_frame"`). Used by
  `asvd.prefill` (conditioning) and by teacher-forced training. `key` draws the re-run's noise
  when the layout noises it (`Layout.context_noise`). Returns `(state, cache)`.
  """
  if lay.anchor == "adaptive":
    fs, g = lay.state_frames, x.shape[1]
    state = x[:, -fs:] if g >= fs else jnp.concatenate([state[:, g:], x], axis=1)
    x = jnp.concatenate([state, x], axis=1)
  noise = None
  if lay.context_noise:
    if key is None:
      raise UsageError("the clean re-run is noised (sampler.context_timestep > 0 or context_sigma='table'): pass a key")
    noise = jax.random.normal(key, (1, *x.shape), jnp.float32)
  return state, write_cache(model, lay, cache, x, noise)


def given_groups(n: int, chunk_frames: int) -> list[tuple[int, int]]:
  """`[(start, size)]`: given frames are written chunk by chunk, the remainder as a smaller group."""
  return [(s, min(chunk_frames, n - s)) for s in range(0, n, chunk_frames)]


def check_absolute(lay: Layout, first_chunk: int, num_chunks: int | None) -> None:
  """The absolute preset's buffer holds `absolute_frames`, and absolute positions end at the
  RoPE table (`model.rope_max_seq_len` frames): one error for every entry point."""
  if lay.absolute_rolling and num_chunks is not None and (first_chunk + num_chunks) * lay.chunk_frames > lay.max_frames:
    raise UsageError(
      f"rollout.positions='absolute_rolling' indexes frames absolutely, up to model.rope_max_seq_len={lay.max_frames}: "
      f"at most {lay.max_frames // lay.chunk_frames} chunks, asked for chunks {first_chunk}..{first_chunk + num_chunks - 1}"
    )
  if lay.absolute and num_chunks is not None and (first_chunk + num_chunks) * lay.chunk_frames > lay.window_frames:
    raise UsageError(
      f"the absolute Self-Forcing preset holds {lay.window_frames} frames (rollout.absolute_frames): "
      f"at most {lay.window_frames // lay.chunk_frames} chunks, asked for chunks {first_chunk}.."
      f"{first_chunk + num_chunks - 1}"
    )


def recache(model: WanDiT, lay: Layout, cache: Cache, text) -> Cache:
  """Switches the prompt and re-encodes the window under it (LongLive-style recache).

  The window's clean latents are run once at the context timestep with the new text; they attend
  to the (kept) anchor slots and to each other (every valid window frame, bidirectionally), and
  their K/V replace the window's. The anchor (state / sink / EMA) is kept, as LongLive keeps a
  global sink. In `adaptive` mode a switch needs no recache (`rollout.recache_on_switch=False`):
  the state carries over and the next chunk re-reads everything under the new prompt.
  """
  fs, wp, t = lay.state_frames, lay.window_frames, lay.tokens
  cache = cache.replace(text=text)
  b = cache.valid.shape[0]
  win_valid = cache.valid[:, fs:]  # [B, Wp]
  anchor_only = cache.replace(valid=cache.valid.at[:, fs:].set(False))
  own = jnp.broadcast_to(win_valid[:, None, :], (b, wp, wp)) | jnp.eye(wp, dtype=bool)[None]
  slot_pos = _positions(lay, cache)[0]
  _, aux = model(
    cache.lat[:, fs:],
    jnp.full((b, wp), lay.context_timestep, jnp.float32),
    text,
    positions=slot_pos[fs:],
    slots=_slots(lay, anchor_only, slot_pos),
    frame_mask=own,
    return_kv=True,
  )
  keep = win_valid[None, :, :, None, None, None]
  k_old, v_old = kv_cache.frames_of(cache.k, t), kv_cache.frames_of(cache.v, t)
  k_new = jnp.where(keep, kv_cache.frames_of(aux["k"].astype(cache.k.dtype), t), k_old[:, :, fs:])
  v_new = jnp.where(keep, kv_cache.frames_of(aux["v"].astype(cache.v.dtype), t), v_old[:, :, fs:])
  k = jnp.concatenate([k_old[:, :, :fs], jax.lax.stop_gradient(k_new)], axis=2)
  v = jnp.concatenate([v_old[:, :, :fs], jax.lax.stop_gradient(v_new)], axis=2)
  return cache.replace(k=kv_cache.tokens_of(k), v=kv_cache.tokens_of(v))


def transition_fn(model: WanDiT, lay: Layout, state, cache: Cache, noise, probe: bool = False, *, exit_step=None, text=None):
  """One chunk. Returns `(state, cache, frames)` (plus the attention share when probing).

  `exit_step` and `text` select the training form of `denoise` (one live forward with
  gradient); the cache write never carries gradient.
  """
  x0, share = denoise(model, lay, cache, noise, probe, exit_step=exit_step, text=text)
  # Under a mesh the new cache is pinned to its logical layout inside the step as well, so that a
  # rollout inside a training step keeps (and saves for the backward) the same split as a carry
  # between steps (`mesh.rules.tokens="context"`: each context shard keeps its part).
  new_cache = shard_lib.constrain_tree(write_cache(model, lay, cache, x0, noise), Cache.logical_axes())
  if lay.anchor == "adaptive":
    state, frames = x0[:, : lay.state_frames], x0[:, lay.state_frames :]
  else:
    frames = x0
  out = (state, new_cache, frames)
  return (*out, share) if probe else out


# ------------------------------------------------------------------------------------------------
# Public constructor.
# ------------------------------------------------------------------------------------------------


def noise_shape(lay: Layout, batch: int, channels: int) -> tuple[int, ...]:
  """`[steps (+1), B, Fz, H, W, C]`: all randomness of one chunk (one slot per denoising step,
  and one more for the clean re-run when it is noised, `Layout.context_noise`)."""
  return (lay.noise_slots, batch, lay.z_frames, *lay.latent_hw, channels)


def initial_carry(model: WanDiT, context, lay: Layout, mesh=None, rules=None):
  """`(state [B, Fs, H, W, C] zeros, empty cache holding the prompt's text K/V)`.

  Without a mesh the carry is placed (committed) on the device that holds the model's
  parameters, so the first transition call sees the same placement as every later one and
  compiles once. With a mesh it is made directly on its shards (`carry_shardings`): nothing is
  built on one device and copied.
  """
  if mesh is None:
    return jax.device_put(empty_carry(model, text_kv(model, context), lay), home_device(model))

  graphdef, params = nnx.split(model)
  shapes = jax.eval_shape(_make_carry(graphdef, lay, None), params, context)
  leaves, treedef = jax.tree.flatten(carry_shardings(mesh, rules, shapes))
  with shard_lib.activation_sharding(mesh, rules):
    return _make_carry(graphdef, lay, (tuple(leaves), treedef))(params, context)


@functools.lru_cache(maxsize=16)
def _make_carry(graphdef, lay: Layout, shardings):
  """`(params, context) -> initial carry`, jitted onto `shardings` (`(leaves, treedef)`) or plain."""

  def make(params, context):
    m = nnx.merge(graphdef, params)
    return empty_carry(m, m.text_kv(context), lay)

  if shardings is None:
    return make
  return jax.jit(make, out_shardings=jax.tree.unflatten(shardings[1], shardings[0]))


def empty_carry(model: WanDiT, text, lay: Layout):
  """`(zero state, empty cache)` holding the given text K/V (pure: usable inside jit)."""
  cfg = model.cfg
  b = text.k.shape[1]
  state = jnp.zeros((b, lay.state_frames, *lay.latent_hw, cfg.out_channels), jnp.float32)
  cache = kv_cache.empty_cache(
    text, lay.num_slots, lay.tokens, jnp.dtype(cfg.dtype), (*lay.latent_hw, cfg.out_channels), ema=lay.anchor == "ema"
  )
  return state, cache


def home_device(model: WanDiT):
  """The device of the model's parameters (this process's first device when they are spread or unplaced)."""
  leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
  devices = getattr(leaf, "devices", lambda: set())()
  return next(iter(devices)) if len(devices) == 1 else jax.local_devices()[0]


def text_kv(model: WanDiT, context):
  """`model.text_kv(context)` through a jit cached per model graph (compiled once per shape)."""
  graphdef, params = nnx.split(model)
  return _text_kv_fn(graphdef)(params, jnp.asarray(context))


@functools.lru_cache(maxsize=16)
def _text_kv_fn(graphdef):
  def prompt_kv(params, context):
    return nnx.merge(graphdef, params).text_kv(context)

  return jax.jit(prompt_kv)


def carry_shardings(mesh, rules=None, carry=None):
  """`(state, cache)` shardings from the logical axes (batch over data/fsdp, heads over tensor).

  With `carry` (arrays or ShapeDtypeStructs), mesh axes that do not divide a dimension are
  dropped (a batch of 1 is replicated over `data`)."""
  axes = (("batch", "frames", "height", "width", "channels"), Cache.logical_axes())
  return shard_lib.logical_sharding(axes, mesh, rules, carry)


NOISE_AXES = ("steps", "batch", "frames", "height", "width", "channels")


def step_shardings(params, carry, noise_shape_, mesh, rules=None):
  """`(params, (state, cache), noise)` shardings of a transition on `mesh` (None without one),
  as a hashable `(leaves, treedef)` (the key of cached programs; `jax.tree.unflatten` it)."""
  if mesh is None:
    return None

  noise = jax.ShapeDtypeStruct(tuple(noise_shape_), jnp.float32)
  tree = (
    shard_lib.param_shardings(params, mesh, rules),
    carry_shardings(mesh, rules, carry),
    shard_lib.logical_sharding(NOISE_AXES, mesh, rules, noise),
  )
  leaves, treedef = jax.tree.flatten(tree)
  return tuple(leaves), treedef


def make_transition(model: WanDiT, context, *, config, latent_hw=None, sampler_config=None, mesh=None, rules=None):
  """The initial carry and the jitted pure transition.

  Args:
    model: a `WanDiT`.
    context: text embeddings `[B, L, text_dim]` (zero-padded to the model's text length as the
      original does).
    config: the `rollout` config section.
    latent_hw: latent (H, W); defaults to `config.latent_hw`.
    sampler_config: the `sampler` section (defaults to asvd's Self-Forcing schedule).
    mesh: optional mesh; the transition holds the model's parameters on their shards (copied
      there unless `asvd.sharding.shard_model` already put them there), takes them and the carry
      with the shardings of their logical axes and returns the carry so, the pjit way; the
      residual stream and attention heads are pinned inside (`asvd.sharding.constrain`).
    rules: logical-to-mesh rules (default `asvd.sharding.DEFAULT_RULES`).

  Returns:
    `(state, cache, transition)` where `transition(state, cache, noise) -> (state, cache,
    frames)` is jitted and pure (the model's parameters are an argument of the jitted step, not
    constants baked into the program). `noise` is `[steps, B, Fs+F, H, W, C]` in adaptive
    mode (state frames first) and `[steps, B, F, H, W, C]` otherwise.
  """
  lay = make_layout(config, model.cfg, latent_hw, sampler_config)
  context = context if isinstance(context, jax.Array) else np.asarray(context)  # host stays host
  graphdef, params = nnx.split(model)
  if mesh is not None:
    params = shard_lib.place_params(params, mesh, rules)
    context = shard_lib.place(context, ("batch", "text", "channels"), mesh, rules)
  state, cache = initial_carry(nnx.merge(graphdef, params), context, lay, mesh, rules)
  want = noise_shape(lay, state.shape[0], model.cfg.in_channels)
  shardings = step_shardings(params, (state, cache), want, mesh, rules)
  step = _jitted_step(graphdef, lay, mesh, shard_lib.rules_key(rules), shardings)

  def transition(state, cache, noise):
    if tuple(noise.shape) != want:
      raise UsageError(f"noise has shape {tuple(noise.shape)}; this transition expects {want} [steps, B, Fz, H, W, C]")
    if lay.absolute or lay.absolute_rolling:  # reading the counter syncs: only these presets pay it
      check_absolute(lay, int(cache.chunk), 1)
    return step(params, state, cache, noise)

  transition.layout = lay
  transition.raw = step
  transition.params = params
  transition.graphdef = graphdef
  return state, cache, transition


def abstract_transition(model: WanDiT, lay: Layout, batch: int = 1):
  """`(jitted step, args)` with `args = (params, state, cache, noise)` as ShapeDtypeStructs: the
  transition of `model` (e.g. `abstract_dit(config)`, no weights) ready to lower and compile
  without running anything, for memory planning and ahead-of-time compiles
  (`step.lower(*args).compile().memory_analysis()`)."""
  cfg = model.cfg
  graphdef, params = nnx.split(model)

  def carry(p, context):
    m = nnx.merge(graphdef, p)
    return empty_carry(m, m.text_kv(context), lay)

  context = jax.ShapeDtypeStruct((batch, cfg.text_len, cfg.text_dim), jnp.dtype(cfg.dtype))
  state, cache = jax.eval_shape(carry, params, context)
  noise = jax.ShapeDtypeStruct(noise_shape(lay, batch, cfg.in_channels), jnp.float32)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)

  # A fresh jit (not `_jitted_step`'s cached one): a trace made for one platform's attention
  # (`attention.auto_platform`) must not be reused for another.
  def transition_step(params, state, cache, noise):
    return transition_fn(nnx.merge(graphdef, params), lay, state, cache, noise)

  return jax.jit(transition_step), (params, state, cache, noise)


@functools.lru_cache(maxsize=16)
def _jitted_step(graphdef, lay: Layout, mesh, rules, shardings):
  """One jitted transition per (model graph, layout, mesh, rules, shardings): compiled once per
  process. `shardings` is `step_shardings(...)` (None without a mesh)."""
  rules = None if rules is None else dict(rules)
  kw = {}
  if mesh is not None:
    param_sh, (state_sh, cache_sh), noise_sh = jax.tree.unflatten(shardings[1], shardings[0])
    kw = {"in_shardings": (param_sh, state_sh, cache_sh, noise_sh), "out_shardings": (state_sh, cache_sh, state_sh)}

  def transition_step(params, state, cache, noise):
    with shard_lib.activation_sharding(mesh, rules):
      return transition_fn(nnx.merge(graphdef, params), lay, state, cache, noise)

  return jax.jit(transition_step, **kw)


__all__ = ["make_transition", "transition_fn", "abstract_transition", "Layout", "make_layout", "Cache"]

