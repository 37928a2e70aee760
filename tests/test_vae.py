"""Tests for the Wan2.1 VAE: parity with diffusers, streaming decode, checkpoint import."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances
from flax import nnx

from asvd.ckpt import vae_port
from asvd.ckpt.common import CheckpointError, flat_abstract
from asvd.ckpt.vae_port import load_vae
from asvd.models import vae as vae_lib

_rs = np.random.RandomState(0)
# Two tiny layouts: one spatial+temporal stage, and the full Wan2.1 stage structure (three
# down stages, temporal [False, True, True], two residual blocks) at a small width. The
# latent statistics are random so that the (un)normalisation is exercised.
CONFIGS = {
  "one_stage": dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[True],
    latents_mean=_rs.normal(0.0, 0.5, 4).round(4).tolist(),
    latents_std=_rs.uniform(0.5, 2.0, 4).round(4).tolist(),
  ),
  "wan21_layout": dict(
    base_dim=4,
    z_dim=4,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    latents_mean=_rs.normal(0.0, 0.5, 4).round(4).tolist(),
    latents_std=_rs.uniform(0.5, 2.0, 4).round(4).tolist(),
  ),
}
# Clips per config: 9 frames -> 5 latents (one temporal /2 stage), 17 frames -> 5 (Wan2.1).
PIXEL_SHAPES = {"one_stage": (1, 9, 16, 24, 3), "wan21_layout": (1, 17, 16, 24, 3)}
LATENT_SHAPES = {"one_stage": (1, 5, 8, 12, 4), "wan21_layout": (1, 5, 2, 3, 4)}


def assert_close(actual, expected, what: str, rel: float = tolerances.VAE):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
  err = np.max(np.abs(actual - expected))
  scale = np.max(np.abs(expected))
  assert scale > 0, f"{what}: reference is all zeros"
  assert err <= rel * scale, f"{what}: max abs err {err:.3g} > {rel:g} * scale {scale:.3g}"


def stream(vae, z, chunk_sizes):
  """Decodes z chunk by chunk; returns the concatenated pixels and the per-chunk frame counts."""
  cache = vae.init_decode_cache(z.shape[0], z.shape[2], z.shape[3])
  outs, start = [], 0
  for n in chunk_sizes:
    px, cache = vae.decode_chunk(z[:, start : start + n], cache)
    assert px.shape[1] == vae.num_pixel_frames(n, first=start == 0)
    outs.append(np.asarray(px))
    start += n
  assert start == z.shape[1]
  return np.concatenate(outs, axis=1)


def chunks_of(total: int, n: int) -> list[int]:
  return [min(n, total - i) for i in range(0, total, n)]


# ------------------------------------------------------------------------------------------------
# Parity with diffusers (needs the torch extra).
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
  """(name, diffusers AutoencoderKLWan with random weights, its save_pretrained folder)."""
  torch = pytest.importorskip("torch", reason="diffusers parity tests need the torch extra")
  diffusers = pytest.importorskip("diffusers", reason="parity tests need the torch extra")
  name = request.param
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKLWan(**CONFIGS[name]).eval()
  with torch.no_grad():
    for pname, p in ref.named_parameters():
      if pname.endswith("gamma"):  # ones by default; random so a mis-mapped norm shows
        p.uniform_(0.5, 1.5)
  folder = tmp_path_factory.mktemp(name)
  # The Wan2.1-layout model is saved in shards to exercise the sharded reader.
  shard = "40KB" if name == "wan21_layout" else "10GB"
  ref.save_pretrained(folder, max_shard_size=shard)
  return name, ref, folder


def _to_torch(x_bthwc):
  import torch  # noqa: PLC0415

  return torch.from_numpy(
    np.ascontiguousarray(np.asarray(x_bthwc, np.float32).transpose(0, 4, 1, 2, 3))
  )


def _from_torch(t):
  return t.detach().numpy().transpose(0, 2, 3, 4, 1)


def test_parity_with_diffusers(reference):
  torch = pytest.importorskip("torch")
  name, ref, folder = reference
  cfg = CONFIGS[name]
  if name == "wan21_layout":
    assert any("-of-" in f for f in os.listdir(folder)), "expected a sharded checkpoint"
  vae = load_vae(folder)
  assert vae.config == vae_lib.VAEConfig.from_any(cfg)
  mean, std = np.asarray(cfg["latents_mean"]), np.asarray(cfg["latents_std"])
  rng = np.random.RandomState(1)

  # Encode: diffusers returns the raw posterior mean; ours is normalised with mean / std.
  x = rng.uniform(-1, 1, PIXEL_SHAPES[name]).astype(np.float32)
  with torch.no_grad():
    mu_ref = _from_torch(ref.encode(_to_torch(x)).latent_dist.mode())
  z = vae.encode(x)
  assert z.shape == LATENT_SHAPES[name]
  assert_close(z, (mu_ref - mean) / std, f"{name} encode")

  # Decode: diffusers takes un-normalised latents and clamps its output to [-1, 1].
  z = rng.normal(size=z.shape).astype(np.float32)
  with torch.no_grad():
    px_ref = _from_torch(ref.decode(_to_torch(z * std + mean)).sample)
  px = np.asarray(vae.decode(z))
  assert_close(px, px_ref, f"{name} decode")
  assert np.mean(np.abs(px_ref) < 1.0) > 0.5, "reference output mostly clipped: weak test"

  # Streaming: any chunking gives the pixels of the whole decode.
  for n in (1, 3):
    assert_close(stream(vae, z, chunks_of(z.shape[1], n)), px, f"{name} stream chunks of {n}")


def test_original_pth_layout(reference, tmp_path):
  """The same weights renamed to the original Wan2.1 key names load to the same model."""
  torch = pytest.importorskip("torch")
  name, ref, folder = reference
  cfg = CONFIGS[name]
  sd = ref.state_dict()
  original = {vae_port.diffusers_to_original_key(k, cfg): v.clone() for k, v in sd.items()}
  assert len(original) == len(sd)
  assert "decoder.middle.0.residual.0.gamma" in original and "conv1.weight" in original
  path = tmp_path / vae_port.ORIGINAL_FILENAME
  torch.save(original, path)

  from_folder = load_vae(folder)
  # A Wan2.1 checkpoint folder: the VAE .pth beside the DiT's own config.json (as documented:
  # `asvd.load_vae("Wan2.1-T2V-1.3B")`).
  (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v", "dim": 1536, "num_heads": 12}))
  for src in (path, tmp_path):  # the file, or a Wan folder holding it
    from_pth = load_vae(src, config=cfg)
    a, b = nnx.to_pure_dict(nnx.state(from_folder)), nnx.to_pure_dict(nnx.state(from_pth))
    jax.tree.map(np.testing.assert_array_equal, a, b)

  # A broken original checkpoint names the file and the missing key in its own naming.
  del original["decoder.conv1.bias"]
  torch.save(original, tmp_path / "broken.pth")
  with pytest.raises(CheckpointError) as e:
    load_vae(tmp_path / "broken.pth", config=cfg)
  assert str(tmp_path / "broken.pth") in str(e.value) and "decoder.conv1.bias" in str(e.value)

  # Same outputs too (and checks the original-layout model against diffusers directly).
  z = np.random.RandomState(2).normal(size=LATENT_SHAPES[name]).astype(np.float32)
  mean, std = np.asarray(cfg["latents_mean"]), np.asarray(cfg["latents_std"])
  with torch.no_grad():
    px_ref = _from_torch(ref.decode(_to_torch(z * std + mean)).sample)
  assert_close(from_pth.decode(z), px_ref, f"{name} decode from .pth")


def test_original_key_mapping_matches_diffusers_converter():
  """Our original<->diffusers renaming agrees with diffusers' own converter on the real VAE,
  and the converted real-size shapes match the model tree exactly."""
  torch = pytest.importorskip("torch", reason="needs the torch extra")
  diffusers = pytest.importorskip("diffusers", reason="needs the torch extra")
  from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: PLC0415

  with torch.device("meta"):
    ref = diffusers.AutoencoderKLWan()  # the published Wan2.1 layout, no memory used
  sd = ref.state_dict()
  original = {vae_port.diffusers_to_original_key(k): v for k, v in sd.items()}
  assert len(original) == len(sd) == 194
  # A few names straight from wan/modules/vae.py.
  for k in (
    "conv1.weight",
    "conv2.bias",
    "encoder.conv1.weight",
    "encoder.downsamples.2.resample.1.weight",
    "encoder.downsamples.5.time_conv.weight",
    "encoder.middle.1.to_qkv.weight",
    "encoder.head.2.weight",
    "decoder.upsamples.3.time_conv.weight",
    "decoder.upsamples.4.shortcut.weight",
    "decoder.upsamples.11.resample.1.weight",
    "decoder.upsamples.14.residual.6.weight",
  ):
    assert k in original, k
  assert set(convert_wan_vae_to_diffusers(dict(original))) == set(sd)
  assert all(vae_port.original_to_diffusers_key(k) == sd_k for k, sd_k in zip(original, sd))

  abstract = nnx.eval_shape(lambda: vae_lib.WanVAE(rngs=nnx.Rngs(0)))
  expected = {p: tuple(s.shape) for p, s in flat_abstract(nnx.state(abstract)).items()}
  got = {}
  for k, v in sd.items():
    path = vae_port.diffusers_key_to_path(k)
    assert vae_port.path_to_diffusers_key(path) == k
    got[path] = vae_port.convert_tensor(path, np.broadcast_to(np.float32(0), tuple(v.shape))).shape
  assert got == expected


@pytest.mark.parametrize("reference", ["one_stage"], indirect=True)
def test_bad_checkpoint_lists_every_problem(reference, tmp_path):
  _, _, folder = reference
  from safetensors.numpy import save_file  # noqa: PLC0415

  tensors = {
    k: np.array(v)
    for k, v in vae_port.read_safetensors(folder / "diffusion_pytorch_model.safetensors").items()
  }
  del tensors["decoder.conv_in.bias"]
  tensors["encoder.conv_in.weight"] = np.zeros((8, 3, 3, 3, 2), np.float32)  # wrong kernel width
  tensors["encoder.extra_layer.weight"] = np.zeros((2,), np.float32)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text((folder / "config.json").read_text())
  save_file(tensors, str(bad / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(CheckpointError) as e:
    load_vae(bad)
  msg = str(e.value)
  assert str(bad / "diffusion_pytorch_model.safetensors") in msg
  assert "decoder.conv_in.bias" in msg
  assert "encoder.extra_layer.weight" in msg
  assert (
    "encoder.conv_in.weight" in msg and "expected (3, 3, 3, 3, 8), found (3, 3, 2, 3, 8)" in msg
  )


# ------------------------------------------------------------------------------------------------
# Without torch.
# ------------------------------------------------------------------------------------------------


def test_wan21_param_count():
  abstract = nnx.eval_shape(lambda: vae_lib.WanVAE(rngs=nnx.Rngs(0)))
  assert vae_lib.count_params(abstract) == 126_892_531
  assert abstract.config.temporal_factor == 4 and abstract.config.spatial_factor == 8


def test_streaming_decode_random_init_and_under_jit():
  vae = vae_lib.init_vae(CONFIGS["one_stage"], jax.random.key(3))
  z = jax.random.normal(jax.random.key(4), (2, 5, 4, 6, 4))
  whole = np.asarray(vae.decode(z))
  assert whole.shape == (2, 9, 8, 12, 3)

  # decode_chunk_fn is a pure function of arrays: scan it over chunks inside a caller's jit
  # (uneven chunking: 1, then 2 and 2 latent frames).
  graphdef, state = nnx.split(vae)

  @jax.jit
  def rollout(state, z_first, z_rest_nbfhwc):
    model = nnx.merge(graphdef, state)
    b, _, h, w, _ = z_first.shape
    px0, cache = model.decode_chunk_fn(z_first, model.init_decode_cache(b, h, w))

    def step(cache, z_chunk):
      px, cache = model.decode_chunk_fn(z_chunk, cache)
      return cache, px

    _, px = jax.lax.scan(step, cache, z_rest_nbfhwc)
    return px0, px

  px0, px = rollout(state, z[:, :1], jnp.stack([z[:, 1:3], z[:, 3:5]]))
  px = np.concatenate([np.asarray(px0)] + [np.asarray(p) for p in px], axis=1)
  assert_close(px, whole, "scan under jit")

  # The cache carries real history: a later frame decoded without it comes out different.
  fresh = vae.init_decode_cache(2, 4, 6)
  no_history, _ = vae.decode_chunk(z[:, 1:2], vae_lib.DecodeCache(fresh.convs, started=True))
  assert np.max(np.abs(np.asarray(no_history) - whole[:, 1:3])) > 1e-2


def test_bf16_cache_and_donation():
  """A bf16 cache under an f32 decode stays bf16, halves the bytes and stays close to the f32
  stream; decode_chunk donates the cache it is given (its buffers hold the new one)."""
  vae = vae_lib.init_vae(CONFIGS["one_stage"], jax.random.key(5))
  z = jax.random.normal(jax.random.key(6), (1, 5, 4, 6, 4))
  exact = stream(vae, z, [1, 2, 2])

  cache = vae.init_decode_cache(1, 4, 6, jnp.bfloat16)
  f32_bytes = sum(x.nbytes for x in jax.tree.leaves(vae.init_decode_cache(1, 4, 6)))
  assert sum(x.nbytes for x in jax.tree.leaves(cache)) * 2 == f32_bytes
  outs = []
  for a, b in ((0, 1), (1, 3), (3, 5)):
    old = jax.tree.leaves(cache)
    px, cache = vae.decode_chunk(z[:, a:b], cache)
    assert px.dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(cache)} == {jnp.dtype(jnp.bfloat16)}
    assert all(x.is_deleted() for x in old), "decode_chunk did not donate the cache"
    outs.append(np.asarray(px))
  approx = np.concatenate(outs, axis=1)
  err = np.max(np.abs(approx - exact))
  # Rounding the cached frames to bf16 moved pixels by 5.1e-3 here (an f32 cache is exact);
  # 2e-2 leaves room for other CPUs' conv order.
  assert 0 < err < 2e-2, err


def test_config_and_input_errors(tmp_path):
  ml_collections = pytest.importorskip("ml_collections")
  cd = ml_collections.ConfigDict(
    dict(CONFIGS["one_stage"], _class_name="AutoencoderKLWan", dropout=0.0)
  )
  assert vae_lib.VAEConfig.from_any(cd) == vae_lib.VAEConfig.from_any(CONFIGS["one_stage"])
  with pytest.raises(ValueError, match="unknown"):
    vae_lib.VAEConfig.from_any({"base_dims": 8})
  with pytest.raises(ValueError, match="is_residual"):
    vae_lib.VAEConfig.from_any({"is_residual": True})
  with pytest.raises(ValueError, match="temperal_downsample"):
    vae_lib.VAEConfig(dim_mult=(1, 2), temperal_downsample=(True, True))

  abstract = nnx.eval_shape(lambda: vae_lib.WanVAE(CONFIGS["one_stage"], rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="1 \\+ 4k"):
    abstract.encode_fn(jnp.zeros((1, 6, 16, 16, 3)))
  with pytest.raises(ValueError, match="multiples of 2"):
    abstract.encode_fn(jnp.zeros((1, 5, 16, 15, 3)))
  with pytest.raises(ValueError, match="latents"):
    abstract.decode_fn(jnp.zeros((1, 2, 4, 4, 3)))

  # Missing files say what to put where.
  with pytest.raises(CheckpointError, match="Wan2.1_VAE.pth"):
    load_vae(tmp_path / "nowhere")
  with pytest.raises(CheckpointError, match="config.json"):
    load_vae(tmp_path)
  (tmp_path / "config.json").write_text(
    json.dumps(dict(CONFIGS["one_stage"], _class_name="AutoencoderKLWan"))
  )
  with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
    load_vae(tmp_path)


def test_original_key_table_agrees_with_diffusers_converter():
  """asvd's diffusers -> original key table, checked value by value against diffusers' own
  single-file converter (original -> diffusers): every tensor comes back under its own key, so
  a consistent swap (say conv1 <-> conv2 in both directions) cannot pass."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: PLC0415

  cfg = CONFIGS["wan21_layout"]
  torch.manual_seed(1)
  sd = diffusers.AutoencoderKLWan(**cfg).state_dict()
  sd = {k: torch.randn_like(v) for k, v in sd.items()}  # distinct values in every tensor
  original = {vae_port.diffusers_to_original_key(k, cfg): v for k, v in sd.items()}
  assert len(original) == len(sd)
  back = convert_wan_vae_to_diffusers(original)
  assert set(back) == set(sd)
  for k, v in sd.items():
    assert torch.equal(back[k], v), k
  for k in sd:  # and the inverse table used when reading Wan2.1_VAE.pth
    assert vae_port.original_to_diffusers_key(vae_port.diffusers_to_original_key(k, cfg), cfg) == k


