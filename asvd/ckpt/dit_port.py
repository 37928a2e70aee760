"""Load a `WanDiT` from diffusers, original-Wan, Self-Forcing or asvd (Orbax) checkpoints.

Formats `load_dit` recognises:

| format | what is on disk | key naming |
| --- | --- | --- |
| diffusers | folder: `config.json` + `diffusion_pytorch_model*.safetensors` (sharded or not) | `blocks.0.attn1.to_q.weight` |
| wan | folder: `config.json` (Wan names: dim, num_heads, ...) + `*.safetensors` / `*.pth` | `blocks.0.self_attn.q.weight` |
| self_forcing | `.pt` holding `generator` / `generator_ema` (+ `critic`), keys prefixed `model.` and possibly FSDP/compile fragments | `model.blocks.0.self_attn.q.weight` |
| asvd | folder written by `save_dit` / `asvd convert`: `asvd_dit.json` + Orbax `params/` | the model's own tree |

The mapping between Wan's names and ours (same for diffusers, with diffusers names in brackets):

    patch_embedding                 -> patch_embedding (Conv3d (D,C,1,2,2) -> Dense (4C, D))
    text_embedding.0 / .2           -> text_embedding_1 / _2   [condition_embedder.text_embedder.linear_1/_2]
    time_embedding.0 / .2           -> time_embedding_1 / _2   [condition_embedder.time_embedder.linear_1/_2]
    time_projection.1               -> time_projection         [condition_embedder.time_proj]
    blocks.i.modulation (1,6,D)     -> blocks.i.modulation (6,D)  [blocks.i.scale_shift_table]
    blocks.i.self_attn.{q,k,v,o}    -> blocks.i.self_attn.{q,k,v,o}  [attn1.to_q/to_k/to_v/to_out.0]
    blocks.i.self_attn.norm_{q,k}   -> blocks.i.self_attn.norm_{q,k} [attn1.norm_q/norm_k]
    blocks.i.cross_attn.*           -> blocks.i.cross_attn.*   [attn2.*]
    blocks.i.norm3 (affine)         -> blocks.i.norm_cross_{scale,bias}  [norm2]
    blocks.i.ffn.0 / .2             -> blocks.i.ffn_in / ffn_out  [ffn.net.0.proj / ffn.net.2]
    head.modulation (1,2,D)         -> head_modulation (2,D)   [scale_shift_table]
    head.head                       -> head                    [proj_out]

Linear weights are transposed (out, in) -> (in, out). Every key is checked: one `CheckpointError`
lists all missing, unexpected and mis-shaped keys (in the checkpoint's own naming) and the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asvd.ckpt.common import (
  CheckpointError,
  flat_abstract,
  format_problems,
  key_of,
  path_str,
  read_safetensors,
  read_safetensors_dir,
  read_torch_checkpoint,
)
from asvd.models.dit import DiTConfig, WanDiT

ASVD_META = "asvd_dit.json"

# ------------------------------------------------------------------------------------------------
# Name tables: (our path, wan name, diffusers name, transform). `{i}` is the layer index.
# ------------------------------------------------------------------------------------------------

_DENSES = [
  # ours, wan, diffusers
  ("text_embedding_1", "text_embedding.0", "condition_embedder.text_embedder.linear_1"),
  ("text_embedding_2", "text_embedding.2", "condition_embedder.text_embedder.linear_2"),
  ("time_embedding_1", "time_embedding.0", "condition_embedder.time_embedder.linear_1"),
  ("time_embedding_2", "time_embedding.2", "condition_embedder.time_embedder.linear_2"),
  ("time_projection", "time_projection.1", "condition_embedder.time_proj"),
  ("head", "head.head", "proj_out"),
]
_BLOCK_DENSES = [
  ("ffn_in", "ffn.0", "ffn.net.0.proj"),
  ("ffn_out", "ffn.2", "ffn.net.2"),
]
for _ours, _wan, _diff in (("self_attn", "self_attn", "attn1"), ("cross_attn", "cross_attn", "attn2")):
  for _p, _dp in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0")):
    _BLOCK_DENSES.append((f"{_ours}.{_p}", f"{_wan}.{_p}", f"{_diff}.{_dp}"))


@dataclasses.dataclass(frozen=True)
class _Rule:
  ours: str
  wan: str
  diffusers: str
  kind: str  # ident | linear | table | patch


def _rules(cfg: DiTConfig) -> list[_Rule]:
  r = [
    _Rule("patch_embedding.kernel", "patch_embedding.weight", "patch_embedding.weight", "patch"),
    _Rule("patch_embedding.bias", "patch_embedding.bias", "patch_embedding.bias", "ident"),
    _Rule("head_modulation", "head.modulation", "scale_shift_table", "table"),
  ]
  for ours, wan, diff in _DENSES:
    r.append(_Rule(f"{ours}.kernel", f"{wan}.weight", f"{diff}.weight", "linear"))
    r.append(_Rule(f"{ours}.bias", f"{wan}.bias", f"{diff}.bias", "ident"))
  for i in range(cfg.num_layers):
    b = f"blocks.{i}"
    r.append(_Rule(f"{b}.modulation", f"{b}.modulation", f"{b}.scale_shift_table", "table"))
    for ours, wan, diff in _BLOCK_DENSES:
      r.append(_Rule(f"{b}.{ours}.kernel", f"{b}.{wan}.weight", f"{b}.{diff}.weight", "linear"))
      r.append(_Rule(f"{b}.{ours}.bias", f"{b}.{wan}.bias", f"{b}.{diff}.bias", "ident"))
    for att, watt, datt in (("self_attn", "self_attn", "attn1"), ("cross_attn", "cross_attn", "attn2")):
      for n in ("norm_q", "norm_k"):
        r.append(_Rule(f"{b}.{att}.{n}", f"{b}.{watt}.{n}.weight", f"{b}.{datt}.{n}.weight", "ident"))
    if cfg.cross_attn_norm:
      r.append(_Rule(f"{b}.norm_cross_scale", f"{b}.norm3.weight", f"{b}.norm2.weight", "ident"))
      r.append(_Rule(f"{b}.norm_cross_bias", f"{b}.norm3.bias", f"{b}.norm2.bias", "ident"))
  return r


def _src_shape(kind: str, shape: tuple[int, ...], cfg: DiTConfig) -> tuple[int, ...]:
  """The checkpoint-side shape of a tensor whose asvd shape is `shape`."""
  if kind == "linear":
    return shape[::-1]
  if kind == "table":
    return (1, *shape)
  if kind == "patch":
    return (shape[1], cfg.in_channels, *cfg.patch_size)
  return shape


def _to_ours(kind: str, a: np.ndarray) -> np.ndarray:
  if kind == "linear":
    return a.T
  if kind == "table":
    return a[0]
  if kind == "patch":  # (D, C, pt, ph, pw) -> (pt, ph, pw, C, D) -> (pt*ph*pw*C, D)
    return a.transpose(2, 3, 4, 1, 0).reshape(-1, a.shape[0])
  return a


def _from_ours(kind: str, a: np.ndarray, cfg: DiTConfig) -> np.ndarray:
  if kind == "linear":
    return a.T
  if kind == "table":
    return a[None]
  if kind == "patch":
    pt, ph, pw = cfg.patch_size
    return a.reshape(pt, ph, pw, cfg.in_channels, -1).transpose(4, 3, 0, 1, 2)
  return a


# ------------------------------------------------------------------------------------------------
# Config discovery.
# ------------------------------------------------------------------------------------------------

_DIFFUSERS_TO_OURS = {
  "in_channels": "in_channels",
  "out_channels": "out_channels",
  "text_dim": "text_dim",
  "freq_dim": "freq_dim",
  "ffn_dim": "ffn_dim",
  "num_layers": "num_layers",
  "cross_attn_norm": "cross_attn_norm",
  "eps": "eps",
  "rope_max_seq_len": "rope_max_seq_len",
}
_WAN_TO_OURS = {
  "in_dim": "in_channels",
  "out_dim": "out_channels",
  "text_dim": "text_dim",
  "freq_dim": "freq_dim",
  "ffn_dim": "ffn_dim",
  "num_layers": "num_layers",
  "num_heads": "num_heads",
  "dim": "dim",
  "text_len": "text_len",
  "cross_attn_norm": "cross_attn_norm",
  "eps": "eps",
}


def config_from_json(d: dict, source: str) -> dict:
  """Model config (our key names) from a diffusers or Wan `config.json` dict."""
  out: dict[str, Any] = {}
  if "num_attention_heads" in d:  # diffusers
    out["num_heads"] = d["num_attention_heads"]
    out["dim"] = d["num_attention_heads"] * d["attention_head_dim"]
    for k, v in _DIFFUSERS_TO_OURS.items():
      if k in d and d[k] is not None:
        out[v] = d[k]
    if d.get("image_dim") or d.get("added_kv_proj_dim"):
      raise CheckpointError(f"{source}: image-conditioned (I2V) Wan models are not supported yet")
  elif "dim" in d and "num_heads" in d:  # original Wan
    for k, v in _WAN_TO_OURS.items():
      if k in d and d[k] is not None:
        out[v] = d[k]
    if d.get("model_type", "t2v") not in ("t2v", "t2i"):
      raise CheckpointError(f"{source}: Wan model_type {d['model_type']!r} is not supported (t2v only)")
    if d.get("qk_norm") is False:
      raise CheckpointError(f"{source}: qk_norm=false Wan models are not supported (Wan2.1 uses qk_norm)")
  elif "model" in d and isinstance(d["model"], dict):  # asvd
    out = dict(d["model"])
  else:
    raise CheckpointError(f"{source}: config.json is neither diffusers' nor Wan's ({sorted(d)[:8]}...)")
  if "patch_size" in d:
    out["patch_size"] = tuple(d["patch_size"])
  return out


def config_from_shapes(
  arrays: dict[str, np.ndarray], source: str, head_dim: int = 128, num_heads: int | None = None
) -> dict:
  """Infers the model config from Wan-named tensor shapes (for bare Self-Forcing `.pt` files).

  The head count is not in any shape: it is `dim // head_dim` with Wan's head dim of 128 unless
  `num_heads` is given.
  """
  try:
    w = arrays["patch_embedding.weight"]
    dim, cin = int(w.shape[0]), int(w.shape[1])
    layers = 1 + max(int(m.group(1)) for k in arrays if (m := re.match(r"blocks\.(\d+)\.", k)))
    return {
      "dim": dim,
      "in_channels": cin,
      "patch_size": tuple(int(s) for s in w.shape[2:]),
      "num_layers": layers,
      "ffn_dim": int(arrays["blocks.0.ffn.0.weight"].shape[0]),
      "text_dim": int(arrays["text_embedding.0.weight"].shape[1]),
      "freq_dim": int(arrays["time_embedding.0.weight"].shape[1]),
      "out_channels": int(arrays["head.head.weight"].shape[0]) // int(np.prod(w.shape[2:])),
      "num_heads": num_heads or _heads_from_dim(dim, head_dim, source),
      "cross_attn_norm": "blocks.0.norm3.weight" in arrays,
    }
  except (KeyError, ValueError) as e:
    raise CheckpointError(
      f"{source}: cannot infer the model config from tensor shapes (missing {e}); put a Wan or "
      "diffusers config.json next to it or pass model_config="
    ) from e


def _heads_from_dim(dim: int, head_dim: int, source: str) -> int:
  if dim % head_dim:
    raise CheckpointError(
      f"{source}: cannot infer num_heads for dim {dim} (not a multiple of Wan's head dim {head_dim}); "
      "pass num_heads=..., or put a config.json next to the checkpoint"
    )
  return dim // head_dim


# ------------------------------------------------------------------------------------------------
# Reading the formats.
# ------------------------------------------------------------------------------------------------

_STRIP = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module.")


def _clean_self_forcing(sd: dict[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in sd.items():
    for frag in _STRIP:
      k = k.replace(frag, "")
    k = k.removeprefix("model.")
    out[k] = v
  return out


def _pick_generator(obj: Any, source: str, variant: str | None) -> dict:
  if not isinstance(obj, dict):
    raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
  if any(isinstance(v, np.ndarray) for v in obj.values()):  # already a flat state dict
    return obj
  choices = [variant] if variant else ["generator_ema", "generator"]
  for c in choices:
    if c in obj and isinstance(obj[c], dict):
      return obj[c]
  raise CheckpointError(
    f"{source}: no {' / '.join(repr(c) for c in choices)} entry (found {sorted(obj)}); "
    "Self-Forcing checkpoints hold 'generator' and, after EMA starts, 'generator_ema'"
  )


def _detect(path: str) -> str:
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, ASVD_META)):
      return "asvd"
    if os.path.isfile(os.path.join(path, "config.json")):
      with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
      return "diffusers" if "num_attention_heads" in d else "wan"
    raise CheckpointError(
      f"{path}: not a recognised DiT checkpoint folder: expected config.json (+ *.safetensors) for "
      f"diffusers/Wan, or {ASVD_META} (+ params/) written by `asvd convert`"
    )
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file or folder")
  if path.endswith((".pt", ".pth", ".bin", ".ckpt")):
    return "self_forcing"
  if path.endswith(".safetensors"):
    return "wan_file"
  raise CheckpointError(f"{path}: unknown checkpoint type (expected a folder, .safetensors or .pt)")


def read_foreign(path: str, *, variant: str | None = None) -> tuple[str, dict[str, np.ndarray], dict | None]:
  """Reads a PyTorch-side checkpoint: `(naming, {key: array}, config-or-None)`.

  `naming` is "diffusers" or "wan" (Self-Forcing checkpoints use Wan naming).
  """
  fmt = _detect(path)
  cfg = None
  if fmt in ("diffusers", "wan"):
    with open(os.path.join(path, "config.json")) as f:
      cfg = config_from_json(json.load(f), os.path.join(path, "config.json"))
    files = sorted(os.listdir(path))
    if any(f.endswith(".safetensors") for f in files):
      prefix = "diffusion_pytorch_model" if fmt == "diffusers" else ""
      arrays = read_safetensors_dir(path, prefix)
    else:
      pts = [f for f in files if f.endswith((".pt", ".pth", ".bin"))]
      if not pts:
        raise CheckpointError(f"{path}: config.json found but no *.safetensors or *.pt weights")
      arrays = {}
      for f in pts:
        arrays.update(_clean_self_forcing(_pick_generator(read_torch_checkpoint(os.path.join(path, f)), f, variant)))
    return fmt, arrays, cfg
  if fmt == "wan_file":
    arrays = read_safetensors(path)
    naming = "diffusers" if any(k.startswith("condition_embedder.") for k in arrays) else "wan"
  else:
    obj = read_torch_checkpoint(path)
    arrays = _clean_self_forcing(_pick_generator(obj, path, variant))
    naming = "diffusers" if any(k.startswith("condition_embedder.") for k in arrays) else "wan"
  side = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
  if os.path.isfile(side):
    with open(side) as f:
      cfg = config_from_json(json.load(f), side)
  return naming, arrays, cfg


def convert_arrays(
  arrays: dict[str, np.ndarray], naming: str, cfg: DiTConfig, source: str
) -> dict[str, np.ndarray]:
  """Renames/reshapes foreign tensors into per-layer asvd paths (`"blocks.3.ffn_in.kernel"`).

  Raises:
    CheckpointError: listing every missing, unexpected and mis-shaped key.
  """
  abstract = abstract_model(dataclasses.replace(cfg, scan_layers=False))
  expected = {path_str(p): s.shape for p, s in flat_abstract(nnx.state(abstract)).items()}
  rules = _rules(cfg)
  src_name = (lambda r: r.diffusers) if naming == "diffusers" else (lambda r: r.wan)
  out, missing, mismatched, used = {}, [], [], set()
  for r in rules:
    key = src_name(r)
    want = _src_shape(r.kind, tuple(expected[r.ours]), cfg)
    if key not in arrays:
      missing.append(key)
      continue
    used.add(key)
    a = arrays[key]
    if tuple(a.shape) != want:
      mismatched.append((key, want, tuple(a.shape)))
      continue
    out[r.ours] = _to_ours(r.kind, a)
  unexpected = [k for k in arrays if k not in used]
  if missing or unexpected or mismatched:
    raise CheckpointError(
      format_problems(
        f"{source} ({naming} naming, model {cfg.num_layers} layers x dim {cfg.dim})",
        missing=missing,
        unexpected=unexpected,
        mismatched=mismatched,
      )
    )
  return out


def abstract_model(cfg: DiTConfig) -> WanDiT:
  return nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(params=0)))


def model_from_flat(cfg: DiTConfig, flat: dict[str, np.ndarray], dtype: Any = None) -> WanDiT:
  """Builds a `WanDiT` from per-layer asvd paths, stacking blocks for the scanned layout."""
  abstract = abstract_model(cfg)
  graphdef, state = nnx.split(abstract)
  target = flat_abstract(state)
  n = cfg.num_layers

  def leaf(path, sds):
    if cfg.scan_layers and path[0] == "blocks":
      rest = path_str(path[1:])
      a = np.stack([flat[f"blocks.{i}.{rest}"] for i in range(n)])
    else:
      a = flat[path_str(path)]
    want = dtype if dtype is not None else sds.dtype
    return jnp.asarray(a, dtype=want)

  pure = nnx.to_pure_dict(state)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
  paths = [tuple(key_of(k) for k in kp) for kp, _ in leaves]
  vals = [leaf(p, target[p]) for p in paths]
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, vals))
  return nnx.merge(graphdef, state)


def to_flat(model: WanDiT) -> dict[str, np.ndarray]:
  """Inverse of `model_from_flat`: per-layer asvd paths -> numpy arrays."""
  cfg = model.cfg
  out = {}
  for p, a in flat_abstract(nnx.state(model, nnx.Param)).items():
    a = np.asarray(a)
    if cfg.scan_layers and p[0] == "blocks":
      for i in range(cfg.num_layers):
        out[f"blocks.{i}.{path_str(p[1:])}"] = a[i]
    else:
      out[path_str(p)] = a
  return out


def export_state_dict(model: WanDiT, naming: str = "diffusers") -> dict[str, np.ndarray]:
  """The model's weights under diffusers or Wan key names (inverse of the import mapping)."""
  flat = to_flat(model)
  src = (lambda r: r.diffusers) if naming == "diffusers" else (lambda r: r.wan)
  return {src(r): np.ascontiguousarray(_from_ours(r.kind, flat[r.ours], model.cfg)) for r in _rules(model.cfg)}


