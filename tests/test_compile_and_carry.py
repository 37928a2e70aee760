"""Compile once across calls; the caller's carry is never donated away."""

import collections
import contextlib
import os

import jax
import numpy as np
import pytest
from jax import monitoring
from rollout_helpers import rcfg

import asvd
from asvd import transition as tr

_COMPILES = collections.Counter()
_NAMES = ("rollout_segment", "transition_chunk", "transition_step", "prompt_kv", "decode_chunk")


def _listener(event, duration, fun_name=None, **kw):
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES[fun_name] += 1


monitoring.register_event_duration_secs_listener(_listener)


@contextlib.contextmanager
def compiles():
  """Counts XLA compilations of asvd's programs (by function name) inside the block."""
  before = _COMPILES.copy()
  got = collections.Counter()
  yield got
  for k, v in _COMPILES.items():
    if any(n in k for n in _NAMES) and v - before[k]:
      got[k.removeprefix("jit(").removesuffix(")")] = v - before[k]


@pytest.fixture(scope="module")
def ctx():
  # 13 tokens (padded to text_len inside): a prompt shape no other test uses, so prompt_kv is cold.
  return np.random.default_rng(0).standard_normal((1, 13, 32)).astype(np.float32)


def cold(cfg, **kw):
  """A rollout config with a latent size no other test uses, so the program cache is cold."""
  return rcfg(cfg, latent_hw=(8, 14), **kw)


def test_rollout_and_stream_compile_once_across_calls(cfg, ctx):
  model = asvd.init_dit(cfg.model, 11)
  rc = cold(cfg)
  with compiles() as n:
    jax.block_until_ready(asvd.rollout(model, ctx, 0, num_chunks=3, config=rc))
    jax.block_until_ready(asvd.rollout(model, ctx, 1, num_chunks=5, config=rc))  # another length, seed
  assert n == {"rollout_segment": 1, "prompt_kv": 1}, n
  with compiles() as n:
    for _ in range(2):
      for lat in asvd.stream(model, ctx, 0, num_chunks=3, config=rc):
        jax.block_until_ready(lat)
  assert n == {"transition_chunk": 1}, n
  reloaded = asvd.init_dit(cfg.model, 12)  # same graph, other weights: same programs
  with compiles() as n:
    jax.block_until_ready(asvd.rollout(reloaded, ctx, 0, num_chunks=2, config=rc))
  assert n == {}, n


def test_memory_preflight_compiles_the_program_that_runs(cfg, ctx):
  """The pre-flight compiles the rollout's program ahead of its first call (asvd.memory); when
  it stops a rollout nothing runs, and the next call runs that very executable."""
  model = asvd.init_dit(cfg.model, 15)
  rc = cold(cfg, anchor="ema")
  with compiles() as n:
    with pytest.raises(asvd.OutOfMemoryError, match="the rollout transition needs"):
      asvd.rollout(model, ctx, 0, num_chunks=2, config=rc, memory_check=1e-4)
    jax.block_until_ready(asvd.rollout(model, ctx, 0, num_chunks=2, config=rc))
  assert n == {"rollout_segment": 1}, n  # (prompt_kv for this shape: compiled above)


@pytest.mark.parametrize("kind", ["wan", "taehv"])
def test_decoder_preflight_compiles_the_programs_that_run(kind):
  """`pipeline.check_decoder_memory`: below the decoder's need it is one error naming the
  decoder's program, before anything is decoded; otherwise the first- and later-chunk programs
  it compiles are the ones a streaming decode then runs (no second compile)."""
  from asvd import pipeline

  if kind == "wan":
    from asvd.models import vae as vae_lib

    c = 4
    vae = vae_lib.init_vae(dict(base_dim=8, z_dim=c, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[True], latents_mean=[0.0] * c, latents_std=[1.0] * c), jax.random.key(3))
  else:
    from asvd.models.taehv import TAEHVConfig, init_taehv

    vae = init_taehv(TAEHVConfig(decoder_channels=(16, 8, 8, 8), encoder_channels=8))
    c = vae.latent_channels
  shape = (1, 3, 5, 7, c)  # a latent size no other test decodes: cold programs
  name = "Wan VAE" if kind == "wan" else "TAEHV"
  with pytest.raises(asvd.OutOfMemoryError, match=f"decode: the {name}'s first-chunk program needs"):
    pipeline.check_decoder_memory(vae, shape, setting=1e-6)
  z = np.random.default_rng(0).standard_normal((3, *shape)).astype(np.float32)
  with compiles() as n:
    pipeline.check_decoder_memory(vae, shape)
  assert sum(n.values()) == 1, n  # the later-chunk program (the first one compiled above)
  with compiles() as n:
    frames = list(pipeline.decode_stream(vae, list(z)))
  assert n == {}, n
  assert [f.shape[0] for f in frames] == [vae.num_pixel_frames(3), *[vae.num_pixel_frames(3, first=False)] * 2]


