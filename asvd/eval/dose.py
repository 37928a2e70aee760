"""`asvd eval dose`: dose and response of the anchor, without training.

The paper's mechanism: a static anchor that draws a large share of attention damps motion and
pulls the video back to the first frame; an evolving anchor (the adaptive state) does not,
whatever share it draws. `rollout.anchor_bias` adds a logit bias to the anchor slots' keys
(every backend, `asvd.models.dit.KVSlots.bias`), which sets the dose; the response is measured
on the segment of `H` frames ending at `multiple x H`: camera speed kept (mean over frames that
kept their look), contrast relative to real clips, similarity to frame 0, the share of faded
frames, against the anchor's *measured* attention share over that segment's chunks. Every point
is a mean over the captions and seeds with its bootstrap 95% interval.

Writes `dose.json` (summary and per-video values), `dose.md` and `dose.png`.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from asvd.data import panworld
from asvd.eval import motion, stats

OUTPUT_FILES = ["dose.json", "dose.md", "dose.png"]
RESPONSES = (("speed_mean", "speed kept (mean)"), ("contrast", "contrast / real"), ("sim0", "similarity to frame 0"), ("faded", "faded frames"))


def sweep(models: dict, config_for, prompts, out, *, biases, multiple: float = 6.0, seeds=(0, 1, 2), quiet: bool = False) -> dict:
  """Runs the sweep and writes its files into `out` (an `asvd.outputs.OutputDir`).

  Args:
    models: `{anchor mode: model}` (modes with an anchor).
    config_for: `(mode, extra overrides) -> config` (the PanWorld config).
    prompts: captions of the grammar.
    out: the output folder.
    biases: logit biases to set `rollout.anchor_bias` to.
    multiple: the measured segment ends at this multiple of the horizon.
    seeds: rollout seeds per caption.
    quiet: no progress lines.

  Returns:
    The `dose.json` content.
  """
  import jax  # noqa: PLC0415

  from asvd.eval import attention  # noqa: PLC0415
  from asvd.models import pixel_codec  # noqa: PLC0415

  seeds = [int(s) for s in seeds]
  cfg0 = config_for(next(iter(models)))
  horizon, f = int(cfg0.train.horizon_frames), int(cfg0.rollout.chunk_frames)
  chunks = math.ceil(multiple * horizon / f)
  seg, (a, b) = next(iter(motion.segments(chunks * f, horizon, (multiple,)).items()))
  first_chunk, last_chunk = a // f, (b - 1) // f
  codec = pixel_codec.from_config(cfg0)
  hgt, wid = (int(n) * codec.patch for n in cfg0.rollout.latent_hw)
  look = panworld.world(cfg0)
  context = panworld.embed_prompts(cfg0, list(prompts))
  refs = {p: motion.Reference.of_caption(p, horizon, hgt, wid, seed=seeds[0], **look) for p in dict.fromkeys(prompts)}
  rows, per_video = [], []
  for mode, model in models.items():
    for bias in biases:
      cfg = config_for(mode, [f"--config.rollout.anchor_bias={float(bias)!r}"])
      if not quiet:
        print(f"[asvd] {mode}, anchor_bias {bias:g}: {len(prompts)} captions x {len(seeds)} seeds, {chunks} chunks", file=sys.stderr, flush=True)
      vals = {k: [] for k, _ in RESPONSES}
      share = []
      for s in seeds:
        lat, g = attention.attention_shares(model, context, jax.random.key(s), num_chunks=chunks, config=cfg.rollout, sampler_config=cfg.sampler, memory_check=False, batch_mean=False)
        share.extend(np.asarray(g["anchor"])[first_chunk : last_chunk + 1].mean((0, 1)).tolist())  # [videos]
        for v, p in zip(codec.to_uint8(np.asarray(lat)), prompts, strict=True):
          m = motion.video_metrics(v, horizon, (multiple,), refs[p], chunk_frames=f)[seg]
          for k, _ in RESPONSES:
            vals[k].append(m[k])
      rows.append({"mode": mode, "bias": float(bias), "share": stats.bootstrap(share).as_dict(), **{k: stats.bootstrap(x).as_dict() for k, x in vals.items()}})
      per_video.append({"mode": mode, "bias": float(bias), "share": share, **vals})
  result = {"prompts": list(prompts), "seeds": seeds, "segment": seg, "horizon_frames": horizon, "chunks": [first_chunk, last_chunk], "rows": rows, "per_video": per_video}
  _plot(rows, out.path("dose.png"), seg)
  out.write_json("dose.json", result)
  with open(out.path("dose.md"), "w") as fh:
    fh.write(markdown(result))
  return result


def markdown(result: dict) -> str:
  """The sweep as a markdown table (means with 95% intervals)."""
  c0, c1 = result["chunks"]
  lines = [
    f"Anchor dose and response at {result['segment']} (the H = {result['horizon_frames']} frames ending there; anchor share: mean over chunks {c0}-{c1} and layers),",
    f"{len(result['prompts'])} captions x {len(result['seeds'])} seeds per row; means with bootstrap 95% intervals.",
    "",
    "| model | anchor_bias | anchor share | " + " | ".join(name for _, name in RESPONSES) + " |",
    "|" + " --- |" * (3 + len(RESPONSES)),
  ]
  n = len(result["prompts"]) * len(result["seeds"])
  for r in result["rows"]:
    lines.append(f"| {r['mode']} | {r['bias']:g} | {stats.Interval.from_dict(r['share']).text('.3f')} | " + " | ".join(stats.Interval.from_dict(r[k]).text(of=n) for k, _ in RESPONSES) + " |")
  return "\n".join(lines) + "\n"


def _plot(rows, path: str, seg: str) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  modes = list(dict.fromkeys(r["mode"] for r in rows))
  for ax, (key, name) in zip(axes, RESPONSES[:3], strict=True):
    for mode in modes:
      rs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["bias"])
      xs, ys = [stats.Interval.from_dict(r["share"]) for r in rs], [stats.Interval.from_dict(r[key]) for r in rs]
      xerr = np.abs(np.asarray([[x.mean - x.lo, x.hi - x.mean] for x in xs]).T)
      yerr = np.abs(np.asarray([[y.mean - y.lo, y.hi - y.mean] for y in ys]).T)
      ax.errorbar([x.mean for x in xs], [y.mean for y in ys], xerr=xerr, yerr=yerr, marker="o", capsize=3, label=mode)
      for x, y, r in zip(xs, ys, rs, strict=True):
        ax.annotate(f"{r['bias']:g}", (x.mean, y.mean), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel="anchor attention share (measured)", ylabel=name, title=f"{name} at {seg}")
    ax.grid(alpha=0.3)
  axes[0].legend(title="model (labels: anchor_bias)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