def test_streaming_decode_copies_no_cache_entry():
  """The later-chunk decode (a scan over latent frames carrying the cache) updates every
  full-resolution cache entry in place: no copy of one appears in the compiled program (XLA
  made two per entry per step while a new history could be computed before the old one's last
  read). (A bf16 cache under an f32 decode keeps the copies, at half size: see CausalConv3d.)"""
  import re  # noqa: PLC0415

  vae = vae_lib.init_vae(CONFIGS["one_stage"], jax.random.key(3))
  cache = vae.init_decode_cache(1, 4, 6)
  _, cache = jax.eval_shape(vae.decode_chunk_fn, jnp.zeros((1, 1, 4, 6, 4)), cache)  # a later chunk
  text = vae.lower_decode_chunk(jax.ShapeDtypeStruct((1, 3, 4, 6, 4), jnp.float32), cache).compile().as_text()
  hw = (4 * vae.config.spatial_factor, 6 * vae.config.spatial_factor)
  full = {x.shape for x in jax.tree.leaves(cache) if x.shape[2:4] == hw}
  assert full, "no full-resolution cache entry found"
  copied = re.findall(r"= \w+\[([\d,]+)\]\{[^}]*\} copy\(", text)
  shapes = {tuple(int(d) for d in c.split(",")) for c in copied}
  assert not shapes & full, sorted(shapes & full)
