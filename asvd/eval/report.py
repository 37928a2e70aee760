"""`asvd eval motion`: the paper's dynamics experiment on PanWorld, per anchor mode.

For each model (one per anchor mode, all from the same teacher), every evaluation caption is
rolled out once per seed for `max(multiples) x H` frames (`H` = the training horizon), probed
for the attention share per cache slot. `asvd.eval.motion` measures each video at each multiple
of the horizon: its look (contrast and sharpness relative to real clips of the caption; frames
below half the real contrast have faded and never count as moving or frozen), its camera speed
against the caption's (median, mean and across chunk boundaries), freezing, its similarity to
frame 0 (a rewind or loop to the anchor) and a label per segment (`moves`, `frozen`, `loops`,
`faded`). The counterfactual anchor test (`asvd.eval.anchor_test`) replaces the anchor's
content with another scene's, or masks it, and measures how much the next chunks change against
a change of noise. Real PanWorld clips of the same captions and seeds form the `data` row.

Every number is a mean over videos with a bootstrap 95% interval (`asvd.eval.stats`); each line
of the paper's claim says `holds`, `does not hold` or `inconclusive`. Writes `eval.json` (the
summary and every per-video value), `eval.md` (the tables and the claim), `speed.png` (speed
and contrast kept), `anchor_share.png`, `attention_<mode>.png` and `frames_<mode>.png` (a
contact sheet per mode, first seed).
"""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np

from asvd.data import panworld
from asvd.eval import motion, stats

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
# Thresholds of the paper's claim at the longest multiple (6x): adaptive keeps >= 90% of the
# commanded speed and sink < 50% (the other lines compare modes: `claim`).
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


def other_scene(caption: str) -> str:
  """The same caption over the next biome of the grammar (the anchor test's donor scene)."""
  spec = panworld.parse_caption(caption)
  biomes = list(panworld.BIOMES)
  return dataclasses.replace(spec, biome=biomes[(biomes.index(spec.biome) + 1) % len(biomes)]).caption


def anchor_test_chunks(horizon: int, chunk_frames: int) -> tuple[int, int]:
  """`(at_chunk, chunks_after)` of the default anchor test: the anchor is replaced after two
  horizons (a distant anchor) and the next horizon's chunks are measured."""
  per_horizon = max(1, math.ceil(horizon / chunk_frames))
  return 2 * per_horizon, per_horizon