# ------------------------------------------------------------------------------------------------
# Public entry points.
# ------------------------------------------------------------------------------------------------


def _resolve_config(found: dict | None, model_config: Any, arrays, naming, source, overrides) -> DiTConfig:
  base: dict[str, Any] = {}
  if model_config is not None:
    mc = DiTConfig.from_config(model_config)
    base = dataclasses.asdict(mc)
  elif found is not None:
    base = dict(found)
    if naming == "wan":  # Wan's config.json omits text_dim, patch_size, ... (ignore_for_config)
      base = _complete_from_shapes(base, arrays, source)
  elif naming == "wan":
    base = config_from_shapes(arrays, source, num_heads=overrides.get("num_heads"))
  else:
    raise CheckpointError(f"{source}: no config.json found; pass model_config=")
  base.update(overrides)
  return DiTConfig.from_config(base)


def _complete_from_shapes(found: dict, arrays, source: str) -> dict:
  """Fills what a Wan `config.json` does not record from the weights' shapes.

  A value that the file records and the shapes contradict is an error naming both.
  """
  inferred = config_from_shapes(arrays, source, num_heads=found.get("num_heads", 1))
  if "num_heads" not in found:
    inferred["num_heads"] = _heads_from_dim(inferred["dim"], 128, source)
  conflicts = [
    f"{k}: config.json says {found[k]!r}, the weights say {v!r}"
    for k, v in inferred.items()
    if k in found and (tuple(found[k]) if isinstance(found[k], list) else found[k]) != v
  ]
  if conflicts:
    raise CheckpointError(f"{source}: config.json contradicts the weights: " + "; ".join(conflicts))
  return {**inferred, **found}


