"""recall.py: the suite's sequences put things where they say, and its scoring gives an oracle 1 and chance ~0."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from attnswap.errors import AttnswapError
from attnswap.hf.models import DEFAULT_MODEL, load_tokenizer
from attnswap.data.recall_tasks import Vocabulary, induction_sample, mqar_sample, passkey_sample
from attnswap.measure.recall import RecallConfig, position_buckets, ppl_by_position, recall, top1_correct

VOCAB_SIZE = 64


def word_vocabulary() -> Vocabulary:
    """Ids 10..63 are ordinary; the filler sentence is ids 3..7; text encodes to one id per character (8 + digit
    for digits, 9 otherwise), so a passkey's digits are visible in the ids."""
    def encode(text: str) -> list[int]:
        return [8 + int(c) if c.isdigit() else 9 for c in text]

    return Vocabulary((3, 4, 5, 6, 7), np.arange(20, VOCAB_SIZE), encode)


@pytest.fixture(scope="module")
def gpt2_vocabulary() -> Vocabulary:
    return Vocabulary.from_tokenizer(load_tokenizer(DEFAULT_MODEL))


# --- the sequences -----------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("length", [300, 1000])
def test_passkey_sits_at_its_depth(gpt2_vocabulary, length, depth):
    vocab = gpt2_vocabulary
    sample = passkey_sample(vocab, length, depth, seed=0, sample=0)
    info = sample.info
    assert len(sample.ids) == length
    assert abs(info["needle_depth_tokens"] / info["haystack"] - depth) <= len(vocab.filler) / info["haystack"]
    key = vocab.encode(f" {info['passkey']}")
    needle = sample.ids[info["needle_start"]:].tolist()
    assert needle[:len(vocab.encode(" The pass key is"))] == vocab.encode(" The pass key is")
    assert sample.ids[sample.targets].tolist() == key, "the scored tokens are the passkey, ending the sequence"
    assert sample.targets[-1] == length - 1


def test_passkey_is_a_pure_function_of_seed_and_cell(gpt2_vocabulary):
    a = passkey_sample(gpt2_vocabulary, 500, 0.5, seed=3, sample=1)
    b = passkey_sample(gpt2_vocabulary, 500, 0.5, seed=3, sample=1)
    others = {passkey_sample(gpt2_vocabulary, 500, 0.5, seed=3, sample=s).info["passkey"] for s in range(8)}
    assert torch.equal(a.ids, b.ids) and len(others) == 8


def test_passkey_too_short_is_refused(gpt2_vocabulary):
    with pytest.raises(AttnswapError, match="too short"):
        passkey_sample(gpt2_vocabulary, 40, 0.5, seed=0, sample=0)


@pytest.mark.parametrize("distance", [33, 64, 100, 468])
def test_copy_needs_exactly_its_distance(distance):
    """Every scored copy token's previous token occurs earlier exactly once, ``distance`` back, and the token after
    that occurrence is the scored one: induction over exactly ``distance`` is the only way to predict it."""
    segment, length = 32, 500
    sample = induction_sample(word_vocabulary(), length, distance, segment, seed=0, sample=0)
    ids, info = sample.ids.tolist(), sample.info
    assert len(ids) == length and info["copy_start"] - info["source_start"] == distance
    assert ids[info["copy_start"]] == ids[info["copy_start"] - distance], "the first copy token is `distance` back"
    assert len(sample.targets) == segment - 1
    for p in sample.targets.tolist():
        earlier = [q for q in range(p - 1) if ids[q] == ids[p - 1]]
        assert earlier == [p - 1 - distance], f"position {p}: its cue occurs at {earlier}"
        assert ids[p - distance] == ids[p]


def test_copy_distance_out_of_range_is_refused():
    with pytest.raises(AttnswapError, match="must be > segment"):
        induction_sample(word_vocabulary(), 200, 20, 32, seed=0, sample=0)
    with pytest.raises(AttnswapError, match="must be > segment"):
        induction_sample(word_vocabulary(), 200, 190, 32, seed=0, sample=0)


