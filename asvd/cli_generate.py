"""`asvd generate`, `asvd decode` and `asvd eval attention`: streaming generation from the shell.

Every check that can fail runs before anything is loaded or compiled: flags, config keys, the
output folder (created, probed for writing, and never overwriting a file asvd did not write),
the attention backend on this platform, input files. What each command writes is listed in
the README ("Output files").
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

from asvd.errors import UsageError

MAX_SEED = 2**32 - 1
DEFAULT_CHUNKS = 7  # --chunks without a bundled model
PIXEL_VIEW_UPSCALE = 8  # pixel-space (PanWorld) video.mp4: 32 -> 256 pixels, nearest neighbour


def _int_at_least(lo: int, hi: int | None = None):
  def parse(text: str) -> int:
    try:
      v = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < lo or (hi is not None and v > hi):
      raise argparse.ArgumentTypeError(f"{v} is out of range: use {lo}..{hi}" if hi is not None else f"{v} must be >= {lo}")
    return v

  return parse


def add_commands(sub) -> None:
  g = sub.add_parser("generate", help="text-to-video from real weights, or stream latents from a DiT alone")
  _common(g)
  g.add_argument("--prompt", default=None, help="text prompt (with --weights; or a caption of the grammar with configs/panworld.py)")
  g.add_argument("--weights", default=None, help="Wan2.1-T2V-1.3B folder: VAE, umT5, tokenizer (+ the DiT or --checkpoint)")
  cond = g.add_mutually_exclusive_group()
  cond.add_argument("--image", default=None, help="condition on this image (image-to-video)")
  cond.add_argument("--video", default=None, help="continue this video (its last 1+4k frames)")
  g.add_argument("--vae", default=None, help="decoder for video.mp4 when generating from a DiT alone: a Wan VAE (file or folder) or TAEHV (taew2_1.pth)")
  g.add_argument("--decoder", choices=["wan", "taehv"], default="wan", help="with --weights: the Wan VAE, or TAEHV (taew2_1.pth in the weights folder; fast)")
  g.add_argument("--fps", type=_int_at_least(1, 240), default=None, help="mp4 frame rate (default config.pipeline.fps = 16)")
  from asvd import bundled, distributed  # noqa: PLC0415

  g.add_argument("--bundled", choices=bundled.MODES, default=None, help="run a bundled PanWorld model (the default, adaptive, when no --config/--weights is given)")

  distributed.add_flags(g)
  g.set_defaults(func=cmd_generate)

  d = sub.add_parser("decode", help="latents.npy -> video.mp4 with a Wan VAE, or a quick preview without one")
  d.add_argument("latents", help=".npy latents [B, F, h, w, C] or [F, h, w, C] (what `asvd generate` writes)")
  src = d.add_mutually_exclusive_group(required=True)
  src.add_argument("--vae", default=None, help="Wan VAE (Wan2.1_VAE.pth, a diffusers vae/ folder or a Wan2.1 folder) or TAEHV (taew2_1.pth)")
  src.add_argument("--preview", action="store_true", help="no VAE: a fixed linear latent->RGB projection (preview.mp4)")
  d.add_argument("--config", default=None, help="configs/X.py[:arg] whose pipeline.vae names a non-default VAE architecture")
  d.add_argument("--fps", type=_int_at_least(1, 240), default=None, help="frame rate (default config.pipeline.fps = 16)")
  d.add_argument("--out", required=True, help="output folder")
  d.set_defaults(func=cmd_decode)

  e = sub.add_parser("eval", help="evaluation tools")
  esub = e.add_subparsers(dest="what", required=True)
  a = esub.add_parser("attention", help="plot the attention share per cache slot group (PNG + JSON)")
  _common(a)
  a.set_defaults(func=cmd_eval_attention)
  m = esub.add_parser("motion", help="PanWorld: look, camera speed, freezing, rewinds and the anchor test per anchor mode, with 95% intervals (tables + plots)")
  _panworld_eval_flags(m, "out/panworld-eval")
  m.add_argument("--multiples", default="1,2.4,6", help="multiples of the training horizon to measure at (default 1,2.4,6)")
  m.add_argument("--anchor-test", default=None, metavar="AT,AFTER", help="the anchor test: replace the anchor after chunk AT, measure AFTER chunks (default: after two horizons, one horizon)")
  m.set_defaults(func=cmd_eval_motion)
  d = esub.add_parser("dose", help="PanWorld: speed, look and similarity to frame 0 against the anchor's attention share, swept by rollout.anchor_bias")
  _panworld_eval_flags(d, "out/panworld-dose", modes="adaptive,sink")
  d.add_argument("--biases", default="-4,-2,0,2,4", help="logit biases on the anchor slots' keys (rollout.anchor_bias; default -4,-2,0,2,4)")
  d.add_argument("--multiple", type=float, default=6.0, help="the segment measured: the horizon ending at this multiple of it (default 6)")
  d.set_defaults(func=cmd_eval_dose)


def _panworld_eval_flags(p, out: str, modes: str | None = None) -> None:
  from asvd import bundled  # noqa: PLC0415

  p.add_argument("--models", default=None, help="a folder with one checkpoint per mode (<mode>/, e.g. the workdirs' dmd/model copied there; default: the bundled models)")
  p.add_argument("--modes", default=modes or ",".join(bundled.MODES), help=f"comma-separated anchor modes to evaluate (default: {modes or 'all four'})")
  p.add_argument("--config", default=None, help=f"the models' config (default {bundled.CONFIG}); --config.a.b=v overrides")
  p.add_argument("--prompts", type=_int_at_least(1, 8), default=8, help="how many of the eight evaluation captions (default 8)")
  p.add_argument("--seed", type=_int_at_least(0, MAX_SEED), default=0, help="the first rollout seed")
  p.add_argument("--seeds", type=_int_at_least(1, 100), default=3, help="seeds per caption (seed, seed+1, ...; default 3): the videos every interval is taken over")
  p.add_argument("--out", default=out, help=f"output folder (default {out})")


def _common(p) -> None:
  p.add_argument("--config", default=None, help="configs/X.py[:arg] (default with --weights: configs/wan_t2v_1_3b.py); override keys with --config.a.b=v")
  w = p.add_mutually_exclusive_group()
  w.add_argument("--checkpoint", default=None, help="DiT checkpoint (diffusers / Wan / Self-Forcing .pt / asvd)")
  w.add_argument("--init", choices=["random"], default=None, help="random weights (smoke runs)")
  p.add_argument("--chunks", type=_int_at_least(1), default=None, help="chunks to generate, F latent frames each (default 7 = DEFAULT_CHUNKS; bundled models: 6x the training horizon)")
  p.add_argument("--seed", type=_int_at_least(0, MAX_SEED), default=0, help=f"random seed, 0..{MAX_SEED}")
  p.add_argument("--context", default=None, help=".npy text embeddings [B, L, text_dim] (default: random)")
  p.add_argument("--out", default=None, help="output folder (bundled models: default out/panworld)")


# ------------------------------------------------------------------------------------------------
# Shared checks (all before any load or compile).
# ------------------------------------------------------------------------------------------------


def _load_config(spec, overrides):
  import asvd  # noqa: PLC0415

  cfg = asvd.load_config(spec, overrides)
  fps = cfg.pipeline.get("fps", 16)
  if not isinstance(fps, int) or fps < 1:
    raise UsageError(f"config pipeline.fps={fps!r} must be an integer >= 1")
  from asvd.pipeline import decode_cache_dtype  # noqa: PLC0415

  decode_cache_dtype(cfg)  # a bad value stops here, before any weights load
  from asvd import memory  # noqa: PLC0415

  memory.setting(cfg)
  _runtime(cfg)
  return cfg


def _runtime(cfg) -> None:
  """Process-wide settings from `config.runtime` (the persistent compilation cache)."""
  folder = cfg.get("runtime", {}).get("compilation_cache_dir", "")
  if folder:
    import jax  # noqa: PLC0415

    folder = os.path.abspath(os.path.expanduser(folder))
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def print_bf16_hint(cfg) -> None:
  """`host.bf16_hint` for this process (after any distributed start: it asks for the backend)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from asvd import host  # noqa: PLC0415

  line = host.bf16_hint(jnp.dtype(cfg.model.get("dtype", "float32")).name, jax.default_backend(), host.cpu_flags())
  if line and jax.process_index() == 0:
    print(line, file=sys.stderr)


