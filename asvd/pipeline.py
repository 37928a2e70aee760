"""Text-to-video end to end: prompt -> umT5 -> streaming transition -> streaming VAE -> mp4.

`T2V.from_weights(weights_dir, checkpoint=..., config=...)` expects the Wan2.1-T2V-1.3B folder
layout (what `huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B` gives, copied here by hand):

    WEIGHTS/Wan2.1_VAE.pth                       the VAE (or WEIGHTS/vae/ in diffusers layout)
    WEIGHTS/models_t5_umt5-xxl-enc-bf16.pth      the umT5-XXL encoder (or WEIGHTS/text_encoder/)
    WEIGHTS/google/umt5-xxl/                     tokenizer.json or spiece.model (or WEIGHTS/tokenizer/)
    DiT: --checkpoint PATH (a Self-Forcing .pt, a diffusers/Wan folder or an asvd checkpoint),
         else WEIGHTS/self_forcing_dmd.pt, WEIGHTS/checkpoints/self_forcing_dmd.pt or WEIGHTS/asvd_dit/

Missing pieces raise one `FileNotFoundError` listing every expected file and which are absent.
Video is decoded chunk by chunk with the VAE's causal-conv cache and appended to the mp4 as it
arrives (16 fps by default); the adaptive state is never decoded.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asvd import video
from asvd.errors import UsageError

VAE_FILES = ("Wan2.1_VAE.pth", "vae")
T5_FILES = ("models_t5_umt5-xxl-enc-bf16.pth", "text_encoder")
TOKENIZER_FILES = ("google/umt5-xxl", "tokenizer")
DIT_FILES = ("self_forcing_dmd.pt", "checkpoints/self_forcing_dmd.pt", "asvd_dit")
TAEHV_FILES = ("taew2_1.pth", "taew2_1.safetensors")


def _first(weights: str, names) -> str | None:
  for n in names:
    p = os.path.join(weights, n)
    if os.path.exists(p):
      return p
  return None


def find_weights(weights: str, checkpoint: str | None = None, *, dit: bool = True) -> dict[str, str]:
  """Paths of the VAE, text encoder, tokenizer and (with `dit`) the DiT; one clear error
  listing everything missing."""
  found = {
    "vae": _first(weights, VAE_FILES),
    "text_encoder": _first(weights, T5_FILES),
    "tokenizer": _first(weights, TOKENIZER_FILES),
    "dit": checkpoint if checkpoint and os.path.exists(checkpoint) else (None if checkpoint else _first(weights, DIT_FILES)),
  }
  if not dit:
    found.pop("dit")
  expect = {
    "vae": " or ".join(VAE_FILES),
    "text_encoder": " or ".join(T5_FILES),
    "tokenizer": " or ".join(f"{t}/(tokenizer.json|spiece.model)" for t in TOKENIZER_FILES),
    "dit": (checkpoint if checkpoint else " or ".join(DIT_FILES) + " (or pass --checkpoint)"),
  }
  missing = [k for k, v in found.items() if v is None]
  if not os.path.isdir(weights) or missing:
    lines = [f"weights folder {weights!r} is incomplete; expected:"]
    for k, want in expect.items():
      if k not in found:
        continue
      lines.append(f"  [{'ok' if found[k] else 'MISSING'}] {k}: {want}")
    lines.append("Wan2.1-T2V-1.3B holds the VAE, umT5 and tokenizer; the DiT is a Self-Forcing or asvd checkpoint.")
    raise FileNotFoundError("\n".join(lines))
  return found


def load_encoders(weights: str, config):
  """`(tokenizer, text encoder, VAE)` from a Wan2.1 folder: what turns videos and captions into
  training data. `config.pipeline.vae` / `.text_encoder` may name other architectures."""
  import asvd  # noqa: PLC0415

  paths = find_weights(weights, dit=False)
  p = config.get("pipeline", {})
  tok = asvd.load_tokenizer(paths["tokenizer"], max_length=int(config.model.text_len))
  t5_cfg = plain_config(p.get("text_encoder"))
  if t5_cfg is not None:
    from asvd.models.umt5 import UMT5Config  # noqa: PLC0415

    t5_cfg = UMT5Config(**t5_cfg)
  enc = asvd.load_text_encoder(paths["text_encoder"], dtype=jnp.dtype(config.model.dtype), config=t5_cfg)
  vae = asvd.load_vae(paths["vae"], dtype=jnp.float32, config=plain_config(p.get("vae")))
  return tok, enc, vae


def load_decoder(path: str, *, config=None):
  """The video decoder in `path`: TAEHV for a `taew*`/`taehv*` file (`config.pipeline.taehv` may
  give a non-default TAEHV), else the Wan VAE (`config.pipeline.vae`). Both stream with
  `init_decode_cache` / `decode_chunk` (`decode_stream`)."""
  import asvd  # noqa: PLC0415
  from asvd.ckpt.taehv_port import is_taehv_file  # noqa: PLC0415

  p = {} if config is None else config.get("pipeline", {})
  if is_taehv_file(path):
    from asvd.models.taehv import TAEHVConfig  # noqa: PLC0415

    t = plain_config(p.get("taehv"))
    return asvd.load_taehv(path, config=TAEHVConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in t.items()}) if t else None)
  return asvd.load_vae(path, dtype=jnp.float32, config=plain_config(p.get("vae")))


def find_taehv(weights: str) -> str:
  """`taew2_1.pth` (or `.safetensors`) in the weights folder, or one clear error."""
  for name in TAEHV_FILES:
    if os.path.isfile(os.path.join(weights, name)):
      return os.path.join(weights, name)
  raise FileNotFoundError(f"--decoder taehv: put {' or '.join(TAEHV_FILES)} (madebyollin/taehv) in the weights folder {weights!r}")


class T2V:
  """The loaded pipeline: tokenizer, text encoder, DiT, VAE and the config."""

  def __init__(self, *, tokenizer, text_encoder, dit, vae, config, decoder=None):
    self.tokenizer, self.text_encoder, self.dit, self.vae, self.config = tokenizer, text_encoder, dit, vae, config
    self.decoder = vae if decoder is None else decoder  # what turns latents into frames

  @classmethod
  def from_weights(cls, weights: str, *, config, checkpoint: str | None = None, decoder: str = "wan") -> T2V:
    """Loads every component (see the module docstring for the folder layout).

    Args:
      weights: the Wan2.1 folder.
      config: the full asvd config; `config.pipeline.vae` / `config.pipeline.text_encoder` may
        give non-default architectures (None: the published Wan2.1 ones), `config.model` the DiT
        (used for checkpoints that carry no config, such as a bare Self-Forcing .pt).
      checkpoint: the DiT checkpoint (default: found in `weights`).
      decoder: "wan" (the Wan VAE) or "taehv" (`taew2_1.pth` in `weights`: the tiny decoder;
        the Wan VAE still encodes conditioning frames).
    """
    import asvd  # noqa: PLC0415

    paths = find_weights(weights, checkpoint)
    dt = jnp.dtype(config.model.dtype)
    tok, enc, vae = load_encoders(weights, config)
    dit_path = paths["dit"]
    # The checkpoint defines the architecture; the config chooses how it computes.
    from asvd.models.dit import compute_settings  # noqa: PLC0415

    kw: dict[str, Any] = {"dtype": dt, **compute_settings(config.model)}
    if os.path.isfile(dit_path) and not os.path.isfile(os.path.join(os.path.dirname(dit_path), "config.json")):
      kw["model_config"] = config.model
    if decoder not in ("wan", "taehv"):
      raise ValueError(f"decoder={decoder!r}: choose 'wan' or 'taehv'")
    fast = load_decoder(find_taehv(weights), config=config) if decoder == "taehv" else None
    dit = asvd.load_dit(dit_path, **kw)
    return cls(tokenizer=tok, text_encoder=enc, dit=dit, vae=vae, config=config, decoder=fast)

  def encode_prompt(self, prompts) -> jax.Array:
    import asvd  # noqa: PLC0415

    return asvd.encode_prompts(self.text_encoder, self.tokenizer, prompts)

  def encode_condition(self, pixels_bthwc: np.ndarray) -> jax.Array:
    """Pixels `[B, T, H, W, 3]` in [-1, 1] (T = 1 + 4k) -> clean latents for `prefill`."""
    return self.vae.encode(jnp.asarray(pixels_bthwc, jnp.float32))

  def generate(self, prompt: str, *, chunks: int, seed: int = 0, condition: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Yields uint8 video frames `[T, H, W, 3]` chunk by chunk (batch 1).

    With `condition` (pixels `[T, H, W, 3]` in [-1, 1], T = 1 + 4k), the frames are encoded,
    written into the cache (`asvd.prefill`), and emitted first, so the video continues them.
    """
    import asvd  # noqa: PLC0415

    ctx = self.encode_prompt([prompt])
    rc = self.config.rollout
    carry, head = None, []
    if condition is not None:
      lat = self.encode_condition(condition[None])
      if tuple(lat.shape[2:4]) != tuple(rc.latent_hw):
        raise ValueError(f"condition encodes to latents {tuple(lat.shape[2:4])}, config rollout.latent_hw={tuple(rc.latent_hw)}")
      carry = asvd.prefill(self.dit, ctx, lat, config=rc, sampler_config=self.config.sampler)
      head = [lat]  # decoded first, so the decoder's causal cache continues from the given frames
    from asvd import memory  # noqa: PLC0415
    from asvd import sharding as shard_lib  # noqa: PLC0415

    mesh, rules = shard_lib.from_config(self.config)
    check = memory.setting(self.config)
    shape = (1, int(rc.chunk_frames), *rc.latent_hw, int(self.dit.cfg.out_channels))
    check_decoder_memory(self.decoder, shape, cache_dtype=decode_cache_dtype(self.config), setting=check)
    generated = asvd.stream(self.dit, ctx, seed, config=rc, sampler_config=self.config.sampler, num_chunks=chunks, carry=carry, mesh=mesh, rules=rules, memory_check=check)
    if jax.process_count() > 1:  # chunks sharded across processes: each decodes the whole chunk
      from asvd import distributed  # noqa: PLC0415

      generated = (distributed.to_host(lat) for lat in generated)
    yield from decode_stream(self.decoder, itertools.chain(head, generated), cache_dtype=decode_cache_dtype(self.config))


