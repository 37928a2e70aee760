"""`asvd aot`: the rollout transition and the DMD generator step compiled for a TPU slice on this
CPU (libtpu's topology description), with the mesh's shardings, splash attention per shard,
per-device memory, and exit status 1 when a program does not fit."""

import json
import subprocess
import sys

import cli_env
import pytest

import asvd
from asvd import aot
from asvd.errors import UsageError
from asvd.models import dit

# (Without the suite's process-wide "highest" matmul precision: the splash kernel's backward
# cannot compile for a TPU under it, a known limitation.)
ENV = {k: v for k, v in cli_env.ENV.items() if k != "JAX_DEFAULT_MATMUL_PRECISION"}
BASE = [sys.executable, "-m", "asvd.main", "aot", "--config", "configs/tiny.py:bf16", "--config.model.dim=256", "--topology", "v5e:2x2"]


def test_aot_plans_a_sharded_v5e_slice(tmp_path):
  out = tmp_path / "plan.json"
  # The DMD generator step (the transition alone compiles for a TPU in tests/test_dit.py).
  cmd = [*BASE, "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.train.dmd.rollout_chunks=2", "--programs", "dmd", "--json", str(out)]
  p = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "| dmd |" in p.stdout and "v5e:2x2, mesh {'data': 1, 'fsdp': 2, 'context': 1, 'tensor': 2}" in p.stdout
  rec = json.loads(out.read_text())
  assert rec["hbm_bytes"] == 16 * 2**30 and rec["mesh"]["fsdp"] == 2
  plans = {r["program"]: r for r in rec["programs"]}
  for r in plans.values():
    assert r["arguments"] > 0 and r["temporaries"] > 0 and r["flops"] > 0
    assert r["total"] == r["arguments"] + r["temporaries"] + r["outputs"] - r["aliased"]
  # The DMD step holds generator + Adam moments + EMA + critic + its moments + the teacher.
  n = dit.count_params(dit.abstract_dit(asvd.load_config("configs/tiny.py:bf16", ["model.dim=256"]).model))
  assert plans["dmd"]["arguments"] >= 8 * n * 2 / 4  # >= 8 bf16 copies of the weights, split 4 ways
  assert plans["dmd"]["aliased"] > 0  # the state is donated

  # The same plan with 1 MiB per device does not fit: exit status 1 and one line naming it.
  p = subprocess.run([*BASE, "--programs", "transition", "--hbm-gib", "0.001"], capture_output=True, text=True, env=ENV)
  assert p.returncode == 1 and "transition needs" in p.stderr and "shard more" in p.stderr, p.stderr[-2000:]


def test_aot_bad_topology_and_program_are_one_line():
  cfg = asvd.load_config("configs/tiny.py")
  with pytest.raises(UsageError, match="--topology 'v9x:7x7'"):
    aot.plan(cfg, topology="v9x:7x7")
  with pytest.raises(UsageError, match="--programs rollout"):
    aot.plan(cfg, programs=("rollout",))
