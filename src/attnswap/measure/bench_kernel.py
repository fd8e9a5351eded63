"""Attention-kernel micro-benchmark: every variant's ``attend`` beside dense causal SDPA (flash backend).

    attnswap bench-kernel --lengths 512,1024,2048 --out runs/bench-kernel

Each case is one (mode, length, variant): forward, or forward+backward, on random q/k/v (B, H, T, D).
The median of ``repeats`` timed calls is taken after ``warmup`` calls, whose time (compilation included)
is reported apart; on CUDA each case is also captured into a CUDA graph and timed by replay, which removes the
per-call launch and autograd cost (~0.7 ms for a forward+backward from Python on the H100 host, dense baseline
included) and leaves the kernels' own time; peak memory is measured per case; running out of memory is recorded as ``oom`` and
skips the longer lengths of that curve. FLOPs per case give the useful-FLOP efficiency against the dense
baseline. Every row carries the environment. Writes ``kernel_results.jsonl`` / ``.csv``, ``kernel_summary.json``
and log-log plots with fitted scaling exponents into ``out``. The measuring helpers here are shared with
``bench.py``.
"""

from __future__ import annotations

import csv
import functools
import io
import gc
import importlib.metadata
import json
import logging
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from attnswap.config import config_to_dict
from attnswap.errors import AttnswapError
from attnswap.hf.models import git_commit, resolve_device, resolve_dtype
from attnswap.kernels.counting import BACKWARD_FLOP_FACTOR
from attnswap.plots import Panel, Series, line_plot
from attnswap.runs import atomic_write, holding_out_folder
from attnswap.variants import VARIANTS, AttnContext, Variant, get_variant

log = logging.getLogger(__name__)

DEFAULT_VARIANTS = ("window:w=256", "window:w=256,sinks=4", "longformer", "performer:m=256", "nsa", "mixture")
DENSE = "sdpa_flash"  # label of the dense causal baseline
MODES = ("forward", "forward+backward")
# Backward of attention is 5 matmuls of the forward's size against its 2 (the FlashAttention papers' convention).


@dataclass
class KernelBenchConfig:
    lengths: list[int] = field(default_factory=lambda: [2**i for i in range(9, 16)])  # 512 … 32768
    batch: int = 1
    heads: int = 16
    head_dim: int = 64
    dtype: str = "bfloat16"
    device: str = "auto"
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))  # unregistered names are skipped
    modes: list[str] = field(default_factory=lambda: list(MODES))
    repeats: int = 5  # timed calls per case; the median is reported
    warmup: int = 2  # untimed calls first (compilation, autotuning, allocator)
    block: int = 128  # tile size for counting the FLOPs of block-sparse masks
    # Also time each case replayed from a CUDA graph (CUDA only): the kernels' own time, without the per-call
    # launch and autograd overhead that bounds a short kernel called from Python (the dense baseline too).
    cuda_graphs: bool = True
    # > 0: profile one more call per case and keep its this many most expensive kernels (CUDA; operators on the CPU),
    # to see where a case's time goes (which kernel a mask slows down) beside its timing.
    profile_kernels: int = 0
    # Also time variants inside torch.compile, as a compiled model runs them (`distill --compile true`): the
    # compiler may fuse the elementwise work around a variant's kernels. Rows labelled "<variant>_compiled".
    # true: every variant; a list of specs: those (e.g. ["nsa:block=64,top_k=4,window=64"]).
    compiled_variants: bool | list[str] = False
    compile_backend: str = "inductor"  # tests use "eager": the same tracing, no code generation
    seed: int = 0
    out: str = "runs/bench-kernel"


# --- environment, timing, fitting and output: shared with bench.py -------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    """What every benchmark row records about where it ran."""
    return {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device),
        "cpu": platform.machine(),
        "torch": torch.__version__,
        "transformers": _package_version("transformers"),
        "triton": _package_version("triton") or _package_version("pytorch-triton"),
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
    }


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run: Callable[[Any], Any], device: torch.device, repeats: int, warmup: int,
            prepare: Callable[[], Any] = lambda: None, baseline_mb: float = 0.0) -> dict[str, Any]:
    """Time ``run(prepare())``: ``warmup`` untimed calls, then ``repeats`` timed ones (``prepare`` is never timed).

    Peak memory is reset after the warm-up, so it is the steady state of this case, less ``baseline_mb``
    (memory that was allocated before the case and is not its own); None on CPU.
    """
    warmup_start = time.perf_counter()
    for _ in range(warmup):
        run(prepare())
    synchronize(device)
    warmup_s = time.perf_counter() - warmup_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        arg = prepare()
        synchronize(device)  # the clock must not start while earlier work is still queued
        start = time.perf_counter()
        run(arg)
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 - baseline_mb if device.type == "cuda" else None
    return {"status": "ok", "median_s": statistics.median(times), "times_s": times, "warmup_s": warmup_s,
            "peak_mem_mb": peak}