def _check_model_config(cfg, overrides, checkpoint):
  """The DiT config as far as it can be known without loading: the compute backend, and no
  architecture override that a checkpoint would silently ignore."""
  from asvd.models import attention  # noqa: PLC0415
  from asvd.models.dit import DiTConfig  # noqa: PLC0415

  compute_keys = DiTConfig.COMPUTE_FIELDS
  attention.check_available(cfg.model.attention)
  if checkpoint:
    ignored = [o.split("=")[0] for o in overrides if o.startswith("--config.model.") and o.split("=")[0].split(".")[-1] not in (*compute_keys, "dtype", "param_dtype")]
    if ignored:
      raise UsageError(f"{', '.join(ignored)}: the checkpoint defines the architecture; only model.{{{', '.join(compute_keys)}, dtype}} apply with --checkpoint")


def _load_dit(cfg, checkpoint, seed):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  import asvd  # noqa: PLC0415

  if checkpoint:
    from asvd.models.dit import compute_settings  # noqa: PLC0415

    return asvd.load_dit(checkpoint, dtype=jnp.dtype(cfg.model.dtype), **compute_settings(cfg.model))
  print(f"[asvd] random weights ({cfg.name}): a smoke run, the output is noise-like by design", file=sys.stderr)
  return asvd.init_dit(cfg.model, jax.random.key(seed))


