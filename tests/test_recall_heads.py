"""measure/recall_heads.py and `attnswap plan --objective recall`: the attention a window would lose, read from the
teacher's own attention matrix (the oracle), KV heads routed as a whole within the budget, the hardened swap saved."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from attnswap.data.recall_tasks import PROBE_STREAM, Vocabulary
from attnswap.errors import AttnswapError
from attnswap.measure.recall_heads import SEGMENT, far_attention, kv_head_scores, probe_samples, route_kv_heads
from attnswap.variants import get_variant
from tests.conftest import tiny_llama

LENGTH, W, SINKS = 256, 24, 2


def digit_vocabulary() -> Vocabulary:
    """Ordinary ids 20..96 of the tiny models' 97; filler ids 3..7; digits 10..19."""
    def encode(text: str) -> list[int]:
        return [10 + int(c) if c.isdigit() else 9 for c in text]

    return Vocabulary((3, 4, 5, 6, 7), np.arange(20, 97), encode)


def far_shares_from_attentions(model, samples) -> dict[str, torch.Tensor]:
    """(layers, heads) each: the same quantities from eager attention's probabilities and a window drawn by hand."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    totals, counts = {}, {}
    with torch.no_grad():
        for sample in samples:
            attentions = torch.stack(eager(input_ids=sample.ids[None], output_attentions=True).attentions)[:, 0]
            queries = sample.targets - 1
            keys = torch.arange(sample.ids.numel())
            outside = ((queries[:, None] - keys[None, :]) >= W) & (keys[None, :] >= SINKS)  # (n, S)
            answer = sample.ids[None, :] == sample.ids[sample.targets][:, None]
            rows = attentions[:, :, queries].double()  # (layers, H, n, S)
            task = "retrieval_" + ("passkey" if "passkey" in sample.info else "copy")
            for key, allowed in (("lost", outside), (task, outside & answer)):
                totals[key] = totals.get(key, 0) + (rows * allowed).sum(dim=(-1, -2))
                counts[key] = counts.get(key, 0) + len(queries)
    shares = {key: total / counts[key] for key, total in totals.items()}
    shares["retrieval"] = torch.maximum(shares["retrieval_copy"], shares["retrieval_passkey"])
    return shares


def test_far_attention_equals_the_attention_matrix_outside_the_window():
    model = tiny_llama(n_layer=2, seed=3)
    samples = probe_samples(digit_vocabulary(), LENGTH, W, 4, seed=0)
    shares = far_attention(model, samples, get_variant(f"window:w={W},sinks={SINKS}"))
    expected = far_shares_from_attentions(model, samples)
    assert shares.keys() == expected.keys() == {"lost", "retrieval", "retrieval_copy", "retrieval_passkey"}
    for key in expected:
        assert shares[key].shape == (2, 4)
        torch.testing.assert_close(shares[key], expected[key], rtol=1e-4, atol=1e-7)
    assert float(shares["lost"].min()) > 0.05, "random heads spread attention over the far keys"
    assert 0 < float(shares["retrieval"].max()) < float(shares["lost"].min()), "a few far keys hold the answer"
    assert not torch.equal(shares["retrieval_copy"], shares["retrieval_passkey"])
    assert getattr(model, "attnswap_record", None) is None, "the teacher is left unswapped"


def test_a_window_that_reaches_every_key_loses_nothing():
    model = tiny_llama(n_layer=2, seed=3)
    samples = probe_samples(digit_vocabulary(), LENGTH, W, 2, seed=0)
    shares = far_attention(model, samples, get_variant(f"window:w={LENGTH}"))
    assert float(shares["lost"].abs().max()) == 0.0 and float(shares["retrieval"].abs().max()) == 0.0


def test_probes_reach_past_twice_the_window_and_are_not_the_suites_sequences():
    vocab = digit_vocabulary()
    samples = probe_samples(vocab, LENGTH, W, 6, seed=0)
    assert len(samples) == 6 and all(s.ids.numel() == LENGTH for s in samples)
    copies = samples[0::2]
    distances = [s.info["distance"] for s in copies]
    assert distances[0] == 2 * W and distances[-1] == LENGTH - SEGMENT, distances
    for s in copies:  # each copied token sits exactly `distance` before its copy
        source, copy_start = s.info["source_start"], s.info["copy_start"]
        assert torch.equal(s.ids[source:source + SEGMENT], s.ids[copy_start:copy_start + SEGMENT])
    assert all("passkey" in s.info for s in samples[1::2])
    from attnswap.data.recall_tasks import induction_sample

    suite = induction_sample(vocab, LENGTH, distances[0], SEGMENT, 0, 0)
    assert not torch.equal(suite.ids, copies[0].ids) and PROBE_STREAM > 0
    with pytest.raises(AttnswapError, match="raise --context to at least"):
        probe_samples(vocab, 2 * W + SEGMENT, W, 2, seed=0)


def test_a_kv_head_scores_its_highest_query_head_in_transformers_order():
    lost = torch.tensor([[0.1, 0.7, 0.2, 0.3, 0.0, 0.05], [0.5, 0.4, 0.9, 0.1, 0.2, 0.3]], dtype=torch.float64)
    scores = kv_head_scores(lost, 3)  # query heads 0-1 read KV head 0, 2-3 KV head 1, 4-5 KV head 2
    assert scores.tolist() == [[0.7, 0.3, 0.05], [0.5, 0.9, 0.3]]
    with pytest.raises(AttnswapError, match="evenly"):
        kv_head_scores(lost, 4)


def test_routing_keeps_the_highest_scores_as_many_as_the_budget_allows():
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.0]], dtype=torch.float64)
    cheap = 0.05
    for budget in (0.05, 0.2, 0.4, 0.7, 1.0):
        full = route_kv_heads(scores, budget, cheap)
        kept = int(full.sum())
        cost = (kept + (6 - kept) * cheap) / 6
        assert cost <= budget + 1e-12 and (kept == 6 or (kept + 1 + (5 - kept) * cheap) / 6 > budget + 1e-12)
        order = scores.flatten().argsort(descending=True)[:kept]
        assert set(full.flatten().nonzero().flatten().tolist()) == set(order.tolist())
    with pytest.raises(AttnswapError, match="raise the budget"):
        route_kv_heads(scores, 0.01, cheap)


# --- the command, on a tiny random Llama with GQA ----------------------------------------------
def test_plan_recall_routes_kv_heads_and_saves_the_hardened_swap(tiny_llama_dir, tmp_path, capsys):
    import attnswap
    from attnswap.cli import main
    from attnswap.hf.swap import attention_modules
    from attnswap.measure.plan import model_cost

    out = tmp_path / "plan"
    code = main(["plan", "--objective", "recall", "--variant", "duo:w=16,sinks=2", "--measure", "kv", "--budget",
                 "0.5", "--context", "256", "--blocks", "4", "--model", str(tiny_llama_dir), "--device", "cpu",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    rows = plan["heads"]
    assert len(rows) == 2 * 2 and plan["objective"] == "recall" and plan["probes"]["count"] == 4
    full = torch.tensor(plan["full_kv_heads"])
    scores = torch.tensor([r["retrieval"] for r in rows]).view(2, 2)
    assert 0 < int(full.sum()) < 4 and float(scores[full].min()) >= float(scores[~full].max())
    assert plan["predicted_cost"] <= 0.5 and plan["costs"]["kv"]["256"] == plan["predicted_cost"]
    assert plan["probes"]["length"] == 256 and plan["costs"]["kv"]["512"] < plan["predicted_cost"], plan["costs"]
    for name in ("heads.csv", "heads.png"):
        assert (out / name).stat().st_size > 0
    model = attnswap.load(out / "model", device="cpu")
    for module, flags in zip(attention_modules(model), full):
        assert module.attnswap.full_heads.tolist() == flags.repeat_interleave(2).tolist()
        assert bool(module.attnswap.hardened)
    assert model_cost(model, 256, "kv") == pytest.approx(plan["predicted_cost"])


@pytest.mark.parametrize("argv,message", [
    (["--variant", "window:w=16,sinks=2"], "give a duo variant"),
    (["--variant", "duo:w=120,sinks=2", "--budget", "0.9", "--measure", "kv"], "raise --context to at least"),
    (["--swapped", "somewhere"], "drop --swapped"),
    (["--objective", "recal"], "unknown objective 'recal'"),
    (["--variant", "duo:w=16,sinks=2", "--probe_length", "1024"], "exceeds the model's 512 positions"),
    (["--variant", "duo:w=16,sinks=2", "--budget", "0.01", "--measure", "kv"], "raise the budget"),
])
def test_bad_recall_plans_are_one_error_line(tiny_llama_dir, argv, message, tmp_path, capsys):
    from attnswap.cli import main

    code = main(["plan", "--objective", "recall", "--context", "256", "--blocks", "2", "--model",
                 str(tiny_llama_dir), "--device", "cpu", "--out", str(tmp_path / "p"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "p" / "plan.json").exists()
