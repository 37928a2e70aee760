"""The environment of the `asvd` processes that the tests start."""

import os

# The `asvd` processes compile with XLA:CPU's older elemental emitters: ~1.4x faster compiles
# than its MLIR fusion emitters (a training test: 28 -> 19.5 s on an AVX2 EPYC), and the suite is
# compile-bound. The tests' own process keeps XLA's defaults, the emitters users get: the two
# may round differently, and the bitwise properties (`rollout == stream`) are tested in-process.
# (libtpu rejects --xla_cpu_* flags; `asvd aot` hides them from it, tested in test_aot.py.)
XLA_FLAGS = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": XLA_FLAGS}
