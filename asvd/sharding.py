"""Logical axis names -> mesh shardings, for parameters, carries and activations.

Every parameter carries logical axis names in its NNX metadata (`out_sharding`, e.g. `("layers",
"embed", "heads")`), and every cache/carry tensor has them in `Cache.logical_axes()`. A rule
table maps logical names to mesh axes; names with no rule are replicated. The mesh axes are
`(data, fsdp, context, tensor)`:

* `data`: pure data parallelism (batch only);
* `fsdp`: batch *and* the parameters' `embed` axis (ZeRO-3 style: weights are all-gathered per
  layer inside the scan, gradients reduce-scattered);
* `context`: the token axis of activations (sequence parallelism);
* `tensor`: attention heads and the MLP hidden axis (Megatron style).

Typical use::

    mesh = sharding.mesh_from_config(config.mesh)            # e.g. data=2, fsdp=4
    model = sharding.shard_model(model, mesh)                # params placed by their names
    frames, carry = asvd.rollout(model, ctx, key, ..., mesh=mesh)

Inside a jitted function traced under `activation_sharding(mesh, rules)`, the DiT pins its
residual stream and attention heads with `constrain`, so GSPMD never has to guess a layout
between blocks. Outside such a context `constrain` does nothing.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from asvd.errors import UsageError

MESH_AXES = ("data", "fsdp", "context", "tensor")

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
  # Parameters.
  "embed": "fsdp",
  "heads": "tensor",
  "mlp": "tensor",
  "layers": None,
  # Activations and carries.
  "batch": ("data", "fsdp"),
  "act_embed": None,  # the residual stream's width: never split (its weights' embed is)
  "act_tokens": "context",  # tokens of the residual stream and of the queries
  "tokens": None,  # cached K/V slots: whole on every context shard, or split ("context": less memory, more traffic)
  "kv_tokens": None,  # keys / values entering attention: whole (each query block attends to all)
  "slots": None,
  "head_dim": None,
  "frames": None,
  "height": None,
  "width": None,
  "channels": None,
  "steps": None,
  "chunks": None,
  "text": None,
}


def make_mesh(shape: Sequence[int], names: Sequence[str], devices=None) -> Mesh:
  """A mesh with Auto axes (GSPMD propagation), which jit in/out shardings expect."""
  devices = jax.devices() if devices is None else devices
  n = int(np.prod(shape))
  if n > len(devices):
    raise UsageError(f"mesh {dict(zip(names, shape))} needs {n} devices, {len(devices)} available")
  at = jax.sharding.AxisType.Auto
  return Mesh(np.asarray(devices[:n]).reshape(shape), tuple(names), axis_types=(at,) * len(names))


def mesh_from_config(mesh_cfg: Mapping | None, devices=None) -> Mesh:
  """The `(data, fsdp, context, tensor)` mesh of a `config.mesh` section.

  Args:
    mesh_cfg: sizes per axis (missing axes are 1); one size may be -1: all remaining devices.
    devices: the devices to use (default: all).

  Returns:
    A `Mesh` over all four axes (size-1 axes included, so rules can always name them).
  """
  devices = jax.devices() if devices is None else list(devices)
  mesh_cfg = dict(mesh_cfg or {})
  unknown = sorted(set(mesh_cfg) - set(MESH_AXES) - {"rules"})
  if unknown:
    raise UsageError(f"config mesh: unknown axis {unknown}; the axes are {list(MESH_AXES)}")
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UsageError(f"config mesh {dict(zip(MESH_AXES, sizes))}: sizes must be >= 1, at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise UsageError(f"config mesh {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices do not divide by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  return make_mesh(sizes, MESH_AXES, devices)


def rules_from_config(mesh_cfg: Mapping | None) -> dict:
  """`DEFAULT_RULES` updated with `config.mesh.rules` (logical name -> mesh axis, list, or None).

  Raises:
    UsageError: naming the rule, for a logical name that is not in `DEFAULT_RULES` or a value that
      is not None, a mesh axis or a list of distinct mesh axes.
  """
  rules = dict(DEFAULT_RULES)
  extra = dict((mesh_cfg or {}).get("rules", None) or {})
  for k, v in extra.items():
    if k not in DEFAULT_RULES:
      raise UsageError(f"config mesh.rules.{k}: no such logical axis; use one of {sorted(DEFAULT_RULES)}")
    axes = () if v is None else tuple(v) if isinstance(v, (list, tuple)) else (v,)
    if any(a not in MESH_AXES for a in axes) or len(set(axes)) != len(axes):
      raise UsageError(f"config mesh.rules.{k}={v!r}: give None, one of {list(MESH_AXES)} or a list of distinct ones")
    rules[k] = tuple(v) if isinstance(v, (list, tuple)) else v
  return rules


def from_config(config) -> tuple[Mesh | None, dict | None]:
  """`(mesh, rules)` of a full config's `mesh` section, or `(None, None)` for one device (the
  default: every axis 1), so single-device runs keep the plain programs."""
  m = config.get("mesh", None)
  m = {} if m is None else (m.to_dict() if hasattr(m, "to_dict") else dict(m))
  rules = rules_from_config(m)  # checked on one device too: a misspelt rule is a mistake there as well
  if all(int(m.get(a, 1)) == 1 for a in MESH_AXES):
    return None, None
  return mesh_from_config(m), rules


def rules_key(rules: Mapping | None):
  """A hashable form of a rule table (for caching compiled programs)."""
  if rules is None:
    return None
  return tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(rules).items()))


def spec_for(names: Sequence[str | None], mesh: Mesh, rules: Mapping | None = None, shape: Sequence[int] | None = None) -> PartitionSpec:
  """The mesh `PartitionSpec` of a tensor with logical axis `names`.

  A mesh axis is used at most once per tensor (first name wins). With `shape`, mesh axes that
  do not divide their dimension are dropped (that dimension is then replicated over them: a
  batch of 1 on a data axis of 2, a head count that the tensor axis does not divide).
  """
  rules = DEFAULT_RULES if rules is None else rules
  out, used = [], set()
  for i, n in enumerate(names):
    r = rules.get(n) if n is not None else None
    axes = () if r is None else (r,) if isinstance(r, str) else tuple(r)
    axes = [a for a in axes if a in mesh.axis_names and a not in used and mesh.shape[a] > 1]
    if shape is not None:
      keep, size = [], 1
      for a in axes:
        if shape[i] % (size * mesh.shape[a]) == 0:
          keep.append(a)
          size *= mesh.shape[a]
      axes = keep
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*out)


def _is_names(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


def logical_sharding(axes_tree, mesh: Mesh, rules: Mapping | None = None, shapes=None):
  """Maps a pytree whose leaves are tuples of logical names to `NamedSharding`s.

  `shapes` (a matching pytree of arrays or ShapeDtypeStructs) lets `spec_for` drop mesh axes
  that do not divide a dimension.
  """
  if shapes is None:
    return jax.tree.map(lambda names: NamedSharding(mesh, spec_for(names, mesh, rules)), axes_tree, is_leaf=_is_names)
  return jax.tree.map(
    lambda names, x: NamedSharding(mesh, spec_for(names, mesh, rules, x.shape)), axes_tree, shapes, is_leaf=_is_names
  )


# ------------------------------------------------------------------------------------------------
# Parameters.
# ------------------------------------------------------------------------------------------------


def _shape(v) -> tuple:
  """The shape of a Variable's value (an array or a ShapeDtypeStruct)."""
  return tuple(jax.tree.leaves(v)[0].shape)


