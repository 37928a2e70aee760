"""Multi-process start-up: one process per TPU VM worker, per GPU (SLURM task), or per host.

Every process runs the same command; `initialize` connects them before JAX touches a device, so
`jax.devices()` is then the global device list and a `config.mesh` spans all hosts. Three ways:

* explicit: `--coordinator HOST:PORT --num-processes N --process-id I` (or the environment
  variables `ASVD_COORDINATOR`, `ASVD_NUM_PROCESSES`, `ASVD_PROCESS_ID`); process 0 listens on
  HOST:PORT. This is what `launch/local_multiprocess.sh` does on one machine;
* TPU pods and SLURM: with `--distributed auto` (the default) JAX's own cluster detection is used
  when the environment shows several workers (`TPU_WORKER_HOSTNAMES` naming more than one host,
  or `SLURM_NTASKS` > 1 inside an allocation), with no flags at all;
* otherwise one process: nothing to do.

Only process 0 writes logs, metrics, samples and final models; checkpoints are written by all
(Orbax coordinates them); each process reads its own shard of the data.
"""

from __future__ import annotations

import os

from asvd.errors import UsageError


def add_flags(parser) -> None:
  """The multi-process flags of `asvd train` / `asvd generate`."""
  g = parser.add_argument_group("multi-process (one process per host or GPU; see launch/)")
  g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (env ASVD_COORDINATOR)")
  g.add_argument("--num-processes", type=int, default=None, help="how many processes (env ASVD_NUM_PROCESSES)")
  g.add_argument("--process-id", type=int, default=None, help="this process, 0..N-1 (env ASVD_PROCESS_ID)")
  g.add_argument("--distributed", choices=["auto", "off"], default="auto", help="auto: detect TPU pods and SLURM jobs (default); off: one process")


def _env_int(name: str):
  v = os.environ.get(name)
  if v is None or v == "":
    return None
  try:
    return int(v)
  except ValueError:
    raise UsageError(f"environment {name}={v!r} is not an integer") from None


def detect_cluster() -> str | None:
  """"tpu" or "slurm" when the environment shows a multi-worker job JAX can join by itself."""
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1:
    return "tpu"
  if os.environ.get("SLURM_JOB_ID") and (_env_int("SLURM_NTASKS") or 1) > 1:
    return "slurm"
  return None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, mode: str = "auto") -> str:
  """Connects this process to the others (call before any JAX computation).

  Args:
    coordinator: `HOST:PORT` of process 0 (default: env `ASVD_COORDINATOR`).
    num_processes: the number of processes (default: env `ASVD_NUM_PROCESSES`).
    process_id: this process's index (default: env `ASVD_PROCESS_ID`).
    mode: "auto" (explicit settings, else TPU/SLURM detection, else one process) or "off".

  Returns:
    A short description: "single process", "explicit 0/2 via 127.0.0.1:1234", "slurm", "tpu".
  """
  if mode == "off":
    return "single process"
  coordinator = coordinator or os.environ.get("ASVD_COORDINATOR") or None
  n = num_processes if num_processes is not None else _env_int("ASVD_NUM_PROCESSES")
  i = process_id if process_id is not None else _env_int("ASVD_PROCESS_ID")
  import jax  # noqa: PLC0415

  if coordinator or n is not None or i is not None:
    if not coordinator or n is None or i is None:
      raise UsageError("--coordinator, --num-processes and --process-id go together (or ASVD_COORDINATOR, ASVD_NUM_PROCESSES, ASVD_PROCESS_ID)")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise UsageError(f"--coordinator {coordinator!r}: expected HOST:PORT, e.g. 127.0.0.1:12355")
    if n < 1 or not 0 <= i < n:
      raise UsageError(f"--process-id {i} must be in 0..{n - 1} (--num-processes {n})")
    if n == 1:
      return "single process"
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=i)
    return f"explicit {i}/{n} via {coordinator}"
  cluster = detect_cluster()
  if cluster is None:
    return "single process"
  jax.distributed.initialize()  # JAX reads the TPU / SLURM environment itself
  return cluster


def from_args(args) -> str:
  """`initialize` from parsed `add_flags` arguments."""
  return initialize(args.coordinator, args.num_processes, args.process_id, args.distributed)


def is_lead() -> bool:
  """True on the process that writes (process 0)."""
  import jax  # noqa: PLC0415

  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process got here (no-op with one process)."""
  import jax  # noqa: PLC0415

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(name)


def to_host(tree):
  """A pytree of (possibly multi-host sharded) arrays as whole numpy arrays on every process."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


__all__ = ["add_flags", "initialize", "from_args", "detect_cluster", "is_lead", "barrier", "to_host"]
