"""The motion metrics of `asvd eval motion` (asvd/eval/motion.py) on videos whose motion is known:
real PanWorld clips score the caption's speed, a frozen video none, a reversed one the opposite,
a video that fades away drifts without moving, and VBench-style dynamic degree and freeze tell
moving from still."""

import numpy as np
import pytest

from asvd.data import panworld as pw
from asvd.eval import motion

H = 9


def _clip(caption: str, frames: int = 3 * H, seed: int = 0):
  base = pw.parse_caption(caption)
  spec = pw.ClipSpec(base.direction, base.speed, base.biome, base.color, base.obj, seed=seed, start=(50 * seed, -30 * seed))
  return pw.render_clip(spec, frames, 32, 32)


@pytest.fixture(scope="module")
def ref():
  return motion.Reference.of_caption("camera pans left quickly over a snowy forest", H, 32, 32, clips=4)


def test_real_clips_score_the_captions_speed_and_no_freeze_or_drift(ref):
  cap = "camera pans left quickly over a snowy forest"
  m = motion.video_metrics(_clip(cap, seed=3), H, (1, 2, 3), ref)
  for seg in ("1x", "2x", "3x"):
    assert m[seg]["speed"] == pytest.approx(1.0, abs=0.05), m
    assert m[seg]["motion"] == pytest.approx(2.0, abs=0.1)  # "quickly": 2 pixels per frame
    assert m[seg]["dynamic"] == 1.0 and m[seg]["freeze"] == 0.0
    assert m[seg]["drift_data"] < 0.03 and m[seg]["drift_start"] < 0.03, m  # same biome: same statistics
  # Every direction and both speeds (the projection on the commanded motion, not its length).
  for cap2 in ("camera pans up slowly over a sandy desert", "camera pans down quickly over a green meadow, a red ball bounces", "camera pans right slowly over a rocky canyon"):
    r2 = motion.Reference.of_caption(cap2, H, 32, 32, clips=2)
    assert motion.video_metrics(_clip(cap2, seed=1), H, (1,), r2)["1x"]["speed"] == pytest.approx(1.0, abs=0.1), cap2


def test_speeds_of_the_data_are_what_the_caption_commands():
  """A model trained with `train.data.world_speeds=(2, 4)` is measured against those speeds."""
  cap = "camera pans right slowly over a green meadow"
  base = pw.parse_caption(cap)
  v = pw.render_clip(pw.ClipSpec(base.direction, base.speed, base.biome, seed=4), H, 32, 32, speeds={"slowly": 2, "quickly": 4})
  fast = motion.Reference.of_caption(cap, H, 32, 32, clips=2, speeds={"slowly": 2, "quickly": 4})
  assert fast.velocity == (0, 2)
  assert motion.video_metrics(v, H, (1,), fast)["1x"]["speed"] == pytest.approx(1.0, abs=0.05)
  assert motion.video_metrics(v, H, (1,), motion.Reference.of_caption(cap, H, 32, 32, clips=2))["1x"]["speed"] == pytest.approx(2.0, abs=0.1)
  assert motion.sample_motion(v, cap, {"slowly": 2, "quickly": 4})["sample/speed"] == pytest.approx(1.0, abs=0.05)


def test_sample_motion_of_a_whole_video():
  cap = "camera pans up quickly over a green meadow, a red ball bounces"
  m = motion.sample_motion(_clip(cap, frames=H, seed=2), cap)
  assert m["sample/speed"] == pytest.approx(1.0, abs=0.05) and m["sample/motion"] == pytest.approx(2.0, abs=0.1)
  assert motion.sample_motion(_clip(cap, frames=H, seed=2)[::-1].copy(), cap)["sample/speed"] == pytest.approx(-1.0, abs=0.05)


