#!/usr/bin/env bash
# The GPU experiments, as run through the device tool (H100, torch 2.11, transformers 5.17 preinstalled; no network).
# Usage: scripts/gpu_experiments.sh STAGE
#   1: teacher anchor + untrained window sweep          2: distilled windows/longformer + long-sequence bench
#   3: mixture (bf16, lr 5e-4) + n=1024 train-step bench  4: NSA, Hedgehog (fp32)
#   5: kernel benchmark, calls and CUDA-graph replays   6: Performer m=256 and m=64 (after its epsilon fix)
#   7: distilled window sweep, all 14 settings          8: mixture with its own lr, hardened; Hedgehog with its own lr
# Results (no weights) are packed into $OUT/results-STAGE.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0
OUT=${OUT:-runs/out}; mkdir -p "$OUT" runs
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee runs/gpu.txt
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a runs/gpu.txt
step() { local limit=$1; shift; echo "== $* (limit ${limit}s)"; /usr/bin/time -f "%e s" timeout "$limit" "$@" > "runs/log-$(echo "$*" | tr -c 'a-zA-Z0-9' '_' | cut -c1-80).txt" 2>&1; echo "rc=$?"; }
case "${1:-1}" in
  1)
    step 120 python3 -m attnswap.cli eval --device cuda --dtype bfloat16 --batch_size 8 --context 1024 --stride 512 --gen_tokens 0 --out runs/anchor_gpu_bf16
    step 240 python3 -m attnswap.cli run configs/experiments/window_sweep.yaml --runs untrained --device cuda
    ;;
  2)
    step 420 python3 -m attnswap.cli run configs/experiments/distill_compare.yaml --runs windows --device cuda
    step 110 python3 -m attnswap.cli bench --config configs/experiments/bench_rope_long.yaml --device cuda
    ;;
  3)
    step 290 python3 -m attnswap.cli run configs/experiments/distill_compare.yaml --runs rest --device cuda
    step 170 python3 -m attnswap.cli bench --config configs/experiments/bench_gpt2_train.yaml --device cuda
    ;;
  4)
    step 420 python3 -m attnswap.cli run configs/experiments/distill_compare.yaml --runs fp32 --device cuda
    ;;
  5)
    step 390 python3 -m attnswap.cli bench-kernel --config configs/experiments/bench_kernel_graphs.yaml --device cuda
    ;;
  6)
    step 200 python3 -m attnswap.cli run configs/experiments/distill_compare.yaml --runs performer --device cuda
    step 80 python3 -m attnswap.cli run configs/experiments/distill_compare.yaml --runs performer --variants performer:m=64 --out runs/distill_performer_m64 --device cuda
    ;;
  7)
    step 390 python3 -m attnswap.cli run configs/experiments/window_sweep.yaml --runs distilled --device cuda
    ;;
  8)
    step 200 python3 -m attnswap.cli run configs/experiments/distill_compare.yaml --runs mixture_lr_scale200 --device cuda
    step 150 python3 -m attnswap.cli harden --swapped runs/distill_compare/mixture_lr_scale200/mixture_k10_head/distill/model --rule weight --threshold 0.1 --lengths 1024,8192 --device cuda --out runs/mixture_hardened
    step 90 python3 -m attnswap.cli eval --swapped runs/mixture_hardened/model --device cuda --dtype bfloat16 --batch_size 8 --context 1024 --stride 512 --gen_tokens 0 --edge_cases false --out runs/mixture_hardened/eval
    step 120 python3 -m attnswap.cli run configs/experiments/distill_compare.yaml --runs hedgehog_lr_scale20 --device cuda
    ;;
esac
tail -n 3 runs/log-*.txt
find runs -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.csv' -o -name '*.md' -o -name '*.png' -o -name '*.html' -o -name '*.txt' -o -name '*.yaml' \) \
  -not -path '*/model/*' -size -4M | tar czf "$OUT/results-${1:-1}.tar.gz" -T -
ls -la "$OUT"