@pytest.mark.parametrize("pairs,gap", [(1, 0), (8, 0), (8, 100), (20, 300)])
def test_mqar_values_follow_their_only_key(pairs, gap):
    length = 500
    sample = mqar_sample(word_vocabulary(), length, pairs, gap, seed=0, sample=0)
    ids, info = sample.ids.tolist(), sample.info
    assert len(ids) == length and len(sample.targets) == pairs
    assert info["query_start"] - (info["pairs_start"] + 2 * pairs) == gap
    for p in sample.targets.tolist():
        key = ids[p - 1]
        where = [q for q in range(info["query_start"]) if ids[q] == key]
        assert len(where) == 1 and info["pairs_start"] <= where[0] < info["pairs_start"] + 2 * pairs
        assert ids[where[0] + 1] == ids[p], "the queried value is the one stored after its key"


def test_mqar_that_does_not_fit_is_refused():
    with pytest.raises(AttnswapError, match="need"):
        mqar_sample(word_vocabulary(), 100, 20, 50, seed=0, sample=0)


def test_position_buckets_cover_every_scored_position_once():
    buckets = position_buckets(1000)
    assert buckets[0] == (1, 64) and buckets[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(buckets, buckets[1:]))


# --- the scoring -------------------------------------------------------------------------------
class Oracle(nn.Module):
    """Cheats: reads the next token from the input and puts all its logit mass there."""

    def __init__(self, vocab_size: int = VOCAB_SIZE):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, logits_to_keep: int = 0):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
        logits.scatter_(2, nxt[..., None], 30.0)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


class Uniform(Oracle):
    def forward(self, input_ids, logits_to_keep: int = 0):
        shape = (input_ids.shape[0], logits_to_keep or input_ids.shape[1], self.vocab_size)
        return SimpleNamespace(logits=torch.zeros(shape))  # argmax: id 0, which no generator writes


def _all_samples():
    vocab = word_vocabulary()
    return [passkey_sample(vocab, 300, d, 0, s) for d in (0.0, 0.5, 1.0) for s in range(2)], \
        [induction_sample(vocab, 300, 100, 32, 0, s) for s in range(2)], \
        [mqar_sample(vocab, 300, 8, 50, 0, s) for s in range(2)]


def test_oracle_scores_one_and_uniform_scores_zero():
    for samples in _all_samples():
        assert all(bool(c.all()) for c in top1_correct(Oracle(), samples))
        assert not any(bool(c.any()) for c in top1_correct(Uniform(), samples))


def test_perplexity_of_oracle_is_one_and_of_uniform_is_the_vocabulary():
    docs = torch.randint(1, VOCAB_SIZE, (2, 200), generator=torch.Generator().manual_seed(0))
    oracle, uniform = ppl_by_position(Oracle(), docs, 2, "oracle"), ppl_by_position(Uniform(), docs, 2, "uniform")
    assert oracle[-1]["ppl"] == pytest.approx(1.0, abs=1e-6)
    assert all(row["ppl"] == pytest.approx(VOCAB_SIZE, rel=1e-6) for row in uniform)
    assert uniform[-1]["tokens"] == 2 * 199


def test_scoring_ignores_what_precedes_the_targets():
    """Logits of unscored positions never count: a model right only on the targets scores 1."""
    vocab = word_vocabulary()
    sample = induction_sample(vocab, 300, 100, 32, 0, 0)

    class RightOnTargetsOnly(Oracle):
        def forward(self, input_ids, logits_to_keep: int = 0):
            out = super().forward(input_ids)
            logits = out.logits
            scored = sample.targets - 1
            wrong = torch.ones(input_ids.shape[1], dtype=torch.bool)
            wrong[scored] = False
            logits[:, wrong] = 0.0
            logits[:, wrong, 1] = 30.0
            return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)

    assert bool(top1_correct(RightOnTargetsOnly(), [sample])[0].all())