def load_dit(
  path: str | os.PathLike,
  *,
  dtype: Any = None,
  model_config: Any = None,
  variant: str | None = None,
  **overrides: Any,
) -> WanDiT:
  """A ready `WanDiT` from a checkpoint.

  Args:
    path: a diffusers folder, an original-Wan folder or `.safetensors`, a Self-Forcing `.pt`
      (uses `generator_ema` when present, else `generator`), or an asvd/Orbax folder from
      `asvd convert` / `save_dit`.
    dtype: parameter and activation dtype (e.g. `jnp.bfloat16`; matmuls accumulate in f32).
      Default: the stored dtype for asvd checkpoints, float32 for the others.
    model_config: the model config when the checkpoint carries none (Self-Forcing `.pt` without
      a `config.json` beside it); by default it is read or inferred from shapes (head dim 128).
    variant: for Self-Forcing files, "generator" or "generator_ema".
    **overrides: model config fields to set (e.g. `attention="cudnn"`, `scan_layers=False`).

  Returns:
    The model.

  Raises:
    CheckpointError: naming the file and every missing, unexpected or mis-shaped key.
  """
  path = os.fspath(path)
  fmt = _detect(path)
  if dtype is not None or fmt != "asvd":  # an asvd checkpoint keeps its stored dtype by default
    dt = jnp.dtype(jnp.float32 if dtype is None else dtype).name
    overrides = {"dtype": dt, "param_dtype": dt, **overrides}
  if fmt == "asvd":
    return commit(_load_asvd(path, overrides))
  naming, arrays, found = read_foreign(path, variant=variant)
  if naming == "diffusers" and not any(k.startswith("condition_embedder.") for k in arrays):
    naming = "wan" if any(k.startswith("text_embedding.") for k in arrays) else naming
  cfg = _resolve_config(found, model_config, arrays, naming, path, overrides)
  flat = convert_arrays(arrays, naming, cfg, path)
  return commit(model_from_flat(cfg, flat, jnp.dtype(cfg.param_dtype)))


