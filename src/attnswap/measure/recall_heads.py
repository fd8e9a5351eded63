"""Which KV heads retrieve: a recall-aware routing between full attention and a cheap pattern, decided per KV head.

A head retrieves when, at the positions where the model must recall something from far back (the tokens of a
repeated segment, a passkey's answer), it puts attention on keys that a cheap pattern (a window with sinks) rules
out, and what it reads there is the token to be predicted. On probe sequences drawn like the recall suite's
(``measure.recall``: copies at distances past the window, passkeys at depths far from the question), the teacher
runs with full attention, and at each scored query every query head's attention probabilities are read
(``far_attention``, (layers, heads)): the mass on keys the cheap pattern cannot see (``lost``), and the part of it
on keys holding the token to be predicted, per task (``retrieval``, the higher of copy's and passkey's: the routing
score). A head that spreads attention thinly over the whole context loses much mass and retrieves little; a window
approximates its average. Grouped-query heads
share one KV head, and its cache is what a generation keeps, so a KV head scores the highest among its query heads
(``kv_head_scores``) and keeps full attention or not as a whole (``route_kv_heads``): the heads of highest score
stay full, as many as the budget allows.

The probes are drawn from their own seed stream (``data.recall_tasks.PROBE_STREAM``), never the recall suite's sequences, so the
suite that judges the routing has not chosen it. Retrieval heads (Wu et al., 2024, https://arxiv.org/abs/2404.15574)
and DuoAttention (https://arxiv.org/abs/2410.10819) select heads for the same reason; this score needs no training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from attnswap.data.recall_tasks import PROBE_STREAM, Sample, Vocabulary, induction_sample, passkey_sample
from attnswap.errors import AttnswapError
from attnswap.hf.swap import is_swapped, observe_attention, swap, unswap
from attnswap.kernels.masks import materialize
from attnswap.variants.full import Full
from attnswap.variants.masked import MaskedVariant

PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75)  # needles at least a quarter of the haystack before the question
SEGMENT = 32  # tokens of each probe's repeated segment


def probe_samples(vocab: Vocabulary, length: int, reach: int, count: int, seed: int) -> list[Sample]:
    """``count`` probes of ``length`` tokens, alternately a copy and a passkey: copies at distances spread evenly
    from twice the cheap pattern's ``reach`` (its window; at least past the segment) to the farthest that fits,
    passkeys at PASSKEY_DEPTHS."""
    nearest, farthest = max(2 * reach, SEGMENT + 1), length - SEGMENT
    if nearest >= farthest:
        raise AttnswapError(f"probes of {length} tokens cannot place a copy beyond twice the cheap pattern's window "
                            f"({reach}); raise --context to at least {nearest + SEGMENT + 1}")
    copies, passkeys = (count + 1) // 2, count // 2
    distances = np.linspace(nearest, farthest, copies).round().astype(int).tolist() if copies > 1 else [farthest]
    stream = seed + PROBE_STREAM  # apart from every recall-suite seed a user picks
    samples = []
    for i in range(count):
        if i % 2 == 0:
            samples.append(induction_sample(vocab, length, distances[i // 2], SEGMENT, stream, i))
        else:
            samples.append(passkey_sample(vocab, length, PASSKEY_DEPTHS[(i // 2) % len(PASSKEY_DEPTHS)], stream, i))
    return samples


@torch.no_grad()
def far_attention(model: nn.Module, samples: Sequence[Sample], cheap: MaskedVariant) -> dict[str, torch.Tensor]:
    """Over ``samples`` and their scored positions, the mean share of each query head's full attention, (layers,
    heads) float64 each, that falls on keys the masked variant ``cheap`` rules out:

    - ``lost``: on any such key (what a window costs that head, diffuse attention included), over every probe;
    - ``retrieval_copy``, ``retrieval_passkey``: on such keys that hold the very token to be predicted, the
      copy-and-paste that retrieval heads do (an induction head's earlier occurrence, a passkey's digits in the
      needle), over the probes of that task;
    - ``retrieval``: the higher of the two, so that a head serving either task ranks by it, however many positions
      each task scores (a copy scores its whole segment, a passkey its few digits).

    The query read is the one before each scored token: the position whose logits predict it. ``model`` is run with
    full attention (swapped to ``full`` for the call)."""
    device = next(model.parameters()).device
    full, totals, counts = Full(), {}, {}
    current: dict = {}

    def add(key, layer_idx, value, count):
        total, seen = totals.get((key, layer_idx), 0), counts.get((key, layer_idx), 0)
        totals[key, layer_idx], counts[key, layer_idx] = total + value.double().cpu(), seen + count

    def observer(module, _variant, q, k, _v, ctx, _state):
        queries, ids = current["queries"].to(q.device), current["ids"].to(q.device)  # (n,), (S,)
        rows = dataclasses.replace(ctx, q_positions=queries)  # those queries alone, keys in slot order
        q_rows = q[:, :, queries]
        heads, kv_len = q.shape[1], k.shape[-2]
        far = ~materialize(cheap.index_mask(q_rows, k, rows, None)[0], 1, heads, len(queries), kv_len, q.device)[0]
        answer = ids[None, :] == ids[queries + 1][:, None]  # (n, S): keys holding the token to be predicted
        probs = full.probs(q_rows, k, rows, None)[0]  # (H, n, S) fp32
        add("lost", module.layer_idx, (probs * far).sum(dim=(-1, -2)), len(queries))
        add(f"retrieval_{current['task']}", module.layer_idx, (probs * (far & answer)).sum(dim=(-1, -2)), len(queries))

    if is_swapped(model):
        raise AttnswapError("recall heads are read from the teacher's own attention; pass the unswapped model")
    swap(model, "full")
    try:
        with observe_attention(model, observer):
            for sample in tqdm(samples, desc="recall heads", unit="probe"):
                current.update(queries=sample.targets - 1, ids=sample.ids, task=probe_task(sample))
                model(input_ids=sample.ids[None].to(device), logits_to_keep=1)
    finally:
        unswap(model)
    if not totals:
        raise AttnswapError("the model ran no attention attnswap could observe; plan recall heads on a decoder "
                            "whose self-attention attnswap swaps (GPT-2, Llama, ...)")
    layers = sorted({layer for _, layer in totals})
    shares = {key: torch.stack([totals[key, layer] / counts[key, layer] for layer in layers])
              for key in sorted({key for key, _ in totals})}
    shares["retrieval"] = torch.stack([v for k, v in shares.items() if k.startswith("retrieval_")]).amax(dim=0)
    return shares


def probe_task(sample: Sample) -> str:
    """``passkey`` or ``copy``: which recall task a probe poses."""
    return "passkey" if "passkey" in sample.info else "copy"


def kv_head_scores(per_head: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(layers, kv_heads): the highest of ``per_head`` (layers, heads) among the query heads that read each KV head
    (query head h reads KV head h // groups, transformers' order)."""
    layers, heads = per_head.shape
    if heads % kv_heads:
        raise AttnswapError(f"{heads} query heads do not share {kv_heads} KV heads evenly")
    return per_head.view(layers, kv_heads, heads // kv_heads).amax(dim=-1)


def route_kv_heads(scores: torch.Tensor, budget: float, cheap_cost: float) -> torch.Tensor:
    """(layers, kv_heads) bool, True = full: the KV heads of highest score, as many as keep the cost within
    ``budget`` (a full head costs 1, a cheap head ``cheap_cost``, the cost is the mean over heads)."""
    if cheap_cost > budget + 1e-12:
        raise AttnswapError(f"budget {budget} is below the cheapest routing (every head cheap costs "
                            f"{cheap_cost:.4f}); raise the budget")
    total = scores.numel()
    full_count = min(total, math.floor((budget - cheap_cost) / max(1.0 - cheap_cost, 1e-12) * total + 1e-9))
    full = torch.zeros(total, dtype=torch.bool)
    full[torch.argsort(scores.flatten(), descending=True, stable=True)[:full_count]] = True
    return full.view_as(scores)
