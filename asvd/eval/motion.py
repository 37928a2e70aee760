"""Motion metrics of generated PanWorld videos, measured against the caption's true camera motion.

PanWorld's camera moves a known number of pixels per frame (`asvd.data.panworld`), so how much of
the commanded motion a generator keeps can be measured rather than judged. Per video and per
segment of `H` frames (the training horizon):

* `speed`: the scene's measured shift per frame (orientation correlation, `measure_shift`, median
  over the segment's frame pairs) projected on the commanded one and divided by its length: 1 is
  the caption's speed, 0 a still camera, < 0 the wrong way.
* `motion`: the measured shift's length in pixels per frame, whatever its direction (a
  continuous motion magnitude).
* `dynamic`: VBench's dynamic degree with block matching in place of RAFT flow: a frame pair
  moves when its fastest 5% of 4 x 4 blocks (the "top" of the flow, `block_motion`) move more than
  `DYNAMIC_PX`; a video is dynamic when at least a quarter of its pairs move; the table gives the
  share of dynamic videos.
* `freeze`: the share of frame pairs that changed less than `FREEZE_FRACTION` of what real
  PanWorld frames of the same caption change (mean absolute difference).
* `drift_start` / `drift_data`: the distance between frame statistics (mean and standard
  deviation of each colour channel, mean gradient magnitude; all on a 0..1 scale) of the segment
  and of the first segment, and of real PanWorld clips of the same caption. A video that slowly
  turns to grey or noise drifts: its pixels change, but it is not motion, and these two columns
  say so where `motion` alone could not.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from asvd.data import panworld
from asvd.eval import stats

DYNAMIC_PX = 0.5  # a block moving more than this (pixels per frame) makes its frame pair move
DYNAMIC_SHARE = 0.25  # a video is dynamic when at least this share of its pairs move
FREEZE_FRACTION = 0.1  # a pair is frozen below this fraction of real frames' change
FADED_CONTRAST = 0.5  # a frame below this share of real frames' contrast has faded
REWIND_SIMILARITY = 0.8  # a late frame this correlated with frame 0 shows frame 0's view again
LOOP_SHARE = 0.05  # a segment loops when this share of its late frames return to frame 0


def frame_shifts(frames_thwc: np.ndarray) -> np.ndarray:
  """float `[T - 1, 2]`: the scene's `(dy, dx)` shift between consecutive frames."""
  return np.asarray([panworld.measure_shift(frames_thwc[i], frames_thwc[i + 1]) for i in range(len(frames_thwc) - 1)], np.float64)


def block_motion(frames_thwc: np.ndarray, block: int = 4, search: int = 3, keep: float = 0.5, top: float = 0.05) -> np.ndarray:
  """float `[T - 1]`: per frame pair, the mean motion of its fastest `top` share of blocks.

  A block-matching flow: each `block x block` block of the later frame is matched in the earlier
  one over integer displacements up to `search` pixels (mean absolute grey difference, ties to
  the shorter displacement). A block moves only when its best match leaves at most `keep` of the
  difference a still block would (so a noisy or flat block stays put). The mean of the fastest
  `top` share is VBench's "top of the flow" on frames this small: a small moving object counts
  even when the background is still.
  """
  x = np.asarray(frames_thwc, np.float64).mean(-1)  # [T, H, W] grey
  t, h, w = x.shape
  hb, wb = h // block, w // block
  pad = np.pad(x, ((0, 0), (search, search), (search, search)), mode="edge")
  disp = sorted(((dy, dx) for dy in range(-search, search + 1) for dx in range(-search, search + 1)), key=lambda d: np.hypot(*d))
  costs = np.empty((len(disp), t - 1, hb, wb))
  for i, (dy, dx) in enumerate(disp):  # b[y, x] ~ a[y - dy, x - dx]; disp[0] is (0, 0)
    a = pad[:-1, search - dy : search - dy + h, search - dx : search - dx + w]
    costs[i] = np.abs(x[1:] - a)[:, : hb * block, : wb * block].reshape(t - 1, hb, block, wb, block).mean((2, 4))
  best = np.argmin(costs, axis=0)  # the first minimum: the shortest displacement among ties
  moved = np.take_along_axis(costs, best[None], 0)[0] <= keep * costs[0]
  mag = np.where(moved, np.hypot(*np.asarray(disp, np.float64).T)[best], 0.0).reshape(t - 1, -1)
  k = max(1, int(np.ceil(top * mag.shape[1])))
  return np.sort(mag, axis=1)[:, -k:].mean(1)