def evaluate(models: dict, config_for, prompts, out, *, multiples=(1, 2.4, 6), seeds=(0, 1, 2), anchor_test_at=None, quiet: bool = False) -> dict:
  """Runs the experiment and writes its files into `out` (an `asvd.outputs.OutputDir`).

  Args:
    models: `{anchor mode: model}` (loaded `WanDiT`s).
    config_for: `mode -> config` (the PanWorld config with `rollout.anchor = mode`).
    prompts: captions of the grammar.
    out: the output folder.
    multiples: multiples of the training horizon to measure at.
    seeds: the rollouts' seeds; every caption is generated once per seed (the videos the
      intervals are taken over).
    anchor_test_at: `(at_chunk, chunks_after)` of the counterfactual anchor test (default
      `anchor_test_chunks`).
    quiet: no progress bars.

  Returns:
    The `eval.json` content (module docstring of `asvd.eval.report`, README "PanWorld").
  """
  import jax  # noqa: PLC0415

  from asvd.eval import anchor_test, attention  # noqa: PLC0415
  from asvd.models import pixel_codec  # noqa: PLC0415

  seeds = [int(s) for s in seeds]
  cfg0 = config_for(next(iter(models)))
  horizon, f = int(cfg0.train.horizon_frames), int(cfg0.rollout.chunk_frames)
  chunks = math.ceil(max(multiples) * horizon / f)
  frames_total = chunks * f
  at_chunk, after = anchor_test_at or anchor_test_chunks(horizon, f)
  codec = pixel_codec.from_config(cfg0)
  hgt, wid = (int(n) * codec.patch for n in cfg0.rollout.latent_hw)
  look = panworld.world(cfg0)
  context = panworld.embed_prompts(cfg0, list(prompts))
  donor = panworld.embed_prompts(cfg0, [other_scene(p) for p in prompts])
  refs = {p: motion.Reference.of_caption(p, horizon, hgt, wid, seed=seeds[0], **look) for p in dict.fromkeys(prompts)}
  per_video, shares, tests, sheets = {}, {}, {}, {}

  def measure(vids, desc):
    bar = _bar(len(vids), desc, quiet)
    res = []
    for v, p in zip(vids, list(prompts) * len(seeds), strict=True):
      res.append(motion.video_metrics(v, horizon, multiples, refs[p], chunk_frames=f))
      bar.update(1)
    bar.close()
    return res

  real = np.concatenate([real_clips(prompts, frames_total, hgt, wid, seed=s, **look) for s in seeds])
  per_video["data"] = measure(real, "measure data")
  for mode, model in models.items():
    cfg = config_for(mode)
    if not quiet:
      what = f"{len(prompts)} captions x {len(seeds)} seeds, {chunks} chunks ({frames_total} frames, {max(multiples):g}x the {horizon}-frame horizon)"
      print(f"[asvd] {mode}: {what}", file=sys.stderr, flush=True)
    vids, groups, test = [], [], {v: [] for v in anchor_test.VARIANTS}
    for s in seeds:
      key = jax.random.key(s)
      lat, g = attention.attention_shares(model, context, key, num_chunks=chunks, config=cfg.rollout, sampler_config=cfg.sampler, memory_check=False, batch_mean=False)
      vids.append(codec.to_uint8(np.asarray(lat)))
      groups.append(g)
      if anchor_test.has_anchor(cfg.rollout):
        r = anchor_test.counterfactual(model, context, donor, key, at_chunk=at_chunk, chunks_after=after, config=cfg.rollout, sampler_config=cfg.sampler, to_pixels=codec.to_uint8)
        for v in anchor_test.VARIANTS:
          test[v].append(r[v])
    vids = np.concatenate(vids)
    per_video[mode] = measure(vids, f"measure {mode}")
    shares[mode] = {k: np.concatenate([g[k] for g in groups], axis=-1) for k in groups[0]}  # [chunks, L, videos]
    if test["noise"]:
      tests[mode] = {v: np.concatenate(x) for v, x in test.items()}  # [videos, chunks_after]
    sheets[mode] = vids[: len(prompts)]
    title = f"PanWorld, anchor={mode}: attention share per slot group (mean of {len(vids)} videos)"
    attention.plot_attention_shares({k: x.mean(-1) for k, x in shares[mode].items()}, out.path(f"attention_{mode}.png"), title)
    _contact_sheet(sheets[mode], out.path(f"frames_{mode}.png"), horizon, multiples)
  result = summarise(per_video, shares, tests, prompts=prompts, seeds=seeds, horizon=horizon, chunk_frames=f, multiples=multiples, anchor_test_at=(at_chunk, after))
  _plot_speed(result["metrics"]["rows"], multiples, out.path("speed.png"))
  _plot_anchor(result["anchor_share"], out.path("anchor_share.png"), horizon / f)
  out.write_json("eval.json", result)
  with open(out.path("eval.md"), "w") as fh:
    fh.write(markdown(result))
  return result