def _check_inputs(args):
  if getattr(args, "checkpoint", None) is not None and not os.path.exists(args.checkpoint):
    raise UsageError(f"--checkpoint {args.checkpoint}: no such file or folder")
  if getattr(args, "context", None) is not None and not os.path.isfile(args.context):
    raise UsageError(f"--context {args.context}: no such file")
  if getattr(args, "vae", None) is not None and not os.path.exists(args.vae):
    raise UsageError(f"--vae {args.vae}: no such file or folder")


def _own_text_path(cfg) -> bool:
  """A config whose text path needs no weights: PanWorld's (pixel space, seeded encoder)."""
  p = cfg.pipeline
  return bool(int(p.get("pixel_patch", 0) or 0)) and p.get("text_encoder") is not None


def _check_prompt(cfg, args) -> None:
  """`--prompt` without `--weights`: a config with its own text path, and a prompt of its grammar."""
  if not _own_text_path(cfg):
    raise UsageError("--prompt needs --weights DIR (the Wan2.1 VAE, umT5 and tokenizer), or a config with its own text path (pipeline.pixel_patch and pipeline.text_encoder, e.g. configs/panworld.py)")
  if args.context is not None:
    raise UsageError("give --prompt or --context, not both")
  from asvd.data import panworld  # noqa: PLC0415

  try:
    panworld.parse_caption(args.prompt)
  except ValueError as e:
    raise UsageError(f"--prompt: {e}") from None


def _context(args, cfg, text_dim, text_len):
  if getattr(args, "prompt", None):
    from asvd.data import panworld  # noqa: PLC0415

    return np.repeat(panworld.embed_prompts(cfg, [args.prompt]), int(cfg.rollout.batch_size), axis=0)
  if args.context is not None:
    try:
      context = np.load(args.context)
    except (OSError, ValueError) as e:
      raise UsageError(f"--context {args.context}: not a readable .npy file ({e})") from e
    if context.ndim == 2:
      context = context[None]
    if context.ndim != 3 or context.shape[-1] != text_dim or context.shape[1] > text_len:
      raise UsageError(f"--context {args.context}: shape {context.shape}, expected [B, L <= {text_len}, {text_dim}]")
    return context.astype(np.float32)
  rng = np.random.default_rng(args.seed)
  return rng.standard_normal((cfg.rollout.batch_size, text_len, text_dim)).astype(np.float32)


