"""Memory planning ahead of time: compile asvd's programs for a TPU slice (or any device set)
without running them, and say per device what they hold and whether they fit.

    asvd aot --config configs/wan_t2v_1_3b.py --topology v5p:2x2x2 --config.mesh.fsdp=-1

On a CPU machine with `libtpu` installed (the `tpu` extra), `jax.experimental.topologies`
describes the slice; the programs are lowered from abstract shapes (no weights, no data) with the
same shardings a real run uses, compiled by the TPU compiler, and `memory_analysis()` gives the
per-device argument, temporary and output bytes. Programs:

* `transition`: one chunk of the rollout (the adaptive transition, inference);
* `dmd`: the Self-Forcing DMD generator step with the adaptive state (generator + optimizer
  state + EMA, critic + its optimizer state, the frozen teacher; the critic has the teacher's
  architecture, as it starts from it), and `critic`: the critic step beside it.

`--teacher-config configs/wan_t2v_14b.py` plans a 14B teacher (and critic) for a 1.3B generator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from asvd import sharding as shard_lib
from asvd.errors import UsageError

# High-bandwidth memory per chip (GiB), by the topology name's prefix.
HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}
PROGRAMS = ("transition", "dmd", "critic")


@dataclasses.dataclass
class Plan:
  """Per-device bytes of one compiled program."""

  program: str
  arguments: int
  temporaries: int
  outputs: int
  aliased: int
  flops: float
  # The compiler's own refusal (a compile-time out-of-memory error on the target), else "".
  # Then only the temporaries it reported are known (the rest are 0).
  refused: str = ""

  @property
  def total(self) -> int:
    return self.arguments + self.temporaries + self.outputs - self.aliased

  def fits(self, hbm: float | None) -> bool:
    return not self.refused and (hbm is None or self.total <= hbm)

  def row(self, hbm: float | None) -> str:
    gib = 2.0**30
    if self.refused:
      return f"| {self.program} | — | ≥ {self.temporaries / gib:.2f} | — | — | ≥ {self.total / gib:.2f} | {'—' if hbm is None else f'{hbm / gib:.0f}'} | **no** (compiler) | — |"
    fits = "—" if hbm is None else ("yes" if self.total <= hbm else "**no**")
    return (
      f"| {self.program} | {self.arguments / gib:.2f} | {self.temporaries / gib:.2f} | {self.outputs / gib:.2f} | "
      f"{self.aliased / gib:.2f} | {self.total / gib:.2f} | {'—' if hbm is None else f'{hbm / gib:.0f}'} | {fits} | {self.flops / 1e12:.1f} |"
    )


HEADER = "| program | arguments GiB | temporaries GiB | outputs GiB | donated GiB | total GiB | HBM GiB | fits | TFLOP/step/device |\n|" + " --- |" * 9


def _without_cpu_flags(fn):
  """Runs `fn()` (which loads libtpu) with XLA:CPU's own flags (`--xla_cpu_*`) hidden.

  libtpu parses `XLA_FLAGS` once, at its first compile, and aborts the process on a flag it does
  not know; it knows none of the CPU backend's. So the CPU backend reads them first (one CPU
  program is compiled before: they still apply to every CPU program of this process) and `fn`
  compiles a first TPU program while they are hidden.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  kept = " ".join(f for f in flags.split() if not f.startswith("--xla_cpu_"))
  if kept == flags.strip():
    return fn()
  jax.jit(lambda: jnp.zeros((), jnp.float32))().block_until_ready()
  os.environ["XLA_FLAGS"] = kept
  try:
    return fn()
  finally:
    os.environ["XLA_FLAGS"] = flags


def topology_devices(topology: str):
  """The devices of a TPU slice described by name (`v5p:2x2x2`, `v5e:4x4`), via libtpu."""

  def describe():
    from jax.experimental import topologies  # noqa: PLC0415

    devices = list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    one = jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(devices[0]))
    jax.jit(lambda x: x + 1).lower(one).compile()  # libtpu reads its flags here
    return devices

  try:
    return _without_cpu_flags(describe)
  except Exception as e:  # noqa: BLE001  (libtpu raises several types for bad names / no libtpu)
    why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    raise UsageError(f"--topology {topology!r}: cannot describe this TPU slice ({why}); install the tpu extra (libtpu) and use names like v5p:2x2x2, v5e:2x2, v4:2x2x1") from e


