"""DiT checkpoint import: parity with diffusers (PyTorch) and every on-disk format.

The reference is diffusers' `WanTransformer3DModel` in float32. Original-Wan and Self-Forcing
layouts are made by renaming a real diffusers state dict with the table below, written here
independently of asvd's own mapping.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import tolerances
from torch_refs import TINY_DIT, dit_to_wan_names, pad_text

import asvd
from asvd.ckpt import dit_port

torch = pytest.importorskip("torch", reason="parity tests need the `torch` extra (pip install 'asvd[torch]')")
diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers (the `torch` extra)")
safetensors_torch = pytest.importorskip("safetensors.torch")

TINY = TINY_DIT


def wan_config_json(c):
  return {
    "model_type": "t2v",
    "dim": c["num_attention_heads"] * c["attention_head_dim"],
    "num_heads": c["num_attention_heads"],
    "ffn_dim": c["ffn_dim"],
    "freq_dim": c["freq_dim"],
    "num_layers": c["num_layers"],
    "in_dim": c["in_channels"],
    "out_dim": c["out_channels"],
    "text_dim": c["text_dim"],
    "text_len": 512,
    "patch_size": list(c["patch_size"]),
    "eps": c["eps"],
    "qk_norm": True,
    "cross_attn_norm": True,
  }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  torch.manual_seed(0)
  tr = diffusers.WanTransformer3DModel(**TINY).eval()
  with torch.no_grad():  # make norms, tables and biases non-trivial so every key matters
    for p in tr.parameters():
      p.add_(0.2 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp("diffusers_dit")
  tr.save_pretrained(folder)
  return tr, str(folder)


def run_reference(tr, x_bfhwc, t_bf, ctx, text_len=512):
  """diffusers forward with a per-token timestep `[B, F*h*w]` built from per-frame values, on
  the prompt padded to `text_len` as Wan's pipeline does."""
  ctx = pad_text(ctx, text_len)
  b, f, h, w, _ = x_bfhwc.shape
  tok = np.repeat(t_bf, (h // 2) * (w // 2), axis=1)
  with torch.no_grad():
    out = tr(
      hidden_states=torch.from_numpy(np.ascontiguousarray(x_bfhwc.transpose(0, 4, 1, 2, 3))),
      timestep=torch.from_numpy(tok),
      encoder_hidden_states=torch.from_numpy(ctx),
      return_dict=False,
    )[0]
  return out.numpy().transpose(0, 2, 3, 4, 1)


def inputs(b=2, f=3, h=6, w=10, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, f, h, w, 16)).astype(np.float32)
  t = np.stack([rng.permutation([999.0, 937.5, 500.0, 250.0, 0.0])[:f] for _ in range(b)]).astype(np.float32)
  ctx = rng.standard_normal((b, 9, 32)).astype(np.float32)
  return x, t, ctx


def assert_parity(model, tr, **kw):
  x, t, ctx = inputs(**kw)
  ref = run_reference(tr, x, t, ctx)
  out = np.asarray(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)))
  err = tolerances.rel_err(out, ref)
  assert err <= tolerances.DIT, err


def test_parity_diffusers_folder(reference):
  tr, folder = reference
  model = asvd.load_dit(folder)
  # batch 2, per-frame timesteps that differ between frames, non-square, odd frame count
  assert_parity(model, tr, b=2, f=3, h=6, w=10)
  assert_parity(model, tr, b=1, f=5, h=8, w=4, seed=1)


def test_parity_sharded_diffusers_folder(reference, tmp_path):
  tr, _ = reference
  tr.save_pretrained(tmp_path, max_shard_size="20KB")
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
  assert_parity(asvd.load_dit(tmp_path), tr)


def test_parity_bf16_checkpoint_read(reference, tmp_path):
  tr, _ = reference
  tr16 = diffusers.WanTransformer3DModel(**TINY).eval()
  tr16.load_state_dict(tr.state_dict())
  tr16.to(torch.bfloat16).save_pretrained(tmp_path)
  rounded = diffusers.WanTransformer3DModel(**TINY).eval()  # f32 reference of the bf16 weights
  rounded.load_state_dict({k: v.float() for k, v in tr16.state_dict().items()})
  assert_parity(asvd.load_dit(tmp_path), rounded)  # bf16 on disk, read zero-copy, f32 model


def test_original_wan_folder(reference, tmp_path):
  tr, _ = reference
  sd = dit_to_wan_names({k: v.contiguous() for k, v in tr.state_dict().items()})
  safetensors_torch.save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(wan_config_json(TINY)))
  assert_parity(asvd.load_dit(tmp_path), tr)


def test_self_forcing_pt(reference, tmp_path):
  tr, _ = reference
  wan = dit_to_wan_names(tr.state_dict())
  torch.manual_seed(5)  # the live generator differs from its EMA, as in any real checkpoint
  raw = {k: v + 0.05 * torch.randn_like(v) for k, v in wan.items()}
  gen = {f"model.{k}": v for k, v in raw.items()}
  # EMA weights as FSDP saves them: wrapper fragments inside the key names.
  ema = {f"model._fsdp_wrapped_module.{k}": v.clone() for k, v in wan.items()}
  path = tmp_path / "self_forcing_dmd.pt"
  torch.save({"generator": gen, "generator_ema": ema, "critic": {"x": torch.zeros(1)}}, path)
  (tmp_path / "config.json").write_text(json.dumps(wan_config_json(TINY)))
  assert_parity(asvd.load_dit(path), tr)  # generator_ema by default
  live = dit_port.export_state_dict(asvd.load_dit(path, variant="generator"), "wan")
  assert set(live) == set(raw)
  for k, v in raw.items():
    np.testing.assert_array_equal(live[k], v.numpy(), err_msg=k)


