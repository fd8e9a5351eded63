"""Distillation throughput, peak memory and loss curve of the three ways to take the KL, side by side in one process.

    python scripts/distill_speed.py --out runs/distill_speed

The KL of a step (attnswap.train.losses) is taken three ways, chosen here by patching the module the loop calls:
    whole         both logits tensors made whole, as distillation did before issue 17 (the baseline);
    checkpointed  the LM head chunk by chunk, each chunk recomputed in the backward (chunked_kl with a trainable head);
    fused         chunked_kl's fused path for a frozen head: gradient made in the forward, a compiled kernel per chunk;
    compiled      fused, with the model itself compiled for the teacher's and the student's passes (distill.compile).
For each way and batch size: the median step time of ``--steps`` steps after 3 warm-up steps, tokens/s and the peak
memory of those steps. Then ``--curve-steps`` steps of the same run (same seed, data, batch) with whole and fused
(or compiled): the two loss curves and validation KLs, to show the fused path trains the same; ``--noise-seeds``
adds the whole-logits curve from other seeds, the run-to-run spread to judge that difference against. Bundled
teacher, bf16 autocast, as `attnswap distill` runs it. Writes OUT/speed.json, OUT/speed.csv, OUT/curves.json and OUT/distill_speed.png.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

import attnswap.train.distill as distill_module
import attnswap.train.losses as losses
from attnswap.measure.bench_kernel import environment
from attnswap.train.distill import (DistillConfig, build_pair, evaluate_blocks, load_blocks, make_optimizer, start_ranks,
                              train_step)
from attnswap.plots import Panel, Series, line_plot

WAYS = ("whole", "checkpointed", "fused", "compiled")


def whole_logits_kl(student_hidden, teacher_hidden, head, temperature=1.0, chunk=None):
    student, teacher = head(student_hidden), head(teacher_hidden)
    agree = (student.argmax(-1) == teacher.argmax(-1)).sum()
    return losses.kl_divergence(student, teacher, temperature), agree


@contextlib.contextmanager
def kl_way(way: str):
    """Patch what the distillation loop calls so that it takes the KL ``way``."""
    patched = []
    if way == "whole":
        patched.append((distill_module, "chunked_kl", whole_logits_kl))
    elif way == "checkpointed":
        patched.append((losses, "_frozen_linear", lambda head: False))
    saved = [(module, name, getattr(module, name)) for module, name, _ in patched]
    for module, name, value in patched:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def run_steps(config: DistillConfig, way: str, steps: int, warmup: int, timed: bool):
    config = dataclasses.replace(config, compile=way == "compiled")
    ranks = start_ranks("auto")
    torch.manual_seed(config.seed)
    pair, tokenizer = build_pair(config, ranks.device)
    train, val = (blocks.to(ranks.device) for blocks in load_blocks(config, tokenizer))
    optimizer = make_optimizer(pair, config)
    losses_seen, times = [], []
    with kl_way(way):
        for step in range(warmup + steps):
            if step == warmup and timed:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            loss, _ = train_step(pair, optimizer, train, config, ranks, step)  # ends in a host sync
            times.append(time.perf_counter() - started)
            losses_seen.append(loss)
        peak = torch.cuda.max_memory_allocated() / 2**20
        val_kl = None if timed else evaluate_blocks(pair, val, config, ranks)["kl"]
    del pair, optimizer
    torch.cuda.empty_cache()
    return losses_seen, times[warmup:], peak, val_kl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="window:w=128,sinks=4")
    parser.add_argument("--trainable", default="variant+attn")
    parser.add_argument("--batch-sizes", default="8,16,32,64")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"of {', '.join(WAYS)}")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case, after 3 warm-up steps")
    parser.add_argument("--curve-steps", type=int, default=200)
    parser.add_argument("--curve-batch-size", type=int, default=16)
    parser.add_argument("--noise-seeds", default="",
                        help="also the whole-logits curve from these seeds (e.g. 1,2): its run-to-run spread, which "
                             "the ways' difference is judged against")
    parser.add_argument("--out", default="runs/distill_speed")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def config(batch_size: int, steps: int, seed: int = 0) -> DistillConfig:
        return DistillConfig(variant=args.variant, trainable=args.trainable, batch_size=batch_size,
                             seq_len=args.seq_len, steps=steps, warmup_steps=20, lr=5e-4, seed=seed,
                             out=str(out / "unused"))

    rows = []
    for way in args.ways.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            try:
                _, times, peak, _ = run_steps(config(batch, 1000), way, args.steps, 3, timed=True)
            except torch.OutOfMemoryError:
                rows.append({"way": way, "batch_size": batch, "status": "oom"})
                torch.cuda.empty_cache()
                continue
            step_s = statistics.median(times)
            rows.append({"way": way, "batch_size": batch, "status": "ok", "step_s": step_s,
                         "tokens_per_s": batch * args.seq_len / step_s, "peak_memory_mib": peak})
            print(json.dumps(rows[-1]), flush=True)
            with open(out / "speed_rows.jsonl", "a") as handle:  # kept if a device call's timeout cuts the run
                handle.write(json.dumps(rows[-1]) + "\n")
    for row in rows:
        base = next((r for r in rows if r["way"] == "whole" and r["batch_size"] == row["batch_size"]
                     and r["status"] == "ok"), None)
        if base and row["status"] == "ok":
            row["speedup_vs_whole"] = base["step_s"] / row["step_s"]
            row["memory_vs_whole"] = row["peak_memory_mib"] / base["peak_memory_mib"]

    curves = {}
    compared = ("whole", "compiled" if "compiled" in args.ways else "fused")
    seeds = [int(s) for s in args.noise_seeds.split(",") if s.strip()]
    runs = [(way, 0, way) for way in compared] + [("whole", seed, f"whole_seed{seed}") for seed in seeds]
    for way, seed, name in runs if args.curve_steps else ():
        loss, times, _, val_kl = run_steps(config(args.curve_batch_size, args.curve_steps, seed), way,
                                           args.curve_steps, 0, timed=False)
        curves[name] = {"loss": loss, "val_kl": val_kl, "seconds": sum(times), "seed": seed}
        print(name, "final loss", loss[-1], "val KL", val_kl, flush=True)

    env = environment(torch.device("cuda"))
    summary = {"environment": env, "variant": args.variant, "trainable": args.trainable, "seq_len": args.seq_len,
               "command": "python scripts/distill_speed.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "rows": rows}
    (out / "speed.json").write_text(json.dumps(summary, indent=1))
    (out / "curves.json").write_text(json.dumps({"environment": env, "batch_size": args.curve_batch_size,
                                                 **curves}, indent=1))
    with open(out / "speed.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({k for row in rows for k in row}))
        writer.writeheader()
        writer.writerows(rows)
    steps = list(range(1, args.curve_steps + 1))
    if curves:
        line_plot([Panel(f"distillation loss, batch {args.curve_batch_size} x {args.seq_len}",
                         [Series(name, steps, curves[name]["loss"]) for name in curves], "step", "KL")],
                  out / "distill_speed.png")


if __name__ == "__main__":
    main()
