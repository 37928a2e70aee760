"""PanWorld (asvd/data/panworld.py): procedural pans whose true motion is known. The world is
deterministic and endless, the caption grammar round-trips, the measured scene motion of every
frame pair is the caption's (a planted sign or speed error fails), and the TFDS builder stores
what the renderer draws."""

import numpy as np
import pytest

from asvd.data import panworld as pw


def test_world_is_deterministic_endless_and_windowed():
  spec = pw.ClipSpec("left", "quickly", "a snowy forest", "red", "ball", seed=7, start=(12, -40))
  whole = pw.render_clip(spec, 9, 24, 32)
  assert whole.shape == (9, 24, 32, 3) and whole.dtype == np.uint8
  np.testing.assert_array_equal(whole, pw.render_clip(spec, 9, 24, 32))
  np.testing.assert_array_equal(whole[5:], pw.render_clip(spec, 4, 24, 32, first=5))  # any window of the clip
  far = pw.render_clip(pw.ClipSpec("left", "quickly", "a snowy forest", seed=7, start=(10**7, -(10**7))), 1, 24, 32)[0]
  assert far.std() > 20 and np.abs(far.astype(int) - whole[0].astype(int)).mean() > 20  # new content everywhere
  other = pw.render_clip(pw.ClipSpec("left", "quickly", "a snowy forest", seed=8, start=(12, -40)), 1, 24, 32)[0]
  assert np.abs(other.astype(int) - whole[0].astype(int)).mean() > 20  # another world seed, another world
  # The look: no fine texture is smoother; a larger scale has larger structures (smoother too).
  def roughness(x):
    return np.abs(np.diff(x.astype(float), axis=2)).mean()

  flat = pw.render_clip(spec, 1, 24, 32, texture=0.0)
  assert roughness(flat) < 0.95 * roughness(whole[:1]) and roughness(pw.render_clip(spec, 1, 24, 32, scale=3.0)) < 0.8 * roughness(whole[:1])
  np.testing.assert_array_equal(whole[:1], pw.render_clip(spec, 1, 24, 32, scale=1.0, texture=0.3))  # the defaults
  # Each biome has its own colours.
  means = [pw.render_clip(pw.ClipSpec("up", "slowly", b, seed=1), 1, 32, 32)[0].reshape(-1, 3).mean(0) for b in pw.BIOMES]
  assert min(np.abs(a - b).max() for i, a in enumerate(means) for b in means[i + 1 :]) > 25


def test_caption_grammar_round_trips_and_names_bad_words():
  caps = pw.all_captions()
  assert len(caps) == len(set(caps)) == len(pw.DIRECTIONS) * len(pw.SPEEDS) * len(pw.BIOMES) * (1 + len(pw.COLORS) * len(pw.OBJECTS))
  for c in caps:
    assert pw.parse_caption(c).caption == c
  assert pw.parse_caption("Camera pans left quickly over a snowy forest, a red ball bounces").velocity() == (0, -2)
  for bad, word in (
    ("camera pans sideways slowly over a snowy forest", "'sideways'"),
    ("camera pans left slowly over a purple swamp", "'a purple swamp'"),
    ("camera pans left slowly over a green meadow, a red ball flies", "ball bounces"),
    ("a cat surfing", "not of the form"),
  ):
    with pytest.raises(ValueError, match=word):
      pw.parse_caption(bad)


def test_measured_motion_is_the_captions_for_every_frame_pair():
  rng = np.random.default_rng(0)
  for _ in range(24):  # with and without objects, every biome, direction and speed
    spec = pw.sample_spec(rng)
    v = pw.render_clip(spec, 6, 32, 32)
    want = -np.asarray(spec.velocity(), float)  # the scene moves against the camera
    for k in range(5):
      np.testing.assert_allclose(pw.measure_shift(v[k], v[k + 1]), want, atol=0.1, err_msg=spec.caption)
  still = pw.render_clip(pw.sample_spec(rng), 1, 32, 32)[0]
  np.testing.assert_allclose(pw.measure_shift(still, still), (0, 0), atol=1e-9)  # a frozen video: no motion