def frame_stats(frames_thwc: np.ndarray) -> np.ndarray:
  """float `[7]`: mean and std of each colour channel and the mean gradient magnitude (0..1)."""
  x = np.asarray(frames_thwc, np.float64) / 255.0
  gy, gx = np.gradient(x.mean(-1), axis=(1, 2))
  return np.concatenate([x.mean((0, 1, 2)), x.std((0, 1, 2)), [np.hypot(gy, gx).mean()]])


def _grey(frames_thwc: np.ndarray) -> np.ndarray:
  return np.asarray(frames_thwc, np.float64).mean(-1) / 255.0  # [T, H, W], 0..1


def frame_contrast(frames_thwc: np.ndarray) -> np.ndarray:
  """float `[T]`: each frame's grey-level contrast (pixel standard deviation, 0..1 scale)."""
  return _grey(frames_thwc).std((1, 2))


def frame_sharpness(frames_thwc: np.ndarray) -> np.ndarray:
  """float `[T]`: each frame's edge strength (mean grey gradient magnitude, 0..1 per pixel)."""
  gy, gx = np.gradient(_grey(frames_thwc), axis=(1, 2))
  return np.hypot(gy, gx).mean((1, 2))


def similarity_to(frames_thwc: np.ndarray, frame_hwc: np.ndarray) -> np.ndarray:
  """float `[T]`: the correlation of each frame's grey levels with `frame_hwc`'s (-1..1).

  Correlation ignores brightness and contrast, so a dim copy of the anchor frame still counts as
  the anchor's content; a flat frame (no contrast) scores 0."""
  a = _grey(frames_thwc)
  a = a - a.mean((1, 2), keepdims=True)
  b = _grey(np.asarray(frame_hwc)[None])[0]
  b = b - b.mean()
  den = np.sqrt((a * a).sum((1, 2)) * (b * b).sum())
  return np.where(den > 1e-12, (a * b).sum((1, 2)) / np.maximum(den, 1e-12), 0.0)


def mean_abs_change(frames_thwc: np.ndarray) -> np.ndarray:
  """float `[T - 1]`: mean absolute difference of consecutive frames (0..255)."""
  x = np.asarray(frames_thwc, np.float64)
  return np.abs(np.diff(x, axis=0)).mean((1, 2, 3))


@dataclasses.dataclass(frozen=True)
class Reference:
  """What real PanWorld videos of one caption look like: frame statistics, contrast, sharpness,
  frame change and the camera's velocity."""

  stats: np.ndarray  # [7], as frame_stats
  change: float  # mean absolute difference of consecutive frames
  velocity: tuple[int, int]  # the caption's camera (dy, dx) in pixels per frame at the data's speeds
  contrast: float = 1.0  # mean frame_contrast of real frames
  sharpness: float = 1.0  # mean frame_sharpness of real frames

  @classmethod
  def of_caption(
    cls, caption: str, frames: int, height: int, width: int, *, clips: int = 8, seed: int = 0, scale: float = 1.0, texture: float = 0.3, speeds: dict | None = None
  ) -> Reference:
    """Renders `clips` clips of `caption` (random worlds and starts; `scale`, `texture`,
    `speeds`: the world's look and the camera's speeds, as the model's training data,
    `panworld.world`) and measures them."""
    rng = np.random.default_rng(seed)
    vids = [panworld.render_clip(panworld.spec_of_caption(caption, rng), frames, height, width, speeds=speeds, scale=scale, texture=texture) for _ in range(clips)]
    velocity = panworld.parse_caption(caption).velocity(speeds)
    return cls(
      np.mean([frame_stats(v) for v in vids], axis=0),
      float(np.mean([mean_abs_change(v).mean() for v in vids])),
      velocity,
      float(np.mean([frame_contrast(v).mean() for v in vids])),
      float(np.mean([frame_sharpness(v).mean() for v in vids])),
    )


