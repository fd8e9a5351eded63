"""Whole-model benchmark: wall time and peak memory against sequence length, original attention vs each variant.

    attnswap bench --lengths 256,512,1024,2048,4096,8192 --out runs/bench

Side by side in one run: the original model with HF's ``eager`` and ``sdpa`` attention, then each variant
swapped in (``attnswap.swap``). Modes: ``train`` (forward, next-token cross-entropy and backward of one
batch, every weight trainable), ``prefill`` (a forward without cache) and ``generate`` (decoding
``new_tokens`` tokens with the KV cache after a prompt of the given length, reported as tokens/s; window
and Hedgehog variants use attnswap's bounded cache, the others HF's growing one).
Each case is the median of ``repeats`` timed calls after ``warmup`` calls.

Lengths past the model's position limit run on a *surrogate*: a Llama-family model (RoPE) of the same
width, depth, heads and vocabulary, built in memory with random weights; every row says which model
it ran on. Timing does not depend on the weights' values, only on the shapes.

A profiler pass at ``profile_length`` isolates the share of forward time spent inside attention (the
``attnswap.attention`` range that ``hf.attention.attnswap_attention`` opens) per variant, and saves a table
and a Chrome trace per variant. Results: ``bench_results.jsonl`` / ``.csv``, ``bench_summary.json``
(with the fitted scaling exponents), ``bench_profile.csv``, PNG plots, traces.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from tqdm import tqdm

from attnswap.config import config_to_dict
from attnswap.errors import AttnswapError
from attnswap.hf.models import DEFAULT_MODEL, load_model, max_positions, resolve_device, resolve_dtype
from attnswap.hf.swap import attention_modules, swap, swapped_variant, unswap
from attnswap.measure.bench_kernel import (DEFAULT_VARIANTS, available_variants, dtype_name, environment, exponents,
                                           fit_exponent, guarded, measure, open_rows, scaling_figure, synchronize,
                                           write_results)
from attnswap.plots import bar_plot
from attnswap.runs import atomic_write, holding_out_folder
from attnswap.variants import Variant

log = logging.getLogger(__name__)

MODES = ("train", "prefill", "generate")
BASELINES = ("eager", "sdpa")
ATTENTION_RANGE = "attnswap.attention"  # the profiler range hf.attention.attnswap_attention opens
STEP_RANGE = "attnswap.step"

__all__ = ["BenchConfig", "bench", "fit_exponent", "llama_surrogate"]


@dataclass
class BenchConfig:
    model: str = ""  # hub name or local directory; empty = the bundled teacher
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))  # unregistered names are skipped
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))  # HF attention of the original model
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096, 8192])
    batch: int = 1
    modes: list[str] = field(default_factory=lambda: list(MODES))
    new_tokens: int = 32  # generate: tokens decoded after the prompt
    bounded_cache: bool = True  # generate: window/hedgehog variants decode with attnswap's bounded KV cache
    repeats: int = 5  # timed calls per case; the median is reported
    warmup: int = 1  # untimed calls first
    device: str = "auto"
    dtype: str = "bfloat16"
    profile_length: int = 1024  # length of the profiled forward; 0 = no profiler pass
    seed: int = 0
    out: str = "runs/bench"


@dataclass
class Contender:
    """One attention to measure: an HF implementation of the original model, or a swapped variant."""

    label: str
    spec: str
    impl: str | None = None
    variant: Variant | None = None

    def apply(self, model: nn.Module) -> None:
        if self.variant is not None:
            swap(model, self.variant, trainable="all")  # train mode backpropagates through every layer alike
        else:
            unswap(model)
            model.set_attn_implementation(self.impl)


@dataclass
class BenchModel:
    """A model to run cases on and how every row names it."""

    model: nn.Module
    name: str
    kind: str  # "pretrained" or "llama surrogate"
    limit: int | None


@holding_out_folder
def bench(config: BenchConfig) -> Path:
    """Measure every (model, attention, mode, length) case; write results, plots and profiles to ``config.out``."""
    _check(config)
    device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
    log.info("bench config: %s", json.dumps(config_to_dict(config)))
    variants, skipped = available_variants(config.variants)
    contenders = [Contender(f"hf_{impl}", f"original model, attn_implementation={impl}", impl=impl)
                  for impl in config.baselines] + [Contender(v.label, v.spec, variant=v) for v in variants]
    name = config.model or DEFAULT_MODEL
    pretrained = BenchModel(load_model(name, device=str(device), dtype=dtype), Path(name).name or name, "pretrained",
                            None)
    pretrained.limit = max_positions(pretrained.model)
    longest = max(max(config.lengths) + (config.new_tokens if "generate" in config.modes else 0),
                  config.profile_length)
    models = [pretrained]
    if pretrained.limit is not None and longest > pretrained.limit:
        models.append(BenchModel(llama_surrogate(pretrained.model, longest), f"llama surrogate of {pretrained.name}",
                                 "llama surrogate", longest))
        log.info("lengths past %d positions run on %s (random weights, RoPE)", pretrained.limit, models[-1].name)

    def runs_on(mode: str, n: int) -> BenchModel:
        need = n + (config.new_tokens if mode == "generate" else 0)
        return pretrained if pretrained.limit is None or need <= pretrained.limit else models[-1]

    env = environment(device)
    rows: list[dict[str, Any]] = []
    cases = [(m, c, mode, n) for m in models for c in contenders for mode in config.modes for n in config.lengths
             if runs_on(mode, n) is m]
    out_of_memory_at: dict[tuple[str, str, str], int] = {}
    out = Path(config.out)
    with tqdm(total=len(cases), desc="bench", dynamic_ncols=True) as bar, open_rows(out, "bench") as stream:
        for bench_model in models:
            for contender in contenders:
                contender.apply(bench_model.model)
                for _, _, mode, n in [c for c in cases if c[0] is bench_model and c[1] is contender]:
                    bar.set_postfix_str(f"{contender.label} {mode} n={n}")
                    row = {**env, "dtype": dtype_name(dtype), "model": bench_model.name, "model_kind": bench_model.kind,
                           "shape": _shape(bench_model.model, config.batch, n), "variant": contender.label,
                           "spec": contender.spec, "mode": mode, "length": n}
                    curve = (bench_model.name, contender.label, mode)
                    if curve in out_of_memory_at:
                        row.update(status="skipped", error=f"out of memory at length {out_of_memory_at[curve]}")
                    else:
                        row.update(guarded(lambda: _run_case(bench_model.model, mode, n, config, device), device))
                        if row["status"] == "oom":
                            out_of_memory_at[curve] = n
                    rows.append(row)
                    stream.write(json.dumps(row) + "\n")
                    bar.update()
    profiles = _profile_all(contenders, runs_on("prefill", config.profile_length), config, device, out) \
        if config.profile_length > 0 else []
    unswap(pretrained.model)
    plots = bench_plots(rows, profiles, out)
    summary = {"kind": "bench", "config": config_to_dict(config), "environment": env, "variants_skipped": skipped,
               "models": [{"name": m.name, "kind": m.kind, "position_limit": m.limit} for m in models],
               "exponents": exponents(rows, ["median_s", "peak_mem_mb"], ("model", "variant", "mode")),
               "profile": profiles, "plots": [p.name for p in plots]}
    written = write_results(out, "bench", rows, summary)
    if profiles:
        written.append(_write_profile_table(profiles, out / "bench_profile.csv"))
    for path in written:
        log.info("wrote %s", path)
    return out


# --- models -------------------------------------------------------------------------------------
def llama_surrogate(model: nn.Module, max_positions: int) -> nn.Module:
    """A random-weight Llama (RoPE) with ``model``'s width, depth, heads and vocabulary, for any length.

    GPT-2's MLP is two hidden×4·hidden matrices; Llama's SwiGLU has three, so an intermediate size of
    8/3·hidden keeps the MLP's weights and FLOPs equal.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    source = model.config
    hidden = source.hidden_size
    gpt2_inner = getattr(source, "n_inner", None) or 4 * hidden
    intermediate = getattr(source, "intermediate_size", None) or round(2 * gpt2_inner / 3)
    config = LlamaConfig(
        vocab_size=source.vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=source.num_hidden_layers, num_attention_heads=source.num_attention_heads,
        num_key_value_heads=getattr(source, "num_key_value_heads", None) or source.num_attention_heads,
        head_dim=getattr(source, "head_dim", None) or hidden // source.num_attention_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=getattr(source, "tie_word_embeddings", True),
        attn_implementation="sdpa",
    )
    weight = next(model.parameters())
    return LlamaForCausalLM(config).to(device=weight.device, dtype=weight.dtype).eval()


