#!/usr/bin/env bash
# Sets everything up (venv + asvd) and runs the main job. Until the bundled model exists this is a
# random-weight smoke run of the streaming adaptive-state generator (tiny config): it streams
# CHUNKS chunks through the jitted transition and writes latents + an attention-share plot.
# Usage: bash launch/run.sh [OUT_DIR] [extra `asvd generate` args, e.g. --config.rollout.anchor=sink]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh ""
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
out="${1:-out/demo}"; shift || true
asvd generate --config configs/tiny.py --init random --chunks "${CHUNKS:-8}" --seed 0 --out "$out" "$@"
asvd eval attention --config configs/tiny.py --init random --chunks 6 --out "$out" "$@"
