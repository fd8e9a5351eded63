"""Generations of the original and the swapped model side by side: same prompts, same seeds, one table.

The original column is the swapped model run with its own attention (``original_attention``), so both
columns share one set of weights. Also home of what every result file records about its run
(``run_info``) and of loading "a model with a variant in it" from a spec or a saved directory.
"""

from __future__ import annotations

import html
import json
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm import tqdm

from attnswap.config import config_to_dict
from attnswap.errors import AttnswapError
from attnswap.hf.models import DEFAULT_MODEL, REPO_ROOT, check_length, git_commit, load_model, load_tokenizer
from attnswap.hf.saved import load
from attnswap.hf.swap import keep_original_weights, original_attention, swap, swapped_variant
from attnswap.runs import atomic_write, holding_out_folder
from attnswap.variants import get_variant
from attnswap.variants.base import check

DEFAULT_PROMPTS = REPO_ROOT / "data" / "prompts.txt"
MODES = ("greedy", "sampled")


@dataclass
class GenerateConfig:
    model: str = ""  # hub name or local directory; empty = the bundled teacher
    variant: str = "full"  # one variant spec, or several separated by ';' ("window:w=64,sinks=4;window:w=16")
    swapped: str = ""  # instead of variant: directories written by attnswap.save, separated by ';'
    prompts: str = ""  # text file, one prompt per line; empty = data/prompts.txt
    max_new_tokens: int = 40
    modes: list[str] = field(default_factory=lambda: list(MODES))
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # one sampled row per seed; greedy needs none
    temperature: float = 0.8
    top_k: int = 50
    device: str = "auto"
    dtype: str = "float32"
    out: str = "runs/generate"

    def __post_init__(self):
        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got max_new_tokens={self.max_new_tokens}")
        check(self.top_k >= 0, f"top_k must be >= 0 (0 = no top-k cut), got top_k={self.top_k}")
        check(self.temperature > 0 or "sampled" not in self.modes,
              f"temperature must be > 0 for sampled generation, got temperature={self.temperature}; "
              "use --modes greedy for deterministic text")


# --- what a result file says about its run -----------------------------------------------------
def swapped_labels(folders: Sequence[str]) -> list[str]:
    """A label per saved swap: its folder's name, or, where names repeat (``runs/a/model``, ``runs/b/model``), as
    many of its path's last parts as tell them apart."""
    parts = [Path(folder).resolve().parts for folder in folders]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    raise AttnswapError("--swapped names one folder twice; name each once")