def _shape(model: nn.Module, batch: int, n: int) -> str:
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return f"({batch},{heads},{n},{head_dim})"


# --- one case -----------------------------------------------------------------------------------
def _run_case(model: nn.Module, mode: str, n: int, config: BenchConfig, device: torch.device) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(config.seed)
    ids = torch.randint(0, model.config.vocab_size, (config.batch, n), generator=generator).to(device)  # (B, T)
    if mode == "train":
        def run(_: Any) -> None:
            logits = model(input_ids=ids, use_cache=False).logits  # (B, T, vocab)
            F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()

        result = measure(run, device, config.repeats, config.warmup, prepare=lambda: model.zero_grad(set_to_none=True))
        model.zero_grad(set_to_none=True)
        tokens = config.batch * n
    elif mode == "prefill":
        result = measure(lambda _: _forward(model, ids), device, config.repeats, config.warmup)
        tokens = config.batch * n
    else:
        bounded = config.bounded_cache and _bounded_cache(model) is not None

        def prefill() -> tuple[Any, torch.Tensor]:  # untimed: a fresh cache for every timed decode
            out = _forward(model, ids, cache=_bounded_cache(model) if bounded else None, use_cache=True)
            return out.past_key_values, out.logits[:, -1:].argmax(-1)

        def decode(prefilled: tuple[Any, torch.Tensor]) -> None:
            cache, token = prefilled
            for _ in range(config.new_tokens):
                token = _forward(model, token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)  # (B, 1)

        result = measure(decode, device, config.repeats, config.warmup, prepare=prefill)
        return {**result, "tokens_per_s": config.batch * config.new_tokens / result["median_s"],
                "cache": "bounded (attnswap.hf.cache)" if bounded else "dynamic (HF)"}
    return {**result, "tokens_per_s": tokens / result["median_s"]}