def _nan_stat(fn, x) -> float:
  x = np.asarray(x, np.float64)
  return float(fn(x)) if x.size else float("nan")


def segment_metrics(frames_thwc: np.ndarray, velocity, first_thwc: np.ndarray, ref: Reference, *, start: int = 0, chunk_frames: int | None = None, horizon: int | None = None) -> dict:
  """The metrics of one segment of one video (module docstring).

  Args:
    frames_thwc: uint8 `[T, H, W, 3]`, the segment.
    velocity: the caption's camera `(dy, dx)` in pixels per frame (the scene moves by `-v`).
    first_thwc: the video's first segment (for `drift_start`; its frame 0 for `sim0`).
    ref: real clips of the same caption.
    start: the segment's first frame index in the video (for chunk boundaries and `rewind`).
    chunk_frames: frames per generated chunk (`F`), for `speed_boundary`; None: no boundaries.
    horizon: the training horizon `H`: `rewind` counts frames from index `H` on (None: the
      segment's length).
  """
  t = len(frames_thwc)
  horizon = t if horizon is None else int(horizon)
  v = -np.asarray(velocity, np.float64)
  contrast = frame_contrast(frames_thwc) / max(ref.contrast, 1e-12)
  sharp = frame_sharpness(frames_thwc) / max(ref.sharpness, 1e-12)
  kept = contrast >= FADED_CONTRAST  # [T]
  pair_ok = kept[:-1] & kept[1:]  # [T - 1]: only pairs of frames that kept their look count
  shifts = frame_shifts(frames_thwc)
  proj = shifts @ v / (v @ v)
  idx = np.arange(start + 1, start + t)  # the later frame of each pair
  boundary = pair_ok & (idx % chunk_frames == 0) if chunk_frames else np.zeros_like(pair_ok)
  change = mean_abs_change(frames_thwc)
  moving = block_motion(frames_thwc) > DYNAMIC_PX
  sim = similarity_to(frames_thwc, first_thwc[0])
  late = np.arange(start, start + t) >= max(horizon, 1)
  st = frame_stats(frames_thwc)
  faded = float(1.0 - kept.mean())
  freeze = _nan_stat(np.mean, change[pair_ok] < FREEZE_FRACTION * ref.change)
  rewind = _nan_stat(np.mean, sim[late] >= REWIND_SIMILARITY)
  m = {
    "contrast": float(contrast.mean()),
    "sharpness": float(sharp.mean()),
    "faded": faded,
    "speed": _nan_stat(np.median, proj[pair_ok]),
    "speed_mean": _nan_stat(np.mean, proj[pair_ok]),
    "speed_boundary": _nan_stat(np.mean, proj[boundary]),
    "motion": _nan_stat(np.median, np.hypot(shifts[pair_ok, 0], shifts[pair_ok, 1])),
    "dynamic": float(moving[pair_ok].mean() >= DYNAMIC_SHARE) if pair_ok.any() else float("nan"),
    "freeze": freeze,
    "sim0": _nan_stat(np.mean, sim[1:] if start == 0 else sim),
    "rewind": rewind,
    "drift_start": float(np.abs(st - frame_stats(first_thwc)).mean()),
    "drift_data": float(np.abs(st - ref.stats).mean()),
  }
  m["label"] = label(m)
  return m


def label(m: dict) -> str:
  """What a segment is, from its metrics: `faded` (most frames lost half of the real contrast;
  never counted as moving or frozen), `frozen` (most frame pairs barely change), `loops` (late
  frames return to frame 0's view) or `moves`."""
  if m["faded"] >= 0.5:
    return "faded"
  if np.isfinite(m["freeze"]) and m["freeze"] >= 0.5:
    return "frozen"
  if np.isfinite(m["rewind"]) and m["rewind"] >= LOOP_SHARE:
    return "loops"
  return "moves"


