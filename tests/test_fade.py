"""Where the look is lost (asvd/eval/fade.py): the samplers reach a known target exactly, so the
contrast they report is the target's, and a student's rollout is measured per chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import asvd
from asvd.data import panworld as pw
from asvd.eval import fade, report
from asvd.models import pixel_codec

SMALL = ["--config.model.dim=32", "--config.model.ffn_dim=64", "--config.model.num_layers=1", "--config.model.freq_dim=32"]
PROMPTS = list(report.PROMPTS[:3])


def _flow_to(target):
  """A denoiser whose flow points at `target` from anywhere: `v = (x - target) / sigma`."""

  def predict(x, t, text):
    return (x - target) / (jnp.asarray(t) / 1000.0)[..., None, None, None]

  return predict


@pytest.fixture(scope="module")
def setup():
  cfg = asvd.load_config("configs/panworld.py", SMALL)
  codec = pixel_codec.from_config(cfg)
  h = int(cfg.train.horizon_frames)
  clips = report.real_clips(PROMPTS, h, 16, 16, seed=5, **pw.world(cfg))
  return cfg, codec, jnp.asarray(codec.encode(clips.astype(np.float32) / 127.5 - 1.0))


def test_samplers_reach_the_target_exactly(setup):
  cfg, _, x0 = setup
  noise = jax.random.normal(jax.random.key(0), (4, *x0.shape))
  np.testing.assert_allclose(np.asarray(fade.few_step_sample(_flow_to(x0), None, noise, [1.0, 0.75, 0.5, 0.25])), np.asarray(x0), atol=1e-5)
  sig = np.linspace(1.0, 0.0, 9)
  np.testing.assert_allclose(np.asarray(fade.ode_sample(_flow_to(x0), None, None, noise[0], sig, 3.0)), np.asarray(x0), atol=1e-4)


def test_teacher_look_is_the_look_of_what_it_samples(setup):
  """Samples that are real clips keep the real contrast; samples that are each clip's spatial
  mean (a posterior mean with the texture averaged away) keep none."""
  cfg, _, x0 = setup
  for method in ("ode", "few_step"):
    real = fade.teacher_look(_flow_to(x0), cfg, PROMPTS, [0, 1], method=method)
    assert real["contrast"].shape == (6, int(cfg.train.horizon_frames))
    assert real["contrast"].mean() == pytest.approx(1.0, abs=0.3) and real["sharpness"].mean() == pytest.approx(1.0, abs=0.3)
    flat = fade.teacher_look(_flow_to(jnp.broadcast_to(x0.mean((2, 3), keepdims=True), x0.shape)), cfg, PROMPTS, [0], method=method)
    assert flat["contrast"].max() < 0.3 and flat["sharpness"].max() < 0.1
  with pytest.raises(ValueError, match="method"):
    fade.teacher_look(_flow_to(x0), cfg, PROMPTS, [0], method="ddim")


def test_rollout_look_per_chunk(setup):
  cfg = setup[0]
  look = fade.rollout_look(asvd.init_dit(cfg.model, jax.random.key(0)), cfg, PROMPTS, [0, 1], chunks=3)
  assert look["contrast"].shape == (6, 3) and np.isfinite(look["contrast"]).all() and (look["sharpness"] > 0).all()
