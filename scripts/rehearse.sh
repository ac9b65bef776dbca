#!/usr/bin/env bash
# Rehearses the real X2SAM recipe end to end on a CPU: the shipped configs/x2sam_4b_stage1.py and
# configs/x2sam_4b_stage3.py, overriding only the model size (the tiny preset and tokenizer; a
# global batch of 8 images / 16 clips; 1024 loss points, one per pixel of the tiny 32x32 mask grid
# instead of 12,544) and data.root (a miniature of every dataset in the official datas/ layout,
# x2sam_jax.data.miniature):
#
#   stage 1 (SA-1B) trains and checkpoints -> stage 3 (the 27-source mix) initialises from it,
#   evaluates in the loop, is killed with -9 and resumed by the same command (its losses must equal
#   an uninterrupted run's) -> eval.py over stage 3's evaluation section (every benchmark of the
#   paper's Table 6; submission archives for the withheld splits).
#
#   bash scripts/rehearse.sh [OUT] [mesh|processes]
#
# mesh: one process with 8 simulated devices (fsdp=8). processes: 2 processes x 4 devices
# (jax.distributed on localhost), each saving and restoring its part of every checkpoint.
# Run again on the same OUT, it keeps the miniature and the finished stage-1 and reference runs
# (train.py returns at once on a finished workdir) and redoes the kill -9 / resume and eval.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/rehearsal}
MODE=${2:-mesh}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export JAX_PLATFORMS=cpu JAX_COMPILATION_CACHE_DIR="$OUT/jax_cache"
[ -d "$OUT/datas" ] || python3 -m x2sam_jax.data.miniature --root "$OUT/datas"

SMALL=(--config.model.preset=tiny --config.data.root="$OUT/datas" --config.data.global_batch_images=8
       --config.data.global_batch_clips=16 --config.data.num_workers=0 --config.max_programs=0
       --config.fast_compile=True --config.log_every=1 --config.checkpoint_every=2 --config.loss.num_points=1024)
STAGE3=(--config.model.tokenizer=tiny --config.model.init.stage1="$OUT/stage1" --config.steps=6
        --config.eval_every=3 --config.eval_max_samples=1)

# launch PROGRAM ARGS...: the command on 8 devices of one process, or on 2 processes x 4 devices.
launch() {
  if [ "$MODE" = mesh ]; then
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python3 "$@"
  else
    local port pids=() rc=0
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
    for pid in 0 1; do
      XLA_FLAGS=--xla_force_host_platform_device_count=4 python3 "$@" \
        --config.distributed.coordinator_address="localhost:$port" --config.distributed.num_processes=2 \
        --config.distributed.process_id=$pid > "$OUT/process$pid.log" 2>&1 &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || rc=$?; done
    [ "$rc" = 0 ] || { tail -n 30 "$OUT/process0.log" "$OUT/process1.log"; return "$rc"; }
    tail -n 1 "$OUT/process0.log"
  fi
}

echo "== stage 1 ($MODE)"
launch train.py --config configs/x2sam_4b_stage1.py --workdir "$OUT/stage1" "${SMALL[@]}" --config.steps=4

echo "== stage 3, uninterrupted reference"
launch train.py --config configs/x2sam_4b_stage3.py --workdir "$OUT/stage3_reference" "${SMALL[@]}" "${STAGE3[@]}"

echo "== stage 3, killed with -9 after its checkpoint at step 2, then the same command again"
STAGE3_RUN=(train.py --config configs/x2sam_4b_stage3.py --workdir "$OUT/stage3" "${SMALL[@]}" "${STAGE3[@]}")
rm -rf "$OUT/stage3" "$OUT/eval"
launch "${STAGE3_RUN[@]}" > "$OUT/killed.log" 2>&1 &
first=$!
until [ -d "$OUT/stage3/checkpoints/2" ] && grep -qs '"step": 3' "$OUT/stage3/metrics.jsonl"; do
  kill -0 "$first" 2>/dev/null || { tail -n 30 "$OUT/killed.log"; echo "stage 3 ended before step 3"; exit 1; }
  sleep 2
done
pkill -9 -f -- "--workdir $OUT/stage3 " || true
wait "$first" || true
launch "${STAGE3_RUN[@]}"
python3 - "$OUT" <<'EOF'
import json, sys
def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"{sys.argv[1]}/{run}/metrics.jsonl")) if "loss" in r}
reference, resumed = losses("stage3_reference"), losses("stage3")
assert sorted(resumed) == sorted(reference) == list(range(1, 7)), (sorted(resumed), sorted(reference))
assert resumed == reference, {s: (resumed[s], reference[s]) for s in reference if resumed[s] != reference[s]}
print("resumed run: every logged loss equals the uninterrupted run's:", resumed)
EOF

echo "== eval.py over stage 3's evaluation section"
# GCG answers of at most 32 tokens (the config's 256 cost minutes per dataset of greedy decoding of a
# barely trained model on simulated devices; the chat benchmarks answer in 16 anyway).
launch eval.py --config configs/x2sam_4b_stage3.py --checkpoint "$OUT/stage3" --output "$OUT/eval" \
  --config.data.root="$OUT/datas" --config.eval.max_samples=1 --config.eval.max_new_tokens=32
python3 - "$OUT" <<'EOF'
import json, sys
results = json.load(open(f"{sys.argv[1]}/eval/results.json"))["results"]
print(len(results), "rows:", ", ".join(sorted(results)))
EOF
