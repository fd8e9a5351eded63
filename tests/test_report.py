"""The report: every section from a synthetic run folder holding every kind of input, rendered in Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from attnswap.measure.bench_kernel import exponents, write_results
from attnswap.errors import AttnswapError
from attnswap.report.build import ReportConfig, report

SECTIONS = [
    "Quality criteria", "Perplexity, KL and agreement", "Quality against cost", "Per-layer attention fidelity", "Attention maps",
    "Distillation curves", "Mixture weights during training", "Window sweep", "Generations",
    "Attention kernels: time and memory", "Whole model: time and memory", "Where the time goes: attention share",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / ".pytest_artifacts"
ENV = {"gpu": "NVIDIA H100 80GB HBM3", "device": "cuda:0", "cpu": "x86_64", "torch": "2.13.0", "transformers": "5.23.0",
       "triton": "3.5.0", "cuda": "12.8", "git_commit": "0123abc"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench_rows(modes, variants, lengths, extra=lambda row: {}):
    rows = []
    for mode in modes:
        for k, variant in enumerate(variants):
            for n in lengths:
                time_s = 1e-6 * n ** (2.0 - 0.5 * k)
                row = {**ENV, "dtype": "bfloat16", "shape": f"(1,16,{n},64)", "variant": variant, "spec": variant,
                       "mode": mode, "length": n, "status": "ok", "median_s": time_s, "times_s": [time_s] * 5,
                       "warmup_s": 0.5, "peak_mem_mb": 10 + 1e-3 * n ** (2 - k)}
                rows.append({**row, **extra(row)})
    rows[-1].update(status="oom", median_s=None, peak_mem_mb=None, error="out of memory")
    return rows


def make_run(root: Path) -> Path:
    """A run folder with every input the report reads, in the formats the commands write."""
    run = root / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "frontier.json").write_text(json.dumps({
        "label": "window64_sinks4", "teacher": "models/teacher-gpt2-19m", "ppl": 86.3, "teacher_ppl": 84.1,
        "kl": 0.05, "top1": 0.9, "attn_cost": 0.12, "tokens": 819200, "gpu_seconds": 60.0,
        "command": "attnswap eval --swapped runs/w64/model"}))
    (run / "eval" / "eval.json").write_text(json.dumps({
        "info": {"model": "models/teacher-gpt2-19m"}, "variant": "window:w=64,sinks=4", "label": "window64_sinks4",
        "stream": {"perplexity": {"original": 84.1, "swapped": 86.3}, "accuracy": {"original": 0.31, "swapped": 0.30,
                   "ratio": 0.97}, "kl": {"mean": 0.012, "p50": 0.004, "p95": 0.05}, "top1_agreement": 0.93,
                   "tokens_scored": 4096, "context": 1024, "stride": 512},
        "attention_mse": {"sample_tokens": 256, "per_layer": [1e-5, 3e-5, 2e-4, None]},
        "gradient_cosine": {"sample_tokens": 128, "per_layer": [0.99, 0.97, 0.93, 0.96]},
        "edge_cases": [{"check": "left padding", "shape": [2, 19], "finite": True}],
        "criteria": [{"criterion": "next-token accuracy >= 95 % of original", "value": 0.97, "threshold": 0.95,
                      "met": True, "note": ""},
                     {"criterion": "KL <= 0.001 nats/token", "value": 0.012, "threshold": 1e-3, "met": False,
                      "note": ""},
                     {"criterion": "peak memory -30 %", "value": None, "threshold": 0.3, "met": None,
                      "note": "see bench"}],
        "generations": [],
    }))
    tokens = np.array(["The", "·quick", "·brown", "·fox", "·jumps", "·over", "·the", "·lazy", "·dog"])
    t = len(tokens)
    causal = np.tril(np.ones((t, t)))
    original = np.broadcast_to(causal / causal.sum(-1, keepdims=True), (2, 4, t, t))
    window = np.tril(causal, 0) - np.tril(causal, -3)
    np.savez(run / "eval" / "attention_maps.npz", original=original, tokens=tokens,
             variant=np.broadcast_to(window / window.sum(-1, keepdims=True), (2, 4, t, t)),
             variant_label=np.array("window3"))

    (run / "generate").mkdir()
    generations = [
        {"prompt": "The history of", "mode": "greedy", "seed": None,
         "original": " the city begins in the 12th century.",
         "variants": {"window64_sinks4": " the city begins in the twelfth century, when"}},
        {"prompt": "In mathematics,", "mode": "greedy", "seed": None,
         "original": " a group is a set with an operation.",
         "variants": {"window64_sinks4": " a group is a set equipped with an operation"}},
    ]
    (run / "generate" / "generations.json").write_text(
        json.dumps({"info": {}, "variants": ["window64_sinks4"], "rows": generations}))

    (run / "distill").mkdir()
    lines = []
    for step in range(0, 41, 4):
        lines.append({"step": step, "loss": 2.0 / (1 + step), "kl": 1.5 / (1 + step), "lr": 1e-3, "tokens_per_s": 900.0,
                      "mixture_candidates": ["win4", "win16", "sink4"],
                      "mixture_weights": [[0.5 + 0.01 * step, 0.5, 0.5 - 0.01 * step]] * 3})
        lines.append({"step": step, "val_kl": 1.2 / (1 + step), "val_top1": 0.6 + 0.008 * step})
    (run / "distill" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4')

    (run / "sweep").mkdir()
    (run / "sweep" / "window_sweep.json").write_text(json.dumps({"rows": [
        {"w": w, "kl": 1.0 / w, "perplexity": 84 + 100 / w} for w in (8, 16, 32, 64, 128, 256)]}))

    kernel_rows = _bench_rows(["forward", "forward+backward"], ["sdpa_flash", "window256", "performer_m256"],
                              [512, 1024, 2048, 4096],
                              lambda r: {"flops": 4.0 * r["length"] ** 2, "speedup": 1.5, "flop_ratio": 2.0,
                                         "efficiency": 0.75})
    write_results(run / "bench-kernel", "kernel", kernel_rows, {
        "kind": "bench-kernel", "environment": ENV, "variants_skipped": ["nsa"],
        "exponents": exponents(kernel_rows, ["median_s", "peak_mem_mb"], ("mode", "variant"))})

    bench_rows = _bench_rows(["train", "prefill", "generate"], ["hf_eager", "hf_sdpa", "window256"],
                             [256, 512, 1024, 2048],
                             lambda r: {"model": "teacher-gpt2-19m" if r["length"] <= 1024 else "llama surrogate",
                                        "model_kind": "pretrained" if r["length"] <= 1024 else "llama surrogate",
                                        "tokens_per_s": r["length"] / r["median_s"]})
    (run / "bench").mkdir()
    (run / "bench" / "bench_profile_window256.trace.json").write_text("{}")
    profile = [{"variant": v, "model": "teacher-gpt2-19m", "length": 1024, "status": "ok", "attention_cpu_ms": 2.0,
                "step_cpu_ms": 10.0, "cpu_share": 0.2, "attention_gpu_ms": a, "total_gpu_ms": 8.0, "gpu_share": a / 8,
                "trace": f"bench_profile_{v}.trace.json", "table": f"bench_profile_{v}.txt"}
               for v, a in (("hf_eager", 5.0), ("hf_sdpa", 2.0), ("window256", 1.0))]
    write_results(run / "bench", "bench", bench_rows, {
        "kind": "bench", "environment": ENV, "profile": profile,
        "models": [{"name": "teacher-gpt2-19m", "kind": "pretrained", "position_limit": 1024}],
        "exponents": exponents(bench_rows, ["median_s", "peak_mem_mb"], ("model", "variant", "mode"))})
    return run


def image_sources(page: str) -> list[str]:
    return re.findall(r"<img[^>]*\ssrc=\"([^\"]*)\"", page)


def assert_png_data_uris(sources: list[str]) -> None:
    for src in sources:
        assert src.startswith("data:image/png;base64,"), f"img src is not a PNG data URI: {src[:60]}"
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC), "img data is not a PNG"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    html_path = report(ReportConfig(run_dirs=[str(make_run(root))], out=str(root / "out")))
    return html_path


def test_report_has_every_section_from_a_complete_run(built):
    page = built.read_text()
    markdown = (built.parent / "report.md").read_text()
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page.replace("&#x27;", "'"), f"section {title!r} missing from the HTML"
        assert f"## {title}" in markdown, f"section {title!r} missing from the markdown"
    assert "Not in these runs." not in page, "a section with data says it has none"
    assert "✗ not met" in page and "✓ met" in page
    assert "window64_sinks4" in page and "twelfth century" in page
    assert "measured on the Llama-family surrogate" in page and "OOM" in page


def test_report_images_are_embedded_pngs(built):
    page = built.read_text()
    sources = image_sources(page)
    assert len(sources) >= 10, f"only {len(sources)} images"
    assert_png_data_uris(sources)
    assert "http://" not in page and "https://" not in page, "the page must not load anything from outside"
    markdown = (built.parent / "report.md").read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):
        assert (built.parent / link).read_bytes().startswith(PNG_MAGIC), f"markdown links a missing PNG: {link}"


def test_report_says_not_in_these_runs_for_missing_data(tmp_path):
    run = tmp_path / "run"
    (run / "gen").mkdir(parents=True)
    (run / "gen" / "generations.json").write_text(json.dumps([{"prompt": "a", "original": "b", "variant": "c"}]))
    page = report(ReportConfig(run_dirs=[str(run)])).read_text()
    assert page.count("Not in these runs.") == len(SECTIONS) - 1
    assert (run / "report" / "report.md").is_file(), "default output folder is <run>/report"


def test_report_refuses_a_missing_run_folder(tmp_path):
    with pytest.raises(AttnswapError, match="does not exist"):
        report(ReportConfig(run_dirs=[str(tmp_path / "nope")]))
    with pytest.raises(AttnswapError, match="at least one run folder"):
        report(ReportConfig())


def test_report_computes_attention_maps_from_a_model(tmp_path):
    (tmp_path / "run").mkdir()
    html_path = report(ReportConfig(run_dirs=[str(tmp_path / "run")], variant="window:w=4", map_layer=1, map_head=2,
                                    map_text="one two three four five six seven eight"))
    maps = np.load(html_path.parent / "attention_maps.npz")
    assert maps["original"].shape == maps["variant"].shape and maps["original"].shape[-1] == maps["original"].shape[-2]
    assert np.allclose(maps["original"].sum(-1), 1, atol=1e-5) and np.allclose(maps["variant"].sum(-1), 1, atol=1e-5)
    assert not np.allclose(maps["original"], maps["variant"]), "a window of 4 must differ from full attention"
    assert "Attention maps</h2>\n<h3>computed from" in html_path.read_text()


def test_report_opens_in_headless_chromium(built, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    screenshot = tmp_path / "report.png"
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={screenshot}",
         "--window-size=1200,3000", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", built.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert screenshot.is_file() and screenshot.read_bytes().startswith(PNG_MAGIC), (
        f"no screenshot (exit {result.returncode}): {result.stderr[-2000:]}")
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(screenshot, ARTIFACTS / "report.png")
    shutil.copyfile(built, ARTIFACTS / "report.html")