def _bounded_cache(model: nn.Module) -> Any:
    """attnswap's bounded KV cache where the swapped variant has one (window, hedgehog); None: HF's growing cache."""
    from attnswap.hf.cache import bounded_cache

    if swapped_variant(model) is None:
        return None
    try:
        return bounded_cache(model)
    except AttnswapError:  # this variant keeps every key; HF's default cache is the right one
        return None


@torch.no_grad()
def _forward(model: nn.Module, ids: torch.Tensor, cache: Any = None, use_cache: bool = False):
    # Only the last position's logits: inference never needs the vocab projection of the whole prompt.
    return model(input_ids=ids, past_key_values=cache, use_cache=use_cache, logits_to_keep=1)


# --- profiler isolation -------------------------------------------------------------------------
def _profile_all(contenders: list[Contender], bench_model: BenchModel, config: BenchConfig, device: torch.device,
                 out: Path) -> list[dict[str, Any]]:
    # Kineto prints "profiler_start/stop" lines below level 6; read once, at the process's first profile.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    n = config.profile_length
    ids = torch.randint(0, bench_model.model.config.vocab_size, (config.batch, n),
                        generator=torch.Generator().manual_seed(config.seed)).to(device)
    found = []
    for contender in tqdm(contenders, desc="profile", dynamic_ncols=True):
        with _attention_range(bench_model.model, contender) as traced:
            if not traced:
                log.info("not profiling %s: this model defines no %s attention function to wrap", contender.label,
                         contender.impl)
                continue
            result = guarded(lambda: _profile_one(bench_model.model, ids, device, out, contender.label), device)
        found.append({"variant": contender.label, "model": bench_model.name, "length": n, **result})
    unswap(bench_model.model)
    return found


@contextlib.contextmanager
def _attention_range(model: nn.Module, contender: Contender) -> Iterator[bool]:
    """Set ``contender``'s attention so that it runs inside ``ATTENTION_RANGE``; yields False if it cannot be.

    Swapped variants open the range in ``hf.attention.attnswap_attention``. HF's own implementations are wrapped
    here and registered under a temporary name; eager attention is not in HF's registry (each modeling file
    defines its own ``eager_attention_forward``), so it is looked up in the attention module's file.
    """
    contender.apply(model)
    if contender.variant is not None:
        yield True
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if contender.impl == "eager":
        inner = getattr(sys.modules[type(attention_modules(model)[0]).__module__], "eager_attention_forward", None)
    else:
        inner = ALL_ATTENTION_FUNCTIONS.get(contender.impl)
    if inner is None:
        yield False
        return

    def traced_attention(*args, **kwargs):
        with record_function(ATTENTION_RANGE):
            return inner(*args, **kwargs)

    name = f"attnswap_profiled_{contender.impl}"
    AttentionInterface.register(name, traced_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[contender.impl])
    model.set_attn_implementation(name)
    try:
        yield True
    finally:
        model.set_attn_implementation(contender.impl)


