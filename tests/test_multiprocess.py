"""A real 2-process run on localhost (`jax.distributed`, coordinator on 127.0.0.1, 2 CPU devices
per process): sharded train steps on a data x fsdp mesh spanning both processes, Orbax
checkpoints saved and restored, sharded rollouts for the sample videos, `asvd generate` from the
trained model on both processes, and only process 0 writing. (Sharded steps equal single-device ones in tests/test_sharding.py; the data pipeline's
global batch is the same for any number of processes in tests/test_train.py.)"""

import json
import os
import socket
import subprocess
import sys

import cli_env
import numpy as np
from tolerances import DIT, rel_err

import asvd

ARGS = [
  "--config", "configs/tiny.py", "--no-progress",
  "--config.mesh.data=2", "--config.mesh.fsdp=2",
  "--config.train.stages=('causal_init',)", "--config.train.causal_init.method=teacher_forcing",
  "--config.train.batch_size=4", "--config.train.checkpoint_every=2", "--config.train.sample_every=2",
]  # fmt: skip


def _env(devices: int) -> dict:
  env = {k: v for k, v in cli_env.ENV.items() if not k.startswith("ASVD_")}
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]  # conftest's others stay
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]))
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # this venv's asvd
  return env


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, steps: int, cache):
  port = _port()
  cmd = [sys.executable, "-m", "asvd.main", "train", "--workdir", str(workdir), *ARGS, f"--config.train.causal_init.steps={steps}", f"--config.runtime.compilation_cache_dir={cache}"]
  procs = [
    subprocess.Popen(
      [*cmd, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(2),
    )  # fmt: skip
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for i, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
    assert p.returncode == 0, f"process {i}:\n{err[-3000:]}"
  return [err for _, err in outs]


def _losses(workdir):
  return [json.loads(x)["loss"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_process_training_checkpoints_and_resumes(tmp_path):
  work, cache = tmp_path / "two", tmp_path / "xla_cache"  # the rerun reuses the compiled programs
  errs = _two_processes(work, 2, cache)
  assert "process 0 of 2 (explicit 0/2" in errs[0] and "process 1 of 2 (explicit 1/2" in errs[1]
  assert "8 devices" not in errs[0] and "4 devices in all" in errs[0]
  stage = work / "causal_init"
  first = _losses(work)
  assert len(first) == 2  # one writer: process 0
  assert "2" in os.listdir(stage / "checkpoints")
  assert (stage / "samples" / "step_000002.mp4").is_file()  # a sharded rollout, written once
  # More steps, through launch/local_multiprocess.sh: both processes restore the sharded state
  # from the checkpoint and go on.
  logs = tmp_path / "logs"
  logs.mkdir()
  cmd = ["bash", "launch/local_multiprocess.sh", "train", "--workdir", str(work), *ARGS]
  cmd += ["--config.train.causal_init.steps=3", f"--config.runtime.compilation_cache_dir={cache}"]
  env = dict(_env(2), NPROC="2", DEVICES="2", LOGDIR=str(logs))
  p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  errs = [p.stderr, (logs / "process_1.log").read_text()]
  assert all("resumed at step 2" in e for e in errs), errs[0][-2000:]
  losses = _losses(work)
  assert losses[:2] == first and len(losses) == 3 and np.all(np.isfinite(losses))
  assert (stage / "samples" / "step_000002.mp4").is_file() and "3" in os.listdir(stage / "checkpoints")
  model = asvd.load_dit(str(stage / "model"))  # the final model, gathered from both processes
  assert model.cfg.dim == 64 and np.isfinite(np.asarray(model.head.kernel[...])).all()

  # `asvd generate` from it on both processes (batch 4 split over data x fsdp): process 0
  # writes the whole batch, the same latents as one process's rollout.
  ctx = np.random.default_rng(1).standard_normal((4, 16, 32)).astype(np.float32)
  np.save(tmp_path / "ctx.npy", ctx)
  gen = ["bash", "launch/local_multiprocess.sh", "generate", "--config", "configs/tiny.py", "--checkpoint", str(stage / "model"), "--context", str(tmp_path / "ctx.npy"), "--chunks", "2", "--seed", "3", "--out", str(tmp_path / "gen"), "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.rollout.batch_size=4"]
  p = subprocess.run(gen, capture_output=True, text=True, env=env, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "wrote" in p.stdout and "wrote" not in (logs / "process_1.log").read_text()
  assert sorted(os.listdir(tmp_path / "gen")) == [".asvd_outputs", "generate.json", "latents.npy", "preview.mp4"]
  cfg = asvd.load_config("configs/tiny.py")
  want, _ = asvd.rollout(model, ctx, 3, num_chunks=2, config=cfg.rollout, sampler_config=cfg.sampler)
  assert rel_err(np.load(tmp_path / "gen" / "latents.npy"), want) <= DIT