def hbm_bytes(topology: str | None, devices) -> float | None:
  """Memory per device: the TPU table for a topology, else what the local device reports."""
  if topology:
    gib = HBM_GIB.get(topology.split(":")[0].lower())
    return None if gib is None else gib * 2.0**30
  stats = getattr(devices[0], "memory_stats", lambda: None)()
  if stats and stats.get("bytes_limit"):
    return float(stats["bytes_limit"])
  return None


# XLA's compile-time out-of-memory message: "... HLO temporaries (270.09G) exceeds available HBM".
_OOM_TEMPS = re.compile(r"temporaries \(([0-9.]+)([KMGT])\)")


def _compile(name: str, lowered) -> Plan:
  """Compiles `lowered`; a program the target's compiler refuses as too large becomes a Plan
  that does not fit (with the temporaries the compiler reported), not an exception."""
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001  (jax raises JaxRuntimeError / XlaRuntimeError by version)
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg and "Ran out of memory" not in msg:
      raise
    m = _OOM_TEMPS.search(msg)
    temps = float(m.group(1)) * 1024.0 ** "KMGT".index(m.group(2)) * 1024 if m else 0.0
    line = next((x for x in msg.splitlines() if "memory" in x.lower()), msg.splitlines()[0])
    return Plan(name, 0, int(temps), 0, 0, 0.0, refused=line.strip()[:300])
  return _plan(name, compiled)


def _plan(name: str, compiled) -> Plan:
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return Plan(name, m.argument_size_in_bytes, m.temp_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, float((cost or {}).get("flops", 0.0)))


def plan_transition(cfg, mesh, rules) -> Any:
  """The lowered rollout transition (batch 1) on `mesh`."""
  from asvd import transition as tr  # noqa: PLC0415
  from asvd.models import dit as dit_lib  # noqa: PLC0415

  model = dit_lib.abstract_dit(cfg.model)
  lay = tr.make_layout(cfg.rollout, model.cfg, None, cfg.sampler)
  _, (params, state, cache, noise) = tr.abstract_transition(model, lay, 1)
  sh = tr.step_shardings(params, (state, cache), noise.shape, mesh, rules)
  param_sh, (state_sh, cache_sh), noise_sh = jax.tree.unflatten(sh[1], sh[0])
  graphdef = nnx.graphdef(model)

  def transition_step(params, state, cache, noise):
    with shard_lib.activation_sharding(mesh, rules):
      return tr.transition_fn(nnx.merge(graphdef, params), lay, state, cache, noise)

  step = jax.jit(transition_step, in_shardings=(param_sh, state_sh, cache_sh, noise_sh), out_shardings=(state_sh, cache_sh, state_sh), donate_argnums=(1, 2))
  return step.lower(params, state, cache, noise)


def _abstract_train_state(model_cfg, tx):
  """`(graphdef, params, optimizer state)` of a network, all abstract."""
  from asvd.models import dit as dit_lib  # noqa: PLC0415

  model = dit_lib.abstract_dit(model_cfg)
  graphdef, params = nnx.split(model)
  opt = jax.eval_shape(tx.init, params)
  return graphdef, params, opt