def segments(total: int, horizon: int, multiples) -> dict[str, tuple[int, int]]:
  """`{"1x": (start, end), "2.4x": ...}`: the `horizon` frames ending at `round(m * horizon)`."""
  out = {}
  for m in multiples:
    end = round(float(m) * horizon)
    if end > total:
      raise ValueError(f"a {m}x segment ends at frame {end}, past the {total} frames generated")
    out[f"{float(m):g}x"] = (max(0, end - horizon), end)
  return out


def video_metrics(frames_thwc: np.ndarray, horizon: int, multiples, ref: Reference, chunk_frames: int | None = None) -> dict[str, dict]:
  """`{segment: metrics}` of one video at each multiple of the horizon (`ref`: real clips of
  its caption, whose camera velocity it is measured against; `chunk_frames`: the generator's
  `F`, for the chunk-boundary speed)."""
  first = frames_thwc[:horizon]
  return {
    k: segment_metrics(frames_thwc[a:b], ref.velocity, first, ref, start=a, chunk_frames=chunk_frames, horizon=horizon)
    for k, (a, b) in segments(len(frames_thwc), horizon, multiples).items()
  }


def sample_motion(frames_thwc: np.ndarray, caption: str, speeds: dict | None = None) -> dict[str, float]:
  """`{"sample/speed", "sample/motion"}` of one whole video of `caption` (what the trainer logs
  for its PanWorld samples): measured speed / commanded (at the data's `speeds`, default
  `panworld.SPEEDS`), and shift length in pixels per frame."""
  v = -np.asarray(panworld.parse_caption(caption).velocity(speeds), np.float64)
  shifts = frame_shifts(frames_thwc)
  return {"sample/speed": float(np.median(shifts @ v) / (v @ v)), "sample/motion": float(np.median(np.hypot(shifts[:, 0], shifts[:, 1])))}


def _probe_clips(config, clips: int, seed: int):
  """Real PanWorld clips of `horizon_frames` frames for probing a denoiser: `(specs, x0 [B, F,
  h, w, C] latents, eps, codec)` (random captions of the grammar; the world's look of `config`)."""
  import jax  # noqa: PLC0415

  from asvd.models import pixel_codec  # noqa: PLC0415

  codec = pixel_codec.from_config(config)
  h, w = (int(n) * codec.patch for n in config.rollout.latent_hw)
  frames = int(config.train.horizon_frames)
  rng = np.random.default_rng(seed)
  specs = [panworld.sample_spec(rng) for _ in range(clips)]
  vids = np.stack([panworld.render_clip(s, frames, h, w, **panworld.world(config)) for s in specs])
  x0 = np.asarray(codec.encode(vids.astype(np.float32) / 127.5 - 1.0))
  return specs, x0, np.asarray(jax.random.normal(jax.random.key(seed), x0.shape)), codec


def _clean_prediction(predict, x0, eps, sig: float, first_clean: bool, text) -> np.ndarray:
  """The denoiser's `x0 = x_t - sigma v` for `x0` noised at `sig` (frame 0 clean if asked)."""
  from asvd.train.losses import noised  # noqa: PLC0415

  s = np.full(x0.shape[:2], float(sig), np.float32)
  if first_clean:
    s[:, 0] = 0.0
  x_t = np.asarray(noised(x0, eps, s))
  return x_t - s[..., None, None, None] * np.asarray(predict(x_t, 1000.0 * s, text), np.float32)


