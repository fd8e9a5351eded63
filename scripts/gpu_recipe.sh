#!/usr/bin/env bash
# Issue 16's GPU experiments through the device tool (H200, torch 2.11, transformers 5.17 preinstalled; no network).
# Usage: ATTNSWAP_COMMIT=<sha> scripts/gpu_recipe.sh CONFIG.yaml [CONFIG.yaml ...]   (each an `attnswap run` config;
# ATTNSWAP_COMMIT names the commit in the results, as the GPU copy's own git metadata can be stale)
# Results (no weights) are packed into $OUT/results-recipe.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/out}; mkdir -p "$OUT" runs
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee runs/gpu.txt
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a runs/gpu.txt
for config in "$@"; do
  name=$(basename "$config" .yaml)
  echo "== $config"
  /usr/bin/time -f "%e s" python3 -m attnswap.cli run "$config" --device cuda > "runs/log-$name.txt" 2>&1
  echo "rc=$?"; tail -n 4 "runs/log-$name.txt"
done
find runs -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.csv' -o -name '*.md' -o -name '*.png' -o -name '*.txt' -o -name '*.yaml' \) \
  -not -path '*/model/*' -size -4M | tar czf "$OUT/results-recipe.tar.gz" -T -
