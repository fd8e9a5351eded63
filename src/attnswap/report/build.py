"""One self-contained HTML page and one markdown file from one or more run folders.

    attnswap report runs/quickstart runs/bench-h100 --out runs/report

Each section appears when some run folder holds its data, and says "Not in these runs." otherwise.
Files are looked for anywhere under each run folder:

    eval.json              attnswap eval: criteria, perplexity / KL / agreement, per-layer MSE and cosine
    generations.json       attnswap generate ({"rows": [{"prompt", "original", "variants": {label: text}}]})
    metrics.jsonl          attnswap distill: loss and KL curves; mixture weights over training when records
                           carry "mixture_weights" (per layer, per candidate; optionally per layer, head,
                           candidate) and "mixture_candidates" (their names)
    *sweep*.json           a window sweep: rows {"w": 64, "kl": ..., "perplexity": ...}, as a list or under "rows"
    attention_maps.npz     (or .safetensors) arrays "original" and "variant" of attention probabilities, shaped
                           (layers, heads, T, S), (heads, T, S) or (T, S); optionally "tokens" (T,)
    kernel_summary.json    attnswap bench-kernel (beside kernel_results.jsonl)
    frontier.json          one point of the quality-versus-cost frontier, or {"points": [...]}: a swapped model's
                           perplexity against its attention cost (FRONTIER_KEYS; see read_frontier)
    bench_summary.json     attnswap bench (beside bench_results.jsonl), with its profile

When no run folder has attention maps and ``variant`` or ``swapped`` is given, the maps are computed from
that model for ``map_text`` (and saved beside the report). Plots are redrawn from the data: embedded as
base64 PNG in the HTML, linked from ``figures/`` in the markdown.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from attnswap.errors import AttnswapError
from attnswap.measure.bench import bench_plots
from attnswap.measure.bench_kernel import DENSE, kernel_plots
from attnswap.plots import Panel, Series, frontier_plot, heatmaps, line_plot
from attnswap.runs import atomic_write, check_output_dir, run_lock

log = logging.getLogger(__name__)

MAP_TEXT = "The quick brown fox jumps over the lazy dog because it wanted to see what lay beyond the old stone wall."
MAPS_FILES = ("attention_maps.npz", "attention_maps.safetensors")
# What a frontier point must hold: the swapped model (label) and its original (teacher), both perplexities on the
# same text, KL(original ‖ swapped) per token, top-1 agreement, attention cost as a fraction of full attention's
# (attnswap.measure.plan.head_costs), the distillation tokens and GPU seconds it took, and the command that made it.
# Optional: "group" (points of one group are joined by a line: a variant's routing budgets), "measure" (flops|kv).
FRONTIER_KEYS = ("label", "teacher", "ppl", "teacher_ppl", "kl", "top1", "attn_cost", "tokens", "gpu_seconds",
                 "command")


@dataclass
class ReportConfig:
    run_dirs: list[str] = field(default_factory=list)  # run folders, searched recursively
    out: str = ""  # default: <first run folder>/report
    title: str = "attnswap report"
    # Attention maps, when no run folder has them: a base model and a variant spec, or a saved swapped model.
    model: str = ""  # empty = the bundled teacher
    variant: str = ""
    swapped: str = ""
    map_text: str = MAP_TEXT
    map_layer: int = 0
    map_head: int = 0
    device: str = "cpu"


# --- the document: sections of blocks, rendered twice ------------------------------------------
@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Plot:
    path: Path
    caption: str


@dataclass
class Note:
    text: str


@dataclass
class Heading:
    text: str


@dataclass
class Mark:
    """A criterion's verdict: met (True), not met (False), not measured (None)."""

    met: bool | None
    note: str = ""

    def __str__(self) -> str:
        if self.met is None:
            return self.note or "n/a"
        return "✓ met" if self.met else "✗ not met"


@dataclass
class Section:
    title: str
    blocks: list

    @property
    def anchor(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.title.lower())


class Runs:
    """The run folders and the files in them."""

    def __init__(self, run_dirs: list[str], exclude: Path):
        self.roots = [Path(d) for d in run_dirs]
        self.exclude = exclude.resolve()

    def files(self, pattern: str) -> list[Path]:
        found = []
        for root in self.roots:
            candidates = [root] if root.is_file() else sorted(root.rglob(pattern))
            found += [p for p in candidates if p.is_file() and p.match(pattern)
                      and self.exclude not in p.resolve().parents]
        return found

    def name(self, path: Path) -> str:
        """A short name for a file: its folder relative to the run folder it was found in."""
        for root in self.roots:
            if root in path.parents:
                return str(Path(root.name) / path.parent.relative_to(root))
        return str(path.parent)


