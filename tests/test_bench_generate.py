"""attnswap bench-generate (bench_generate.py) on the CPU: a tiny config folder, every impl, the files it writes."""

from __future__ import annotations

import json

from transformers import LlamaConfig

from attnswap.measure.bench_generate import GenerateBenchConfig, bench_generate
from attnswap.cli import main
from attnswap.variants import get_variant


def _config_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64).save_pretrained(folder)
    return folder


def test_bench_generate_writes_rows_ratios_csv_and_plot(tmp_path):
    out = tmp_path / "run"
    config = GenerateBenchConfig(model=str(_config_folder(tmp_path)), max_positions=256, prompts=[16, 48],
                                 batches=[2], new_tokens=4, repeats=1, device="cpu", dtype="float32",
                                 variants=["window:w=8,sinks=2", "hybrid:w=8,sinks=2,chunk=4"], out=str(out))
    bench_generate(config)
    summary = json.loads((out / "summary.json").read_text())
    assert {"gpu", "torch", "transformers", "command", "rows"} <= summary.keys()
    rows = summary["rows"]
    impls = {"hf_sdpa", *(get_variant(spec).spec for spec in config.variants)}  # no compiled baseline on the CPU
    assert {(r["impl"], r["batch"], r["prompt"]) for r in rows} == {(i, 2, p) for i in impls for p in (16, 48)}
    for row in rows:
        assert row["status"] == "ok" and row["decode_tok_s"] > 0 and row["prefill_ms"] > 0, row
        assert row["decode_x_static"] is None and row["peak_MiB"] is None  # neither exists on the CPU
    sdpa = {(r["batch"], r["prompt"]): r for r in rows if r["impl"] == "hf_sdpa"}
    for row in rows:
        base = sdpa[row["batch"], row["prompt"]]
        assert abs(row["decode_x_sdpa"] - row["decode_tok_s"] / base["decode_tok_s"]) < 1e-2
    for impl in impls - {"hf_sdpa"}:
        sizes = {r["cache_MiB"] for r in rows if r["impl"] == impl and r["batch"] == 2}
        assert len(sizes) == 1, f"{impl}: cache bytes change with the prompt: {sizes}"
    grows = [sdpa[2, 16]["cache_MiB"], sdpa[2, 48]["cache_MiB"]]
    assert grows[1] > grows[0], "the DynamicCache grows with the prompt"
    assert (out / "rows.csv").read_text().count("\n") == len(rows) + 1
    assert (out / "generation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_generate_refuses_a_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["bench-generate", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "run")])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: --model")


def test_a_saved_routed_swap_is_measured_beside_the_baseline(tmp_path):
    """A hardened duo (one full KV head per layer), saved: its row's cache grows by the full heads' keys alone."""
    import torch
    from transformers import LlamaForCausalLM

    from attnswap.hf.saved import save
    from attnswap.hf.swap import attention_modules, swap

    folder = _config_folder(tmp_path)
    torch.manual_seed(0)
    model = swap(LlamaForCausalLM(LlamaConfig.from_pretrained(folder)).eval(), "duo:w=8,sinks=2")
    for module in attention_modules(model):
        module.attnswap.harden(torch.tensor([True, True, False, False]))
    save(model, tmp_path / "routed")
    out = tmp_path / "run"
    bench_generate(GenerateBenchConfig(model=str(folder), prompts=[16, 48], batches=[1], new_tokens=4, repeats=1,
                                       device="cpu", dtype="float32", variants=[], swapped=[str(tmp_path / "routed")],
                                       out=str(out)))
    rows = {(r["impl"], r["prompt"]): r for r in json.loads((out / "summary.json").read_text())["rows"]}
    routed, sdpa = ("swapped:routed", 16), ("hf_sdpa", 16)
    assert rows[routed]["status"] == "ok" and rows[routed]["decode_tok_s"] > 0 and not rows[routed]["compiled"]
    grown = {impl: rows[impl, 48]["cache_MiB"] - rows[impl, 16]["cache_MiB"] for impl in ("hf_sdpa", "swapped:routed")}
    assert 0 < grown["swapped:routed"] < 0.6 * grown["hf_sdpa"], grown  # half the KV heads, and their real flags
    assert rows[routed]["cache_MiB"] > 0 and rows[sdpa]["cache_MiB"] > 0
