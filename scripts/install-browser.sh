#!/usr/bin/env bash
# Debian's Chromium, for the tests that drive the admin page in a real headless browser.
# Only the test command needs it; `horde up` does not.
set -euo pipefail
# Chromium (Debian's package) drives the admin page's tests in a real headless browser
# (tests/test_admin_page.py). Installed when missing if this runs as root with apt-get; the package
# lists are refreshed only if the first attempt fails (a fresh image has none).
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Chromium (apt-get) for the admin page's browser tests"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
      || { echo "error: installing Chromium failed (apt-get install chromium)" >&2; exit 1; }
  else
    echo "warning: Chromium is missing; the admin page's tests need it: sudo apt-get install chromium" >&2
  fi
fi
