"""Logical axis names -> mesh shardings.

Every parameter and every cache/carry tensor carries logical axis names (`batch`, `layers`,
`tokens`, `slots`, `heads`, `head_dim`, `embed`, `mlp`, ...). A rule table maps them to mesh
axes; names with no rule are replicated. The default mesh axes are `(data, fsdp, tensor)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
  "batch": ("data", "fsdp"),
  "embed": "fsdp",
  "heads": "tensor",
  "mlp": "tensor",
  "layers": None,
  "tokens": None,
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
    raise ValueError(f"mesh {tuple(shape)} needs {n} devices, {len(devices)} available")
  at = jax.sharding.AxisType.Auto
  return Mesh(np.asarray(devices[:n]).reshape(shape), tuple(names), axis_types=(at,) * len(names))


def spec_for(names: Sequence[str | None], mesh: Mesh, rules: Mapping | None = None) -> PartitionSpec:
  rules = DEFAULT_RULES if rules is None else rules
  out, used = [], set()
  for n in names:
    r = rules.get(n) if n is not None else None
    axes = () if r is None else (r,) if isinstance(r, str) else tuple(r)
    axes = tuple(a for a in axes if a in mesh.axis_names and a not in used)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def logical_sharding(axes_tree, mesh: Mesh, rules: Mapping | None = None):
  """Maps a pytree whose leaves are tuples of logical names to `NamedSharding`s."""
  return jax.tree.map(
    lambda names: NamedSharding(mesh, spec_for(names, mesh, rules)),
    axes_tree,
    is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x),
  )
