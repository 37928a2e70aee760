"""`asvd eval motion` (asvd/eval/report.py) end to end on small random-weight models, one per
anchor mode: the table, the claim lines and the plots are written; real clips (the `data` row)
score the captions' speed; bad flags are one line before any model loads."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from cli_env import ENV

import asvd

SMALL = ["--config.model.dim=32", "--config.model.ffn_dim=64", "--config.model.num_layers=1", "--config.model.freq_dim=32"]


def _asvd(*args):
  return subprocess.run([sys.executable, "-m", "asvd.main", *args], capture_output=True, text=True, env=ENV)


def test_eval_motion_writes_the_table_and_plots(tmp_path):
  cfg = asvd.load_config("configs/panworld.py", SMALL)
  models = tmp_path / "models"
  for i, mode in enumerate(("adaptive", "sink", "none")):
    asvd.save_dit(asvd.init_dit(cfg.model, jax.random.key(i)), models / mode)
  out = tmp_path / "ev"
  args = ["--models", str(models), "--modes", "adaptive,sink,none", "--prompts", "2", "--seeds", "2", "--multiples", "1,2", "--anchor-test", "2,1"]
  p = _asvd("eval", "motion", *args, "--out", str(out), *SMALL)
  assert p.returncode == 0, p.stderr[-2000:]
  res = json.loads((out / "eval.json").read_text())
  rows = res["metrics"]["rows"]
  assert set(rows) == {"data", "adaptive", "sink", "none"} and set(rows["data"]) == {"1x", "2x"}
  assert res["seeds"] == [0, 1] and res["videos_per_row"] == 4
  for seg in ("1x", "2x"):  # real clips: the caption's speed, moving, kept look, no freeze
    d = rows["data"][seg]
    assert d["speed"]["n"] == 4 and d["speed"]["lo"] <= d["speed"]["mean"] <= d["speed"]["hi"]
    assert d["speed_mean"]["mean"] == pytest.approx(1.0, abs=0.1) and d["freeze"]["mean"] == 0.0 and d["label/moves"]["mean"] == 1.0
    assert d["contrast"]["mean"] == pytest.approx(1.0, abs=0.4)
  # Random weights generate noise, not a pan: no frame keeps the data's look or moves with the caption.
  for m in ("adaptive", "sink", "none"):
    assert rows[m]["2x"]["label/moves"]["mean"] < 1.0 and len(res["per_video"]["values"][m]["2x"]["speed"]) == 4, rows[m]
  # Per-video values are kept, in the same order for every row (they pair).
  assert len(res["per_video"]["values"]["data"]["1x"]["label"]) == 4
  # The anchor test runs for the modes with an anchor, at the chunk asked for; none has none.
  at = res["anchor_test"]
  assert (at["at_chunk"], at["chunks_after"]) == (2, 1) and set(at["rows"]) == {"adaptive", "sink"}
  assert all(at["rows"][m]["noise"]["mean"] > 0 for m in ("adaptive", "sink"))
  assert set(res["anchor_share"]) == {"adaptive", "sink", "none"} and len(res["anchor_share"]["sink"]["per_chunk"]) == 6
  assert res["anchor_share"]["none"]["last"]["mean"] == 0.0 and res["anchor_share"]["sink"]["last"]["mean"] > 0  # none's slot is masked
  verdicts = {c["verdict"] for c in res["claim"]}
  assert verdicts <= {"holds", "does not hold", "inconclusive"} and len(res["claim"]) == 10
  for f in ("eval.md", "speed.png", "anchor_share.png", "attention_adaptive.png", "attention_sink.png", "frames_adaptive.png", "frames_sink.png"):
    assert (out / f).stat().st_size > 0, f
  md = (out / "eval.md").read_text()
  assert "| adaptive | 2x |" in md and "| data | 1x |" in md and "The paper's claim" in md and "| sink | " in md and "swap / noise" in md
  # Bad flags and missing models: one line each, before any model loads.
  for bad, word in (
    (["--modes", "adaptive,anchorless"], "--modes"),
    (["--multiples", "0.5,2"], "--multiples"),
    (["--multiples", "nan"], "--multiples"),
    (["--anchor-test", "0,3"], "--anchor-test"),
    (["--anchor-test", "6"], "--anchor-test"),
    (["--seeds", "0"], "--seeds"),
    (["--models", str(models), "--modes", "ema"], "no checkpoint folder for ema"),
    (["--models", str(tmp_path / "nowhere")], "--models"),
  ):
    p = _asvd("eval", "motion", *bad, "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and word in p.stderr and "Traceback" not in p.stderr, (bad, p.stderr[-500:])


def test_generate_with_no_flag_runs_the_bundled_model(tmp_path, monkeypatch, capsys):
  """No flag at all: the bundled adaptive model (here a random one in a scratch bundle folder),
  the default caption, 6x the training horizon, into out/panworld; `--bundled MODE` picks
  another mode, and a missing one is one line saying how to train it."""
  from asvd import bundled, main  # noqa: PLC0415

  root = tmp_path / "bundle"
  cfg = bundled.config_for("adaptive")
  asvd.save_dit(asvd.init_dit(cfg.model, jax.random.key(0)), root / "adaptive")
  monkeypatch.setattr(bundled, "ROOT", str(root))
  monkeypatch.chdir(tmp_path)
  assert main.run(["generate"]) == 0
  out = tmp_path / "out" / "panworld"
  rec = json.loads((out / "generate.json").read_text())
  assert rec["prompt"] == bundled.DEFAULT_PROMPT and rec["checkpoint"] == str(root / "adaptive")
  assert "--config.rollout.anchor=adaptive" in rec["overrides"]
  h, f = int(cfg.train.horizon_frames), int(cfg.rollout.chunk_frames)
  assert rec["shape"][1] == -(-bundled.HORIZON_MULTIPLE * h // f) * f >= bundled.HORIZON_MULTIPLE * h
  assert (out / "video.mp4").stat().st_size > 0 and (out / "frames.png").stat().st_size > 0
  assert "out/panworld" in capsys.readouterr().out
  assert main.run(["generate", "--bundled", "sink"]) == 2
  err = capsys.readouterr().err
  assert "bundled sink model is missing" in err and "launch/panworld_bundle.py" in err
  assert main.run(["generate", "--bundled", "sink", "--init", "random"]) == 2
  assert "--bundled runs a bundled model" in capsys.readouterr().err


def test_panworld_training_logs_its_samples_camera_speed(tmp_path):
  """A PanWorld teacher run (its first step on field pans, `train.teacher.motion_warmup`) logs
  `sample/speed` and `sample/motion` with each sample video (and `sample/direction_gain`),
  measured on the decoded frames against the sampled caption (the dataset's first); the
  world's look and speeds (`train.data.world_scale` / `world_texture` / `world_speeds`) name
  its own dataset."""
  work = tmp_path / "run"
  data = tmp_path / "data"
  p = _asvd(
    "train", "--config", "configs/panworld.py", "--workdir", str(work), "--no-progress", *SMALL,
    "--config.train.stages=('teacher',)", "--config.train.teacher.steps=2", "--config.train.sample_every=2",
    "--config.train.data.clips=8", "--config.train.causal_init.ode_steps=2", f"--config.train.data.data_dir={data}",
    "--config.train.data.world_scale=1.5", "--config.train.data.world_texture=0.0", "--config.train.data.world_speeds=(4, 8)",
    "--config.train.teacher.motion_warmup=1",
  )  # fmt: skip
  assert p.returncode == 0, p.stderr[-2000:]
  assert "steps 1-1 on field pans" in p.stderr
  recs = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
  samples = [r for r in recs if "sample/speed" in r]
  assert len(samples) == 1 and samples[0]["step"] == 2 and np.isfinite(samples[0]["sample/motion"])
  assert np.isfinite(samples[0]["sample/direction_gain"])  # the teacher's probe (asvd.eval.motion.direction_gain)
  assert [r["step"] for r in recs if "loss" in r] == [1, 2]
  assert [d.name for d in (data / "pan_world").iterdir() if not d.name.startswith(".")] == ["f12_h16_w16_n8_s0_o50_x1.5_t0_v4-8"]
  assert (work / "teacher" / "samples" / "step_000002.mp4").stat().st_size > 0


def test_bundle_install_replaces_only_what_asvd_wrote(tmp_path):
  """launch/panworld_bundle.py's `install`: it copies the final models into the bundle folder,
  replaces its own checkpoints there on a rerun, and refuses a user's folder or record.json
  (both kept) before writing anything; nothing temporary is left behind."""
  import importlib.util  # noqa: PLC0415

  spec = importlib.util.spec_from_file_location("panworld_bundle", "launch/panworld_bundle.py")
  bundle = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bundle)
  cfg = asvd.load_config("configs/panworld.py", SMALL)
  src = {m: tmp_path / "runs" / m for m in ("adaptive", "sink")}
  for i, p in enumerate(src.values()):
    asvd.save_dit(asvd.init_dit(cfg.model, jax.random.key(i)), p)
  dest = tmp_path / "bundle"
  bundle.install({m: str(p) for m, p in src.items()}, str(dest)).write_json("record.json", {"models": ["adaptive", "sink"]})
  def params(path):
    from flax import nnx  # noqa: PLC0415

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(asvd.load_dit(path), nnx.Param))]

  first = params(dest / "sink")
  asvd.save_dit(asvd.init_dit(cfg.model, jax.random.key(9)), src["sink"], overwrite=True)
  bundle.install({m: str(p) for m, p in src.items()}, str(dest)).write_json("record.json", {"models": ["adaptive", "sink"]})  # a rerun
  assert max(np.abs(a - b).max() for a, b in zip(params(dest / "sink"), first, strict=True)) > 0  # replaced
  assert sorted(os.listdir(dest)) == [".asvd_outputs", "adaptive", "record.json", "sink"]
  # A user's folder where a mode would go, or a record.json asvd did not write: refused, kept.
  mine = tmp_path / "mine"
  (mine / "none").mkdir(parents=True)
  (mine / "none" / "notes.txt").write_text("x")
  with pytest.raises(SystemExit, match="not asvd checkpoints"):
    bundle.install({"none": str(src["sink"])}, str(mine))
  assert (mine / "none" / "notes.txt").read_text() == "x" and sorted(os.listdir(mine)) == ["none"]
  (tmp_path / "theirs").mkdir()
  (tmp_path / "theirs" / "record.json").write_text("{}")
  with pytest.raises(asvd.AsvdError, match="record.json"):
    bundle.install({"sink": str(src["sink"])}, str(tmp_path / "theirs"))
  assert sorted(os.listdir(tmp_path / "theirs")) == ["record.json"]


def test_panworld_outputs_keep_a_users_files(tmp_path):
  """generate's frames.png and eval motion's eval.md are checked like every output: a user's
  file of that name stops the command before any work, and is kept."""
  out = tmp_path / "g"
  out.mkdir()
  (out / "frames.png").write_text("mine")
  p = _asvd("generate", "--config", "configs/panworld.py", "--init", "random", "--chunks", "1", "--out", str(out), *SMALL)
  assert p.returncode == 2 and "frames.png" in p.stderr and (out / "frames.png").read_text() == "mine"
  ev = tmp_path / "ev"
  ev.mkdir()
  (ev / "eval.md").write_text("mine")
  models = tmp_path / "models"
  cfg = asvd.load_config("configs/panworld.py", SMALL)
  asvd.save_dit(asvd.init_dit(cfg.model, jax.random.key(0)), models / "sink")
  p = _asvd("eval", "motion", "--models", str(models), "--modes", "sink", "--out", str(ev), *SMALL)
  assert p.returncode == 2 and "eval.md" in p.stderr and (ev / "eval.md").read_text() == "mine"
  assert sorted(os.listdir(ev)) == ["eval.md"]


def test_eval_dose_sweeps_the_anchor_bias(tmp_path):
  """`asvd eval dose`: one row per mode and bias, the measured anchor share rising with the
  bias; bad flags are one line before any model loads."""
  cfg = asvd.load_config("configs/panworld.py", SMALL)
  models = tmp_path / "models"
  for i, mode in enumerate(("adaptive", "sink")):
    asvd.save_dit(asvd.init_dit(cfg.model, jax.random.key(i)), models / mode)
  out = tmp_path / "dose"
  p = _asvd("eval", "dose", "--models", str(models), "--prompts", "2", "--seeds", "1", "--biases=-2,0,2", "--multiple", "2", "--out", str(out), *SMALL)
  assert p.returncode == 0, p.stderr[-2000:]
  res = json.loads((out / "dose.json").read_text())
  assert res["segment"] == "2x" and [(r["mode"], r["bias"]) for r in res["rows"]] == [(m, b) for m in ("adaptive", "sink") for b in (-2.0, 0.0, 2.0)]
  for m in ("adaptive", "sink"):
    share = [r["share"]["mean"] for r in res["rows"] if r["mode"] == m]
    assert share[0] < share[1] < share[2], (m, share)
  assert all(len(v["share"]) == 2 and len(v["contrast"]) == 2 for v in res["per_video"])
  assert (out / "dose.png").stat().st_size > 0 and "| sink | 2 |" in (out / "dose.md").read_text()
  for bad, word in ((["--biases", "x"], "--biases"), (["--biases", "inf"], "--biases"), (["--modes", "none"], "no anchor"), (["--multiple", "0.5"], "--multiple")):
    p = _asvd("eval", "dose", "--models", str(models), *bad, "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and word in p.stderr and "Traceback" not in p.stderr, (bad, p.stderr[-500:])
