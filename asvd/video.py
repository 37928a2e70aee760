"""Video files: mp4 writing and reading through an ffmpeg pipe, and a cheap latent preview.

ffmpeg (the binary that `imageio-ffmpeg` ships) is started with `subprocess.Popen` and no
`preexec_fn`, so CPython spawns it with vfork/exec and no Python code runs in the child: safe in
a multithreaded process such as a JAX program (imageio's writer passes `preexec_fn=os.setpgrp`,
which runs Python after `fork()` and is what JAX warns about). mp4 files are written under a
temporary name and renamed into place, so a failed or interrupted write never leaves a truncated
file behind.

`latent_preview` maps Wan2.1 latents to RGB with a fixed linear projection (the 16x3 factors
that viewers of Wan latents use), so a run without a VAE still gives a video to look at. It is a
preview: one RGB frame per latent frame at latent resolution (upscaled), not a VAE decode.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterable

import numpy as np

from asvd.errors import OutputError, UsageError

# Linear latent -> RGB projection for (normalised) Wan2.1 latents, [16, 3] and bias [3], as used
# by latent previewers of Wan models; the result is roughly in [-1, 1].
WAN21_LATENT_RGB = np.array(
  [
    [-0.1299, -0.1692, 0.2932],
    [0.0671, 0.0406, 0.0442],
    [0.3568, 0.2548, 0.1747],
    [0.0372, 0.2344, 0.1420],
    [0.0313, 0.0189, -0.0328],
    [0.0296, -0.0956, -0.0665],
    [-0.3477, -0.4059, -0.2925],
    [0.0166, 0.1902, 0.1975],
    [-0.0412, 0.0267, -0.1364],
    [-0.1293, 0.0740, 0.1636],
    [0.0680, 0.3019, 0.1128],
    [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699],
    [0.0060, -0.0633, 0.0005],
    [0.3477, 0.2275, 0.2950],
    [0.1984, 0.0913, 0.1861],
  ],
  np.float32,
)
WAN21_LATENT_RGB_BIAS = np.array([-0.1835, -0.0868, -0.3360], np.float32)


def ffmpeg_exe() -> str:
  import imageio_ffmpeg  # noqa: PLC0415

  return imageio_ffmpeg.get_ffmpeg_exe()


def to_uint8(px) -> np.ndarray:
  """Pixels in [-1, 1] -> uint8."""
  return np.clip((np.asarray(px, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def latent_preview(latents_fhwc: np.ndarray, upscale: int = 8) -> np.ndarray:
  """Wan2.1 latents `[F, h, w, 16]` -> uint8 RGB frames `[F, h*upscale, w*upscale, 3]`.

  A fixed linear projection per latent pixel (no VAE): colours and layout are roughly right,
  detail and the 4x temporal expansion are not.
  """
  lat = np.asarray(latents_fhwc, np.float32)
  if lat.ndim != 4 or lat.shape[-1] != WAN21_LATENT_RGB.shape[0]:
    raise UsageError(
      f"latent preview needs [F, h, w, {WAN21_LATENT_RGB.shape[0]}] Wan2.1 latents, got shape {lat.shape}"
    )
  rgb = lat @ WAN21_LATENT_RGB + WAN21_LATENT_RGB_BIAS
  if upscale > 1:
    rgb = rgb.repeat(upscale, axis=1).repeat(upscale, axis=2)
  return to_uint8(rgb)


def upscale(frames_thwc: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour upscaling of frames `[T, H, W, 3]` by an integer factor (tiny videos)."""
  return frames_thwc if factor <= 1 else np.asarray(frames_thwc).repeat(factor, axis=1).repeat(factor, axis=2)


