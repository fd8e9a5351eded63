"""Harden a distilled mixture and measure what it buys: which candidate masks survive in which heads, how
dense the hardened masks are, and how fast the hardened attention runs.

    attnswap harden --swapped runs/mixture/model --coverage 0.9 --lengths 1024,8192 --out runs/harden
    attnswap eval --swapped runs/harden/model --out runs/harden/eval      # the hardened model's perplexity

Two rules choose, per head, the candidates to keep; the head's mask becomes the union of those it kept.

``rule=mass`` (the default) follows the attention the trained mixture actually pays. Under the mixture,
p(kv | q) ∝ exp(score) · Σ_k w_k·1[kv ∈ cand_k], so p splits exactly into one share per candidate,
p_k(kv | q) = p(kv | q) · w_k·1[kv ∈ cand_k] / Σ_j w_j·1[kv ∈ cand_j], and candidate k's *mass* is Σ_kv p_k,
averaged over the queries of ``blocks`` validation blocks (``candidate_mass``). Each head keeps its candidates
in order of mass until they carry ``coverage`` of it (``kept_by_mass``). A key the kept union no longer allows
held at most the mass of the dropped candidates, so at least ``coverage`` of the attention stays reachable.

``rule=weight`` (``MixtureState.harden``) drops every candidate whose weight divided by the head's largest is
below ``threshold``. It is wrong for nested candidates: a small window collects the largest weight while the
long windows, at weights of 0.02-0.09, still carry most of the mass (on the bundled teacher it took a distilled
mixture's perplexity from 123 to 6024). Writes into ``out``:

    harden.json     rule, threshold or coverage, model, per layer and head the normalised weights, the masses
                    (rule=mass), kept candidates and densities before and after; candidates kept per layer,
                    mean densities (the kept density: "after"), and the speed totals
    survivors.csv   one row per (layer, head, candidate); survivors.png: the masses (or the weights), × on
                    dropped candidates
    model/          the hardened model (``attnswap.save``), for ``attnswap eval --swapped``
    speed_results.jsonl / .csv, speed_summary.json, speed.png
                    per layer, length and mode: attention time of the hardened state, the unhardened state and
                    dense causal SDPA (flash backend) on random q/k/v of the model's head shapes, with the
                    fraction of ``block``×``block`` tiles each mask allows; totals over layers and their ratios

Density is the fraction of the causal triangle a head's mask allows (1 = full attention). "Before" is the
model as loaded: for a freshly distilled one, every candidate. Timing is bench-kernel's: the median of
``repeats`` calls after ``warmup``, peak memory per case. The mixture's forward+backward runs the
materialising path (see kernels/flex.py: inductor cannot lower the backward of its score bias), so that
mode measures training as it runs today, not what a fused kernel could do.
"""

from __future__ import annotations

import copy
import functools
import csv
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from attnswap.config import config_to_dict
from attnswap.data.tokens import WIKITEXT2_VALID, pack_blocks, refuse_test_source, token_stream
from attnswap.errors import AttnswapError
from attnswap.hf.attention import STATE_ATTR
from attnswap.hf.models import DEFAULT_MODEL, load_tokenizer, resolve_device, resolve_dtype
from attnswap.hf.saved import load, save
from attnswap.hf.swap import attention_modules, head_shape, observe_attention, swapped_variant
from attnswap.kernels.counting import allowed_fractions
from attnswap.kernels.masks import causal, to_index_mask
from attnswap.measure.bench_kernel import (DENSE, MODES, dense_causal_attention, dtype_name, environment, guarded,
                                           open_rows, scaling_figure, time_attention_case, write_results)
from attnswap.plots import marked_grid
from attnswap.runs import atomic_directory, atomic_write, holding_out_folder
from attnswap.variants import AttnContext, get_variant
from attnswap.variants.mixture import (Mixture, MixtureState, candidate_mass, density, harden, kept_by_mass,
                                       mixture_state)

log = logging.getLogger(__name__)

