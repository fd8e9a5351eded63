"""Generation benchmark: decode tokens/s, prefill time and memory of a swapped model against stock transformers.

    attnswap bench-generate --model configs/shapes/smollm2-135m --max-positions 65536 \\
        --prompts 8192,32768 --batches 1,16 --out benchmarks/results/generation_h100

Side by side in one run, on one model (a model folder, or a folder with only a ``config.json``: random weights
of that shape): HF ``sdpa`` with its growing DynamicCache (``hf_sdpa``), HF ``sdpa`` with a StaticCache and the
decode step compiled (``hf_static_compile``), then each variant over attnswap's bounded cache with the decode step
compiled (``attnswap.hf.decoding``; on the CPU every impl runs eagerly and the compiled baseline is skipped), then
each saved swap (``--swapped``: a routed duo from ``attnswap plan --objective recall``, say) over ``bounded_cache``,
loaded once, alone on the device once the other impls are done.
Every impl runs the same loop (``decoding.prefill`` once, then ``decoding.decode_one_token`` per token), so the
loop's own overhead is the same for all; prompts are random tokens of one length per batch (no padding).

Per (impl, batch, prompt): ``prefill_ms`` (median of ``repeats`` prefills), ``decode_tok_s`` (generated tokens of
all rows per second over ``new_tokens - 1`` decode steps, median of ``repeats``), ``peak_MiB`` (the generation's peak
allocated memory, weights included), ``cache_MiB`` (the cache's own tensors after the last step), and the ratios
to ``hf_sdpa`` (``decode_x_sdpa``, ``prefill_x_sdpa``, ``peak_x_sdpa``) and to ``hf_static_compile``
(``decode_x_static``). One warm-up generation (compilation included) precedes each case. Results: ``summary.json``
(``{"gpu", "torch", "transformers", "command", "rows"}``), ``rows.csv`` and ``generation.png``.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from attnswap.config import config_to_dict
from attnswap.errors import AttnswapError
from attnswap.hf.cache import bounded_cache
from attnswap.hf.decoding import compiled_step, decode_one_token, prefill
from attnswap.hf.models import resolve_device, resolve_dtype
from attnswap.hf.saved import load
from attnswap.hf.swap import swap, unswap
from attnswap.measure.bench_kernel import environment, synchronize
from attnswap.measure.generate import swapped_labels
from attnswap.runs import atomic_write, holding_out_folder
from attnswap.variants import get_variant

log = logging.getLogger(__name__)

BASELINES = ("hf_sdpa", "hf_static_compile")
SWAPPED_PREFIX = "swapped:"  # the impl name of a saved swap: this + its label (measure.generate.swapped_labels)
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")


@dataclass
class GenerateBenchConfig:
    model: str = ""  # a model folder, or a folder holding only config.json (random weights of that shape)
    max_positions: int = 0  # raise the config's max_position_embeddings to this (0 = as it is)
    variants: list[str] = field(default_factory=lambda: ["window:w=256,sinks=4", "hybrid:w=256,sinks=4"])
    # saved swaps of this model (attnswap.save folders: a routed duo, a distilled swap), each measured as it was saved;
    # a cache that grows for some heads (a routed duo) decodes eagerly
    swapped: list[str] = field(default_factory=list)
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    prompts: list[int] = field(default_factory=lambda: [8192, 32768])  # prompt lengths
    batches: list[int] = field(default_factory=lambda: [1])
    new_tokens: int = 128  # greedy tokens after each prompt
    repeats: int = 3  # timed generations per case; medians are reported
    compile: bool = True  # compile the decode step (CUDA graphs) on CUDA; the CPU always runs eagerly
    device: str = "auto"
    dtype: str = "bfloat16"
    seed: int = 0
    out: str = "runs/bench_generate"


@holding_out_folder
def bench_generate(config: GenerateBenchConfig) -> Path:
    """Measure every (impl, batch, prompt) case; write ``summary.json``, ``rows.csv`` and ``generation.png``."""
    _check(config)
    device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
    compiling = config.compile and device.type == "cuda"
    log.info("bench-generate config: %s", json.dumps(config_to_dict(config)))
    model, model_name = _load(config, device, dtype)
    impls = [b for b in config.baselines if compiling or b != "hf_static_compile"]
    impls += [get_variant(spec).spec for spec in config.variants]
    saved = {f"{SWAPPED_PREFIX}{label}": folder for folder, label in zip(config.swapped, swapped_labels(config.swapped))}
    out, env = Path(config.out), environment(device)
    summary = {"gpu": env["gpu"], "torch": env["torch"], "transformers": env["transformers"],
               "command": shlex.join(["attnswap", *sys.argv[1:]]) if sys.argv[1:2] == ["bench-generate"] else
               shlex.join(sys.argv), "environment": env, "config": config_to_dict(config)}
    rows = []
    sizes = [(batch, prompt) for batch in config.batches for prompt in config.prompts]
    progress = tqdm(total=len(sizes) * (len(impls) + len(saved)), desc="generation cases")

    def measure(on: nn.Module, impl: str, batch: int, prompt: int, captured: bool) -> None:
        row = {"model": model_name, "impl": impl, "batch": batch, "prompt": prompt, "new_tokens": config.new_tokens,
               "dtype": config.dtype, "compiled": captured}
        row.update(_guarded(lambda: _case(on, impl, batch, prompt, config, device, captured), device))
        rows.append(row)
        log.info("%s", json.dumps(row))
        _add_ratios(rows)
        _write(out, {**summary, "rows": rows})  # after every case: an interrupted run keeps what it measured
        progress.update(1)

    for batch, prompt in sizes:
        for impl in impls:
            measure(model, impl, batch, prompt, compiling and impl != "hf_sdpa")
    # Each saved swap alone on the device, loaded once: no other model's weights in its peak memory.
    del model
    for impl, folder in saved.items():
        swapped_model = load(folder, device=str(device), dtype=config.dtype)
        for batch, prompt in sizes:
            measure(swapped_model, impl, batch, prompt, False)
        del swapped_model
    progress.close()
    return out


# --- one case -------------------------------------------------------------------------------------
def _case(model: nn.Module, impl: str, batch: int, prompt: int, config: GenerateBenchConfig, device: torch.device,
          compiling: bool) -> dict[str, Any]:
    """``compiling``: the decode step is compiled and captured, over a cache that keeps its tensors in place."""
    _use(model, impl)
    if compiling:
        # Each case compiles its own graphs: the last case's graphs (and their CUDA-graph memory pools) go first,
        # so that no case's peak memory holds another's.
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    g = torch.Generator().manual_seed(config.seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=g).to(device)
    total = prompt + config.new_tokens
    make_cache = _cache_factory(model, impl, total)
    step = compiled_step() if compiling and impl != "hf_sdpa" else decode_one_token

    def generate() -> tuple[float, float, Any]:
        cache = make_cache()
        synchronize(device)
        start = time.perf_counter()
        token, position = prefill(model, ids, None, cache)
        synchronize(device)
        prefilled = time.perf_counter()
        with torch.no_grad():
            if compiling and hasattr(cache, "start_captured_steps"):
                cache.start_captured_steps()
            for _ in range(config.new_tokens - 1):
                token = step(model, cache, token, position).clone()
                position = position + 1
        synchronize(device)
        end = time.perf_counter()
        if compiling and hasattr(cache, "finish_captured_steps"):
            cache.finish_captured_steps(config.new_tokens - 1)
        return prefilled - start, end - prefilled, cache

    generate()  # warm-up: compilation, autotuning, allocator
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    prefills, decodes = [], []
    for _ in range(config.repeats):
        prefill_s, decode_s, cache = generate()
        prefills.append(prefill_s)
        decodes.append(decode_s)
    decode_s = statistics.median(decodes)
    return {
        "status": "ok",
        "prefill_ms": round(statistics.median(prefills) * 1e3, 3),
        "decode_tok_s": round(batch * (config.new_tokens - 1) / decode_s, 2),
        "peak_MiB": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "cache_MiB": round(_cache_bytes(cache) / 2**20, 3),
    }


def _use(model: nn.Module, impl: str) -> None:
    if impl in BASELINES:
        unswap(model)
        model.set_attn_implementation("sdpa")
    elif not impl.startswith(SWAPPED_PREFIX):  # a saved swap is loaded as it was saved
        swap(model, impl, trainable="none")


def _cache_factory(model: nn.Module, impl: str, total: int) -> Callable[[], Any]:
    from transformers import DynamicCache, StaticCache

    if impl == "hf_sdpa":
        return lambda: DynamicCache(config=model.config)
    if impl == "hf_static_compile":
        return lambda: StaticCache(config=model.config, max_cache_len=total)
    if impl.startswith(SWAPPED_PREFIX):  # as model.generate(past_key_values=bounded_cache(model)) keeps it
        return lambda: bounded_cache(model)
    return lambda: bounded_cache(model, max_length=total)


def _cache_bytes(cache: Any) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if getattr(layer, "is_initialized", False))


def _guarded(case: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Out of memory and kernel or compiler failures become a recorded status and message, so that one case does
    not end the run; a user's mistake (AttnswapError) still does."""
    try:
        return case()
    except torch.OutOfMemoryError:
        return {"status": "oom"}
    except AttnswapError:
        raise
    except Exception as exc:  # noqa: BLE001 -- the row records it; the other cases still run
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        log.warning("case failed: %s: %s", type(exc).__name__, message)
        return {"status": "error", "error": f"{type(exc).__name__}: {message}"}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _add_ratios(rows: list[dict]) -> None:
    """Each row's ratios to hf_sdpa and hf_static_compile of the same (batch, prompt), where both ran."""
    ok = {(r["impl"], r["batch"], r["prompt"]): r for r in rows if r.get("status") == "ok"}
    for row in rows:
        if row.get("status") != "ok":
            continue
        sdpa = ok.get(("hf_sdpa", row["batch"], row["prompt"]))
        static = ok.get(("hf_static_compile", row["batch"], row["prompt"]))
        for key, metric, base in (("decode_x_sdpa", "decode_tok_s", sdpa), ("prefill_x_sdpa", "prefill_ms", sdpa),
                                  ("peak_x_sdpa", "peak_MiB", sdpa), ("decode_x_static", "decode_tok_s", static)):
            row[key] = (round(row[metric] / base[metric], 3)
                        if base is not None and row[metric] is not None and base[metric] else None)