def summarise(per_video: dict, shares: dict, tests: dict, *, prompts, seeds, horizon: int, chunk_frames: int, multiples, anchor_test_at) -> dict:
  """The `eval.json` content from per-video measurements (every video: a caption and a seed,
  seed-major; the same order in every row, so that rows pair).

  Args:
    per_video: `{row: [video_metrics of each video]}` (`data` and each mode).
    shares: `{mode: {group: float [chunks, layers, videos]}}` attention shares.
    tests: `{mode: {variant: float [videos, chunks_after]}}` (`asvd.eval.anchor_test`).
    prompts, seeds, horizon, chunk_frames, multiples, anchor_test_at: what was run.
  """
  segs = list(next(iter(per_video.values()))[0])
  values = {r: {s: {m: [v[s][m] for v in vids] for m in (*motion.METRICS, "label")} for s in segs} for r, vids in per_video.items()}
  anchor = {m: g["anchor"].mean(1) for m, g in shares.items() if "anchor" in g}  # [chunks, videos]
  test_rows = {}
  for m, t in tests.items():
    change = {v: x.mean(1) for v, x in t.items()}  # [videos]: mean over the chunks after
    noise = np.where(change["noise"] > 1e-6, change["noise"], np.nan)
    test_rows[m] = {
      **{v: stats.bootstrap(c).as_dict() for v, c in change.items()},
      "swap_ratio": stats.bootstrap(change["swap"] / noise).as_dict(),
      "blank_ratio": stats.bootstrap(change["blank"] / noise).as_dict(),
    }
  result = {
    "prompts": list(prompts),
    "seeds": list(seeds),
    "videos_per_row": len(prompts) * len(seeds),
    "horizon_frames": horizon,
    "chunk_frames": chunk_frames,
    "multiples": [float(m) for m in multiples],
    "metrics": {"rows": {r: motion.aggregate(vids) for r, vids in per_video.items()}},
    "anchor_share": {m: {"per_chunk": [stats.bootstrap(a[c]).as_dict() for c in range(a.shape[0])], "last": stats.bootstrap(a[-1]).as_dict()} for m, a in anchor.items()},
    "anchor_test": {"at_chunk": int(anchor_test_at[0]), "chunks_after": int(anchor_test_at[1]), "rows": test_rows},
    "per_video": {
      "values": values,
      "anchor_share": {m: a.T.tolist() for m, a in anchor.items()},  # [videos][chunks]
      "anchor_test": {m: {v: x.tolist() for v, x in t.items()} for m, t in tests.items()},
    },
  }
  result["anchor_share_last_chunk"] = {m: r["last"]["mean"] for m, r in result["anchor_share"].items()}
  result["claim"] = claim(values, anchor, tests, f"{float(max(multiples)):g}x")
  return result


