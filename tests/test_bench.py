"""Benchmarks: the scaling fit, the kernel benchmark and the whole-model benchmark on CPU at tiny sizes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from attnswap.measure.bench import BenchConfig, bench, fit_exponent, llama_surrogate
from attnswap.measure.bench_kernel import DENSE, KernelBenchConfig, bench_kernel
from attnswap.kernels.counting import allowed_fractions, counted_flops
from attnswap.config import load_config
from attnswap.errors import AttnswapError
from attnswap.kernels.masks import causal, to_index_mask
from tests.conftest import tiny_gpt2

ENV_FIELDS = ("gpu", "device", "torch", "transformers", "triton", "cuda", "git_commit", "dtype", "shape", "variant")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("k", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_fit_exponent_recovers_the_power_of_noisy_timings(k):
    rng = np.random.default_rng(int(10 * k))
    ns = 2 ** np.arange(6, 15)
    values = 3e-7 * ns**k * rng.lognormal(0.0, 0.05, size=len(ns))  # ~5 % multiplicative noise
    assert fit_exponent(ns, values) == pytest.approx(k, abs=0.05)
    assert fit_exponent(ns, values, last=3) == pytest.approx(k, abs=0.2)


def test_fit_exponent_leaves_out_missing_values_and_needs_two_points():
    assert fit_exponent([1, 2, 4, 8], [1.0, None, 16.0, 64.0]) == pytest.approx(2.0)  # an OOM in the middle
    assert fit_exponent([4, 8], [None, 2.0]) is None
    assert fit_exponent([8, 8], [1.0, 2.0]) is None


def test_allowed_fractions_count_causal_tiles_and_pairs():
    pos = torch.arange(70)  # not a multiple of the 16-wide tiles
    tiles, pairs = allowed_fractions(to_index_mask(causal, pos, pos, None), 2, 3, 70, 70, 16, "cpu")
    assert tiles == pytest.approx(15 / 25)  # 5 tile rows: 1 + 2 + ... + 5 of 5 × 5
    assert pairs == pytest.approx((70 * 71 / 2) / 70**2)


def test_bench_kernel_runs_on_cpu_and_writes_results(tmp_path):
    config = KernelBenchConfig(lengths=[40, 72], batch=2, heads=2, head_dim=8, dtype="float32", device="cpu",
                               variants=["window:w=16", "window:w=16,sinks=2", "not_registered:x=1"], repeats=2,
                               warmup=1, block=16, out=str(tmp_path))
    out = bench_kernel(config)
    rows = [json.loads(line) for line in (out / "kernel_results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 3, "modes × lengths × (dense + 2 variants)"
    assert {r["variant"] for r in rows} == {DENSE, "window16", "window16_sinks2"}
    for row in rows:
        assert row["status"] == "ok", row
        missing = [f for f in ENV_FIELDS if f not in row]
        assert not missing, f"row lacks environment fields {missing}"
        assert row["gpu"] is None and row["peak_mem_mb"] is None, "no GPU: no GPU name, no peak GPU memory"
        assert row["shape"] == f"(2,2,{row['length']},8)" and row["dtype"] == "float32"
        assert len(row["times_s"]) == 2 and row["median_s"] > 0 and row["warmup_s"] >= 0
        assert row["flops"] > 0 and row["speedup"] > 0 and row["efficiency"] > 0
        assert "graph_median_s" not in row and row["graph_speedup"] is None, "CUDA graphs are CUDA only"
    dense = next(r for r in rows if r["variant"] == DENSE and r["mode"] == "forward" and r["length"] == 72)
    assert dense["flops"] == 2 * 2 * 2 * 72 * 72 / 2 * 8 * 2, "2·2·B·H·T²/2·D"
    window = next(r for r in rows
                  if r["variant"] == "window16" and r["mode"] == "forward+backward" and r["length"] == 72)
    assert window["flops"] < 3.5 * 4 * 2 * 2 * 72 * 72 * 8 and 0 < window["mask_density"] < 0.5

    summary = json.loads((out / "kernel_summary.json").read_text())
    assert summary["variants_skipped"] == ["not_registered:x=1"]
    assert summary["environment"]["torch"] == torch.__version__
    assert {(e["mode"], e["variant"]) for e in summary["exponents"]} == {(r["mode"], r["variant"]) for r in rows}
    assert all(e["median_s_exponent"] is not None for e in summary["exponents"])
    with (out / "kernel_results.csv").open() as stream:
        table = list(csv.DictReader(stream))
    assert len(table) == len(rows) and set(ENV_FIELDS) <= set(table[0])
    for name in ("kernel_forward.png", "kernel_forward_backward.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
        assert name in summary["plots"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_bench_kernel_times_cuda_graph_replays_beside_calls(tmp_path):
    config = KernelBenchConfig(lengths=[512], heads=4, variants=["window:w=64"], repeats=3, warmup=1,
                               out=str(tmp_path), device="cuda", profile_kernels=2)
    rows = [json.loads(line) for line in (bench_kernel(config) / "kernel_results.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["status"] == "ok" and "graph_error" not in row, row
        assert 0 < row["graph_median_s"] and len(row["graph_times_s"]) == 3
        assert row["graph_speedup"] is not None
        assert row["kernels"] and all(k["us"] > 0 for k in row["kernels"]), row["kernels"]
    dense = next(r for r in rows if r["variant"] == DENSE and r["mode"] == "forward+backward")
    assert dense["graph_median_s"] < dense["median_s"], "a replay skips the Python and autograd work of a call"


def test_bench_kernel_times_each_variant_compiled_beside_eager(tmp_path):
    from torch._dynamo.utils import counters

    config = KernelBenchConfig(lengths=[64], heads=2, head_dim=8, dtype="float32", device="cpu", repeats=1, warmup=1,
                               variants=["window:w=16", "hedgehog"], modes=["forward+backward"],
                               compiled_variants=True, compile_backend="eager", out=str(tmp_path))
    rows = [json.loads(line) for line in (bench_kernel(config) / "kernel_results.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["sdpa_flash", "window16", "window16_compiled", "hedgehog",
                                            "hedgehog_compiled"]
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    assert counters["stats"]["unique_graphs"] >= 1, "the last compiled case was traced (reset() clears the count)"


def test_bench_kernel_compiles_only_the_variants_named(tmp_path):
    config = load_config(KernelBenchConfig, None, {
        "lengths": "64", "heads": 2, "head_dim": 8, "dtype": "float32", "device": "cpu", "repeats": 1, "warmup": 1,
        "variants": "window:w=16;hedgehog", "modes": "forward", "compile_backend": "eager", "out": str(tmp_path),
        "compiled_variants": "[hedgehog:feature_dim=0]"})
    rows = [json.loads(line) for line in (bench_kernel(config) / "kernel_results.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["sdpa_flash", "window16", "hedgehog", "hedgehog_compiled"]


def test_bench_kernel_profiles_where_each_case_spends_its_time(tmp_path):
    config = KernelBenchConfig(lengths=[64], heads=2, head_dim=8, dtype="float32", device="cpu", repeats=1, warmup=1,
                               variants=["window:w=16"], modes=["forward+backward"], profile_kernels=3,
                               out=str(tmp_path))
    rows = [json.loads(line) for line in (bench_kernel(config) / "kernel_results.jsonl").read_text().splitlines()]
    for row in rows:
        kernels = row["kernels"]
        assert 0 < len(kernels) <= 3, row
        assert [k["us"] for k in kernels] == sorted((k["us"] for k in kernels), reverse=True)
        assert all(k["name"] and k["calls"] >= 1 for k in kernels), kernels
        # CPU self times: mostly operators, though autograd's own bookkeeping may rank among them on a busy machine
        assert any(k["name"].startswith("aten::") for k in kernels), kernels
        assert row["kernels_total_us"] >= sum(k["us"] for k in kernels) - 0.5, row  # all of them, not just the top


def test_bench_kernel_refuses_an_unknown_mode(tmp_path):
    with pytest.raises(AttnswapError, match="unknown mode 'backward'"):
        bench_kernel(KernelBenchConfig(modes=["backward"], device="cpu", out=str(tmp_path)))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_gpt2(n_positions=48).save_pretrained(path)
    return path


def test_bench_runs_on_cpu_for_two_lengths(tiny_model_dir, tmp_path):
    config = BenchConfig(model=str(tiny_model_dir), variants=["window:w=8", "not_registered"], lengths=[17, 33],
                         new_tokens=3, repeats=1, warmup=0, device="cpu", dtype="float32", profile_length=24,
                         out=str(tmp_path))
    out = bench(config)
    rows = [json.loads(line) for line in (out / "bench_results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 3 * 2, "(eager, sdpa, window) × (train, prefill, generate) × 2 lengths"
    assert {r["variant"] for r in rows} == {"hf_eager", "hf_sdpa", "window8"}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["model_kind"] == "pretrained" and row["model"] == tiny_model_dir.name
        assert row["peak_mem_mb"] is None, "peak GPU memory is n/a on CPU"
        assert row["median_s"] > 0 and row["tokens_per_s"] > 0
        assert all(f in row for f in ENV_FIELDS)
    caches = {r["variant"]: r["cache"] for r in rows if r["mode"] == "generate"}
    assert caches["window8"].startswith("bounded") and caches["hf_sdpa"].startswith("dynamic")

    summary = json.loads((out / "bench_summary.json").read_text())
    assert summary["variants_skipped"] == ["not_registered"]
    assert all(e["median_s_exponent"] is not None for e in summary["exponents"])
    profiles = {p["variant"]: p for p in summary["profile"]}
    assert set(profiles) == {"hf_eager", "hf_sdpa", "window8"}
    for label, p in profiles.items():
        assert p["status"] == "ok" and 0 < p["cpu_share"] < 1 and p["gpu_share"] is None, p
        assert json.loads((out / p["trace"]).read_text())["traceEvents"], f"empty Chrome trace for {label}"
        assert "attnswap.attention" in (out / p["table"]).read_text()
    assert (out / "bench_profile.csv").is_file() and (out / "bench_results.csv").is_file()
    for name in ("bench_train.png", "bench_prefill.png", "bench_generate.png", "bench_attention_share.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name


def test_bench_runs_past_the_position_limit_on_a_labelled_surrogate(tiny_model_dir, tmp_path):
    config = BenchConfig(model=str(tiny_model_dir), variants=[], baselines=["sdpa"], modes=["prefill"],
                         lengths=[61], repeats=1, warmup=0, device="cpu", dtype="float32", profile_length=0,
                         out=str(tmp_path))
    (row,) = [json.loads(line) for line in (bench(config) / "bench_results.jsonl").read_text().splitlines()]
    assert row["status"] == "ok" and row["model_kind"] == "llama surrogate"
    assert row["model"] == f"llama surrogate of {tiny_model_dir.name}"


def test_llama_surrogate_matches_the_model_size():
    model = tiny_gpt2(n_positions=16)
    surrogate = llama_surrogate(model, 64)
    assert surrogate.config.hidden_size == 32 and surrogate.config.num_hidden_layers == 2
    assert surrogate.config.num_attention_heads == 4 and surrogate.config.vocab_size == model.config.vocab_size
    mlp = lambda m: sum(p.numel() for n, p in m.named_parameters() if "mlp" in n and p.dim() == 2)  # noqa: E731
    assert mlp(surrogate) == pytest.approx(mlp(model), rel=0.02), "the same MLP weight count"
    with torch.no_grad():
        assert surrogate(torch.randint(0, 97, (1, 50))).logits.shape == (1, 50, 97)


def test_counting_flops_leaves_a_compiled_function_compiled():
    """Called once under FlopCounterMode, a compiled function ran eagerly from then on: every later case's timing and
    profile would have measured the eager function."""
    from torch.profiler import ProfilerActivity, profile

    compiled = torch.compile(lambda x: torch.softmax(x @ x.transpose(-1, -2), dim=-1), backend="eager")
    x = torch.randn(2, 8, 4)
    compiled(x)
    assert counted_flops(lambda _: compiled(x)) == 2 * 2 * 8 * 8 * 4
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        compiled(x)
    assert any(event.name.startswith("Torch-Compiled Region") for event in profiler.events()), "ran eagerly"