def commit(model: WanDiT, device=None) -> WanDiT:
  """Places every parameter on `device` (default: this process's first) as a committed array.

  Whatever the checkpoint format, the loaded model then has one placement, so a jitted
  transition compiles once for it (Orbax restores committed arrays, `jnp.asarray` makes
  uncommitted ones; mixing the two made the first call compile twice).
  """
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, device or jax.local_devices()[0])
  return nnx.merge(graphdef, state)


def is_asvd_checkpoint(path: str) -> bool:
  """Whether `path` is a folder that asvd wrote (`asvd_dit.json` + `params/` and nothing else)."""
  if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, ASVD_META)):
    return False
  return set(os.listdir(path)) <= {ASVD_META, "params"}


def _check_destination(path: str, overwrite: bool) -> None:
  if not os.path.lexists(path):
    return
  if not is_asvd_checkpoint(path):
    what = "a file" if not os.path.isdir(path) else f"a folder holding {sorted(os.listdir(path))[:6]}"
    raise CheckpointError(
      f"{path}: exists and is not an asvd checkpoint ({what}); asvd never replaces what it did not "
      "write: choose another destination"
    )
  if not overwrite:
    raise CheckpointError(f"{path}: an asvd checkpoint is already there; pass --overwrite (overwrite=True) to replace it")


