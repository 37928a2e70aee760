"""Wan2.1 VAE weights -> `asvd.models.vae.WanVAE`: diffusers folders and the original `.pth`.

Two namings exist for the same tensors:

* **diffusers** (`AutoencoderKLWan`, `diffusion_pytorch_model*.safetensors` + `config.json`).
  The NNX tree of `WanVAE` uses these names, so a key maps to a state path by splitting on "."
  (list indices become ints), dropping the `Sequential` index of `resample.1` and renaming
  conv/linear `weight` to `kernel`.
* **original** (`Wan2.1_VAE.pth` from Wan-Video/Wan2.1, `wan/modules/vae.py`). Its modules are
  flat `nn.Sequential`s; the mapping to diffusers names is structural:

  | original                                   | diffusers                                       |
  |--------------------------------------------|-------------------------------------------------|
  | `conv1.*` / `conv2.*` (top level)          | `quant_conv.*` / `post_quant_conv.*`            |
  | `{encoder,decoder}.conv1.*`                | `{encoder,decoder}.conv_in.*`                   |
  | `{enc,dec}.middle.0` / `.1` / `.2`         | `mid_block.resnets.0` / `attentions.0` / `resnets.1` |
  | `{enc,dec}.head.0.gamma` / `head.2.*`      | `norm_out.gamma` / `conv_out.*`                 |
  | `encoder.downsamples.{i}`                  | `encoder.down_blocks.{i}` (same flat order)     |
  | `decoder.upsamples.{n}`                    | `decoder.up_blocks.{s}.resnets.{j}` or          |
  |                                            | `decoder.up_blocks.{s}.upsamplers.0`, where the |
  |                                            | flat list has per stage s: `num_res_blocks + 1` |
  |                                            | residual blocks, then a Resample (not the last) |
  | residual block `residual.0.gamma` / `residual.2.*` / `residual.3.gamma` / `residual.6.*` / `shortcut.*` | `norm1.gamma` / `conv1.*` / `norm2.gamma` / `conv2.*` / `conv_shortcut.*` |

  Attention (`norm`, `to_qkv`, `proj`) and Resample (`resample.1`, `time_conv`) names are the
  same in both. This agrees with diffusers' `convert_wan_vae_to_diffusers` on the Wan2.1 layout
  (checked in tests/test_vae.py) and holds for any `dim_mult` / `num_res_blocks`.

Tensor layouts: Conv3d (out, in, t, h, w) -> (t, h, w, in, out); Conv2d (out, in, h, w) ->
(h, w, in, out); the attention's 1x1 Conv2d (out, in, 1, 1) -> dense (in, out); RMS-norm gammas
(C, 1, 1[, 1]) -> (C,).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from asvd.ckpt.common import (
  CheckpointError,
  fill_state,
  flat_abstract,
  read_safetensors,
  read_safetensors_dir,
  read_torch_checkpoint,
)
from asvd.models.vae import VAEConfig, WanVAE

ORIGINAL_FILENAME = "Wan2.1_VAE.pth"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"

_WHERE = (
  "expected one of: a diffusers AutoencoderKLWan folder (config.json + "
  "diffusion_pytorch_model.safetensors, e.g. the `vae/` folder of "
  "Wan-AI/Wan2.1-T2V-1.3B-Diffusers), a diffusers pipeline folder with such a `vae/` subfolder, "
  f"the original {ORIGINAL_FILENAME} (from Wan-AI/Wan2.1-T2V-1.3B) or a folder holding it"
)

# Residual-block sub-layers: original flat `residual.{i}` index -> diffusers name.
_RES_ORIG_TO_DIFF = {"0": "norm1", "2": "conv1", "3": "norm2", "6": "conv2"}
_RES_DIFF_TO_ORIG = {v: k for k, v in _RES_ORIG_TO_DIFF.items()}
_MID_ORIG_TO_DIFF = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_MID_DIFF_TO_ORIG = {v: k for k, v in _MID_ORIG_TO_DIFF.items()}
_HEAD_ORIG_TO_DIFF = {"0": "norm_out", "2": "conv_out"}
_HEAD_DIFF_TO_ORIG = {v: k for k, v in _HEAD_ORIG_TO_DIFF.items()}

# ------------------------------------------------------------------------------------------------
# Original <-> diffusers key names.
# ------------------------------------------------------------------------------------------------


def _decoder_layout(config: VAEConfig) -> list[str]:
  """Diffusers prefix (under `decoder.up_blocks.`) of each entry of the original flat list."""
  out = []
  last = len(config.dim_mult) - 1
  for s in range(len(config.dim_mult)):
    out += [f"{s}.resnets.{j}" for j in range(config.num_res_blocks + 1)]
    if s != last:
      out.append(f"{s}.upsamplers.0")
  return out


def _block_orig_to_diff(rest: list[str]) -> list[str]:
  """Inside a residual / attention / resample block."""
  if len(rest) >= 2 and rest[0] == "residual" and rest[1] in _RES_ORIG_TO_DIFF:
    return [_RES_ORIG_TO_DIFF[rest[1]], *rest[2:]]
  if rest and rest[0] == "shortcut":
    return ["conv_shortcut", *rest[1:]]
  return rest


def _block_diff_to_orig(rest: list[str]) -> list[str]:
  if rest and rest[0] in _RES_DIFF_TO_ORIG:
    return ["residual", _RES_DIFF_TO_ORIG[rest[0]], *rest[1:]]
  if rest and rest[0] == "conv_shortcut":
    return ["shortcut", *rest[1:]]
  return rest


def original_to_diffusers_key(key: str, config: Any = None) -> str:
  """Renames one original-Wan VAE key to its diffusers name (unknown keys come back unchanged).

  Args:
    key: e.g. "decoder.upsamples.4.shortcut.weight".
    config: the model config (the decoder's flat layout depends on dim_mult and
      num_res_blocks); None is Wan2.1.

  Returns:
    e.g. "decoder.up_blocks.1.resnets.0.conv_shortcut.weight".
  """
  cfg = VAEConfig.from_any(config if config is not None else VAEConfig())
  p = key.split(".")
  if len(p) == 2 and p[0] in ("conv1", "conv2"):
    return {"conv1": "quant_conv", "conv2": "post_quant_conv"}[p[0]] + "." + p[1]
  if len(p) < 3 or p[0] not in ("encoder", "decoder"):
    return key
  side, part, rest = p[0], p[1], p[2:]
  if part == "conv1":
    out = ["conv_in", *rest]
  elif part == "middle" and rest[0] in _MID_ORIG_TO_DIFF:
    out = ["mid_block", *_MID_ORIG_TO_DIFF[rest[0]].split("."), *_block_orig_to_diff(rest[1:])]
  elif part == "head" and rest[0] in _HEAD_ORIG_TO_DIFF:
    out = [_HEAD_ORIG_TO_DIFF[rest[0]], *rest[1:]]
  elif side == "encoder" and part == "downsamples" and rest[0].isdigit():
    out = ["down_blocks", rest[0], *_block_orig_to_diff(rest[1:])]
  elif side == "decoder" and part == "upsamples" and rest[0].isdigit():
    layout = _decoder_layout(cfg)
    n = int(rest[0])
    if n >= len(layout):
      return key
    out = ["up_blocks", *layout[n].split("."), *_block_orig_to_diff(rest[1:])]
  else:
    return key
  return ".".join([side, *out])


def diffusers_to_original_key(key: str, config: Any = None) -> str:
  """Inverse of `original_to_diffusers_key` (unknown keys come back unchanged)."""
  cfg = VAEConfig.from_any(config if config is not None else VAEConfig())
  p = key.split(".")
  if len(p) == 2 and p[0] in ("quant_conv", "post_quant_conv"):
    return {"quant_conv": "conv1", "post_quant_conv": "conv2"}[p[0]] + "." + p[1]
  if len(p) < 3 or p[0] not in ("encoder", "decoder"):
    return key
  side, part, rest = p[0], p[1], p[2:]
  if part == "conv_in":
    out = ["conv1", *rest]
  elif part == "mid_block" and len(rest) >= 2 and ".".join(rest[:2]) in _MID_DIFF_TO_ORIG:
    out = ["middle", _MID_DIFF_TO_ORIG[".".join(rest[:2])], *_block_diff_to_orig(rest[2:])]
  elif part in _HEAD_DIFF_TO_ORIG:
    out = ["head", _HEAD_DIFF_TO_ORIG[part], *rest]
  elif side == "encoder" and part == "down_blocks":
    out = ["downsamples", rest[0], *_block_diff_to_orig(rest[1:])]
  elif side == "decoder" and part == "up_blocks" and len(rest) >= 3:
    layout = _decoder_layout(cfg)
    prefix = ".".join(rest[:3])
    if prefix not in layout:
      return key
    out = ["upsamples", str(layout.index(prefix)), *_block_diff_to_orig(rest[3:])]
  else:
    return key
  return ".".join([side, *out])


# ------------------------------------------------------------------------------------------------
# Diffusers names and layouts -> NNX state paths and layouts.
# ------------------------------------------------------------------------------------------------


def diffusers_key_to_path(key: str) -> tuple[Any, ...]:
  """`"decoder.up_blocks.0.upsamplers.0.resample.1.weight"` -> `(..., "resample", "kernel")`."""
  parts = key.split(".")
  out: list[Any] = []
  i = 0
  while i < len(parts):
    part = parts[i]
    out.append(int(part) if part.isdigit() else part)
    # `resample` is an nn.Sequential(Upsample|ZeroPad2d, Conv2d): the conv is its entry 1.
    if part == "resample" and i + 1 < len(parts) and parts[i + 1] == "1":
      i += 1
    i += 1
  if out and out[-1] == "weight":
    out[-1] = "kernel"
  return tuple(out)


def path_to_diffusers_key(path: tuple[Any, ...]) -> str:
  """Inverse of `diffusers_key_to_path`."""
  out = []
  for i, part in enumerate(path):
    last = i == len(path) - 1
    out.append("weight" if last and part == "kernel" else str(part))
    if part == "resample":
      out.append("1")
  return ".".join(out)


def convert_tensor(path: tuple[Any, ...], arr: np.ndarray) -> np.ndarray:
  """Torch layout -> NNX layout for the parameter at `path` (never raises: a tensor of an
  unexpected rank is passed through so the shape check can report it)."""
  leaf = path[-1] if path else None
  if leaf == "gamma":
    return arr.reshape(-1)
  if leaf != "kernel":
    return arr
  if arr.ndim == 5:  # Conv3d (out, in, t, h, w)
    return arr.transpose(2, 3, 4, 1, 0)
  if arr.ndim == 4:
    if len(path) >= 2 and path[-2] in ("to_qkv", "proj"):  # 1x1 Conv2d -> dense
      return arr.reshape(arr.shape[0], -1).T
    return arr.transpose(2, 3, 1, 0)  # Conv2d (out, in, h, w)
  return arr


def _to_arrays(
  tensors: Mapping[str, np.ndarray], *, original: bool, config: VAEConfig
) -> tuple[dict[tuple[Any, ...], np.ndarray], dict[tuple[Any, ...], str]]:
  """Checkpoint dict -> (`{state path: array}`, `{state path: checkpoint key}`)."""
  arrays, describe = {}, {}
  for key, arr in tensors.items():
    name = original_to_diffusers_key(key, config) if original else key
    path = diffusers_key_to_path(name)
    if path in arrays:
      raise CheckpointError(f"keys {describe[path]!r} and {key!r} map to the same parameter")
    arrays[path] = convert_tensor(path, np.asarray(arr))
    describe[path] = key
  return arrays, describe


def _build(
  tensors: Mapping[str, np.ndarray],
  *,
  original: bool,
  config: VAEConfig,
  dtype: Any,
  source: str,
) -> WanVAE:
  abstract = nnx.eval_shape(lambda: WanVAE(config, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  arrays, describe = _to_arrays(tensors, original=original, config=config)
  hint = (
    f"  (model built from base_dim={config.base_dim}, z_dim={config.z_dim}, "
    f"dim_mult={list(config.dim_mult)}, num_res_blocks={config.num_res_blocks}, "
    f"temperal_downsample={list(config.temperal_downsample)}; "
    f"read with {'original Wan2.1' if original else 'diffusers'} key names; shapes are in the "
    "channels-last layout, conv kernels (t, h, w, in, out))"
  )
  missing = [p for p in flat_abstract(state) if p not in arrays]
  if missing:
    # fill_state names missing parameters by state path; add the checkpoint's own names.
    names = [path_to_diffusers_key(p) for p in missing]
    if original:
      names = [diffusers_to_original_key(k, config) for k in names]
    hint += "\n  missing key(s) in the checkpoint's naming: " + ", ".join(sorted(names))
  state = fill_state(state, arrays, source=source, dtype=dtype, hint=hint, describe=describe)
  return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------------
# Readers.
# ------------------------------------------------------------------------------------------------


def _is_vae_config(folder: str) -> bool:
  """Whether `folder/config.json` describes a VAE (a Wan2.1 folder's config.json is the DiT's)."""
  try:
    with open(os.path.join(folder, "config.json")) as f:
      raw = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError):
    return True  # let read_diffusers_config name the problem
  if not isinstance(raw, dict):
    return True
  return raw.get("_class_name") == "AutoencoderKLWan" or ("z_dim" in raw and "base_dim" in raw)


def read_diffusers_config(folder: str | os.PathLike) -> VAEConfig:
  """`config.json` of a diffusers AutoencoderKLWan folder -> `VAEConfig`."""
  path = os.path.join(os.fspath(folder), "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file; {_WHERE}")
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: not a readable JSON file ({e})") from e
  cls = raw.get("_class_name", "AutoencoderKLWan") if isinstance(raw, dict) else type(raw).__name__
  if cls != "AutoencoderKLWan":
    raise CheckpointError(f"{path}: is a {cls} config, expected AutoencoderKLWan")
  try:
    return VAEConfig.from_any(raw)
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{path}: not a usable AutoencoderKLWan config ({e})") from e


def _diffusers_weights(folder: str) -> tuple[dict[str, np.ndarray], str]:
  """Reads the (possibly sharded) weights of a diffusers folder; returns (tensors, source)."""
  single = os.path.join(folder, f"{DIFFUSERS_WEIGHTS}.safetensors")
  if os.path.isfile(single):
    return read_safetensors(single), single
  names = os.listdir(folder)
  # Shards are "diffusion_pytorch_model-00001-of-0000N.safetensors"; precision variants such as
  # "diffusion_pytorch_model.fp16.safetensors" are only read when nothing else is there.
  for prefix in (f"{DIFFUSERS_WEIGHTS}-", f"{DIFFUSERS_WEIGHTS}."):
    if any(n.startswith(prefix) and n.endswith(".safetensors") for n in names):
      return read_safetensors_dir(folder, prefix), os.path.join(folder, f"{prefix}*.safetensors")
  raise CheckpointError(
    f"{folder}: has config.json but no {DIFFUSERS_WEIGHTS}*.safetensors weights; put the "
    f"diffusers VAE weights ({DIFFUSERS_WEIGHTS}.safetensors) next to config.json"
  )


def _unwrap(obj: Any, path: str) -> Mapping[str, np.ndarray]:
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
  return obj


def _is_original_naming(keys) -> bool:
  keys = set(keys)
  if any(
    k.startswith(("encoder.downsamples.", "decoder.upsamples.", "decoder.middle.")) for k in keys
  ):
    return True
  return "conv1.weight" in keys and "quant_conv.weight" not in keys


def load_diffusers_vae(
  folder: str | os.PathLike, *, dtype: Any = jnp.float32, config: Any = None
) -> WanVAE:
  """Loads a diffusers `AutoencoderKLWan` folder (config.json + safetensors, sharded or not)."""
  folder = os.fspath(folder)
  cfg = VAEConfig.from_any(config) if config is not None else read_diffusers_config(folder)
  tensors, source = _diffusers_weights(folder)
  return _build(tensors, original=False, config=cfg, dtype=dtype, source=source)


def load_single_file(
  path: str | os.PathLike, *, dtype: Any = jnp.float32, config: Any = None
) -> WanVAE:
  """Loads one .pth / .pt / .safetensors file; original or diffusers naming is detected.

  Args:
    path: e.g. `Wan2.1_VAE.pth`.
    dtype: parameter / compute dtype.
    config: the model config (default: the published Wan2.1 layout, base_dim 96, z_dim 16).

  Returns:
    The model.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file; {_WHERE}")
  cfg = VAEConfig.from_any(config if config is not None else VAEConfig())
  if path.endswith(".safetensors"):
    tensors = read_safetensors(path)
  else:
    tensors = _unwrap(read_torch_checkpoint(path), path)
  original = _is_original_naming(tensors)
  return _build(tensors, original=original, config=cfg, dtype=dtype, source=path)


