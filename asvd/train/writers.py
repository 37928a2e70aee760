"""Where training writes what it measures: `metrics.jsonl`, TensorBoard, sample videos.

`MetricsLog` is the run's exact record (no wall-clock values; rewound on resume so a resumed run
equals an uninterrupted one line for line). `TensorBoardWriter` has the method names of CLU's
`MetricWriter` (`write_scalars`, `write_videos`, `flush`, `close`) and writes TensorBoard event
files with the `tensorboard` package's own event writer: CLU 0.0.12's `clu.metric_writers`
imports TensorFlow on import, and training keeps TensorFlow off its run-time path. Videos become
animated-GIF image summaries (TensorBoard's Images tab plays them).

    tensorboard --logdir WORKDIR/tensorboard
"""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np

from asvd.outputs import write_text_atomic


class MetricsLog:
  """`WORKDIR/metrics.jsonl`: appended line by line; truncated to a restore point on resume."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled  # False on every process but 0 of a multi-process run

  def rewind(self, stage: str, step: int) -> None:
    """Keeps earlier stages' lines and this stage's lines up to `step` (drops torn lines)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    keep = []
    with open(self.path) as f:
      for line in f:
        try:
          d = json.loads(line)
        except ValueError:
          continue
        if d.get("stage") != stage or d.get("step", 0) <= step:
          keep.append(json.dumps(d, sort_keys=True))
    write_text_atomic(self.path, "".join(k + "\n" for k in keep))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")


class TensorBoardWriter:
  """TensorBoard event files in `logdir` (one folder per stage: TensorBoard shows them as runs).

  A resumed run appends a new event file; TensorBoard drops the steps after the restore point
  when it sees the step counter go back.
  """

  def __init__(self, logdir: str):
    from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: PLC0415

    os.makedirs(logdir, exist_ok=True)
    self.logdir = logdir
    self._w = EventFileWriter(logdir)

  def _add(self, step: int, values: list) -> None:
    from tensorboard.compat.proto import event_pb2, summary_pb2  # noqa: PLC0415

    summary = summary_pb2.Summary(value=values)
    self._w.add_event(event_pb2.Event(summary=summary, step=int(step), wall_time=time.time()))

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    from tensorboard.compat.proto import summary_pb2  # noqa: PLC0415

    self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in sorted(scalars.items())])

  def write_videos(self, step: int, videos: dict[str, np.ndarray], fps: int = 8) -> None:
    """`videos`: `{tag: uint8 [T, H, W, 3]}`, each written as an animated GIF image summary."""
    from tensorboard.compat.proto import summary_pb2  # noqa: PLC0415

    values = []
    for tag, v in sorted(videos.items()):
      v = np.asarray(v)
      if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"write_videos: {tag} must be uint8 [T, H, W, 3], got {v.dtype} {v.shape}")
      img = summary_pb2.Summary.Image(height=v.shape[1], width=v.shape[2], colorspace=3, encoded_image_string=gif_bytes(v, fps))
      values.append(summary_pb2.Summary.Value(tag=tag, image=img))
    self._add(step, values)

  def flush(self) -> None:
    self._w.flush()

  def close(self) -> None:
    self._w.close()


def gif_bytes(frames_thwc: np.ndarray, fps: int = 8) -> bytes:
  """An endlessly looping animated GIF of uint8 RGB frames `[T, H, W, 3]`."""
  from PIL import Image  # noqa: PLC0415

  images = [Image.fromarray(f) for f in frames_thwc]
  buf = io.BytesIO()
  images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)
  return buf.getvalue()


def preview(latents_fhwc: np.ndarray, upscale: int = 8) -> np.ndarray:
  """Latents `[F, h, w, C]` -> uint8 frames: Wan2.1's latent colours for `C = 16`, else the
  first three channels (or one, as grey) scaled by the clip's range."""
  from asvd.video import latent_preview, to_uint8  # noqa: PLC0415

  lat = np.asarray(latents_fhwc, np.float32)
  if lat.shape[-1] == 16:
    return latent_preview(lat, upscale)
  rgb = lat[..., :3] if lat.shape[-1] >= 3 else np.repeat(lat[..., :1], 3, axis=-1)
  lo, hi = float(rgb.min()), float(rgb.max())
  rgb = 2.0 * (rgb - lo) / max(hi - lo, 1e-6) - 1.0
  return to_uint8(rgb.repeat(upscale, axis=1).repeat(upscale, axis=2))


__all__ = ["MetricsLog", "TensorBoardWriter", "gif_bytes", "preview"]
