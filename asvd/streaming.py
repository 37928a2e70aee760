"""Rollouts: the transition iterated by `jax.lax.scan` (`rollout`) or chunk by chunk (`stream`).

Noise for chunk `c` comes from `jax.random.fold_in(key, c)`, so `rollout` and `stream` with the
same key produce the same latents, and a rollout can be resumed from its carry.

`rollout` runs the scan in segments of `rollout.scan_chunks` chunks. The segment program takes
its first chunk index and the number of live chunks as traced arguments, so **one compile
serves any `num_chunks`**: the last segment is padded and its padding chunks leave the carry
untouched.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asvd import memory
from asvd import sharding as shard_lib
from asvd import transition as tr
from asvd.errors import UsageError
from asvd.models.dit import WanDiT


def chunk_noise(key: jax.Array, chunk: jax.Array, shape) -> jax.Array:
  """All randomness of chunk `chunk` (`[steps, B, Fz, H, W, C]`, float32)."""
  return jax.random.normal(jax.random.fold_in(key, chunk), shape, jnp.float32)


def _key(key, mesh=None) -> jax.Array:
  """A key from an int seed (made on the mesh, replicated, when there is one) or a key."""
  if mesh is None:
    return jax.random.key(key) if isinstance(key, int) else key
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if isinstance(key, int):
    return jax.jit(jax.random.key, out_shardings=rep)(np.uint32(key))
  return jax.device_put(key, rep)


class _Program:
  """Jitted segment scan + single-chunk step for one (model graph, layout, shapes, mesh, options).

  Parameters are an argument of every jitted function, never closed over, so one program serves
  every model with the same graph (e.g. a reloaded checkpoint) and every call of `rollout` /
  `stream`: programs are cached by `_get_program` and compile once per process. The carry is
  donated: callers hand in a carry they own (`rollout`/`stream` copy a carry the user passed).
  """

  def __init__(self, graphdef, lay: tr.Layout, segment: int, shape, mesh=None, rules=None, shardings=None, *, probe=False, recache_on_switch=False):
    self.lay, self.segment, self.probe = lay, segment, probe
    self.recache_on_switch = recache_on_switch
    self.graphdef, self.shape = graphdef, shape

    rules = None if rules is None else dict(rules)

    def transition_chunk(params, carry, key, c):
      with shard_lib.activation_sharding(mesh, rules):
        m = nnx.merge(graphdef, params)
        out = tr.transition_fn(m, lay, *carry, chunk_noise(key, c, shape), probe=probe)
      return (out[0], out[1]), out[2:]

    def rollout_segment(params, carry, key, start, live):
      def run(carry, i):
        return transition_chunk(params, carry, key, start + i)

      def skip(carry, i):  # padding chunk: no compute, carry untouched, zero outputs
        ys = jax.eval_shape(run, carry, i)[1]
        return carry, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ys)

      def body(carry, i):
        return jax.lax.cond(i < live, run, skip, carry, i)

      return jax.lax.scan(body, carry, jnp.arange(segment))

    kw, kw_one, self.carry_sh = {}, {}, None
    if mesh is not None:
      # Parameters, carry and outputs by their logical names (`tr.step_shardings`): nothing is
      # copied between devices per call, and the carry is donated in place.
      param_sh, carry_sh, _ = jax.tree.unflatten(shardings[1], shardings[0])
      self.carry_sh = carry_sh
      names = ("chunks", "batch", "frames", "height", "width", "channels")
      frames = jax.ShapeDtypeStruct((segment, *shape[1:]), jnp.float32)  # only batch is split
      frames_sh = shard_lib.logical_sharding(names, mesh, rules, frames)
      one_sh = shard_lib.logical_sharding(names[1:], mesh, rules, jax.ShapeDtypeStruct(shape[1:], jnp.float32))
      kw = {"in_shardings": (param_sh, carry_sh, None, None, None), "out_shardings": (carry_sh, (frames_sh, None) if probe else (frames_sh,))}
      kw_one = {"in_shardings": (param_sh, carry_sh, None, None), "out_shardings": (carry_sh, (one_sh, None) if probe else (one_sh,))}
    # Named functions: compilations are logged (and counted by the tests) under these names.
    self.seg = jax.jit(rollout_segment, donate_argnums=(1,), **kw)
    self.one = jax.jit(transition_chunk, donate_argnums=(1,), **kw_one)
    self.recache = jax.jit(lambda params, cache, text: tr.recache(nnx.merge(graphdef, params), lay, cache, text))
    self._fits = set()  # programs whose memory pre-flight passed

  def preflight(self, name: str, setting, *args) -> None:
    """Compiles `self.<name>` for `args` (the executable its calls then use: no second compile)
    and stops with `asvd.OutOfMemoryError` if it cannot fit in the free memory
    (`setting`: see `asvd.memory.check`). Once per program."""
    if setting is False or name in self._fits:
      return
    compiled = getattr(self, name).lower(*args).compile()
    hint = "use model.dtype=bfloat16, a smaller rollout.latent_hw or rollout.batch_size, or a mesh over more devices (config.mesh)"
    memory.check(compiled, "the rollout transition", setting=setting, hint=hint)
    self._fits.add(name)

  def switch(self, params, carry, text):
    """A prompt switch: new text K/V (and, if configured, the window re-encoded under it)."""
    state, cache = carry
    if self.recache_on_switch:
      return state, self.recache(params, cache, text)
    return state, cache.replace(text=text)


# Compiled programs of this process, most recently used last (bounded: each holds executables).
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_MAX_PROGRAMS = 16


def _get_program(graphdef, lay, segment, shape, mesh, rules, shardings, probe, recache_on_switch) -> _Program:
  key = (graphdef, lay, segment, shape, mesh, rules, shardings, probe, recache_on_switch)
  prog = _PROGRAMS.pop(key, None)
  if prog is None:
    prog = _Program(graphdef, lay, segment, shape, mesh, rules, shardings, probe=probe, recache_on_switch=recache_on_switch)
  _PROGRAMS[key] = prog
  while len(_PROGRAMS) > _MAX_PROGRAMS:
    _PROGRAMS.popitem(last=False)
  return prog


def _program(model, context, config, sampler_config, latent_hw, segment, mesh=None, rules=None):
  """`(program, params, initial carry)` for this model and config (the program is cached).

  With a mesh, the parameters are put on their shards (free when `asvd.sharding.shard_model`
  already did it; else a copy per call) and checked (`check_sharded`)."""
  lay = tr.make_layout(config, model.cfg, latent_hw, sampler_config)
  graphdef, params = nnx.split(model)
  if mesh is not None:
    params = shard_lib.place_params(params, mesh, rules)
    context = shard_lib.place(context, ("batch", "text", "channels"), mesh, rules)
  carry = tr.initial_carry(nnx.merge(graphdef, params), context, lay, mesh, rules)
  shape = tr.noise_shape(lay, carry[0].shape[0], model.cfg.in_channels)
  shardings = tr.step_shardings(params, carry, shape, mesh, rules)
  prog = _get_program(
    graphdef,
    lay,
    segment,
    shape,
    mesh,
    shard_lib.rules_key(rules),
    shardings,
    bool(config.get("probe", False)),
    bool(config.get("recache_on_switch", False)),
  )
  return prog, params, carry


def _own(carry, prog=None):
  """A private copy of a caller's carry, so that donating it never deletes the caller's arrays
  (moved to the program's shardings when it has a mesh)."""
  if prog is not None and prog.carry_sh is not None:
    return jax.device_put(carry, prog.carry_sh, may_alias=False)
  return jax.tree.map(jnp.copy, carry)


def _check_context(model, context):
  context = context if isinstance(context, jax.Array) else np.asarray(context)  # host stays host
  if context.ndim != 3 or context.shape[-1] != model.cfg.text_dim:
    raise UsageError(f"context must be [B, L, {model.cfg.text_dim}], got shape {tuple(context.shape)}")
  return context


def _switch_schedule(model, prompts, num_chunks=None, prog=None):
  """`{chunk index: TextKV}` from a sequence of (chunk index, context), placed like the cache's
  text K/V when the program has a mesh."""
  out = {}
  for c, ctx in prompts or ():
    if int(c) < 0 or (num_chunks is not None and int(c) >= num_chunks):
      raise UsageError(f"prompt switch at chunk {c} is outside 0..{num_chunks}")
    out[int(c)] = tr.text_kv(model, ctx)
    if prog is not None and prog.carry_sh is not None:
      out[int(c)] = jax.device_put(out[int(c)], prog.carry_sh[1].text)
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
  rules=None,
  memory_check: bool | float = True,
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
    mesh: optional `jax.sharding.Mesh` (`asvd.sharding.mesh_from_config`). Parameters are put
      on their shards (call `asvd.sharding.shard_model(model, mesh)` once, so that no call
      copies them), the carry is sharded by its logical axes (batch over `data`/`fsdp`, heads
      over `tensor`), and the residual stream is pinned inside the program.
    rules: logical-to-mesh rules (default `asvd.sharding.DEFAULT_RULES`).
    memory_check: before the first chunk, the program is compiled and checked against the
      free memory (`asvd.memory`): True, a cap in GiB, or False (no check). A program that
      cannot fit raises `asvd.OutOfMemoryError` instead of running out mid-way.

  Returns:
    `(latents [B, num_chunks*F, H, W, C], final_carry)` and, when `config.probe` is set, a third
    element: the attention share `[num_chunks, L, B, N + Fz]` of the last denoising step
    (slots first: anchor, window frames, then the jointly denoised frames).
  """
  if num_chunks < 1:
    raise UsageError(f"num_chunks={num_chunks} must be >= 1")
  memory_check = memory.check_setting(memory_check)
  context = _check_context(model, context)
  segment = int(config.get("scan_chunks", 8))
  if segment < 1:
    raise UsageError(f"rollout.scan_chunks={segment} must be >= 1")
  prog, params, init = _program(model, context, config, sampler_config, latent_hw, segment, mesh, rules)
  tr.check_absolute(prog.lay, start_chunk, num_chunks)
  carry = init if carry is None else _own(carry, prog)
  switches = _switch_schedule(model, prompts, start_chunk + num_chunks, prog)
  key = _key(key, mesh)
  frames, shares = [], []
  c, end = start_chunk, start_chunk + num_chunks
  while c < end:
    if c in switches:
      carry = prog.switch(params, carry, switches[c])
    nxt = min([s for s in switches if s > c] + [end])
    live = min(segment, nxt - c)
    prog.preflight("seg", memory_check, params, carry, key, np.int32(c), np.int32(live))
    carry, ys = prog.seg(params, carry, key, np.int32(c), np.int32(live))  # host scalars
    # Static slices (`x[:live]` would send an index array from the default device).
    frames.append(jax.lax.slice_in_dim(ys[0], 0, live))
    if prog.probe:
      shares.append(jax.lax.slice_in_dim(ys[1], 0, live))
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
  mesh=None,
  rules=None,
  memory_check: bool | float = True,
) -> Stream:
  """Yields each chunk's latents `[B, F, H, W, C]` for as long as the caller iterates.

  Same key -> the same latents as `rollout`. `prompts` switches prompts as in `rollout`;
  `num_chunks` optionally stops the generator; `carry`/`start_chunk` resume (or start from a
  `prefill`ed cache). Every check (config, context, the absolute preset's length) runs here,
  before the first chunk. The returned iterator's `.carry` is the `(state, cache)` after the
  chunks drawn so far (a copy of your own), and `.next_chunk` the index of the next one, so a
  stream can be resumed with `stream(..., carry=s.carry, start_chunk=s.next_chunk)`.
  `mesh`/`rules` shard as in `rollout`; `memory_check` checks the program against the free
  memory as in `rollout` (when the first chunk is drawn, before it runs).
  """
  memory_check = memory.check_setting(memory_check)
  context = _check_context(model, context)
  prog, params, init = _program(model, context, config, sampler_config, latent_hw, 1, mesh, rules)
  tr.check_absolute(prog.lay, start_chunk, num_chunks)
  switches = _switch_schedule(model, prompts, None, prog)
  carry = init if carry is None else _own(carry, prog)
  return Stream(prog, params, carry, switches, _key(key, mesh), start_chunk, num_chunks, memory_check)


class Stream(Iterator[jax.Array]):
  """The iterator `stream` returns: one transition per `next()`."""

  def __init__(self, prog, params, carry, switches, key, start_chunk, num_chunks, memory_check=True):
    self._prog, self._params, self._carry = prog, params, carry
    self._memory_check = memory_check
    self._switches, self._key = switches, key
    self.next_chunk = start_chunk
    self._end = None if num_chunks is None else start_chunk + num_chunks

  @property
  def carry(self):
    """`(state, cache)` after the chunks drawn so far; a copy, so it stays valid."""
    return _own(self._carry)

  def __next__(self) -> jax.Array:
    c = self.next_chunk
    if self._end is not None and c >= self._end:
      raise StopIteration
    tr.check_absolute(self._prog.lay, c, 1)  # an endless stream of the absolute preset stops here
    if c in self._switches:
      self._carry = self._prog.switch(self._params, self._carry, self._switches[c])
    self._prog.preflight("one", self._memory_check, self._params, self._carry, self._key, np.int32(c))
    self._carry, ys = self._prog.one(self._params, self._carry, self._key, np.int32(c))
    self.next_chunk = c + 1
    return ys[0]


@functools.lru_cache(maxsize=16)
def _prefill_write(graphdef, lay: tr.Layout):
  def prefill_write(params, state, cache, x, key):
    return tr.write_given(nnx.merge(graphdef, params), lay, state, cache, x, key)

  return jax.jit(prefill_write)


def prefill(model: WanDiT, context, latents, *, config, sampler_config=None, carry=None, key=None):
  """Conditions a rollout on given clean latents (image- or video-to-video continuation).

  The frames are written into the cache exactly as generated frames would be: chunk by chunk
  (groups of `F`, the remainder as a smaller group), each by the clean re-run at the context
  timestep. In `adaptive` mode the last given frame also starts the state (what the causal
  initialisation's default `train.state_init_target="own_last_frame"` trains a chunk to emit);
  in `sink` mode
  the first given frames become the sink. Pass the returned carry to `rollout(carry=...)` or
  `stream(carry=...)`.

  Args:
    model: the `WanDiT`.
    context: text embeddings `[B, L, text_dim]`.
    latents: clean (VAE-normalised) latents `[B, n, H, W, C]`, e.g. `vae.encode(image)`.
    config: the `rollout` section.
    sampler_config: the `sampler` section.
    carry: continue from this carry instead of an empty cache.
    key: noise for the clean re-run when it is noised (`sampler.context_timestep > 0` or
      `sampler.context_sigma="table"`); default `jax.random.key(0)`.

  Returns:
    `(state, cache)`.
  """
  context = _check_context(model, context)
  latents = jnp.asarray(latents, jnp.float32)
  if latents.ndim != 5:
    raise UsageError(f"conditioning latents must be [B, n, H, W, C], got shape {latents.shape}")
  lay = tr.make_layout(config, model.cfg, latents.shape[2:4], sampler_config)
  n, f = latents.shape[1], lay.chunk_frames
  if lay.absolute and n % f:
    raise UsageError(f"the absolute preset prefills whole chunks: {n} frames is not a multiple of F={f}")
  state, cache = tr.initial_carry(model, context, lay) if carry is None else carry
  graphdef, params = nnx.split(model)
  key = jax.random.key(0) if key is None else _key(key)
  for start, g in tr.given_groups(n, f):  # whole chunks share one compile, a remainder one more
    write = _prefill_write(graphdef, dataclasses.replace(lay, chunk_frames=g))
    state, cache = write(params, state, cache, latents[:, start : start + g], jax.random.fold_in(key, start))
  return state, cache


__all__ = ["rollout", "stream", "Stream", "prefill", "chunk_noise"]


