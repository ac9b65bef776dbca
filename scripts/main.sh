#!/usr/bin/env bash
# The main job: installs x2sam_jax on a fresh machine, then trains a tiny X2SAM on the built-in
# synthetic dataset and evaluates it on held-out synthetic data (a CPU is enough; the config's
# docstring says what it reaches and how long it took).
#
#   data (runs/main/data) -> train.py (Grain -> jitted sharded steps -> Orbax checkpoints, runs/main)
#   -> eval.py (runs/main/eval: results.json, results.md, overlays/) -> the results table.
#
# Re-running continues an interrupted training from its last checkpoint (the log says from which
# step); after a finished training it only re-evaluates. Arguments are config overrides given to
# both train.py and eval.py, e.g. `bash scripts/main.sh --config.steps=200`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0          # the CPU build (a looser pin pulls CUDA wheels)
python3 -m pip install -q -e .

RUN=runs/main
CONFIG=configs/x2sam_tiny_synthetic.py
TASKS=coco_panoptic,refcoco,coco_vgd,ref_ytvos,ytvos   # image generic, referring, VGD; video referring, object
# Compiled programs persist across runs: a resumed training and the evaluation skip recompiling.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$RUN/jax_cache}"

python3 train.py --config "$CONFIG" --workdir "$RUN" --config.data_root="$RUN/data" "$@"
python3 eval.py --config "$CONFIG" --checkpoint "$RUN" --output "$RUN/eval" --tasks "$TASKS" --visualize 4 \
    --headline --config.data_root="$RUN/data" "$@"
