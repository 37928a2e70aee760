"""`asvd generate` and `asvd eval attention`: streaming generation from the command line."""

from __future__ import annotations

import json
import os
import time

import numpy as np


def add_commands(sub) -> None:
  g = sub.add_parser("generate", help="text-to-video from real weights, or stream latents from a DiT alone")
  _common(g)
  g.add_argument("--prompt", default=None, help="text prompt (with --weights)")
  g.add_argument("--weights", default=None, help="Wan2.1-T2V-1.3B folder: VAE, umT5, tokenizer (+ the DiT or --checkpoint)")
  cond = g.add_mutually_exclusive_group()
  cond.add_argument("--image", default=None, help="condition on this image (image-to-video)")
  cond.add_argument("--video", default=None, help="continue this video (its last 1+4k frames)")
  g.add_argument("--vae", default=None, help="Wan VAE to decode an mp4 when generating from a DiT alone")
  g.add_argument("--fps", type=int, default=None, help="mp4 frame rate (default config.pipeline.fps = 16)")
  g.set_defaults(func=cmd_generate)

  e = sub.add_parser("eval", help="evaluation tools")
  esub = e.add_subparsers(dest="what", required=True)
  a = esub.add_parser("attention", help="plot the attention share per cache slot group (PNG + JSON)")
  _common(a)
  a.set_defaults(func=cmd_eval_attention)


def _common(p) -> None:
  p.add_argument("--config", default=None, help="configs/X.py[:arg] (default with --weights: configs/wan_t2v_1_3b.py); override keys with --config.a.b=v")
  w = p.add_mutually_exclusive_group()
  w.add_argument("--checkpoint", default=None, help="DiT checkpoint (diffusers / Wan / Self-Forcing .pt / asvd)")
  w.add_argument("--init", choices=["random"], default=None, help="random weights (smoke runs)")
  p.add_argument("--chunks", type=int, default=7, help="chunks to generate (F latent frames each)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--context", default=None, help=".npy text embeddings [B, L, text_dim] (default: random)")
  p.add_argument("--out", required=True, help="output folder")


def _setup(args, overrides):
  """Validates everything cheap before any compile; returns (config, model, context)."""
  import jax  # noqa: PLC0415

  import asvd  # noqa: PLC0415
  from asvd import transition as tr  # noqa: PLC0415

  cfg = asvd.load_config(args.config, overrides)
  if args.chunks < 1:
    raise ValueError(f"--chunks={args.chunks} must be >= 1")
  if args.checkpoint is None and args.init is None:
    raise ValueError("give --checkpoint PATH or --init random")
  if args.checkpoint is not None and not os.path.exists(args.checkpoint):
    raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file or folder")
  if args.context is not None and not os.path.isfile(args.context):
    raise FileNotFoundError(f"--context {args.context}: no such file")
  from asvd.models.dit import DiTConfig  # noqa: PLC0415

  tr.make_layout(cfg.rollout, DiTConfig.from_config(cfg.model), None, cfg.sampler)  # config errors now
  if args.checkpoint:
    import jax.numpy as jnp  # noqa: PLC0415

    model = asvd.load_dit(args.checkpoint, dtype=jnp.dtype(cfg.model.dtype))
  else:
    print(f"[asvd] random weights ({cfg.name}): a smoke run, the output is noise-like by design")
    model = asvd.init_dit(cfg.model, jax.random.key(args.seed))
  if args.context is not None:
    context = np.load(args.context)
    if context.ndim == 2:
      context = context[None]
    if context.shape[-1] != model.cfg.text_dim:
      raise ValueError(f"--context {args.context}: shape {context.shape}, expected [B, L, {model.cfg.text_dim}]")
  else:
    rng = np.random.default_rng(args.seed)
    context = rng.standard_normal((cfg.rollout.batch_size, model.cfg.text_len, model.cfg.text_dim)).astype(np.float32)
  os.makedirs(args.out, exist_ok=True)
  return cfg, model, context