# --- the command, on a tiny random Llama with GQA ----------------------------------------------
@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "long.txt"
    words = " ".join(f"word{i % 97} and more text number {i}." for i in range(400))
    path.write_text(words + "\n\n" + words[::-1] + "\n", encoding="utf-8")
    return path


def _run(tiny_llama_dir, text_file, out, **overrides):
    config = RecallConfig(model=str(tiny_llama_dir), variants=["full", "window:w=16,sinks=2"], lengths=[128, 256],
                          depths=[0.0, 1.0], samples=2, batch_size=2, distances=[40, 200], segment=16,
                          mqar_pairs=[4], mqar_gaps=[0, 100], ppl_data=str(text_file), ppl_documents=2,
                          device="cpu", out=str(out), **overrides)
    return recall(config)


def test_recall_writes_every_file_and_full_attention_matches_the_teacher(tiny_llama_dir, text_file, tmp_path):
    report = _run(tiny_llama_dir, text_file, tmp_path / "run")
    results = report["results"]
    assert results["full"] == results["teacher"], "a swap to full attention is the teacher, cell by cell"
    full = report["summary"]["full"]
    assert full["ppl_ratio"] == 1.0
    for task in ("passkey", "induction", "mqar"):
        assert full[f"{task}_min_ratio"] in (1.0, None)
    window = results["window:w=16,sinks=2"]
    assert window["ppl"][-1]["ppl"] != results["teacher"]["ppl"][-1]["ppl"], "the window changes the loss"
    for name in ("recall.json", "passkey.csv", "induction.csv", "mqar.csv", "ppl_by_position.csv", "passkey.png",
                 "induction.png", "mqar.png", "ppl_by_position.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "run" / "recall.json").read_text())
    assert saved["summary"] == report["summary"] and saved["run"]["config"]["lengths"] == [128, 256]
    with (tmp_path / "run" / "passkey.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 2 and {r["model"] for r in rows} == {"teacher", "full", "window:w=16,sinks=2"}
    assert all(float(r["teacher_score"]) == float(t["score"]) for r, t in
               zip(rows, [t for t in results["teacher"]["passkey"]] * 3))
    assert math.isfinite(report["summary"]["window:w=16,sinks=2"]["ppl_ratio"])


@pytest.mark.slow
def test_recall_is_deterministic(tiny_llama_dir, text_file, tmp_path):
    first = _run(tiny_llama_dir, text_file, tmp_path / "a", tasks=["induction", "mqar"])
    second = _run(tiny_llama_dir, text_file, tmp_path / "b", tasks=["induction", "mqar"])
    assert first["results"] == second["results"]


def test_lengths_beyond_the_model_are_one_error_line(tiny_llama_dir, text_file, tmp_path, capsys):
    from attnswap.cli import main

    code = main(["recall", "--model", str(tiny_llama_dir), "--lengths", "1024", "--out", str(tmp_path / "r"),
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "exceeds the model's 512 positions" in err[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "passkey;nope"], "unknown task 'nope'"),
    (["--depths", "0.5,1.5"], "depths must lie in"),
    (["--variants", "windw:w=4"], "unknown variant"),
])
def test_bad_recall_options_are_one_error_line(argv, message, tmp_path, capsys):
    from attnswap.cli import main

    code = main(["recall", *argv, "--out", str(tmp_path / "r"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_saved_swaps_named_alike_get_labels_that_tell_them_apart():
    from attnswap.measure.generate import swapped_labels

    assert swapped_labels(["runs/a/model", "runs/b/model"]) == ["a/model", "b/model"]
    assert swapped_labels(["runs/a/model", "runs/b/other"]) == ["model", "other"]
    with pytest.raises(AttnswapError, match="twice"):
        swapped_labels(["runs/a/model", "runs/a/model"])
