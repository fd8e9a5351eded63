"""Does Hedgehog's feature floor slow attention transfer? Stage 1 on the bundled teacher, CPU, with a given floor.

    python scripts/diagnose_feature_floor.py 1e-4 30 > benchmarks/results/hedgehog_feature_floor_cpu/floor_1e-4.txt
    python scripts/diagnose_feature_floor.py 0 30 > benchmarks/results/hedgehog_feature_floor_cpu/floor_0.txt
    python scripts/diagnose_feature_floor.py 1e-6 30 > benchmarks/results/hedgehog_feature_floor_cpu/floor_1e-6.txt

Prints (floor, step, attention cross-entropy, output MSE) every 5 steps of a 100-step stage 1 (the first `steps`):
batch 2 x 256 tokens of the distillation text, transfer lr 1e-2, one thread, seed 0 (both runs see the same batches).
"""

import sys

import torch

from attnswap.distill import DistillConfig, build_pair, load_blocks, make_optimizer, start_ranks, train_step

floor, steps = float(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
config = DistillConfig(variant=f"hedgehog:floor={floor}", trainable="variant+attn", batch_size=2, seq_len=256, steps=200,
                       transfer_steps=100, transfer_attn_ce=1.0, transfer_lr=0.01, warmup_steps=5, out="unused")
ranks = start_ranks("cpu")
pair, tokenizer = build_pair(config, ranks.device)
blocks, _ = load_blocks(config, tokenizer)
optimizer = make_optimizer(pair, config)
for step in range(steps):
    _, parts = train_step(pair, optimizer, blocks, config, ranks, step)
    if step % 5 == 4:
        print(floor, step + 1, round(parts["attn_ce"], 4), round(parts["attn_mse"], 5), flush=True)
