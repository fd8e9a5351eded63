"""The recall suite: what a swap keeps of its teacher's in-context retrieval, task by task, each variant's score
beside the teacher's and as a ratio to it.

- passkey: a 5-digit number hidden in repeated filler at depths 0-100 % of sequences of each length; retrieved
  when every answer token is the model's top-1 (exactly what greedy decoding would write);
- induction: a random segment repeated ``distance`` tokens later; top-1 accuracy on the copy (all but its first
  token, which nothing predicts), by distance;
- mqar (multi-query associative recall): random key-value pairs, filler, then every key again; top-1 accuracy on
  the values, by number of pairs and by the gap between the pairs and the queries;
- ppl: perplexity by position (log2 buckets) on held-apart long documents (the long-document corpus's test split,
  or a text file): does the loss keep falling with context, as the teacher's does?

Every sequence is a pure function of (seed, task, cell, sample), made from token ids (``data.recall_tasks``), so
the teacher and every variant see the same inputs. Scores are teacher-forced: one forward pass per batch of samples.
The teacher is the same weights run with their own attention (``original_attention``), as in ``attnswap eval``.

usage: attnswap recall --model smollm2-135m --variants "window:w=256,sinks=4" --dtype bfloat16 --out runs/recall
       attnswap recall --swapped runs/distill/final --out runs/recall-distilled
writes recall.json (config, run info, every cell, the ratios), passkey.csv, induction.csv, mqar.csv,
ppl_by_position.csv, and passkey.png, induction.png, mqar.png, ppl_by_position.png.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from attnswap.data.recall_tasks import Sample, Vocabulary, induction_sample, mqar_sample, passkey_sample
from attnswap.errors import AttnswapError
from attnswap.hf.models import max_positions
from attnswap.measure.evaluate import _logits
from attnswap.runs import atomic_write, holding_out_folder
from attnswap.variants.base import check

TASKS = ("passkey", "induction", "mqar", "ppl")
TEACHER = "teacher"


# --- scoring -----------------------------------------------------------------------------------
@torch.no_grad()
def top1_correct(model: nn.Module, samples: Sequence[Sample]) -> list[torch.Tensor]:
    """Per sample, (n_targets,) bool on the CPU: the model's top-1 prediction equals each scored token. The samples
    of one call have one length; their numbers of targets may differ."""
    device = next(model.parameters()).device
    ids = torch.stack([s.ids for s in samples]).to(device)  # (B, T)
    first = min(int(s.targets.min()) for s in samples)
    keep = ids.shape[1] - first + 1  # logits from position first - 1 on
    predicted = _logits(model, ids, keep).argmax(dim=-1).cpu()  # (B, keep): the token after each kept position
    offset = ids.shape[1] - keep
    return [predicted[b, s.targets - 1 - offset] == s.ids[s.targets] for b, s in enumerate(samples)]


@torch.no_grad()
def token_nll(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, T-1) float64 negative log-likelihood of tokens 1..T-1 of ``ids`` (B, T)."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    logits = model(input_ids=ids).logits  # (B, T, V)
    nll = [torch.nn.functional.cross_entropy(logits[b, :-1].float(), ids[b, 1:], reduction="none")
           for b in range(ids.shape[0])]  # one row at a time: a (T, V) float32 copy, not (B, T, V)
    return torch.stack(nll).double().cpu()


def position_buckets(context: int, first: int = 64) -> list[tuple[int, int]]:
    """[start, end) position ranges of the scored tokens (position p = predicted with p tokens of context):
    [1, first), then doubling up to ``context``."""
    edges = [1, first]
    while edges[-1] < context:
        edges.append(min(edges[-1] * 2, context))
    return [(a, b) for a, b in zip(edges, edges[1:]) if a < b]


# --- the command -------------------------------------------------------------------------------
@dataclass
class RecallConfig:
    model: str = ""  # hub name, local directory, smollm2-135m or a .gguf file; empty = the bundled teacher
    variants: list[str] = field(default_factory=lambda: ["window:w=256,sinks=4"])  # specs swapped into `model`
    swapped: list[str] = field(default_factory=list)  # folders written by attnswap.save, scored beside the variants
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    lengths: list[int] = field(default_factory=list)  # passkey lengths; empty = max/8, max/4, max/2, max (<= 8192)
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 4  # sequences per cell (per length x depth, distance, pairs x gap)
    batch_size: int = 4  # sequences per forward pass
    distances: list[int] = field(default_factory=list)  # induction; empty = 64, 128, ... up to the longest length
    segment: int = 32  # induction: tokens of the repeated segment
    mqar_pairs: list[int] = field(default_factory=lambda: [8, 32])
    mqar_gaps: list[int] = field(default_factory=list)  # empty = 0, then doubling from 256 to what fits
    ppl_data: str = ""  # text file for perplexity by position; empty = the long-document corpus's test split
    ppl_documents: int = 8  # documents scored (each its first `length` tokens); fewer if fewer are long enough
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    out: str = "runs/recall"

    def __post_init__(self):
        unknown = sorted(set(self.tasks) - set(TASKS))
        check(not unknown, f"unknown task {unknown[0] if unknown else ''!r}; choose from: {', '.join(TASKS)}")
        for key in ("samples", "batch_size", "segment", "ppl_documents"):
            check(getattr(self, key) >= 1, f"{key} must be >= 1, got {key}={getattr(self, key)}")
        check(all(0.0 <= d <= 1.0 for d in self.depths), f"depths must lie in [0, 1], got depths={self.depths}")
        check(all(n >= 1 for n in self.mqar_pairs), f"mqar_pairs must be >= 1, got mqar_pairs={self.mqar_pairs}")
        check(all(g >= 0 for g in self.mqar_gaps), f"mqar_gaps must be >= 0, got mqar_gaps={self.mqar_gaps}")


@holding_out_folder
def recall(config: RecallConfig) -> dict[str, Any]:
    """Run the suite on the teacher and on each variant / saved swap; write the run folder; return recall.json's
    content."""
    from attnswap.measure.generate import load_swapped, run_info, swapped_labels
    from attnswap.hf.models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_device, resolve_dtype
    from attnswap.hf.swap import swap, unswap
    from attnswap.variants import get_variant

    out = Path(config.out)
    start = time.time()
    specs = [get_variant(v) for v in config.variants]  # a bad spec fails before the weights load
    name = config.model or DEFAULT_MODEL
    info = run_info(config, name, resolve_device(config.device), resolve_dtype(config.dtype))  # the code that runs
    base = load_model(name, device=config.device, dtype=config.dtype)
    vocab = Vocabulary.from_tokenizer(load_tokenizer(name))
    lengths = config.lengths or default_lengths(base)
    for length in lengths:
        check_fits(base, length)
    plan = _cells(config, lengths)
    print(f"recall: {name}, lengths {lengths}, tasks {', '.join(config.tasks)}, "
          f"{len(specs) + len(config.swapped)} variant(s)")
    documents = _ppl_documents(config, load_tokenizer(name), max(lengths)) if "ppl" in config.tasks else None

    results = {TEACHER: run_suite(base, vocab, plan, config, documents, TEACHER, max(lengths))}
    labels = {TEACHER: {"spec": "full", "model": name}}
    for spec, text in zip(specs, config.variants):
        label = spec.spec
        torch.manual_seed(config.seed)  # random variant state (e.g. random features)
        swap(base, spec)
        results[label] = run_suite(base, vocab, plan, config, documents, label, max(lengths))
        unswap(base)
        labels[label] = {"spec": text, "model": name}
    del base
    for folder, label in zip(config.swapped, swapped_labels(config.swapped)):
        model, _, _ = load_swapped(name, "", folder, config.device, config.dtype)  # its teacher: `name`, above
        results[label] = run_suite(model, vocab, plan, config, documents, label, max(lengths))
        labels[label] = {"swapped": folder, "model": name}
        del model

    summary = {label: ratios(results[label], results[TEACHER]) for label in results if label != TEACHER}
    report = {"run": info, "lengths": lengths, "labels": labels,
              "summary": summary, "results": results, "seconds": round(time.time() - start, 1)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "recall.json", json.dumps(report, indent=1))
    write_tables(out, results)
    draw(out, results, plan)
    print(markdown_summary(report))
    print(f"wrote {out / 'recall.json'} and its CSV / PNG files in {report['seconds']} s")
    return report


def default_lengths(model: nn.Module) -> list[int]:
    longest = min(max_positions(model) or 8192, 8192)
    return [longest // 8, longest // 4, longest // 2, longest]


def check_fits(model: nn.Module, length: int) -> None:
    limit = max_positions(model)
    if limit is not None and length > limit:
        raise AttnswapError(f"length {length} exceeds the model's {limit} positions; use --lengths <= {limit}")


def _cells(config: RecallConfig, lengths: list[int]) -> dict[str, list[tuple]]:
    """Each task's cells: passkey (length, depth), induction (distance,), mqar (pairs, gap), ppl (length,)."""
    longest = max(lengths)
    farthest = longest - config.segment
    distances = config.distances or [d for d in (2 ** k for k in range(6, 14)) if config.segment < d < farthest] \
        + [farthest]
    plan: dict[str, list[tuple]] = {}
    if "passkey" in config.tasks:
        plan["passkey"] = [(length, depth) for length in lengths for depth in config.depths]
    if "induction" in config.tasks:
        plan["induction"] = [(d,) for d in distances]
    if "mqar" in config.tasks:
        cells = []
        for pairs in config.mqar_pairs:
            room = longest - 4 * pairs  # stored pairs and queries
            gaps = config.mqar_gaps or [0] + [g for g in (2 ** k for k in range(8, 14)) if g <= room]
            cells += [(pairs, g) for g in gaps if g <= room]
        plan["mqar"] = cells
    if "ppl" in config.tasks:
        plan["ppl"] = [(longest,)]
    return plan


