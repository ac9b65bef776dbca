#!/usr/bin/env bash
# The GPU measurements of issue 27 in one run that ends by itself inside its time budget:
#   1. benchmarks/bench_memory_attention.py at the 4B sizes (64² and 256² query maps): xla,
#      query_chunked and cudnn, attention dropout 0.1 and 0, the bank mask and none;
#   2. benchmarks/bench_train_step.py --x2sam-4b --run: the stage-3 step with random weights,
#      1 image per device at full depth, then (while time is left) 4 images and one 8-frame clip.
# Each writes JSON under $OUT (env.txt, memory_attention.json, step_*.json, log.txt); a step that
# does not fit says so in its JSON ("error") and the script goes on.
#
# The device image has jax (with its CUDA plugin), numpy, scipy, optax, orbax, ... but no registry:
# what it lacks travels as wheels in .whl/ (git-ignored). Prepare them on a machine with pip:
#     bash benchmarks/gpu_check.sh --prepare
# then run it there (the `run` tool of this workplace: carry [".whl"], timeout_s 570):
#     bash benchmarks/gpu_check.sh
# On a CPU machine `GPU_CHECK_SMALL=1 JAX_PLATFORMS=cpu GPU_CHECK_SECONDS=3000 bash
# benchmarks/gpu_check.sh` runs the same steps at tiny sizes (a check of the script, not a measurement).
#
# Settings (environment): GPU_CHECK_SECONDS (total budget, default 540: the run tool's timeout_s
# should be ~30 s more; a smaller budget leaves device time for a second call), GPU_CHECK_ONLY
# (names of the steps to run, e.g. "step_1img": a rerun of what the first call missed), PYTHON
# (default python3), OUT (default ./gpu_check_out). No persistent compilation cache: every
# compile is timed fresh.

# One function, parsed whole before it runs (an edit of this file during a run changes nothing).
main() {
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
WHEELS="ml_collections==1.1.0 pycocotools==2.0.11"

if [[ "${1:-}" == "--prepare" ]]; then
  # The repo's pure-Python pins (and pycocotools, abi3) for the device's Python 3.12, x86-64.
  mkdir -p .whl
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $WHEELS
fi

OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
START=$(date +%s)
BUDGET=${GPU_CHECK_SECONDS:-540}
export PYTHONUNBUFFERED=1 JAX_ENABLE_COMPILATION_CACHE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
unset JAX_COMPILATION_CACHE_DIR

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run NAME SECONDS_AT_MOST COMMAND...: the command under `timeout`, stdout to $OUT/NAME.json, its
# stderr to the log; skipped when less than a minute of the budget is left.
run() {
  local name=$1 most=$2; shift 2
  if [[ -n "${GPU_CHECK_ONLY:-}" && " $GPU_CHECK_ONLY " != *" $name "* ]]; then return; fi
  local limit; limit=$(left)
  (( limit > most )) && limit=$most
  if (( limit < 60 )); then echo "== $name: skipped, ${limit}s left" | tee -a "$LOG"; return; fi
  echo "== $name (at most ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.json.tmp" 2>> "$LOG"
  local rc=$?
  mv "$OUT/$name.json.tmp" "$OUT/$name.json"
  echo "== $name: exit $rc after $(( $(date +%s) - START ))s in total" | tee -a "$LOG"
}

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    .whl/*.whl >> "$LOG" 2>&1 || { echo "installing .whl/ failed (see $LOG)"; exit 1; }
  export PYTHONPATH=/tmp/gpu_check_site:$REPO
else
  echo "no .whl/: using the packages installed here" | tee -a "$LOG"
  export PYTHONPATH=$REPO
fi

{
  date -u; nvidia-smi -L 2>&1 || true
  "$PY" -c "import sys, jax, jaxlib, flax, optax; print(sys.version); \
print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__); \
print(jax.devices()); print([d.device_kind for d in jax.devices()])"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [[ -n "${GPU_CHECK_SMALL:-}" ]]; then
  run memory_attention 300 "$PY" benchmarks/bench_memory_attention.py --small --levels 8 --memory-side 8 \
    --repeats 2 --out "$OUT/memory_attention.partial.json"
  # The tiny preset through the 4B step's path (the 4B itself needs more memory than a shared CPU box).
  run step_1img 900 "$PY" benchmarks/bench_train_step.py --x2sam-4b --run --model tiny --sam-size 128 \
    --patches 64 --seq-len 256 --images-per-device 1 --steps 1 --warmup 1
  run step_clip 900 "$PY" benchmarks/bench_train_step.py --x2sam-4b --run --model tiny --sam-size 128 \
    --patches 64 --seq-len 256 --clip --steps 1 --warmup 0
else
  # The memory attention first, bounded (its levels are kept as they finish); then the 4B step,
  # 1 image per device (the measurement asked for) with what is left, the others if time remains.
  run memory_attention 150 "$PY" benchmarks/bench_memory_attention.py --levels 256 64 --masks bank none \
    --repeats 5 --out "$OUT/memory_attention.partial.json"
  run step_1img 420 "$PY" benchmarks/bench_train_step.py --x2sam-4b --run --images-per-device 1 --steps 5 --warmup 2
  run step_4img 240 "$PY" benchmarks/bench_train_step.py --x2sam-4b --run --images-per-device 4 --steps 3 --warmup 1
  run step_clip 240 "$PY" benchmarks/bench_train_step.py --x2sam-4b --run --clip --steps 3 --warmup 1
fi
# The headline numbers on stdout too (the end of a run's output is what comes back first).
"$PY" - "$OUT" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    whole = path.with_name(path.name.replace(".partial", ""))
    if whole != path and whole.exists() and whole.stat().st_size:   # the partial file only if cut short
        continue
    try:
        result = json.loads(path.read_text() or "{}")
    except ValueError:
        print(path.name, "unreadable"); continue
    if "error" in result:
        print(path.name, "ERROR", result["error"])
    run = result.get("x2sam_4b_run")
    if run and "step_median_s" in run:
        keys = ("step_median_s", "samples_per_s", "mfu", "peak_bytes_in_use_gib", "peak_after_init_gib", "compile_s")
        print(path.name, {k: run.get(k) for k in keys}, run["hlo_kernels"], run["changed_from_4b"])
    for level, data in result.get("levels", {}).items():
        for case, entry in data.get("cases", {}).items():
            print(path.name, level, case, entry.get("median_s"), entry.get("memory", {}).get("temp_mib"),
                  {k: entry["kernels"][k] for k in ("cudnn_fmha_forward", "cudnn_fmha_backward")} if "kernels" in entry
                  else "", entry.get("error") or entry.get("skipped") or "")
PYEOF
echo "done after $(( $(date +%s) - START ))s; files in $OUT" | tee -a "$LOG"
}

main "$@"
