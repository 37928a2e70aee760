#!/usr/bin/env bash
# Sets everything up (venv + asvd[torch,test,tpu]; libtpu only to compile for TPU slices ahead
# of time, the tests run on CPU) and runs the test suite.  Extra args go to pytest.
#
# Test files run on ASVD_TEST_WORKERS pytest-xdist processes (default 2, one per core of the
# CI machine; 0 runs them in this process), a whole file per worker (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh torch,test,tpu
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
workers="${ASVD_TEST_WORKERS:-2}"
par=()
[ "$workers" != "0" ] && par=(-n "$workers" --dist loadfile --no-loadscope-reorder)
# One XLA compilation cache for the whole run, shared by the workers and the `asvd` processes
# the tests start (tests/conftest.py makes one per process when run without this script).
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  JAX_COMPILATION_CACHE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/asvd-test-xla-cache-XXXXXX")"
  export JAX_COMPILATION_CACHE_DIR
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
python -m pytest -q ${par[@]+"${par[@]}"} "$@"