def check_decoder_memory(vae, latent_shape, *, cache_dtype=None, setting: bool | float = True) -> None:
  """The decoder's memory pre-flight: compiles its streaming programs (the first chunk of a video
  and every later one) for latent chunks `latent_shape` `[B, F, h, w, C]` and raises
  `asvd.OutOfMemoryError` (one line naming the decoder) when one cannot fit in the free memory;
  `setting` as `asvd.memory.check`. Call it before generating, so that a decoder that cannot
  fit stops the run before the DiT's work. The compiled programs are the ones the decode then
  runs. Decoders without a compiled streaming program (the pixel codec) are not checked."""
  from asvd import memory  # noqa: PLC0415

  lower = getattr(vae, "lower_decode_chunk", None)
  if setting is False or lower is None:
    return
  b, _, h, w, _ = latent_shape
  z = jax.ShapeDtypeStruct(tuple(latent_shape), jnp.float32)
  cache = jax.eval_shape(lambda: vae.init_decode_cache(b, h, w, cache_dtype))
  name = "TAEHV" if type(vae).__name__ == "TAEHV" else "Wan VAE"
  hint = "decode with TAEHV (--decoder taehv / --vae taew2_1.pth), set pipeline.decode_cache_dtype=bfloat16, or decode later with `asvd decode` on a larger machine"
  for which in ("first", "later"):
    memory.check(lower(z, cache).compile(), f"decode: the {name}'s {which}-chunk program", setting=setting, hint=hint)
    if which == "first":
      cache = jax.eval_shape(vae.decode_chunk_fn, z, cache)[1]


