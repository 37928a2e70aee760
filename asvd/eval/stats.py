"""Bootstrap intervals and the three-way verdict of a claim line (`asvd eval motion`).

Every number of the evaluation is a mean over videos (one video per caption and seed). Its 95%
interval is a percentile bootstrap over those videos. A comparison of two models is made on
the *paired* differences (the same caption, seed and noise under both models), which is the
interval of the difference itself rather than two intervals side by side; a claim line then
reads:

* `holds`: the whole interval is on the claimed side;
* `does not hold`: the whole interval is on the other side;
* `inconclusive`: the interval contains the threshold (for a comparison: zero).

Videos where a metric is undefined (NaN: e.g. a speed when every frame of the segment has faded)
drop out of that metric; `n` says how many counted.
"""

from __future__ import annotations

import dataclasses

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


@dataclasses.dataclass(frozen=True)
class Interval:
  """A mean and its bootstrap interval over `n` videos (all NaN when `n` is 0)."""

  mean: float
  lo: float
  hi: float
  n: int

  @classmethod
  def from_dict(cls, d: dict) -> Interval:
    """The inverse of `as_dict` (None back to NaN), for summaries read from `eval.json`."""
    return cls(*(float("nan") if d[k] is None else d[k] for k in ("mean", "lo", "hi")), d["n"])

  def as_dict(self) -> dict:
    return {"mean": _num(self.mean), "lo": _num(self.lo), "hi": _num(self.hi), "n": self.n}

  def text(self, fmt: str = ".2f", of: int | None = None) -> str:
    """`0.81 [0.74, 0.88]`; `–` when no video counted; `(n = 3)` added when fewer than `of`
    videos counted."""
    if self.n == 0:
      return "–"
    out = format(self.mean, fmt) if self.n == 1 or self.lo == self.hi else f"{self.mean:{fmt}} [{self.lo:{fmt}}, {self.hi:{fmt}}]"
    return out + (f" (n = {self.n})" if of is not None and self.n < of else "")


def _num(x: float):
  return None if not np.isfinite(x) else float(x)


def bootstrap(values, *, seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL) -> Interval:
  """The mean of `values` (NaNs dropped) and its percentile-bootstrap interval.

  Args:
    values: one number per video.
    seed: the resampling's seed (fixed, so a table is reproducible).
    resamples: bootstrap resamples.
    level: the interval's coverage.

  Returns:
    An `Interval`; a single value gives a zero-width interval, none gives NaNs and `n = 0`.
  """
  x = np.asarray(values, np.float64).ravel()
  x = x[np.isfinite(x)]
  if x.size == 0:
    return Interval(float("nan"), float("nan"), float("nan"), 0)
  if x.size == 1:
    return Interval(float(x[0]), float(x[0]), float(x[0]), 1)
  rng = np.random.default_rng(seed)
  means = x[rng.integers(0, x.size, (resamples, x.size))].mean(1)
  a = (1.0 - level) / 2.0
  lo, hi = np.quantile(means, [a, 1.0 - a])
  return Interval(float(x.mean()), float(lo), float(hi), int(x.size))


def paired_difference(a, b, *, seed: int = 0) -> Interval:
  """`mean(a - b)` over the videos where both are defined, with its bootstrap interval.

  `a` and `b` hold one value per video in the same order (same caption, seed and noise)."""
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  if a.shape != b.shape:
    raise ValueError(f"paired values need the same videos: {a.shape} vs {b.shape}")
  return bootstrap(a - b, seed=seed)


def verdict_above(iv: Interval, threshold: float) -> str:
  """Whether the claim "the mean is above `threshold`" holds on this interval."""
  if iv.n == 0:
    return INCONCLUSIVE
  if iv.lo > threshold:
    return HOLDS
  if iv.hi < threshold:
    return FAILS
  return INCONCLUSIVE


def verdict_below(iv: Interval, threshold: float) -> str:
  """Whether the claim "the mean is below `threshold`" holds on this interval."""
  if iv.n == 0:
    return INCONCLUSIVE
  if iv.hi < threshold:
    return HOLDS
  if iv.lo > threshold:
    return FAILS
  return INCONCLUSIVE
