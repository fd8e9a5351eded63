"""plan.py: the attention cost model, layer sensitivity, the planner under a budget, the `attnswap plan` command."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import attnswap
from attnswap.cli import main
from attnswap.errors import AttnswapError
from attnswap.measure.plan import (PlanConfig, assignment_cost, best_plans, choose_cheap_layers, head_costs, layer_sensitivity,
                           model_cost, route_heads)
from attnswap.hf.attention import STATE_ATTR
from attnswap.hf.swap import attention_modules, is_swapped
from attnswap.variants.mixture import Mixture, MixtureParams
from tests.conftest import tiny_gpt2, tiny_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- cost model ----------------------------------------------------------------------------------
def _by_hand(n: int, allowed) -> tuple[float, float]:
    """(pairs allowed / causal pairs, keys the last query sees / n) of a predicate allowed(q, kv)."""
    pairs = sum(allowed(q, kv) for q in range(n) for kv in range(q + 1))
    return pairs / (n * (n + 1) / 2), sum(allowed(n - 1, kv) for kv in range(n)) / n


@pytest.mark.parametrize("spec,allowed", [
    ("full", lambda q, kv: True),
    ("window:w=5,sinks=2", lambda q, kv: q - kv < 5 or kv < 2),
    ("window:w=8", lambda q, kv: q - kv < 8),
    ("mixture:candidates=win3+stride4", lambda q, kv: q - kv < 3 or kv % 4 == 3),
], ids=lambda x: x if isinstance(x, str) else "")
def test_mask_costs_are_exact_counts(spec, allowed):
    n = 37
    flops, kv = _by_hand(n, allowed)
    assert head_costs(spec, n, "flops", heads=2).tolist() == pytest.approx([flops] * 2)
    assert head_costs(spec, n, "kv", heads=2).tolist() == pytest.approx([kv] * 2)


def test_linear_cost_is_its_scan_flops_and_state_over_softmax_attention():
    # 4·m·D per token against 4·D per causal pair; a state of m·(D+1) floats against a cache of 2·D·n
    assert head_costs("performer:m=16", 1023, "flops", head_dim=8)[0] == pytest.approx(2 * 16 / 1024)
    assert head_costs("performer:m=16", 1024, "kv", head_dim=8)[0] == pytest.approx(16 * 9 / (2 * 8 * 1024))
    assert head_costs("hedgehog", 1023, "flops", head_dim=8)[0] == pytest.approx(2 * 16 / 1024)  # 2 halves of D
    for measure in ("flops", "kv"):  # hybrid: its window, plus Hedgehog's scan over every token
        parts = head_costs("window:w=6,sinks=2", 40, measure) + head_costs("hedgehog", 40, measure, head_dim=8)
        assert head_costs("hybrid:w=6,sinks=2", 40, measure, head_dim=8) == pytest.approx(parts)


def test_learned_state_sets_each_heads_cost():
    mixture = Mixture(MixtureParams(candidates=("win3", "full")))
    state = mixture.make_state(2, 8)
    state.kept.copy_(torch.tensor([[True, False], [True, True]]))
    costs = head_costs(mixture, 20, "flops", state=state, heads=2)
    assert costs[0] == pytest.approx(_by_hand(20, lambda q, kv: q - kv < 3)[0]) and costs[1] == 1.0
    duo = attnswap.get_variant("duo:w=3,sinks=0")
    routed = duo.make_state(3, 8)
    routed.harden(torch.tensor([False, True, False]))
    assert head_costs(duo, 20, "kv", state=routed, heads=3).tolist() == pytest.approx([3 / 20, 1.0, 3 / 20])


def test_cost_model_refuses_unknown_measures():
    with pytest.raises(AttnswapError, match="unknown measure 'time'"):
        head_costs("window:w=4", 16, "time")


# --- the planner ---------------------------------------------------------------------------------
SENSITIVITY = [0.5, 0.1, 0.3, 0.05, 0.2, 0.4]


@pytest.mark.parametrize("exact_limit", [12, 0], ids=["exact", "greedy"])
@pytest.mark.parametrize("budget", [1.0, 0.9, 0.75, 0.5, 0.34, 0.21])
def test_planner_honours_its_budget_and_gives_up_the_least_sensitive_layers(budget, exact_limit):
    costs = [0.2] * len(SENSITIVITY)
    cheap = choose_cheap_layers(SENSITIVITY, costs, budget, exact_limit=exact_limit)
    assert assignment_cost(cheap, costs) <= budget + 1e-12
    # with equal costs the best set is the k least sensitive layers, for the least k that fits
    k = next(k for k in range(len(costs) + 1) if (len(costs) - 0.8 * k) / len(costs) <= budget + 1e-12)
    assert cheap == sorted(sorted(range(len(costs)), key=SENSITIVITY.__getitem__)[:k])


def test_exact_search_finds_the_known_best_with_unequal_costs():
    # Budget 0.7 of 3 layers allows a total of 2.1: only {0} (cost 2.0, KL 1.0) and {0, 2} (1.9, KL 1.1) fit.
    assert choose_cheap_layers([1.0, 1.0, 0.1], [0.0, 0.5, 0.9], 0.7) == [0]
    # A budget every layer full meets needs nothing cheap, whatever the sensitivities.
    assert choose_cheap_layers([0.0, 0.0], [0.3, 0.3], 1.0) == []


def test_best_plans_give_the_plan_of_every_budget_one_per_size():
    plans = best_plans(SENSITIVITY, 0.2)
    assert [p["layers"] for p in plans] == [[], [3], [1, 3], [1, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4, 5], list(range(6))]
    for budget in (0.9, 0.5, 0.21):
        best = choose_cheap_layers(SENSITIVITY, [0.2] * 6, budget)
        assert best in [p["layers"] for p in plans]
    assert plans[2]["predicted_cost"] == pytest.approx((4 + 0.4) / 6) and plans[2]["predicted_kl"] == pytest.approx(0.15)


def test_best_plans_take_each_layers_own_cost():
    assert best_plans(SENSITIVITY, [0.2] * 6) == best_plans(SENSITIVITY, 0.2)
    costs = [0.2, 0.2, 0.2, 0.9, 0.2, 0.2]  # layer 3, the least sensitive, saves little when cheap (a wide layer)
    plans = best_plans(SENSITIVITY, costs)
    assert len(plans) == 7 and plans[-1]["layers"] == list(range(6))
    for plan in plans:
        assert plan["predicted_cost"] == pytest.approx(assignment_cost(plan["layers"], costs))
    assert 3 not in plans[1]["layers"], "one layer's budget (0.2 saved) cannot buy layer 3, which saves 0.1"


def test_budget_below_every_layer_cheap_is_a_one_line_error():
    with pytest.raises(AttnswapError, match=r"budget 0.1 is below the cheapest assignment .*0.2000"):
        choose_cheap_layers([0.1, 0.2], [0.2, 0.2], 0.1)


def test_layer_sensitivity_is_zero_for_full_and_positive_for_a_window_and_leaves_the_model_unswapped():
    model = tiny_gpt2(n_layer=3)
    blocks = torch.randint(3, 97, (3, 24), generator=torch.Generator().manual_seed(0))
    same = layer_sensitivity(model, "full", blocks, batch_size=2, progress=False)
    assert [r["layer"] for r in same] == [0, 1, 2]
    assert all(r["kl"] == pytest.approx(0.0, abs=1e-6) and r["top1"] == 1.0 for r in same)
    window = layer_sensitivity(model, "window:w=1", blocks, batch_size=2, progress=False)
    assert all(r["kl"] > 1e-4 and 0 <= r["top1"] <= 1 for r in window)
    assert not is_swapped(model)
    attnswap.swap(model, "window:w=2")
    with pytest.raises(AttnswapError, match="unswap it first"):
        layer_sensitivity(model, "full", blocks, progress=False)


def test_route_heads_keeps_the_highest_gates_full_within_budget():
    model = tiny_gpt2()
    attnswap.swap(model, "duo:w=4,sinks=0")
    gates = [[0.9, 0.1, 0.5, 0.0], [0.2, 0.95, 0.3, 0.7]]
    for module, values in zip(attention_modules(model), gates):
        getattr(module, STATE_ATTR).gate.data.copy_(torch.tensor(values))
    routing = route_heads(model, budget=0.5, cheap_cost=0.2)  # (k + 0.2·(8 - k)) / 8 ≤ 0.5: k = 3
    assert routing == [[True, False, False, False], [False, True, False, True]]
    assert all(bool(getattr(m, STATE_ATTR).hardened) for m in attention_modules(model))
    three_layers = tiny_gpt2(n_layer=3)
    attnswap.swap(three_layers, "duo:w=4,sinks=0", layers=[0, 2])
    for module, values in zip(attention_modules(three_layers)[::2], gates):
        getattr(module, STATE_ATTR).gate.data.copy_(torch.tensor(values))
    # layer 1's 4 heads stay full: (4 + k + 0.2·(8 - k)) / 12 ≤ 0.6 allows k = 2
    assert route_heads(three_layers, budget=0.6, cheap_cost=0.2) == [[True, False, False, False],
                                                                       [False, True, False, False]]
    with pytest.raises(AttnswapError, match="below the cheapest routing"):
        route_heads(three_layers, budget=0.4, cheap_cost=0.2)


def test_model_cost_counts_unswapped_layers_as_full_and_reads_learned_routing():
    model = tiny_gpt2()
    attnswap.swap(model, "window:w=4", layers=[1])
    window = float(head_costs("window:w=4", 64)[0])
    assert model_cost(model, 64) == pytest.approx((1 + window) / 2)
    attnswap.swap(model, "duo:w=4,sinks=0")
    getattr(attention_modules(model)[0], STATE_ATTR).harden(torch.tensor([True, False, False, False]))
    getattr(attention_modules(model)[1], STATE_ATTR).harden(torch.zeros(4, dtype=torch.bool))
    assert model_cost(model, 64) == pytest.approx((1 + 7 * window) / 8)


# --- the command ---------------------------------------------------------------------------------
@pytest.fixture
def tiny_text(tmp_path):
    words = torch.randint(4, 97, (400,), generator=torch.Generator().manual_seed(1)).tolist()
    path = tmp_path / "valid.txt"
    path.write_text(" ".join(f"w{i}" for i in words) + "\n")
    return path


def test_plan_command_writes_a_layer_plan_within_budget(tiny_model_dir, tiny_text, tmp_path):
    out = tmp_path / "plan"
    assert main(["plan", "--model", str(tiny_model_dir), "--variant", "window:w=4", "--budget", "0.7",
                 "--context", "32", "--blocks", "3", "--data", str(tiny_text), "--device", "cpu",
                 "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["predicted_cost"] <= 0.7 and len(plan["layers"]) == 1 and plan["search"] == "exact"
    kl = [row["kl"] for row in plan["sensitivity"]]
    assert plan["layers"] == [kl.index(min(kl))] and plan["full_layers"] == [kl.index(max(kl))]
    assert plan["predicted_cost"] == pytest.approx((1 + plan["cheap_cost"]) / 2)
    assert plan["tokens"] == 3 * 32 and plan["command"].startswith("attnswap plan --model")
    assert [len(a["layers"]) for a in plan["alternatives"]] == [0, 1, 2]
    assert plan["alternatives"][1]["layers"] == plan["layers"] and plan["alternatives"][2]["predicted_cost"] < 0.7
    with (out / "sensitivity.csv").open() as stream:
        assert [int(r["layer"]) for r in csv.DictReader(stream)] == [0, 1]
    assert (out / "sensitivity.png").read_bytes()[:8] == PNG_MAGIC


def test_plan_command_routes_a_duo_models_heads_and_saves_it_hardened(tmp_path):
    model = tiny_gpt2()
    attnswap.swap(model, "duo:w=4,sinks=0")
    for module, values in zip(attention_modules(model), [[0.9, 0.1, 0.5, 0.0], [0.2, 0.95, 0.3, 0.7]]):
        getattr(module, STATE_ATTR).gate.data.copy_(torch.tensor(values))
    attnswap.save(model, tmp_path / "duo", tokenizer=tiny_tokenizer())
    out = tmp_path / "plan"
    assert main(["plan", "--swapped", str(tmp_path / "duo"), "--budget", "0.6", "--context", "64",
                 "--device", "cpu", "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["predicted_cost"] == pytest.approx((4 + 4 * plan["cheap_cost"]) / 8)
    assert plan["predicted_cost"] <= 0.6 and plan["cheap_cost"] == pytest.approx(head_costs("window:w=4", 64)[0])
    hardened = attnswap.load(out / "model")
    flags = [getattr(m, STATE_ATTR).full_heads.tolist() for m in attention_modules(hardened)]
    # a window of 4 costs 250 / 2080 pairs at n=64, so (k + 0.12·(8 - k)) / 8 ≤ 0.6 allows k = 4 full heads
    assert flags == plan["full_heads"] == [[True, False, True, False], [False, True, False, True]]


@pytest.mark.parametrize("args,message", [
    (["--measure", "time"], "unknown measure 'time'"),
    (["--budget", "0"], "budget must be in (0, 1]"),
    (["--variant", "slidng"], "unknown variant 'slidng'"),
    (["--variant", "duo"], "duo routes heads, not layers"),
    (["--data", "data/wikitext-2/wiki.test.tokens"], "refusing to train on test data"),
])
def test_bad_plan_options_are_one_line_errors(args, message, tmp_path, capsys):
    assert main(["plan", *args, "--out", str(tmp_path / "plan")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert PlanConfig().variant == "window:w=256,sinks=4"