def decode_cache_dtype(config) -> Any:
  """`config.pipeline.decode_cache_dtype` checked: None (the decoder's own) or a float dtype."""
  d = None if config is None else config.get("pipeline", {}).get("decode_cache_dtype")
  if d is None:
    return None
  if d not in ("float32", "bfloat16", "float16"):
    raise UsageError(f"config pipeline.decode_cache_dtype={d!r}: choose None, 'float32', 'bfloat16' or 'float16'")
  return jnp.dtype(d)


def decode_stream(vae, latent_chunks, *, cache_dtype=None) -> Iterator[np.ndarray]:
  """Decodes latent chunks `[1, F, h, w, C]` one after another with the decoder's streaming cache
  (the Wan VAE's causal-conv cache, or TAEHV's MemBlock memory).

  Args:
    vae: a `WanVAE` or `TAEHV`.
    latent_chunks: an iterable of latent chunks.
    cache_dtype: the cache's dtype (None: the decoder's; see `decode_cache_dtype`).

  Yields:
    uint8 frames `[T, H, W, 3]` per chunk (1 + 4(F-1) for the first chunk, 4F after).
  """
  cache = None
  for lat in latent_chunks:
    if cache is None:
      cache = vae.init_decode_cache(lat.shape[0], lat.shape[2], lat.shape[3], cache_dtype)
    px, cache = vae.decode_chunk(lat, cache)
    yield video.to_uint8(px[0])


def plain_config(x):
  """A ConfigDict/dict/None section as a plain dict (or None)."""
  if x is None:
    return None
  return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def read_condition(path: str, hw: tuple[int, int], max_frames: int = 81) -> np.ndarray:
  """An image or video file -> pixels `[T, H, W, 3]` in [-1, 1], T = 1 + 4k, resized to `hw`.

  A video keeps its last `1 + 4k <= max_frames` frames (the continuation starts from its end).
  """
  frames = video.read_frames(path, hw, max_frames=max_frames, last=True)
  n = 1 + 4 * ((len(frames) - 1) // 4)
  return frames[-n:].astype(np.float32) / 127.5 - 1.0
