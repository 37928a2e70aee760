"""Bootstrap intervals and claim verdicts (asvd/eval/stats.py) and the claim lines of `asvd eval
motion` built from per-video values (asvd/eval/report.py `claim`)."""

import numpy as np
import pytest

from asvd.eval import report, stats


def test_bootstrap_interval_covers_the_mean_at_the_normal_width():
  x = np.random.default_rng(0).normal(2.0, 1.0, 400)
  iv = stats.bootstrap(x)
  half = 1.96 * x.std() / np.sqrt(x.size)
  assert iv.n == 400 and iv.mean == pytest.approx(x.mean()) and iv.lo < 2.0 < iv.hi
  assert iv.hi - iv.lo == pytest.approx(2 * half, rel=0.15)
  assert stats.bootstrap(x) == iv  # a fixed resampling seed: the table is reproducible


def test_bootstrap_drops_nans_and_reports_no_videos():
  assert stats.bootstrap([1.0, np.nan, 3.0]).n == 2
  none = stats.bootstrap([np.nan, np.nan])
  assert none.n == 0 and none.text() == "–" and none.as_dict() == {"mean": None, "lo": None, "hi": None, "n": 0}
  assert stats.verdict_above(none, 0.0) == stats.INCONCLUSIVE and stats.verdict_below(none, 0.0) == stats.INCONCLUSIVE


def test_verdicts_need_the_whole_interval_on_one_side():
  iv = stats.Interval(0.5, 0.4, 0.6, 10)
  assert stats.verdict_above(iv, 0.3) == stats.HOLDS and stats.verdict_above(iv, 0.7) == stats.FAILS and stats.verdict_above(iv, 0.5) == stats.INCONCLUSIVE
  assert stats.verdict_below(iv, 0.7) == stats.HOLDS and stats.verdict_below(iv, 0.3) == stats.FAILS and stats.verdict_below(iv, 0.45) == stats.INCONCLUSIVE


def test_paired_difference_uses_the_pairing():
  """A shared per-video offset cancels in the pairs: a difference of 0.05 on values spread by 1
  is resolved, where the two intervals side by side overlap."""
  rng = np.random.default_rng(1)
  base = rng.normal(0, 1, 24)
  a, b = base + 0.05 + rng.normal(0, 0.01, 24), base
  d = stats.paired_difference(a, b)
  assert d.lo > 0 and stats.verdict_above(d, 0.0) == stats.HOLDS
  ia, ib = stats.bootstrap(a), stats.bootstrap(b)
  assert ia.lo < ib.hi  # side by side: inconclusive
  with pytest.raises(ValueError, match="same videos"):
    stats.paired_difference(a, b[:-1])


def _values(speeds, contrast=1.0, sim0=0.0):
  return {"6x": {"speed_mean": list(speeds), "contrast": [contrast] * len(speeds), "sim0": [sim0] * len(speeds)}}


def test_claim_lines_read_holds_fails_and_inconclusive():
  rng = np.random.default_rng(2)
  n = 24
  fast, slow = 1.0 + 0.02 * rng.standard_normal(n), 0.3 + 0.02 * rng.standard_normal(n)
  anchor = {"adaptive": np.full((3, n), 0.05), "sink": np.full((3, n), 0.2) + 0.01 * rng.standard_normal((3, n))}
  tests = {"sink": {"swap": np.full((n, 3), 8.0), "noise": np.full((n, 3), 4.0), "blank": np.full((n, 3), 2.0)}}
  lines = report.claim({"adaptive": _values(fast), "sink": _values(slow, sim0=0.5), "none": _values(fast)}, anchor, tests, "6x")
  got = {c["text"].split(":")[0]: c["verdict"] for c in lines}
  assert set(got.values()) == {stats.HOLDS}, got  # the paper's claim, planted
  assert any("swap" not in c["text"] and "primary scene reference" in c["text"] for c in lines)
  # Reversed: adaptive slow, sink fast, sink attends its anchor less.
  rev = report.claim({"adaptive": _values(slow, sim0=0.5), "sink": _values(fast), "none": _values(slow)}, {"adaptive": anchor["sink"], "sink": anchor["adaptive"]}, {}, "6x")
  assert [c["verdict"] for c in rev if "keep their look" not in c["text"]] == [stats.FAILS] * 6
  # The same speeds everywhere: no comparison can be decided.
  same = report.claim({"adaptive": _values(fast), "sink": _values(fast + 1e-3 * rng.standard_normal(n))}, {}, {}, "6x")
  assert [c["verdict"] for c in same if "more of the commanded speed" in c["text"]] == [stats.INCONCLUSIVE]
  # Faded videos have no speed: every speed line is inconclusive, the look line fails.
  faded = report.claim({"adaptive": _values([np.nan] * n, contrast=0.1), "sink": _values([np.nan] * n, contrast=0.1)}, {}, {}, "6x")
  verdicts = {c["text"]: c["verdict"] for c in faded}
  assert all(v == stats.INCONCLUSIVE for t, v in verdicts.items() if "speed" in t)
  assert all(v == stats.FAILS for t, v in verdicts.items() if "keep their look" in t)