# --- the model ------------------------------------------------------------------------------------
def _load(config: GenerateBenchConfig, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, str]:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(config.model)
    model_config = AutoConfig.from_pretrained(folder)
    if config.max_positions:
        model_config.max_position_embeddings = config.max_positions
    has_weights = any(next(folder.glob(pattern), None) is not None for pattern in WEIGHT_FILES)
    torch.manual_seed(config.seed)
    if has_weights:
        model = AutoModelForCausalLM.from_pretrained(folder, config=model_config, dtype=dtype,
                                                     attn_implementation="sdpa")
        name = folder.name
    else:
        model_config._attn_implementation = "sdpa"
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype, attn_implementation="sdpa")
        name = f"{folder.name} (random weights)"
    return model.to(device).eval(), name


def _check(config: GenerateBenchConfig) -> None:
    if not config.model:
        raise AttnswapError("bench-generate needs --model: a model folder, or a folder with a config.json")
    if not (Path(config.model) / "config.json").is_file():
        raise AttnswapError(f"--model {config.model!r} has no config.json; give a model folder or a config folder")
    if config.new_tokens < 2:
        raise AttnswapError(f"--new-tokens must be >= 2 (one prefill token and decode steps), got {config.new_tokens}")
    if config.repeats < 1:
        raise AttnswapError(f"--repeats must be >= 1, got {config.repeats}")
    bad = [b for b in config.baselines if b not in BASELINES]
    if bad:
        raise AttnswapError(f"unknown baseline {bad[0]!r}; choose from: {', '.join(BASELINES)}")
    if "hf_sdpa" not in config.baselines:
        raise AttnswapError("the ratios are to hf_sdpa; keep it in --baselines")
    if not config.prompts or min(config.prompts) < 1 or not config.batches or min(config.batches) < 1:
        raise AttnswapError("--prompts and --batches need positive integers, e.g. --prompts 8192,32768 --batches 1")
    for spec in config.variants:
        get_variant(spec)  # an unknown variant or parameter is one error line now, not after the baselines ran
    for folder in config.swapped:
        if not (Path(folder) / "config.json").is_file():
            raise AttnswapError(f"--swapped {folder!r} has no config.json; give a folder written by attnswap.save")


