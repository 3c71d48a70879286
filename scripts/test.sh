#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, then runs the whole suite against
# real PostgreSQL, real RabbitMQ and tiny real diffusers pipelines. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
bash scripts/install.sh
bash scripts/install-sdk.sh  # horde-sdk (Python >= 3.12) for the compatibility tests
bash scripts/install-browser.sh  # Chromium for the admin page's browser tests
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