# What is timed, in order: the dense baseline, the mixture as loaded, the mixture hardened.
CONTENDERS = ("dense", "unhardened", "hardened")
RULES = ("mass", "weight")


@dataclass
class HardenConfig:
    swapped: str = ""  # folder of a distilled mixture model (attnswap distill writes it to its OUT/model)
    rule: str = "mass"  # mass: keep what carries the attention; weight: keep what weighs (see the module doc)
    coverage: float = 0.9  # rule=mass: each head keeps its heaviest candidates until they carry this much mass
    threshold: float = 0.1  # rule=weight: a candidate whose weight over its head's largest is below this is dropped
    data: str = WIKITEXT2_VALID  # rule=mass: the text the attention mass is measured on (never a test set)
    blocks: int = 4  # rule=mass: validation blocks of `context` tokens
    context: int = 1024
    lengths: list[int] = field(default_factory=lambda: [1024, 8192])  # where density and speed are measured
    modes: list[str] = field(default_factory=lambda: list(MODES))  # forward+backward: dense and hardened only
    device: str = "auto"
    dtype: str = "auto"  # of the timed q/k/v; auto = bfloat16 on CUDA, float32 on CPU
    repeats: int = 5  # timed calls per case; the median is reported
    warmup: int = 2  # untimed calls first (compilation, block masks, allocator)
    block: int = 128  # tile size of the allowed-tile fractions (FlexAttention's)
    seed: int = 0  # of the random q/k/v
    out: str = "runs/harden"


@holding_out_folder
def harden_model(config: HardenConfig) -> Path:
    """Harden ``config.swapped``; write survivors, densities, the hardened model and its speed to ``config.out``."""
    _check(config)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype if config.dtype != "auto" else
                          "bfloat16" if device.type == "cuda" else "float32")
    log.info("harden config: %s", json.dumps(config_to_dict(config)))
    swapped, out = Path(config.swapped), Path(config.out)
    model = load_mixture(config.swapped)
    variant = swapped_variant(model)
    before = mixture_states(model, device)  # copies: hardening changes the model's own states in place
    masses = None
    if config.rule == "mass":
        tokenizer = _saved_tokenizer(swapped) or load_tokenizer(_base_model(swapped) or DEFAULT_MODEL)
        blocks = pack_blocks(token_stream(config.data, tokenizer, split="validation"), config.context)
        masses = attention_mass(model, blocks[: config.blocks])
        harden_by_mass(model, masses, config.coverage)
    else:
        harden(model, config.threshold)
    after = mixture_states(model, device)
    env = environment(device)

    # --- which candidates survive where, and how dense the hardened masks are
    heads = survivor_records(before, after, config.lengths, shared=variant.params.per == "layer", masses=masses)
    summary = {"kind": "harden", "config": config_to_dict(config), "environment": env, "model": str(swapped),
               "variant": variant.spec, "rule": config.rule,
               **({"coverage": config.coverage} if masses else {"threshold": config.threshold}),
               "candidates": list(variant.params.candidates),
               "lengths": config.lengths, "hardened_model": str(out / "model"),
               "kept_per_layer": kept_per_layer(heads, variant.params.candidates),
               "mean_density": mean_density(heads, config.lengths), "heads": heads}
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "survivors.csv", survivor_rows(heads, {**env, "model": str(swapped), "rule": config.rule,
                                                           "threshold": config.threshold,
                                                           "coverage": config.coverage}))
    survivor_plot(heads, variant.params.candidates, out / "survivors.png", config)
    _write_json(out / "harden.json", summary)  # now, so an interrupted speed run still leaves the survivors

    # --- the hardened model, for `attnswap eval`
    with atomic_directory(out / "model") as building:  # a kill mid-save leaves no half-written model/
        save(model, building, tokenizer=_saved_tokenizer(swapped))
    log.info("saved the hardened model to %s", out / "model")

    # --- speed of the attention, layer by layer
    head_dim, num_heads = head_shape(model)
    del model  # only the state copies are timed
    rows = time_attention(variant, before, after, num_heads, head_dim, config, device, dtype,
                          {**env, "model": str(swapped)}, out)
    totals = speed_totals(rows)
    ratios = speed_ratios(totals)
    plot = scaling_figure(totals, out / "speed.png",
                          f"whole-model attention, {len(after)} layers ({dtype_name(dtype)}, H={num_heads}, "
                          f"D={head_dim})", [("total_s", "time, all layers (s)"), ("peak_mem_mb", "peak memory (MiB)")],
                          lambda r: (f"{r['contender']} ({r['mode']})", r["contender"], r["mode"] != "forward"))
    speed = {"totals": totals, "ratios": ratios}
    write_results(out, "speed", rows, {"kind": "harden-speed", "config": config_to_dict(config),
                                       "environment": env, **speed})
    _write_json(out / "harden.json", {**summary, "speed": speed,
                                      "plots": ["survivors.png"] + ([plot.name] if plot else [])})
    _print_summary(summary, ratios, out, swapped)
    return out