def save_dit(model: WanDiT, path: str | os.PathLike, *, overwrite: bool = False) -> None:
  """Writes an asvd checkpoint (Orbax params + `asvd_dit.json`) atomically.

  The folder is assembled under a temporary name next to `path` and renamed into place, so an
  interrupted save never leaves a half-written checkpoint at `path`. An existing `path` is
  replaced only if it is an asvd checkpoint and `overwrite` is set; anything else there is
  refused, never deleted. While replacing, the old checkpoint is moved aside under a fresh
  unique name (`PATH.old-XXXX`) and removed only once the new one is in place.

  Args:
    model: the model.
    path: the destination folder.
    overwrite: replace an existing asvd checkpoint at `path`.

  Raises:
    CheckpointError: `path` exists and is not an asvd checkpoint, or exists and `overwrite` is
      not set.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  path = os.path.abspath(os.fspath(path))
  _check_destination(path, overwrite)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
  try:
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    # One process writes (in a multi-process run, the one calling this): no barrier with others.
    me = jax.process_index()
    if jax.process_count() > 1:  # Orbax takes host arrays there, not one process's device arrays
      params = jax.tree.map(np.asarray, params)
    ckptr = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))
    ckptr.save(os.path.join(tmp, "params"), params)
    ckptr.wait_until_finished()
    meta = {"format": "asvd.WanDiT", "version": 1, "model": dataclasses.asdict(model.cfg)}
    with open(os.path.join(tmp, ASVD_META), "w") as f:
      json.dump(meta, f, indent=2)
    if os.path.lexists(path):
      _check_destination(path, overwrite)  # again: it may have changed while we were writing
      aside = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
      os.rename(path, os.path.join(aside, "checkpoint"))
      os.rename(tmp, path)
      shutil.rmtree(aside)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _load_asvd(path: str, overrides: dict) -> WanDiT:
  import orbax.checkpoint as ocp  # noqa: PLC0415

  with open(os.path.join(path, ASVD_META)) as f:
    meta = json.load(f)
  stored = DiTConfig.from_config(meta["model"])
  cfg = DiTConfig.from_config({**dataclasses.asdict(stored), **overrides})
  # Restore in the stored layout, then re-layout/cast if the caller asked for another.
  abstract = abstract_model(stored)
  graphdef, state = nnx.split(abstract)
  target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  # Each process reads the whole checkpoint by itself (as `save_dit` writes it): no barrier with
  # the others, every array on this process's first device (a multi-process run shards later).
  me = jax.process_index()
  if jax.process_count() > 1:
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local), target)
  ckptr = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))
  try:
    restored = ckptr.restore(os.path.abspath(os.path.join(path, "params")), target)
  except Exception as e:  # noqa: BLE001  (orbax raises many types; name the file)
    raise CheckpointError(f"{path}: Orbax restore failed: {e}") from e
  nnx.replace_by_pure_dict(state, restored)
  model = nnx.merge(graphdef, state)
  if cfg == stored:
    return model
  return model_from_flat(cfg, to_flat(model), jnp.dtype(cfg.param_dtype))


def convert(src: str, dst: str, *, dtype: Any = None, variant: str | None = None, overwrite: bool = False) -> WanDiT:
  """`asvd convert SRC DST`: any supported checkpoint -> asvd Orbax folder (fast reloads).

  The destination is checked before anything is read: it must not be (or contain, or lie
  inside) the source, and an existing one must be an asvd checkpoint and `overwrite` set.
  """
  a, b = os.path.realpath(src), os.path.realpath(dst)
  if not os.path.exists(a):
    raise CheckpointError(f"{src}: no such file or folder")
  if os.path.commonpath([a, b]) in (a, b):
    raise CheckpointError(f"convert {src} -> {dst}: the destination is, contains or lies inside the source; choose another")
  _check_destination(os.path.abspath(dst), overwrite)
  model = load_dit(src, variant=variant, dtype=jnp.float32 if dtype is None else dtype)
  save_dit(model, dst, overwrite=overwrite)
  return model


__all__ = ["load_dit", "save_dit", "convert", "export_state_dict", "is_asvd_checkpoint", "CheckpointError"]

