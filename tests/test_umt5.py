"""umT5 encoder: parity with transformers, checkpoint import (HF folder and Wan .pth), errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances
from flax import nnx
from torch_refs import t5_to_wan_names

from asvd.ckpt.common import CheckpointError
from asvd.ckpt.umt5_port import load_text_encoder
from asvd.models.umt5 import (
  UMT5Config,
  UMT5Encoder,
  init_text_encoder,
  relative_position_buckets,
)

TORCH_REASON = "parity tests need torch + transformers (pip install 'asvd[torch]')"

# Tiny transformers configs: the default bucket layout (32 buckets, max distance 128) and an odd
# one where dim_attn != dim and sequences run past max_distance.
HF_CONFIGS = {
  "default": dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
  "odd": dict(
    vocab_size=97,
    d_model=24,
    d_kv=5,
    d_ff=40,
    num_layers=3,
    num_heads=3,
    relative_attention_num_buckets=16,
    relative_attention_max_distance=20,
  ),
}


def _hf_model(name, seed=0):
  """A random transformers UMT5EncoderModel with non-trivial norm scales."""
  torch = pytest.importorskip("torch", reason=TORCH_REASON)
  transformers = pytest.importorskip("transformers", reason=TORCH_REASON)
  torch.manual_seed(seed)
  model = transformers.UMT5EncoderModel(transformers.UMT5Config(**HF_CONFIGS[name])).eval()
  with torch.no_grad():
    # Norm weights init to 1; perturb them so a mis-mapped norm cannot hide.
    for pname, p in model.named_parameters():
      if "layer_norm" in pname:
        p.mul_(1.0 + 0.5 * torch.randn_like(p))
  return model


def _hf_forward(model, ids_bl, mask_bl):
  import torch

  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(ids_bl, dtype=torch.long),
      attention_mask=torch.tensor(mask_bl, dtype=torch.long),
    )
  return out.last_hidden_state.numpy()


def _batch(vocab, lengths, seq_len, seed=0):
  """Right-padded random ids (pad id 0) and the matching mask."""
  rng = np.random.default_rng(seed)
  mask_bl = (np.arange(seq_len)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
  ids_bl = rng.integers(1, vocab, size=(len(lengths), seq_len)).astype(np.int32) * mask_bl
  return ids_bl, mask_bl


def _assert_close(out, ref, rel=tolerances.TEXT):
  err = float(np.max(np.abs(np.asarray(out, np.float32) - ref)))
  scale = float(np.max(np.abs(ref)))
  assert err <= rel * scale, f"max abs err {err:.3g} > {rel} * output scale {scale:.3g}"


def _wan_state_dict(hf_state):
  return t5_to_wan_names(hf_state)


# ------------------------------------------------------------------------------------------------


def test_buckets_match_transformers():
  pytest.importorskip("torch", reason=TORCH_REASON)
  import torch

  for name in HF_CONFIGS:
    attn = _hf_model(name).encoder.block[0].layer[0].SelfAttention
    cfg = attn.config
    n = 1100  # past every max_distance, including all the log-bucket edges
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    ref = attn._relative_position_bucket(rel).numpy()
    ours = relative_position_buckets(
      n, n, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
    )
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize(
  "name,lengths,seq_len,shard",
  [
    ("default", [150, 97, 31, 1], 150, False),
    ("odd", [45, 3, 28], 45, True),
  ],
)
def test_parity_with_transformers_folder(tmp_path, name, lengths, seq_len, shard):
  model = _hf_model(name)
  kw = {"max_shard_size": "10KB"} if shard else {}
  model.save_pretrained(tmp_path / "hf", **kw)
  if shard:
    assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]) > 1

  encoder = load_text_encoder(tmp_path / "hf")
  assert encoder.cfg == UMT5Config.from_hf(model.config.to_dict())
  ids_bl, mask_bl = _batch(model.config.vocab_size, lengths, seq_len)
  out_bld = encoder(ids_bl, mask_bl)
  assert out_bld.shape == (len(lengths), seq_len, model.config.d_model)
  assert out_bld.dtype == jnp.float32
  _assert_close(out_bld, _hf_forward(model, ids_bl, mask_bl))


def test_wan_pth_layout(tmp_path):
  torch = pytest.importorskip("torch", reason=TORCH_REASON)
  model = _hf_model("default", seed=1)
  cfg = UMT5Config.from_hf(model.config.to_dict())
  wan_sd = _wan_state_dict(model.state_dict())
  # Wan's checkpoint folder also holds the DiT's config.json: the .pth must win.
  (tmp_path / "config.json").write_text('{"_class_name": "WanModel", "dim": 1536}')
  torch.save(wan_sd, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
  ids_bl, mask_bl = _batch(cfg.vocab_size, [20, 7], 20, seed=3)
  ref = _hf_forward(model, ids_bl, mask_bl)
  for path in (tmp_path, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"):
    _assert_close(load_text_encoder(path, config=cfg)(ids_bl, mask_bl), ref)

  # The released file is bf16: it must read (via ml_dtypes) and upcast exactly.
  bf16_sd = {k: v.to(torch.bfloat16) for k, v in wan_sd.items()}
  torch.save(bf16_sd, tmp_path / "bf16.pth")
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(p.to(torch.bfloat16).float())
  _assert_close(
    load_text_encoder(tmp_path / "bf16.pth", config=cfg)(ids_bl, mask_bl),
    _hf_forward(model, ids_bl, mask_bl),
  )


def test_diffusers_text_encoder_subfolder(tmp_path):
  model = _hf_model("default")
  model.save_pretrained(tmp_path / "text_encoder")
  (tmp_path / "config.json").write_text('{"_class_name": "WanPipeline"}')
  ids_bl, mask_bl = _batch(256, [9, 4], 9)
  _assert_close(load_text_encoder(tmp_path)(ids_bl, mask_bl), _hf_forward(model, ids_bl, mask_bl))


def test_bad_hf_checkpoint_names_file_and_keys(tmp_path):
  pytest.importorskip("torch", reason=TORCH_REASON)
  from safetensors.numpy import load_file, save_file

  _hf_model("default").save_pretrained(tmp_path)
  tensors = load_file(str(tmp_path / "model.safetensors"))
  del tensors["encoder.block.1.layer.0.SelfAttention.k.weight"]
  tensors["encoder.block.0.layer.1.DenseReluDense.wo.weight"] = np.zeros((32, 65), np.float32)
  tensors["encoder.block.0.extra.weight"] = np.zeros((3,), np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError) as info:
    load_text_encoder(tmp_path)
  msg = str(info.value)
  assert str(tmp_path) in msg
  assert "missing" in msg and "encoder.block.1.layer.0.SelfAttention.k.weight" in msg
  assert "unexpected" in msg and "encoder.block.0.extra.weight" in msg
  assert "mis-shaped" in msg and "encoder.block.0.layer.1.DenseReluDense.wo.weight" in msg
  assert "(32, 64)" in msg and "(32, 65)" in msg


def test_bad_wan_checkpoint_names_file_and_keys(tmp_path):
  torch = pytest.importorskip("torch", reason=TORCH_REASON)
  model = _hf_model("default")
  cfg = UMT5Config.from_hf(model.config.to_dict())
  wan_sd = _wan_state_dict(model.state_dict())
  del wan_sd["blocks.1.ffn.gate.0.weight"]
  path = tmp_path / "t5.pth"
  torch.save(wan_sd, path)
  with pytest.raises(CheckpointError, match=r"(?s)t5\.pth.*blocks\.1\.ffn\.gate\.0\.weight"):
    load_text_encoder(path, config=cfg)
  # The released-file default is umT5-XXL: a tiny file must fail loudly, not half-load.
  with pytest.raises(CheckpointError, match=r"(?s)mis-shaped.*token_embedding\.weight"):
    load_text_encoder(path)


def test_missing_and_wrong_paths(tmp_path):
  with pytest.raises(CheckpointError, match="no such file"):
    load_text_encoder(tmp_path / "nope")
  with pytest.raises(CheckpointError, match="models_t5_umt5-xxl-enc-bf16.pth"):
    load_text_encoder(tmp_path)
  (tmp_path / "config.json").write_text('{"model_type": "t5", "d_model": 8}')
  with pytest.raises(CheckpointError, match="model_type='t5'"):
    load_text_encoder(tmp_path)


def test_jit_path_compiles_once_and_traces():
  cfg = UMT5Config.tiny()
  encoder = init_text_encoder(cfg, jax.random.key(0))
  ids_bl, mask_bl = _batch(cfg.vocab_size, [12, 5], 12)
  from asvd.models import umt5 as umt5_module

  before = umt5_module._forward_jit._cache_size()
  out1 = encoder(ids_bl, mask_bl)
  out2 = encoder(ids_bl + 0, mask_bl)
  assert umt5_module._forward_jit._cache_size() == before + 1
  np.testing.assert_array_equal(np.asarray(out1), np.asarray(out2))

  # The pure form: split once, merge inside the user's own jit.
  graphdef, state = nnx.split(encoder)
  pure = jax.jit(lambda s, i, m: nnx.merge(graphdef, s).forward(i, m))
  np.testing.assert_allclose(
    np.asarray(pure(state, ids_bl, mask_bl)), np.asarray(out1), rtol=1e-6, atol=1e-6
  )
  # Padding keys are masked: changing ids after a row's length leaves its valid rows unchanged.
  ids2 = ids_bl.copy()
  ids2[1, 5:] = 7
  out3 = np.asarray(encoder(ids2, mask_bl))
  np.testing.assert_allclose(out3[1, :5], np.asarray(out1)[1, :5], rtol=1e-6, atol=1e-6)
  # A row whose keys are all masked stays finite (no NaN from an all -inf softmax).
  assert np.isfinite(np.asarray(encoder(ids_bl, np.zeros_like(mask_bl)))).all()


def test_bf16_model_runs_close_to_fp32():
  cfg = UMT5Config.tiny()
  ids_bl, mask_bl = _batch(cfg.vocab_size, [16, 9], 16)
  ref = np.asarray(init_text_encoder(cfg, 3)(ids_bl, mask_bl))
  enc16 = init_text_encoder(cfg, 3, dtype=jnp.bfloat16)
  out = enc16(ids_bl, mask_bl)
  assert out.dtype == jnp.bfloat16
  assert enc16.blocks.attn.q.kernel[...].dtype == jnp.bfloat16
  _assert_close(out, ref, rel=5e-2)


def test_xxl_shapes_and_param_count():
  cfg = UMT5Config.umt5_xxl()
  abstract = nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
  state = nnx.state(abstract)
  n = sum(x.size for x in jax.tree.leaves(state))
  assert n == cfg.num_params() == 5_680_910_336
  assert abstract.blocks.pos_embedding.embedding.shape == (24, 32, 64)
  out = jax.eval_shape(
    lambda m, i: m.forward(i, i), abstract, jax.ShapeDtypeStruct((2, 512), jnp.int32)
  )
  assert out.shape == (2, 512, 4096) and out.dtype == jnp.bfloat16

  torch = pytest.importorskip("torch", reason=TORCH_REASON)
  transformers = pytest.importorskip("transformers", reason=TORCH_REASON)
  hf_cfg = transformers.UMT5Config(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64
  )
  with torch.device("meta"):
    hf = transformers.UMT5EncoderModel(hf_cfg)
  assert sum(p.numel() for p in hf.parameters()) == n
  assert UMT5Config.from_hf(hf_cfg.to_dict()) == cfg