def cmd_t2v(args, overrides) -> None:
  """`--weights`: prompt -> umT5 -> streaming transition -> streaming VAE -> mp4."""
  from tqdm import tqdm  # noqa: PLC0415

  import asvd  # noqa: PLC0415
  from asvd import pipeline  # noqa: PLC0415

  if not args.prompt:
    raise ValueError("--weights needs --prompt")
  if args.chunks < 1:
    raise ValueError(f"--chunks={args.chunks} must be >= 1")
  cfg = asvd.load_config(args.config or "configs/wan_t2v_1_3b.py", overrides)
  pipeline.find_weights(args.weights, args.checkpoint)  # every missing file listed, before loading
  cond_path = args.image or args.video
  if cond_path and not os.path.isfile(cond_path):
    raise FileNotFoundError(f"--{'image' if args.image else 'video'} {cond_path}: no such file")
  os.makedirs(args.out, exist_ok=True)
  pipe = pipeline.T2V.from_weights(args.weights, config=cfg, checkpoint=args.checkpoint)
  condition = None
  if cond_path:
    s = pipe.vae.config.spatial_factor
    hw = (cfg.rollout.latent_hw[0] * s, cfg.rollout.latent_hw[1] * s)
    condition = pipeline.read_condition(cond_path, hw)
  path = os.path.join(args.out, "video.mp4")
  bar = tqdm(total=args.chunks + (1 if condition is not None else 0), unit="chunk", desc="t2v")
  t0 = time.perf_counter()
  n = pipeline.write_mp4(
    pipe.generate(args.prompt, chunks=args.chunks, seed=args.seed, condition=condition),
    path,
    fps=args.fps or int(cfg.pipeline.fps),
    on_chunk=lambda k: (bar.update(1), bar.set_postfix(fps=f"{k / max(time.perf_counter() - t0, 1e-9):.1f} frames/s")),
  )
  bar.close()
  with open(os.path.join(args.out, "generate.json"), "w") as f:
    json.dump({"prompt": args.prompt, "weights": args.weights, "checkpoint": args.checkpoint, "config": args.config, "overrides": overrides, "seed": args.seed, "frames": n}, f, indent=2)
  print(f"wrote {path} ({n} frames)")


def cmd_generate(args, overrides) -> None:
  import jax  # noqa: PLC0415
  from tqdm import tqdm  # noqa: PLC0415

  import asvd  # noqa: PLC0415

  if args.weights:
    return cmd_t2v(args, overrides)
  if args.prompt:
    raise ValueError("--prompt needs --weights DIR (the Wan2.1 VAE, umT5 and tokenizer)")
  if args.config is None:
    raise ValueError("give --config configs/X.py (or --weights DIR --prompt ...)")
  cfg, model, context = _setup(args, overrides)
  vae = None
  if args.vae:
    from asvd.pipeline import plain_config  # noqa: PLC0415

    vae = asvd.load_vae(args.vae, config=plain_config(cfg.pipeline.get("vae")))
  frames_per_chunk = int(cfg.rollout.chunk_frames)
  chunks = []
  bar = tqdm(total=args.chunks, unit="chunk", desc="generate")

  def generated():
    t0 = None
    stream = asvd.stream(model, context, jax.random.key(args.seed), config=cfg.rollout, sampler_config=cfg.sampler, num_chunks=args.chunks)
    for i, lat in enumerate(stream):
      lat = np.asarray(lat)
      if i == 0:
        t0 = time.perf_counter()  # frames/s from chunk 1 on: chunk 0 includes the compile
      chunks.append(lat)
      yield lat
      bar.update(1)
      if i > 0:
        bar.set_postfix(fps=f"{i * frames_per_chunk / (time.perf_counter() - t0):.2f} latent frames/s")

  video = None
  if vae is not None:
    from asvd import pipeline  # noqa: PLC0415

    video = os.path.join(args.out, "video.mp4")
    pipeline.write_mp4(pipeline.decode_stream(vae, generated()), video, fps=args.fps or int(cfg.pipeline.fps))
  else:
    for _ in generated():
      pass
  bar.close()
  latents = np.concatenate(chunks, axis=1)
  path = os.path.join(args.out, "latents.npy")
  np.save(path, latents)
  meta = {"config": args.config, "overrides": overrides, "seed": args.seed, "shape": list(latents.shape)}
  with open(os.path.join(args.out, "generate.json"), "w") as f:
    json.dump(meta, f, indent=2)
  print(f"wrote {path} {latents.shape}" + (f" and {video}" if video else ""))


def cmd_eval_attention(args, overrides) -> None:
  import jax  # noqa: PLC0415

  from asvd.eval import attention  # noqa: PLC0415

  if args.config is None:
    raise ValueError("give --config configs/X.py")
  cfg, model, context = _setup(args, overrides)
  _, groups = attention.attention_shares(model, context, jax.random.key(args.seed), num_chunks=args.chunks, config=cfg.rollout, sampler_config=cfg.sampler)
  png = attention.plot_attention_shares(groups, os.path.join(args.out, "attention_share.png"), f"{cfg.name}: anchor={cfg.rollout.anchor}")
  with open(os.path.join(args.out, "attention_share.json"), "w") as f:
    json.dump({k: np.asarray(v).tolist() for k, v in groups.items()}, f)
  print(f"wrote {png}")