def _setup(args, overrides, outputs):
  """Validates everything cheap before any compile; returns (config, output dir, model, context)."""
  from asvd import sharding as shard_lib  # noqa: PLC0415
  from asvd import transition as tr  # noqa: PLC0415
  from asvd.models.dit import DiTConfig  # noqa: PLC0415

  if args.config is None:
    raise UsageError("give --config configs/X.py (or --weights DIR --prompt ...)")
  if args.out is None:
    raise UsageError("give --out DIR (the output folder)")
  args.chunks = DEFAULT_CHUNKS if args.chunks is None else args.chunks
  cfg = _load_config(args.config, overrides)
  if getattr(args, "prompt", None):
    _check_prompt(cfg, args)
  if args.checkpoint is None and args.init is None:
    raise UsageError("give --checkpoint PATH or --init random")
  _check_inputs(args)
  _check_model_config(cfg, overrides, args.checkpoint)
  tr.make_layout(cfg.rollout, DiTConfig.from_config(cfg.model), None, cfg.sampler)  # config errors now
  shard_lib.rules_from_config(cfg.get("mesh", None))  # mesh.rules too (the mesh needs the devices)
  out = _connect_and_open(args, outputs(cfg) if callable(outputs) else outputs)
  print_bf16_hint(cfg)
  model = _load_dit(cfg, args.checkpoint, args.seed)
  tr.make_layout(cfg.rollout, model.cfg, None, cfg.sampler)  # the checkpoint's patch size / RoPE
  return cfg, out, model, _context(args, cfg, model.cfg.text_dim, model.cfg.text_len)


def _connect_and_open(args, outputs):
  """Joins the other processes of a multi-process run (`--coordinator ...`, TPU pods, SLURM:
  asvd.distributed; after every check, before any JAX work) and opens the output folder, on
  process 0 only: the others compute their shards and write nothing. Returns the OutputDir, or
  None on the other processes."""
  from asvd import distributed  # noqa: PLC0415
  from asvd.outputs import OutputDir  # noqa: PLC0415

  if hasattr(args, "distributed"):  # (`eval attention` has no multi-process flags)
    how = distributed.from_args(args)
    if how != "single process":
      import jax  # noqa: PLC0415

      print(f"[asvd] process {jax.process_index()} of {jax.process_count()} ({how}), {jax.device_count()} devices in all", file=sys.stderr)
  return OutputDir(args.out, outputs) if distributed.is_lead() else None


class _Progress:
  """Compilation reported apart, then a tqdm bar whose rate and ETA count generation only
  (silent on every process but 0)."""

  def __init__(self, total: int, desc: str, unit_frames: int):
    from asvd import distributed  # noqa: PLC0415

    self.total, self.desc, self.unit_frames = total, desc, unit_frames
    self.bar, self.t0, self.quiet = None, time.perf_counter(), not distributed.is_lead()
    if not self.quiet:
      print("[asvd] compiling the transition and generating chunk 1 ...", file=sys.stderr, flush=True)

  def tick(self) -> None:
    from tqdm import tqdm  # noqa: PLC0415

    if self.quiet:
      return
    now = time.perf_counter()
    if self.bar is None:
      print(f"[asvd] compiled + chunk 1 in {now - self.t0:.1f} s", file=sys.stderr, flush=True)
      self.bar = tqdm(total=self.total, initial=1, unit="chunk", desc=self.desc, file=sys.stderr)
      self.t1, self.n = now, 1
      return
    self.bar.update(1)
    self.n += 1
    self.bar.set_postfix(fps=f"{(self.n - 1) * self.unit_frames / (now - self.t1):.2f} latent frames/s")

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


