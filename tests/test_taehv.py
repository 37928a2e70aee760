"""TAEHV against a PyTorch model of the reference architecture written here from its description
(madebyollin/taehv: `nn.Sequential` decoder/encoder of 2D convs, MemBlocks fed their input one
frame earlier with zeros before the first, TGrow/TPool as 1x1 convs plus NCHW reshapes), loaded
from a `.pth` in the published key layout; and streaming against whole-video decoding."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from taehv_ref import Ref  # noqa: E402

from asvd.ckpt.taehv_port import load_taehv  # noqa: E402
from asvd.models.taehv import TAEHVConfig, init_taehv  # noqa: E402

CFG = TAEHVConfig(decoder_channels=(16, 8, 8, 8), encoder_channels=8)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  torch.manual_seed(0)
  ref = Ref(CFG).eval()
  with torch.no_grad():  # weights large enough that every layer matters
    for p in ref.parameters():
      p.mul_(1.5)
  sd = {k: v.clone() for k, v in ref.state_dict().items()}
  # The published taew2_1 has 512 rows in its first TGrow (trained with time upscaling) and the
  # model keeps the last 256: write a checkpoint with extra leading rows.
  k = "decoder.7.conv.weight"
  sd[k] = torch.cat([torch.randn_like(sd[k]), sd[k]], 0)
  path = tmp_path_factory.mktemp("taehv") / "taew2_1.pth"
  torch.save(sd, path)
  return ref, load_taehv(path, config=CFG)


def test_decode_matches_the_reference_architecture(pair):
  ref, model = pair
  z = np.random.default_rng(0).normal(size=(2, 4, 4, 6, 16)).astype(np.float32)  # [B, f, h, w, C]
  with torch.no_grad():
    want = ref.decode(torch.from_numpy(z).permute(0, 1, 4, 2, 3)).permute(0, 1, 3, 4, 2).numpy()
  got = (np.asarray(model.decode(jnp.asarray(z))) + 1.0) / 2.0
  assert got.shape == (2, 13, 32, 48, 3) == want.shape  # 1 + 4 (f - 1) frames, x8 in space
  assert 0.05 < want.std()  # not a saturated output
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_encode_matches_the_reference_architecture(pair):
  ref, model = pair
  px = np.random.default_rng(1).uniform(size=(1, 8, 32, 48, 3)).astype(np.float32)  # [0, 1]
  with torch.no_grad():
    want = ref.encode(torch.from_numpy(px).permute(0, 1, 4, 2, 3)).permute(0, 1, 3, 4, 2).numpy()
  got = np.asarray(model.encode(jnp.asarray(2.0 * px - 1.0)))
  assert got.shape == (1, 2, 4, 6, 16) == want.shape
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  # A frame count that is not a multiple of 4: the last frame repeats.
  pad = np.concatenate([px[:, :7], px[:, 6:7]], 1)
  np.testing.assert_allclose(np.asarray(model.encode(jnp.asarray(2.0 * px[:, :7] - 1.0))), np.asarray(model.encode(jnp.asarray(2.0 * pad - 1.0))), atol=1e-6)


def test_streaming_decode_equals_whole_video_and_wan_vae_frame_counts():
  from asvd.models.vae import init_vae  # noqa: PLC0415

  model = init_taehv(CFG, 3)
  z = jnp.asarray(np.random.default_rng(2).normal(size=(1, 7, 4, 6, 16)), jnp.float32)
  whole = model.decode(z)
  memory, parts = model.init_decode_cache(), []
  for a, b in ((0, 1), (1, 4), (4, 7)):  # chunks of 1 (the first latent), 3, 3
    px, memory = model.decode_chunk(z[:, a:b], memory)
    parts.append(px)
  # Different program shapes: equal up to float order (an ulp), not bitwise.
  np.testing.assert_allclose(np.concatenate(parts, 1), np.asarray(whole), atol=1e-6, rtol=0)
  wan = init_vae(dict(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1, temperal_downsample=(False, True, True)), 0)
  assert [p.shape[1] for p in parts] == [wan.num_pixel_frames(1), wan.num_pixel_frames(3, first=False), wan.num_pixel_frames(3, first=False)] == [1, 12, 12]


def test_bad_files_are_one_clear_error(tmp_path):
  from asvd.ckpt.common import CheckpointError  # noqa: PLC0415

  with pytest.raises(CheckpointError, match="no such file"):
    load_taehv(tmp_path / "missing.pth")
  bad = tmp_path / "taew2_1.pth"
  torch.save({"encoder.0.weight": torch.zeros(8, 3, 3, 3)}, bad)
  with pytest.raises(CheckpointError, match="not a TAEHV checkpoint"):
    load_taehv(bad)
  ref = Ref(CFG)
  sd = dict(ref.state_dict())
  sd.pop("decoder.1.bias")
  torch.save(sd, bad)
  with pytest.raises(CheckpointError, match=r"decoder\.1\.bias"):
    load_taehv(bad, config=CFG)