def run_info(config: Any, model_name: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Model, device, dtype, library versions, git commit, resolved config and command line."""
    import transformers

    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "model": model_name,
        "device": str(device) + (f" ({gpu})" if gpu else ""),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": git_commit(),
        "config": config_to_dict(config),
        "command": shlex.join(sys.argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --- loading -----------------------------------------------------------------------------------
def load_swapped(model: str, variant: str, swapped: str, device: str, dtype: str,
                 layers: list[int] | None = None) -> tuple[nn.Module, Any, str]:
    """(swapped model, tokenizer, name to record) from a base model + variant spec (in ``layers``, default all), or
    from a saved directory."""
    if swapped:
        if variant not in ("", "full"):
            raise AttnswapError(f"give either variant ({variant!r}) or swapped ({swapped!r}), not both")
        if layers is not None:
            raise AttnswapError(f"layers={layers} applies to --variant; {swapped} already says which layers it swapped")
        loaded = load(swapped, device=device, dtype=dtype)
        if swapped_variant(loaded) is None:
            raise AttnswapError(f"{swapped} holds a model with no swapped attention; pass it as --model instead")
        # Distillation may have trained base weights too; the original side must be the untouched model.
        original = load_model(model or DEFAULT_MODEL, device=device, dtype=dtype)
        changed = keep_original_weights(loaded, original)
        del original
        if changed:
            print(f"original = {model or DEFAULT_MODEL}; {len(changed)} distilled base tensors differ from it")
        return loaded, load_tokenizer(_tokenizer_source(swapped, model)), swapped
    name = model or DEFAULT_MODEL
    spec = get_variant(variant or "full")  # a bad spec fails before the weights load
    base = load_model(name, device=device, dtype=dtype)
    return swap(base, spec, layers=layers), load_tokenizer(name), name


def _tokenizer_source(swapped_dir: str, model: str) -> str:
    has_own = any((Path(swapped_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    return swapped_dir if has_own else (model or DEFAULT_MODEL)


def read_prompts(path: str | Path = "") -> list[str]:
    """Non-blank lines of a prompts file (surrounding spaces kept: they change the first token)."""
    path = Path(path or DEFAULT_PROMPTS).expanduser()
    if not path.is_file():
        raise AttnswapError(f"no prompts file at {path}; give a text file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AttnswapError(f"prompts file {path} is not UTF-8 text ({exc}); save it as UTF-8") from None
    prompts = [line.rstrip("\r\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise AttnswapError(f"prompts file {path} has no prompts; write one prompt per line")
    return prompts


# --- generation --------------------------------------------------------------------------------
@torch.no_grad()
def generate_text(model: nn.Module, tokenizer, prompt: str, mode: str, seed: int | None, max_new_tokens: int,
                  temperature: float = 0.8, top_k: int = 50) -> str:
    """The continuation (prompt excluded) of one prompt, greedy or sampled with ``seed``."""
    device = next(model.parameters()).device
    encoded = tokenizer(prompt, return_tensors="pt")
    # Only ids and mask: GPT-2 would add the embedding of token 0 for any token_type_ids a tokenizer returns.
    input_ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    if input_ids.shape[1] == 0:
        raise AttnswapError(f"prompt {prompt!r} encodes to no tokens; remove it from the prompts file")
    check_length(model, input_ids.shape[1] + max_new_tokens)
    if mode == "greedy":
        sampling: dict[str, Any] = {"do_sample": False}
    else:
        torch.manual_seed(seed)  # same seed, same random draws: two equal models sample equal text
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         pad_token_id=pad_id, **sampling)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def generation_cases(prompts: list[str], modes: list[str], seeds: list[int]) -> list[tuple[str, str, int | None]]:
    """(prompt, mode, seed) triples: one greedy case per prompt, one sampled case per prompt and seed."""
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise AttnswapError(f"unknown generation mode {bad[0] if bad else '(none)'!r}; choose from: {', '.join(MODES)}")
    if "sampled" in modes and not seeds:
        raise AttnswapError("sampled generation needs at least one seed, e.g. --seeds 0,1")
    cases: list[tuple[str, str, int | None]] = []
    for prompt in prompts:
        if "greedy" in modes:
            cases.append((prompt, "greedy", None))
        if "sampled" in modes:
            cases.extend((prompt, "sampled", seed) for seed in seeds)
    return cases


def generate_all(model: nn.Module, tokenizer, cases, max_new_tokens: int, temperature: float = 0.8,
                 top_k: int = 50, desc: str = "generate") -> list[str]:
    """``generate_text`` for each (prompt, mode, seed) case, in order."""
    return [generate_text(model, tokenizer, prompt, mode, seed, max_new_tokens, temperature, top_k)
            for prompt, mode, seed in tqdm(cases, desc=desc, leave=False)]


def side_by_side_rows(cases, original: list[str], variants: dict[str, list[str]]) -> list[dict[str, Any]]:
    """One row per case: prompt, mode, seed, original text and ``variants`` {label: text}."""
    return [
        {"prompt": prompt, "mode": mode, "seed": seed, "original": original[i],
         "variants": {label: texts[i] for label, texts in variants.items()}}
        for i, (prompt, mode, seed) in enumerate(cases)
    ]


# --- the `attnswap generate` command -----------------------------------------------------------
@holding_out_folder
def generate_side_by_side(config: GenerateConfig) -> list[dict[str, Any]]:
    """Generate with the original and each variant; write generations.{json,md,html} to ``config.out``."""
    out = Path(config.out)
    specs = [s.strip() for s in config.variant.split(";") if s.strip()]
    dirs = [d.strip() for d in config.swapped.split(";") if d.strip()]
    if dirs and specs not in ([], ["full"]):
        raise AttnswapError(f"give either variant ({config.variant!r}) or swapped ({config.swapped!r}), not both")
    for spec in specs:
        get_variant(spec)  # every spec is checked before any weights load
    cases = generation_cases(read_prompts(config.prompts), config.modes, config.seeds)
    print("generate config: " + json.dumps(config_to_dict(config)))
    gen = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k)

    sources = [("", d) for d in dirs] or [(s, "") for s in specs or ["full"]]
    model, tokenizer, name = load_swapped(config.model, sources[0][0], sources[0][1], config.device, config.dtype)
    with original_attention(model):
        original = generate_all(model, tokenizer, cases, desc="original", **gen)
    variants: dict[str, list[str]] = {}
    for i, (spec, directory) in enumerate(sources):
        if i > 0 and directory:
            model, _, _ = load_swapped(config.model, "", directory, config.device, config.dtype)
        elif i > 0:
            swap(model, spec)  # the same base weights, another variant
        variant = swapped_variant(model)
        label = variant.label + (f" ({Path(directory).name})" if directory else "")
        while label in variants:
            label += "'"
        variants[label] = generate_all(model, tokenizer, cases, desc=label, **gen)
    rows = side_by_side_rows(cases, original, variants)

    dtype = next(model.parameters()).dtype
    info = run_info(config, name, next(model.parameters()).device, dtype)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "generations.json", json.dumps({"info": info, "variants": list(variants), "rows": rows}, indent=1))
    title = f"# Generations: original vs {', '.join(variants)}\n\nmodel `{name}`\n\n"
    atomic_write(out / "generations.md", title + markdown_table(rows, list(variants)))
    atomic_write(out / "generations.html", html_table(rows, list(variants), name))
    print(f"{len(rows)} generations side by side -> {out / 'generations.md'}, generations.html, generations.json")
    return rows


# --- tables ------------------------------------------------------------------------------------
def markdown_table(rows: list[dict[str, Any]], labels: list[str]) -> str:
    """The rows as a markdown table: prompt, mode, seed, original, one column per variant label."""
    def cell(text: Any) -> str:
        return "—" if text is None else str(text).replace("|", "\\|").replace("\n", "<br>")

    header = ["prompt", "mode", "seed", "original", *labels]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = [row["prompt"], row["mode"], row["seed"], row["original"], *(row["variants"][x] for x in labels)]
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def html_table(rows: list[dict[str, Any]], labels: list[str], model_name: str = "") -> str:
    def cell(text: Any, tag: str = "td") -> str:
        return f"<{tag}>{'—' if text is None else html.escape(str(text))}</{tag}>"

    head = "".join(cell(h, "th") for h in ["prompt", "mode", "seed", "original", *labels])
    body = "\n".join(
        "<tr>" + "".join(cell(v) for v in [r["prompt"], r["mode"], r["seed"], r["original"],
                                           *(r["variants"][x] for x in labels)]) + "</tr>"
        for r in rows
    )
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;white-space:pre-wrap;max-width:32em}"
             "th{background:#f4f4f4}")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>attnswap generations</title>"
            f"<style>{style}</style></head><body>\n<h1>Generations</h1>\n<p>model: {html.escape(model_name)}</p>\n"
            f"<table>\n<tr>{head}</tr>\n{body}\n</table>\n</body></html>\n")