# ------------------------------------------------------------------------------------------------
# Commands.
# ------------------------------------------------------------------------------------------------


def cmd_t2v(args, overrides) -> None:
  """`--weights`: prompt -> umT5 -> streaming transition -> streaming VAE -> mp4."""
  from asvd import pipeline, video  # noqa: PLC0415
  from asvd.models.vae import VAEConfig  # noqa: PLC0415

  if not args.prompt:
    raise UsageError("--weights needs --prompt")
  if args.bundled:
    raise UsageError("give --weights or --bundled, not both")
  if args.out is None:
    raise UsageError("give --out DIR (the output folder)")
  args.chunks = DEFAULT_CHUNKS if args.chunks is None else args.chunks
  cfg = _load_config(args.config or "configs/wan_t2v_1_3b.py", overrides)
  _check_inputs(args)
  _check_model_config(cfg, overrides, True)
  pipeline.find_weights(args.weights, args.checkpoint)  # every missing file listed, before loading
  if args.decoder == "taehv":
    pipeline.find_taehv(args.weights)
  cond_path = args.image or args.video
  condition = None
  if cond_path:  # read (and fail on a bad file) before loading any weights
    s = VAEConfig.from_any(pipeline.plain_config(cfg.pipeline.get("vae")) or VAEConfig()).spatial_factor
    hw = (cfg.rollout.latent_hw[0] * s, cfg.rollout.latent_hw[1] * s)
    condition = pipeline.read_condition(cond_path, hw)
  out = _connect_and_open(args, ["video.mp4", "generate.json"])
  pipe = pipeline.T2V.from_weights(args.weights, config=cfg, checkpoint=args.checkpoint, decoder=args.decoder)
  prog = _Progress(args.chunks + (1 if condition is not None else 0), "t2v", int(cfg.rollout.chunk_frames))
  frames = pipe.generate(args.prompt, chunks=args.chunks, seed=args.seed, condition=condition)
  try:
    if out is None:  # another process of a multi-process run: its part of each chunk, no file
      for _ in frames:
        pass
      return
    n = video.write_mp4(frames, out.path("video.mp4"), fps=args.fps or int(cfg.pipeline.fps), on_chunk=lambda _: prog.tick())
  finally:
    prog.close()
  out.write_json("generate.json", {"prompt": args.prompt, "weights": args.weights, "checkpoint": args.checkpoint, "config": args.config, "overrides": overrides, "seed": args.seed, "frames": n, "decoder": args.decoder})
  print(f"wrote {out.path('video.mp4')} ({n} frames) and generate.json")


