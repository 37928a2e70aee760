"""Checkpoint reading without torch: Wan-format config inference, files that are not weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import asvd
from asvd.ckpt import dit_port


@pytest.fixture(scope="module")
def odd_model():
  """A tiny DiT whose text_dim (48) and patch size are not Wan's defaults."""
  cfg = asvd.load_config("configs/tiny.py").model
  cfg.update(text_dim=48, patch_size=(1, 2, 2))
  return asvd.init_dit(cfg, jax.random.key(4))


def write_wan_folder(folder, model, **extra):
  """Wan's own layout: Wan key names and a config.json that, like Wan's, omits text_dim,
  patch_size, qk_norm and cross_attn_norm."""
  folder.mkdir(parents=True, exist_ok=True)
  sd = {k: np.asarray(v, np.float32) for k, v in dit_port.export_state_dict(model, "wan").items()}
  save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
  c = model.cfg
  meta = {"_class_name": "WanModel", "model_type": "t2v", "dim": c.dim, "num_heads": c.num_heads, "ffn_dim": c.ffn_dim, "freq_dim": c.freq_dim, "num_layers": c.num_layers, "in_dim": c.in_channels, "out_dim": c.out_channels, "text_len": c.text_len, "eps": c.eps, **extra}
  (folder / "config.json").write_text(json.dumps(meta))


def test_wan_config_completed_from_shapes(odd_model, tmp_path):
  write_wan_folder(tmp_path / "wan", odd_model)
  loaded = asvd.load_dit(tmp_path / "wan")
  assert loaded.cfg.text_dim == 48 and loaded.cfg.patch_size == (1, 2, 2) and loaded.cfg.cross_attn_norm
  x = jax.random.normal(jax.random.key(0), (1, 3, 8, 8, 16))
  ctx = jax.random.normal(jax.random.key(1), (1, 16, 48))
  t = jnp.array([[900.0, 500.0, 100.0]])
  np.testing.assert_array_equal(np.asarray(loaded(x, t, ctx)), np.asarray(odd_model(x, t, ctx)))


def test_wan_config_conflict_is_named(odd_model, tmp_path):
  write_wan_folder(tmp_path / "wan", odd_model, text_dim=4096)
  with pytest.raises(asvd.CheckpointError, match="text_dim: config.json says 4096, the weights say 48"):
    asvd.load_dit(tmp_path / "wan")


def test_short_context_is_padded_to_text_len(model):
  x = jax.random.normal(jax.random.key(0), (1, 3, 8, 8, 16))
  t = jnp.full((1, 3), 500.0)
  ctx = jax.random.normal(jax.random.key(1), (1, 5, 32))
  padded = jnp.pad(ctx, ((0, 0), (0, model.cfg.text_len - 5), (0, 0)))
  np.testing.assert_array_equal(np.asarray(model(x, t, ctx)), np.asarray(model(x, t, padded)))
  np.testing.assert_array_equal(np.asarray(model.text_kv(ctx).k), np.asarray(model.text_kv(padded).k))
  with pytest.raises(ValueError, match="text_len=16"):
    model.text_kv(jnp.zeros((1, 17, 32)))


def test_lfs_pointer_and_text_files_are_named(tmp_path):
  lfs = tmp_path / "model.safetensors"
  lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 5678000000\n")
  with pytest.raises(asvd.CheckpointError, match="git-LFS pointer"):
    asvd.load_dit(lfs)
  txt = tmp_path / "notes.safetensors"
  txt.write_text("these are my notes, not tensors " * 4)
  with pytest.raises(asvd.CheckpointError, match="header length .* does not fit"):
    asvd.load_dit(txt)
  pt = tmp_path / "weights.pt"
  pt.write_text("hello")
  with pytest.raises(asvd.CheckpointError, match="not a PyTorch checkpoint"):
    asvd.load_dit(pt)
  ptr = tmp_path / "w.pth"
  ptr.write_text("version https://git-lfs.github.com/spec/v1\n")
  with pytest.raises(asvd.CheckpointError, match="git-LFS pointer"):
    asvd.load_dit(ptr)
