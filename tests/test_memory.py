"""Memory pre-flight (asvd.memory): each program is compiled before it first runs and checked
against the free memory; one that cannot fit is one clear error, before any work, and the
program that passed is the one that runs (no second compile: test_compile_and_carry.py)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from train_helpers import ENV, TRAIN

import asvd
from asvd import memory


def _program(mesh=None):
  def f(x):  # temporaries: y and z [512, 512] f32 (y an operand of y @ y); output [512, 8]
    y = jnp.tanh(x @ x.T)
    return jnp.tanh(y @ y)[:, :8]

  x = jax.ShapeDtypeStruct((512, 256), jnp.float32)
  if mesh is None:
    return jax.jit(f).lower(x).compile()
  return jax.jit(f, in_shardings=NamedSharding(mesh, PartitionSpec("d"))).lower(x).compile()


def test_need_is_xla_memory_analysis_and_cpu_devices_share_the_host():
  one = _program()
  m = one.memory_analysis()
  n = memory.need(one)
  assert (n.temporaries, n.outputs, n.donated, n.devices) == (m.temp_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, 1)
  assert n.total == m.temp_size_in_bytes + m.output_size_in_bytes and m.temp_size_in_bytes >= 512 * 512 * 4
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = _program(mesh)
  s = memory.need(sharded)
  ms = sharded.memory_analysis()
  assert s.devices == 8 and s.total == 8 * (ms.temp_size_in_bytes + ms.output_size_in_bytes - ms.alias_size_in_bytes)


def test_check_is_one_line_naming_the_program_its_need_and_what_is_free():
  c = _program()
  free, source = memory.host_free_bytes()
  with open("/proc/meminfo") as f:
    total = int(f.readline().split()[1]) * 1024  # MemTotal
  assert source and 0 < free <= total
  assert memory.check(c, "a test program") == memory.need(c)  # fits in this machine's memory
  assert memory.check(c, "a test program", setting=False) is None
  with pytest.raises(memory.OutOfMemoryError) as e:
    memory.check(c, "a test program", setting=1e-4, hint="try less")
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("a test program needs 2.") and "0.1 MiB is free (runtime.memory_limit_gib=0.0001)" in msg
  assert "try less; runtime.memory_check=False" in msg
  assert isinstance(e.value, asvd.UsageError)  # the CLI prints it as one line, exit status 2


def test_config_settings():
  cfg = asvd.load_config("configs/tiny.py")
  assert memory.setting(cfg) is True
  assert memory.setting(asvd.load_config("configs/tiny.py", ["runtime.memory_limit_gib=2"])) == 2.0
  assert memory.setting(asvd.load_config("configs/tiny.py", ["runtime.memory_check=False", "runtime.memory_limit_gib=2"])) is False
  with pytest.raises(asvd.UsageError, match="runtime.memory_limit_gib=-1.0"):
    memory.setting(asvd.load_config("configs/tiny.py", ["runtime.memory_limit_gib=-1"]))
  with pytest.raises(asvd.UsageError, match="memory_check=0"):
    memory.check_setting(0)


def test_generate_and_train_stop_before_any_work(tmp_path):
  """`asvd generate` and `asvd train` with less free memory than a program needs: exit status
  2 and one line before the first chunk / step; no output, no metrics, no checkpoint."""
  cap = "--config.runtime.memory_limit_gib=0.0001"
  p = subprocess.run([sys.executable, "-m", "asvd.main", "generate", "--config", "configs/tiny.py", "--init", "random", "--chunks", "2", "--out", str(tmp_path / "g"), cap], capture_output=True, text=True, env=ENV)
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
  assert "error: the rollout transition needs" in p.stderr and "runtime.memory_limit_gib=0.0001" in p.stderr
  assert not (tmp_path / "g" / "latents.npy").exists()
  work = tmp_path / "w"
  p = subprocess.run([*TRAIN, "--workdir", str(work), "--config.train.stages=('teacher',)", cap], capture_output=True, text=True, env=ENV)
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
  assert "error: teacher: the step needs" in p.stderr and "train.batch_size" in p.stderr
  assert not (work / "metrics.jsonl").exists() or not (work / "metrics.jsonl").read_text()
  assert not any(d.isdigit() for d in (work / "teacher" / "checkpoints").iterdir())
