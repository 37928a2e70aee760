"""The PanWorld teacher's motion warm-up (asvd/data/pan_fields.py): field pans move by exactly
their caption's velocity in tokens, are smooth, normalised and fixed per index; the training
iterator serves `train.teacher.motion_warmup` batches of them and then the data, resumably;
configs that cannot warm up are one error before any work."""

import numpy as np
import pytest

import asvd
from asvd.data import pan_fields
from asvd.data import panworld as pw


def test_a_field_clip_moves_by_the_cameras_velocity():
  rng = np.random.default_rng(0)
  for v in ((0, 1), (0, -2), (1, 0), (-2, 0)):
    clip = pan_fields.field_clip(rng, v, 6, (8, 8), 12)
    assert clip.shape == (6, 8, 8, 12) and clip.dtype == np.float32
    dy, dx = v
    for t in range(5):  # the scene moves against the camera: frame t+1 at p is frame t at p + v
      a = clip[t + 1, max(0, -dy) : 8 - max(0, dy), max(0, -dx) : 8 - max(0, dx)]
      b = clip[t, max(0, dy) : 8 + min(0, dy), max(0, dx) : 8 + min(0, dx)]
      np.testing.assert_array_equal(a, b)
    assert np.abs(clip[1] - clip[0]).mean() > 0.1  # and it does move
  # Unit scale and smooth over a few tokens (a 1-token shift is visible, not noise).
  big = pan_fields.field_clip(np.random.default_rng(1), (0, 1), 2, (64, 64), 12)
  assert abs(float(big.mean())) < 0.2 and 0.8 < float(big.std()) < 1.2
  corr = np.mean(big[0, :, 1:] * big[0, :, :-1]) / np.mean(big[0] ** 2)
  assert 0.6 < corr < 0.98


def test_field_source_is_fixed_per_index_and_labels_its_motion():
  table = {c: np.full((2, 3), i, np.float32) for i, c in enumerate(pw.all_captions())}
  src = pan_fields.FieldSource(16, 5, (8, 8), 12, {"slowly": 1, "quickly": 2}, table, seed=4)
  assert len(src) == 16
  for i in range(16):
    ex = src[i]
    np.testing.assert_array_equal(ex["latents"], src[i]["latents"])  # the same clip every time
    np.testing.assert_array_equal(ex["text"], table[ex["caption"]])
    dy, dx = pw.parse_caption(ex["caption"]).velocity({"slowly": 1, "quickly": 2})
    z = ex["latents"]
    np.testing.assert_array_equal(z[1, max(0, -dy) : 8 - max(0, dy), max(0, -dx) : 8 - max(0, dx)], z[0, max(0, dy) : 8 + min(0, dy), max(0, dx) : 8 + min(0, dx)])
  assert len({src[i]["caption"] for i in range(16)}) > 4 and np.abs(src[0]["latents"] - src[1]["latents"]).mean() > 0.1


def _cfg(*over):
  return asvd.load_config("configs/panworld.py", ["--config.train.data.clips=8", "--config.train.data.frames=9", *over])


def test_iterator_serves_the_warmup_then_the_data_and_resumes(tmp_path):
  from asvd.data.pipeline import make_iterator  # noqa: PLC0415

  cfg = _cfg("--config.train.data.world_speeds=(2, 4)", "--config.train.teacher.motion_warmup=3")
  kw = dict(batch_size=2, seed=0, data_dir=str(tmp_path))
  it = make_iterator(cfg, (8, 8), warmup=3, **kw)
  batches = [next(it) for _ in range(5)]
  fields = pan_fields.warmup_source(cfg, (8, 8), str(tmp_path))
  field_set = [fields[i]["latents"] for i in range(len(fields))]
  for k, b in enumerate(batches):
    assert b["latents"].shape == (2, 9, 8, 8, 12) and b["text"].shape == (2, 16, 32)
    is_field = [any(np.array_equal(x, f) for f in field_set) for x in b["latents"]]
    assert is_field == [k < 3] * 2, k  # 3 batches of field pans, then PanWorld clips
  plain = make_iterator(cfg, (8, 8), warmup=0, **kw)
  np.testing.assert_array_equal(batches[3]["latents"], next(plain)["latents"])  # the data stream as without a warm-up
  resumed = make_iterator(cfg, (8, 8), warmup=3, **kw)
  for _ in range(2):
    next(resumed)
  state = resumed.get_state()
  again = make_iterator(cfg, (8, 8), warmup=3, **kw)
  again.set_state(state)
  for k in (2, 3, 4):  # across the boundary
    np.testing.assert_array_equal(next(again)["latents"], batches[k]["latents"])


def test_configs_that_cannot_warm_up_are_one_error():
  from asvd.train.trainer import check_config  # noqa: PLC0415

  check_config(_cfg("--config.train.data.world_speeds=(2, 4)", "--config.train.teacher.motion_warmup=100"))
  for over, words in (
    (["--config.train.data.world_speeds=(1, 2)", "--config.train.teacher.motion_warmup=100"], "world_speeds=(1, 2)"),  # half a token per frame
    (["--config.train.teacher.steps=400", "--config.train.teacher.motion_warmup=400"], "train.teacher.steps=400"),
    (["--config.train.data.world_speeds=(2, 4)", "--config.train.teacher.motion_warmup=10", "--config.train.data.name=synthetic_pan"], "synthetic_pan"),
  ):
    with pytest.raises(asvd.UsageError, match=words.replace("(", r"\(").replace(")", r"\)")):
      check_config(_cfg(*over))
  # Fields move in latent positions: with 2x2-latent DiT tokens (4 px) a (4, 8)-pixel camera is
  # 2 and 4 latent positions per frame, as the data's latents move.
  big = _cfg("--config.model.patch_size=(1, 2, 2)", "--config.train.data.world_speeds=(4, 8)")
  assert pan_fields.token_speeds(big) == {"slowly": 2, "quickly": 4}
  with pytest.raises(asvd.UsageError, match="4-pixel token"):
    pan_fields.token_speeds(_cfg("--config.model.patch_size=(1, 2, 2)"))  # (2, 4) px: half a token
