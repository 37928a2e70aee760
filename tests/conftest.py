"""Test setup: 8 fake CPU devices for mesh tests; absl flags parsed for grain workers."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tiny test programs spend ~30x longer in XLA's compiler than running, so the tests (and
# the `asvd` subprocesses they start, which inherit XLA_FLAGS) compile without LLVM's backend
# optimizations: ~2.5x faster compiles; no fast-math either way, but float order may differ by
# an ulp between two programs (tests/test_taehv.py compares chunked vs whole decodes to 1e-6). A
# flag the user set wins.
_xla = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _xla:
  _xla += " --xla_backend_optimization_level=0"
# and with XLA:CPU's older elemental emitters: ~1.4x faster compiles than its MLIR fusion
# emitters (a training test: 28 -> 19.5 s on an AVX2 EPYC). They round a few programs apart by
# an ulp where the default emitters agree bit for bit (a stream from a prefilled carry vs the
# rollout): that test runs in a child process with the default emitters
# (tests/test_compile_and_carry.py; a flag set here wins, as above).
# (libtpu rejects --xla_cpu_* flags; `asvd aot` hides them from it: tests/test_aot.py.)
if "xla_cpu_use_fusion_emitters" not in _xla:
  _xla += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (_xla + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One XLA compilation cache for this test session, shared by the many `asvd` subprocesses the
# CLI / training / multi-process tests start with the same tiny programs (each would otherwise
# compile them again). Removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  import tempfile  # noqa: E402

  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="asvd-test-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
# Every program goes into it, not only those that took over a second to compile (JAX's default):
# the tiny programs compile in less at -O0, yet the subprocesses rebuild dozens of them.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Full f32 matmuls for parity, here and in the subprocesses.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# libtpu (only describing TPU slices to compile for them, tests/test_aot.py, test_dit.py) takes a
# machine-wide lock by default; the test workers and their subprocesses load it concurrently.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])  # jax may be imported already

# launch/test.sh runs the files on pytest-xdist workers, a whole file per worker (`--dist
# loadfile`: a file's compiled programs and module fixtures are built once, on one worker). The
# longest files start first so that the workers finish together (measured on 2 cores).
_LONGEST_FIRST = (
  "test_train.py",
  "test_t2v_e2e.py",
  "test_transition.py",
  "test_dit.py",
  "test_train_rollout.py",
  "test_multiprocess.py",
  "test_train_anchors.py",
  "test_sharding.py",
  "test_train_steps.py",
  "test_aot.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(scope="module")
def cfg():
  """The tiny config (configs/tiny.py)."""
  import asvd  # noqa: PLC0415

  return asvd.load_config("configs/tiny.py")


@pytest.fixture(scope="module")
def model(cfg):
  """A random tiny WanDiT (seed 0)."""
  import asvd  # noqa: PLC0415

  return asvd.init_dit(cfg.model, jax.random.key(0))


@pytest.fixture(scope="module")
def context():
  """A random text context `[2, 16, 32]` (the tiny model's text length and width)."""
  return jax.random.normal(jax.random.key(1), (2, 16, 32))


@pytest.fixture(scope="module")
def tiny(cfg):
  """`(cfg, layout, batch)`: the tiny config, its training layout and a batch of 2 synthetic clips."""
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from asvd.data.synthetic import caption_embedding, config_for, make_clip  # noqa: PLC0415
  from asvd.train import trainer  # noqa: PLC0415

  rng = np.random.default_rng(0)
  c = config_for(9, 8, 8, 16, 16, 32, 2, 0)
  batch = {
    "latents": jnp.asarray(np.stack([make_clip(rng, c, i) for i in (0, 5)])),
    "text": jnp.asarray(np.stack([caption_embedding(i, 16, 32) for i in (0, 5)])),
  }
  return cfg, trainer.layout(cfg), batch