def _profile_one(model: nn.Module, ids: torch.Tensor, device: torch.device, out: Path, label: str) -> dict[str, Any]:
    _forward(model, ids)  # warm-up outside the profile
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with record_function(STEP_RANGE):
            _forward(model, ids)
        synchronize(device)
    out.mkdir(parents=True, exist_ok=True)
    trace, table = out / f"bench_profile_{label}.trace.json", out / f"bench_profile_{label}.txt"
    prof.export_chrome_trace(str(trace))
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    atomic_write(table, prof.key_averages().table(sort_by=sort_by, row_limit=30) + "\n")
    share = attention_share(prof.events())
    if device.type == "cuda" and share["total_gpu_ms"] is None:
        log.warning("the profiler recorded no GPU kernels (CUPTI unavailable?); attention shares are CPU time")
    return {"status": "ok", **share, "trace": trace.name, "table": table.name}


def attention_share(events) -> dict[str, float | None]:
    """Time inside ``ATTENTION_RANGE`` against the whole ``STEP_RANGE``, on the CPU and, if profiled, the GPU.

    GPU time of a range is that of the kernels launched anywhere under it; the GPU total is every
    kernel attributed to a CPU op.
    """
    cpu_events = [e for e in events if e.device_type == DeviceType.CPU]
    attention = [e for e in cpu_events if e.name == ATTENTION_RANGE]
    step_cpu = sum(e.cpu_time_total for e in cpu_events if e.name == STEP_RANGE) / 1e3
    attention_cpu = sum(e.cpu_time_total for e in attention) / 1e3
    total_gpu = sum(e.self_device_time_total for e in cpu_events) / 1e3
    attention_gpu = sum(e.device_time_total for e in attention) / 1e3
    return {"attention_cpu_ms": attention_cpu, "step_cpu_ms": step_cpu,
            "cpu_share": attention_cpu / step_cpu if step_cpu else None,
            "attention_gpu_ms": attention_gpu if total_gpu else None, "total_gpu_ms": total_gpu or None,
            "gpu_share": attention_gpu / total_gpu if total_gpu else None}


def _write_profile_table(profiles: list[dict[str, Any]], path: Path) -> Path:
    import csv

    columns = list(dict.fromkeys(k for p in profiles for k in p))
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows(profiles)
    return path


# --- plots and checks -----------------------------------------------------------------------
def bench_plots(rows: list[dict], profiles: list[dict], out: Path) -> list[Path]:
    """Per mode, time (tokens/s for generate) and peak memory against length, surrogate segments dashed;
    and the attention share of the profiled forward per variant."""
    plots = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        time_metric = ("tokens_per_s", "decode tokens/s") if mode == "generate" else ("median_s", "time (s)")
        plots.append(scaling_figure(
            [r for r in rows if r["mode"] == mode], out / f"bench_{mode}.png", f"whole model, {mode}",
            [time_metric, ("peak_mem_mb", "peak memory (MiB)")],
            lambda r: (r["variant"] + (" [surrogate]" if r["model_kind"] != "pretrained" else ""), r["variant"],
                       r["model_kind"] != "pretrained")))
    measured = [p for p in profiles if p.get("status") == "ok"]
    if measured:
        shares = [p["gpu_share"] if p["gpu_share"] is not None else p["cpu_share"] for p in measured]
        device = "GPU" if measured[0]["gpu_share"] is not None else "CPU"
        plots.append(bar_plot([p["variant"] for p in measured], [100 * (s or 0) for s in shares],
                              out / "bench_attention_share.png", f"attention share of forward {device} time (%)",
                              f"time inside attention, forward at n={measured[0]['length']}"))
    return [p for p in plots if p is not None]


def _check(config: BenchConfig) -> None:
    bad = [m for m in config.modes if m not in MODES]
    if bad or not config.modes:
        raise AttnswapError(f"unknown mode {bad[0] if bad else '(none)'!r}; choose from: {', '.join(MODES)}")
    bad = [b for b in config.baselines if b not in BASELINES]
    if bad:
        raise AttnswapError(f"unknown baseline {bad[0]!r}; choose from: {', '.join(BASELINES)}")
    if not config.lengths or min(config.lengths) < 1:
        raise AttnswapError(f"lengths must be positive integers, got {config.lengths}")
    for key in ("batch", "repeats", "new_tokens"):
        if getattr(config, key) < 1:
            raise AttnswapError(f"{key} must be >= 1, got {key}={getattr(config, key)}")
    if config.warmup < 0 or config.profile_length < 0:
        raise AttnswapError("warmup and profile_length must be >= 0")
