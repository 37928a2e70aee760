"""Imports umT5 encoder weights into `asvd.models.umt5.UMT5Encoder`.

Two source layouts are supported:

1. transformers (`UMT5EncoderModel.save_pretrained`, the diffusers Wan `text_encoder/` folder, or a
   full `UMT5ForConditionalGeneration` whose decoder / LM head are ignored). Keys, per layer i:

     shared.weight  (or encoder.embed_tokens.weight)              -> token_embedding.embedding
     encoder.block.{i}.layer.0.layer_norm.weight                  -> blocks.norm1.scale[i]
     encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight     -> blocks.attn.{q,k,v,o}.kernel[i]
     encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight
                                                                  -> blocks.pos_embedding.embedding[i]
     encoder.block.{i}.layer.1.layer_norm.weight                  -> blocks.norm2.scale[i]
     encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight         -> blocks.ffn.gate.kernel[i]
     encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight         -> blocks.ffn.fc1.kernel[i]
     encoder.block.{i}.layer.1.DenseReluDense.wo.weight           -> blocks.ffn.fc2.kernel[i]
     encoder.final_layer_norm.weight                              -> norm.scale

2. Wan's original `models_t5_umt5-xxl-enc-bf16.pth` (a plain state dict of Wan's `T5Encoder`):

     token_embedding.weight                                       -> token_embedding.embedding
     blocks.{i}.norm1.weight                                      -> blocks.norm1.scale[i]
     blocks.{i}.attn.{q,k,v,o}.weight                             -> blocks.attn.{q,k,v,o}.kernel[i]
     blocks.{i}.pos_embedding.embedding.weight                    -> blocks.pos_embedding.embedding[i]
     blocks.{i}.norm2.weight                                      -> blocks.norm2.scale[i]
     blocks.{i}.ffn.gate.0.weight   (the GELU branch, HF wi_0)    -> blocks.ffn.gate.kernel[i]
     blocks.{i}.ffn.fc1.weight      (the linear branch, HF wi_1)  -> blocks.ffn.fc1.kernel[i]
     blocks.{i}.ffn.fc2.weight      (HF wo)                       -> blocks.ffn.fc2.kernel[i]
     norm.weight                                                  -> norm.scale

Every `nn.Linear` weight is stored (out, in) by torch and transposed to (in, out); per-layer
tensors are stacked on a leading layer axis for the scanned blocks. The whole source dict is
checked before anything is built: one `CheckpointError` names the file and every missing,
unexpected and mis-shaped key in the checkpoint's own names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from asvd.ckpt.common import (
  CheckpointError,
  flat_abstract,
  format_problems,
  read_safetensors_dir,
  read_torch_checkpoint,
)
from asvd.ckpt.common import fill_state as _fill_state
from asvd.models.umt5 import UMT5Config, UMT5Encoder

__all__ = [
  "WAN_T5_FILENAME",
  "convert_hf",
  "convert_wan",
  "load_hf_umt5",
  "load_text_encoder",
  "load_wan_umt5",
]

WAN_T5_FILENAME = "models_t5_umt5-xxl-enc-bf16.pth"

Path = tuple[str, ...]

# (target path, source key template, transpose?) for the stacked per-layer tensors.
_HF_LAYER = [
  (("blocks", "norm1", "scale"), "encoder.block.{i}.layer.0.layer_norm.weight", False),
  (("blocks", "attn", "q", "kernel"), "encoder.block.{i}.layer.0.SelfAttention.q.weight", True),
  (("blocks", "attn", "k", "kernel"), "encoder.block.{i}.layer.0.SelfAttention.k.weight", True),
  (("blocks", "attn", "v", "kernel"), "encoder.block.{i}.layer.0.SelfAttention.v.weight", True),
  (("blocks", "attn", "o", "kernel"), "encoder.block.{i}.layer.0.SelfAttention.o.weight", True),
  (
    ("blocks", "pos_embedding", "embedding"),
    "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
    False,
  ),
  (("blocks", "norm2", "scale"), "encoder.block.{i}.layer.1.layer_norm.weight", False),
  (
    ("blocks", "ffn", "gate", "kernel"),
    "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight",
    True,
  ),
  (
    ("blocks", "ffn", "fc1", "kernel"),
    "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight",
    True,
  ),
  (("blocks", "ffn", "fc2", "kernel"), "encoder.block.{i}.layer.1.DenseReluDense.wo.weight", True),
]
_HF_TOP = [
  (("token_embedding", "embedding"), "shared.weight", False),
  (("norm", "scale"), "encoder.final_layer_norm.weight", False),
]

_WAN_LAYER = [
  (("blocks", "norm1", "scale"), "blocks.{i}.norm1.weight", False),
  (("blocks", "attn", "q", "kernel"), "blocks.{i}.attn.q.weight", True),
  (("blocks", "attn", "k", "kernel"), "blocks.{i}.attn.k.weight", True),
  (("blocks", "attn", "v", "kernel"), "blocks.{i}.attn.v.weight", True),
  (("blocks", "attn", "o", "kernel"), "blocks.{i}.attn.o.weight", True),
  (("blocks", "pos_embedding", "embedding"), "blocks.{i}.pos_embedding.embedding.weight", False),
  (("blocks", "norm2", "scale"), "blocks.{i}.norm2.weight", False),
  (("blocks", "ffn", "gate", "kernel"), "blocks.{i}.ffn.gate.0.weight", True),
  (("blocks", "ffn", "fc1", "kernel"), "blocks.{i}.ffn.fc1.weight", True),
  (("blocks", "ffn", "fc2", "kernel"), "blocks.{i}.ffn.fc2.weight", True),
]
_WAN_TOP = [
  (("token_embedding", "embedding"), "token_embedding.weight", False),
  (("norm", "scale"), "norm.weight", False),
]


def _abstract(cfg: UMT5Config, dtype: Any) -> tuple[nnx.GraphDef, nnx.State]:
  """Graphdef and shape-only state of the model (nothing is allocated)."""
  model = nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype))
  return nnx.split(model)


def _convert(
  tensors: Mapping[str, np.ndarray],
  cfg: UMT5Config,
  layer_table: list[tuple[Path, str, bool]],
  top_table: list[tuple[Path, str, bool]],
  *,
  source: str,
  ignore: Callable[[str], bool] = lambda k: False,
  hint: str = "",
) -> dict[Path, np.ndarray]:
  """Renames, transposes and stacks a torch-named state dict into model paths.

  Args:
    tensors: `{source key: array}`.
    cfg: the target architecture (decides the number of layers).
    layer_table: per-layer `(target path, key template with {i}, transpose)` rows.
    top_table: non-layer rows (no `{i}`).
    source: file or folder, named in errors.
    ignore: source keys for which this returns True are dropped silently.
    hint: appended to error messages.

  Returns:
    `{target path: array}`.

  Raises:
    CheckpointError: listing every missing, unexpected and mis-shaped source key.
  """
  expected = flat_abstract(_abstract(cfg, jnp.float32)[1])
  used: set[str] = set()
  missing: list[str] = []
  mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

  def fetch(key: str, transpose: bool, want: tuple[int, ...]) -> np.ndarray | None:
    if key not in tensors:
      missing.append(key)
      return None
    used.add(key)
    arr = tensors[key]
    # Compare in the source's own orientation so the message shows what the file holds.
    want_src = tuple(reversed(want)) if transpose else tuple(want)
    if tuple(arr.shape) != want_src:
      mismatched.append((key, want_src, tuple(arr.shape)))
      return None
    return arr.T if transpose else arr

  arrays: dict[Path, np.ndarray] = {}
  for path, key, transpose in top_table:
    arr = fetch(key, transpose, tuple(expected[path].shape))
    if arr is not None:
      arrays[path] = arr
  for path, template, transpose in layer_table:
    per_layer = tuple(expected[path].shape[1:])
    layers = [fetch(template.format(i=i), transpose, per_layer) for i in range(cfg.num_layers)]
    if all(a is not None for a in layers):
      arrays[path] = np.stack(layers)

  unexpected = [k for k in tensors if k not in used and not ignore(k)]
  if missing or unexpected or mismatched:
    raise CheckpointError(
      format_problems(
        source, missing=missing, unexpected=unexpected, mismatched=mismatched, hint=hint
      )
    )
  return arrays


def convert_hf(
  tensors: Mapping[str, np.ndarray], cfg: UMT5Config, *, source: str = "<state dict>"
) -> dict[Path, np.ndarray]:
  """transformers umT5 state dict -> `{model path: array}` (see the module docstring).

  Args:
    tensors: `{key: array}` as stored by `save_pretrained` (or `model.state_dict()` as numpy).
    cfg: the architecture.
    source: named in errors.

  Returns:
    `{model path: array}` ready for `fill_state`.
  """
  tensors = dict(tensors)
  # The token embedding is tied: save_pretrained keeps one copy, other exporters keep both.
  if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
    tensors["shared.weight"] = tensors.pop("encoder.embed_tokens.weight")

  def ignore(k: str) -> bool:
    return k == "encoder.embed_tokens.weight" or k.startswith(("decoder.", "lm_head."))

  return _convert(tensors, cfg, _HF_LAYER, _HF_TOP, source=source, ignore=ignore)


def convert_wan(
  tensors: Mapping[str, np.ndarray], cfg: UMT5Config, *, source: str = "<state dict>"
) -> dict[Path, np.ndarray]:
  """Wan original T5 encoder state dict -> `{model path: array}` (see the module docstring).

  Args:
    tensors: `{key: array}` of Wan's `T5Encoder` (`models_t5_umt5-xxl-enc-bf16.pth`).
    cfg: the architecture (umT5-XXL for the released file).
    source: named in errors.

  Returns:
    `{model path: array}` ready for `fill_state`.
  """
  return _convert(
    tensors,
    cfg,
    _WAN_LAYER,
    _WAN_TOP,
    source=source,
    hint=f"  (expected Wan's T5 encoder state dict for {cfg})",
  )


def _build(cfg: UMT5Config, arrays: Mapping[Path, np.ndarray], *, source: str, dtype: Any):
  graphdef, abstract = _abstract(cfg, dtype)
  state = _fill_state(abstract, arrays, source=source, dtype=dtype)
  return nnx.merge(graphdef, state)


def _read_config_json(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, "config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: cannot read the transformers config ({e})") from e


def load_hf_umt5(
  folder: str | os.PathLike, *, dtype: Any = jnp.float32, config: UMT5Config | None = None
) -> UMT5Encoder:
  """Loads a transformers umT5 folder (`config.json` + `model*.safetensors`, sharded or not).

  Args:
    folder: the folder.
    dtype: dtype of the returned model.
    config: overrides the architecture read from `config.json`.

  Returns:
    The encoder.
  """
  folder = os.fspath(folder)
  hf = _read_config_json(folder)
  if hf.get("model_type") not in (None, "umt5"):
    raise CheckpointError(
      f"{folder}/config.json: model_type={hf.get('model_type')!r}, expected 'umt5' (T5 v1.x shares "
      "one position-bias table across layers and is not supported)"
    )
  try:
    cfg = config or UMT5Config.from_hf(hf)
  except (KeyError, ValueError) as e:
    raise CheckpointError(f"{folder}/config.json: not a umT5 encoder config ({e})") from e
  # Only the model weights: a diffusers text_encoder folder may hold nothing else, but be explicit.
  tensors = read_safetensors_dir(folder, pattern_prefix="model")
  arrays = convert_hf(tensors, cfg, source=folder)
  return _build(cfg, arrays, source=folder, dtype=dtype)


def load_wan_umt5(
  path: str | os.PathLike, *, dtype: Any = jnp.float32, config: UMT5Config | None = None
) -> UMT5Encoder:
  """Loads Wan's original `models_t5_umt5-xxl-enc-bf16.pth` (needs torch).

  Args:
    path: the .pth file.
    dtype: dtype of the returned model (the file is bf16; float32 upcasts exactly).
    config: the architecture; default umT5-XXL.

  Returns:
    The encoder.
  """
  path = os.fspath(path)
  cfg = config or UMT5Config.umt5_xxl()
  obj = read_torch_checkpoint(path)
  if not isinstance(obj, Mapping) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise CheckpointError(
      f"{path}: expected a flat state dict of tensors, got {type(obj).__name__}"
    )
  arrays = convert_wan(obj, cfg, source=path)
  return _build(cfg, arrays, source=path, dtype=dtype)


def load_text_encoder(
  path: str | os.PathLike, *, dtype: Any = jnp.float32, config: UMT5Config | None = None
) -> UMT5Encoder:
  """Loads umT5 encoder weights from a local checkpoint (`asvd.load_text_encoder`).

  Accepted layouts:
    * a transformers folder (`config.json` with `model_type: umt5` + `model*.safetensors`, sharded
      or not), e.g. `save_pretrained` of a `UMT5EncoderModel`, or a diffusers Wan folder whose
      `text_encoder/` subfolder is one;
    * Wan's original `models_t5_umt5-xxl-enc-bf16.pth`, or a folder containing it (a Wan2.1
      checkpoint folder such as `Wan2.1-T2V-1.3B/`). Reading .pth needs torch.

  Args:
    path: the file or folder.
    dtype: dtype of the returned parameters and computation (bf16 halves memory: ~11 GB for XXL).
    config: architecture override. Default: `config.json` for transformers folders, umT5-XXL for
      the original .pth.

  Returns:
    The encoder with the checkpoint's weights.

  Raises:
    CheckpointError: the files are missing or do not match the model; the message names the file
      and every missing, unexpected or mis-shaped key.
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    if path.endswith((".pth", ".pt", ".bin")):
      return load_wan_umt5(path, dtype=dtype, config=config)
    if os.path.basename(path) == "config.json":
      return load_hf_umt5(os.path.dirname(path) or ".", dtype=dtype, config=config)
    raise CheckpointError(f"{path}: expected Wan's {WAN_T5_FILENAME} or a transformers folder")
  if not os.path.isdir(path):
    raise CheckpointError(
      f"{path}: no such file or folder; pass a transformers umT5 folder (config.json + "
      f"model*.safetensors) or Wan's {WAN_T5_FILENAME}"
    )
  # A Wan checkpoint folder also holds a config.json (the DiT's), so look for the .pth first.
  wan = os.path.join(path, WAN_T5_FILENAME)
  if os.path.isfile(wan):
    return load_wan_umt5(wan, dtype=dtype, config=config)
  if os.path.isfile(os.path.join(path, "config.json")):
    hf = _read_config_json(path)
    if hf.get("model_type") == "umt5" or not os.path.isdir(os.path.join(path, "text_encoder")):
      return load_hf_umt5(path, dtype=dtype, config=config)
  sub = os.path.join(path, "text_encoder")
  if os.path.isfile(os.path.join(sub, "config.json")):
    return load_hf_umt5(sub, dtype=dtype, config=config)
  raise CheckpointError(
    f"{path}: no umT5 weights found; expected {WAN_T5_FILENAME} (Wan2.1 checkpoint folder), a "
    "transformers folder with config.json + model*.safetensors, or a diffusers folder with "
    "text_encoder/"
  )
