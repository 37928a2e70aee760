"""The attention-share probe: how much attention mass each cache slot group receives.

Groups (per chunk and layer, mean over heads and query tokens of the last denoising step):
`anchor` (the state / sink / EMA slots), `window[i]` (each previous-window frame, oldest first)
and `self` (the jointly denoised frames). This is the paper's motivation plot: a static anchor
draws a large share; an adaptive state should share it with the window.
"""

from __future__ import annotations

import numpy as np

import asvd


def attention_shares(model, context, key, *, num_chunks: int, config, sampler_config=None, memory_check=True, batch_mean=True):
  """Runs a probed rollout and groups the shares (`memory_check`: as in `asvd.rollout`).

  Returns:
    `(latents, groups)` where `groups` is a dict name -> float array `[num_chunks, L]` (batch
    mean), or `[num_chunks, L, B]` per video with `batch_mean=False`.
  """
  rc = config.copy_and_resolve_references()
  rc.probe = True
  latents, _, share = asvd.rollout(model, context, key, num_chunks=num_chunks, config=rc, sampler_config=sampler_config, memory_check=memory_check)
  share = np.asarray(share)  # [chunks, L, B, N + Fz]
  if batch_mean:
    share = share.mean(axis=2)  # [chunks, L, N + Fz]
  fs = 0 if rc.positions == "absolute" else int(rc.state_frames)
  n = share.shape[-1] - (int(rc.chunk_frames) + (fs if rc.anchor == "adaptive" else 0))
  groups = {}
  if fs:
    groups["anchor"] = share[..., :fs].sum(-1)
  for i in range(n - fs):
    groups[f"window[{i}]"] = share[..., fs + i]
  groups["self"] = share[..., n:].sum(-1)
  return latents, groups


def plot_attention_shares(groups: dict, path: str, title: str = "attention share per slot group") -> str:
  """Writes a PNG: left, share per group vs chunk (layer mean); right, per layer (chunk mean).

  The anchor is drawn on top in a thick black line, `self` dashed, window frames in a colour
  ramp from oldest (light) to newest (dark); the legend sits outside the axes in as many
  columns as it needs (the absolute preset has 21 window slots); chunk and layer ticks are
  integers.
  """
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

  names = list(groups)
  windows = [n for n in names if n.startswith("window")]
  ramp = plt.get_cmap("viridis_r")
  style = {}
  for i, n in enumerate(windows):
    style[n] = dict(color=ramp(0.15 + 0.7 * i / max(1, len(windows) - 1)), lw=1.2, zorder=2)
  style["anchor"] = dict(color="black", lw=2.6, zorder=5)
  style["self"] = dict(color="tab:red", lw=1.8, ls="--", zorder=4)
  ncol = 1 + len(names) // 12
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11 + 1.6 * ncol, 4.2))
  for name, g in groups.items():
    g = np.asarray(g)
    kw = style.get(name, {})
    ax1.plot(np.arange(g.shape[0]), g.mean(1), marker="o", ms=3, label=name, **kw)
    ax2.plot(np.arange(g.shape[1]), g.mean(0), marker=".", label=name, **kw)
  ax1.set(xlabel="chunk", ylabel="share of attention mass", title="per chunk (mean over layers)")
  ax2.set(xlabel="layer", title="per layer (mean over chunks)")
  for ax in (ax1, ax2):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
  ax2.legend(fontsize=8, ncol=ncol, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, title="window[0] = oldest", title_fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path
