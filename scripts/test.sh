#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, then runs the default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0          # the CPU build (see README)
python3 -m pip install -q -e ".[test]"
# The web demo's browser test drives Debian's headless Chromium (it skips, saying why, without one).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # the package lists of the image first (no update: ~20 s less); stale lists: update, then again
    install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }
    install 2>/dev/null || { apt-get update -qq && install; }
  else
    echo "not installing chromium + chromium-driver (needs root and apt-get): the browser test will skip"
  fi
fi
python3 -m pytest -q -n 2 --dist loadfile tests "$@"
