#!/usr/bin/env bash
# The same experiments for real GPT-2 (124M) on wikitext-2-raw-v1, for a user with network access and a CUDA GPU.
# Each command is an `attnswap` command with the committed experiment configs, pointed at the hub model and data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/pip install -q 'datasets>=3,<5'
A=".venv/bin/attnswap"
EVAL="--eval {dtype: bfloat16, batch_size: 8, context: 1024, stride: 512, gen_tokens: 0, data: wikitext-2-raw-v1}"
$A eval --model gpt2 --data wikitext-2-raw-v1 --device cuda --dtype bfloat16 --batch_size 8 --context 1024 --stride 512 \
  --gen_tokens 0 --out runs/gpt2/anchor
$A run configs/experiments/window_sweep.yaml --runs untrained --model gpt2 --device cuda --out runs/gpt2/window_sweep \
  "$EVAL"
for run in windows rest fp32; do
  $A run configs/experiments/distill_compare.yaml --runs "$run" --model gpt2 --device cuda --out runs/gpt2/distill_compare "$EVAL" \
    --distill "{steps: 100, batch_size: 8, seq_len: 1024, lr: 0.0005, warmup_steps: 10, trainable: variant+attn, l1: 0.01, data: wikitext-103-raw-v1, val_data: "wikitext-2-raw-v1:validation"}"
done
$A bench --config configs/experiments/bench_gpt2_train.yaml --model gpt2 --device cuda --out runs/gpt2/bench_train
$A bench --config configs/experiments/bench_rope_long.yaml --model gpt2 --device cuda --out runs/gpt2/bench_rope_long
$A report runs/gpt2 --out runs/gpt2/report
