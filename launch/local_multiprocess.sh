#!/usr/bin/env bash
# N processes of one `asvd` command on this machine, joined by jax.distributed through a
# coordinator on 127.0.0.1 (what a multi-host run does, on one host: for testing sharding and
# multi-process code paths before a pod or a cluster). Each process sees DEVICES CPU devices
# (or set CUDA_VISIBLE_DEVICES per process yourself on a GPU box).
#
# Usage: NPROC=2 DEVICES=2 bash launch/local_multiprocess.sh train --config configs/tiny.py \
#          --workdir runs/mp --config.mesh.data=2 --config.mesh.fsdp=2
# Logs: process 0 prints to the terminal, the others to $LOGDIR/process_<i>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v asvd > /dev/null || source launch/env.sh ""  # inside a venv with asvd: use it
nproc="${NPROC:-2}"
port="${PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
logdir="${LOGDIR:-$(mktemp -d)}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES:-2}"
pids=()
for ((i = 1; i < nproc; i++)); do
  asvd "$@" --coordinator "127.0.0.1:$port" --num-processes "$nproc" --process-id "$i" > "$logdir/process_$i.log" 2>&1 &
  pids+=("$!")
done
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
asvd "$@" --coordinator "127.0.0.1:$port" --num-processes "$nproc" --process-id 0 || status=$?
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
[ "$status" -eq 0 ] || echo "[asvd] a process failed (exit $status); logs of processes 1..: $logdir" >&2
exit "$status"
