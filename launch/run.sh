#!/usr/bin/env bash
# Sets everything up (venv + asvd) and runs the main job: the bundled adaptive-state PanWorld model
# (asvd/assets/panworld, trained by launch/panworld_bundle.py; no download) generates a video of 6x its
# training horizon for the default caption -> out/panworld/video.mp4 + frames.png, then
# `asvd eval motion` measures every bundled anchor mode against the captions' true camera motion ->
# out/panworld-eval/eval.md (+ eval.json and plots).
# Usage: bash launch/run.sh [extra `asvd generate` args, e.g. --prompt "camera pans up slowly over a green meadow"]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh ""
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
asvd generate "$@"
asvd eval motion --out out/panworld-eval
