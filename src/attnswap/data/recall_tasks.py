"""Synthetic recall sequences, made from token ids: a passkey hidden in filler, a random segment copied at a distance,
key-value pairs queried after a gap. Every sequence is a pure function of (seed, task, cell, sample), so the teacher
and every variant see the same inputs; the recall suite (``measure.recall``) scores them, recall-head probes
(``measure.recall_heads``) read attention on them, and distillation may mix them into its training blocks
(``--recall_mix``), each from a seed stream of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from attnswap.errors import AttnswapError

# Seed streams: each use draws from seed + its offset, so none sees another's sequences for any seed a user picks.
PROBE_STREAM = 1_000_003  # recall-head probes (measure.recall_heads)
TRAINING_STREAM = 2_000_003  # distillation's --recall_mix
TRAINING_SEGMENT = 32  # tokens of a training copy's segment
TRAINING_MIN_LENGTH = 256  # a training block must hold a passkey and a copy past a few hundred tokens

FILLER_TEXT = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about it.")


# --- sequences ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One scored sequence: ``ids`` (T,) int64; ``targets`` are the positions whose token is scored, each
    predicted from the logits one position earlier. ``info`` says where things were put (for tests and plots)."""

    ids: torch.Tensor
    targets: torch.Tensor
    info: dict[str, int]


@dataclass(frozen=True)
class Vocabulary:
    """The token ids the generators draw from: a filler sentence, random ordinary tokens, and the passkey's text."""

    filler: tuple[int, ...]  # ids of one filler sentence; repeated, it fills the haystack
    ordinary: np.ndarray  # (n,) ids that random segments, keys and values are drawn from (no special tokens)
    encode: Callable[[str], list[int]]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "Vocabulary":
        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        special = set(tokenizer.all_special_ids)
        ordinary = np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)
        return cls(tuple(encode(FILLER_TEXT)), ordinary, encode)


def _rng(seed: int, *cell: int) -> np.random.Generator:
    return np.random.default_rng([seed, *cell])


def _filler(vocab: Vocabulary, n: int) -> list[int]:
    sentence = list(vocab.filler)
    return (sentence * (n // len(sentence) + 1))[:n]


def passkey_sample(vocab: Vocabulary, length: int, depth: float, seed: int, sample: int) -> Sample:
    """Intro, filler with the needle at ``depth`` of it (snapped to a filler-sentence boundary), the question after
    a whole sentence, then the answer (scored): exactly ``length`` tokens."""
    rng = _rng(seed, 0, length, round(depth * 1000), sample)
    key = str(rng.integers(10_000, 100_000))
    intro = vocab.encode(PASSKEY_INTRO)
    needle = vocab.encode(f" The pass key is {key}. Remember it. {key} is the pass key.")
    question = vocab.encode(" What is the pass key? The pass key is")
    answer = vocab.encode(f" {key}")
    n_filler = length - len(intro) - len(needle) - len(question) - len(answer)
    if n_filler < len(vocab.filler):
        raise AttnswapError(f"passkey length {length} is too short for the needle and question; use >= "
                            f"{length - n_filler + len(vocab.filler)} tokens")
    step = len(vocab.filler)
    haystack = (list(vocab.filler) * (n_filler // step + 1))[-n_filler:]  # ends on a whole sentence
    at = max(n_filler - round((1 - depth) * n_filler / step) * step, 0)  # a sentence boundary
    ids = intro + haystack[:at] + needle + haystack[at:] + question + answer
    start = len(ids) - len(answer)
    return Sample(torch.tensor(ids), torch.arange(start, len(ids)),
                  {"needle_start": len(intro) + at, "needle_depth_tokens": at, "haystack": n_filler,
                   "answer_start": start, "passkey": int(key)})


def induction_sample(vocab: Vocabulary, length: int, distance: int, segment: int, seed: int, sample: int) -> Sample:
    """Filler, a random segment, filler, the same segment ``distance`` tokens after the first began; the
    sequence ends with the copy. Scored: the copy's tokens after its first."""
    if not segment < distance <= length - segment:
        raise AttnswapError(f"induction distance {distance} must be > segment ({segment}) and <= length - segment "
                            f"({length - segment})")
    rng = _rng(seed, 1, length, distance, sample)
    tokens = rng.choice(vocab.ordinary, size=segment, replace=False).tolist()
    copy_start = length - segment
    source = copy_start - distance
    gap = distance - segment
    ids = _filler(vocab, source) + tokens + _filler(vocab, gap) + tokens
    return Sample(torch.tensor(ids), torch.arange(copy_start + 1, length),
                  {"source_start": source, "copy_start": copy_start, "distance": distance})


def mqar_sample(vocab: Vocabulary, length: int, pairs: int, gap: int, seed: int, sample: int) -> Sample:
    """Filler, ``pairs`` key-value pairs (distinct keys), ``gap`` tokens of filler, then every key again in a random
    order, each followed by its value; ends with the last query. Scored: the values in the queries."""
    rng = _rng(seed, 2, length, pairs, gap, sample)
    drawn = rng.choice(vocab.ordinary, size=2 * pairs, replace=False)
    keys, values = drawn[:pairs].tolist(), drawn[pairs:].tolist()
    stored = [t for kv in zip(keys, values) for t in kv]
    order = rng.permutation(pairs).tolist()
    queries = [t for i in order for t in (keys[i], values[i])]
    prefix = length - len(stored) - gap - len(queries)
    if prefix < 0:
        raise AttnswapError(f"mqar: {pairs} pairs with a gap of {gap} need {length - prefix} tokens, more than "
                            f"length {length}; lower the gap or the pairs")
    ids = _filler(vocab, prefix) + stored + _filler(vocab, gap) + queries
    query_start = prefix + len(stored) + gap
    return Sample(torch.tensor(ids), torch.arange(query_start + 1, length, 2),
                  {"pairs_start": prefix, "query_start": query_start, "gap": gap})


def training_sequences(vocab: Vocabulary, length: int, count: int, seed: int) -> torch.Tensor:
    """(count, length) int64: recall sequences to distil on, alternately a copy of a random segment at a distance drawn
    uniformly from what fits and a passkey at a depth drawn uniformly, from ``seed``'s training stream."""
    if length < TRAINING_MIN_LENGTH:
        raise AttnswapError(f"recall sequences of {length} tokens leave no room for a passkey or a distant copy; use "
                            f"seq_len >= {TRAINING_MIN_LENGTH} with recall_mix")
    rng = _rng(seed + TRAINING_STREAM, length, count)
    rows = []
    for i in range(count):
        if i % 2 == 0:
            distance = int(rng.integers(TRAINING_SEGMENT + 1, length - TRAINING_SEGMENT + 1))
            rows.append(induction_sample(vocab, length, distance, TRAINING_SEGMENT, seed + TRAINING_STREAM, i).ids)
        else:
            rows.append(passkey_sample(vocab, length, float(rng.uniform()), seed + TRAINING_STREAM, i).ids)
    return torch.stack(rows) if rows else torch.empty(0, length, dtype=torch.long)
