"""Config loading: ml_collections files with `get_config(arg)` and `--config.a.b=v` overrides.

A config spec is `"configs/tiny.py"` or `"configs/tiny.py:arg"`; relative paths are looked up in
the working directory first, then in the asvd checkout (so `asvd generate --config
configs/tiny.py` works from anywhere in an editable install).
"""

from __future__ import annotations

import ast
import importlib.util
import os

import ml_collections

from asvd.errors import UsageError

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_config() -> ml_collections.ConfigDict:
  """Every section and default named in method.md; config files start from this and edit it."""
  c = ml_collections.ConfigDict()
  c.name = "base"
  # The DiT (asvd.models.dit.DiTConfig): defaults are Wan2.1-T2V-1.3B.
  c.model = ml_collections.ConfigDict(
    dict(
      patch_size=(1, 2, 2),
      in_channels=16,
      out_channels=16,
      dim=1536,
      ffn_dim=8960,
      freq_dim=256,
      num_heads=12,
      num_layers=30,
      text_dim=4096,
      text_len=512,
      eps=1e-6,
      cross_attn_norm=True,
      rope_max_seq_len=1024,
      rope_theta=10000.0,
      dtype="float32",
      param_dtype="float32",
      attention="auto",  # flash on CPU, cuDNN flash on NVIDIA GPUs, splash on TPU (asvd.models.attention)
      scan_layers=True,
      remat="none",
    )
  )
  # Few-step sampler (Self-Forcing): 1000, 750, 500, 250 warped with shift 5.
  c.sampler = ml_collections.ConfigDict(
    dict(
      timesteps=(1000, 750, 500, 250),
      shift=5.0,
      warp=True,
      num_train_timesteps=1000,
      context_timestep=0,
      # How the clean re-run's noise level follows from context_timestep: "exact" (t = 0 is
      # clean, no noise; t > 0 uses the table sigma and fresh noise) or "table" (Self-Forcing's
      # training: every t, 0 included, maps to the nearest table sigma, ~0.005 at t = 0, and
      # the re-run input is always noised with fresh noise).
      context_sigma="exact",
    )
  )
  # The adaptive-state rollout (method.md "Names" and "The cache and the anchor modes").
  c.rollout = ml_collections.ConfigDict(
    dict(
      anchor="adaptive",  # adaptive | sink | ema | none
      chunk_frames=3,  # F
      state_frames=1,  # Fs (anchor slots)
      window_frames=3,  # Wp
      state_position="anchor",  # anchor | leading
      positions="relative",  # relative | absolute (Self-Forcing preset) | absolute_rolling (the peers' sink positions)
      absolute_frames=21,  # cache frames of the absolute preset
      ema_decay=0.9,
      sink_in_window=False,  # sink: also keep the sink frames in the window (LongLive: False)
      anchor_bias=0.0,  # added to the attention logits of the anchor slots' keys (a dose knob; 0: off)
      batch_size=1,
      latent_hw=(60, 104),  # latent H, W (480x832 pixels)
      probe=False,  # return the attention share per slot group
      recache_on_switch=False,  # on a prompt switch, re-encode the window under the new prompt
      scan_chunks=8,  # chunks per compiled rollout segment
    )
  )
  # Training (`asvd train`, asvd/train/): the stages and their knobs (method.md "Training").
  c.train = ml_collections.ConfigDict(
    dict(
      horizon_frames=21,  # H: latent frames the teacher scores at once
      horizon_alpha=2.0,  # alpha: window ending at e weighs (e / H) ** alpha, mean 1
      # causal init: the state's target. "own_last_frame": the last frame of the chunk it is
      # denoised with, which is what the stage's caches hold in the state slot, so the state a
      # chunk emits is what the next chunk learnt to find there. "last_frame" (method.md): the
      # context's last frame, one chunk behind what the slot holds at inference (on PanWorld
      # its adaptive students kept 0.73 of the caption's speed in the first horizon, 0.39 at 6x;
      # "own_last_frame" 0.94 and 0.76).
      state_init_target="own_last_frame",
      state_dmd=True,  # DMD windows start with the state in place of their first frame
      stages=("teacher", "causal_init", "dmd"),
      batch_size=1,
      seed=0,
      checkpoint_every=100,  # steps between (asynchronous) checkpoints
      keep=3,  # checkpoints kept per stage
      log_every=1,  # steps between metrics.jsonl (and TensorBoard) lines
      sample_every=200,  # steps between sample videos (mp4 + TensorBoard); 0: none
      sample_chunks=7,  # chunks per sample video of a causal network
      optimizer=dict(b1=0.0, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=10.0, grad_accum=1),
      # LoRA: rank-r adapters on the blocks' linear layers of the trained networks (generator and
      # critic in dmd) of these stages; only the adapters train; final models are merged.
      lora=dict(rank=0, alpha=0.0, stages=("dmd",)),
      # synthetic_pan (generated) | panworld (generated pixel pans; object_prob: clips with a moving
      # object; world_scale, world_texture: the world's look, asvd.data.panworld.render_world;
      # world_speeds: the camera's pixels per frame for "slowly" and "quickly") |
      # video_folder (folder + weights) | a prepared TFDS name
      data=dict(name="synthetic_pan", data_dir="", split="train", frames=21, clips=256, seed=0, folder="", weights="", object_prob=0.5, world_scale=1.0, world_texture=0.3, world_speeds=(1, 2)),
      # text_dropout: a sample's text replaced by zeros (the unconditional text of CFG) with this
      # probability, so a teacher trained here can be guided (ODE init and DMD use CFG).
      # b1 (every stage): Adam's momentum for this stage, None = train.optimizer.b1 (Self-Forcing's 0
      # suits fine-tuning; a teacher trained from scratch wants 0.9).
      # frame_noise_prob: samples whose frames each get their own noise level (Diffusion Forcing;
      # teaches a teacher trained from scratch to carry content between frames early), 0: off.
      # motion_warmup (PanWorld only): the first steps on pans over random fields with PanWorld's
      # captions (asvd.data.pan_fields), so the teacher learns the caption's motion before the
      # world's look; needs whole-token train.data.world_speeds.
      teacher=dict(steps=1000, lr=1e-4, init="", text_dropout=0.1, b1=None, frame_noise_prob=0.0, motion_warmup=0),
      causal_init=dict(
        steps=1000,
        lr=1e-5,
        b1=None,
        init="",
        first_chunk_prob=0.25,
        # Where a sink / EMA anchor comes from in this stage's caches: "clip_start" (the clip's
        # first chunk is written before the context, so the anchor is the clip's start while the
        # context moves away from it, as a long rollout has it) or "context" (the context's own
        # first frame, next to the chunk: the earlier behaviour). No effect on adaptive / none.
        anchor_from="clip_start",
        # "ode": regression on the frozen teacher's ODE trajectories (CausVid / Self-Forcing
        # ode_init; needs prompts only); "teacher_forcing": flow matching on the data's clips.
        method="ode",
        teacher="",  # the ODE teacher (default: train.dmd.teacher, else this workdir's teacher model)
        ode_steps=40,  # the teacher's Euler steps per trajectory
        ode_cfg_scale=3.0,  # Self-Forcing's form cond + s (cond - uncond), as dmd.cfg_scale
        # ode_bank: a .npz file of ode_bank_size teacher trajectories, sampled once (then read;
        # asvd.train.ode_bank), instead of an ODE in every step; "" = sample in every step.
        ode_bank="",
        ode_bank_size=1024,
      ),
      dmd=dict(
        steps=600,
        init="",  # generator checkpoint (default: this workdir's causal_init model)
        teacher="",  # teacher (and critic init) checkpoint (default: this workdir's teacher model)
        generator_lr=2e-6,
        critic_lr=4e-7,
        b1=None,
        critic_per_generator=5,  # critic updates per generator update
        cfg_scale=3.0,  # teacher only; Self-Forcing's form cond + s (cond - uncond)
        ema_decay=0.99,
        ema_start=200,
        rollout_chunks=7,  # chunks per generator rollout (may exceed the horizon)
        grad_from_chunk=0,  # chunks before this carry no gradient
        last_step_only=False,  # exit at the last denoising step instead of a random one
        replay=False,  # generator gradient by chunk replay: O(one chunk) memory for any length
        min_sigma=0.02,
        max_sigma=0.98,
        # Wan teachers: re-encode the first latent of windows that start mid-rollout as an image
        # latent (decode, last pixel frame, encode). Needs a VAE: `reencode_vae`, else
        # train.data.weights of video_folder data; synthetic latents have none and skip it.
        reencode_first=True,
        reencode_vae="",
        teacher_dtype="float32",  # "bfloat16" keeps the frozen teacher in bf16 (ODE init too)
      ),
    )
  )
  # Text-to-video pipeline (asvd.pipeline): None = the published Wan2.1 VAE / umT5-XXL; a dict
  # of constructor arguments selects another architecture (used by tiny end-to-end tests).
  # decode_cache_dtype: the streaming decoder's cache dtype (None = the decoder's own, float32);
  # "bfloat16" halves the Wan VAE's causal-conv cache (3.8 -> 1.9 GB at 480x832).
  # pixel_patch > 0: pixel space, latents are space-to-depth patches (asvd.models.pixel_codec;
  # PanWorld) of pixels in [-1, 1] times pixel_scale. text_encoder_seed: a text encoder of the
  # `text_encoder` architecture with random, frozen weights from this seed where no weights are
  # given (PanWorld's text path).
  c.pipeline = ml_collections.ConfigDict(dict(vae=None, text_encoder=None, taehv=None, fps=16, decode_cache_dtype=None, pixel_patch=0, pixel_scale=1.0, text_encoder_seed=0))
  # Device mesh for rollouts (asvd.sharding): sizes of the (data, fsdp, context, tensor) axes; one
  # may be -1 (all remaining devices). All 1 = a single device. `rules` maps logical axis names
  # to mesh axes on top of asvd.sharding.DEFAULT_RULES (in a config file, or on the command line:
  # --config.mesh.rules.tokens=context splits the cached K/V over the context axis).
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, context=1, tensor=1, rules={}))
  # Runtime: a persistent XLA compilation cache folder ("" = off) so that a second `asvd`
  # process reuses compiled programs instead of compiling again. memory_check: each program is
  # compiled before it first runs and checked against the free device / host memory (asvd.memory;
  # one clear error instead of an out-of-memory kill); memory_limit_gib > 0 counts at most that
  # much as free (headroom on a shared machine).
  c.runtime = ml_collections.ConfigDict(dict(compilation_cache_dir="", memory_check=True, memory_limit_gib=0.0))
  c.seed = 0
  return c


