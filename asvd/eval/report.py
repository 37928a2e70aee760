"""`asvd eval motion`: the paper's dynamics experiment on PanWorld, per anchor mode.

For each model (one per anchor mode, all from the same teacher) one probed rollout per prompt of
`max(multiples) x H` frames (`H` = the training horizon) gives the frames and the attention share
per cache slot; `asvd.eval.motion` measures the frames at each multiple of the horizon against
the caption's commanded camera motion; real PanWorld clips of the same captions are measured the
same way (the `data` row: what a perfect generator would score). Writes `eval.json`, `eval.md`
(the table and the paper's claim checked line by line), `speed.png`, `anchor_share.png`,
`attention_<mode>.png` and `frames_<mode>.png` (a contact sheet per mode).
"""

from __future__ import annotations

import math
import sys

import numpy as np

from asvd.data import panworld
from asvd.eval import motion

MODES = ("adaptive", "sink", "ema", "none")
# Eight captions: every direction at both speeds, every biome twice, half with an object.
PROMPTS = (
  "camera pans left quickly over a snowy forest, a red ball bounces",
  "camera pans right slowly over a sandy desert",
  "camera pans up quickly over a green meadow, a blue bird flies",
  "camera pans down slowly over a rocky canyon",
  "camera pans right quickly over a rocky canyon, a yellow cube slides",
  "camera pans left slowly over a green meadow",
  "camera pans down quickly over a sandy desert, a white ball bounces",
  "camera pans up slowly over a snowy forest",
)
# The paper's claim at the longest multiple (6x): adaptive keeps >= 90% of the commanded speed,
# sink < 50%, and adaptive's attention share on the anchor slot is below sink's.
CLAIM_ADAPTIVE_SPEED, CLAIM_SINK_SPEED = 0.9, 0.5


def output_files(modes) -> list[str]:
  """Every file `evaluate` writes (checked against overwriting before any work)."""
  per_mode = [f"{k}_{m}.png" for m in modes for k in ("attention", "frames")]
  return ["eval.json", "eval.md", "speed.png", "anchor_share.png", *per_mode]


def _bar(total: int, desc: str, quiet: bool):
  from tqdm import tqdm  # noqa: PLC0415

  return tqdm(total=total, desc=desc, unit="video", file=sys.stderr, disable=quiet)


def real_clips(prompts, frames: int, height: int, width: int, *, seed: int, **world) -> np.ndarray:
  """uint8 `[N, frames, H, W, 3]`: one real PanWorld clip per caption (a random world; `world`:
  the data's look and speeds, `panworld.world`)."""
  rng = np.random.default_rng(seed + 1)
  return np.stack([panworld.render_clip(panworld.spec_of_caption(p, rng), frames, height, width, **world) for p in prompts])