def denoiser_motion(predict, config, sigmas=(0.3, 0.6, 0.8, 0.95), *, clips: int = 32, seed: int = 0, first_clean: bool = False) -> dict[float, float]:
  """How much of the captions' motion a PanWorld denoiser puts into its clean prediction.

  Real clips of `horizon_frames` frames are noised at each sigma (every frame; with
  `first_clean` frame 0 stays clean, as a causal student's context is), the flow prediction
  turned into `x0 = x_t - sigma v`, decoded, and its frame-to-frame shift measured against the
  caption's (`speed` as in `segment_metrics`). A teacher whose samples stand still shows it here
  first: the speed falls to 0 as the noise grows, where a denoiser that knew the motion from the
  text (or from the clean frame) would keep it.

  Args:
    predict: `(x_t [B, F, h, w, C], t [B, F], text [B, L, D]) -> v`, e.g. a `WanDiT`.
    config: the PanWorld config (pixel codec, text path, horizon, world's look).
    sigmas: noise levels.
    clips: real clips per sigma (random captions of the grammar).
    seed: which clips and noise.
    first_clean: keep frame 0 clean.

  Returns:
    `{sigma: mean speed ratio over the clips}`.
  """
  specs, x0, eps, codec = _probe_clips(config, clips, seed)
  text = panworld.embed_prompts(config, [s.caption for s in specs])
  speeds = panworld.world(config)["speeds"]
  out = {}
  for sig in sigmas:
    pred = codec.to_uint8(_clean_prediction(predict, x0, eps, sig, first_clean, text))
    ratios = []
    for p, spec in zip(pred, specs, strict=True):
      v = -np.asarray(spec.velocity(speeds), np.float64)
      ratios.append(float(np.median(frame_shifts(p) @ v) / (v @ v)))
    out[float(sig)] = float(np.mean(ratios))
  return out


# Each direction of the grammar and the one that moves the other way.
REVERSE = {d: next(e for e, (y2, x2) in panworld.DIRECTIONS.items() if (y2, x2) == (-y, -x)) for d, (y, x) in panworld.DIRECTIONS.items()}


def direction_gain(predict, config, sigmas=(0.5, 0.8), *, clips: int = 32, seed: int = 0, first_clean: bool = True) -> dict[float, float]:
  """How much a PanWorld denoiser takes the camera's direction from the caption.

  The same noisy clips are denoised twice, with their captions and with each caption's direction
  reversed ("pans left" for "pans right"); the gain is the relative growth of the clean
  prediction's error (frames 1.. against the clip) under the reversed captions. A denoiser that
  reads the direction from the text scores > 0 where the noise hides the motion; one that ignores
  it scores 0 at every sigma, which is what a teacher whose samples stand still shows (README
  "PanWorld"). Cheap (two forwards per sigma), so it suits a recipe search.

  Args:
    predict: `(x_t [B, F, h, w, C], t [B, F], text [B, L, D]) -> v`, e.g. a `WanDiT`.
    config: the PanWorld config.
    sigmas: noise levels.
    clips: real clips (random captions of the grammar).
    seed: which clips and noise.
    first_clean: keep frame 0 clean (the causal student's situation: content to carry along).

  Returns:
    `{sigma: err(reversed captions) / err(captions) - 1}`.
  """
  specs, x0, eps, _ = _probe_clips(config, clips, seed)
  right = panworld.embed_prompts(config, [s.caption for s in specs])
  wrong = panworld.embed_prompts(config, [dataclasses.replace(s, direction=REVERSE[s.direction]).caption for s in specs])
  out = {}
  for sig in sigmas:
    errs = [float(np.mean(np.square((_clean_prediction(predict, x0, eps, sig, first_clean, t) - x0)[:, 1:]))) for t in (right, wrong)]
    out[float(sig)] = errs[1] / max(errs[0], 1e-12) - 1.0
  return out


METRICS = ("contrast", "sharpness", "faded", "speed", "speed_mean", "speed_boundary", "motion", "dynamic", "freeze", "sim0", "rewind", "drift_start", "drift_data")
LABELS = ("moves", "frozen", "loops", "faded")


def aggregate(per_video: list[dict[str, dict]], seed: int = 0) -> dict[str, dict[str, dict]]:
  """Each metric at each segment over the videos: `{segment: {metric: {"mean", "lo", "hi",
  "n"}}}` (bootstrap 95% interval, `asvd.eval.stats`; NaNs drop out), plus the share of videos
  of each `label` (`"label/moves"`, ...)."""
  segs = per_video[0].keys()
  out = {}
  for s in segs:
    row = {m: stats.bootstrap([v[s][m] for v in per_video], seed=seed).as_dict() for m in METRICS}
    for lab in LABELS:
      row[f"label/{lab}"] = stats.bootstrap([float(v[s]["label"] == lab) for v in per_video], seed=seed).as_dict()
    out[s] = row
  return out
