"""Checks of attnswap/measure/evaluate.py on tiny in-memory models: the metrics are right where the answer is known."""

from __future__ import annotations

import csv
import gzip
import json
import math
from dataclasses import dataclass

import pytest
import torch

from attnswap import AttnswapError, original_attention, save, swap
from attnswap.measure.evaluate import (EvalConfig, _read_text, attention_mse, compare_stream, criteria, edge_case_checks,
                               evaluate, gradient_cosine, strided_windows)
from attnswap.hf.models import max_positions
from attnswap.variants import Variant
from attnswap.variants.full import Full
from tests.conftest import tiny_gpt2, tiny_llama

PERIOD = 3


def periodic_ids(n_tokens: int, seed: int) -> torch.Tensor:
    """Random tokens repeating every PERIOD: predictable only by looking PERIOD - 1 tokens back."""
    block = torch.randint(3, 97, (PERIOD,), generator=torch.Generator().manual_seed(seed))
    return block.repeat(math.ceil(n_tokens / PERIOD))[:n_tokens]


@pytest.fixture(scope="module")
def trained_gpt2():
    """A tiny GPT-2 trained (about a second) to continue periodic sequences, so its attention matters."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier than two threads on a shared two-core machine
    try:
        model = tiny_gpt2().train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(100):
            x = torch.randint(3, 97, (16, PERIOD), generator=g).repeat(1, 11)  # (16, 33)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval().requires_grad_(False)


def token_by_token_nll(model, ids: torch.Tensor, context: int, stride: int) -> float:
    """Mean NLL, each token i scored alone, its context starting at the first window that has it as a new token."""
    total, n = 0.0, len(ids)
    for i in range(1, n):
        k = next(k for k in range(n) if min(k * stride + context, n) > i)
        with torch.no_grad():
            logits = model(input_ids=ids[k * stride : i][None]).logits[0, -1]
        total -= torch.log_softmax(logits.double(), -1)[ids[i]].item()
    return total / (n - 1)


# --- windows and perplexity --------------------------------------------------------------------
@pytest.mark.parametrize("n,context,stride", [(41, 16, 5), (10, 4, 3), (5, 16, 4), (33, 8, 7)])
def test_strided_windows_score_every_token_once(n, context, stride):
    scored = []
    for begin, end, n_scored in strided_windows(n, context, stride):
        assert end - begin <= context
        scored.extend(range(end - n_scored, end))
        assert end - n_scored > begin, "a window's first token has no context and must not be scored"
    assert scored == list(range(1, n))


def test_strided_windows_refuse_stride_beyond_context():
    with pytest.raises(AttnswapError, match="stride"):
        strided_windows(100, 8, 9)


@pytest.mark.parametrize("spec,batch_size", [("full", 1), ("window:w=3", 3)], ids=["full-batch1", "window3-batch3"])
def test_strided_perplexity_matches_token_by_token(spec, batch_size):
    model = swap(tiny_gpt2(), spec)
    ids = torch.randint(3, 97, (41,), generator=torch.Generator().manual_seed(1))
    result = compare_stream(model, ids, context=16, stride=5, batch_size=batch_size, progress=False)
    expected_swapped = token_by_token_nll(model, ids, 16, 5)
    with original_attention(model):
        expected_original = token_by_token_nll(model, ids, 16, 5)
    assert result["tokens_scored"] == 40
    assert math.log(result["perplexity"]["original"]) == pytest.approx(expected_original, abs=1e-5)
    assert math.log(result["perplexity"]["swapped"]) == pytest.approx(expected_swapped, abs=1e-5)


def test_context_beyond_model_positions_is_refused():
    model = swap(tiny_gpt2(n_positions=128), "full")
    with pytest.raises(AttnswapError, match="exceeds the model's 128 positions"):
        compare_stream(model, torch.arange(3, 300) % 97, context=200, stride=100, progress=False)


# --- identity and a bad variant ----------------------------------------------------------------
def test_full_variant_is_identity_on_every_metric(tiny_model):
    model = swap(tiny_model, "full")
    ids = torch.randint(3, 97, (45,), generator=torch.Generator().manual_seed(2))
    stream = compare_stream(model, ids, context=20, stride=7, batch_size=2, progress=False)
    assert stream["perplexity"]["swapped"] == pytest.approx(stream["perplexity"]["original"], rel=1e-6)
    assert abs(stream["kl"]["mean"]) < 1e-7 and abs(stream["kl"]["p95"]) < 1e-7
    assert stream["top1_agreement"] == 1.0
    assert stream["accuracy"]["swapped"] == stream["accuracy"]["original"]
    mse, cosine = attention_mse(model, ids[:23]), gradient_cosine(model, ids[:23])
    assert len(mse) == len(cosine) == 2
    assert max(mse) < 1e-12, f"attention MSE per layer {mse}"
    assert min(cosine) > 1 - 1e-5, f"gradient cosine per layer {cosine}"
    met = {c["criterion"]: c["met"] for c in criteria(stream, mse, cosine)}
    assert [m for m in met.values()] == [True, True, True, True, None], met


def test_gradient_cosine_restores_requires_grad():
    model = swap(tiny_llama(), "window:w=2")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    gradient_cosine(model, torch.arange(3, 22))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())


def test_window1_is_clearly_worse_on_every_metric(trained_gpt2):
    ids = periodic_ids(61, seed=5)
    model = swap(trained_gpt2, "full")
    good = compare_stream(model, ids, context=24, stride=7, progress=False)
    swap(model, "window:w=1")
    bad = compare_stream(model, ids, context=24, stride=7, progress=False)
    mse, cosine = attention_mse(model, ids[:23]), gradient_cosine(model, ids[:23])
    swap(model, "full")  # leave the module-scoped model as it was for other tests
    assert good["perplexity"]["original"] < 10, "the trained model should have learnt the periodic text"
    assert bad["perplexity"]["swapped"] > 10 * bad["perplexity"]["original"]
    assert bad["kl"]["mean"] > 1.0 and bad["kl"]["p50"] > 0.1
    assert bad["top1_agreement"] < 0.5
    assert bad["accuracy"]["ratio"] < 0.5
    assert min(mse) > 1e-3, f"attention MSE per layer {mse}"
    assert max(cosine) < 0.95, f"gradient cosine per layer {cosine}"
    assert [c["met"] for c in criteria(bad, mse, cosine)][:4] == [False, False, False, False]


@dataclass(frozen=True)
class _NoParams:
    pass


class _NoMatrix(Variant):
    """Full attention through an efficient path only: no implied attention matrix to compare."""

    name = "nomatrix"
    Params = _NoParams

    def attend(self, q, k, v, ctx, state):
        return Full().attend(q, k, v, ctx, state)


def test_variant_without_implied_matrix_reports_not_available():
    model = swap(tiny_gpt2(), _NoMatrix())
    mse = attention_mse(model, torch.arange(3, 20))
    assert mse == [None, None]
    row = criteria(compare_stream(model, torch.arange(3, 30), 16, 8, progress=False), mse, None)[1]
    assert row["met"] is None and row["note"] == "n/a"


@pytest.mark.parametrize("spec", ["full", "window:w=4"])
@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_edge_cases_are_finite(factory, spec):
    model = swap(factory(), spec)
    checks = edge_case_checks(model, torch.arange(3, 40), max_len=max_positions(model), pad_id=0)
    assert [c["check"] for c in checks] == ["all_padding_row", "mixed_padding", "repeated_token", "length_1",
                                            "max_length"]
    assert all(c["finite"] for c in checks), checks


# --- eval text ---------------------------------------------------------------------------------
def test_read_text_refuses_missing_and_empty_files(tmp_path):
    with pytest.raises(AttnswapError, match=str(tmp_path / "nope.tokens")):
        _read_text(str(tmp_path / "nope.tokens"))
    (tmp_path / "empty.txt").write_text(" \n\n ")
    with pytest.raises(AttnswapError, match="empty"):
        _read_text(str(tmp_path / "empty.txt"))


def test_read_text_reads_gzip(tmp_path):
    with gzip.open(tmp_path / "t.raw.gz", "wt", encoding="utf-8") as f:
        f.write(" = A = \n text here \n")
    assert _read_text(str(tmp_path / "t.raw.gz")) == " = A = \n text here \n"


# --- the command -------------------------------------------------------------------------------
def _text_file(tmp_path, n_words: int = 120):
    g = torch.Generator().manual_seed(3)
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"w{int(i)}" for i in torch.randint(4, 97, (n_words,), generator=g)) + "\n")
    return path


def test_evaluate_writes_json_markdown_and_csv(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6 w7\nw10 w11\n")
    config = EvalConfig(model=str(tiny_model_dir), variant="window:w=4", data=str(_text_file(tmp_path)), context=32,
                        stride=12, attn_sample_len=20, grad_len=21, out=str(tmp_path / "run"), prompts=str(prompts),
                        gen_tokens=4, device="cpu")
    result = evaluate(config)
    printed = capsys.readouterr().out
    ppl = result["stream"]["perplexity"]
    assert f"perplexity original: {ppl['original']:.2f}  swapped: {ppl['swapped']:.2f}" in printed
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["info"]["model"] == str(tiny_model_dir)
    assert saved["info"]["config"]["variant"] == "window:w=4"
    assert {"device", "dtype", "torch", "transformers", "command"} <= set(saved["info"])
    assert saved["variant"] == "window:w=4,sinks=0"
    assert saved["stream"]["tokens_scored"] == 119
    assert [c["finite"] for c in saved["edge_cases"]] == [True] * 5
    assert len(saved["generations"]) == 2 and saved["generations"][0]["prompt"] == "w5 w6 w7"
    assert len(saved["criteria"]) == 5 and saved["criteria"][-1]["note"] == "see bench"
    markdown = (tmp_path / "run" / "eval.md").read_text()
    assert "| perplexity |" in markdown and "## Criteria" in markdown
    rows = list(csv.DictReader((tmp_path / "run" / "eval_layers.csv").open()))
    assert [r["layer"] for r in rows] == ["0", "1"]
    assert float(rows[0]["attention_mse"]) == pytest.approx(saved["attention_mse"]["per_layer"][0])


def test_evaluate_reads_a_saved_swapped_model(tiny_model_dir, tmp_path):
    from attnswap import load_model, load_tokenizer

    data = str(_text_file(tmp_path, 60))
    common = dict(data=data, context=24, stride=8, attn_sample_len=0, grad_len=0, edge_cases=False, gen_tokens=0,
                  device="cpu")
    by_spec = evaluate(EvalConfig(model=str(tiny_model_dir), variant="window:w=4", out=str(tmp_path / "a"), **common))
    model = swap(load_model(str(tiny_model_dir)), "window:w=4")
    save(model, tmp_path / "swapped", tokenizer=load_tokenizer(str(tiny_model_dir)))
    by_dir = evaluate(EvalConfig(swapped=str(tmp_path / "swapped"), out=str(tmp_path / "b"), **common))
    assert by_dir["variant"] == by_spec["variant"]
    assert by_dir["stream"]["perplexity"] == pytest.approx(by_spec["stream"]["perplexity"], rel=1e-6)
    assert by_dir["attention_mse"]["per_layer"] is None
    with pytest.raises(AttnswapError, match="not both"):
        evaluate(EvalConfig(swapped=str(tmp_path / "swapped"), variant="window:w=8", **common))


def test_a_variant_goes_only_into_the_layers_asked_for(tiny_model_dir, tmp_path):
    from attnswap.measure.generate import load_swapped
    from attnswap.hf.swap import attention_modules

    model, _, _ = load_swapped(str(tiny_model_dir), "window:w=2", "", "cpu", "float32", layers=[1])
    swapped = [getattr(m, "attnswap_variant", None) is not None for m in attention_modules(model)]
    assert swapped == [False, True]
    save(model, tmp_path / "saved")
    with pytest.raises(AttnswapError, match=r"layers=\[0\] applies to --variant"):
        load_swapped(str(tiny_model_dir), "", str(tmp_path / "saved"), "cpu", "float32", layers=[0])