def evaluate(models: dict, config_for, prompts, out, *, multiples=(1, 2.4, 6), seed: int = 0, quiet: bool = False) -> dict:
  """Runs the experiment and writes its files into `out` (an `asvd.outputs.OutputDir`).

  Args:
    models: `{anchor mode: model}` (loaded `WanDiT`s).
    config_for: `mode -> config` (the PanWorld config with `rollout.anchor = mode`).
    prompts: captions of the grammar.
    out: the output folder.
    multiples: multiples of the training horizon to measure at.
    seed: the rollouts' seed.
    quiet: no progress bars.

  Returns:
    The `eval.json` content: `{"rows": {mode: {segment: {metric: value}}}, "anchor_share": ...}`.
  """
  import jax  # noqa: PLC0415

  from asvd.eval import attention  # noqa: PLC0415
  from asvd.models import pixel_codec  # noqa: PLC0415

  cfg0 = config_for(next(iter(models)))
  horizon, f = int(cfg0.train.horizon_frames), int(cfg0.rollout.chunk_frames)
  chunks = math.ceil(max(multiples) * horizon / f)
  frames_total = chunks * f
  codec = pixel_codec.from_config(cfg0)
  hgt, wid = (int(n) * codec.patch for n in cfg0.rollout.latent_hw)
  look = panworld.world(cfg0)
  context = panworld.embed_prompts(cfg0, list(prompts))
  refs = {p: motion.Reference.of_caption(p, horizon, hgt, wid, seed=seed, **look) for p in dict.fromkeys(prompts)}
  rows, shares, videos = {}, {}, {}
  real = real_clips(prompts, frames_total, hgt, wid, seed=seed, **look)
  rows["data"] = motion.aggregate([motion.video_metrics(v, horizon, multiples, refs[p]) for v, p in zip(real, prompts, strict=True)])
  for mode, model in models.items():
    cfg = config_for(mode)
    if not quiet:
      print(f"[asvd] {mode}: {len(prompts)} rollouts of {chunks} chunks ({frames_total} frames, {max(multiples):g}x the {horizon}-frame horizon)", file=sys.stderr, flush=True)
    lat, groups = attention.attention_shares(model, context, jax.random.key(seed), num_chunks=chunks, config=cfg.rollout, sampler_config=cfg.sampler, memory_check=False)
    vids = codec.to_uint8(np.asarray(lat))
    per = []
    bar = _bar(len(prompts), f"measure {mode}", quiet)
    for v, p in zip(vids, prompts, strict=True):
      per.append(motion.video_metrics(v, horizon, multiples, refs[p]))
      bar.update(1)
    bar.close()
    rows[mode], shares[mode], videos[mode] = motion.aggregate(per), groups, vids
    title = f"PanWorld, anchor={mode}: attention share per slot group"
    attention.plot_attention_shares(groups, out.path(f"attention_{mode}.png"), title)
    _contact_sheet(vids, out.path(f"frames_{mode}.png"), horizon, multiples)
  anchor = {m: float(np.asarray(g["anchor"])[-1].mean()) for m, g in shares.items() if "anchor" in g}
  result = {
    "prompts": list(prompts),
    "horizon_frames": horizon,
    "multiples": [float(m) for m in multiples],
    "metrics": {"rows": rows},
    "anchor_share_last_chunk": anchor,
    "anchor_share_per_chunk": {m: np.asarray(g["anchor"]).mean(1).tolist() for m, g in shares.items() if "anchor" in g},
  }
  result["claim"] = claim(rows, anchor, f"{float(max(multiples)):g}x")
  _plot_speed(rows, multiples, out.path("speed.png"))
  _plot_anchor(result["anchor_share_per_chunk"], out.path("anchor_share.png"), horizon // f)
  out.write_json("eval.json", result)
  with open(out.path("eval.md"), "w") as fh:
    fh.write(markdown(result))
  return result


def claim(rows: dict, anchor: dict, seg: str) -> list[dict]:
  """The paper's claim checked on this table: `[{"text", "measured", "holds"}]` (a missing mode
  gives no line)."""
  lines = []
  if "adaptive" in rows:
    v = rows["adaptive"][seg]["speed"]
    lines.append({"text": f"at {seg}, adaptive keeps >= {CLAIM_ADAPTIVE_SPEED:.0%} of the commanded speed", "measured": f"{v:.0%}", "holds": bool(v >= CLAIM_ADAPTIVE_SPEED)})
  if "sink" in rows:
    v = rows["sink"][seg]["speed"]
    lines.append({"text": f"at {seg}, sink keeps < {CLAIM_SINK_SPEED:.0%} of the commanded speed", "measured": f"{v:.0%}", "holds": bool(v < CLAIM_SINK_SPEED)})
  if "adaptive" in anchor and "sink" in anchor:
    a, s = anchor["adaptive"], anchor["sink"]
    lines.append({"text": "adaptive's attention share on the anchor slot is below sink's (last chunk)", "measured": f"{a:.3f} vs {s:.3f}", "holds": bool(a < s)})
  return lines


def markdown(result: dict) -> str:
  """The table (one row per mode and segment) and the claim, as markdown."""
  rows = result["metrics"]["rows"]
  head = "| model | segment | speed | motion px/frame | dynamic | freeze | drift vs start | drift vs data |"
  lines = [head, "|" + " --- |" * 8]
  for mode, segs in rows.items():
    for seg, m in segs.items():
      lines.append(f"| {mode} | {seg} | {m['speed']:.2f} | {m['motion']:.2f} | {m['dynamic']:.2f} | {m['freeze']:.2f} | {m['drift_start']:.3f} | {m['drift_data']:.3f} |")
  out = [
    f"PanWorld, {len(result['prompts'])} captions, horizon H = {result['horizon_frames']} frames; each segment is the H frames ending at that multiple of H.",
    "`speed`: measured camera speed / commanded (1 = the caption's); `data`: real PanWorld clips.",
    "",
    *lines,
    "",
    "Anchor-slot attention share (last chunk): " + ", ".join(f"{m} {v:.3f}" for m, v in result["anchor_share_last_chunk"].items()),
    "",
    "The paper's claim on this table:",
    "",
  ]
  out += [f"- {c['text']}: {c['measured']} -> {'holds' if c['holds'] else 'does not hold'}" for c in result["claim"]]
  return "\n".join(out) + "\n"


def _plot_speed(rows: dict, multiples, path: str) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6, 4))
  xs = [float(m) for m in multiples]
  for mode, segs in rows.items():
    ys = [segs[f"{m:g}x"]["speed"] for m in xs]
    ax.plot(xs, ys, marker="o", label=mode, **({"color": "gray", "ls": ":"} if mode == "data" else {}))
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set(xlabel="segment end / training horizon", ylabel="measured / commanded camera speed", title="PanWorld: camera speed kept over long rollouts")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _plot_anchor(per_chunk: dict, path: str, horizon_chunks: int) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6, 4))
  for mode, ys in per_chunk.items():
    ax.plot(np.arange(len(ys)), ys, marker=".", label=mode)
  ax.axvline(horizon_chunks - 0.5, color="k", lw=0.8, ls="--")
  ax.set(xlabel="chunk", ylabel="attention share on the anchor slot(s)", title="anchor-slot attention (mean over layers)")
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _contact_sheet(vids: np.ndarray, path: str, horizon: int, multiples) -> None:
  """A PNG: one row per video, its first frame and each segment's last, 3x upscaled."""
  from asvd import video  # noqa: PLC0415

  idx = [0] + [round(float(m) * horizon) - 1 for m in multiples]
  video.write_contact_sheet(np.concatenate([v[idx] for v in vids]), path, columns=len(idx), factor=3)