def test_self_forcing_pt_without_config_infers_shapes(reference, tmp_path):
  tr, _ = reference
  gen = {f"model.{k}": v for k, v in dit_to_wan_names(tr.state_dict()).items()}
  torch.save({"generator": gen}, tmp_path / "ckpt.pt")
  # Shapes alone cannot give the head count of a toy model (Wan's head dim is 128): pass it.
  model = asvd.load_dit(tmp_path / "ckpt.pt", model_config={**_ours(TINY)})
  assert_parity(model, tr)
  assert_parity(asvd.load_dit(tmp_path / "ckpt.pt", num_heads=2), tr)
  with pytest.raises(asvd.CheckpointError, match="num_heads"):
    asvd.load_dit(tmp_path / "ckpt.pt")  # Wan's head dim 128 does not divide dim 32


def _ours(c):
  return dict(
    dim=c["num_attention_heads"] * c["attention_head_dim"],
    num_heads=c["num_attention_heads"],
    ffn_dim=c["ffn_dim"],
    freq_dim=c["freq_dim"],
    num_layers=c["num_layers"],
    text_dim=c["text_dim"],
  )


def test_orbax_roundtrip_and_convert_cli(reference, tmp_path):
  tr, folder = reference
  dst = tmp_path / "converted"
  proc = subprocess.run(
    [sys.executable, "-m", "asvd.main", "convert", folder, str(dst)],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr
  assert (dst / "asvd_dit.json").exists()
  model = asvd.load_dit(dst)
  assert_parity(model, tr)
  # Loading into another layout/dtype from the Orbax checkpoint.
  looped = asvd.load_dit(dst, scan_layers=False)
  x, t, ctx = inputs()
  np.testing.assert_allclose(
    np.asarray(looped(x, t, ctx)), np.asarray(model(x, t, ctx)), atol=1e-5, rtol=1e-5
  )
  m16 = asvd.load_dit(dst, dtype=jnp.bfloat16)
  assert m16.cfg.param_dtype == "bfloat16"


def test_export_roundtrip_matches_diffusers_names(reference):
  tr, folder = reference
  exported = dit_port.export_state_dict(asvd.load_dit(folder), "diffusers")
  sd = tr.state_dict()
  assert set(exported) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(exported[k], v.numpy(), err_msg=k)


def test_bad_checkpoints_name_file_and_keys(reference, tmp_path):
  tr, _ = reference
  sd = {k: v.clone() for k, v in tr.state_dict().items()}
  del sd["blocks.1.attn1.to_q.weight"]
  sd["blocks.0.ffn.net.2.weight"] = torch.zeros(5, 7)
  sd["blocks.0.extra_thing.weight"] = torch.zeros(3)
  safetensors_torch.save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  with open(tmp_path / "config.json", "w") as f:
    json.dump({**TINY, "_class_name": "WanTransformer3DModel"}, f)
  with pytest.raises(asvd.CheckpointError) as e:
    asvd.load_dit(tmp_path)
  msg = str(e.value)
  assert str(tmp_path) in msg
  assert "blocks.1.attn1.to_q.weight" in msg  # missing
  assert "blocks.0.extra_thing.weight" in msg  # unexpected
  assert "blocks.0.ffn.net.2.weight: expected (32, 64), found (5, 7)" in msg  # mis-shaped


def test_bad_paths(tmp_path):
  with pytest.raises(asvd.CheckpointError, match="no such file"):
    asvd.load_dit(tmp_path / "nope.pt")
  with pytest.raises(asvd.CheckpointError, match="config.json"):
    asvd.load_dit(tmp_path)
  (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
  with pytest.raises(asvd.CheckpointError, match="trunc.safetensors"):
    asvd.load_dit(tmp_path / "trunc.safetensors")
  torch.save({"critic": {}}, tmp_path / "x.pt")
  with pytest.raises(asvd.CheckpointError, match="generator"):
    asvd.load_dit(tmp_path / "x.pt")


def test_dit_tolerance_catches_an_exact_gelu(reference, monkeypatch):
  """The parity bound is tight enough for a subtle bug: Wan's FFN uses tanh-approximate GELU;
  the exact GELU measures several times `tolerances.DIT`, the correct code far below it."""
  import jax  # noqa: PLC0415

  tr, folder = reference
  model = asvd.load_dit(folder)
  x, t, ctx = inputs()
  ref = run_reference(tr, x, t, ctx)
  good = tolerances.rel_err(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)), ref)
  exact = jax.nn.gelu
  monkeypatch.setattr(jax.nn, "gelu", lambda h, approximate=True: exact(h, approximate=False))
  bad = tolerances.rel_err(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)), ref)
  assert good <= tolerances.DIT / 5, good
  assert bad > tolerances.DIT, bad
