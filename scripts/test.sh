#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, then runs the default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0          # the CPU build (see README)
python3 -m pip install -q -e ".[test]"
python3 -m pytest -q -n 2 --dist loadfile tests "$@"