# --- loading -----------------------------------------------------------------------------------
def load_mixture(directory: str) -> nn.Module:
    """The mixture model saved in ``directory``, on the CPU in its saved dtype.

    On the CPU so that resident weights never count in the attention's peak GPU memory; only copies of the
    mixture states go to the device.
    """
    if not directory:
        raise AttnswapError("swapped is required: give --swapped DIR, the model folder attnswap distill wrote "
                            "(OUT/model) for a 'mixture' variant")
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise AttnswapError(f"no saved model at {path} (missing config.json); give --swapped the model folder "
                            "attnswap distill wrote (OUT/model)")
    saved = json.loads((path / "config.json").read_text())
    spec = (saved.get("attnswap") or {}).get("variant")
    if spec is None or get_variant(spec).name != Mixture.name:
        held = f"variant {spec!r}" if spec else "a model with no swapped attention"
        raise AttnswapError(f"{path} holds {held}, not a mixture; harden a model distilled with --variant mixture")
    return load(path, device="cpu", dtype=saved.get("dtype") or saved.get("torch_dtype") or "float32")


def mixture_states(model: nn.Module, device: torch.device) -> dict[int, MixtureState]:
    """Copies of the model's mixture states on ``device``, by layer index."""
    return {module.layer_idx: copy.deepcopy(getattr(module, STATE_ATTR)).to(device)
            for module in attention_modules(model) if mixture_state(getattr(module, STATE_ATTR, None)) is not None}


def _saved_tokenizer(directory: Path):
    """The tokenizer saved beside the model (attnswap distill saves one), so the hardened folder has it too."""
    return load_tokenizer(str(directory)) if (directory / "tokenizer_config.json").is_file() else None


# --- attention mass ----------------------------------------------------------------------------
def attention_mass(model: nn.Module, blocks: torch.Tensor, batch_size: int = 1) -> dict[int, torch.Tensor]:
    """``candidate_mass`` of every mixture layer of ``model`` on ``blocks`` (N, T) of token ids, by layer index,
    averaged over the blocks."""
    sums: dict[int, torch.Tensor] = {}

    def observe(module, variant, q, k, v, ctx, state):
        if mixture_state(state) is not None:
            mass = candidate_mass(variant, state, q, k, ctx).cpu()
            sums[module.layer_idx] = sums.get(module.layer_idx, 0) + mass * q.shape[0]

    device = next(model.parameters()).device
    with torch.no_grad(), observe_attention(model, observe):
        for ids in tqdm(blocks.split(batch_size), desc="attention mass", dynamic_ncols=True):
            model(input_ids=ids.to(device))
    return {layer: total / blocks.shape[0] for layer, total in sums.items()}


def harden_by_mass(model: nn.Module, masses: dict[int, torch.Tensor], coverage: float) -> None:
    """Keep, in every mixture layer of ``model``, each head's candidates that carry ``coverage`` of its mass."""
    for module in attention_modules(model):
        state = mixture_state(getattr(module, STATE_ATTR, None))
        if state is not None:
            state.kept &= kept_by_mass(masses[module.layer_idx], coverage).to(state.kept.device)


