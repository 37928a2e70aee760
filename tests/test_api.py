"""The public API resolves from the top-level package, and importing it never pulls in torch."""

import subprocess
import sys

import asvd

API = ["load_config", "init_dit", "load_dit", "rollout", "stream", "make_transition", "prefill", "load_vae", "load_text_encoder", "load_tokenizer", "encode_prompts", "CheckpointError"]


def test_public_names_resolve():
  for name in API:
    assert callable(getattr(asvd, name)), name
  assert set(API) <= set(asvd.__all__)


def test_import_does_not_load_torch():
  code = "import sys, asvd; [getattr(asvd, n) for n in asvd.__all__]; print('torch' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_load_config_with_arg_and_overrides():
  c = asvd.load_config("configs/wan_t2v_1_3b.py:f32", ["--config.rollout.anchor=sink", "config.model.remat=dots"])
  assert c.model.dtype == "float32" and c.rollout.anchor == "sink" and c.model.remat == "dots"
  c = asvd.load_config("configs/wan_t2v_1_3b.py")
  assert c.model.dtype == "bfloat16"
  import pytest

  with pytest.raises(ValueError, match="unknown key"):
    asvd.load_config("configs/tiny.py", ["--config.rollout.nope=1"])
  with pytest.raises(ValueError, match="chunk_frames"):
    asvd.load_config("configs/tiny.py", ["--config.rollout.chunk_frames=abc"])
