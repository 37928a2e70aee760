"""Rollouts: the transition iterated by `jax.lax.scan` (`rollout`) or chunk by chunk (`stream`).

Noise for chunk `c` comes from `jax.random.fold_in(key, c)`, so `rollout` and `stream` with the
same key produce the same latents, and a rollout can be resumed from its carry.

`rollout` runs the scan in segments of `rollout.scan_chunks` chunks. The segment program takes
its first chunk index and the number of live chunks as traced arguments, so **one compile
serves any `num_chunks`**: the last segment is padded and its padding chunks leave the carry
untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from asvd import sharding as shard_lib
from asvd import transition as tr
from asvd.models.dit import WanDiT


def chunk_noise(key: jax.Array, chunk: jax.Array, shape) -> jax.Array:
  """All randomness of chunk `chunk` (`[steps, B, Fz, H, W, C]`, float32)."""
  return jax.random.normal(jax.random.fold_in(key, chunk), shape, jnp.float32)


def _key(key) -> jax.Array:
  if isinstance(key, int):
    return jax.random.key(key)
  return key


class _Program:
  """Jitted segment scan + single-chunk step for one (model, layout), compiled once each."""

  def __init__(self, model: WanDiT, lay: tr.Layout, segment: int, batch: int, mesh=None, *, probe=False, recache_on_switch=False):
    self.lay, self.segment, self.probe = lay, segment, probe
    self.recache_on_switch = recache_on_switch
    self.graphdef, self.params = nnx.split(model)
    self.shape = tr.noise_shape(lay, batch, model.cfg.in_channels)
    graphdef, shape = self.graphdef, self.shape

    def one(params, carry, key, c):
      m = nnx.merge(graphdef, params)
      out = tr.transition_fn(m, lay, *carry, chunk_noise(key, c, shape), probe=probe)
      return (out[0], out[1]), out[2:]

    def seg(params, carry, key, start, live):
      def run(carry, i):
        return one(params, carry, key, start + i)

      def skip(carry, i):  # padding chunk: no compute, carry untouched, zero outputs
        ys = jax.eval_shape(run, carry, i)[1]
        return carry, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ys)

      def body(carry, i):
        return jax.lax.cond(i < live, run, skip, carry, i)

      return jax.lax.scan(body, carry, jnp.arange(segment))

    kw = {}
    if mesh is not None:
      carry_sh = tr.carry_shardings(mesh)
      kw = {"in_shardings": (None, carry_sh, None, None, None)}
      frames_sh = shard_lib.logical_sharding(("chunks", "batch", "frames", "height", "width", "channels"), mesh)
      ys_sh = (frames_sh, None) if probe else (frames_sh,)
      kw["out_shardings"] = (carry_sh, ys_sh)
    self.seg = jax.jit(seg, donate_argnums=(1,), **kw)
    self.one = jax.jit(one)
    self.recache = jax.jit(lambda params, cache, text: tr.recache(nnx.merge(graphdef, params), lay, cache, text))

  def switch(self, carry, text):
    """A prompt switch: new text K/V (and, if configured, the window re-encoded under it)."""
    state, cache = carry
    if self.recache_on_switch:
      return state, self.recache(self.params, cache, text)
    return state, cache.replace(text=text)


def _program(model, context, config, sampler_config, latent_hw, segment, mesh=None):
  lay = tr.make_layout(config, model.cfg, latent_hw, sampler_config)
  carry = tr.initial_carry(model, context, lay)
  prog = _Program(
    model,
    lay,
    segment,
    carry[0].shape[0],
    mesh,
    probe=bool(config.get("probe", False)),
    recache_on_switch=bool(config.get("recache_on_switch", False)),
  )
  return prog, carry


def _check_context(model, context):
  context = jnp.asarray(context)
  if context.ndim != 3 or context.shape[-1] != model.cfg.text_dim:
    raise ValueError(f"context must be [B, L, {model.cfg.text_dim}], got shape {tuple(context.shape)}")
  return context


def _switch_schedule(model, prompts, num_chunks=None):
  """`{chunk index: TextKV}` from a sequence of (chunk index, context)."""
  out = {}
  for c, ctx in prompts or ():
    if int(c) < 0 or (num_chunks is not None and int(c) >= num_chunks):
      raise ValueError(f"prompt switch at chunk {c} is outside 0..{num_chunks}")
    out[int(c)] = model.text_kv(jnp.asarray(ctx))
  return out


def rollout(
  model: WanDiT,
  context,
  key,
  *,
  num_chunks: int,
  config,
  sampler_config=None,
  latent_hw=None,
  prompts: Sequence | None = None,
  carry=None,
  start_chunk: int = 0,
  mesh=None,
):
  """Generates `num_chunks` chunks with a `jax.lax.scan` of the transition.

  Args:
    model: a `WanDiT`.
    context: text embeddings `[B, L, text_dim]`.
    key: a `jax.random.key` or an int seed.
    num_chunks: chunks to generate.
    config: the `rollout` config section (`scan_chunks` sets the segment length, default 8).
    sampler_config: the `sampler` section (default: Self-Forcing's 4 warped steps).
    latent_hw: latent (H, W), default `config.latent_hw`.
    prompts: optional prompt switches `[(chunk_index, context), ...]`; at a switch only the
      text K/V in the cache change, the state and window carry on (with
      `config.recache_on_switch` the window is also re-encoded under the new prompt, as
      LongLive does for caches without an adaptive state).
    carry: resume from a previous `final_carry` (with `start_chunk` its chunk count).
    start_chunk: index of the first chunk (noise keys continue from there).
    mesh: optional `jax.sharding.Mesh`; the carry is sharded by its logical axes (batch over
      `data`/`fsdp`).

  Returns:
    `(latents [B, num_chunks*F, H, W, C], final_carry)` and, when `config.probe` is set, a third
    element: the attention share `[num_chunks, L, B, N + Fz]` of the last denoising step
    (slots first: anchor, window frames, then the jointly denoised frames).
  """
  if num_chunks < 1:
    raise ValueError(f"num_chunks={num_chunks} must be >= 1")
  context = _check_context(model, context)
  segment = int(config.get("scan_chunks", 8))
  prog, init = _program(model, context, config, sampler_config, latent_hw, segment, mesh)
  lay = prog.lay
  if lay.absolute and (start_chunk + num_chunks) * lay.chunk_frames > lay.window_frames:
    raise ValueError(
      f"the absolute Self-Forcing preset holds {lay.window_frames} frames "
      f"(rollout.absolute_frames): at most {lay.window_frames // lay.chunk_frames} chunks"
    )
  carry = init if carry is None else carry
  switches = _switch_schedule(model, prompts, start_chunk + num_chunks)
  key = _key(key)
  frames, shares = [], []
  c, end = start_chunk, start_chunk + num_chunks
  while c < end:
    if c in switches:
      carry = prog.switch(carry, switches[c])
    nxt = min([s for s in switches if s > c] + [end])
    live = min(segment, nxt - c)
    carry, ys = prog.seg(prog.params, carry, key, jnp.int32(c), jnp.int32(live))
    frames.append(ys[0][:live])
    if prog.probe:
      shares.append(ys[1][:live])
    c += live
  fr = jnp.concatenate(frames)  # [chunks, B, F, H, W, C]
  latents = jnp.moveaxis(fr, 0, 1).reshape(fr.shape[1], -1, *fr.shape[3:])
  if prog.probe:
    return latents, carry, jnp.concatenate(shares)
  return latents, carry


def stream(
  model: WanDiT,
  context,
  key,
  *,
  config,
  sampler_config=None,
  latent_hw=None,
  prompts: Sequence | None = None,
  num_chunks: int | None = None,
  carry=None,
  start_chunk: int = 0,
) -> Iterator[jax.Array]:
  """Yields each chunk's latents `[B, F, H, W, C]` for as long as the caller iterates.

  Same key -> the same latents as `rollout`. `prompts` switches prompts as in `rollout`;
  `num_chunks` optionally stops the generator; `carry`/`start_chunk` resume (or start from a
  `prefill`ed cache).
  """
  context = _check_context(model, context)
  prog, init = _program(model, context, config, sampler_config, latent_hw, 1)
  carry = init if carry is None else carry
  switches = _switch_schedule(model, prompts)
  key = _key(key)
  c = start_chunk
  while num_chunks is None or c < start_chunk + num_chunks:
    if prog.lay.absolute and (c + 1) * prog.lay.chunk_frames > prog.lay.window_frames:
      return  # the absolute preset's buffer is full
    if c in switches:
      carry = prog.switch(carry, switches[c])
    carry, ys = prog.one(prog.params, carry, key, jnp.int32(c))
    yield ys[0]
    c += 1


def prefill(model: WanDiT, context, latents, *, config, sampler_config=None, carry=None):
  """Conditions a rollout on given clean latents (image- or video-to-video continuation).

  The frames are written into the cache exactly as generated frames would be: chunk by chunk
  (groups of `F`, the remainder as a smaller group), each by the clean re-run at the context
  timestep. In `adaptive` mode the last given frame also starts the state (the
  `state_init_target="last_frame"` choice of the causal-initialisation stage); in `sink` mode
  the first given frames become the sink. Pass the returned carry to `rollout(carry=...)` or
  `stream(carry=...)`.

  Args:
    model: the `WanDiT`.
    context: text embeddings `[B, L, text_dim]`.
    latents: clean (VAE-normalised) latents `[B, n, H, W, C]`, e.g. `vae.encode(image)`.
    config: the `rollout` section.
    sampler_config: the `sampler` section.
    carry: continue from this carry instead of an empty cache.

  Returns:
    `(state, cache)`.
  """
  context = _check_context(model, context)
  latents = jnp.asarray(latents, jnp.float32)
  if latents.ndim != 5:
    raise ValueError(f"conditioning latents must be [B, n, H, W, C], got shape {latents.shape}")
  lay = tr.make_layout(config, model.cfg, latents.shape[2:4], sampler_config)
  n, f = latents.shape[1], lay.chunk_frames
  if lay.absolute and n % f:
    raise ValueError(f"the absolute preset prefills whole chunks: {n} frames is not a multiple of F={f}")
  state, cache = tr.initial_carry(model, context, lay) if carry is None else carry
  graphdef, params = nnx.split(model)
  steps = {}  # group size -> jitted cache write: whole chunks share one compile, a remainder one more

  def write(g):
    if g not in steps:
      sub = dataclasses.replace(lay, chunk_frames=g)
      steps[g] = jax.jit(
        lambda p, c, x0: tr.write_cache(nnx.merge(graphdef, p), sub, c, x0, jnp.zeros((1, *x0.shape), x0.dtype))
      )
    return steps[g]

  start = 0
  while start < n:
    g = min(f, n - start)
    x = latents[:, start : start + g]
    if lay.anchor == "adaptive":
      state = x[:, -lay.state_frames :] if g >= lay.state_frames else jnp.concatenate([state[:, g:], x], axis=1)
      x = jnp.concatenate([state, x], axis=1)
    cache = write(g)(params, cache, x)
    start += g
  return state, cache


__all__ = ["rollout", "stream", "prefill", "chunk_noise"]