def test_make_transition_compiles_once_across_calls(cfg, ctx):
  model = asvd.init_dit(cfg.model, 13)
  rc = cold(cfg, anchor="sink")
  with compiles() as n:
    for _ in range(2):
      state, cache, step = asvd.make_transition(model, ctx, config=rc)
      noise = np.zeros(tr.noise_shape(step.layout, 1, 16), np.float32)
      for _ in range(3):
        state, cache, frames = step(state, cache, noise)
      jax.block_until_ready(frames)
  assert n == {"transition_step": 1}, n  # prompt_kv for this shape was compiled by the test above


def test_orbax_checkpoint_compiles_once(cfg, ctx, tmp_path):
  asvd.save_dit(asvd.init_dit(cfg.model, 14), tmp_path / "ck")
  model = asvd.load_dit(tmp_path / "ck")
  with compiles() as n:
    for lat in asvd.stream(model, ctx, 0, num_chunks=3, config=cold(cfg, anchor="none")):
      jax.block_until_ready(lat)
  assert n["transition_chunk"] == 1, n  # committed params and carry: one placement, one program


def test_persistent_compilation_cache_flag(tmp_path):
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  cache = tmp_path / "xla_cache"
  args = [sys.executable, "-m", "asvd.main", "generate", "--config", "configs/tiny.py", "--init", "random", "--chunks", "1", f"--config.runtime.compilation_cache_dir={cache}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  p = subprocess.run([*args, "--out", str(tmp_path / "a")], capture_output=True, text=True, env=env)
  assert p.returncode == 0, p.stderr[-2000:]
  assert cache.is_dir() and any(cache.iterdir())  # compiled programs were written there


_ELEMENTAL = "--xla_cpu_use_fusion_emitters=false"


def test_two_continuations_from_one_carry(cfg, model, ctx):
  if _ELEMENTAL in os.environ.get("XLA_FLAGS", ""):
    # `stream == rollout` bit for bit is a claim about the programs users get, compiled by XLA's
    # default CPU emitters; this process compiles with the elemental ones (tests/conftest.py),
    # which round this prefilled stream an ulp apart. So the test runs in a process that does not.
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"].replace(_ELEMENTAL, "--xla_cpu_use_fusion_emitters=true")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::test_two_continuations_from_one_carry"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert p.returncode == 0 and "1 passed" in p.stdout, p.stdout[-3000:]
    return
  rc = cfg.rollout
  given = jax.random.normal(jax.random.key(5), (1, 4, 8, 8, 16))
  carry = asvd.prefill(model, ctx, given, config=rc)
  a, carry_a = asvd.rollout(model, ctx, 3, num_chunks=2, config=rc, carry=carry)
  b, carry_b = asvd.rollout(model, ctx, 3, num_chunks=2, config=rc, carry=carry)  # the same carry again
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  chex_equal = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), carry_a, carry_b)
  assert all(jax.tree.leaves(chex_equal))
  s = list(asvd.stream(model, ctx, 3, num_chunks=2, config=rc, carry=carry))
  np.testing.assert_array_equal(np.concatenate([np.asarray(x) for x in s], axis=1), np.asarray(a))
  assert not any(x.is_deleted() for x in jax.tree.leaves(carry))  # still the caller's
  # A rollout's own returned carry can be continued twice as well.
  c1, _ = asvd.rollout(model, ctx, 4, num_chunks=1, config=rc, carry=carry_a)
  c2, _ = asvd.rollout(model, ctx, 4, num_chunks=1, config=rc, carry=carry_a)
  np.testing.assert_array_equal(np.asarray(c1), np.asarray(c2))
