"""Print the README's results tables from the committed JSON under benchmarks/results/ (no GPU needed).

    python scripts/results_table.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def fmt(value, spec=".3g"):
    return "n/a" if value is None else format(value, spec)


def criteria_met(evaluated: dict) -> str:
    known = [c for c in evaluated["criteria"] if c["met"] is not None]
    return f"{sum(c['met'] for c in known)}/{len(known)}"


def train_costs() -> dict[str, dict]:
    rows = [json.loads(line) for line in (RESULTS / "bench_gpt2_train_h100" / "bench_results.jsonl").read_text().splitlines()]
    train = {r["variant"]: r for r in rows if r["mode"] == "train" and r["status"] == "ok"}
    base = train["hf_sdpa"]
    return {k: {"mem": r["peak_mem_mb"] / base["peak_mem_mb"], "time": r["median_s"] / base["median_s"],
                "mem_eager": r["peak_mem_mb"] / train["hf_eager"]["peak_mem_mb"]} for k, r in train.items()}


def main() -> None:
    anchor_gpu = json.loads((RESULTS / "anchor_h100_bf16" / "eval.json").read_text())["stream"]["perplexity"]["original"]
    anchor_cpu = json.loads((RESULTS / "anchor_cpu_fp32" / "eval.json").read_text())["stream"]["perplexity"]["original"]
    print(f"teacher WikiText-2 test perplexity: H100 bf16 {anchor_gpu:.2f}, CPU fp32 {anchor_cpu:.2f} (card: 84.09)\n")

    print("| window (untrained) | sinks | perplexity | KL | top-1 agreement | accuracy ratio |")
    print("|---|---|---|---|---|---|")
    sweep = json.loads((RESULTS / "window_sweep_untrained" / "window_sweep_untrained.json").read_text())["rows"]
    for r in sorted(sweep, key=lambda r: (r["sinks"], r["w"])):
        evaluated = json.loads((RESULTS / "window_sweep_untrained" / (f"window{r['w']}" + (f"_sinks{r['sinks']}" if r["sinks"] else "")) / "eval.json").read_text())
        print(f"| {r['w']} | {r['sinks']} | {r['perplexity']:.1f} | {r['kl']:.3f} | {100 * r['top1_agreement']:.1f} % | "
              f"{evaluated['stream']['accuracy']['ratio']:.3f} |")

    costs = train_costs()
    print("\n| variant (distilled) | perplexity | KL | top-1 agreement | accuracy ratio | val KL before → after | "
          "train-step memory vs sdpa | train-step time vs sdpa | criteria met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for folder in sorted((RESULTS / "distill").iterdir()):
        results, evaluated = folder / "distill_results.json", folder / "eval_eval.json"
        if not results.is_file():
            continue
        distilled = json.loads(results.read_text())
        if not evaluated.is_file():
            print(f"| {folder.name} | diverged: see {folder.name}/ and distill/logs | | | | | | | |")
            continue
        e = json.loads(evaluated.read_text())
        s, c = e["stream"], costs.get(folder.name, {})
        print(f"| {folder.name} | {s['perplexity']['swapped']:.1f} | {s['kl']['mean']:.3f} | "
              f"{100 * s['top1_agreement']:.1f} % | {s['accuracy']['ratio']:.3f} | "
              f"{distilled['kl_before']:.3f} → {distilled['kl_after']:.3f} | {fmt(c.get('mem'))} | {fmt(c.get('time'))} | "
              f"{criteria_met(e)} |")
    print("\n| train step, n=1024, batch 8 | peak memory vs eager | vs sdpa | time vs sdpa |")
    print("|---|---|---|---|")
    for label, c in costs.items():
        print(f"| {label} | {c['mem_eager']:.3f} | {c['mem']:.3f} | {c['time']:.3f} |")


if __name__ == "__main__":
    main()
