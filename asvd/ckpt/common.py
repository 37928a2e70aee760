"""Shared checkpoint plumbing: zero-copy tensor readers, validation, clear errors.

Every importer in `asvd.ckpt` turns a foreign checkpoint into a flat `{path: np.ndarray}` dict
keyed like the target NNX state (tuple paths), then calls `fill_state` which checks the dict
against the `nnx.eval_shape` tree and raises one `CheckpointError` listing every missing,
unexpected and mis-shaped key. Never a silent partial load.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from asvd.errors import AsvdError

Path = tuple[Any, ...]

_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
}


class CheckpointError(AsvdError):
  """A checkpoint could not be read or does not match the model. The message names the file."""


def format_problems(
  source: str,
  *,
  missing: Iterable[str] = (),
  unexpected: Iterable[str] = (),
  mismatched: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
  hint: str = "",
) -> str:
  """Builds the one error message that lists everything wrong with a checkpoint."""
  missing, unexpected, mismatched = sorted(missing), sorted(unexpected), sorted(mismatched)
  lines = [f"checkpoint {source!s} does not match the model:"]
  if missing:
    lines.append(f"  {len(missing)} missing key(s):")
    lines += [f"    - {k}" for k in missing]
  if unexpected:
    lines.append(f"  {len(unexpected)} unexpected key(s):")
    lines += [f"    - {k}" for k in unexpected]
  if mismatched:
    lines.append(f"  {len(mismatched)} mis-shaped key(s) (expected vs found):")
    lines += [f"    - {k}: expected {tuple(e)}, found {tuple(f)}" for k, e, f in mismatched]
  if hint:
    lines.append(hint)
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Readers.
# ------------------------------------------------------------------------------------------------


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a .safetensors file as numpy arrays without copying (memory-mapped).

  bf16 tensors come back as `ml_dtypes.bfloat16` arrays, so no torch is needed. The format is an
  8-byte little-endian header length, a JSON header, then the raw little-endian tensor bytes.

  Args:
    path: the .safetensors file.

  Returns:
    `{key: read-only np.ndarray}` in the file's own key names.

  Raises:
    CheckpointError: the file is missing, truncated or not a safetensors file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  size = os.path.getsize(path)
  try:
    with open(path, "rb") as f:
      head = f.read(8)
      _check_not_pointer(path, head + f.read(120))
      if len(head) < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes: too short for a header)")
      (n,) = struct.unpack("<Q", head)
      if n < 2 or 8 + n > size:
        raise CheckpointError(
          f"{path}: not a safetensors file (header length {n} does not fit in the file's {size} bytes; "
          "truncated download, or a text file saved as .safetensors?)"
        )
      f.seek(8)
      header = json.loads(f.read(n))
    if not isinstance(header, dict):
      raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
  except (struct.error, json.JSONDecodeError, UnicodeDecodeError, ValueError, OSError) as e:
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
  base = 8 + n
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    dt = info["dtype"]
    if dt not in _ST_DTYPES:
      raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dt}")
    dtype = np.dtype(_ST_DTYPES[dt])
    start, end = info["data_offsets"]
    if base + end > mm.shape[0]:
      raise CheckpointError(f"{path}: tensor {key!r} runs past the end of the file (truncated?)")
    arr = mm[base + start : base + end].view(dtype).reshape(info["shape"])
    out[key] = arr
  return out


def _check_not_pointer(path: str, head: bytes) -> None:
  """Names the usual culprits when a weights file holds text instead of tensors."""
  if head.startswith(b"version https://git-lfs"):
    raise CheckpointError(
      f"{path}: is a git-LFS pointer, not the weights (run `git lfs pull` in its repository, or "
      "download the file itself)"
    )
  if head.lstrip().startswith((b"<!DOCTYPE", b"<html", b"<HTML")):
    raise CheckpointError(f"{path}: is an HTML page, not the weights (a failed download?)")


def read_safetensors_dir(folder: str | os.PathLike, pattern_prefix: str = "") -> dict[str, np.ndarray]:
  """Reads every `*.safetensors` file (sharded or not) in `folder` into one dict.

  Args:
    folder: a directory; when an `*.index.json` exists its weight map decides the shard files.
    pattern_prefix: only files whose name starts with this (e.g. "diffusion_pytorch_model").

  Returns:
    The merged `{key: array}` dict.
  """
  folder = os.fspath(folder)
  names = sorted(
    f for f in os.listdir(folder) if f.endswith(".safetensors") and f.startswith(pattern_prefix)
  )
  if not names:
    raise CheckpointError(f"{folder}: no {pattern_prefix}*.safetensors file found")
  out: dict[str, np.ndarray] = {}
  for name in names:
    part = read_safetensors(os.path.join(folder, name))
    dup = set(part) & set(out)
    if dup:
      raise CheckpointError(f"{folder}/{name}: keys also present in another shard: {sorted(dup)[:5]}")
    out.update(part)
  return out


def _torch_to_numpy(t) -> np.ndarray:
  import torch  # noqa: PLC0415  (optional dependency)

  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.contiguous().numpy()


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a torch `.pt`/`.pth` file (needs the `torch` extra), memory-mapped when possible.

  Returns the loaded object with every tensor turned into a numpy array (bf16 -> ml_dtypes,
  zero-copy). Nested dicts are kept as dicts.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  try:
    import torch  # noqa: PLC0415
  except ImportError as e:
    raise CheckpointError(
      f"{path}: reading PyTorch .pt/.pth checkpoints needs torch; install the extra with "
      "`pip install 'asvd[torch]'` (or convert once elsewhere with `asvd convert SRC DST`)"
    ) from e
  with open(path, "rb") as f:
    head = f.read(128)
  _check_not_pointer(path, head)
  # torch.save writes a zip archive (PK..); legacy files are a pickle (protocol byte 0x80).
  if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
    raise CheckpointError(
      f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive or a pickle; this file "
      f"starts with {head[:16]!r})"
    )
  try:
    obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
  except Exception:  # noqa: BLE001  (old non-zip pickles cannot be mmapped)
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"{path}: torch.load failed: {e}") from e

  def convert(o):
    if isinstance(o, torch.Tensor):
      return _torch_to_numpy(o)
    if isinstance(o, Mapping):
      return {k: convert(v) for k, v in o.items()}
    return o

  return convert(obj)


# ------------------------------------------------------------------------------------------------
# Validation against the model tree.
# ------------------------------------------------------------------------------------------------


def path_str(path: Path) -> str:
  return ".".join(str(p) for p in path)


def flat_abstract(abstract_state: nnx.State) -> dict[Path, jax.ShapeDtypeStruct]:
  """`{path: ShapeDtypeStruct}` of an (abstract) NNX state, via its pure dict."""
  pure = nnx.to_pure_dict(abstract_state)
  flat, _ = jax.tree_util.tree_flatten_with_path(pure)
  return {tuple(key_of(k) for k in kp): v for kp, v in flat}


def key_of(k) -> Any:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def fill_state(
  abstract_state: nnx.State,
  arrays: Mapping[Path, np.ndarray],
  *,
  source: str,
  dtype: Any = None,
  hint: str = "",
  describe: Mapping[Path, str] | None = None,
) -> nnx.State:
  """Checks `arrays` against `abstract_state` and returns a filled state.

  Args:
    abstract_state: from `nnx.split(nnx.eval_shape(...))`.
    arrays: `{path: array}` with paths of the model's pure dict.
    source: the file or folder, named in errors.
    dtype: cast every floating array to this dtype (None keeps the model's dtype).
    hint: appended to the error message.
    describe: optional `{path: original key}` so errors name the checkpoint's own keys.

  Returns:
    The NNX state with jax arrays in place of the abstract leaves.

  Raises:
    CheckpointError: listing every missing, unexpected and mis-shaped key.
  """
  expected = flat_abstract(abstract_state)
  describe = describe or {}

  def name(p):
    return path_str(p) + (f" (from {describe[p]!r})" if p in describe else "")

  missing = [path_str(p) for p in expected if p not in arrays]
  unexpected = [name(p) for p in arrays if p not in expected]
  mismatched = [
    (name(p), expected[p].shape, tuple(np.shape(a)))
    for p, a in arrays.items()
    if p in expected and tuple(np.shape(a)) != tuple(expected[p].shape)
  ]
  if missing or unexpected or mismatched:
    raise CheckpointError(
      format_problems(source, missing=missing, unexpected=unexpected, mismatched=mismatched, hint=hint)
    )

  def to_leaf(p, sds):
    a = arrays[p]
    target = dtype if (dtype is not None and jnp.issubdtype(sds.dtype, jnp.floating)) else sds.dtype
    return jnp.asarray(a, dtype=target)

  pure = nnx.to_pure_dict(abstract_state)
  flat, treedef = jax.tree_util.tree_flatten_with_path(pure)
  leaves = [to_leaf(tuple(key_of(k) for k in kp), v) for kp, v in flat]
  filled = jax.tree_util.tree_unflatten(treedef, leaves)
  nnx.replace_by_pure_dict(abstract_state, filled)
  return abstract_state
