#!/usr/bin/env bash
# Sets everything up (venv + asvd[torch,test,tpu]; libtpu only to compile for TPU slices ahead
# of time, the tests run on CPU) and runs the test suite.  Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh torch,test,tpu
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python -m pytest -q "$@"