def guarded(case: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Run one case; out-of-memory and kernel failures become a recorded status instead of ending the run."""
    try:
        return case()
    except (RuntimeError, ValueError) as exc:  # e.g. no kernel for this dtype/shape; the message is recorded
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        # Compiled kernels (inductor, triton) may report running out of memory inside another exception.
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
            result = {"status": "oom", "error": "out of memory"}
        else:
            log.warning("case failed: %s", message)
            result = {"status": "error", "error": message}
    gc.collect()  # the traceback held the case's tensors
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def fit_exponent(ns: Sequence[float], values: Sequence[float | None], last: int | None = None) -> float | None:
    """Scaling exponent k of ``values ≈ c·n^k``: the least-squares slope in log-log space.

    Missing or non-positive values are left out; ``last`` fits only the largest ``last`` lengths (where
    fixed overheads matter least). None with fewer than two points.
    """
    points = sorted((n, v) for n, v in zip(ns, values) if v is not None and v > 0 and np.isfinite(v))
    if last is not None:
        points = points[-last:]
    if len({n for n, _ in points}) < 2:
        return None
    log_n, log_v = np.log([n for n, _ in points]), np.log([v for _, v in points])
    return float(np.polyfit(log_n, log_v, 1)[0])


def curves(rows: Iterable[dict], metric: str, by: Sequence[str]) -> dict[tuple, tuple[list[int], list[float | None]]]:
    """Rows grouped by the ``by`` fields into (lengths, values of ``metric``), sorted by length."""
    grouped: dict[tuple, list[tuple[int, float | None]]] = {}
    for row in rows:
        grouped.setdefault(tuple(row[k] for k in by), []).append((row["length"], row.get(metric)))
    return {key: ([n for n, _ in sorted(pts)], [v for _, v in sorted(pts)]) for key, pts in grouped.items()}


def exponents(rows: list[dict], metrics: Sequence[str], by: Sequence[str]) -> list[dict[str, Any]]:
    """One record per curve: its key fields and, per metric, the exponent over all lengths and over the last 3."""
    table: dict[tuple, dict[str, Any]] = {}
    for metric in metrics:
        for key, (ns, values) in curves(rows, metric, by).items():
            entry = table.setdefault(key, dict(zip(by, key)))
            entry[f"{metric}_exponent"] = fit_exponent(ns, values)
            entry[f"{metric}_exponent_last3"] = fit_exponent(ns, values, last=3)
    return list(table.values())


def open_rows(out: Path, prefix: str):
    """A line-buffered ``{prefix}_results.jsonl``: rows reach the disk as they are measured, so an interrupted
    run keeps them; ``write_results`` rewrites the file whole at the end."""
    out.mkdir(parents=True, exist_ok=True)
    return (out / f"{prefix}_results.jsonl").open("w", buffering=1)


def write_results(out: Path, prefix: str, rows: list[dict], summary: dict) -> list[Path]:
    """``{prefix}_results.jsonl`` (one row per case), ``{prefix}_results.csv`` and ``{prefix}_summary.json``."""
    out.mkdir(parents=True, exist_ok=True)
    jsonl, table, summary_file = (out / f"{prefix}_results.jsonl", out / f"{prefix}_results.csv",
                                  out / f"{prefix}_summary.json")
    atomic_write(jsonl, "".join(json.dumps(row) + "\n" for row in rows))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    stream = io.StringIO(newline="")
    writer = csv.DictWriter(stream, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    atomic_write(table, stream.getvalue())
    atomic_write(summary_file, json.dumps(summary, indent=2) + "\n")
    return [jsonl, table, summary_file]


def scaling_figure(rows: list[dict], path: Path, title: str, metrics: Sequence[tuple[str, str]],
                   curve_of: Callable[[dict], tuple[str, str, bool]]) -> Path | None:
    """Log-log panels (one per (metric, axis label)) with one line per curve and its fitted exponent.

    ``curve_of(row) -> (curve label, colour group, dashed)``. None when no metric has any value.
    """
    panels = []
    for metric, ylabel in metrics:
        grouped: dict[tuple[str, str, bool], list[tuple[int, float | None]]] = {}
        for row in rows:
            grouped.setdefault(curve_of(row), []).append((row["length"], row.get(metric)))
        series = []
        for (label, group, dashed), points in grouped.items():
            ns, values = zip(*sorted(points))
            k = fit_exponent(ns, values)
            if k is not None or any(v is not None for v in values):
                series.append(Series(f"{label} (k={k:.2f})" if k is not None else label, ns, values, group, dashed))
        if series:
            panels.append(Panel(ylabel, series, xlabel="sequence length n", ylabel=ylabel, logx=True, logy=True))
    return line_plot(panels, path, title=title) if panels else None


# --- the kernel benchmark ---------------------------------------------------------------------
@holding_out_folder
def bench_kernel(config: KernelBenchConfig) -> Path:
    """Run every (mode, length, variant) case; write results, summary and plots to ``config.out``."""
    _check(config)
    device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
    log.info("bench-kernel config: %s", json.dumps(config_to_dict(config)))
    variants, skipped = available_variants(config.variants)
    env = environment(device)
    contenders: list[tuple[str, Variant | None, bool]] = [(DENSE, None, False)]
    for variant in variants:
        contenders.append((variant.label, variant, False))
        if compiled_too(config, variant):
            contenders.append((variant.label + "_compiled", variant, True))
    cases = [(mode, n, c) for mode in config.modes for n in config.lengths for c in contenders]
    out_of_memory_at: dict[tuple[str, str], int] = {}
    rows = []
    out = Path(config.out)
    with open_rows(out, "kernel") as stream, tqdm(cases, desc="bench-kernel", dynamic_ncols=True) as bar:
        for mode, n, (label, variant, compiled) in bar:
            bar.set_postfix_str(f"{label} {mode} n={n}")
            row = {**env, "dtype": dtype_name(dtype),
                   "shape": f"({config.batch},{config.heads},{n},{config.head_dim})", "variant": label,
                   "spec": "sdpa(is_causal=True), flash backend" if variant is None else variant.spec,
                   "mode": mode, "length": n}
            if (label, mode) in out_of_memory_at:
                row.update(status="skipped", error=f"out of memory at length {out_of_memory_at[label, mode]}")
            else:
                row.update(guarded(lambda: _run_case(variant, mode, n, config, device, dtype, compiled), device))
                if row["status"] == "oom":
                    out_of_memory_at[label, mode] = n
            rows.append(row)
            stream.write(json.dumps(row) + "\n")
    add_comparisons(rows)
    plots = kernel_plots(rows, out)
    summary = {"kind": "bench-kernel", "config": config_to_dict(config), "environment": env,
               "variants_skipped": skipped,
               "exponents": exponents(rows, ["median_s", "graph_median_s", "peak_mem_mb"], ("mode", "variant")),
               "plots": [p.name for p in plots]}
    for path in write_results(out, "kernel", rows, summary):
        log.info("wrote %s", path)
    return out


def kernel_plots(rows: list[dict], out: Path) -> list[Path]:
    """One figure per mode: time and peak memory against length, log-log, one line per variant with its exponent."""
    plots = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        chosen = [r for r in rows if r["mode"] == mode]
        first = chosen[0]
        batch, heads, _, head_dim = first["shape"].strip("()").split(",")
        title = f"attention kernels, {mode} ({first['dtype']}, B={batch}, H={heads}, D={head_dim})"
        plots.append(scaling_figure(chosen, out / f"kernel_{_slug(mode)}.png", title,
                                    [("median_s", "time per call (s)"), ("graph_median_s", "time, CUDA-graph replay (s)"),
                                     ("peak_mem_mb", "peak memory (MiB)")],
                                    lambda r: (r["variant"], r["variant"], False)))
    return [p for p in plots if p is not None]


def compiled_too(config: KernelBenchConfig, variant: Variant) -> bool:
    """Whether ``config.compiled_variants`` asks for ``variant`` inside torch.compile too."""
    wanted = config.compiled_variants
    if isinstance(wanted, bool):
        return wanted
    return variant.spec in {get_variant(spec).spec for spec in wanted}


def available_variants(specs: Sequence[str]) -> tuple[list[Variant], list[str]]:
    """(the variants among ``specs`` whose class is registered, the specs skipped because it is not)."""
    found, skipped = [], []
    for spec in specs:
        name = spec.partition(":")[0].strip()
        if name in VARIANTS:
            found.append(get_variant(spec))
        else:
            skipped.append(spec)
            log.info("skipping variant %r: no variant named %r is registered (have: %s)", spec, name,
                     ", ".join(sorted(VARIANTS)))
    return found, skipped


def _run_case(variant: Variant | None, mode: str, n: int, config: KernelBenchConfig, device: torch.device,
              dtype: torch.dtype, compiled: bool = False) -> dict[str, Any]:
    # Whatever earlier cases left allocated (the allocator's cuBLAS workspaces, say) is not this case's memory.
    baseline_mb = allocated_mb(device)
    ctx = AttnContext(scaling=config.head_dim**-0.5)
    state = variant.make_state(config.heads, config.head_dim) if variant is not None else None
    if state is not None:  # fp32, as swap keeps learnable variant parameters
        state = state.to(device=device, dtype=torch.float32)
    attend = (functools.partial(dense_causal_attention, scaling=ctx.scaling) if variant is None
              else lambda q, k, v: variant.attend(q, k, v, ctx, state))
    if compiled:
        # Each case is a new function to dynamo; past its recompile limit it would silently run the rest eagerly.
        torch._dynamo.reset()
        attend = torch.compile(attend, backend=config.compile_backend)
    # A compiled case is not captured: capturing the compiled Hedgehog failed, and the failed capture left the CUDA
    # generator unusable for every later case in the process (seen on an H200). Its kernels' own
    # time is still measured: ``kernels_total_us`` of the profiled call.
    result, run, (q, k, _) = time_attention_case(
        attend, (config.batch, config.heads, n, config.head_dim), mode, device, dtype, config.seed, config.repeats,
        config.warmup, parameters=state.parameters() if state is not None else (),
        cuda_graphs=config.cuda_graphs and not compiled, baseline_mb=baseline_mb)
    if config.profile_kernels:
        result["kernels"], result["kernels_total_us"] = top_kernels(run, device, config.profile_kernels)
    flops, flops_source, density = case_flops(variant, q, k, ctx, state, config.block, mode == "forward+backward", run)
    return {**result, "flops": flops, "flops_source": flops_source, "mask_density": density,
            "tflops_per_s": flops / result["median_s"] / 1e12 if flops else None}


def top_kernels(run: Callable[[Any], None], device: torch.device,
                count: int) -> tuple[list[dict[str, Any]], float]:
    """The ``count`` kernels (CUDA) or operators (CPU, self time) that one ``run`` spends most time in, largest first:
    name (cut to 120 characters), total microseconds over the call and how many launches; and the microseconds of
    all of them together."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU]) as profiler:
        run(None)
        synchronize(device)
    totals: dict[str, list[float]] = {}
    for event in profiler.events():
        if on_cuda and event.device_type != torch.autograd.DeviceType.CUDA:
            continue  # CPU-side launches and runtime calls
        us = event.time_range.elapsed_us() if on_cuda else event.self_cpu_time_total
        if us <= 0:
            continue
        total = totals.setdefault(event.name[:120], [0.0, 0])
        total[0] += us
        total[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:count]
    everything = round(sum(us for us, _ in totals.values()), 1)
    return [{"name": name, "us": round(us, 1), "calls": calls} for name, (us, calls) in ranked], everything


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """The dense baseline: causal SDPA forced to the flash backend."""
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)


