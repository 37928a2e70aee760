"""Where a PanWorld model's look is lost: contrast and sharpness at each stage of the recipe.

A video that fades to flat colour can come from the teacher's own samples, from the few-step
sampler a student uses, or from the rollout feeding its own blurred frames back as context. Each
function here measures one of these on the evaluation captions, relative to real clips of the
same caption (`asvd.eval.motion.frame_contrast` / `frame_sharpness`, 1 = the data's):

* `teacher_look`: the teacher's samples of `H` frames from noise, by its ODE (Euler, CFG in
  Self-Forcing's form, as the causal init draws them) or by the student's few-step sampler
  (predict `x0`, re-noise with fresh noise) run on the whole clip at once;
* `rollout_look`: a causal student's rollout, per chunk (chunk 0 has no context at all).

Every value is per video (caption x seed); `asvd.eval.stats.bootstrap` turns them into intervals.
`benchmarks/fade_stages.py` runs them over a recipe's checkpoints and writes the table.
"""

from __future__ import annotations

import numpy as np

from asvd.data import panworld
from asvd.eval import motion


def _refs(config, prompts, seed: int = 0):
  from asvd.models import pixel_codec  # noqa: PLC0415

  codec = pixel_codec.from_config(config)
  hgt, wid = (int(n) * codec.patch for n in config.rollout.latent_hw)
  look = panworld.world(config)
  h = int(config.train.horizon_frames)
  return codec, [motion.Reference.of_caption(p, h, hgt, wid, seed=seed, **look) for p in prompts]


def _look(codec, refs, lat) -> dict[str, np.ndarray]:
  """`{"contrast", "sharpness"}`: float `[B, T]` per frame, relative to each caption's real clips."""
  vids = codec.to_uint8(np.asarray(lat))
  return {
    "contrast": np.stack([motion.frame_contrast(v) / r.contrast for v, r in zip(vids, refs, strict=True)]),
    "sharpness": np.stack([motion.frame_sharpness(v) / r.sharpness for v, r in zip(vids, refs, strict=True)]),
  }


def ode_sample(predict, text, uncond, x, sigmas, cfg_scale: float):
  """Euler steps of the flow ODE from `x` at `sigmas[0]` down to `sigmas[-1]` (CFG:
  `cond + s (cond - uncond)`; `s = 0` is the plain conditional flow)."""
  import jax.numpy as jnp  # noqa: PLC0415

  b, f = x.shape[:2]
  for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
    t = jnp.full((b, f), 1000.0 * float(s), jnp.float32)
    v = jnp.asarray(predict(x, t, text), jnp.float32)
    if cfg_scale:
      v = v + cfg_scale * (v - jnp.asarray(predict(x, t, uncond), jnp.float32))
    x = x + (float(s_next) - float(s)) * v
  return x


def few_step_sample(predict, text, noise, sigmas):
  """The student's sampler on a whole clip: `x0 = x - sigma v`, then re-noised to the next sigma
  with fresh noise (`noise [steps, B, F, ...]`, slice 0 the start). Returns the last `x0`."""
  import jax.numpy as jnp  # noqa: PLC0415

  x = noise[0]
  b, f = x.shape[:2]
  x0 = x
  for i, s in enumerate(sigmas):
    t = jnp.full((b, f), 1000.0 * float(s), jnp.float32)
    x0 = x - float(s) * jnp.asarray(predict(x, t, text), jnp.float32)
    if i + 1 < len(sigmas):
      x = (1.0 - float(sigmas[i + 1])) * x0 + float(sigmas[i + 1]) * noise[i + 1]
  return x0


def teacher_look(predict, config, prompts, seeds, *, method: str = "ode", steps: int | None = None, cfg_scale: float | None = None) -> dict[str, np.ndarray]:
  """The look of a teacher's own samples of `H` frames.

  Args:
    predict: `(x [B, F, h, w, C], t [B, F], text [B, L, D]) -> flow`, e.g. a `WanDiT`.
    config: the PanWorld config (`train.causal_init.ode_steps` / `ode_cfg_scale` by default).
    prompts: captions of the grammar.
    seeds: one sample per caption and seed.
    method: `"ode"` (Euler, shifted-uniform sigmas as `asvd.train.steps.ode_grid`) or
      `"few_step"` (the student's sigmas, `sampler`).
    steps: Euler steps (default `ode_steps`).
    cfg_scale: CFG scale (default `ode_cfg_scale`; `few_step` runs the conditional flow).

  Returns:
    `{"contrast", "sharpness"}`: float `[videos, H]`, seed-major.
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from asvd import sampler  # noqa: PLC0415

  if method not in ("ode", "few_step"):
    raise ValueError(f"method={method!r}: choose 'ode' or 'few_step'")
  codec, refs = _refs(config, prompts)
  c = config.train.causal_init
  steps = int(c.ode_steps) if steps is None else int(steps)
  cfg_scale = float(c.ode_cfg_scale) if cfg_scale is None else float(cfg_scale)
  text = jnp.asarray(panworld.embed_prompts(config, list(prompts)))
  frames, hw = int(config.train.horizon_frames), tuple(int(n) for n in config.rollout.latent_hw)
  shape = (len(prompts), frames, *hw, codec.latent_channels)
  shift = float(config.sampler.shift)
  out = {"contrast": [], "sharpness": []}
  for seed in seeds:
    key = jax.random.key(int(seed))
    if method == "ode":
      u = np.linspace(1.0, 0.0, steps + 1)
      sig = shift * u / (1.0 + (shift - 1.0) * u)
      lat = ode_sample(predict, text, jnp.zeros_like(text), jax.random.normal(key, shape), sig, cfg_scale)
    else:
      _, sig = sampler.step_sigmas(config.sampler)
      lat = few_step_sample(predict, text, jax.random.normal(key, (len(sig), *shape)), sig)
    for k, v in _look(codec, refs, lat).items():
      out[k].append(v)
  return {k: np.concatenate(v) for k, v in out.items()}


def rollout_look(model, config, prompts, seeds, *, chunks: int) -> dict[str, np.ndarray]:
  """The look of a causal student's rollouts, per chunk.

  Returns:
    `{"contrast", "sharpness"}`: float `[videos, chunks]` (mean over each chunk's frames),
    seed-major.
  """
  import jax  # noqa: PLC0415

  import asvd  # noqa: PLC0415

  codec, refs = _refs(config, prompts)
  text = panworld.embed_prompts(config, list(prompts))
  f = int(config.rollout.chunk_frames)
  out = {"contrast": [], "sharpness": []}
  for seed in seeds:
    lat, _ = asvd.rollout(model, text, jax.random.key(int(seed)), num_chunks=chunks, config=config.rollout, sampler_config=config.sampler, memory_check=False)
    for k, v in _look(codec, refs, lat).items():
      out[k].append(v.reshape(v.shape[0], chunks, f).mean(-1))
  return {k: np.concatenate(v) for k, v in out.items()}
