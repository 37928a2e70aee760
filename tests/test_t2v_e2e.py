"""Text-to-video end to end on tiny random weights written in the real on-disk formats.

The weights folder mimics Wan2.1-T2V-1.3B: `Wan2.1_VAE.pth` (original VAE naming),
`models_t5_umt5-xxl-enc-bf16.pth` (Wan's T5 naming, bf16), `google/umt5-xxl/spiece.model`,
Wan's `config.json`, and a Self-Forcing `self_forcing_dmd.pt` (generator/generator_ema with
`model.` prefixes). The torch models are diffusers / transformers ones, renamed here.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="writing the .pt/.pth formats needs the `torch` extra")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from cli_env import ENV  # noqa: E402
from torch_refs import dit_to_wan_names, t5_to_wan_names  # noqa: E402

from asvd.ckpt import vae_port  # noqa: E402

VAE_CFG = dict(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[], temperal_downsample=[False, True, True])
TAEHV_CFG = dict(decoder_channels=(16, 8, 8, 8), encoder_channels=8)
T5_CFG = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=32, relative_attention_max_distance=128)

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  root = tmp_path_factory.mktemp("wan_tiny")
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  # VAE in the original naming.
  mean, std = rng.normal(size=16).round(3).tolist(), (0.5 + rng.random(16)).round(3).tolist()
  vae = diffusers.AutoencoderKLWan(**VAE_CFG, latents_mean=mean, latents_std=std).eval()
  torch.save({vae_port.diffusers_to_original_key(k, VAE_CFG): v for k, v in vae.state_dict().items()}, root / "Wan2.1_VAE.pth")
  # umT5 encoder in Wan's naming, bf16 as released.
  t5 = transformers.UMT5EncoderModel(transformers.UMT5Config(**T5_CFG)).eval()
  torch.save({k: v.to(torch.bfloat16) for k, v in t5_to_wan_names(t5.state_dict()).items()}, root / "models_t5_umt5-xxl-enc-bf16.pth")
  # Tokenizer: a tiny sentencepiece model with umT5's special ids.
  tok_dir = root / "google" / "umt5-xxl"
  tok_dir.mkdir(parents=True)
  corpus = root / "corpus.txt"
  words = ["cat", "dog", "surfing", "wave", "sunset", "city", "night", "red", "car", "forest", "river", "a", "the", "on", "in"]
  corpus.write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(300)))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tok_dir / "spiece"), vocab_size=32, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram")
  # Self-Forcing DiT checkpoint + Wan's config.json.
  dit = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2).eval()
  wan = {f"model.{k}": v for k, v in dit_to_wan_names(dit.state_dict()).items()}
  torch.save({"generator": wan, "generator_ema": wan, "critic": {}}, root / "self_forcing_dmd.pt")
  (root / "config.json").write_text(json.dumps({"model_type": "t2v", "dim": 64, "num_heads": 2, "ffn_dim": 128, "freq_dim": 32, "num_layers": 2, "in_dim": 16, "out_dim": 16, "text_dim": 32, "text_len": 16, "patch_size": [1, 2, 2], "eps": 1e-6}))
  # TAEHV in the published key layout (tiny widths; the config names them in pipeline.taehv).
  from taehv_ref import Ref  # noqa: PLC0415

  from asvd.models.taehv import TAEHVConfig  # noqa: PLC0415

  torch.save(Ref(TAEHVConfig(**TAEHV_CFG)).state_dict(), root / "taew2_1.pth")
  cfg = root / "tiny_t2v.py"
  cfg.write_text(
    "from asvd.config import load_config\n\n\n"
    "def get_config(arg=None):\n"
    "  c = load_config('configs/tiny.py')\n"
    f"  c.pipeline.vae = {dict(VAE_CFG, latents_mean=mean, latents_std=std)!r}\n"
    "  c.pipeline.text_encoder = dict(vocab_size=128, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, num_buckets=32, max_distance=128)\n"
    f"  c.pipeline.taehv = {TAEHV_CFG!r}\n"
    "  c.rollout.latent_hw = (4, 4)\n"
    "  return c\n"
  )
  return root, cfg


def run(*args):
  return subprocess.run([sys.executable, "-m", "asvd.main", *args], capture_output=True, text=True, env=ENV)


def read_video(path):
  from asvd.video import read_video as read  # noqa: PLC0415  (ffmpeg without forking pytest)

  return read(str(path))


def test_generate_mp4_from_prompt(weights, tmp_path):
  root, cfg = weights
  p = run("generate", "--config", str(cfg), "--weights", str(root), "--prompt", "a cat surfing a wave at sunset", "--chunks", "2", "--out", str(tmp_path))
  assert p.returncode == 0, p.stderr[-3000:]
  frames = read_video(tmp_path / "video.mp4")
  # 3 latent frames -> 1 + 4*2 = 9 pixel frames, then 12 per chunk; 32x32 pixels (latent 4x4 x 8).
  assert frames.shape == (9 + 12, 32, 32, 3)
  assert frames.std() > 1.0  # not a constant image
  meta = json.loads((tmp_path / "generate.json").read_text())
  assert meta["frames"] == 21


def test_taehv_decoder_streams_the_rollout(weights, tmp_path):
  """`--decoder taehv`: the same frame counts as the Wan VAE, and the frames are TAEHV's decode of
  `asvd.rollout`'s latents for the same prompt and seed (the pipeline's value-level check)."""
  import jax  # noqa: PLC0415

  import asvd  # noqa: PLC0415
  from asvd import pipeline, video  # noqa: PLC0415

  root, cfg = weights
  p = run("generate", "--config", str(cfg), "--weights", str(root), "--prompt", "a cat surfing a wave", "--decoder", "taehv", "--chunks", "2", "--out", str(tmp_path))
  assert p.returncode == 0, p.stderr[-3000:]
  assert read_video(tmp_path / "video.mp4").shape == (9 + 12, 32, 32, 3)
  conf = asvd.load_config(str(cfg))
  pipe = pipeline.T2V.from_weights(str(root), config=conf, decoder="taehv")
  assert isinstance(pipe.decoder, asvd.TAEHV)
  got = frames_of(pipe.generate("a red car at night", chunks=2, seed=3))
  lat, _ = asvd.rollout(pipe.dit, pipe.encode_prompt(["a red car at night"]), jax.random.key(3), num_chunks=2, config=conf.rollout, sampler_config=conf.sampler)
  want = video.to_uint8(pipe.decoder.decode(lat)[0]).astype(np.int32)
  assert got.shape == want.shape == (21, 32, 32, 3)
  assert np.abs(got - want).max() <= 1
  # DiT-only generation and `asvd decode` take the TAEHV file as --vae too.
  p = run("decode", str(tmp_path / "missing.npy"), "--vae", str(root / "taew2_1.pth"), "--out", str(tmp_path / "d"))
  assert p.returncode == 2 and "missing.npy" in p.stderr
  np.save(tmp_path / "lat.npy", np.asarray(lat))
  p = run("decode", str(tmp_path / "lat.npy"), "--vae", str(root / "taew2_1.pth"), "--config", str(cfg), "--out", str(tmp_path / "d"))
  assert p.returncode == 0, p.stderr[-3000:]
  assert np.abs(read_video(tmp_path / "d" / "video.mp4").astype(np.int32) - want).mean() < 3  # h264
  # Without the file, one line naming it.
  bare = tmp_path / "bare"
  bare.mkdir()
  for f in root.iterdir():
    if f.name != "taew2_1.pth":
      os.symlink(f, bare / f.name)
  p = run("generate", "--config", str(cfg), "--weights", str(bare), "--prompt", "x", "--decoder", "taehv", "--out", str(tmp_path / "o"))
  assert p.returncode == 2 and "taew2_1.pth" in p.stderr


def test_image_conditioning(weights, tmp_path):
  import imageio.v3 as iio

  root, cfg = weights
  img = (np.indices((32, 32)).sum(0)[..., None] * np.array([4, 2, 1]) % 255).astype(np.uint8)
  iio.imwrite(tmp_path / "start.png", img)
  p = run("generate", "--config", str(cfg), "--weights", str(root), "--prompt", "a red car", "--image", str(tmp_path / "start.png"), "--chunks", "1", "--out", str(tmp_path / "o"))
  assert p.returncode == 0, p.stderr[-3000:]
  frames = read_video(tmp_path / "o" / "video.mp4")
  assert frames.shape == (1 + 12, 32, 32, 3)  # the given frame, then one chunk continuing it


def test_missing_weights_listed(weights, tmp_path):
  root, cfg = weights
  partial = tmp_path / "partial"
  partial.mkdir()
  os.symlink(root / "Wan2.1_VAE.pth", partial / "Wan2.1_VAE.pth")
  p = run("generate", "--config", str(cfg), "--weights", str(partial), "--prompt", "x", "--out", str(tmp_path / "o"))
  assert p.returncode == 2
  assert "[ok] vae" in p.stderr and "[MISSING] text_encoder" in p.stderr and "[MISSING] tokenizer" in p.stderr
  assert "[MISSING] dit" in p.stderr
  p = run("generate", "--weights", str(root), "--out", str(tmp_path / "o"))
  assert p.returncode == 2 and "--prompt" in p.stderr


def test_dit_only_generate_with_vae_writes_latents_and_mp4(weights, tmp_path):
  root, cfg = weights
  p = run("generate", "--config", str(cfg), "--init", "random", "--vae", str(root / "Wan2.1_VAE.pth"), "--chunks", "2", "--out", str(tmp_path))
  assert p.returncode == 0, p.stderr[-3000:]
  assert np.load(tmp_path / "latents.npy").shape == (1, 6, 4, 4, 16)
  generated = read_video(tmp_path / "video.mp4")
  assert generated.shape == (9 + 12, 32, 32, 3)
  # `asvd decode` of the saved latents gives the same video (the same VAE, chunked differently).
  p = run("decode", str(tmp_path / "latents.npy"), "--vae", str(root), "--config", str(cfg), "--out", str(tmp_path / "dec"))
  assert p.returncode == 0, p.stderr[-3000:]
  np.testing.assert_array_equal(read_video(tmp_path / "dec" / "video.mp4"), generated)
  # Too little memory for the decoder: one line naming it, before the DiT's work (its check
  # would fail too, later), and nothing written.
  p = run("generate", "--config", str(cfg), "--init", "random", "--vae", str(root / "Wan2.1_VAE.pth"), "--chunks", "2", "--out", str(tmp_path / "small"), "--config.runtime.memory_limit_gib=0.0001")
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
  assert "error: decode: the Wan VAE's first-chunk program needs" in p.stderr and "--decoder taehv" in p.stderr
  assert not (tmp_path / "small" / "latents.npy").exists()


@pytest.fixture(scope="module")
def pipe(weights):
  import asvd  # noqa: PLC0415
  from asvd import pipeline  # noqa: PLC0415

  root, cfg = weights
  return pipeline.T2V.from_weights(str(root), config=asvd.load_config(str(cfg)))


def frames_of(gen):
  return np.concatenate(list(gen), axis=0).astype(np.int32)


def test_pipeline_frames_are_the_decoded_rollout(pipe):
  """Value level: the pipeline's frames == the VAE decode of `asvd.rollout`'s latents for the
  same prompt and seed (so neither the prompt nor the latents get lost on the way)."""
  import jax  # noqa: PLC0415

  import asvd  # noqa: PLC0415
  from asvd import video  # noqa: PLC0415

  got = frames_of(pipe.generate("a red car at night", chunks=2, seed=3))
  ctx = pipe.encode_prompt(["a red car at night"])
  lat, _ = asvd.rollout(pipe.dit, ctx, jax.random.key(3), num_chunks=2, config=pipe.config.rollout, sampler_config=pipe.config.sampler)
  want = video.to_uint8(pipe.vae.decode(lat)[0]).astype(np.int32)
  assert got.shape == want.shape
  assert np.abs(got - want).max() <= 1  # streaming vs whole decode, then uint8 rounding


def test_prompts_change_the_video(pipe):
  a = frames_of(pipe.generate("a cat surfing a wave", chunks=1, seed=0))
  b = frames_of(pipe.generate("a dog in the forest", chunks=1, seed=0))
  assert np.abs(a - b).mean() > 1.0


def test_image_conditioning_starts_from_the_image(pipe):
  """The video starts with the given image (as the VAE reproduces it) and the continuation
  depends on it."""
  import jax.numpy as jnp  # noqa: PLC0415

  from asvd import video  # noqa: PLC0415

  rng = np.random.default_rng(0)
  img, other = (np.clip(np.cumsum(rng.normal(size=(1, 32, 32, 3)), axis=1) / 8, -1, 1).astype(np.float32) for _ in range(2))
  cond = frames_of(pipe.generate("a red car", chunks=1, seed=0, condition=img))
  cond2 = frames_of(pipe.generate("a red car", chunks=1, seed=0, condition=other))
  roundtrip = video.to_uint8(pipe.vae.decode(pipe.vae.encode(jnp.asarray(img[None])))[0]).astype(np.int32)
  assert cond.shape[0] == 1 + 12  # the image's frame, then a chunk continuing it (4F frames)
  assert np.abs(cond[:1] - roundtrip).max() <= 1  # the first frame is the encoded image's decode
  assert np.abs(cond[1:] - cond2[1:]).mean() > 1.0  # and the continuation depends on the image


def test_video_folder_dataset_trains(weights, tmp_path):
  """Bring-your-own data: mp4s + captions -> VAE latents and umT5 embeddings (computed once,
  stored as TFDS array_record) -> the grain pipeline -> a teacher training step."""
  import asvd  # noqa: PLC0415
  from asvd import pipeline, video  # noqa: PLC0415
  from asvd.data.pipeline import make_iterator  # noqa: PLC0415

  root, cfg_path = weights
  clips = tmp_path / "clips"
  clips.mkdir()
  rng = np.random.default_rng(0)
  for name in ("a", "b"):  # 2 clips of 9 pixel frames each (3 latent frames), 32x32
    frames = (np.cumsum(rng.integers(0, 8, (18, 32, 32, 3)), axis=0) % 255).astype(np.uint8)
    video.write_mp4([frames], str(clips / f"{name}.mp4"), fps=16)
  (clips / "captions.json").write_text(json.dumps({"a.mp4": "a red car at night"}))
  (clips / "b.txt").write_text("a cat surfing a wave")
  over = [f"--config.train.data.folder={clips}", f"--config.train.data.weights={root}", "--config.train.data.name=video_folder", "--config.train.data.frames=3", "--config.train.horizon_frames=3"]
  cfg = asvd.load_config(str(cfg_path), over)
  it = make_iterator(cfg, (4, 4), batch_size=2, seed=0, data_dir=str(tmp_path / "data"))
  batch = next(it)
  assert batch["latents"].shape == (2, 3, 4, 4, 16) and batch["text"].shape == (2, 16, 32)
  # Value level: each example is the VAE encoding of its clip and the caption's embedding.
  tok, enc, vae = pipeline.load_encoders(str(root), cfg)
  px = video.read_frames(str(clips / "b.mp4"), (32, 32))[:9].astype(np.float32) / 127.5 - 1.0
  want_lat = np.asarray(vae.encode(px[None]))[0]
  want_txt = np.asarray(asvd.encode_prompts(enc, tok, ["a cat surfing a wave"]))[0]
  from asvd.data.pipeline import data_source  # noqa: PLC0415

  src = data_source(cfg, (4, 4), str(tmp_path / "data"))  # the stored dataset (no regeneration)
  ex = {str(src[i]["source"], "utf-8") if isinstance(src[i]["source"], bytes) else src[i]["source"]: src[i] for i in range(len(src))}
  assert sorted(ex) == ["a.mp4[0:9]", "a.mp4[9:18]", "b.mp4[0:9]", "b.mp4[9:18]"]
  np.testing.assert_allclose(ex["b.mp4[0:9]"]["latents"], want_lat, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ex["b.mp4[0:9]"]["text"], np.float32), want_txt, rtol=1e-3, atol=1e-3)  # stored as float16
  assert not np.allclose(ex["a.mp4[0:9]"]["text"], ex["b.mp4[0:9]"]["text"])
  # ... and DMD trains on it (the teacher: a random tiny DiT), its windows starting mid-rollout
  # (rollouts of 6 frames, H = 3) with their first latent re-encoded by the VAE; the CLI reads
  # the dataset prepared above (train.data.data_dir).
  teacher = tmp_path / "teacher"
  asvd.save_dit(asvd.init_dit(cfg.model, 3), teacher)
  dmd = [f"--config.train.dmd.teacher={teacher}", "--config.train.dmd.steps=1", "--config.train.dmd.rollout_chunks=2", "--config.train.state_dmd=False", "--config.train.sample_every=0"]
  p = run("train", "--config", str(cfg_path), "--workdir", str(tmp_path / "run"), "--no-progress", *over, *dmd, f"--config.train.data.data_dir={tmp_path / 'data'}", "--config.train.stages=('dmd',)", "--config.train.batch_size=2")
  assert p.returncode == 0, p.stderr[-3000:]
  assert f"re-encoded by the VAE in {root}" in p.stderr
  assert [json.loads(x)["stage"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == ["dmd"]
  assert not (tmp_path / "run" / "data").exists()
  # A missing caption is one clear line naming the file.
  (clips / "c.mp4").write_bytes((clips / "a.mp4").read_bytes())
  p = run("train", "--config", str(cfg_path), "--workdir", str(tmp_path / "run2"), "--no-progress", *over, "--config.train.stages=('teacher',)")
  assert p.returncode == 2 and "no caption for c.mp4" in p.stderr


def test_dmd_reencodes_the_first_latent_of_mid_rollout_windows(weights):
  """method.md, Training 4, against the VAE's public decode / encode on each window's own prefix:
  the first latent of a window starting at `s` is the image latent of the last pixel frame of
  latent `s`; a state-led window (state_dmd) and the window at 0 keep theirs."""
  import jax.numpy as jnp  # noqa: PLC0415

  import asvd  # noqa: PLC0415
  from asvd import pipeline  # noqa: PLC0415
  from asvd.train import steps as st  # noqa: PLC0415
  from asvd.train.trainer import layout  # noqa: PLC0415

  root, cfg_path = weights
  cfg = asvd.load_config(str(cfg_path))
  lay = layout(cfg)
  vae = pipeline.load_encoders(str(root), cfg)[2]
  rng = np.random.default_rng(0)
  frames = jnp.asarray(rng.normal(size=(2, 9, 4, 4, 16)), jnp.float32)
  states = jnp.asarray(rng.normal(size=(2, 3, 1, 4, 4, 16)), jnp.float32)

  def image_latent(s):
    px = vae.decode(frames[:, : s + 1])
    return np.asarray(vae.encode(px[:, -1:]))[:, 0]

  # H = 4, F = 3: windows start at 0, 3 (a chunk boundary: the state's with state_dmd) and 5.
  for state_dmd in (False, True):
    wins, ends = st.dmd_windows(frames, states, lay, 4, state_dmd, vae)
    assert ends == [4, 7, 9]
    np.testing.assert_array_equal(wins[0], frames[:, :4])
    want3 = np.asarray(states[:, 0, -1]) if state_dmd else image_latent(3)
    np.testing.assert_allclose(wins[1][:, 0], want3, rtol=0, atol=1e-5)
    np.testing.assert_allclose(wins[2][:, 0], image_latent(5), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(wins[1][:, 1:], frames[:, 4:7])
    np.testing.assert_array_equal(wins[2][:, 1:], frames[:, 6:9])
  assert np.abs(image_latent(5) - np.asarray(frames[:, 5])).max() > 0.1  # a real replacement

