#!/usr/bin/env bash
# Create .venv-sdk: horde-sdk from PyPI, unmodified, for the compatibility tests (tests/sdk/).
# horde-sdk needs Python >= 3.12 (on 3.11 pip quietly installs an old 0.18), the horde runs on
# 3.11, so the SDK gets an environment of its own. Set HORDE_SDK_PYTHON to choose the interpreter;
# otherwise the first Python >= 3.12 found on PATH or under pyenv is used. Without one, it says so
# and the SDK tests are skipped (they fail instead when CI is set).
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=tests/sdk/requirements.txt

is_312() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }

find_python() {
  local candidate
  for candidate in "${HORDE_SDK_PYTHON:-}" python3.12 python3.13 \
      "$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python 2>/dev/null | sort -V | tail -1)"; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 && is_312 "$candidate"; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

if [ -x .venv-sdk/bin/python ] && is_312 .venv-sdk/bin/python \
    && cmp -s "$requirements" .venv-sdk/requirements.installed; then
  exit 0  # up to date
fi
if ! python=$(find_python); then
  echo "warning: no Python >= 3.12 found (set HORDE_SDK_PYTHON): the horde-sdk compatibility tests will be skipped" >&2
  exit 0
fi
rm -rf .venv-sdk
"$python" -m venv .venv-sdk
.venv-sdk/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv-sdk/bin/python -m pip install -q -r "$requirements" 2>&1 | grep -v '^WARNING: Location' || true
.venv-sdk/bin/python -c 'import horde_sdk' || { echo "error: installing horde-sdk into .venv-sdk failed" >&2; exit 1; }
cp "$requirements" .venv-sdk/requirements.installed