def load_vae(path: str | os.PathLike, *, dtype: Any = jnp.float32, config: Any = None) -> WanVAE:
  """Loads Wan2.1 VAE weights (`asvd.load_vae`).

  Args:
    path: a diffusers `AutoencoderKLWan` folder (config.json + diffusion_pytorch_model*.safetensors,
      sharded or not), a diffusers pipeline folder with a `vae/` subfolder, a Wan2.1 checkpoint
      folder such as `Wan2.1-T2V-1.3B/` (its `Wan2.1_VAE.pth` is used; its config.json is the
      DiT's), the original `Wan2.1_VAE.pth`, or a single .pth / .safetensors file in either naming.
    dtype: parameter / compute dtype.
    config: overrides the config (default: the folder's config.json, else the published Wan2.1
      layout).

  Returns:
    The model.

  Raises:
    CheckpointError: the file is missing or does not match the model (every bad key listed).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "config.json")) and _is_vae_config(path):
      return load_diffusers_vae(path, dtype=dtype, config=config)
    if os.path.isfile(os.path.join(path, ORIGINAL_FILENAME)):
      return load_single_file(os.path.join(path, ORIGINAL_FILENAME), dtype=dtype, config=config)
    if os.path.isfile(os.path.join(path, "vae", "config.json")):
      return load_diffusers_vae(os.path.join(path, "vae"), dtype=dtype, config=config)
    raise CheckpointError(
      f"{path}: no config.json, vae/config.json or {ORIGINAL_FILENAME} in this folder; {_WHERE}"
    )
  if os.path.isfile(path):
    return load_single_file(path, dtype=dtype, config=config)
  raise CheckpointError(f"{path}: no such file or folder; {_WHERE}")