def claim(values: dict, anchor: dict, tests: dict, seg: str) -> list[dict]:
  """The paper's claim checked line by line on per-video values: `[{"text", "measured",
  "verdict"}]`, each verdict `holds`, `does not hold` or `inconclusive` (`asvd.eval.stats`;
  a comparison of two modes is the paired difference's interval). A missing mode gives no line.

  Args:
    values: `{row: {segment: {metric: [per video]}}}`.
    anchor: `{mode: float [chunks, videos]}` anchor attention shares.
    tests: `{mode: {variant: float [videos, chunks_after]}}` anchor-test changes.
    seg: the segment the claim is read at (the longest multiple).
  """
  lines = []

  def add(text, iv, verdict):
    lines.append({"text": text, "measured": iv.text(), "n": iv.n, "verdict": verdict})

  def val(mode, metric):
    return np.asarray(values[mode][seg][metric], np.float64)

  for m in ("adaptive", "sink"):
    if m in values:
      iv = stats.bootstrap(val(m, "contrast"))
      add(f"at {seg}, {m}'s videos keep their look: contrast >= {motion.FADED_CONTRAST:g} of real clips'", iv, stats.verdict_above(iv, motion.FADED_CONTRAST))
  if "adaptive" in values and "sink" in values:
    iv = stats.paired_difference(val("adaptive", "speed_mean"), val("sink", "speed_mean"))
    add(f"at {seg}, adaptive keeps more of the commanded speed than sink (adaptive - sink, frames that kept their look)", iv, stats.verdict_above(iv, 0.0))
  if "sink" in values and "none" in values:
    iv = stats.paired_difference(val("none", "speed_mean"), val("sink", "speed_mean"))
    add(f"at {seg}, the sink damps motion: none keeps more of the commanded speed than sink (none - sink)", iv, stats.verdict_above(iv, 0.0))
  if "adaptive" in values:
    iv = stats.bootstrap(val("adaptive", "speed_mean"))
    add(f"at {seg}, adaptive keeps >= {CLAIM_ADAPTIVE_SPEED:.0%} of the commanded speed", iv, stats.verdict_above(iv, CLAIM_ADAPTIVE_SPEED))
  if "sink" in values:
    iv = stats.bootstrap(val("sink", "speed_mean"))
    add(f"at {seg}, sink keeps < {CLAIM_SINK_SPEED:.0%} of the commanded speed", iv, stats.verdict_below(iv, CLAIM_SINK_SPEED))
  if "adaptive" in values and "sink" in values:
    iv = stats.paired_difference(val("sink", "sim0"), val("adaptive", "sim0"))
    add(f"at {seg}, sink's frames resemble frame 0 more than adaptive's (similarity to frame 0, sink - adaptive)", iv, stats.verdict_above(iv, 0.0))
  if "adaptive" in anchor and "sink" in anchor:
    iv = stats.paired_difference(anchor["sink"][-1], anchor["adaptive"][-1])
    add("sink draws a larger attention share on its anchor than adaptive (last chunk, sink - adaptive)", iv, stats.verdict_above(iv, 0.0))
  for m in ("sink", "adaptive"):
    if m in tests:
      t = tests[m]
      noise = t["noise"].mean(1)
      iv = stats.bootstrap(t["swap"].mean(1) / np.where(noise > 1e-6, noise, np.nan))
      add(f"{m}'s anchor is a primary scene reference: another scene's anchor changes the next chunks more than new noise does (ratio)", iv, stats.verdict_above(iv, 1.0))
  return lines


def _cell(d: dict, fmt: str = ".2f", of: int | None = None) -> str:
  return stats.Interval.from_dict(d).text(fmt, of)


def markdown(result: dict) -> str:
  """The tables (with 95% intervals) and the claim, as markdown."""
  rows = result["metrics"]["rows"]
  cols = (
    ("contrast", "contrast / real"),
    ("sharpness", "sharpness / real"),
    ("faded", "faded frames"),
    ("speed", "speed (median)"),
    ("speed_mean", "speed (mean)"),
    ("speed_boundary", "speed across chunk boundaries"),
    ("freeze", "freeze"),
    ("sim0", "similarity to frame 0"),
  )
  head = "| model | segment | " + " | ".join(c[1] for c in cols) + " | moves / frozen / loops / faded |"
  lines = [head, "|" + " --- |" * (len(cols) + 3)]
  n = result["videos_per_row"]
  for mode, segs in rows.items():
    for seg, m in segs.items():
      labels = " / ".join(str(round(m[f"label/{k}"]["mean"] * m[f"label/{k}"]["n"])) for k in motion.LABELS)
      lines.append(f"| {mode} | {seg} | " + " | ".join(_cell(m[k], of=n) for k, _ in cols) + f" | {labels} |")
  at = result["anchor_test"]
  test_lines = ["| model | swap: change | blank: change | new noise: change | swap / noise | blank / noise |", "|" + " --- |" * 6]
  for mode, r in at["rows"].items():
    test_lines.append(f"| {mode} | {_cell(r['swap'], '.1f')} | {_cell(r['blank'], '.1f')} | {_cell(r['noise'], '.1f')} | {_cell(r['swap_ratio'])} | {_cell(r['blank_ratio'])} |")
  share_lines = ["| model | chunk 1 | last chunk of the first horizon | last chunk |", "| --- | --- | --- | --- |"]
  k_h = max(0, math.ceil(result["horizon_frames"] / result["chunk_frames"]) - 1)
  for mode, r in result["anchor_share"].items():
    pc = r["per_chunk"]
    share_lines.append(f"| {mode} | {_cell(pc[min(1, len(pc) - 1)], '.3f')} | {_cell(pc[min(k_h, len(pc) - 1)], '.3f')} | {_cell(r['last'], '.3f')} |")
  out = [
    f"PanWorld, {len(result['prompts'])} captions x {len(result['seeds'])} seeds = {n} videos per row, horizon H = {result['horizon_frames']} frames;",
    "each segment is the H frames ending at that multiple of H. Every number: the mean over the videos and its bootstrap 95% interval.",
    "`contrast`, `sharpness`: per frame, relative to real clips of the caption; a frame below half the real contrast has `faded`,",
    "and speeds, freeze and labels count only pairs of frames that kept their look. `speed`: measured camera speed / commanded",
    "(1 = the caption's). `similarity to frame 0`: correlation of the frames with the video's first. `data`: real PanWorld clips.",
    "",
    *lines,
    "",
    f"Anchor test: the rollout is stopped after chunk {at['at_chunk']} and continued for {at['chunks_after']} chunks with the anchor slots",
    "holding another scene's anchor (swap), masked (blank), or unchanged with new noise; change = mean absolute pixel difference",
    "from the unchanged continuation (0..255).",
    "",
    *(test_lines if at["rows"] else ["(no mode with anchor slots)"]),
    "",
    "Attention share on the anchor slot(s) (mean over layers):",
    "",
    *(share_lines if result["anchor_share"] else ["(no mode with anchor slots)"]),
    "",
    "The paper's claim on this table (holds / does not hold / inconclusive: the 95% interval straddles the threshold):",
    "",
  ]
  out += [f"- {c['text']}: {c['measured']} -> **{c['verdict']}**" for c in result["claim"]]
  return "\n".join(out) + "\n"