def cmd_generate(args, overrides) -> None:

  import asvd  # noqa: PLC0415
  from asvd import distributed, memory, pipeline, video  # noqa: PLC0415
  from asvd import sharding as shard_lib  # noqa: PLC0415

  if args.weights:
    return cmd_t2v(args, overrides)
  overrides = _bundled_defaults(args, overrides)

  def pixels(cfg):  # pixel-space configs (PanWorld) decode exactly, without a VAE
    return int(cfg.pipeline.get("pixel_patch", 0) or 0) if not args.vae else 0

  def video_name(cfg):
    return "video.mp4" if args.vae or pixels(cfg) else "preview.mp4"

  def names(cfg):
    return ["latents.npy", "generate.json", video_name(cfg)] + (["frames.png"] if pixels(cfg) else [])

  cfg, out, model, context = _setup(args, overrides, names)
  mp4 = video_name(cfg)
  fps = args.fps or int(cfg.pipeline.fps)
  vae = None
  if args.vae and out is not None:  # (only process 0 decodes and writes)
    vae = pipeline.load_decoder(args.vae, config=cfg)
  elif pixels(cfg):
    from asvd.models import pixel_codec  # noqa: PLC0415

    vae = pixel_codec.from_config(cfg)
  f = int(cfg.rollout.chunk_frames)
  if vae is not None:  # the decoder's pre-flight, before the DiT's work (pixel codecs: nothing to check)
    shape = (int(np.shape(context)[0]), f, *cfg.rollout.latent_hw, int(model.cfg.out_channels))
    pipeline.check_decoder_memory(vae, shape, cache_dtype=pipeline.decode_cache_dtype(cfg), setting=memory.setting(cfg))
  chunks = []
  prog = _Progress(args.chunks, "generate", f)

  def generated():
    mesh, rules = shard_lib.from_config(cfg)
    check = memory.setting(cfg)
    for lat in asvd.stream(model, context, args.seed, config=cfg.rollout, sampler_config=cfg.sampler, num_chunks=args.chunks, mesh=mesh, rules=rules, memory_check=check):
      lat = distributed.to_host(lat)  # the whole chunk (gathered from every process's shards)
      chunks.append(lat)
      yield lat
      prog.tick()

  try:
    if out is None:  # another process of a multi-process run: its shards of each chunk, no file
      for _ in generated():
        pass
      return
    if vae is not None:
      frames = pipeline.decode_stream(vae, generated(), cache_dtype=pipeline.decode_cache_dtype(cfg))
      if pixels(cfg):  # tiny pixel-space frames: nearest-neighbour upscaled to be watchable
        frames = (video.upscale(c, PIXEL_VIEW_UPSCALE) for c in frames)
      video.write_mp4(frames, out.path(mp4), fps=fps)
    else:
      for _ in generated():
        pass
  finally:
    prog.close()
  latents = np.concatenate(chunks, axis=1)
  path = out.save_npy("latents.npy", latents)
  note = f"{mp4} (decoded by the VAE)" if args.vae else f"{mp4} (pixel space: the exact space-to-depth decode, {PIXEL_VIEW_UPSCALE}x upscaled)"
  if pixels(cfg):
    video.write_contact_sheet(vae.to_uint8(latents[:1])[0], out.path("frames.png"))
    note += " and frames.png (a contact sheet)"
  if vae is None:
    if latents.shape[-1] == video.WAN21_LATENT_RGB.shape[0]:
      # One preview frame per latent frame, so a quarter of the VAE's frame rate keeps the timing.
      video.write_mp4([video.latent_preview(latents[0])], out.path(mp4), fps=max(1, round(fps / 4)))
      note = f"{mp4} (a preview: fixed linear latent->RGB projection, not a VAE decode; `asvd decode --vae` for the real video)"
    else:
      note = f"no preview ({latents.shape[-1]}-channel latents are not Wan2.1 latents)"
  out.write_json("generate.json", {"config": args.config, "overrides": overrides, "seed": args.seed, "checkpoint": args.checkpoint, "prompt": args.prompt, "shape": list(latents.shape), "video": mp4 if (vae is not None or "preview" in note) else None})
  print(f"wrote {path} {latents.shape}, generate.json and {note}")


