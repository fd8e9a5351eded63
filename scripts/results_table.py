"""Print the README's results tables from the committed JSON under benchmarks/results/ (no GPU needed).

    python scripts/results_table.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
MEMORY_GOAL = 0.7  # the research's fifth criterion: train-step peak memory -30 % against HF eager


def read(path: Path):
    return json.loads(path.read_text())


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def fmt(value, spec=".3g", unit=""):
    return "n/a" if value is None else format(value, spec) + unit


def criteria_met(criteria: list[dict], memory_met: bool | None) -> str:
    known = [c["met"] for c in criteria if c["met"] is not None] + ([memory_met] if memory_met is not None else [])
    return f"{sum(known)}/{len(known)}"


def train_costs() -> dict[str, dict]:
    rows = jsonl(RESULTS / "bench_gpt2_train_h100" / "bench_results.jsonl")
    train = {r["variant"]: r for r in rows if r["mode"] == "train" and r["status"] == "ok"}
    prefill = {r["variant"]: r for r in rows if r["mode"] == "prefill" and r["status"] == "ok"}
    sdpa, eager = train["hf_sdpa"], train["hf_eager"]
    return {k: {"mem": r["peak_mem_mb"] / sdpa["peak_mem_mb"], "time": r["median_s"] / sdpa["median_s"],
                "mem_eager": r["peak_mem_mb"] / eager["peak_mem_mb"], "ms": r["median_s"] * 1e3,
                "mb": r["peak_mem_mb"], "prefill_ms": prefill[k]["median_s"] * 1e3,
                "prefill_mb": prefill[k]["peak_mem_mb"]} for k, r in train.items()}


def anchor() -> None:
    gpu = read(RESULTS / "anchor_h100_bf16" / "eval.json")["stream"]["perplexity"]["original"]
    cpu = read(RESULTS / "anchor_cpu_fp32" / "eval.json")["stream"]["perplexity"]["original"]
    print(f"teacher WikiText-2 test perplexity: H100 bf16 {gpu:.2f}, CPU fp32 {cpu:.2f} (card: 84.09)\n")


def window_sweep() -> None:
    untrained = {(r["w"], r["sinks"]): r for r in read(RESULTS / "window_sweep_untrained" / "window_sweep_untrained.json")["rows"]}
    sweep = RESULTS / "distill_window_sweep"
    print("| w | sinks | untrained perplexity | untrained KL | distilled perplexity | KL | top-1 agreement | "
          "accuracy ratio | val KL before → after | criteria met |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(read(sweep / "window_sweep_trained.json")["rows"], key=lambda r: (r["sinks"], r["w"])):
        label = f"window{r['w']}" + (f"_sinks{r['sinks']}" if r["sinks"] else "")
        evaluated, distilled = read(sweep / label / "eval.json"), read(sweep / label / "distill_results.json")
        before = untrained[r["w"], r["sinks"]]
        print(f"| {r['w']} | {r['sinks']} | {before['perplexity']:.1f} | {before['kl']:.3f} | {r['perplexity']:.1f} | "
              f"{r['kl']:.3f} | {100 * r['top1_agreement']:.1f} % | {evaluated['stream']['accuracy']['ratio']:.3f} | "
              f"{distilled['kl_before']:.3f} → {distilled['kl_after']:.3f} | {criteria_met(evaluated['criteria'], None)} |")


def distilled_variants(costs: dict[str, dict]) -> None:
    print("\n| variant (distilled) | perplexity | KL | top-1 agreement | accuracy ratio | val KL before → after | "
          "train-step memory vs eager | vs sdpa | train-step time vs sdpa | criteria met (of 5) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for folder in sorted((RESULTS / "distill").iterdir()):
        results, evaluated = folder / "distill_results.json", folder / "eval_eval.json"
        if not results.is_file():
            continue
        distilled = read(results)
        if not evaluated.is_file():
            print(f"| {folder.name} | diverged: see {folder.name}/ and distill/logs | | | | | | | | |")
            continue
        e = read(evaluated)
        s, c = e["stream"], costs.get(distilled["label"], {})
        memory_met = c["mem_eager"] <= MEMORY_GOAL if c else None
        print(f"| {folder.name} | {s['perplexity']['swapped']:.1f} | {s['kl']['mean']:.3f} | "
              f"{100 * s['top1_agreement']:.1f} % | {s['accuracy']['ratio']:.3f} | "
              f"{distilled['kl_before']:.3f} → {distilled['kl_after']:.3f} | {fmt(c.get('mem_eager'))} | "
              f"{fmt(c.get('mem'))} | {fmt(c.get('time'))} | {criteria_met(e['criteria'], memory_met)} |")


def train_step(costs: dict[str, dict]) -> None:
    print("\n| n=1024, batch 8 | train step | peak memory | memory vs eager | vs sdpa | time vs sdpa | "
          "inference (prefill) | its peak memory |")
    print("|---|---|---|---|---|---|---|---|")
    for label, c in costs.items():
        print(f"| {label} | {c['ms']:.1f} ms | {c['mb']:.0f} MiB | {c['mem_eager']:.3f} | {c['mem']:.3f} | {c['time']:.2f} | "
              f"{c['prefill_ms']:.1f} ms | {c['prefill_mb']:.0f} MiB |")


def mixture_hardening() -> None:
    print("\n| mixture run | candidates kept per head (mean) | density n=1024 before → after | n=8192 | "
          "perplexity unhardened → hardened | forward, 8 layers, n=1024: hardened / unhardened / flash | n=8192 |")
    print("|---|---|---|---|---|---|---|")
    for name, distilled in (("lr_scale1", "mixture_k10_head"), ("lr_scale200", "mixture_k10_head_lr_scale200")):
        folder = RESULTS / f"mixture_hardened_{name}"
        harden = read(folder / "harden.json")
        kept = [n for layer in harden["kept_per_layer"] for n in layer["kept_per_head"]]
        density = harden["mean_density"]
        unhardened = read(RESULTS / "distill" / distilled / "eval_eval.json")["stream"]["perplexity"]["swapped"]
        hardened = read(folder / "eval" / "eval.json")["stream"]["perplexity"]["swapped"]
        forward = {r["length"]: r for r in harden["speed"]["ratios"] if r["mode"] == "forward"}

        def times(n: int) -> str:
            r = forward[n]
            return f"{r['hardened_s'] * 1e3:.2f} / {r['unhardened_s'] * 1e3:.2f} / {r['dense_s'] * 1e3:.2f} ms"

        print(f"| {name} (threshold {harden['threshold']}) | {sum(kept) / len(kept):.2f} of {len(harden['candidates'])} | "
              f"{density['1024']['before']:.3f} → {density['1024']['after']:.4f} | "
              f"{density['8192']['before']:.3f} → {density['8192']['after']:.4f} | {unhardened:.1f} → {hardened:.1f} | "
              f"{times(1024)} | {times(8192)} |")


def kernels() -> None:
    folder = RESULTS / "bench_kernel_graphs_h100"
    rows = jsonl(folder / "kernel_results.jsonl")
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for mode in ("forward", "forward+backward"):
        print(f"\n{mode}: time per call / CUDA-graph replay (speedup over flash on replay; useful-FLOP efficiency)\n")
        print("| n | " + " | ".join(variants) + " |")
        print("|---|" + "---|" * len(variants))
        for n in sorted({r["length"] for r in rows}):
            cells = []
            for v in variants:
                r = next(r for r in rows if r["mode"] == mode and r["length"] == n and r["variant"] == v)
                cell = f"{r['median_s'] * 1e3:.2f} / {r['graph_median_s'] * 1e3:.2f} ms"
                if v != "sdpa_flash":
                    cell += f" ({r['graph_speedup']:.2f}×" + (f"; {r['graph_efficiency']:.2f}" if r["graph_efficiency"] else "") + ")"
                cells.append(cell)
            print(f"| {n} | " + " | ".join(cells) + " |")
    print("\n| fitted exponent over n = 2k…32k, forward+backward | peak memory | time (CUDA-graph replay) |")
    print("|---|---|---|")
    for e in read(folder / "kernel_summary.json")["exponents"]:
        if e["mode"] == "forward+backward":
            print(f"| {e['variant']} | {e['peak_mem_mb_exponent']:.2f} | {e['graph_median_s_exponent']:.2f} |")


def main() -> None:
    costs = train_costs()
    anchor()
    window_sweep()
    distilled_variants(costs)
    train_step(costs)
    mixture_hardening()
    kernels()


if __name__ == "__main__":
    main()