def allocated_mb(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def time_attention_case(attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                   shape: tuple[int, int, int, int], mode: str, device: torch.device, dtype: torch.dtype, seed: int,
                   repeats: int, warmup: int, *, parameters: Iterable[torch.Tensor] = (), cuda_graphs: bool = False,
                   baseline_mb: float | None = None) -> tuple[dict[str, Any], Callable[[Any], None], tuple]:
    """Time ``attend(q, k, v)`` on seeded random q/k/v of ``shape`` (B, H, T, D), ``mode`` forward or
    forward+backward (gradients of q, k, v and ``parameters``, cleared before every call).

    Returns ``measure``'s record (peak memory less ``baseline_mb``, by default what was allocated on entry), with
    ``graph_timing``'s when ``cuda_graphs`` and on CUDA; the timed function; and (q, k, v).
    """
    baseline_mb = allocated_mb(device) if baseline_mb is None else baseline_mb
    generator = torch.Generator(device=device).manual_seed(seed)
    backward = mode == "forward+backward"
    q, k, v = (torch.randn(*shape, device=device, dtype=dtype, generator=generator, requires_grad=backward)
               for _ in range(3))
    grad_out = torch.randn_like(q) if backward else None
    leaves = [q, k, v, *parameters]

    def run(_: Any) -> None:
        if backward:
            attend(q, k, v).backward(grad_out)
        else:
            with torch.no_grad():
                attend(q, k, v)

    def clear_grads() -> None:
        for t in leaves:
            t.grad = None

    result = measure(run, device, repeats, warmup, prepare=clear_grads, baseline_mb=baseline_mb)
    if cuda_graphs and device.type == "cuda":
        result.update(graph_timing(run, clear_grads, device, repeats, warmup))
    return result, run, (q, k, v)


def graph_timing(run: Callable[[Any], None], clear_grads: Callable[[], None], device: torch.device, repeats: int,
                 warmup: int) -> dict[str, Any]:
    """``run`` captured once into a CUDA graph and timed by replaying it: ``graph_median_s`` and ``graph_times_s``,
    or ``graph_error`` when the case cannot be captured (a host sync inside it, say)."""
    clear_grads()  # the captured backward then allocates the gradients in the graph's pool and rewrites them on replay
    try:
        side = _capture_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # capture needs its allocations warmed up on a side stream first
            for _ in range(2):
                clear_grads()
                run(None)
        torch.cuda.current_stream(device).wait_stream(side)
        clear_grads()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run(None)
    except RuntimeError as exc:
        synchronize(device)
        return {"graph_error": (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]}
    replayed = measure(lambda _: graph.replay(), device, repeats, warmup)
    return {"graph_median_s": replayed["median_s"], "graph_times_s": replayed["times_s"]}


def case_flops(variant: Variant | None, q, k, ctx: AttnContext, state, block: int, backward: bool,
               run: Callable[[Any], None]) -> tuple[float | None, str, float | None]:
    """(FLOPs of one call, how they were counted, fraction of allowed (query, key) pairs).

    Dense causal: 2·2·B·H·T²/2·D forward; a variant counts its own (``Variant.call_flops``: mask variants by their
    allowed tiles, linear attention by ``FlopCounterMode``; NSA and the hybrid are not counted, since compiled
    flex_attention refuses the counter's dispatch and the failed trace left dynamo refusing every later flex call in
    the process). Backward adds ``BACKWARD_FLOP_FACTOR`` times the forward.
    """
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[-2]
    factor = 1 + BACKWARD_FLOP_FACTOR if backward else 1
    if variant is None:
        return factor * 2.0 * batch * heads * q_len * kv_len * head_dim, "dense causal formula", None
    flops, source, pairs = variant.call_flops(q, k, ctx, state, block, run)
    return (factor * flops if flops is not None else None), source, pairs


@functools.cache
def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One warm-up stream for every capture: each new stream would keep a cuBLAS workspace allocated for good."""
    return torch.cuda.Stream(device)


def add_comparisons(rows: list[dict]) -> None:
    """Speedup over the dense baseline at the same (mode, length), the FLOP ratio, and efficiency = their ratio;
    the same again from the CUDA-graph timings (``graph_speedup``, ``graph_efficiency``) where both have them."""
    dense = {(r["mode"], r["length"]): r for r in rows if r["variant"] == DENSE and r["status"] == "ok"}
    for row in rows:
        base = dense.get((row["mode"], row["length"]))
        ok = base is not None and row["status"] == "ok"
        flop_ratio = base["flops"] / row["flops"] if ok and base["flops"] and row.get("flops") else None
        row["flop_ratio"] = flop_ratio
        for timing, prefix in (("median_s", ""), ("graph_median_s", "graph_")):
            speedup = base[timing] / row[timing] if ok and base.get(timing) and row.get(timing) else None
            row[f"{prefix}speedup"] = speedup
            row[f"{prefix}efficiency"] = speedup / flop_ratio if speedup is not None and flop_ratio else None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _check(config: KernelBenchConfig) -> None:
    bad_modes = [m for m in config.modes if m not in MODES]
    if bad_modes or not config.modes:
        bad = bad_modes[0] if bad_modes else "(none)"
        raise AttnswapError(f"unknown mode {bad!r}; choose from: {', '.join(MODES)}")
    if not config.lengths or min(config.lengths) < 1:
        raise AttnswapError(f"lengths must be positive integers, got {config.lengths}")
    for key in ("batch", "heads", "head_dim", "repeats", "block"):
        if getattr(config, key) < 1:
            raise AttnswapError(f"{key} must be >= 1, got {key}={getattr(config, key)}")
    if config.warmup < 0:
        raise AttnswapError(f"warmup must be >= 0, got warmup={config.warmup}")

