#!/usr/bin/env bash
# The main job: installs x2sam_jax on a fresh machine, then runs the end-to-end demo
# (synthetic data -> Grain pipeline -> tiny X2SAM -> IoU, overlays, checkpoint round trip).
# Arguments go to the demo, e.g. `bash scripts/main.sh --out runs/demo2 --num-images 80`.
# Outputs: runs/demo/{data, overlays, checkpoint, summary.json}.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0          # the CPU build (a looser pin pulls CUDA wheels)
python3 -m pip install -q -e .
python3 -m x2sam_jax.demo "$@"
