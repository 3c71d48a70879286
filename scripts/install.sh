#!/usr/bin/env bash
# Create .venv and install the horde with its worker and test extras.
# torch is pinned through .ci/constraints.txt (the CPU build on this machine's disk); elsewhere,
# set HORDE_TORCH_CONSTRAINTS to your own constraints file, or to an empty file for the default build.
set -euo pipefail
cd "$(dirname "$0")/.."
constraints="${HORDE_TORCH_CONSTRAINTS:-.ci/constraints.txt}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -c "$constraints" -e '.[worker,test]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c 'import torch, diffusers, transformers, fastapi, aio_pika, pika, sqlalchemy' \
  || { echo "error: installing the horde's dependencies failed" >&2; exit 1; }