def _ppl_documents(config: RecallConfig, tokenizer, length: int) -> torch.Tensor:
    """(n, length) ids: the first ``length`` tokens of each held-apart document at least that long."""
    if config.ppl_data:
        from attnswap.data.tokens import load_texts

        texts = load_texts(config.ppl_data)
    else:
        from attnswap.data.long_documents import long_documents

        texts = [d.text for d in long_documents("test")]
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= length:
            rows.append(torch.tensor(ids[:length]))
        if len(rows) == config.ppl_documents:
            break
    if not rows:
        raise AttnswapError(f"no document of {config.ppl_data or 'the long-document test split'} has {length} "
                            "tokens; give --ppl_data a longer text or shorter --lengths")
    return torch.stack(rows)


def run_suite(model: nn.Module, vocab: Vocabulary, plan: dict[str, list[tuple]], config: RecallConfig,
              documents: torch.Tensor | None, label: str, longest: int) -> dict[str, list[dict[str, Any]]]:
    """Every cell of every task for one model: {task: [{cell..., "score": share right, "samples": n}]};
    induction and mqar sequences are ``longest`` tokens."""
    found: dict[str, list[dict[str, Any]]] = {}
    makers = {
        "passkey": lambda cell, s: passkey_sample(vocab, cell[0], cell[1], config.seed, s),
        "induction": lambda cell, s: induction_sample(vocab, longest, cell[0], config.segment, config.seed, s),
        "mqar": lambda cell, s: mqar_sample(vocab, longest, cell[0], cell[1], config.seed, s),
    }
    names = {"passkey": ("length", "depth"), "induction": ("distance",), "mqar": ("pairs", "gap")}
    total = sum(len(cells) for task, cells in plan.items() if task != "ppl")
    with tqdm(total=total, desc=f"recall {label}", unit="cell") as bar:
        for task, cells in plan.items():
            if task == "ppl":
                continue
            rows = []
            for cell in cells:
                samples = [makers[task](cell, s) for s in range(config.samples)]
                correct = [c for i in range(0, len(samples), config.batch_size)
                           for c in top1_correct(model, samples[i:i + config.batch_size])]
                # passkey: a sample counts when every answer token is right; the others: token accuracy
                score = np.mean([bool(c.all()) for c in correct]) if task == "passkey" \
                    else float(torch.cat(correct).float().mean())
                rows.append({**dict(zip(names[task], cell)), "score": float(score), "samples": len(samples)})
                bar.update(1)
            found[task] = rows
    if "ppl" in plan and documents is not None:
        found["ppl"] = ppl_by_position(model, documents, config.batch_size, label)
    return found