def test_tfds_builder_stores_what_the_renderer_draws(tmp_path):
  cfg = pw.config_for(frames=5, height=16, width=16, clips=6, seed=3)
  builder = pw.PanWorld(config=cfg, data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  src = builder.as_data_source(split="train")
  assert len(src) == 6
  rng = np.random.default_rng(3)
  specs = [pw.sample_spec(rng, cfg.object_prob) for _ in range(6)]
  for i in range(6):
    ex = src[i]
    spec = specs[int(ex["index"])]
    caption = ex["caption"].decode() if isinstance(ex["caption"], bytes) else ex["caption"]
    assert caption == spec.caption
    np.testing.assert_array_equal(ex["video"], pw.render_clip(spec, 5, 16, 16))
    np.testing.assert_array_equal(ex["velocity"], pw.parse_caption(caption).velocity())
  assert sorted(int(src[i]["index"]) for i in range(6)) == list(range(6))
  assert any(s.obj for s in specs) and any(not s.obj for s in specs)


def test_camera_speeds_are_a_knob_of_the_data(tmp_path):
  """`train.data.world_speeds`: the pixels per frame of "slowly" and "quickly"; the dataset's
  name, its clips' motion and its stored velocities follow them, and bad speeds are one error."""
  from asvd.config import base_config
  from asvd.errors import UsageError

  c = base_config()
  c.train.data.world_speeds = (2, 4)
  world = pw.world(c)
  assert world["speeds"] == {"slowly": 2, "quickly": 4}
  cfg = pw.config_for(frames=4, height=16, width=16, clips=3, seed=1, **world)
  assert cfg.name == "f4_h16_w16_n3_s1_o50_v2-4" and pw.config_for(4, 16, 16, 3, 1).name == "f4_h16_w16_n3_s1_o50"
  builder = pw.PanWorld(config=cfg, data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  src = builder.as_data_source(split="train")
  for i in range(3):
    ex = src[i]
    spec = pw.parse_caption(ex["caption"].decode() if isinstance(ex["caption"], bytes) else ex["caption"])
    want = 2 * np.asarray(spec.velocity(), float)  # twice the default speeds
    np.testing.assert_array_equal(ex["velocity"], want)
    for k in range(3):
      np.testing.assert_allclose(pw.measure_shift(ex["video"][k], ex["video"][k + 1]), -want, atol=0.1)
  for bad in ((1, 2, 3), (0, 2), (1.5, 2)):
    c.train.data.world_speeds = bad
    with pytest.raises(UsageError, match="train.data.world_speeds"):
      pw.world(c)


def test_tokenizer_of_the_grammar(tmp_path):
  """A sentencepiece model trained on the grammar, read by asvd's umT5 tokenizer loader: every
  word of every caption is one token (the comma its own), the file is the same each time."""
  import asvd  # noqa: PLC0415

  path = pw.build_tokenizer(str(tmp_path / "a.model"))
  assert (tmp_path / "a.model").read_bytes() == open(pw.build_tokenizer(str(tmp_path / "b.model")), "rb").read()
  tok = asvd.load_tokenizer(path, max_length=20)
  caps = pw.all_captions()
  ids, mask = tok(caps)
  words = [c.replace(",", " ,").split() for c in caps]
  np.testing.assert_array_equal(mask.sum(1), [len(w) + 1 for w in words])  # + EOS
  token = {}
  for row, ws in zip(ids, words, strict=True):
    assert row[len(ws)] == 1 and 2 not in row[: len(ws)]  # EOS after the words, no unknown token
    for t, w in zip(row, ws, strict=False):
      assert token.setdefault(w, t) == t  # one id per word ...
  assert len(set(token.values())) == len(token) == len(pw.vocabulary())  # ... and one word per id


def test_pixel_codec_is_exact_and_streams():
  """Space-to-depth (asvd/models/pixel_codec.py), the pixel-space "VAE" for PanWorld: a rendered
  clip round-trips to the same uint8 frames, each latent position holds its own patch, and the
  pipeline's streaming decode of chunks equals the whole decode."""
  from asvd import pipeline  # noqa: PLC0415
  from asvd.models.pixel_codec import PixelCodec  # noqa: PLC0415

  codec = PixelCodec(patch=4, scale=2.0)
  clip = pw.render_clip(pw.ClipSpec("right", "quickly", "a green meadow", "red", "ball", seed=2), 6, 16, 24)
  px = clip[None].astype(np.float32) / 127.5 - 1.0
  z = codec.encode(px)
  assert z.shape == (1, 6, 4, 6, 48) and codec.latent_channels == 48
  np.testing.assert_allclose(np.asarray(z[0, 2, 1, 3]).reshape(4, 4, 3), 2.0 * px[0, 2, 4:8, 12:16], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(codec.to_uint8(z)[0], clip)
  chunks = [z[:, i : i + 3] for i in (0, 3)]
  streamed = np.concatenate(list(pipeline.decode_stream(codec, chunks)))
  np.testing.assert_array_equal(streamed, clip)
  with pytest.raises(ValueError, match="48"):
    codec.decode(z[..., :16])


def test_training_source_feeds_latents_and_caption_embeddings(tmp_path):
  """`train.data.name="panworld"`: the grain pipeline's batches are the codec's latents of the
  rendered clips and the tiny umT5's embeddings of their captions; bad settings are one error."""
  import os  # noqa: PLC0415

  import asvd  # noqa: PLC0415
  from asvd.data.pipeline import data_source, make_iterator  # noqa: PLC0415
  from asvd.models import pixel_codec  # noqa: PLC0415
  from asvd.models.pixel_codec import PixelCodec  # noqa: PLC0415
  from asvd.text.tokenizer import encode_prompts  # noqa: PLC0415

  over = ["train.data.name=panworld", "train.data.frames=5", "train.data.clips=8", "pipeline.pixel_patch=4", "model.in_channels=48", "model.out_channels=48", "pipeline.pixel_scale=2.0"]
  cfg = asvd.load_config("configs/tiny.py", over)
  with pytest.raises(asvd.UsageError, match="pipeline.text_encoder"):
    data_source(cfg, (4, 4), str(tmp_path))
  cfg.pipeline.text_encoder = dict(vocab_size=192, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2)
  src = data_source(cfg, (4, 4), str(tmp_path))
  tok_file = tmp_path / "panworld" / "tokenizer.model"
  assert sorted(os.listdir(tmp_path / "panworld")) == ["tokenizer.model"]  # no temporary file left
  stamp = tok_file.stat().st_mtime_ns
  batch = next(make_iterator(cfg, (4, 4), batch_size=2, seed=0, data_dir=str(tmp_path)))
  assert batch["latents"].shape == (2, 5, 4, 4, 48) and batch["text"].shape == (2, 16, 32)
  ex = src[3]
  rng = np.random.default_rng(0)  # train.data.seed
  spec = [pw.sample_spec(rng, 0.5) for _ in range(8)][int(ex["index"])]
  assert ex["caption"] == spec.caption and tuple(ex["velocity"]) == spec.velocity()
  codec = pixel_codec.from_config(cfg)
  assert codec == PixelCodec(4, 2.0) and 0.6 < float(np.std(ex["latents"])) < 2.0  # pixels [-1, 1] x 2
  np.testing.assert_array_equal(codec.to_uint8(ex["latents"][None])[0], pw.render_clip(spec, 5, 16, 16))
  tok, enc = pw.text_path(cfg, str(tmp_path))
  np.testing.assert_allclose(ex["text"], np.asarray(encode_prompts(enc, tok, [ex["caption"]]))[0], rtol=1e-5, atol=1e-6)
  assert np.abs(ex["text"]).max() > 0 and len({src[i]["caption"] for i in range(8)}) > 1
  other = next(i for i in range(8) if src[i]["caption"] != ex["caption"])
  assert np.abs(src[other]["text"] - ex["text"]).max() > 1e-3  # distinct captions, distinct embeddings
  assert tok_file.stat().st_mtime_ns == stamp  # written once, then reused (never rewritten)
  with pytest.raises(asvd.UsageError, match="model.in_channels=16"):
    data_source(asvd.load_config("configs/tiny.py", over[:4]), (4, 4), str(tmp_path))  # 16 channels


def test_generate_writes_pixel_video_without_a_vae(tmp_path):
  """`asvd generate --prompt` with a pixel-space config (configs/panworld.py): the caption goes
  through PanWorld's own text path (no weights folder), and video.mp4 is the exact
  space-to-depth decode: one frame per latent frame, the latents' pixels (8x upscaled), with
  frames.png, every frame on one sheet."""
  import json  # noqa: PLC0415
  import os  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  from asvd import video  # noqa: PLC0415

  def generate(out, *args):
    cmd = [sys.executable, "-m", "asvd.main", "generate", "--config", "configs/panworld.py", "--init", "random", "--chunks", "2", "--out", str(tmp_path / out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})

  left = "camera pans left quickly over a snowy forest, a red ball bounces"
  p = generate("a", "--prompt", left)
  assert p.returncode == 0, p.stderr[-2000:]
  rec = json.loads((tmp_path / "a" / "generate.json").read_text())
  assert rec["video"] == "video.mp4" and rec["prompt"] == left
  import imageio.v3 as iio  # noqa: PLC0415

  import asvd  # noqa: PLC0415
  from asvd.cli_generate import PIXEL_VIEW_UPSCALE as UP  # noqa: PLC0415
  from asvd.models import pixel_codec  # noqa: PLC0415

  cfg = asvd.load_config("configs/panworld.py")
  codec = pixel_codec.from_config(cfg)
  hw = tuple(int(n) for n in cfg.rollout.latent_hw)
  n = hw[0] * codec.patch  # frame size in pixels
  lat = np.load(tmp_path / "a" / "latents.npy")
  assert lat.shape == (1, 6, *hw, codec.latent_channels)
  px = codec.to_uint8(lat)[0]
  sheet = iio.imread(tmp_path / "a" / "frames.png")  # lossless: frame k, 4x, row by row, 2-pixel gaps
  np.testing.assert_array_equal(sheet[: 4 * n, : 4 * n], video.upscale(px[:1], 4)[0])
  np.testing.assert_array_equal(sheet[: 4 * n, 4 * n + 2 : 8 * n + 2], video.upscale(px[1:2], 4)[0])
  # Another caption, same seed: another context, another video (the prompt reaches the model).
  assert generate("b", "--prompt", "camera pans up slowly over a sandy desert").returncode == 0
  assert np.abs(np.load(tmp_path / "b" / "latents.npy") - lat).mean() > 1e-3
  # A prompt outside the grammar, or --prompt with a config without its own text path: one line.
  p = generate("c", "--prompt", "camera pans left quickly over a purple swamp")
  assert p.returncode == 2 and "--prompt" in p.stderr and "'a purple swamp'" in p.stderr and "Traceback" not in p.stderr
  p = subprocess.run([sys.executable, "-m", "asvd.main", "generate", "--config", "configs/tiny.py", "--init", "random", "--prompt", left, "--out", str(tmp_path / "d")], capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert p.returncode == 2 and "--prompt needs --weights" in p.stderr and "configs/panworld.py" in p.stderr
  # video.mp4 is upscaled (nearest neighbour): its UP x UP blocks are the pixels.
  big = video.read_frames(str(tmp_path / "a" / "video.mp4"), (UP * n, UP * n))
  frames = big.astype(float).reshape(6, n, UP, n, UP, 3).mean((2, 4))
  assert frames.shape == px.shape == (6, n, n, 3)
  # mp4 (yuv420) blurs pixel noise: compare the grey level of each latent's patch.
  p_ = codec.patch

  def patches(x):
    return x.astype(float).mean(-1).reshape(6, hw[0], p_, hw[1], p_).mean((2, 4)).ravel()

  # measured 0.98; patches put in the wrong places 0.11 (the layout inside a patch: the codec test)
  assert np.corrcoef(patches(frames), patches(px))[0, 1] > 0.9
