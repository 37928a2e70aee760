#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs what is missing.
#
# Usage: source launch/env.sh [EXTRAS]   e.g. `source launch/env.sh torch,test`
# Idempotent: a stamp file records the hash of setup.cfg + extras; pip runs only when it changed.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="${ASVD_VENV:-$_root/.venv}"
_extras="${1:-}"
_py="${PYTHON:-python3}"

if [ ! -x "$_venv/bin/python" ]; then
  echo "[asvd] creating virtual environment at $_venv" >&2
  "$_py" -m venv "$_venv"
fi
_spec="."
[ -n "$_extras" ] && _spec=".[${_extras}]"
_hash="$(cat "$_root/setup.cfg" "$_root/pyproject.toml" | sha256sum | cut -c1-16)-${_extras}"
_stamp="$_venv/.asvd-installed"
if ! grep -qxF "$_hash" "$_stamp" 2>/dev/null; then
  echo "[asvd] installing asvd$([ -n "$_extras" ] && echo "[$_extras]") into $_venv" >&2
  "$_venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  # torch==2.13.0 resolves to the local CPU wheel; PIP_EXTRA_INDEX_URL lets a CUDA box add its index.
  (cd "$_root" && "$_venv/bin/python" -m pip install -q -e "$_spec")
  echo "$_hash" >> "$_stamp"
fi
export PATH="$_venv/bin:$PATH"
export VIRTUAL_ENV="$_venv"
