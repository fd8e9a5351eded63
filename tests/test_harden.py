"""harden.py: the `attnswap harden` study on a tiny GPT-2 whose mixture weights are set by hand."""

from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch

import attnswap
from attnswap.cli import main
from attnswap.variants.mixture import candidate_mass, kept_by_mass
from attnswap.hf.attention import STATE_ATTR
from attnswap.hf.swap import attention_modules
from attnswap.variants import AttnContext, mixture
from attnswap.variants.mixture import Mixture, MixtureParams, density
from tests.conftest import random_batch, tiny_gpt2, tiny_tokenizer

CANDIDATES = ("win4", "win16", "sink2", "stride8")
NEVER = -math.inf  # sigmoid(-inf) = 0: a weight of exactly zero
SMALL = -1.5  # sigmoid(-1.5) / sigmoid(2) ≈ 0.21: above the default threshold 0.1, below 0.5
# Logits per layer, head and candidate, and what hardening at 0.1 must keep from them.
LOGITS = [
    [[2.0, NEVER, NEVER, NEVER], [2.0, SMALL, NEVER, NEVER], [0.0, 0.0, 0.0, 0.0], [NEVER, NEVER, 2.0, 0.0]],
    [[NEVER, 2.0, NEVER, NEVER], [1.0, NEVER, 1.0, NEVER], [0.0, 0.0, 0.0, 0.0], [NEVER, 0.0, NEVER, 0.0]],
]
KEPT = [
    [["win4"], ["win4", "win16"], list(CANDIDATES), ["sink2", "stride8"]],
    [["win16"], ["win4", "sink2"], list(CANDIDATES), ["win16", "stride8"]],
]
LENGTHS = (64, 100)  # 100: not a multiple of the 16-wide tiles
ENV_FIELDS = ("gpu", "device", "torch", "transformers", "git_commit")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mixture_dir(tmp_path_factory):
    """A tiny GPT-2 with a mixture swapped in, its logits set to LOGITS, saved like a distilled model."""
    model = tiny_gpt2()
    attnswap.swap(model, Mixture(MixtureParams(candidates=CANDIDATES)))
    for module, logits in zip(attention_modules(model), LOGITS):
        with torch.no_grad():
            getattr(module, STATE_ATTR).logits.copy_(torch.tensor(logits))
    return attnswap.save(model, tmp_path_factory.mktemp("distilled") / "model")


@pytest.fixture(scope="module")
def study(mixture_dir, tmp_path_factory):
    """The output folder of one `attnswap harden` run over ``mixture_dir`` at short lengths."""
    out = tmp_path_factory.mktemp("harden")
    code = main(["harden", "--swapped", str(mixture_dir), "--rule", "weight", "--lengths", ",".join(map(str, LENGTHS)),
                 "--repeats", "1", "--warmup", "0", "--block", "16", "--device", "cpu", "--out", str(out)])
    assert code == 0
    return out


def _by_head(study) -> dict[tuple[int, int], dict]:
    heads = json.loads((study / "harden.json").read_text())["heads"]
    return {(r["layer"], r["head"]): r for r in heads}


def test_harden_keeps_exactly_the_candidates_at_or_above_the_threshold(study):
    records = _by_head(study)
    assert sorted(records) == [(layer, head) for layer in range(2) for head in range(4)]
    for (layer, head), record in records.items():
        assert record["kept"] == KEPT[layer][head], f"layer {layer} head {head}"
        assert record["dropped"] == [c for c in CANDIDATES if c not in KEPT[layer][head]]
    summary = json.loads((study / "harden.json").read_text())
    assert [layer["kept_per_head"] for layer in summary["kept_per_layer"]] == [[len(k) for k in layer]
                                                                              for layer in KEPT]
    assert summary["threshold"] == 0.1 and summary["candidates"] == list(CANDIDATES)


def test_density_after_is_at_most_before_and_matches_a_count_by_hand(study):
    records = _by_head(study)
    for record in records.values():
        for n in map(str, LENGTHS):
            assert record["density_after"][n] <= record["density_before"][n]
    n = 100
    q, kv = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    sink2_or_stride8 = (kv <= q) & ((kv < 2) | (kv % 8 == 7))  # layer 0, head 3
    assert records[0, 3]["density_after"][str(n)] == pytest.approx(sink2_or_stride8.sum().item() / (n * (n + 1) / 2))
    win16 = (kv <= q) & (q - kv < 16)  # layer 1, head 0
    assert records[1, 0]["density_after"][str(n)] == pytest.approx(win16.sum().item() / (n * (n + 1) / 2))
    everything = (kv <= q) & ((q - kv < 16) | (kv < 2) | (kv % 8 == 7))  # layer 0, head 2 keeps all four
    assert records[0, 2]["density_after"][str(n)] == records[0, 2]["density_before"][str(n)]
    assert records[0, 2]["density_before"][str(n)] == pytest.approx(everything.sum().item() / (n * (n + 1) / 2))