def write_contact_sheet(frames_thwc: np.ndarray, path: str, *, columns: int | None = None, factor: int = 4, gap: int = 2) -> str:
  """Writes every frame of a video `[T, H, W, 3]` (uint8) as one PNG grid, row by row.

  Args:
    frames_thwc: the frames.
    path: the .png to write (atomically).
    columns: frames per row (default: about a square sheet).
    factor: nearest-neighbour upscaling of each frame.
    gap: dark pixels between frames.

  Returns:
    `path`.
  """
  import imageio.v3 as iio  # noqa: PLC0415

  from asvd.outputs import publish  # noqa: PLC0415

  x = upscale(np.asarray(frames_thwc, np.uint8), factor)
  t, h, w = x.shape[:3]
  cols = columns or max(1, int(np.ceil(np.sqrt(t * h / w))))
  rows = -(-t // cols)
  sheet = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 24, np.uint8)
  for i in range(t):
    r, c = divmod(i, cols)
    sheet[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = x[i]
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
  os.close(fd)
  try:
    iio.imwrite(tmp, sheet, extension=".png")
    publish(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_mp4(
  frames: Iterable[np.ndarray], path: str, fps: int = 16, on_chunk: Callable[[int], None] | None = None
) -> int:
  """Appends chunks of uint8 frames `[T, H, W, 3]` to an H.264 mp4 as they arrive.

  The file appears at `path` only when complete (written as a temporary file and renamed).

  Args:
    frames: an iterable of frame chunks (the first chunk fixes the size).
    path: the .mp4 to write.
    fps: frames per second (>= 1).
    on_chunk: called with the number of frames after each chunk is written.

  Returns:
    The number of frames written.

  Raises:
    UsageError: bad fps or frame shape. OutputError: ffmpeg failed (its message is included).
  """
  if not isinstance(fps, int) or fps < 1:
    raise UsageError(f"fps={fps!r}: must be an integer >= 1")
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".mp4", dir=folder)
  os.close(fd)
  proc, n, err = None, 0, b""
  try:
    for chunk in frames:
      chunk = np.asarray(chunk)
      if chunk.ndim != 4 or chunk.shape[-1] != 3 or chunk.dtype != np.uint8:
        raise UsageError(f"video frames must be uint8 [T, H, W, 3], got {chunk.dtype} {chunk.shape}")
      if proc is None:
        h, w = chunk.shape[1:3]
        cmd = [
          ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
          "-s", f"{w}x{h}", "-r", str(fps), "-i", "-",
          # yuv420p (what players expect) needs even sizes: pad odd ones by a pixel.
          "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
          "-crf", "18", "-movflags", "+faststart", "-f", "mp4", tmp,
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        size = (h, w)
      if chunk.shape[1:3] != size:
        raise UsageError(f"video frames changed size from {size} to {chunk.shape[1:3]}")
      try:
        proc.stdin.write(np.ascontiguousarray(chunk).tobytes())
      except BrokenPipeError:
        break  # ffmpeg died: its message is read below
      n += len(chunk)
      if on_chunk is not None:
        on_chunk(len(chunk))
    if proc is None:
      raise UsageError(f"{path}: no frames to write")
    proc.stdin.close()
    err = proc.stderr.read()
    if proc.wait() != 0:
      raise OutputError(f"{path}: ffmpeg failed: {err.decode(errors='replace').strip()[-500:]}")
    from asvd.outputs import publish  # noqa: PLC0415

    publish(tmp, path)
    return n
  finally:
    if proc is not None and proc.poll() is None:
      proc.kill()
      proc.wait()
    if os.path.exists(tmp):
      os.remove(tmp)


def read_frames(path: str, hw: tuple[int, int], max_frames: int | None = None, *, last: bool = True) -> np.ndarray:
  """Reads an image or a video, resized to `hw` (bicubic), as uint8 `[T, H, W, 3]`.

  Images are read with Pillow; videos are decoded by ffmpeg into a raw pipe.

  Args:
    path: the file.
    hw: output (H, W).
    max_frames: keep at most this many frames (the last ones if `last`, else the first).
    last: which end of a long video to keep.
  """
  if not os.path.isfile(path):
    raise UsageError(f"{path}: no such file")
  h, w = int(hw[0]), int(hw[1])
  from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

  try:
    with Image.open(path) as im:
      if getattr(im, "n_frames", 1) == 1:
        return np.asarray(im.convert("RGB").resize((w, h), Image.BICUBIC))[None]
  except UnidentifiedImageError:
    pass  # not an image: try it as a video
  cmd = [ffmpeg_exe(), "-loglevel", "error", "-i", path, "-vf", f"scale={w}:{h}:flags=bicubic", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
  p = subprocess.run(cmd, capture_output=True, check=False)
  frame = h * w * 3
  if p.returncode != 0 or len(p.stdout) < frame:
    raise UsageError(f"{path}: not a readable image or video ({p.stderr.decode(errors='replace').strip()[-300:] or 'no frames'})")
  arr = np.frombuffer(p.stdout[: len(p.stdout) // frame * frame], np.uint8).reshape(-1, h, w, 3)
  if max_frames is not None and len(arr) > max_frames:
    arr = arr[-max_frames:] if last else arr[:max_frames]
  return arr


def video_size(path: str) -> tuple[int, int]:
  """`(H, W)` of a video's first video stream, from ffmpeg's description of the file."""
  import re  # noqa: PLC0415

  p = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", path], capture_output=True, check=False)
  m = re.search(rb"Video: .*?, (\d{1,5})x(\d{1,5})[ ,\n]", p.stderr)
  if m is None:
    raise UsageError(f"{path}: no video stream found")
  return int(m.group(2)), int(m.group(1))


def read_video(path: str) -> np.ndarray:
  """Every frame of a video at its own size, uint8 `[T, H, W, 3]` (no fork of this process)."""
  h, w = video_size(path)
  return read_frames(path, (h, w))


__all__ = ["write_mp4", "read_frames", "read_video", "video_size", "latent_preview", "to_uint8"]
