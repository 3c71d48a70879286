#!/usr/bin/env bash
# The run command: sets everything up on a fresh machine, then runs the whole horde
# (API, ledger and a demo worker) with `horde up`. Extra arguments go to `horde up`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/horde up "$@"