def test_saved_hardened_model_keeps_the_kept_buffers_and_the_logits(study, mixture_dir):
    hardened, unhardened = attnswap.load(study / "model"), attnswap.load(mixture_dir)
    for layer, module in enumerate(attention_modules(hardened)):
        expected = torch.tensor([[c in kept for c in CANDIDATES] for kept in KEPT[layer]])
        assert torch.equal(getattr(module, STATE_ATTR).kept, expected), f"layer {layer}"
    ids, mask = random_batch(length=40)
    with torch.no_grad():
        before = unhardened(ids, attention_mask=mask).logits
        after = hardened(ids, attention_mask=mask).logits
        # Only zero-weight candidates were dropped, so the mixture is unchanged ...
        torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
        # ... whereas dropping one that still weighs something (SMALL, at 0.5) does change it.
        mixture.harden(unhardened, 0.5)
        assert (unhardened(ids, attention_mask=mask).logits - before).abs().max() > 1e-3


def test_harden_writes_tables_plots_and_speed_with_the_environment(study):
    with (study / "survivors.csv").open() as stream:
        survivors = list(csv.DictReader(stream))
    assert len(survivors) == 2 * 4 * len(CANDIDATES)
    assert all(row[f] is not None for row in survivors for f in ENV_FIELDS)
    rows = [json.loads(line) for line in (study / "speed_results.jsonl").read_text().splitlines()]
    # per length and layer: dense and hardened in both modes, unhardened forward only
    assert len(rows) == len(LENGTHS) * 2 * 5
    for row in rows:
        assert row["status"] == "ok", row
        assert all(f in row for f in ENV_FIELDS) and row["shape"] == f"(1,4,{row['length']},8)"
    tiles = {(r["length"], r["layer"], r["contender"]): r["tile_fraction"] for r in rows}
    for (n, layer, contender), fraction in tiles.items():
        if contender == "hardened":
            assert fraction <= tiles[n, layer, "unhardened"] <= tiles[n, layer, "dense"]
    speed = json.loads((study / "harden.json").read_text())["speed"]
    forward = {r["length"]: r for r in speed["ratios"] if r["mode"] == "forward"}
    layer_sum = sum(r["median_s"] for r in rows if r["length"] == 64 and r["mode"] == "forward"
                    and r["contender"] == "hardened")
    assert forward[64]["hardened_s"] == pytest.approx(layer_sum)
    assert forward[64]["hardened_over_unhardened"] == pytest.approx(layer_sum / forward[64]["unhardened_s"])
    for name in ("survivors.png", "speed.png"):
        assert (study / name).read_bytes()[:8] == PNG_MAGIC, name


