#!/usr/bin/env bash
# Issue 17's (and 16's) measurements in one device call (H200; torch 2.11, transformers 5.17 preinstalled; no network).
# Usage, from the repository root:  ATTNSWAP_COMMIT=<sha> scripts/gpu_issue17.sh [RUN_CONFIG.yaml ...]
#   1. the CUDA tests (pytest -m cuda; CUDA_TESTS names files, default all)  -> runs/cuda_tests.txt
#   2. bench-kernel to 64k (BENCH_CONFIG, default configs/experiments/bench_kernel_64k.yaml) -> runs/bench_kernel_64k/
#   3. scripts/distill_speed.py (whole / checkpointed / fused KL, compiled model) -> runs/distill_speed/
#   4. each RUN_CONFIG through `attnswap run`, its distill.max_seconds cut to the time left -> runs/<name>/
# SPEED_ARGS replaces step 3's arguments (default --batch-sizes 8,32,64 --curve-steps 150), SPEED_TIMEOUT its 240 s.
# STEPS may also name "far": scripts/probe_far_keys.py (FAR_ARGS, FAR_TIMEOUT default 240 s) -> runs/far_keys/.
# Environment passes through: TORCHINDUCTOR_MAX_AUTOTUNE=1 STEPS=bench BENCH_CONFIG=configs/experiments/
# bench_kernel_flex_autotune.yaml times flex with inductor's tile autotuning.
# STEPS (default "tests bench speed runs") picks the steps: all four take longer than one device call's 10 minutes,
# so split them, e.g. STEPS="tests bench" then STEPS="speed runs".
# fla-core travels as a wheel in .whl/ (here: `pip download --no-deps fla-core==0.6.0 -d .whl`, .whl/ ignored by git;
# name it in the device call's carry). Results (no weights) are packed into $OUT/results.tar.gz; `BUDGET_S` (default
# 570) bounds the whole script, TEST_TIMEOUT and BENCH_TIMEOUT (default 240 and 300 s) its first two steps: compiling
# FlexAttention's backward and autotuning fla's kernels take tens of seconds per shape.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
budget=${BUDGET_S:-570}
left() { echo $(( budget - (SECONDS - started) )); }
steps=" ${STEPS:-tests bench speed runs} "
want() { [[ "$steps" == *" $1 "* ]]; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/out}; mkdir -p "$OUT" runs
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  python3 -c "import fla; print('fla-core', fla.__version__)" 2>/dev/null || echo "fla-core: not installed"
} | tee runs/gpu.txt
want tests && timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -m cuda ${CUDA_TESTS:-tests/} 2>&1 | tee runs/cuda_tests.txt | tail -n 25
if want bench; then
bench_config=${BENCH_CONFIG:-configs/experiments/bench_kernel_64k.yaml}
timeout "${BENCH_TIMEOUT:-300}" python3 -m attnswap.cli bench-kernel --config "$bench_config" --device cuda \
  > runs/log-bench_kernel_64k.txt 2>&1; echo "bench rc=$?"
BENCH_OUT=$(awk '/^out:/ {print $2}' "$bench_config") python3 - <<'PY'
import json, os
for line in open(os.path.join(os.environ["BENCH_OUT"], "kernel_results.jsonl")):
    r = json.loads(line)
    if r["mode"] == "forward+backward" and r["status"] == "ok":
        print(f'{r["variant"]:28s} {r["length"]:6d} {1e3 * (r.get("graph_median_s") or r["median_s"]):8.2f} ms  x{r.get("graph_speedup") or r.get("speedup") or 0:.2f}')
PY
fi
want far && timeout "${FAR_TIMEOUT:-240}" python3 scripts/probe_far_keys.py ${FAR_ARGS:-} --out runs/far_keys 2>&1 \
  | grep -v -i warn | tail -n 30
want speed && timeout "${SPEED_TIMEOUT:-240}" python3 scripts/distill_speed.py ${SPEED_ARGS:---batch-sizes 8,32,64 --curve-steps 150} --out runs/distill_speed 2>&1 \
  | grep -v -i warn | tail -n 10
want runs && for config in "$@"; do
  name=$(basename "$config" .yaml)
  limit=$(( $(left) - 25 ))
  if (( limit < 120 )); then echo "skipped $config: ${limit}s left"; continue; fi
  cap=$(( limit - 80 )); own=$(awk '/^  max_seconds:/ {print int($2)}' "$config")
  if [[ -n "$own" ]] && (( own < cap )); then cap=$own; fi  # never more than the config's own limit
  sed -E "s/^(  max_seconds:).*/\1 $cap/" "$config" > "runs/$name.yaml"
  grep max_seconds "runs/$name.yaml"
  timeout "$limit" python3 -m attnswap.cli run "runs/$name.yaml" --device cuda > "runs/log-$name.txt" 2>&1
  echo "$config rc=$?"; tail -n 3 "runs/log-$name.txt"
done
find runs -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.csv' -o -name '*.md' -o -name '*.png' -o -name '*.txt' -o -name '*.yaml' \) \
  -not -path '*/model/*' -size -4M | tar czf "$OUT/results.tar.gz" -T -
