"""Write docs/results.md, the full results tables, from the committed JSON under benchmarks/results/ (no GPU needed).

    python scripts/results_doc.py                     # benchmarks/results/** -> docs/results.md + docs/frontier.png
    python scripts/results_doc.py --results DIR --out FILE.md

First the quality-versus-cost frontier: every ``frontier.json`` under the results (one point or {"points": [...]},
the keys of attnswap.report.build.FRONTIER_KEYS), as a table and a plot. Then every layer plan (``plan.json`` of
``attnswap plan``): each layer's sensitivity and the best plan of every size. Then each table
scripts/results_table.py prints; a table whose results are not committed says which file it misses. Last, the
hand-written reading of the results beside the output (``results_notes.md``, where it exists), with its figures'
folders and commands.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_table beside this script

import results_table  # noqa: E402

from attnswap.measure.plan import best_plans  # noqa: E402
from attnswap.plots import frontier_plot  # noqa: E402
from attnswap.report.build import Heading, Note, Plot, Section, Table, frontier_table, read_frontier, render_markdown  # noqa: E402,E501

REPO = Path(__file__).resolve().parents[1]


def captured(table: Callable[[], None]) -> str:
    """What a results_table function prints, or a line naming the result file it did not find."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            table()
    except FileNotFoundError as exc:
        return f"_Not committed: {Path(exc.filename).relative_to(results_table.RESULTS.parent)}._"
    return printed.getvalue().strip()


def readme_tables() -> list[tuple[str, Callable[[], None]]]:
    """(title, function printing it) of every README table, in the README's order."""

    def with_costs(table: Callable[[dict], None]) -> Callable[[], None]:
        return lambda: table(results_table.train_costs())

    return [("Teacher anchor", results_table.anchor),
            ("Window sweep, untrained and distilled", results_table.window_sweep),
            ("Every variant, distilled with the same token budget", with_costs(results_table.distilled_variants)),
            ("Train step and inference at n = 1024, batch 8", with_costs(results_table.train_step)),
            ("The learnable mixture, hardened", results_table.mixture_hardening),
            ("Attention kernels alone", results_table.kernels)]


def plan_blocks(results: Path) -> list:
    """Per layer plan under ``results``: the sensitivity of each layer and the best set of cheap layers of each size."""
    blocks: list = []
    for path in sorted(results.rglob("plan.json")):
        plan = json.loads(path.read_text())
        if "sensitivity" not in plan:  # a head plan of a duo model
            continue
        blocks += [Heading(f"{_shown(path.parent)}: {plan['variant']} in {Path(plan['model']).name}"),
                   Note(f"`{plan['command']}` ({plan['tokens']} validation tokens; a cheap layer costs "
                        f"{plan['cheap_cost']:.4f} of full attention's {plan['config']['measure']} at n = "
                        f"{plan['config']['context']})"),
                   Table(["layer", "KL(original ‖ this layer swapped)", "top-1 agreement"],
                         [[r["layer"], r["kl"], r["top1"]] for r in plan["sensitivity"]]),
                   Table(["cheap layers", "cost", "summed single-layer KL"],
                         [[", ".join(map(str, a["layers"])) or "none", a["predicted_cost"], a["predicted_kl"]]
                          for a in best_plans([r["kl"] for r in plan["sensitivity"]], _layer_costs(plan))],
                         "the best plan of every size (attnswap.measure.plan.best_plans)")]
    return blocks


def _layer_costs(plan: dict) -> list[float]:
    """Each layer's cost when cheap: its own where the plan records it per layer, else the plan's one cost."""
    return [row.get("cheap_cost", plan["cheap_cost"]) for row in plan["sensitivity"]]


def write_results(results: Path, out: Path) -> Path:
    """docs/results.md (``out``) and its frontier plot beside it, from the JSON under ``results``."""
    results_table.RESULTS = results
    points = read_frontier(sorted(results.rglob("frontier.json")))
    frontier = [Note("_No frontier.json under the results yet._")]
    if points:
        plot = frontier_plot(points, out.parent / "frontier.png")
        frontier = [Plot(plot, "perplexity ratio against attention cost"), frontier_table(points)]
    sections = [Section("Quality against cost", frontier),
                Section("Layer plans", plan_blocks(results) or [Note("_No plan.json under the results yet._")])]
    sections += [Section(title, [Note(captured(table))]) for title, table in readme_tables()]
    notes = out.parent / "results_notes.md"
    if notes.is_file():
        sections.append(Section("What the results say", [Note(notes.read_text(encoding="utf-8").split("\n", 1)[1].strip())]))
    meta = {"generated by": "python scripts/results_doc.py", "from": f"{_shown(results)}/** (each result names "
                                                                      "the command that made it)"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown("attnswap results", meta, sections, out.parent))
    return out


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results.md")
    args = parser.parse_args()
    print(f"wrote {write_results(args.results.resolve(), args.out.resolve())}")


if __name__ == "__main__":
    main()
