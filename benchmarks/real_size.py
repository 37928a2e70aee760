"""What one chunk costs at real size (compile-only; no weights, no run): per anchor mode.

For `configs/wan_t2v_1_3b.py` (bf16, 480x832, batch 1) and each anchor mode (and the absolute
Self-Forcing preset), per chunk:

* analytic matmul FLOPs of the chunk's forwards (`len(timesteps)` denoising steps + the clean
  re-run that writes the cache), each over `Fz` frames attending to every slot;
* XLA's cost analysis of one cached forward lowered with unrolled layers and the reference
  attention (so nothing is hidden in a loop body XLA counts once), times the forwards per chunk;
* bytes of the carry (cache K/V of every layer, text K/V, state);
* temporaries of the compiled transition with the default attention (`memory_analysis`);
* the ideal frames/s at 50% MFU on one H100 (989 TFLOP/s dense bf16) and one TPU v5p
  (459 TFLOP/s), pixel frames = 4 per latent frame.

    JAX_PLATFORMS=cpu python benchmarks/real_size.py        # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

PEAKS = {"H100 (bf16 dense)": 989e12, "TPU v5p (bf16)": 459e12}
MODES = {
  "adaptive": [],
  "sink": ["rollout.anchor=sink"],
  "ema": ["rollout.anchor=ema"],
  "none": ["rollout.anchor=none"],
  "absolute (Self-Forcing)": ["rollout.anchor=none", "rollout.positions=absolute"],
}


def analytic_forward(cfg, lay) -> float:
  """Matmul FLOPs of one cached forward: `Fz` frames of queries, every slot + own frames of keys."""
  m = cfg.model
  t = lay.tokens
  sq, sk = lay.z_frames * t, (lay.num_slots + lay.z_frames) * t
  d, dff, lt = m.dim, m.ffn_dim, m.text_len
  per_layer = 4 * 2 * sq * d * d + 2 * 2 * sq * sk * d + 2 * 2 * sq * d * d + 2 * 2 * sq * lt * d + 2 * 2 * sq * d * dff
  patch = 2 * sq * m.in_channels * 4 * d + 2 * sq * d * m.out_channels * 4
  return float(m.num_layers * per_layer + patch)


def measure(spec: str, overrides: list[str]) -> dict:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  import asvd  # noqa: PLC0415
  from asvd import transition as tr  # noqa: PLC0415
  from asvd.models.dit import abstract_dit  # noqa: PLC0415

  def setup(extra):
    cfg = asvd.load_config(spec, [*overrides, *extra])
    model = abstract_dit(cfg.model)
    lay = tr.make_layout(cfg.rollout, model.cfg, None, cfg.sampler)
    step, args = tr.abstract_transition(model, lay)
    return cfg, lay, nnx.split(model)[0], step, args

  cfg, lay, _, step, (params, state, cache, noise) = setup([])
  temps = step.lower(params, state, cache, noise).compile().memory_analysis().temp_size_in_bytes
  # One forward, unrolled, reference attention: XLA counts every layer.
  cfg_u, lay_u, g_u, _, (p_u, _, cache_u, _) = setup(["model.scan_layers=False", "model.attention=xla"])
  z = jax.ShapeDtypeStruct((1, lay_u.z_frames, *lay_u.latent_hw, cfg_u.model.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1, lay_u.z_frames), jnp.float32)
  fwd = jax.jit(lambda p, c, z, t: tr.flow(nnx.merge(g_u, p), lay_u, c, z, t))
  cost = fwd.lower(p_u, cache_u, z, t).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  forwards = len(lay.timesteps) + 1
  analytic = forwards * analytic_forward(cfg, lay)
  carry_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state, cache)))
  pixel_frames = 4 * lay.chunk_frames
  return {
    "slots": lay.num_slots,
    "z_frames": lay.z_frames,
    "forwards_per_chunk": forwards,
    "analytic_tflop_per_chunk": analytic / 1e12,
    "xla_tflop_per_chunk": forwards * float(cost["flops"]) / 1e12,
    "carry_gb": carry_bytes / 1e9,
    "transition_temporaries_gb": temps / 1e9,
    "ideal_fps_50pct_mfu": {k: pixel_frames / (analytic / (0.5 * v)) for k, v in PEAKS.items()},
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/wan_t2v_1_3b.py")
  p.add_argument("--out", default=os.path.join(_REPO, "benchmarks", "results", "real_size_wan_t2v_1_3b.json"))
  a = p.parse_args(argv)
  rows = {}
  for mode, over in MODES.items():
    rows[mode] = measure(a.config, over)
    print(mode, json.dumps(rows[mode]))
  header = "| anchor | slots + Fz | analytic TFLOP/chunk | XLA TFLOP/chunk | carry GB | temporaries GB | ideal FPS H100 @50% | ideal FPS v5p @50% |"
  lines = [header, "|" + " --- |" * 8]
  for mode, r in rows.items():
    fps = list(r["ideal_fps_50pct_mfu"].values())
    lines.append(
      f"| {mode} | {r['slots']} + {r['z_frames']} | {r['analytic_tflop_per_chunk']:.1f} | {r['xla_tflop_per_chunk']:.1f} | "
      f"{r['carry_gb']:.2f} | {r['transition_temporaries_gb']:.2f} | {fps[0]:.1f} | {fps[1]:.1f} |"
    )
  print("\n".join(lines))
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump({"config": a.config, "batch": 1, "dtype": "bfloat16", "peaks_flops": PEAKS, "results": rows, "table": lines}, f, indent=2)
  print(f"-> {a.out}")


if __name__ == "__main__":
  main()
