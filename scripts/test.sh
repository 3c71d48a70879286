#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, then runs the whole suite against
# real PostgreSQL, real RabbitMQ and tiny real diffusers pipelines. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