# --- results --------------------------------------------------------------------------------------
def _write(out: Path, summary: dict) -> None:
    """summary.json, rows.csv and generation.png, each written to a temporary name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summary["rows"]
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")

    def table(path: Path) -> None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with path.open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(out / "rows.csv", table)
    atomic_write(out / "generation.png", lambda path: _plot(rows, path))


def _plot(rows: list[dict], path: Path) -> None:
    """Decode tokens/s and peak memory against prompt length, one line per (impl, batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    lines = sorted({(r["impl"], r["batch"]) for r in rows})
    for impl, batch in lines:
        done = sorted((r for r in rows if (r["impl"], r["batch"]) == (impl, batch) and r.get("status") == "ok"),
                      key=lambda r: r["prompt"])
        label = f"{impl} (batch {batch})"
        speed.plot([r["prompt"] for r in done], [r["decode_tok_s"] for r in done], marker="o", label=label)
        if any(r["peak_MiB"] is not None for r in done):
            memory.plot([r["prompt"] for r in done], [r["peak_MiB"] for r in done], marker="o", label=label)
    speed.set(xscale="log", xlabel="prompt length (tokens)", ylabel="decode tokens/s (all rows)",
              title="decode throughput")
    memory.set(xscale="log", xlabel="prompt length (tokens)", ylabel="peak allocated MiB",
               title="generation peak memory (none on the CPU)")
    speed.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
