"""Bring your own data: a folder of videos and captions -> a TFDS dataset of latents + text.

    clips/
      captions.json            {"beach.mp4": "waves roll onto a beach at sunset", ...}
      beach.mp4                (or beach.txt next to beach.mp4 holding its caption)
      city.mp4 ...

Each video is resized to the latent size x 8 (`rollout.latent_hw`), cut into clips of
`1 + 4 (T - 1)` pixel frames (T = `train.data.frames` latent frames; non-overlapping, the
remainder dropped), encoded once with the Wan VAE, and its caption once with umT5 (padding rows
zeroed, as the DiT expects). Examples: `latents [T, h, w, 16]` float32 and `text [text_len,
text_dim]` float16 (half the disk; the training pipeline casts back). The dataset is stored under
`train.data.data_dir` and regenerated only when the folder, the weights or the sizes change.

    asvd train --config configs/wan_t2v_1_3b.py --workdir runs/mine \\
        --config.train.data.name=video_folder --config.train.data.folder=clips \\
        --config.train.data.weights=Wan2.1-T2V-1.3B --config.train.data.frames=21
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from asvd.data.features import clip_features
from asvd.errors import UsageError

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi")


@dataclasses.dataclass
class VideoFolderConfig(tfds.core.BuilderConfig):
  folder: str = ""
  weights: str = ""
  frames: int = 21  # latent frames per clip
  height: int = 60  # latent size
  width: int = 104
  channels: int = 16
  text_len: int = 512
  text_dim: int = 4096
  encoders: str = "{}"  # JSON: {"model": {...}, "pipeline": {...}} for load_encoders


def list_videos(folder: str) -> list[tuple[str, str]]:
  """`[(video path, caption)]`, sorted; one error naming every video without a caption."""
  if not os.path.isdir(folder):
    raise UsageError(f"train.data.folder={folder!r}: no such folder")
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(VIDEO_EXTENSIONS))
  if not names:
    raise UsageError(f"train.data.folder={folder!r}: no video files ({', '.join(VIDEO_EXTENSIONS)})")
  captions = {}
  cj = os.path.join(folder, "captions.json")
  if os.path.isfile(cj):
    try:
      with open(cj) as f:
        captions = json.load(f)
    except (OSError, ValueError) as e:
      raise UsageError(f"{cj}: not a readable JSON object of file -> caption ({e})") from e
  out, missing = [], []
  for n in names:
    txt = os.path.join(folder, os.path.splitext(n)[0] + ".txt")
    cap = captions.get(n)
    if cap is None and os.path.isfile(txt):
      with open(txt) as f:
        cap = f.read().strip()
    if not cap:
      missing.append(n)
    out.append((os.path.join(folder, n), cap))
  if missing:
    raise UsageError(f"{folder}: no caption for {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} (add them to captions.json or NAME.txt)")
  return out


def config_for(data_cfg, model_cfg, latent_hw, config) -> VideoFolderConfig:
  """The builder config; its name hashes everything that changes the data (files included)."""
  folder = os.path.abspath(os.path.expanduser(data_cfg.folder))
  weights = os.path.abspath(os.path.expanduser(data_cfg.weights))
  videos = list_videos(folder)
  enc = {"model": {"dtype": "float32", "text_len": int(model_cfg.text_len)}, "pipeline": {k: _plain(config.pipeline.get(k)) for k in ("vae", "text_encoder")}}
  fields = dict(folder=folder, weights=weights, frames=int(data_cfg.frames), height=int(latent_hw[0]), width=int(latent_hw[1]), channels=int(model_cfg.in_channels), text_len=int(model_cfg.text_len), text_dim=int(model_cfg.text_dim), encoders=json.dumps(enc, sort_keys=True))
  stamp = [(p, c, os.path.getsize(p), int(os.path.getmtime(p))) for p, c in videos]
  digest = hashlib.sha256(json.dumps([fields, stamp], sort_keys=True).encode()).hexdigest()[:16]
  return VideoFolderConfig(name=f"v{digest}", **fields)


def _plain(x):
  return None if x is None else (x.to_dict() if hasattr(x, "to_dict") else dict(x))


class VideoFolder(tfds.core.GeneratorBasedBuilder):
  """Videos + captions encoded once with the Wan VAE and umT5 (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [VideoFolderConfig(name="default")]

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
      builder=self,
      features=clip_features(c, np.float16, source=tfds.features.Text()),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    import jax.numpy as jnp  # noqa: PLC0415
    import ml_collections  # noqa: PLC0415

    import asvd  # noqa: PLC0415
    from asvd import pipeline, video  # noqa: PLC0415

    c = self.builder_config
    enc_cfg = ml_collections.ConfigDict(json.loads(c.encoders))
    tok, enc, vae = pipeline.load_encoders(c.weights, enc_cfg)
    s = vae.config.spatial_factor
    pixel_frames = 1 + 4 * (c.frames - 1)
    for path, caption in list_videos(c.folder):
      frames = video.read_frames(path, (c.height * s, c.width * s))
      text = np.asarray(asvd.encode_prompts(enc, tok, [caption])[0], np.float16)
      for k in range(len(frames) // pixel_frames):
        px = frames[k * pixel_frames : (k + 1) * pixel_frames].astype(np.float32) / 127.5 - 1.0
        lat = np.asarray(vae.encode(jnp.asarray(px[None]))[0], np.float32)
        yield f"{os.path.basename(path)}:{k}", {"latents": lat, "text": text, "source": f"{os.path.basename(path)}[{k * pixel_frames}:{(k + 1) * pixel_frames}]"}


__all__ = ["VideoFolder", "VideoFolderConfig", "config_for", "list_videos"]