def _bundled_defaults(args, overrides):
  """No --config (or --bundled MODE): the bundled PanWorld model of that mode (adaptive), the
  default prompt, 6x the training horizon, out/panworld. Returns the overrides to use."""
  from asvd import bundled  # noqa: PLC0415

  if args.config is not None and args.bundled is None:
    return overrides
  if args.bundled is not None and (args.config or args.checkpoint or args.init):
    raise UsageError("--bundled runs a bundled model with its own config: give it without --config, --checkpoint or --init")
  if args.checkpoint or args.init:
    raise UsageError("give --config configs/X.py with --checkpoint/--init (or no flag at all: the bundled PanWorld model)")
  mode = args.bundled or "adaptive"
  args.checkpoint = bundled.model_path(mode)
  args.config = bundled.CONFIG
  overrides = [*overrides, f"--config.rollout.anchor={mode}"]
  if args.prompt is None and args.context is None:
    args.prompt = bundled.DEFAULT_PROMPT
  if args.chunks is None:
    cfg = _load_config(args.config, overrides)
    args.chunks = -(-bundled.HORIZON_MULTIPLE * int(cfg.train.horizon_frames) // int(cfg.rollout.chunk_frames))
  if args.out is None:
    args.out = "out/panworld"
  print(f"[asvd] bundled PanWorld model ({mode}): {args.prompt!r}, {args.chunks} chunks", file=sys.stderr)
  return overrides


def cmd_decode(args, overrides) -> None:
  from asvd import pipeline, video  # noqa: PLC0415
  from asvd.outputs import OutputDir  # noqa: PLC0415

  cfg = _load_config(args.config or "configs/wan_t2v_1_3b.py", overrides)
  _check_inputs(args)
  if not os.path.isfile(args.latents):
    raise UsageError(f"{args.latents}: no such file")
  try:
    lat = np.load(args.latents, mmap_mode="r")
  except (OSError, ValueError) as e:
    raise UsageError(f"{args.latents}: not a readable .npy file ({e})") from e
  if lat.ndim == 4:
    lat = lat[None]
  if lat.ndim != 5:
    raise UsageError(f"{args.latents}: shape {lat.shape}, expected latents [B, F, h, w, C] or [F, h, w, C]")
  fps = args.fps or int(cfg.pipeline.fps)
  name = "preview" if args.preview else "video"
  names = [f"{name}.mp4"] if lat.shape[0] == 1 else [f"{name}_{i}.mp4" for i in range(lat.shape[0])]
  out = OutputDir(args.out, names)
  if args.preview:
    for i, n in enumerate(names):
      video.write_mp4([video.latent_preview(lat[i])], out.path(n), fps=max(1, round(fps / 4)))
    print(f"wrote {', '.join(names)} (preview: fixed linear latent->RGB projection, not a VAE decode)")
    return
  vae = pipeline.load_decoder(args.vae, config=cfg)
  if lat.shape[-1] != vae.latent_channels:
    raise UsageError(f"{args.latents}: {lat.shape[-1]} latent channels, the decoder {args.vae} takes {vae.latent_channels}")
  f = int(cfg.rollout.chunk_frames)
  for i, n in enumerate(names):
    chunks = (np.asarray(lat[i : i + 1, s : s + f], np.float32) for s in range(0, lat.shape[1], f))
    frames = video.write_mp4(pipeline.decode_stream(vae, chunks, cache_dtype=pipeline.decode_cache_dtype(cfg)), out.path(n), fps=fps)
    print(f"wrote {out.path(n)} ({frames} frames)")


def _numbers(text: str, flag: str, example: str) -> list[float]:
  """Comma-separated finite numbers of `flag`, or one line naming it."""
  try:
    vals = [float(x) for x in text.split(",")]
  except ValueError:
    vals = []
  if not vals or not all(math.isfinite(v) for v in vals):
    raise UsageError(f"{flag} {text!r}: comma-separated finite numbers, e.g. {example}")
  return vals


def _panworld_models(args, overrides, what: str):
  """The checked modes, `config_for(mode)` and model paths of `asvd eval motion` / `dose`
  (every flag checked before any model loads)."""
  from asvd import bundled  # noqa: PLC0415

  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  bad = [m for m in modes if m not in bundled.MODES]
  if bad or not modes:
    raise UsageError(f"--modes {args.modes!r}: choose from {', '.join(bundled.MODES)}")
  if args.seed + args.seeds - 1 > MAX_SEED:
    raise UsageError(f"--seed {args.seed} --seeds {args.seeds}: the last seed would pass {MAX_SEED}")
  if args.models is not None and not os.path.isdir(args.models):
    raise UsageError(f"--models {args.models}: no such folder")
  if args.models is None:
    paths = {m: bundled.model_path(m) for m in modes}
  else:
    paths = {m: os.path.join(args.models, m) for m in modes}
    missing = [m for m, p in paths.items() if not os.path.isdir(p)]
    if missing:
      raise UsageError(f"--models {args.models}: no checkpoint folder for {', '.join(missing)} (expected {os.path.join(args.models, missing[0])})")
  spec = args.config or bundled.CONFIG

  def config_for(mode, extra=()):
    return _load_config(spec, [*overrides, f"--config.rollout.anchor={mode}", *extra])

  cfg = config_for(modes[0])
  if not _own_text_path(cfg):
    raise UsageError(f"{spec}: eval {what} needs a PanWorld config (pipeline.pixel_patch and pipeline.text_encoder, as configs/panworld.py)")
  return modes, config_for, paths, cfg


def cmd_eval_motion(args, overrides) -> None:
  """`asvd eval motion`: asvd.eval.report over one model per anchor mode (bundled by default)."""
  from asvd.eval import report  # noqa: PLC0415
  from asvd.outputs import OutputDir  # noqa: PLC0415

  multiples = _numbers(args.multiples, "--multiples", "1,2.4,6")
  if min(multiples) < 1:
    raise UsageError(f"--multiples {args.multiples!r}: each must be >= 1 (a multiple of the training horizon)")
  anchor_at = None
  if args.anchor_test is not None:
    try:
      anchor_at = tuple(int(x) for x in args.anchor_test.split(","))
    except ValueError:
      anchor_at = ()
    if len(anchor_at) != 2 or min(anchor_at) < 1:
      raise UsageError(f"--anchor-test {args.anchor_test!r}: two whole numbers >= 1, AT,AFTER (e.g. 6,3)")
  modes, config_for, paths, cfg = _panworld_models(args, overrides, "motion")
  out = OutputDir(args.out, report.output_files(modes))
  models = {m: _load_dit(cfg, p, args.seed) for m, p in paths.items()}
  seeds = range(args.seed, args.seed + args.seeds)
  result = report.evaluate(models, config_for, report.PROMPTS[: args.prompts], out, multiples=multiples, seeds=seeds, anchor_test_at=anchor_at)
  print(report.markdown(result))
  print(f"wrote {out.path('eval.md')}, eval.json and the plots in {args.out}")


def cmd_eval_dose(args, overrides) -> None:
  """`asvd eval dose`: asvd.eval.dose, the anchor-bias sweep."""
  from asvd.eval import dose, report  # noqa: PLC0415
  from asvd.outputs import OutputDir  # noqa: PLC0415

  biases = _numbers(args.biases, "--biases", "-4,-2,0,2,4")
  if not math.isfinite(args.multiple) or args.multiple < 1:
    raise UsageError(f"--multiple {args.multiple}: a finite multiple of the training horizon, >= 1")
  if "none" in [m.strip() for m in args.modes.split(",")]:
    raise UsageError(f"--modes {args.modes!r}: none has no anchor to bias; choose from adaptive, sink, ema")
  modes, config_for, paths, cfg = _panworld_models(args, overrides, "dose")
  out = OutputDir(args.out, dose.OUTPUT_FILES)
  models = {m: _load_dit(cfg, p, args.seed) for m, p in paths.items()}
  seeds = range(args.seed, args.seed + args.seeds)
  result = dose.sweep(models, config_for, report.PROMPTS[: args.prompts], out, biases=biases, multiple=args.multiple, seeds=seeds)
  print(dose.markdown(result))
  print(f"wrote {out.path('dose.md')}, dose.json and dose.png in {args.out}")


def cmd_eval_attention(args, overrides) -> None:
  import jax  # noqa: PLC0415

  from asvd import memory  # noqa: PLC0415
  from asvd.eval import attention  # noqa: PLC0415

  cfg, out, model, context = _setup(args, overrides, ["attention_share.png", "attention_share.json"])
  _, groups = attention.attention_shares(model, context, jax.random.key(args.seed), num_chunks=args.chunks, config=cfg.rollout, sampler_config=cfg.sampler, memory_check=memory.setting(cfg))
  title = f"{cfg.name}: anchor={cfg.rollout.anchor}" + (" (random weights)" if args.init == "random" else "")
  png = attention.plot_attention_shares(groups, out.path("attention_share.png"), title)
  out.write_json("attention_share.json", {k: np.asarray(v).tolist() for k, v in groups.items()})
  print(f"wrote {png} and attention_share.json")
