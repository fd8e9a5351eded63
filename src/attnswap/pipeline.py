"""``attnswap run CONFIG.yaml``: swap -> distil -> eval -> generate -> bench -> report, in one command.

One YAML file names the model, the variants and the overrides for each stage; every stage writes into one run
folder, and a summary (JSON, CSV, markdown) holds one row per variant: quality against the original model and
train-step cost against HF's own attention.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnswap.config import build_config, config_to_dict
from attnswap.errors import AttnswapError
from attnswap.hf.models import DEFAULT_MODEL
from attnswap.runs import atomic_write, holding_out_folder
from attnswap.variants import get_variant

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    name: str = "run"
    model: str = ""  # hub name or local directory; empty = the bundled teacher
    variants: list[str] = field(default_factory=lambda: ["window:w=64,sinks=4"])
    distill: dict = field(default_factory=dict)  # DistillConfig overrides; steps: 0 = evaluate without training
    eval: dict = field(default_factory=dict)  # EvalConfig overrides
    evaluate_untrained: bool = False  # also evaluate each variant before distillation
    generate: dict | None = field(default_factory=dict)  # GenerateConfig overrides; null = skip
    bench: dict | None = field(default_factory=dict)  # BenchConfig overrides; null = skip
    bench_length: int = 1024  # the train-step length compared in the summary
    device: str = "auto"
    seed: int = 0
    out: str = "runs/run"


@holding_out_folder
def run(config: RunConfig) -> dict[str, Any]:
    from attnswap.train.distill import DistillConfig, distill
    from attnswap.measure.evaluate import EvalConfig, evaluate

    specs = [get_variant(s).spec for s in config.variants]  # a bad spec fails before any work
    if not specs:
        raise AttnswapError("variants is empty; list at least one variant spec")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    common = {"model": config.model, "device": config.device, "seed": config.seed}
    log.info("run %s: %s on %s", config.name, ", ".join(specs), config.model or DEFAULT_MODEL)

    rows = []
    for spec in specs:
        label = get_variant(spec).label
        folder = out / label
        row: dict[str, Any] = {"variant": spec, "label": label}
        if config.evaluate_untrained:
            untrained = evaluate(build_config(EvalConfig, {**common, "variant": spec, "out": str(folder / "eval-untrained"),
                                                           "layers": config.distill.get("layers"), **config.eval}))
            row["untrained"] = _quality(untrained)
        swapped = ""
        if config.distill.get("steps", 1) > 0:
            result = distill(build_config(DistillConfig, {**common, "variant": spec, "out": str(folder / "distill"),
                                                          **config.distill}))
            swapped = result["model_dir"]
            row["distill"] = {k: result[k] for k in ("kl_before", "kl_after", "top1_before", "top1_after",
                                                     "tokens_seen", "token_budget", "seed")}
        target = {"swapped": swapped} if swapped else {"variant": spec}
        evaluated = evaluate(build_config(EvalConfig, {**common, **target, "out": str(folder / "eval"), **config.eval}))
        row["trained" if swapped else "untrained"] = _quality(evaluated)
        row["criteria"] = evaluated["criteria"]
        row["swapped_dir"] = swapped
        rows.append(row)

    run_dirs = [str(out)]
    if config.generate is not None and any(r["swapped_dir"] for r in rows):
        from attnswap.measure.generate import GenerateConfig, generate_side_by_side

        generate_side_by_side(build_config(GenerateConfig, {
            "model": config.model, "device": config.device, "out": str(out / "generations"),
            "swapped": ";".join(r["swapped_dir"] for r in rows if r["swapped_dir"]), **config.generate}))
    if config.bench is not None:
        from attnswap.measure.bench import BenchConfig, bench

        bench_out = out / "bench"
        bench(build_config(BenchConfig, {"model": config.model, "device": config.device, "variants": specs,
                                         "out": str(bench_out), **config.bench}))
        _attach_costs(rows, bench_out / "bench_results.jsonl", config.bench_length)

    _write_sweeps(rows, out)
    summary = {"name": config.name, "model": config.model or DEFAULT_MODEL, "config": config_to_dict(config),
               "command": " ".join(sys.argv), "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    _write_table(rows, out)

    from attnswap.report.build import ReportConfig, report

    first = rows[0]  # attention maps of the first variant against the original, for one input
    report(ReportConfig(run_dirs=run_dirs, out=str(out / "report"), title=f"attnswap: {config.name}",
                        model=config.model, swapped=first["swapped_dir"],
                        variant="" if first["swapped_dir"] else first["variant"]))
    print(f"run {config.name} done in {summary['seconds']} s: {out / 'summary.md'}, {out / 'report' / 'report.html'}")
    return summary


def _quality(result: dict[str, Any]) -> dict[str, Any]:
    stream = result["stream"]
    return {"perplexity_original": stream["perplexity"]["original"], "perplexity": stream["perplexity"]["swapped"],
            "kl": stream["kl"]["mean"], "top1_agreement": stream["top1_agreement"],
            "accuracy_ratio": stream["accuracy"]["ratio"]}


def _attach_costs(rows: list[dict[str, Any]], results_file: Path, length: int) -> None:
    """Train-step peak memory and time of each variant relative to HF eager and sdpa, at ``length``."""
    if not results_file.is_file():
        return
    measured = [json.loads(line) for line in results_file.read_text().splitlines() if line.strip()]
    train = {r["variant"]: r for r in measured if r.get("mode") == "train" and r.get("length") == length
             and r.get("status") == "ok"}
    for row in rows:
        case = train.get(row["label"])
        if case is None:
            continue
        costs = {"length": length, "time_s": case.get("median_s"), "peak_mem_mb": case.get("peak_mem_mb")}
        for baseline in ("hf_eager", "hf_sdpa"):
            base = train.get(baseline)
            for key, name in (("peak_mem_mb", "memory"), ("median_s", "time")):
                if base and base.get(key) and case.get(key) is not None:
                    costs[f"{name}_vs_{baseline[3:]}"] = case[key] / base[key]
        row["train_step"] = costs
        saving = None if costs.get("memory_vs_eager") is None else 1 - costs["memory_vs_eager"]
        for criterion in row["criteria"]:
            if criterion["criterion"].startswith("peak memory"):
                criterion.update(value=saving, met=None if saving is None else saving >= 0.30,
                                 note=f"train step at n={length} against HF eager")


def _write_sweeps(rows: list[dict[str, Any]], out: Path) -> None:
    """Window rows as sweeps over w (the report plots them), one file per stage."""
    for stage in ("untrained", "trained"):
        sweep = []
        for row in rows:
            match = re.fullmatch(r"window:w=(\d+),sinks=(\d+)", row["variant"])
            if match and stage in row:
                q = row[stage]
                sweep.append({"w": int(match[1]), "sinks": int(match[2]), "perplexity": q["perplexity"],
                              "kl": q["kl"], "top1_agreement": q["top1_agreement"]})
        if len({r["w"] for r in sweep}) > 1:
            atomic_write(out / f"window_sweep_{stage}.json", json.dumps({"rows": sweep}, indent=1))


TABLE_COLUMNS = ["variant", "stage", "perplexity", "perplexity_original", "kl", "top1_agreement", "accuracy_ratio",
                 "train_memory_vs_sdpa", "train_time_vs_sdpa", "train_memory_vs_eager", "criteria_met"]


def _write_table(rows: list[dict[str, Any]], out: Path) -> None:
    lines = []
    for row in rows:
        costs = row.get("train_step", {})
        met = [c for c in row["criteria"] if c["met"] is not None]
        for stage in ("untrained", "trained"):
            if stage not in row:
                continue
            q = row[stage]
            lines.append({"variant": row["label"], "stage": stage, **{k: q[k] for k in TABLE_COLUMNS if k in q},
                          "train_memory_vs_sdpa": costs.get("memory_vs_sdpa"),
                          "train_time_vs_sdpa": costs.get("time_vs_sdpa"),
                          "train_memory_vs_eager": costs.get("memory_vs_eager"),
                          "criteria_met": f"{sum(bool(c['met']) for c in met)}/{len(met)}"})
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(lines)
    fmt = lambda v: "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    table = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    table += ["| " + " | ".join(fmt(line.get(c)) for c in TABLE_COLUMNS) + " |" for line in lines]
    atomic_write(out / "summary.md", "\n".join(table) + "\n")