# --- the report ---------------------------------------------------------------------------------
def report(config: ReportConfig) -> Path:
    """Write ``report.html`` and ``report.md`` (plus ``figures/``) for ``config.run_dirs``; returns the HTML path."""
    if not config.run_dirs:
        raise AttnswapError("report needs at least one run folder: attnswap report RUN_DIR [RUN_DIR ...]")
    missing = [d for d in config.run_dirs if not Path(d).exists()]
    if missing:
        raise AttnswapError(f"run folder {missing[0]} does not exist; give folders written by attnswap commands")
    # Beside its runs (the default: <first run folder>/report) but never equal to or above one; its own folder is
    # left out of what it reads.
    out = check_output_dir(config.out if config.out else Path(config.run_dirs[0]) / "report",
                           inputs={"run_dirs": config.run_dirs, "swapped": config.swapped, "map_text": config.map_text},
                           allow_inside=True)
    results_there = [p for p in out.rglob("*.json*") if "figures" not in p.relative_to(out).parts] \
        if out.is_dir() else []
    if results_there:
        raise AttnswapError(f"--out {out} holds result files ({results_there[0].name}), which a report there would "
                            "leave out; choose an empty folder or one that holds only a report")
    with run_lock(out):
        return _write_report(config, out)


def _write_report(config: ReportConfig, out: Path) -> Path:
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    runs = Runs(config.run_dirs, exclude=out)
    builders: list[tuple[str, Callable[[Runs, Path, ReportConfig], list]]] = [
        ("Quality criteria", criteria_blocks),
        ("Perplexity, KL and agreement", quality_blocks),
        ("Quality against cost", frontier_blocks),
        ("Per-layer attention fidelity", per_layer_blocks),
        ("Attention maps", attention_map_blocks),
        ("Distillation curves", distill_blocks),
        ("Mixture weights during training", mixture_blocks),
        ("Window sweep", sweep_blocks),
        ("Generations", generation_blocks),
        ("Attention kernels: time and memory", kernel_blocks),
        ("Whole model: time and memory", model_bench_blocks),
        ("Where the time goes: attention share", profile_blocks),
    ]
    sections = [Section(title, build(runs, figures, config)) for title, build in builders]
    meta = {"generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "run folders": ", ".join(config.run_dirs)}
    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write(html_path, render_html(config.title, meta, sections))
    atomic_write(md_path, render_markdown(config.title, meta, sections, out))
    present = sum(1 for s in sections if s.blocks)
    log.info("wrote %s and %s (%d of %d sections have data)", html_path, md_path, present, len(sections))
    return html_path


# --- evaluation ---------------------------------------------------------------------------------
def _evals(runs: Runs) -> list[tuple[Path, dict]]:
    return [(p, d) for p in runs.files("eval.json") if isinstance(d := _read_json(p), dict)]


def _eval_heading(runs: Runs, path: Path, data: dict) -> Heading:
    model = (data.get("info") or {}).get("model")
    return Heading(f"{runs.name(path)}: {data.get('variant', 'variant')}" + (f" in {model}" if model else ""))


def criteria_blocks(runs: Runs, figures: Path, config: ReportConfig) -> list:
    blocks = []
    for path, data in _evals(runs):
        criteria = data.get("criteria")
        if isinstance(criteria, dict):
            criteria = [{"criterion": k, **(v if isinstance(v, dict) else {"met": v})} for k, v in criteria.items()]
        if not criteria:
            continue
        rows = [[c.get("criterion", c.get("name")), c.get("value"), c.get("threshold"),
                 Mark(c.get("met"), c.get("note", ""))] for c in criteria]
        met = sum(1 for c in criteria if c.get("met") is True)
        blocks += [_eval_heading(runs, path, data),
                   Table(["criterion", "value", "threshold", "verdict"], rows, f"{met} of {len(rows)} criteria met")]
    return blocks


def quality_blocks(runs: Runs, figures: Path, config: ReportConfig) -> list:
    blocks = []
    for path, data in _evals(runs):
        metrics = data.get("stream") if isinstance(data.get("stream"), dict) else data
        paired, single = [], []
        for key, value in metrics.items():
            if isinstance(value, dict) and {"original", "swapped"} <= set(value):
                paired.append([key, value["original"], value["swapped"],
                               *[v for k, v in value.items() if k not in ("original", "swapped")][:1]])
            elif key not in ("criteria", "info", "generations", "edge_cases", "config"):
                single += [[name, v] for name, v in _flatten(key, value)]
        if not paired and not single:
            continue
        blocks.append(_eval_heading(runs, path, data))
        if paired:
            blocks.append(Table(["metric", "original", "swapped", "ratio / extra"],
                                [row + [None] * (4 - len(row)) for row in paired], "original vs swapped model"))
        if single:
            blocks.append(Table(["metric", "value"], single))
        edges = data.get("edge_cases") or []
        if edges:
            blocks.append(Table(["edge case", "shape", "logits finite"],
                                [[e.get("check"), e.get("shape"), Mark(e.get("finite"))] for e in edges]))
    return blocks


def read_frontier(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """The frontier points of ``paths`` (each one point, or {"points": [...]}), each with ``ratio`` (ppl over the
    teacher's) and ``source`` (its file) added. A point without every FRONTIER_KEYS key is a user error."""
    points = []
    for path in paths:
        data = _read_json(path)
        for point in (data.get("points", [data]) if isinstance(data, dict) else data or []):
            missing = [k for k in FRONTIER_KEYS if not isinstance(point, dict) or k not in point]
            if missing:
                raise AttnswapError(f"frontier point in {path} lacks {', '.join(missing)}; each point needs: "
                                    f"{', '.join(FRONTIER_KEYS)}")
            points.append({**point, "ratio": point["ppl"] / point["teacher_ppl"], "source": str(path)})
    return sorted(points, key=lambda p: (p["attn_cost"], p["ratio"]))


def frontier_table(points: list[dict[str, Any]]) -> Table:
    """One row per point, cheapest first."""
    return Table(["label", "group", "attention cost", "perplexity", "teacher's", "ratio", "KL", "top-1", "tokens",
                  "GPU s", "command"],
                 [[p["label"], p.get("group"), p["attn_cost"], p["ppl"], p["teacher_ppl"], p["ratio"], p["kl"],
                   p["top1"], p["tokens"], p["gpu_seconds"], p["command"]] for p in points],
                 "perplexity ratio = swapped / teacher on the same text; attention cost as a fraction of full "
                 "attention's (attnswap plan's cost model)")


def frontier_blocks(runs: Runs, figures: Path, config: ReportConfig) -> list:
    points = read_frontier(runs.files("frontier.json"))
    if not points:
        return []
    teachers = ", ".join(sorted({str(p["teacher"]) for p in points}))
    return [Plot(frontier_plot(points, figures / "frontier.png"), f"perplexity ratio against attention cost "
                                                                   f"(teacher: {teachers})"),
            frontier_table(points)]


def per_layer_blocks(runs: Runs, figures: Path, config: ReportConfig) -> list:
    blocks = []
    for i, (path, data) in enumerate(_evals(runs)):
        columns = {key: value["per_layer"] for key, value in data.items()
                   if isinstance(value, dict) and isinstance(value.get("per_layer"), list) and value["per_layer"]}
        if not columns:
            continue
        n_layers = max(len(v) for v in columns.values())
        rows = [[layer] + [v[layer] if layer < len(v) else None for v in columns.values()] for layer in range(n_layers)]
        panels = [Panel(name.replace("_", " "), [Series(name, list(range(len(v))), v)], xlabel="layer", ylabel=name,
                        logy=name.endswith("mse") and all(x is None or x > 0 for x in v))
                  for name, v in columns.items()]
        plot = line_plot(panels, figures / f"per_layer_{i}.png")
        blocks += [_eval_heading(runs, path, data), Plot(plot, "per-layer fidelity of the swapped attention"),
                   Table(["layer", *columns], rows)]
    return blocks


def _flatten(key: str, value: Any, depth: int = 0) -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict) and depth < 2:
        for k, v in value.items():
            yield from _flatten(f"{key}.{k}", v, depth + 1)
    elif isinstance(value, (int, float, str, bool)) or value is None:
        yield key, value


# --- attention maps -----------------------------------------------------------------------------
def attention_map_blocks(runs: Runs, figures: Path, config: ReportConfig) -> list:
    sources = [(runs.name(p), p, load_attention_maps(p)) for name in MAPS_FILES for p in runs.files(name)]
    if not sources and (config.variant or config.swapped):
        from attnswap.measure.attention_maps import compute_attention_maps  # only when no run folder holds maps

        maps = compute_attention_maps(config.map_text, config.model, config.variant, config.swapped, config.device)
        path = save_attention_maps(figures.parent / "attention_maps.npz", maps)
        sources = [(f"computed from {config.swapped or config.model or 'the bundled teacher'}", path, maps)]
    blocks = []
    for i, (name, path, maps) in enumerate(sources):
        original, variant = (_select(maps[k], config.map_layer, config.map_head, path) for k in ("original", "variant"))
        tokens = [str(t) for t in maps["tokens"]] if "tokens" in maps else None
        label = str(maps.get("variant_label", "variant"))
        plot = heatmaps([("original", original), (label, variant), ("|difference|", np.abs(original - variant))],
                        figures / f"attention_maps_{i}.png",
                        f"layer {config.map_layer}, head {config.map_head}", tokens)
        blocks += [Heading(name), Plot(plot, f"attention probabilities, query rows × key columns ({path.name}); "
                                             f"max |difference| {np.abs(original - variant).max():.3g}")]
    return blocks


def load_attention_maps(path: Path) -> dict[str, Any]:
    """Arrays of an ``attention_maps`` file; ``original`` and ``variant`` are required."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            maps = {k: archive[k] for k in archive.files}
    else:
        from safetensors.numpy import load_file

        maps = load_file(str(path))
    if not {"original", "variant"} <= set(maps):
        raise AttnswapError(f"{path} must hold arrays 'original' and 'variant'; it has: {', '.join(maps)}")
    return maps


def save_attention_maps(path: Path, maps: dict[str, Any]) -> Path:
    np.savez_compressed(path, **maps)
    return path


def _select(array: np.ndarray, layer: int, head: int, path: Path) -> np.ndarray:
    """The (T, S) map of one layer and head out of (layers, heads, T, S), (heads, T, S) or (T, S)."""
    index = {4: (layer, head), 3: (head,), 2: ()}.get(array.ndim)
    if index is None:
        raise AttnswapError(f"attention maps in {path} have shape {array.shape}; expected (layers, heads, T, S)")
    for i, (wanted, size) in enumerate(zip(index, array.shape)):
        if not 0 <= wanted < size:
            which = ("map_layer", "map_head")[i + 2 - len(index)]
            raise AttnswapError(f"{which}={wanted} is out of range for the maps in {path} (size {size})")
    return np.asarray(array[index], dtype=float)


# --- distillation -------------------------------------------------------------------------------
def _metrics(runs: Runs) -> list[tuple[Path, list[dict]]]:
    found = []
    for path in runs.files("metrics.jsonl"):
        records = []
        for line in _result_text(path).splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run
            if isinstance(record, dict):
                records.append(record)
        if records:
            found.append((path, records))
    return found


def _family(key: str) -> str | None:
    if "kl" in key.lower():
        return "KL divergence"
    if "loss" in key.lower():
        return "loss"
    if "top1" in key.lower() or "acc" in key.lower():
        return "agreement"
    return None


def distill_blocks(runs: Runs, figures: Path, config: ReportConfig) -> list:
    blocks = []
    for i, (path, records) in enumerate(_metrics(runs)):
        series: dict[str, tuple[list, list]] = {}
        for j, record in enumerate(records):
            step = record.get("step", j)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    series.setdefault(key, ([], []))
                    series[key][0].append(step)
                    series[key][1].append(value)
        families: dict[str, list[Series]] = {}
        for key, (xs, ys) in series.items():
            family = _family(key)
            if family is not None:
                families.setdefault(family, []).append(Series(key, xs, ys))
        blocks.append(Heading(runs.name(path)))
        if families:
            panels = [Panel(name, lines, xlabel="step", ylabel=name,
                            logy=name != "agreement" and all(y > 0 for s in lines for y in s.ys))
                      for name, lines in families.items()]
            blocks.append(Plot(line_plot(panels, figures / f"distill_{i}.png", ncols=3), "distillation curves"))
        blocks.append(Table(["metric", "first", "last", "records"],
                            [[k, ys[0], ys[-1], len(ys)] for k, (_, ys) in series.items()],
                            f"{len(records)} records, last step {records[-1].get('step', len(records))}"))
    return blocks


def mixture_blocks(runs: Runs, figures: Path, config: ReportConfig) -> list:
    blocks = []
    for i, (path, records) in enumerate(_metrics(runs)):
        logged = [r for r in records if isinstance(r.get("mixture_weights"), (list, dict))]
        if not logged:
            continue
        steps = [r.get("step", j) for j, r in enumerate(logged)]
        weights = [_layer_weights(r["mixture_weights"]) for r in logged]  # each (layers, candidates)
        n_layers, n_candidates = weights[-1].shape
        names = next((r["mixture_candidates"] for r in reversed(logged) if r.get("mixture_candidates")),
                     [f"candidate {c}" for c in range(n_candidates)])
        shown = sorted({round(x) for x in np.linspace(0, n_layers - 1, min(n_layers, 12))})
        panels = [Panel(f"layer {layer}", [Series(str(names[c]), steps, [w[layer, c] if w.shape == weights[-1].shape
                                                                          else None for w in weights])
                                           for c in range(n_candidates)], xlabel="step", ylabel="weight")
                  for layer in shown]
        plot = line_plot(panels, figures / f"mixture_{i}.png", ncols=3)
        blocks += [Heading(runs.name(path)),
                   Plot(plot, "mixture weight of each candidate mask, per layer, over training"),
                   Table(["layer", *map(str, names)], [[layer, *weights[-1][layer]] for layer in range(n_layers)],
                         f"weights at step {steps[-1]} (mean over heads where logged per head)")]
    return blocks


def _layer_weights(logged: list | dict) -> np.ndarray:
    """(layers, candidates) from a per-layer list (or {layer: ...}) of per-candidate or per-head rows."""
    rows = list(logged.values()) if isinstance(logged, dict) else logged
    array = np.asarray(rows, dtype=float)
    return array.mean(axis=1) if array.ndim == 3 else array.reshape(len(rows), -1)


# --- window sweep and generations ---------------------------------------------------------------
def sweep_blocks(runs: Runs, figures: Path, config: ReportConfig) -> list:
    blocks = []
    for i, path in enumerate(runs.files("*sweep*.json")):
        data = _read_json(path)
        rows = data if isinstance(data, list) else (data or {}).get("rows") or (data or {}).get("results") or []
        rows = [r for r in rows if isinstance(r, dict)]
        x_key = next((k for k in ("w", "window", "window_size") if rows and k in rows[0]), None)
        if x_key is None:
            continue
        group_key = next((k for k in ("variant", "label", "sinks") if k in rows[0]), None)
        metrics = [k for k, v in rows[0].items()
                   if k not in (x_key, group_key) and isinstance(v, (int, float)) and not isinstance(v, bool)]
        groups = list(dict.fromkeys(r.get(group_key) for r in rows)) if group_key else [None]
        panels = []
        for metric in metrics:
            lines = []
            for group in groups:
                chosen = sorted((r[x_key], r.get(metric)) for r in rows
                                if group_key is None or r.get(group_key) == group)
                lines.append(Series(metric if group is None else f"{group_key}={group}",
                                    [x for x, _ in chosen], [y for _, y in chosen]))
            panels.append(Panel(f"{metric} vs window size", lines, xlabel=f"window size ({x_key})", ylabel=metric,
                                logx=True))
        columns = list(dict.fromkeys(k for r in rows for k in r))
        blocks += [Heading(runs.name(path)),
                   Plot(line_plot(panels, figures / f"sweep_{i}.png", ncols=3), "quality against window size"),
                   Table(columns, [[r.get(c) for c in columns] for r in rows])]
    return blocks


def generation_blocks(runs: Runs, figures: Path, config: ReportConfig) -> list:
    sources = [(p, _read_json(p)) for p in runs.files("generations.json")]
    sources += [(p, d.get("generations")) for p, d in _evals(runs) if d.get("generations")]
    blocks = []
    for path, data in sources:
        rows = data.get("rows", []) if isinstance(data, dict) else data or []
        flat = []
        for row in rows:
            if isinstance(row, dict):
                nested = row.get("variants") if isinstance(row.get("variants"), dict) else {}
                flat.append({**{k: v for k, v in row.items() if k != "variants"}, **nested})
        if not flat:
            continue
        columns = [c for c in dict.fromkeys(k for r in flat for k in r)
                   if len({json.dumps(r.get(c)) for r in flat}) > 1 or c in ("prompt", "original") or c in _texts(flat)]
        blocks += [Heading(f"{runs.name(path)} ({path.name})"),
                   Table(columns, [[r.get(c) for c in columns] for r in flat])]
    return blocks


def _texts(rows: list[dict]) -> set[str]:
    return {k for r in rows for k, v in r.items() if isinstance(v, str) and len(v) > 20}


# --- benchmarks ---------------------------------------------------------------------------------
def _json_line(path: Path, number: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise _corrupt(path, f"line {number}: {exc}") from None


def _bench_runs(runs: Runs, prefix: str) -> list[tuple[Path, dict, list[dict]]]:
    found = []
    for path in runs.files(f"{prefix}_summary.json"):
        results = path.parent / f"{prefix}_results.jsonl"
        lines = _result_text(results).splitlines() if results.is_file() else []
        rows = [_json_line(results, number, line) for number, line in enumerate(lines, 1) if line.strip()]
        found.append((path, _read_json(path) or {}, rows))
    return found


def _environment(summary: dict, rows: list[dict]) -> Table:
    env = dict(summary.get("environment") or {})
    if rows:
        env["dtype"] = rows[0].get("dtype")
    keys = ["gpu", "device", "torch", "transformers", "triton", "cuda", "dtype", "git_commit"]
    return Table(keys, [[env.get(k) for k in keys]], "environment (every row of the results carries it)")


def _cell(row: dict | None, value: Callable[[dict], str]) -> str:
    if row is None:
        return "–"
    if row.get("status") != "ok":
        return {"oom": "OOM", "skipped": "skipped (OOM)"}.get(row.get("status"), row.get("status", "?"))
    return value(row) + ("†" if row.get("model_kind", "pretrained") != "pretrained" else "")


def _pivot(rows: list[dict], value: Callable[[dict], str], caption: str) -> Table:
    lengths = sorted({r["length"] for r in rows})
    labels = list(dict.fromkeys(r["variant"] for r in rows))
    index = {(r["variant"], r["length"]): r for r in rows}
    return Table(["variant", *(f"n={n}" for n in lengths)],
                 [[label, *(_cell(index.get((label, n)), value) for n in lengths)] for label in labels], caption)


def _exponent_table(summary: dict, rows: list[dict], keys: list[str]) -> Table:
    warmups: dict[tuple, float] = {}
    for r in rows:
        key = tuple(r.get(k) for k in keys)
        if r.get("warmup_s") is not None:
            warmups[key] = max(warmups.get(key, 0.0), r["warmup_s"])
    fits = ("median_s_exponent", "median_s_exponent_last3", "peak_mem_mb_exponent")
    return Table([*keys, "time exponent", "time exponent (last 3)", "memory exponent", "max warm-up (s)"],
                 [[*(e.get(k) for k in keys), *(_exponent(e.get(f)) for f in fits),
                   warmups.get(tuple(e.get(k) for k in keys))]
                  for e in summary.get("exponents", []) if any(e.get(f) is not None for f in fits)],
                 "scaling exponent k of time ≈ c·n^k, least squares in log-log; warm-up (compilation included) "
                 "is timed apart")


def _exponent(k: float | None) -> str | None:
    return None if k is None else f"{k:.2f}"


def _ms(row: dict) -> str:
    seconds = row["median_s"]
    return f"{seconds:.3g} s" if seconds >= 1 else f"{1e3 * seconds:.3g} ms"


def _mib(row: dict) -> str:
    return "n/a" if row.get("peak_mem_mb") is None else f"{row['peak_mem_mb']:.4g} MiB"


_FIT_CAPTION = "log-log; k in the legend is the fitted scaling exponent of c·n^k"


def kernel_blocks(runs: Runs, figures: Path, config: ReportConfig) -> list:
    blocks = []
    for i, (path, summary, rows) in enumerate(_bench_runs(runs, "kernel")):
        if not rows:
            continue
        blocks += [Heading(runs.name(path)), _environment(summary, rows)]
        blocks += [Plot(p, _FIT_CAPTION) for p in kernel_plots(rows, figures / f"kernel_{i}")]
        for mode in dict.fromkeys(r["mode"] for r in rows):
            chosen = [r for r in rows if r["mode"] == mode]
            blocks.append(_pivot(chosen, _ms, f"{mode}: median time, shape {chosen[0]['shape']} at the first length"))
            blocks.append(_pivot([r for r in chosen if r["variant"] != DENSE], _speedup,
                                 f"{mode}: speedup over {DENSE} (useful-FLOP efficiency = speedup ÷ FLOP ratio)"))
            if any(r.get("peak_mem_mb") is not None for r in chosen):
                blocks.append(_pivot(chosen, _mib, f"{mode}: peak memory"))
        blocks.append(_exponent_table(summary, rows, ["mode", "variant"]))
        if summary.get("variants_skipped"):
            blocks.append(Note("Not registered, so not measured: " + ", ".join(summary["variants_skipped"])))
    return blocks


def _speedup(row: dict) -> str:
    if row.get("speedup") is None:
        return "–"
    efficiency = row.get("efficiency")
    return f"{row['speedup']:.3g}×" + (f" (eff. {efficiency:.3g})" if efficiency is not None else "")


def model_bench_blocks(runs: Runs, figures: Path, config: ReportConfig) -> list:
    blocks = []
    for i, (path, summary, rows) in enumerate(_bench_runs(runs, "bench")):
        if not rows:
            continue
        models = summary.get("models", [])
        blocks += [Heading(runs.name(path)), _environment(summary, rows),
                   Table(["model", "kind", "position limit"], [[m.get("name"), m.get("kind"), m.get("position_limit")]
                                                               for m in models])]
        blocks += [Plot(p, _FIT_CAPTION + "; dashed: the surrogate past the position limit")
                   for p in bench_plots(rows, [], figures / f"bench_{i}")]
        for mode in dict.fromkeys(r["mode"] for r in rows):
            chosen = [r for r in rows if r["mode"] == mode]
            if mode == "generate":
                bounded = sorted({r["variant"] for r in chosen if str(r.get("cache", "")).startswith("bounded")})
                blocks.append(_pivot(chosen, lambda r: f"{r['tokens_per_s']:.4g} tok/s", "generate: decode tokens/s "
                                     "with the KV cache after a prompt of length n; bounded cache: "
                                     + (", ".join(bounded) or "none")))
            else:
                blocks.append(_pivot(chosen, _ms, f"{mode}: median time"))
            if any(r.get("peak_mem_mb") is not None for r in chosen):
                blocks.append(_pivot(chosen, _mib, f"{mode}: peak memory"))
        if any(r.get("model_kind", "pretrained") != "pretrained" for r in rows):
            blocks.append(Note("† measured on the Llama-family surrogate (same size, RoPE, random weights): the "
                               "length is past the pretrained model's position limit."))
        blocks.append(_exponent_table(summary, rows, ["model", "variant", "mode"]))
    return blocks


def profile_blocks(runs: Runs, figures: Path, config: ReportConfig) -> list:
    blocks = []
    for i, (path, summary, _) in enumerate(_bench_runs(runs, "bench")):
        profiles = summary.get("profile") or []
        if not profiles:
            continue
        blocks.append(Heading(runs.name(path)))
        blocks += [Plot(p, "share of the profiled forward's time spent inside attention")
                   for p in bench_plots([], profiles, figures / f"profile_{i}")]
        rows = []
        for p in profiles:
            gpu = p.get("gpu_share") is not None
            trace = path.parent / p["trace"] if p.get("trace") else None
            rows.append([p.get("variant"), p.get("model"), p.get("length"),
                         p.get("attention_gpu_ms") if gpu else p.get("attention_cpu_ms"),
                         p.get("total_gpu_ms") if gpu else p.get("step_cpu_ms"), "GPU" if gpu else "CPU",
                         f"{100 * p['gpu_share' if gpu else 'cpu_share']:.1f} %" if p.get("status") == "ok" else None,
                         str(trace) if trace else p.get("error")])
        blocks.append(Table(["variant", "model", "n", "attention (ms)", "total (ms)", "clock", "attention share",
                             "Chrome trace"], rows, "one forward, profiled with torch.profiler; attention is the "
                                                    "'attnswap.attention' range around each attention call"))
    return blocks


# --- rendering ----------------------------------------------------------------------------------
CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d2329; background: #fff;
       max-width: 1180px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 28px; margin: 0 0 4px; }
h2 { font-size: 21px; margin: 40px 0 12px; padding-bottom: 4px; border-bottom: 2px solid #e3e8ee; }
h3 { font-size: 16px; margin: 22px 0 8px; color: #3a4550; }
.meta { color: #5b6875; margin: 0 0 18px; }
nav ol { columns: 2; margin: 8px 0 0; padding-left: 22px; }
nav a, a { color: #1f5fa8; text-decoration: none; }
.scroll { overflow-x: auto; margin: 10px 0 16px; }
table { border-collapse: collapse; font-size: 13px; }
p.caption { color: #5b6875; font-size: 13px; margin: 14px 0 -6px; }
th, td { border: 1px solid #dde3e9; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #f3f6f9; font-weight: 600; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { white-space: pre-wrap; min-width: 220px; max-width: 420px; }
.ok { color: #17803d; font-weight: 600; }
.bad { color: #c0262d; font-weight: 600; }
.absent { color: #8a96a3; font-style: italic; }
figure { margin: 12px 0 20px; }
figure img { max-width: 100%; border: 1px solid #e3e8ee; }
figcaption { color: #5b6875; font-size: 13px; }
"""


def render_html(title: str, meta: dict[str, str], sections: list[Section]) -> str:
    esc = html.escape
    parts = [f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
             "<p class=\"meta\">" + " · ".join(f"{esc(k)}: {esc(v)}" for k, v in meta.items()) + "</p>",
             "<nav><ol>" + "".join(f"<li><a href=\"#{s.anchor}\">{esc(s.title)}</a>"
                                   + ("" if s.blocks else " <span class=\"absent\">(none)</span>") + "</li>"
                                   for s in sections) + "</ol></nav>"]
    for section in sections:
        parts.append(f"<section id=\"{section.anchor}\"><h2>{esc(section.title)}</h2>")
        if not section.blocks:
            parts.append("<p class=\"absent\">Not in these runs.</p>")
        for block in section.blocks:
            if isinstance(block, Heading):
                parts.append(f"<h3>{esc(block.text)}</h3>")
            elif isinstance(block, Note):
                parts.append(f"<p>{esc(block.text)}</p>")
            elif isinstance(block, Plot):
                data = base64.b64encode(block.path.read_bytes()).decode()
                parts.append(f"<figure><img alt=\"{esc(block.caption)}\" src=\"data:image/png;base64,{data}\">"
                             f"<figcaption>{esc(block.caption)}</figcaption></figure>")
            elif isinstance(block, Table):
                parts.append(_html_table(block))
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _html_table(table: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in table.columns)
    body = []
    for row in table.rows:
        cells = []
        for value in row:
            if isinstance(value, Mark):
                css = {True: "ok", False: "bad"}.get(value.met, "absent")
                cells.append(f"<td><span class=\"{css}\">{esc(str(value))}</span></td>")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                cells.append(f"<td class=\"num\">{esc(_fmt(value))}</td>")
            else:
                text = _fmt(value)
                cells.append(f"<td class=\"text\">{esc(text)}</td>" if len(text) > 40 else f"<td>{esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    caption = f"<p class=\"caption\">{esc(table.caption)}</p>" if table.caption else ""
    return (f"{caption}<div class=\"scroll\"><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def render_markdown(title: str, meta: dict[str, str], sections: list[Section], out: Path) -> str:
    lines = [f"# {title}", "", " · ".join(f"{k}: {v}" for k, v in meta.items()), ""]
    lines += [f"{i}. [{s.title}](#{s.anchor})" for i, s in enumerate(sections, 1)] + [""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        if not section.blocks:
            lines += ["_Not in these runs._", ""]
        for block in section.blocks:
            if isinstance(block, Heading):
                lines += [f"### {block.text}", ""]
            elif isinstance(block, Note):
                lines += [block.text, ""]
            elif isinstance(block, Plot):
                lines += [f"![{block.caption}]({os.path.relpath(block.path, out)})", ""]
            elif isinstance(block, Table):
                cell = lambda v: _fmt(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
                if block.caption:
                    lines += [f"_{block.caption}_", ""]
                lines += ["| " + " | ".join(map(cell, block.columns)) + " |",
                          "|" + "---|" * len(block.columns)]
                lines += ["| " + " | ".join(map(cell, row)) + " |" for row in block.rows] + [""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(map(_fmt, value)) + ")"
    if isinstance(value, np.generic):
        return _fmt(value.item())
    return str(value)


def _read_json(path: Path) -> Any:
    """A result file's JSON; a damaged one is named rather than plotted as garbage or skipped unnoticed."""
    try:
        return json.loads(_result_text(path))
    except json.JSONDecodeError as exc:
        raise _corrupt(path, exc) from None


def _result_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise _corrupt(path, exc) from None


def _corrupt(path: Path, detail: object) -> AttnswapError:
    return AttnswapError(f"corrupt result file {path} ({detail}); re-run the command that wrote it, or move it out of "
                         "the run folder")

