#!/usr/bin/env bash
# Runs one `asvd` command on every worker of a Cloud TPU VM slice (v4/v5e/v5p/v6e pods): the
# same command on each worker, setup included; jax.distributed finds the other workers from the
# TPU environment by itself (`--distributed auto`, the default).
#
# Usage (from your machine, with gcloud configured):
#   TPU=my-v5p-32 ZONE=us-east5-a REPO=https://github.com/you/asvd.git \
#     bash launch/tpu_pod.sh train --config configs/wan_t2v_1_3b.py --workdir gs://bucket/runs/a \
#       --config.mesh.fsdp=-1 --config.train.data.data_dir=gs://bucket/data
# Check first that the programs fit: `asvd aot --config ... --topology v5p:2x2x4` on any machine.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
repo="${REPO:-https://github.com/asvd-project/asvd.git}"
ref="${REF:-main}"
args=$(printf '%q ' "$@")
setup="set -e; if [ ! -d asvd ]; then git clone -q $repo asvd; fi; cd asvd && git fetch -q && git checkout -q $ref"
setup="$setup && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "$setup && JAX_PLATFORMS=tpu .venv/bin/asvd $args"
