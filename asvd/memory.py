"""Memory pre-flight: will a compiled program fit in what this machine has free, before it runs?

`asvd generate` and `asvd train` (and `asvd.rollout` / `asvd.stream`) compile each program
ahead of its first call (`jitted.lower(*args).compile()`, the same executable the call then
uses: no second compile) and compare what XLA's buffer assignment says it needs with what is
free, so that a configuration that cannot fit stops with one line instead of growing until the
operating system kills the process without a word:

* needed: per device, temporaries + outputs - donated (the arguments are already in memory
  when the check runs: the weights are loaded, the state and carry built); on the CPU, where
  every (fake) device shares the host's memory, times the number of devices the program uses;
* free: an accelerator's `memory_stats()` (`bytes_limit - bytes_in_use`); on the CPU the host's
  `MemAvailable`, capped by the cgroup's limit (containers, SLURM jobs) when there is one.

Where neither is known the check passes. `config.runtime.memory_limit_gib` counts at most that
much as free (headroom on a shared machine); `config.runtime.memory_check=False` skips the check.
In the API, `memory_check=` takes the same: True, False, or a number of GiB. `asvd aot` plans TPU
slices ahead of time instead.
"""

from __future__ import annotations

import dataclasses

from asvd.errors import UsageError

GIB = 2.0**30
SKIP = "runtime.memory_check=False in the config (memory_check=False in the API) skips this check"


class OutOfMemoryError(UsageError):
  """A program needs more memory than the device has free (raised before it runs)."""


@dataclasses.dataclass(frozen=True)
class Need:
  """What one compiled program adds, per device, once its arguments are in memory."""

  temporaries: int
  outputs: int
  donated: int
  devices: int  # devices sharing one memory (CPU: all the program's devices; else 1)

  @property
  def total(self) -> int:
    return max(0, self.temporaries + self.outputs - self.donated) * self.devices


def size(n: float) -> str:
  """Bytes in words: GiB from 1 GiB up, else MiB."""
  return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _read_int(path: str) -> int | None:
  try:
    with open(path) as f:
      text = f.read().split()[0]
  except (OSError, IndexError):
    return None
  return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def host_free_bytes() -> tuple[int | None, str]:
  """`(bytes, where it was read)`: MemAvailable, capped by the cgroup (v2 or v1) limit."""
  free, source = None, ""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          free, source = int(line.split()[1]) * 1024, "MemAvailable"
          break
  except OSError:
    pass
  for limit_file, usage_file in (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
  ):
    limit, usage = _read_int(limit_file), _read_int(usage_file)
    if limit is not None and usage is not None and limit < 2**60:  # v1 writes ~2^63 for none
      room = max(0, limit - usage)
      if free is None or room < free:
        free, source = room, f"cgroup limit {limit / GIB:.1f} GiB"
      break
  return free, source


def free_bytes(device) -> tuple[int | None, str]:
  """`(bytes free on device, where it was read)`; `(None, "")` when the device does not say."""
  if device.platform == "cpu":
    return host_free_bytes()
  stats = getattr(device, "memory_stats", lambda: None)()
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device.platform} memory_stats"
  return None, ""


def need(compiled, devices=None) -> Need | None:
  """What `compiled` (a `jax.stages.Compiled`) adds per device; None when XLA does not say.
  `devices`: the program's devices of this process (default: read from `compiled`)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (backends without a memory analysis raise various types)
    return None
  if m is None:
    return None
  devices = _devices(compiled) if devices is None else devices
  shared = len(devices) if devices and devices[0].platform == "cpu" else 1
  return Need(int(m.temp_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes), max(1, shared))


def _devices(compiled) -> list:
  """The devices `compiled` runs on (of this process), by id."""
  import jax  # noqa: PLC0415

  try:
    shardings = jax.tree.leaves(compiled.input_shardings)
  except Exception:  # noqa: BLE001  (programs without input shardings)
    return []
  found = {d for s in shardings for d in s.device_set if d.process_index == jax.process_index()}
  return sorted(found, key=lambda d: d.id)


def check(compiled, what: str, *, setting: bool | float = True, hint: str = "") -> Need | None:
  """Raises `OutOfMemoryError` (one line naming `what`, what it needs and what is free) when
  `compiled` cannot fit; returns what it needs (None when unknown or not checked).

  Args:
    compiled: the program, compiled with the arguments it will run on (already in memory).
    what: the program in words, e.g. "generate: the rollout transition".
    setting: True: check against the free memory; a number: at most that many GiB count as
      free; False: no check.
    hint: what to change, appended to the message.
  """
  if setting is False:
    return None
  devices = _devices(compiled)
  n = need(compiled, devices)
  if n is None:
    return None
  if not devices:
    import jax  # noqa: PLC0415

    devices = jax.local_devices()[:1]
  device = devices[0]
  free, source = free_bytes(device)
  if setting is not True:
    cap = float(setting) * GIB
    if free is None or cap < free:
      free, source = int(cap), f"runtime.memory_limit_gib={float(setting):g}"
  if free is not None and n.total > free:
    on = f"{n.devices} {device.platform} devices sharing host memory" if n.devices > 1 else str(device)
    raise OutOfMemoryError(
      f"{what} needs {size(n.total)} more on {on} (temporaries {size(n.temporaries)}, outputs {size(n.outputs)}, "
      f"donated {size(n.donated)} per device) but {size(free)} is free ({source}); "
      f"{hint + '; ' if hint else ''}{SKIP}"
    )
  return n


def setting(cfg) -> bool | float:
  """The `check` setting a config asks for: `runtime.memory_check` (default True) and
  `runtime.memory_limit_gib` (default 0: no cap); a bad value is one UsageError naming the key."""
  runtime = cfg.get("runtime", None) if cfg is not None else None
  runtime = {} if runtime is None else runtime
  on, cap = runtime.get("memory_check", True), runtime.get("memory_limit_gib", 0.0)
  if not isinstance(on, bool):
    raise UsageError(f"config runtime.memory_check={on!r}: use True or False")
  if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap >= 0:
    raise UsageError(f"config runtime.memory_limit_gib={cap!r}: use a number of GiB >= 0 (0: no cap)")
  if not on:
    return False
  return float(cap) if cap > 0 else True


def check_setting(value, name: str = "memory_check") -> bool | float:
  """`value` if it is a valid `check` setting, else one UsageError naming `name`."""
  if isinstance(value, bool) or (isinstance(value, (int, float)) and value > 0):
    return value
  raise UsageError(f"{name}={value!r}: use True, False or a positive number of GiB")


__all__ = ["OutOfMemoryError", "Need", "check", "check_setting", "free_bytes", "host_free_bytes", "need", "setting", "size"]