def ppl_by_position(model: nn.Module, documents: torch.Tensor, batch_size: int, label: str) -> list[dict[str, Any]]:
    """Mean NLL and perplexity per position bucket, and over the whole window (bucket "all")."""
    nll = torch.cat([token_nll(model, documents[i:i + batch_size])
                     for i in tqdm(range(0, len(documents), batch_size), desc=f"ppl {label}", unit="batch")])
    rows = []
    for start, end in position_buckets(documents.shape[1]):
        mean = float(nll[:, start - 1:end - 1].mean())  # column p-1 is the token at position p
        rows.append({"bucket": f"{start}-{end}", "start": start, "end": end, "nll": mean, "ppl": math.exp(mean)})
    mean = float(nll.mean())
    rows.append({"bucket": "all", "start": 1, "end": documents.shape[1], "nll": mean, "ppl": math.exp(mean),
                 "documents": len(documents), "tokens": nll.numel()})
    return rows


def ratios(variant: dict[str, list[dict]], teacher: dict[str, list[dict]]) -> dict[str, Any]:
    """Per task, the worst cell's score ÷ the teacher's same cell (cells where the teacher scores 0 have no ratio
    and are counted apart), and the perplexity ratio over the whole window."""
    found: dict[str, Any] = {}
    for task in ("passkey", "induction", "mqar"):
        if task not in variant:
            continue
        cell_ratios = [v["score"] / t["score"] for v, t in zip(variant[task], teacher[task]) if t["score"] > 0]
        found[f"{task}_min_ratio"] = min(cell_ratios) if cell_ratios else None
        found[f"{task}_mean_score"] = float(np.mean([v["score"] for v in variant[task]]))
        found[f"{task}_teacher_mean_score"] = float(np.mean([t["score"] for t in teacher[task]]))
        found[f"{task}_cells_teacher_zero"] = sum(t["score"] == 0 for t in teacher[task])
    if "ppl" in variant:
        found["ppl_ratio"] = variant["ppl"][-1]["ppl"] / teacher["ppl"][-1]["ppl"]
        found["ppl_context"] = variant["ppl"][-1]["end"]
    return found