# --- survivors and density ---------------------------------------------------------------------
def survivor_records(before: dict[int, MixtureState], after: dict[int, MixtureState], lengths: list[int],
                     shared: bool, masses: dict[int, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """One record per (layer, head): normalised weights before hardening, the attention masses (when measured),
    kept and dropped candidates, and the density at each length before and after. ``shared``: one weight row
    serves the layer (head is None)."""
    records = []
    for layer, state in tqdm(before.items(), desc="density", dynamic_ncols=True):
        hardened = after[layer]
        normalised = state.normalised().detach().cpu().tolist()  # (H|1, K)
        kept = hardened.kept.cpu().tolist()
        density_before = {n: density(state, n).tolist() for n in lengths}
        density_after = {n: density(hardened, n).tolist() for n in lengths}
        for row, (weights, keeps) in enumerate(zip(normalised, kept)):
            records.append({
                "layer": layer, "head": None if shared else row,
                "weights": dict(zip(state.candidates, weights)),
                **({"mass": dict(zip(state.candidates, masses[layer][row].tolist()))} if masses else {}),
                "kept": [c for c, keep in zip(state.candidates, keeps) if keep],
                "dropped": [c for c, keep in zip(state.candidates, keeps) if not keep],
                "density_before": {str(n): density_before[n][row] for n in lengths},
                "density_after": {str(n): density_after[n][row] for n in lengths},
            })
    return records


def kept_per_layer(heads: list[dict], candidates: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per layer: candidates kept by each head, their mean, and how many heads keep each candidate."""
    layers: dict[int, list[dict]] = {}
    for record in heads:
        layers.setdefault(record["layer"], []).append(record)
    return [{"layer": layer, "kept_per_head": [len(r["kept"]) for r in records],
             "mean_kept": statistics.mean(len(r["kept"]) for r in records),
             "heads_keeping": {c: sum(c in r["kept"] for r in records) for c in candidates}}
            for layer, records in layers.items()]


def mean_density(heads: list[dict], lengths: list[int]) -> dict[str, dict[str, float]]:
    """Mean over every (layer, head) of the density before and after, per length."""
    return {str(n): {when: statistics.mean(r[f"density_{when}"][str(n)] for r in heads)
                     for when in ("before", "after")} for n in lengths}


def survivor_rows(heads: list[dict], common: dict[str, Any]) -> list[dict[str, Any]]:
    """survivors.csv: one row per (layer, head, candidate), each with ``common`` (environment, model, threshold)."""
    rows = []
    for record in heads:
        densities = {f"density_{when}_{n}": d for when in ("before", "after")
                     for n, d in record[f"density_{when}"].items()}
        for candidate, weight in record["weights"].items():
            rows.append({**common, "layer": record["layer"], "head": record["head"], "candidate": candidate,
                         "normalised_weight": weight, "mass": record.get("mass", {}).get(candidate),
                         "kept": candidate in record["kept"], **densities})
    return rows


def survivor_plot(heads: list[dict], candidates: tuple[str, ...], path: Path, config: HardenConfig) -> Path:
    """Rows = layer·head, columns = candidates, colour = what the rule read (attention mass, or normalised weight
    before hardening), × = dropped."""
    by_mass = config.rule == "mass"
    values = np.array([[r["mass" if by_mass else "weights"][c] for c in candidates] for r in heads])
    dropped = np.array([[c in r["dropped"] for c in candidates] for r in heads])
    labels = [f"L{r['layer']}" + ("" if r["head"] is None else f"·h{r['head']}") for r in heads]
    return marked_grid(values, dropped, labels, candidates, path,
                       colour_label="attention mass" if by_mass else "weight / head's largest",
                       title="mixture candidates, × = dropped ("
                             + (f"beyond {config.coverage:g} of the mass)" if by_mass
                                else f"below {config.threshold:g})"))


# --- speed -------------------------------------------------------------------------------------
def time_attention(variant: Mixture, before: dict[int, MixtureState], after: dict[int, MixtureState],
                   num_heads: int, head_dim: int, config: HardenConfig, device: torch.device, dtype: torch.dtype,
                   common: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """One row per (length, layer, contender, mode), streamed to speed_results.jsonl as measured."""
    states = {"dense": {layer: None for layer in after}, "unhardened": before, "hardened": after}
    cases = [(n, layer, contender, mode) for n in config.lengths for layer in after for contender in CONTENDERS
             for mode in config.modes if mode == "forward" or contender != "unhardened"]
    fractions: dict[tuple, tuple[float, float]] = {}
    rows = []
    with open_rows(out, "speed") as stream, tqdm(cases, desc="speed", dynamic_ncols=True) as bar:
        for n, layer, contender, mode in bar:
            bar.set_postfix_str(f"n={n} layer {layer} {contender} {mode}")
            state = states[contender][layer]
            attend = _attention(variant, state, head_dim**-0.5)
            key = (n, None) if state is None else (n, id(state))  # causal tiles are the same in every layer
            if key not in fractions:
                fractions[key] = _allowed_fractions(variant, state, n, num_heads, config.block, device)
            row = {**common, "dtype": dtype_name(dtype), "shape": f"(1,{num_heads},{n},{head_dim})",
                   "variant": DENSE if state is None else variant.label, "contender": contender, "mode": mode,
                   "length": n, "layer": layer, "tile_fraction": fractions[key][0], "pair_fraction": fractions[key][1]}
            row.update(guarded(lambda: _time_case(attend, state, mode, n, num_heads, head_dim, config, device, dtype),
                               device))
            rows.append(row)
            stream.write(json.dumps(row) + "\n")
    return rows


def _attention(variant: Mixture, state: MixtureState | None, scaling: float) -> Callable[..., torch.Tensor]:
    """attend(q, k, v) -> (B, H, T, D): dense causal SDPA (flash backend) for no state, else the mixture."""
    if state is None:
        return functools.partial(dense_causal_attention, scaling=scaling)
    ctx = AttnContext(scaling=scaling)
    return lambda q, k, v: variant.attend(q, k, v, ctx, state)


def _time_case(attend: Callable[..., torch.Tensor], state: MixtureState | None, mode: str, n: int, heads: int,
               head_dim: int, config: HardenConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    result, _, _ = time_attention_case(attend, (1, heads, n, head_dim), mode, device, dtype, config.seed,
                                       config.repeats, config.warmup,
                                       parameters=state.parameters() if state is not None else ())
    return result


def _allowed_fractions(variant: Mixture, state: MixtureState | None, n: int, heads: int, block: int,
                       device: torch.device) -> tuple[float, float]:
    """(fraction of block×block tiles with an allowed pair, fraction of allowed pairs) over the n×n scores."""
    pos = torch.arange(n, device=device)
    positional = causal if state is None else variant.positional_mask(AttnContext(scaling=1.0), 1, device, state)
    with torch.no_grad():
        return allowed_fractions(to_index_mask(positional, pos, pos, None), 1, heads, n, n, block, device)


def speed_totals(rows: list[dict]) -> list[dict[str, Any]]:
    """Per (mode, length, contender): time summed over layers (None if a layer failed), the largest peak memory
    and the mean tile fraction over layers."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["length"], row["contender"]), []).append(row)
    totals = []
    for (mode, n, contender), group in groups.items():
        ok = all(r["status"] == "ok" for r in group)
        peaks = [r["peak_mem_mb"] for r in group if r.get("peak_mem_mb") is not None]
        totals.append({"mode": mode, "length": n, "contender": contender, "layers": len(group),
                       "total_s": sum(r["median_s"] for r in group) if ok else None,
                       "peak_mem_mb": max(peaks) if peaks else None,
                       "tile_fraction": statistics.mean(r["tile_fraction"] for r in group),
                       "status": "ok" if ok else ",".join(sorted({r["status"] for r in group} - {"ok"}))})
    return totals


def speed_ratios(totals: list[dict]) -> list[dict[str, Any]]:
    """Per (mode, length): hardened / unhardened time (below 1: hardening helps) and dense / hardened time
    (above 1: the hardened mixture beats dense attention)."""
    by_case: dict[tuple, dict[str, float | None]] = {}
    for t in totals:
        by_case.setdefault((t["mode"], t["length"]), {})[t["contender"]] = t["total_s"]
    ratios = []
    for (mode, n), time_of in by_case.items():
        ratios.append({"mode": mode, "length": n, **{f"{c}_s": time_of.get(c) for c in CONTENDERS},
                       "hardened_over_unhardened": _ratio(time_of.get("hardened"), time_of.get("unhardened")),
                       "dense_over_hardened": _ratio(time_of.get("dense"), time_of.get("hardened"))})
    return ratios


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# --- output ------------------------------------------------------------------------------------
def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=1) + "\n")
    log.info("wrote %s", path)


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of dicts as a CSV file, with every key any row has as a column."""
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    log.info("wrote %s", path)


def _print_summary(summary: dict, ratios: list[dict], out: Path, swapped: Path) -> None:
    for layer in summary["kept_per_layer"]:
        print(f"layer {layer['layer']}: {layer['mean_kept']:.2f} of {len(summary['candidates'])} candidates kept "
              f"per head; heads keeping each: {layer['heads_keeping']}")
    for n, d in summary["mean_density"].items():
        print(f"n={n}: mean density {d['before']:.4f} -> {d['after']:.4f}")
    for r in ratios:
        times = ", ".join(f"{c} {r[f'{c}_s'] * 1e3:.3f} ms" for c in CONTENDERS if r[f"{c}_s"] is not None)
        ratio_text = ", ".join(f"{name} {r[name]:.3f}" for name in ("hardened_over_unhardened", "dense_over_hardened")
                               if r[name] is not None)
        print(f"n={r['length']} {r['mode']}, all layers: {times}; {ratio_text}")
    base = _base_model(swapped)
    model_flag = f" --model {base}" if base else ""
    print(f"perplexity of the hardened model:   attnswap eval --swapped {out / 'model'}{model_flag} "
          f"--out {out / 'eval'}")
    print(f"and of the unhardened one, to compare: attnswap eval --swapped {swapped}{model_flag} "
          f"--out {out / 'eval-unhardened'}")


def _base_model(swapped: Path) -> str:
    """The base model of the distill run that wrote ``swapped`` (its config.yaml), or "" for the bundled one:
    eval compares the swapped model against this original."""
    run_config = swapped.parent / "config.yaml"
    loaded = yaml.safe_load(run_config.read_text()) if run_config.is_file() else None
    return str(loaded.get("model") or "") if isinstance(loaded, dict) else ""


def _check(config: HardenConfig) -> None:
    if config.rule not in RULES:
        raise AttnswapError(f"unknown rule {config.rule!r}; choose from: {', '.join(RULES)}")
    if config.rule == "mass":
        refuse_test_source(config.data, "validation")  # what survives must not be chosen on the test text
    if not 0 < config.coverage <= 1:
        raise AttnswapError(f"coverage must be in (0, 1], got coverage={config.coverage}")
    if config.blocks < 1 or config.context < 2:
        raise AttnswapError(f"blocks must be >= 1 and context >= 2, got blocks={config.blocks}, "
                            f"context={config.context}")
    if not 0 < config.threshold <= 1:
        raise AttnswapError(f"threshold must be in (0, 1], got threshold={config.threshold}")
    if not config.lengths or min(config.lengths) < 1:
        raise AttnswapError(f"lengths must be positive integers, got {config.lengths}")
    bad_modes = [m for m in config.modes if m not in MODES]
    if bad_modes or not config.modes:
        raise AttnswapError(f"unknown mode {(bad_modes or ['(none)'])[0]!r}; choose from: {', '.join(MODES)}")
    for key in ("repeats", "block"):
        if getattr(config, key) < 1:
            raise AttnswapError(f"{key} must be >= 1, got {key}={getattr(config, key)}")
    if config.warmup < 0:
        raise AttnswapError(f"warmup must be >= 0, got warmup={config.warmup}")