def plan_dmd(cfg, mesh, rules, teacher_cfg=None, names=("dmd", "critic")) -> dict[str, Any]:
  """The lowered DMD generator (`dmd`) and/or critic step on `mesh`, as `names` asks
  (`teacher_cfg`: another teacher)."""
  from asvd.train import steps as st  # noqa: PLC0415
  from asvd.train import trainer  # noqa: PLC0415

  t = cfg.train
  lay = trainer.layout(cfg)
  tx, critic_tx = trainer._optimizer(cfg, "dmd"), trainer._optimizer(cfg, "dmd", "critic")
  graphdef, params, opt = _abstract_train_state(cfg.model, tx)
  tcfg = cfg.model if teacher_cfg is None else teacher_cfg.model
  score_graphdef, critic, critic_opt = _abstract_train_state(tcfg, critic_tx)
  teacher = critic
  if t.dmd.teacher_dtype != "float32":
    teacher = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(t.dmd.teacher_dtype)), teacher)
  state = st.TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt, key=jax.ShapeDtypeStruct((2,), jnp.uint32),
    critic=critic, critic_opt=critic_opt, ema=params,
  )  # fmt: skip
  frozen = st.Frozen(teacher=teacher)
  b = int(t.batch_size)
  m = cfg.model
  batch = {
    "latents": jax.ShapeDtypeStruct((b, int(t.data.frames), *lay.latent_hw, int(m.in_channels)), jnp.float32),
    "text": jax.ShapeDtypeStruct((b, int(m.text_len), int(m.text_dim)), jnp.float32),
  }
  gen, critic_step = st.dmd_steps(graphdef, score_graphdef, tx, critic_tx, cfg, lay, score_graphdef, None)
  out = {}
  for name, fn in (("dmd", gen), ("critic", critic_step)):
    if name not in names:
      continue  # (each is a long compile at real size)
    jitted = trainer._jit_step(fn, mesh, rules, state, frozen).program(batch)
    out[name] = jitted.lower(state, batch, frozen)
  return out


def plan(cfg, *, topology: str | None = None, programs=PROGRAMS, teacher_cfg=None, devices=None) -> tuple[list[Plan], float | None, Any]:
  """Compiles `programs` for `topology` (a TPU slice) or the local devices on `config.mesh`.

  Returns:
    `(plans, hbm bytes per device or None, mesh)`.
  """
  from asvd.models import attention as attn_lib  # noqa: PLC0415

  bad = [p for p in programs if p not in PROGRAMS]
  if bad:
    raise UsageError(f"--programs {','.join(bad)}: choose from {','.join(PROGRAMS)}")
  devices = topology_devices(topology) if topology else (devices or jax.devices())
  mcfg = cfg.get("mesh", None)
  mcfg = {} if mcfg is None else (mcfg.to_dict() if hasattr(mcfg, "to_dict") else dict(mcfg))
  if all(int(mcfg.get(a, 1)) == 1 for a in shard_lib.MESH_AXES) and len(devices) > 1:
    mcfg["fsdp"] = -1  # default on a slice: fully sharded data parallel over every chip
  mesh = shard_lib.mesh_from_config(mcfg, devices)
  rules = shard_lib.rules_from_config(mcfg)
  plans = []
  platform = "tpu" if topology else None
  with attn_lib.auto_platform(platform) if platform else contextlib.nullcontext():
    if "transition" in programs:
      plans.append(_compile("transition", plan_transition(cfg, mesh, rules)))
    if "dmd" in programs or "critic" in programs:
      wanted = [p for p in ("dmd", "critic") if p in programs]
      for name, lowered in plan_dmd(cfg, mesh, rules, teacher_cfg, wanted).items():
        plans.append(_compile(name, lowered))
  return plans, hbm_bytes(topology, devices), mesh


def report(plans: list[Plan], hbm: float | None, mesh, topology: str | None, file=sys.stdout) -> bool:
  """Prints the table; True when every program fits."""
  where = topology or f"{len(mesh.devices.flat)} local {mesh.devices.flat[0].platform} device(s)"
  print(f"{where}, mesh {dict(mesh.shape)}; bytes per device", file=file)
  print(HEADER, file=file)
  for p in plans:
    print(p.row(hbm), file=file)
  for p in plans:
    if p.refused:
      print(f"{p.program}: the compiler refused it: {p.refused}", file=file)
  return all(p.fits(hbm) for p in plans)


__all__ = ["plan", "report", "Plan", "HBM_GIB", "PROGRAMS", "topology_devices"]