def _param_names(v) -> tuple:
  names = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
  return tuple(names) if names else (None,) * len(_shape(v))


def param_shardings(state, mesh: Mesh, rules: Mapping | None = None):
  """`NamedSharding` per parameter of an `nnx.State` (or of a model), from its logical names.

  Returns a pytree with a `NamedSharding` where `state` has a Variable: a prefix of the state's
  arrays, as `jax.jit(in_shardings=...)` and `jax.device_put` take it.
  """
  if isinstance(state, nnx.Module):
    state = nnx.state(state)

  def one(v):
    return NamedSharding(mesh, spec_for(_param_names(v), mesh, rules, _shape(v)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def tree_shardings(tree, mesh: Mesh, rules: Mapping | None = None):
  """Shardings of any pytree holding NNX Variables (a train state: parameters, optimizer moments
  and EMA keep their Variables' names): each Variable by its logical names, every other array
  (step counters, keys, Adam's count) replicated."""
  rep = NamedSharding(mesh, PartitionSpec())

  def one(v):
    if isinstance(v, nnx.Variable):
      return NamedSharding(mesh, spec_for(_param_names(v), mesh, rules, _shape(v)))
    return rep

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_shardings(batch, mesh: Mesh, rules: Mapping | None = None):
  """A data batch's shardings: the leading axis is `batch`, the rest whole."""
  return jax.tree.map(lambda x: NamedSharding(mesh, spec_for(("batch",) + (None,) * (np.ndim(x) - 1), mesh, rules, np.shape(x))), batch)


def place_batch(batch, mesh: Mesh, rules: Mapping | None = None):
  """A batch of host arrays onto the mesh, split along the batch axis.

  With one process the batch is the global batch. With several, each holds its own rows (the
  data pipeline shards by process) and they are stitched into one global array
  (`jax.make_array_from_process_local_data`)."""
  if jax.process_count() == 1:
    return jax.device_put(batch, batch_shardings(batch, mesh, rules))

  def one(x):
    x = np.asarray(x)
    glob = (x.shape[0] * jax.process_count(), *x.shape[1:])
    sh = NamedSharding(mesh, spec_for(("batch",) + (None,) * (x.ndim - 1), mesh, rules, glob))
    return jax.make_array_from_process_local_data(sh, x, glob)

  return jax.tree.map(one, batch)


def put(tree, shardings):
  """`jax.device_put(tree, shardings)` that also works across processes: an array held whole by
  this process (e.g. a checkpoint loaded on every process, committed to its first device) goes
  to shards spanning other processes through the host, each process placing its own shards (a
  device-to-device copy would need a cross-host transfer). Every process must hold the same
  values, as after loading the same checkpoint."""

  def one(sh, sub):  # `shardings` is a prefix of `tree` (one sharding per nnx Variable)
    def leaf(x):
      if isinstance(x, jax.Array) and x.is_fully_addressable and not sh.is_fully_addressable:
        return jax.device_put(np.asarray(x), sh)
      return jax.device_put(x, sh)

    return jax.tree.map(leaf, sub)

  return jax.tree.map(one, shardings, tree)


def place_params(state, mesh: Mesh, rules: Mapping | None = None):
  """`state` (an `nnx.State` of parameters) on its shards, checked by `check_sharded`.

  Arrays already in place are not copied (`jax.device_put` to the same sharding is free), so
  after `shard_model` this costs nothing; otherwise each call moves the parameters."""
  placed = put(state, param_shardings(state, mesh, rules))
  check_sharded(placed, mesh, rules)
  return placed


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping | None = None) -> nnx.Module:
  """Places every parameter of `model` by its logical names (in place) and returns the model.

  Each array moves straight to its shards; call it once after loading, before `rollout`,
  `stream` or `make_transition` with the same mesh, so no call moves parameters again.
  """
  state = nnx.state(model)
  nnx.update(model, put(state, param_shardings(state, mesh, rules)))
  return model


def init_sharded(factory, mesh: Mesh, rules: Mapping | None = None) -> nnx.Module:
  """`factory()` (a function building an NNX module) with every parameter created directly on
  its shards: the full model is never materialised on one device."""
  abstract = nnx.eval_shape(factory)
  graphdef, abstract_state = nnx.split(abstract)
  sh = param_shardings(abstract_state, mesh, rules)

  state = jax.jit(lambda: nnx.state(factory()), out_shardings=sh)()
  return nnx.merge(graphdef, state)


def check_sharded(state, mesh: Mesh, rules: Mapping | None = None, *, min_size: int = 1 << 16, what: str = "model") -> None:
  """Stops with one clear line when parameters are not where their names put them.

  Two failures: a parameter whose sharding differs from `param_shardings` (placed by hand, or
  not placed: copied across devices on every call), and, on a mesh with `fsdp` or `tensor`
  larger than 1, a parameter with at least `min_size` elements that is fully replicated
  (every device holds all of it: usually a missing logical name).
  """
  if isinstance(state, nnx.Module):
    state = nnx.state(state)
  expected = jax.tree.leaves(param_shardings(state, mesh, rules))
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  wrong, replicated = [], []
  splits = mesh.shape.get("fsdp", 1) * mesh.shape.get("tensor", 1) > 1
  for (path, x), want in zip(flat, expected):
    name = jax.tree_util.keystr(path)
    have = getattr(x, "sharding", None)
    if not isinstance(have, jax.sharding.Sharding) or not have.is_equivalent_to(want, x.ndim):
      wrong.append(name)
    elif splits and x.size >= min_size and want.is_fully_replicated:
      replicated.append(f"{name} {tuple(x.shape)}")
  if wrong:
    raise UsageError(
      f"{what}: {len(wrong)} parameter(s) not placed by their logical names on mesh {dict(mesh.shape)} "
      f"(first: {wrong[0]}); call asvd.sharding.shard_model(model, mesh) first"
    )
  if replicated:
    raise UsageError(
      f"{what}: {len(replicated)} large parameter(s) replicated on every device of mesh {dict(mesh.shape)} "
      f"(first: {replicated[0]}); give them logical names that config mesh.rules maps to fsdp/tensor"
    )


# ------------------------------------------------------------------------------------------------
# Activations.
# ------------------------------------------------------------------------------------------------

_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Mapping | None = None):
  """While tracing inside this context, `constrain` pins activations to `mesh` by `rules`."""
  prev = getattr(_ACTIVE, "value", None)
  _ACTIVE.value = None if mesh is None else (mesh, DEFAULT_RULES if rules is None else rules)
  try:
    yield
  finally:
    _ACTIVE.value = prev