# --- files -------------------------------------------------------------------------------------
def write_tables(out: Path, results: dict[str, dict[str, list[dict]]]) -> None:
    """One CSV per task: a row per (model, cell), with the teacher's score and the ratio beside each."""
    teacher = results[TEACHER]
    for task in teacher:
        value = "ppl" if task == "ppl" else "score"
        name = "ppl_by_position" if task == "ppl" else task
        keys = [k for k in teacher[task][0] if k not in ("score", "samples", "nll", "ppl", "documents", "tokens")]
        text = io.StringIO()
        writer = csv.writer(text)  # quotes the labels: variant specs hold commas
        writer.writerow(["model", *keys, value, f"teacher_{value}", "ratio"])
        for label, found in results.items():
            for row, base in zip(found[task], teacher[task]):
                ratio = row[value] / base[value] if base[value] else ""
                writer.writerow([label, *(row[k] for k in keys), row[value], base[value], ratio])
        atomic_write(out / f"{name}.csv", text.getvalue())


def draw(out: Path, results: dict[str, dict[str, list[dict]]], plan: dict[str, list[tuple]]) -> None:
    from attnswap.plots import Panel, Series, line_plot, score_grids

    teacher = results[TEACHER]
    if "passkey" in teacher:
        lengths = sorted({r["length"] for r in teacher["passkey"]})
        depths = sorted({r["depth"] for r in teacher["passkey"]})
        grids = []
        for label, found in results.items():
            grid = np.full((len(depths), len(lengths)), np.nan)
            for row in found["passkey"]:
                grid[depths.index(row["depth"]), lengths.index(row["length"])] = row["score"]
            grids.append((label, grid))
        score_grids(grids, [f"{d:.0%}" for d in depths], [str(n) for n in lengths], out / "passkey.png",
                    title="passkey retrieved (share of samples)", xlabel="length (tokens)", ylabel="needle depth")
    if "induction" in teacher:
        series = [Series(label, [r["distance"] for r in found["induction"]], [r["score"] for r in found["induction"]])
                  for label, found in results.items()]
        line_plot(Panel("copy at a distance", series, "distance (tokens)", "top-1 accuracy on the copy", logx=True),
                  out / "induction.png")
    if "mqar" in teacher:
        panels = []
        for pairs in sorted({r["pairs"] for r in teacher["mqar"]}):
            series = [Series(label, [r["gap"] + 1 for r in found["mqar"] if r["pairs"] == pairs],
                             [r["score"] for r in found["mqar"] if r["pairs"] == pairs])
                      for label, found in results.items()]
            panels.append(Panel(f"{pairs} key-value pairs", series, "gap + 1 (tokens)", "top-1 accuracy on values",
                                logx=True))
        line_plot(panels, out / "mqar.png", title="multi-query associative recall")
    if "ppl" in teacher:
        series = [Series(label, [r["end"] for r in found["ppl"][:-1]], [r["nll"] for r in found["ppl"][:-1]])
                  for label, found in results.items()]
        line_plot(Panel("loss by position", series, "position (bucket end, tokens)", "mean NLL (nats)", logx=True),
                  out / "ppl_by_position.png")


def markdown_summary(report: dict[str, Any]) -> str:
    """A table: one row per variant, the worst cell's ratio per task and the perplexity ratio."""
    columns = ["passkey_min_ratio", "induction_min_ratio", "mqar_min_ratio", "ppl_ratio"]
    lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, found in report["summary"].items():
        cells = [("-" if found.get(c) is None else f"{found[c]:.3f}") for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
