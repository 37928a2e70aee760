"""Test setup: 8 fake CPU devices for mesh tests; absl flags parsed for grain workers."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


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