def place(x, names: Sequence[str | None], mesh: Mesh, rules: Mapping | None = None) -> jax.Array:
  """`x` on `mesh` by its logical names (an input from the host: numpy arrays are copied once)."""
  return jax.device_put(x, NamedSharding(mesh, spec_for(names, mesh, rules, np.shape(x))))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names under `activation_sharding`; else `x`."""
  active = getattr(_ACTIVE, "value", None)
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(names, mesh, rules, x.shape)))


def constrain_tree(tree, axes_tree):
  """`constrain` on every leaf of `tree`, by the matching leaf (a tuple of names) of `axes_tree`."""
  if active() is None:
    return tree
  return jax.tree.map(lambda names, x: constrain(x, names), axes_tree, tree, is_leaf=_is_names)


def active() -> tuple[Mesh, Mapping] | None:
  """`(mesh, rules)` of the enclosing `activation_sharding` (None outside one)."""
  return getattr(_ACTIVE, "value", None)


__all__ = [
  "MESH_AXES",
  "DEFAULT_RULES",
  "make_mesh",
  "mesh_from_config",
  "from_config",
  "rules_from_config",
  "spec_for",
  "logical_sharding",
  "param_shardings",
  "shard_model",
  "place",
  "place_params",
  "tree_shardings",
  "batch_shardings",
  "place_batch",
  "init_sharded",
  "check_sharded",
  "activation_sharding",
  "constrain",
  "constrain_tree",
]