def config_arg(arg: str | None, choices: dict[str, str], path: str) -> str:
  """Validates the `:arg` of a config file; returns it (or the default, the first choice).

  Args:
    arg: what followed `:` in the spec (None or "" for nothing).
    choices: `{valid arg: what it selects}`; the first one is the default.
    path: the config file, named in the error.

  Raises:
    UsageError: listing the valid arguments.
  """
  if not arg:
    return next(iter(choices))
  if arg not in choices:
    valid = ", ".join(f"{k!r} ({v})" for k, v in choices.items())
    raise UsageError(f"{path}: unknown config argument {arg!r}; valid: {valid}")
  return arg


def _resolve(path: str) -> str:
  if os.path.isfile(path):
    return path
  alt = os.path.join(_REPO_ROOT, path)
  if os.path.isfile(alt):
    return alt
  raise UsageError(f"config file {path!r} not found (also looked in {_REPO_ROOT})")


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` by calling its `get_config(arg)`, then applies overrides.

  Args:
    spec: `"configs/tiny.py"` or `"configs/tiny.py:arg"`.
    overrides: strings `"a.b=v"` (a leading `--config.` or `config.` is accepted).

  Returns:
    The ConfigDict.
  """
  path, _, arg = spec.partition(":")
  path = _resolve(path)
  name = "asvd_config_" + os.path.splitext(os.path.basename(path))[0]
  mod_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UsageError(f"config file {path} defines no get_config(arg)")
  cfg = module.get_config(arg) if arg else module.get_config()
  return apply_overrides(cfg, overrides)


def _parse_value(text: str, current):
  if isinstance(current, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError(f"expected a boolean, got {text!r}")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str) or current is None:
    try:
      v = ast.literal_eval(text)
      return v if current is None else str(v) if not isinstance(v, str) else v
    except (ValueError, SyntaxError):
      return text
  if isinstance(current, (tuple, list)):
    v = ast.literal_eval(text)
    return type(current)(v if isinstance(v, (tuple, list)) else (v,))
  return ast.literal_eval(text)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """Applies `a.b=v` overrides; the value is parsed by the type of the current value."""
  for item in overrides:
    item = item.removeprefix("--").removeprefix("config.")
    if "=" not in item:
      raise UsageError(f"config override {item!r} must look like --config.a.b=value")
    key, text = item.split("=", 1)
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      if p not in node:
        raise UsageError(f"--config.{key}: no section {p!r} (have {sorted(node.keys())})")
      node = node[p]
    # `mesh.rules` starts empty and takes any logical axis name (checked by name and mesh axis in
    # `asvd.sharding.rules_from_config`, before anything is built), e.g. mesh.rules.tokens=context.
    if leaf not in node and parents != ["mesh", "rules"]:
      raise UsageError(f"--config.{key}: unknown key {leaf!r} (have {sorted(node.keys())})")
    try:
      value = _parse_value(text, node.get(leaf, None))
    except (ValueError, SyntaxError) as e:
      raise UsageError(f"--config.{key}={text!r}: {e}") from e
    with node.ignore_type():
      node[leaf] = value
  return cfg


_DTYPE_ALIASES = {
  "f32": "float32",
  "fp32": "float32",
  "float32": "float32",
  "float": "float32",
  "bf16": "bfloat16",
  "bfloat16": "bfloat16",
  "f16": "float16",
  "fp16": "float16",
  "float16": "float16",
  "half": "float16",
}


def parse_dtype(name: str, flag: str = "dtype") -> str:
  """A floating dtype name from the usual spellings (`bf16`, `fp32`, `float16`, ...).

  Raises:
    UsageError: naming `flag` and listing the accepted spellings.
  """
  key = str(name).strip().lower()
  if key not in _DTYPE_ALIASES:
    raise UsageError(f"{flag}={name!r} is not a floating dtype; use one of {sorted(_DTYPE_ALIASES)}")
  return _DTYPE_ALIASES[key]
