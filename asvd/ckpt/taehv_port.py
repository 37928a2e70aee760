"""TAEHV checkpoints (`taew2_1.pth` / `.safetensors`) -> `asvd.models.taehv.TAEHV`.

The published files hold the reference's `nn.Sequential` state dict: `decoder.{i}.weight` and
`.bias` for a plain conv at index `i`, `decoder.{i}.conv.{0,2,4}.*` for a MemBlock's three convs
(`.skip.weight` when its widths differ), `decoder.{i}.conv.weight` for a TGrow / TPool 1x1 conv;
the same under `encoder.`. Conv weights are `[out, in, kh, kw]`. A TGrow that does not grow time
in this architecture (the first, in `taew2_1`) keeps the last-timestep rows of a checkpoint that
has more, as the reference does.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from asvd.ckpt.common import (
  CheckpointError,
  fill_state,
  flat_abstract,
  read_safetensors,
  read_torch_checkpoint,
)
from asvd.models.taehv import TAEHV, TAEHVConfig

_MEM = re.compile(r"^(decoder|encoder)\.(\d+)\.conv\.(\d+)\.(weight|bias)$")
_ONE = re.compile(r"^(decoder|encoder)\.(\d+)\.(conv\.weight|skip\.weight|weight|bias)$")


def key_to_path(key: str) -> tuple[Any, ...] | None:
  """The model path of a checkpoint key (None for a key of no known form)."""
  m = _MEM.match(key)
  if m:
    part, i, j, leaf = m.groups()
    return (part, i, "conv", int(j) // 2, leaf)
  m = _ONE.match(key)
  if m:
    part, i, rest = m.groups()
    return (part, i, *rest.split("."))
  return None


def to_arrays(state_dict, abstract) -> tuple[dict, dict]:
  """`({path: array}, {path: original key})` with conv weights as HWIO."""
  expected = flat_abstract(abstract)
  arrays, names = {}, {}
  for k, v in state_dict.items():
    path = key_to_path(k)
    if path is None:
      path = (k,)  # reported as unexpected
    a = np.asarray(v, np.float32)
    if a.ndim == 4:
      a = a.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
      want = expected.get(path)
      if want is not None and path[-2:] == ("conv", "weight") and a.shape[-1] > want.shape[-1]:
        a = a[..., -want.shape[-1] :]  # a TGrow that does not grow time here: last timestep
    arrays[path], names[path] = a, k
  return arrays, names


def load_taehv(path: str | os.PathLike, *, dtype: Any = jnp.float32, config: TAEHVConfig | None = None) -> TAEHV:
  """Loads TAEHV weights (`taew2_1.pth` or `.safetensors`) into a `TAEHV` (`asvd.load_taehv`)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  sd = read_safetensors(path) if path.endswith(".safetensors") else read_torch_checkpoint(path)
  if not isinstance(sd, dict) or not any(str(k).startswith("decoder.") for k in sd):
    raise CheckpointError(f"{path}: not a TAEHV checkpoint (no decoder.* keys)")
  model = nnx.eval_shape(lambda: TAEHV(config, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(model)
  arrays, names = to_arrays(sd, abstract)
  state = fill_state(abstract, arrays, source=path, dtype=dtype, describe=names, hint="expected the taew2_1 layout (Wan2.1 latents)")
  return nnx.merge(graphdef, state)


def is_taehv_file(path: str | os.PathLike) -> bool:
  """A TAEHV file by name (`taew2_1.pth`, `taehv*.safetensors`, ...)."""
  name = os.path.basename(os.fspath(path)).lower()
  return name.startswith(("taew", "taehv")) and name.endswith((".pth", ".pt", ".safetensors"))


__all__ = ["load_taehv", "key_to_path", "is_taehv_file"]