# --- hardening by attention mass ----------------------------------------------------------------
def test_kept_by_mass_keeps_the_heaviest_candidates_until_the_coverage():
    mass = torch.tensor([[0.2, 0.5, 0.3, 0.0], [0.0, 0.0, 0.0, 1.0], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    assert kept_by_mass(mass, 0.75).tolist() == [[False, True, True, False], [False, False, False, True],
                                                 [True, True, True, False]]
    assert kept_by_mass(mass, 0.5).tolist()[0] == [False, True, False, False]
    assert kept_by_mass(mass, 1.0).tolist()[0] == [True, True, True, False], "a candidate of no mass never stays"


def test_mass_keeps_the_long_range_candidate_that_weight_drops():
    """Nested candidates: the window weighs 20x more, but every query attends almost only to the first token,
    which only ``full`` covers. The weight rule drops ``full`` and changes the output; the mass rule keeps it."""
    variant = Mixture(MixtureParams(candidates=("win2", "full")))
    state = variant.make_state(1, 8)
    with torch.no_grad():
        state.logits.copy_(torch.tensor([[3.0, -3.0]]))  # weights 0.95 and 0.047: normalised 1 and 0.05
    n = 12
    q = torch.zeros(1, 1, n, 8)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, n, 8)
    k[0, 0, 0, 0] = 12.0  # token 0's score exceeds every other by 12: exp(12)·0.047 outweighs 0.95 + 0.047
    v = torch.randn(1, 1, n, 8, generator=torch.Generator().manual_seed(0))
    ctx = AttnContext(scaling=1.0)
    mass = candidate_mass(variant, state, q, k, ctx)
    assert mass.shape == (1, 2) and mass.sum().item() == pytest.approx(1.0)
    assert mass[0, 1] > 0.8, "the far token holds the attention, and only `full` covers it"
    unhardened = variant.attend(q, k, v, ctx, state)
    by_weight, by_mass = (copy.deepcopy(state) for _ in range(2))
    by_weight.harden(0.1)
    by_mass.kept &= kept_by_mass(mass, 0.9)
    assert by_weight.kept.tolist() == [[True, False]] and by_mass.kept.tolist()[0][1]
    assert (variant.attend(q, k, v, ctx, by_weight) - unhardened).abs().max() > 0.5
    torch.testing.assert_close(variant.attend(q, k, v, ctx, by_mass), unhardened, rtol=0, atol=0.05)


def test_harden_by_mass_measures_validation_text_and_reports_masses_and_density(mixture_dir, tmp_path):
    model = attnswap.load(mixture_dir)
    attnswap.save(model, tmp_path / "model", tokenizer=tiny_tokenizer())
    text = tmp_path / "valid.txt"
    text.write_text(" ".join(f"w{i % 90 + 4}" for i in range(300)) + "\n")
    out = tmp_path / "out"
    assert main(["harden", "--swapped", str(tmp_path / "model"), "--coverage", "0.9", "--data", str(text),
                 "--context", "48", "--blocks", "2", "--lengths", "64", "--modes", "forward", "--repeats", "1",
                 "--warmup", "0", "--block", "16", "--device", "cpu", "--out", str(out)]) == 0
    summary = json.loads((out / "harden.json").read_text())
    assert summary["rule"] == "mass" and summary["coverage"] == 0.9 and "threshold" not in summary
    for record in summary["heads"]:
        mass = record["mass"]
        assert sum(mass.values()) == pytest.approx(1.0, abs=1e-6)
        kept_mass = sum(mass[c] for c in record["kept"])
        assert kept_mass >= 0.9 - 1e-9, record
        # the fewest: without its lightest kept candidate the rest would fall short
        assert kept_mass - min(mass[c] for c in record["kept"]) < 0.9 or len(record["kept"]) == 1
        assert record["density_after"]["64"] <= record["density_before"]["64"]
    only_win4 = next(r for r in summary["heads"] if (r["layer"], r["head"]) == (0, 0))  # the others weigh 0
    assert only_win4["kept"] == ["win4"] and only_win4["mass"]["win4"] == pytest.approx(1.0)
    assert summary["mean_density"]["64"]["after"] <= summary["mean_density"]["64"]["before"]


def test_density_in_bands_equals_the_whole_mask_counted_at_once(monkeypatch):
    state = Mixture(MixtureParams(candidates=CANDIDATES)).make_state(4, 8)
    state.kept.copy_(torch.tensor([[c in kept for c in CANDIDATES] for kept in KEPT[0]]))
    whole = density(state, 70)
    monkeypatch.setattr(mixture, "DENSITY_BUDGET", 3 * 4 * 70)  # bands of 3 query rows, the last one short
    assert torch.equal(density(state, 70), whole)


@pytest.mark.parametrize("case", ["empty", "missing", "not_swapped", "window"])
def test_bad_swapped_folder_is_one_line_error_and_exit_2(case, tmp_path, capsys):
    if case in ("not_swapped", "window"):
        model = tiny_gpt2()
        if case == "window":
            attnswap.swap(model, "window:w=4")
        attnswap.save(model, tmp_path / "model")
    swapped = {"empty": "", "missing": str(tmp_path / "nowhere")}.get(case, str(tmp_path / "model"))
    assert main(["harden", "--swapped", swapped, "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err.strip()
    expected = {"empty": "swapped is required", "missing": "no saved model", "not_swapped": "no swapped attention",
                "window": "variant 'window:w=4"}[case]
    assert message.startswith("error: ") and "\n" not in message and expected in message, message
    assert not (tmp_path / "out").exists(), "nothing is written for a bad folder"


def test_mass_is_never_measured_on_the_test_text(mixture_dir, tmp_path, capsys):
    assert main(["harden", "--swapped", str(mixture_dir), "--data", "data/wikitext-2/wiki.test.tokens",
                 "--out", str(tmp_path / "out")]) == 2
    assert "refusing to train on test data" in capsys.readouterr().err