def test_frozen_reversed_and_fading_videos(ref):
  cap = "camera pans left quickly over a snowy forest"
  v = _clip(cap, seed=5)
  frozen = np.repeat(v[:1], len(v), axis=0)
  m = motion.video_metrics(frozen, H, (1, 3), ref)["3x"]
  assert m["speed"] == pytest.approx(0.0, abs=1e-6) and m["motion"] < 1e-6 and m["dynamic"] == 0.0 and m["freeze"] == 1.0
  back = motion.video_metrics(v[::-1].copy(), H, (1,), ref)["1x"]  # the camera the other way
  assert back["speed"] == pytest.approx(-1.0, abs=0.05) and back["dynamic"] == 1.0
  # Half as fast: every other frame repeated.
  slow = np.repeat(v[: len(v) // 2 + 1], 2, axis=0)[: len(v)]
  assert motion.video_metrics(slow, H, (1,), ref)["1x"]["speed"] == pytest.approx(0.5, abs=0.26)
  # Fading to grey: the frames change, the scene does not move the commanded way and the
  # statistics drift away from the start and from the data.
  w = np.linspace(0.0, 1.0, len(v))[:, None, None, None]
  fade = np.round(v * (1 - w) + 128 * w).astype(np.uint8)
  f = motion.video_metrics(fade, H, (1, 3), ref)
  assert f["3x"]["drift_start"] > 5 * f["1x"]["drift_start"] and f["3x"]["drift_data"] > 0.05
  assert motion.video_metrics(v, H, (1, 3), ref)["3x"]["drift_data"] < 0.03


def test_dynamic_degree_sees_a_moving_object_on_a_still_background():
  spec = pw.ClipSpec("left", "quickly", "a sandy desert", "red", "ball", seed=2, obj_velocity=(1.4, 1.3))
  v = pw.render_clip(spec, H, 32, 32)
  still = np.stack([pw.render_clip(spec, 1, 32, 32)[0]] * H)
  # The ball alone moves: draw it on the still background.
  obj = v.copy()
  for t in range(H):
    bg = still[t].copy()
    pw._draw_object(bg, spec, t)
    obj[t] = bg
  dyn = motion.block_motion(obj)
  assert (dyn > motion.DYNAMIC_PX).mean() >= motion.DYNAMIC_SHARE
  assert (motion.block_motion(still) <= motion.DYNAMIC_PX).all()


def test_segments_name_their_frames_and_refuse_past_the_end():
  assert motion.segments(54, 9, (1, 2.4, 6)) == {"1x": (0, 9), "2.4x": (13, 22), "6x": (45, 54)}
  with pytest.raises(ValueError, match="past the 50 frames"):
    motion.segments(50, 9, (6,))


def test_denoiser_motion_tells_a_denoiser_that_knows_the_motion_from_one_that_stands_still():
  """`denoiser_motion` on two hand-made denoisers of PanWorld's config: the exact one (it
  returns the true flow, so its clean prediction is the clip) keeps the captions' speed at every
  sigma; one that predicts frame 0 for every frame keeps none."""
  import asvd  # noqa: PLC0415
  from asvd.models import pixel_codec  # noqa: PLC0415

  cfg = asvd.load_config("configs/panworld.py")
  codec = pixel_codec.from_config(cfg)
  n, frames, clips = 8 * codec.patch, int(cfg.train.horizon_frames), 6
  rng = np.random.default_rng(0)  # the clips denoiser_motion draws (seed 0), drawn again here
  vids = np.stack([pw.render_clip(pw.sample_spec(rng), frames, n, n, **pw.world(cfg)) for _ in range(clips)])
  x0 = np.asarray(codec.encode(vids.astype(np.float32) / 127.5 - 1.0))

  def flow_to(target):
    def predict(x_t, t, text):  # v = (x_t - x0) / sigma: the clean prediction is `target`
      return (x_t - target) / (np.asarray(t) / 1000.0)[..., None, None, None]

    return predict

  exact = motion.denoiser_motion(flow_to(x0), cfg, (0.3, 0.95), clips=clips)
  still = motion.denoiser_motion(flow_to(np.repeat(x0[:, :1], frames, axis=1)), cfg, (0.3, 0.95), clips=clips)
  assert all(v == pytest.approx(1.0, abs=0.05) for v in exact.values()), exact
  assert all(abs(v) < 0.05 for v in still.values()), still


def test_direction_gain_tells_a_denoiser_that_reads_the_direction_from_one_that_does_not():
  """`direction_gain` on hand-made denoisers: one that reads the caption (the clip for its own
  caption, the clip run backwards, i.e. the reversed camera, for the reversed one) gains at every
  sigma; one that returns the clip whatever the caption gains nothing."""
  import asvd  # noqa: PLC0415
  from asvd.models import pixel_codec  # noqa: PLC0415

  cfg = asvd.load_config("configs/panworld.py")
  codec = pixel_codec.from_config(cfg)
  n, frames, clips = 8 * codec.patch, int(cfg.train.horizon_frames), 4
  rng = np.random.default_rng(0)  # the clips direction_gain draws (seed 0), drawn again here
  specs = [pw.sample_spec(rng) for _ in range(clips)]
  x0 = np.asarray(codec.encode(np.stack([pw.render_clip(s, frames, n, n, **pw.world(cfg)) for s in specs]).astype(np.float32) / 127.5 - 1.0))
  own = np.asarray(pw.embed_prompts(cfg, [s.caption for s in specs]))
  off = 0.3 * np.random.default_rng(1).standard_normal(x0.shape).astype(np.float32)  # both err a little

  def denoiser(reads_text):
    def predict(x_t, t, text):
      same = np.all(np.isclose(np.asarray(text), own), axis=(1, 2))[:, None, None, None, None]
      target = np.where(same | (not reads_text), x0, x0[:, ::-1]) + off
      return (x_t - target) / np.maximum(np.asarray(t) / 1000.0, 1e-6)[..., None, None, None]

    return predict

  reads = motion.direction_gain(denoiser(True), cfg, (0.5, 0.9), clips=clips)
  blind = motion.direction_gain(denoiser(False), cfg, (0.5, 0.9), clips=clips)
  assert all(v > 1.0 for v in reads.values()), reads
  assert all(v == pytest.approx(0.0, abs=1e-6) for v in blind.values()), blind


# ------------------------------------------------------------------------------------------------
# What a segment is: planted fading, looping, frozen and stalling videos are named as such.
# ------------------------------------------------------------------------------------------------

LOOK = {"speeds": {"slowly": 2, "quickly": 4}}  # the bundled config's whole-token speeds, 16 px
CAPTIONS = ("camera pans left quickly over a snowy forest", "camera pans down slowly over a sandy desert, a red ball bounces")


def _planted(caption, seed):
  """A real 6x clip and its fading, looping, frozen and boundary-stalling versions."""
  spec = pw.spec_of_caption(caption, np.random.default_rng(seed))
  v = pw.render_clip(spec, 6 * H, 16, 16, **LOOK)
  w = np.clip((np.arange(6 * H) - 3) / H, 0, 1)[:, None, None, None]  # to flat tan within a horizon
  fade = np.round(v * (1 - w) + np.asarray([180, 160, 120]) * w).astype(np.uint8)
  loop = v[np.arange(6 * H) % 7]  # pans for 7 frames, then jumps back to frame 0's view
  frozen = np.repeat(v[:1], 6 * H, axis=0)
  # The camera stands still on every pair that crosses a chunk boundary (F = 3) and moves on the others.
  stall = v[np.cumsum(np.arange(6 * H) % 3 != 0)]
  return {"real": v, "fade": fade, "loop": loop, "frozen": frozen, "stall": stall}


@pytest.mark.parametrize("caption", CAPTIONS)
def test_planted_videos_are_named_as_what_they_are(caption):
  ref = motion.Reference.of_caption(caption, H, 16, 16, **LOOK)
  for seed in (0, 1):
    m = {k: motion.video_metrics(x, H, (1, 2.4, 6), ref, chunk_frames=3) for k, x in _planted(caption, seed).items()}
    labels = {k: [s["label"] for s in r.values()] for k, r in m.items()}
    assert labels["real"] == ["moves"] * 3 and labels["stall"] == ["moves"] * 3, labels
    assert labels["fade"][1:] == ["faded", "faded"] and labels["loop"][1:] == ["loops", "loops"], labels
    assert labels["frozen"] == ["frozen"] * 3, labels
    # A faded segment is neither moving nor frozen: its speeds and freeze are not measured.
    late = m["fade"]["6x"]
    assert late["faded"] == 1.0 and late["contrast"] < 0.1 and all(np.isnan(late[k]) for k in ("speed", "speed_mean", "speed_boundary", "freeze"))
    for seg, (a, b) in motion.segments(6 * H, H, (1, 2.4, 6)).items():
      r = m["real"][seg]
      assert r["contrast"] == pytest.approx(1.0, abs=0.5) and r["sharpness"] == pytest.approx(1.0, abs=0.5) and r["faded"] < 0.5
      assert r["speed"] == pytest.approx(1.0, abs=0.05) and r["speed_boundary"] == pytest.approx(1.0, abs=0.05)
      # The median hides a stall at every chunk boundary; the mean and the boundary speed show it.
      s = m["stall"][seg]
      moving_pairs = np.mean(np.arange(a + 1, b) % 3 != 0)  # 5 or 6 of the segment's 8 pairs
      assert s["speed"] == pytest.approx(1.0, abs=0.05) and s["speed_mean"] == pytest.approx(moving_pairs, abs=0.03) and abs(s["speed_boundary"]) < 0.05, s
    assert m["frozen"]["6x"]["sim0"] == pytest.approx(1.0) and m["loop"]["6x"]["rewind"] >= motion.LOOP_SHARE
    assert m["real"]["6x"]["rewind"] == 0.0 and abs(m["real"]["6x"]["sim0"]) < 0.4


def test_aggregate_gives_intervals_and_label_shares():
  ref = motion.Reference.of_caption(CAPTIONS[0], H, 16, 16, **LOOK)
  vids = [_planted(CAPTIONS[0], s) for s in range(3)]
  per = [motion.video_metrics(v[k], H, (1, 6), ref, chunk_frames=3) for v in vids for k in ("real", "fade")]
  agg = motion.aggregate(per)
  assert agg["6x"]["label/faded"]["mean"] == pytest.approx(0.5) and agg["6x"]["label/moves"]["mean"] == pytest.approx(0.5)
  sp = agg["6x"]["speed"]  # only the three real videos count: the faded ones have no speed
  assert sp["n"] == 3 and sp["lo"] <= sp["mean"] <= sp["hi"] and sp["mean"] == pytest.approx(1.0, abs=0.05)
  assert agg["6x"]["contrast"]["n"] == 6
