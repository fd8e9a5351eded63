"""Distillation's --recall_mix (data/recall_tasks.training_sequences, train/distill.load_blocks): synthetic recall
sequences added to the training blocks in the share asked, drawn apart from the suite's, validation left as text."""

from __future__ import annotations

import pytest
import torch

from attnswap.data.recall_tasks import (TRAINING_SEGMENT, TRAINING_STREAM, Vocabulary, induction_sample,
                                        training_sequences)
from attnswap.errors import AttnswapError
from attnswap.hf.models import DEFAULT_MODEL, load_tokenizer
from attnswap.train.distill import load_blocks
from attnswap.train.settings import DistillConfig


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    words = " ".join(f"Sentence {i} says something about item {i % 37}." for i in range(1500))
    (folder / "train.txt").write_text(words, encoding="utf-8")
    (folder / "valid.txt").write_text(words[::-1], encoding="utf-8")
    return folder


def _blocks(texts, tokenizer, **overrides):
    config = DistillConfig(data=str(texts / "train.txt"), val_data=str(texts / "valid.txt"), seq_len=256, **overrides)
    return load_blocks(config, tokenizer)


def test_the_mix_adds_recall_sequences_in_the_share_asked_and_leaves_validation_alone(texts, tokenizer):
    text_train, text_valid = _blocks(texts, tokenizer)
    train, valid = _blocks(texts, tokenizer, recall_mix=0.25)
    assert torch.equal(valid, text_valid) and torch.equal(train[: len(text_train)], text_train)
    synthetic = train[len(text_train):]
    assert len(synthetic) == round(len(text_train) / 3)  # a quarter of the mix
    expected = training_sequences(Vocabulary.from_tokenizer(tokenizer), 256, len(synthetic), seed=0)
    assert torch.equal(synthetic, expected)
    again, _ = _blocks(texts, tokenizer, recall_mix=0.25)
    assert torch.equal(again, train), "the same mix every run (a resumed run rebuilds it)"
    other, _ = _blocks(texts, tokenizer, recall_mix=0.25, seed=1)
    assert not torch.equal(other[len(text_train):], synthetic), "the seed draws the sequences"


def test_training_copies_sit_at_their_distance_and_passkeys_hold_their_key(tokenizer):
    vocab = Vocabulary.from_tokenizer(tokenizer)
    rows = training_sequences(vocab, 512, 6, seed=0)
    assert rows.shape == (6, 512)
    for row in rows[0::2]:  # a copy ends every copy row: its segment appears once more, earlier
        segment = row[-TRAINING_SEGMENT:]
        starts = [s for s in range(512 - 2 * TRAINING_SEGMENT + 1) if torch.equal(row[s:s + TRAINING_SEGMENT], segment)]
        assert len(starts) == 1
    for row in rows[1::2]:
        text = tokenizer.decode(row)
        key = text.rsplit("The pass key is", 1)[1].strip()
        assert key.isdigit() and text.count(key) == 3, "in the needle twice, and the answer"
    suite = induction_sample(vocab, 512, 100, TRAINING_SEGMENT, 0, 0)
    assert not any(torch.equal(suite.ids, row) for row in rows) and TRAINING_STREAM > 0
    with pytest.raises(AttnswapError, match="seq_len >= 256"):
        training_sequences(vocab, 128, 2, seed=0)


@pytest.mark.parametrize("argv,message", [
    (["--recall_mix", "1.0"], "recall_mix must be in [0, 1)"),
    (["--recall_mix", "0.2", "--seq_len", "128"], "recall_mix needs seq_len >= 256"),
])
def test_bad_recall_mixes_are_one_error_line(argv, message, tmp_path, capsys):
    from attnswap.cli import main

    code = main(["distill", *argv, "--out", str(tmp_path / "d"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
