"""Training-step benchmark: teacher, DMD generator (direct and replay) and critic steps.

For the config given (default the small one in bf16) the script measures, in one process:

1. the machine's JAX matmul peak for the dtype;
2. each jitted step's median wall time over `--repeats` calls (after compile and warm-up);
3. its analytic matmul FLOPs (forward 1x, backward 2x, per-chunk remat +1x of the live forward)
   and MFU against that peak;
4. the compiled program's temporaries (`memory_analysis`);
5. how the DMD generator step grows with rollout length (1, 2, 4 horizons), directly
   (`jax.grad` through the remat'ed scan) and by chunk replay (`train.dmd.replay`).

It writes `benchmarks/results/train_step_<device>.json`; benchmarks/README.md has the table.

    source .venv/bin/activate
    python benchmarks/train_step.py --device-name my-machine      # ~5-10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from benchmarks import common  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/small.py:bf16")
  p.add_argument("--horizon", type=int, default=6, help="H latent frames (a multiple of F)")
  p.add_argument("--horizons", default="1,2,4", help="rollout lengths in horizons")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--device-name", default=None)
  p.add_argument("--out", default=None)
  return p.parse_args(argv)


def forward_flops(model_cfg, b, q_frames, key_frames, tokens, text_len, text_kv=True):
  """Matmul FLOPs of one DiT call: `q_frames` query frames attending to `key_frames` frames."""
  f = common.dit_flops(model_cfg, b, q_frames, tokens[0], tokens[1], text_len)
  sq = f["tokens"]
  extra_keys = sq * (key_frames - q_frames) // max(q_frames, 1)
  total = f["total"] + 2 * 2 * b * sq * extra_keys * model_cfg.dim * model_cfg.num_layers
  if not text_kv:
    total -= f["layers.cross_kv_text"] + f["text_embed"]
  return total


def rollout_flops(model_cfg, lay, b, chunks, hw, text_len, live):
  """A rollout with exit at the last step: per chunk `steps` forwards + the clean re-run; the
  live forward (with `live`) adds backward 2x and the remat recompute 1x."""
  total, valid = 0, 0
  steps = len(lay.timesteps)
  fz = lay.z_frames
  for _c in range(chunks):
    keys = valid + fz
    one = forward_flops(model_cfg, b, fz, keys, hw, text_len, text_kv=False)
    total += (steps + 1) * one + (3 * one if live else 0)
    valid = min(lay.num_slots, valid + lay.chunk_frames + (lay.state_frames if lay.anchor == "adaptive" else 0))
  return total


def main(argv=None):
  args = parse_args(argv)
  common.configure_env()
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import asvd
  from asvd.train import losses, trainer
  from asvd.train import steps as st

  info = common.cpu_info()
  device = args.device_name or common.default_device_name(info)
  cfg = asvd.load_config(args.config)
  cfg.train.horizon_frames = args.horizon
  cfg.train.dmd.update(last_step_only=True)
  lay = trainer.layout(cfg)
  mc = cfg.model
  b, lt = 1, int(mc.text_len)
  hw = tuple(int(v) for v in cfg.rollout.latent_hw)
  dtype = jnp.dtype(mc.dtype).name
  peak = common.jax_matmul_peak(dtype, [(1024, 1024, 1024), (2048, 512, 2048), (1024, 2048, 512)])
  model = asvd.init_dit(mc, 0)
  g, params = nnx.split(model)
  tx = st.optimizer(1e-4, cfg.train.optimizer)
  key = jax.random.PRNGKey(0)
  text = jax.random.normal(jax.random.key(1), (b, lt, int(mc.text_dim)), jnp.float32)
  results = {"device": device, "cpu": info, "config": args.config, "dtype": dtype, "horizon": args.horizon, "matmul_peak_gflops": peak["gflops"], "steps": []}

  def bench(name, fn, state, *xs, flops):
    jitted = jax.jit(fn)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, *xs).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out = compiled(state, *xs)
    jax.block_until_ready(out)
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(state, *xs))
      times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]
    row = {
      "step": name,
      "seconds": sec,
      "compile_s": compile_s,
      "gflop": flops / 1e9,
      "mfu": flops / sec / (peak["gflops"] * 1e9),
      "temp_bytes": int(mem.temp_size_in_bytes) if mem else None,
    }
    print(json.dumps(row), flush=True)
    results["steps"].append(row)
    return row

  h = args.horizon
  batch = {"latents": jax.random.normal(jax.random.key(2), (b, max(h, lay.window_frames + lay.chunk_frames), *hw, int(mc.in_channels))), "text": text}
  state = st.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), key=key)
  fwd_h = forward_flops(mc, b, h, h, hw, lt)
  bench("teacher", st.teacher_step(g, tx, cfg), state, batch, flops=3 * fwd_h)

  dstate = state.replace(critic=params, critic_opt=tx.init(params), ema=params)
  for k in (int(x) for x in args.horizons.split(",")):
    chunks = k * h // lay.chunk_frames
    windows = len(losses.window_starts(chunks * lay.chunk_frames, h, lay.chunk_frames))
    for replay in (False, True):
      c = cfg.copy_and_resolve_references()
      c.train.dmd.update(rollout_chunks=chunks, replay=replay)
      gen, critic = st.dmd_steps(g, g, tx, tx, c, lay)
      live = rollout_flops(mc, lay, b, chunks, hw, lt, live=True) + (rollout_flops(mc, lay, b, chunks, hw, lt, live=False) if replay else 0)
      flops = live + windows * 3 * fwd_h
      row = bench(f"dmd_generator_{k}H_{'replay' if replay else 'direct'}", gen, dstate, batch, st.Frozen(teacher=params), flops=flops)
      row.update(rollout_chunks=chunks, windows=windows)
    if k == 1:
      flops = rollout_flops(mc, lay, b, chunks, hw, lt, live=False) + windows * 3 * fwd_h
      bench("dmd_critic_1H", critic, dstate, batch, st.Frozen(teacher=params), flops=flops)
  out = args.out or os.path.join(_REPO, "benchmarks", "results", f"train_step_{device}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
