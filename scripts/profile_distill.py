"""Where a distillation step's time goes: torch.profiler over a few steps of attnswap's own train_step.

    python scripts/profile_distill.py --variant window:w=128,sinks=4 --batch-size 16 --out runs/profile

Prints (and writes to OUT/profile.txt) the step time, tokens/s, peak memory and the operators by CUDA and by CPU
time; OUT/profile.json holds the figures. Bundled teacher, bf16 autocast as `attnswap distill` runs it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from attnswap.train.distill import DistillConfig, build_pair, load_blocks, make_optimizer, start_ranks, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="window:w=128,sinks=4")
    parser.add_argument("--trainable", default="variant+attn")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps, after 3 warm-up steps")
    parser.add_argument("--out", default="runs/profile")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = DistillConfig(variant=args.variant, trainable=args.trainable, batch_size=args.batch_size,
                           seq_len=args.seq_len, steps=1000, out=str(out / "unused"))
    ranks = start_ranks("auto")
    pair, tokenizer = build_pair(config, ranks.device)
    blocks, _ = load_blocks(config, tokenizer)
    optimizer = make_optimizer(pair, config)
    for step in range(3):
        train_step(pair, optimizer, blocks, config, ranks, step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        for step in range(3, 3 + args.steps):
            train_step(pair, optimizer, blocks, config, ranks, step)
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / args.steps  # includes the profiler's own overhead
    unprofiled = time.perf_counter()
    for step in range(3 + args.steps, 3 + 2 * args.steps):
        train_step(pair, optimizer, blocks, config, ranks, step)
    torch.cuda.synchronize()
    plain = (time.perf_counter() - unprofiled) / args.steps
    averages = profiler.key_averages()
    figures = {"variant": args.variant, "batch_size": args.batch_size, "seq_len": args.seq_len,
               "step_s": plain, "step_s_profiled": seconds, "tokens_per_s": args.batch_size * args.seq_len / plain,
               "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20,
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    text = (json.dumps(figures, indent=1) + "\n\nby CUDA time\n"
            + averages.table(sort_by="cuda_time_total", row_limit=25)
            + "\n\nby CPU time\n" + averages.table(sort_by="cpu_time_total", row_limit=25))
    print(text)
    (out / "profile.txt").write_text(text)
    (out / "profile.json").write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