def _plot_speed(rows: dict, multiples, path: str) -> None:
  """Two panels with 95% intervals: speed kept (mean over frames that kept their look) and
  contrast relative to real clips, against the segment's multiple of the horizon."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  xs = np.asarray([float(m) for m in multiples])
  for ax, metric, ylabel in ((axes[0], "speed_mean", "measured / commanded camera speed"), (axes[1], "contrast", "contrast / real clips'")):
    for i, (mode, segs) in enumerate(rows.items()):
      ivs = [stats.Interval.from_dict(segs[f"{m:g}x"][metric]) for m in xs]
      y = np.asarray([v.mean for v in ivs])
      err = np.abs(np.asarray([[v.mean - v.lo, v.hi - v.mean] for v in ivs]).T)
      dx = (i - (len(rows) - 1) / 2) * 0.012 * max(1.0, xs.max() - xs.min())  # side by side, not on top
      style = {"color": "gray", "ls": ":"} if mode == "data" else {}
      ax.errorbar(xs + dx, y, yerr=err, marker="o", capsize=3, label=mode, **style)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(xlabel="segment end / training horizon", ylabel=ylabel)
    ax.grid(alpha=0.3)
  axes[1].axhline(motion.FADED_CONTRAST, color="tab:red", lw=0.8, ls="--")
  axes[0].set_title("camera speed kept (frames that kept their look)")
  axes[1].set_title("contrast kept (below the dashed line: faded)")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _plot_anchor(shares: dict, path: str, horizon_chunks: float) -> None:
  """The anchor's attention share per chunk, mean and 95% band over the videos."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6, 4))
  for mode, r in shares.items():
    ivs = [stats.Interval.from_dict(d) for d in r["per_chunk"]]
    x = np.arange(len(ivs))
    line = ax.plot(x, [v.mean for v in ivs], marker=".", label=mode)[0]
    ax.fill_between(x, [v.lo for v in ivs], [v.hi for v in ivs], color=line.get_color(), alpha=0.2)
  ax.axvline(horizon_chunks - 0.5, color="k", lw=0.8, ls="--")
  ax.set(xlabel="chunk", ylabel="attention share on the anchor slot(s)", title="anchor-slot attention (mean over layers, 95% band)")
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
