"""Merge attentions over disjoint key sets by their log-normalisers, as FlashAttention merges its key blocks.

An attention part p over key set K_p is an average out_p = sum_{j in K_p} w_j v_j / Z_p with total weight
Z_p = sum_{j in K_p} w_j, carried as lse_p = log Z_p. Attention over the union of the key sets is
``out = sum_p exp(lse_p - lse) out_p`` with ``lse = log sum_p exp(lse_p)``: each part keeps its relative weights,
and the parts share one normaliser. A part's weights need not be softmax scores: a linear-attention part with
normaliser F and a learned scale exp(beta) relative to a softmax part enters as lse = lse_softmax + beta + log F
(variants/hybrid.py).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from attnswap.kernels.pieces import matmul_by_pieces


def merge_attention(outputs: Sequence[torch.Tensor], log_normalisers: Sequence[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """outputs: P tensors (B, H, T, D); log_normalisers: P tensors (B, H, T), -inf where a part saw no key.

    Returns the merged output (B, H, T, D) fp32 and its log-normaliser (B, H, T) fp32. A query that no part saw
    gets output 0 and lse -inf; no NaN reaches any gradient.
    """
    assert len(outputs) == len(log_normalisers) > 0, "need one log-normaliser per output, and at least one part"
    lse = torch.stack([x.float() for x in log_normalisers])  # (P, B, H, T)
    # The largest part's lse is subtracted so exp never overflows; it cancels, so it needs no gradient.
    top = lse.amax(dim=0).detach()
    top = torch.where(torch.isfinite(top), top, 0.0)
    weights = torch.exp(lse - top)  # (P, B, H, T); exp(-inf) = 0 for an empty part
    total = weights.sum(dim=0)
    empty = total == 0
    merged = sum(w.unsqueeze(-1) * out.float() for w, out in zip(weights, outputs))
    merged = merged / torch.where(empty, 1.0, total).unsqueeze(-1)
    merged_lse = torch.where(empty, float("-inf"), torch.log(torch.where(empty, 1.0, total)) + top)
    return merged, merged_lse


def safe_log(x: torch.Tensor) -> torch.Tensor:
    """log x for x >= 0, -inf at 0 without an infinite gradient there (a normaliser of a part with no keys)."""
    positive = x > 0
    return torch.where(positive, torch.log(torch.where(positive, x, 1.0)), float("-inf"))


def attend_few_more_keys(q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, keys: torch.Tensor,
                         values: torch.Tensor, allowed: torch.Tensor, scaling: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over a few more keys, merged into an attention already done: ``merge_attention`` of (out, lse)
    and the new keys' part, without building that part's output on its own.

    q, out (B, H, T, D); lse (B, H, T) fp32, -inf where no key was seen; keys, values (B, H, S, D) with S small (the
    sinks); allowed (B, 1 or H, T, S) bool, which new key each query sees. Returns (out (B, H, T, D) in q's dtype,
    lse (B, H, T) fp32). Scores and sums are fp32. On CUDA, outside a compiled model, this runs as one compiled
    function (``compiled_attend_few_more_keys``): eager, its passes over (B, H, T, D) would cost as much as the
    window's kernel. The keys' and values' gradients sum over all T queries: ``matmul_by_pieces``.
    """
    scores = matmul_by_pieces(q.float(), keys.float().transpose(-1, -2)) * scaling  # (B, H, T, S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    top = torch.maximum(lse, scores.amax(dim=-1)).detach()  # cancels below, so it needs no gradient
    top = torch.where(torch.isfinite(top), top, 0.0)
    weight_before = torch.exp(lse - top)  # (B, H, T)
    weight_keys = torch.exp(scores - top.unsqueeze(-1))  # (B, H, T, S)
    total = weight_before + weight_keys.sum(dim=-1)
    empty = total == 0
    merged = weight_before.unsqueeze(-1) * out.float() + matmul_by_pieces(weight_keys, values.float())
    merged = merged / torch.where(empty, 1.0, total).unsqueeze(-1)
    merged_lse = torch.where(empty, float("-inf"), torch.log(torch.where(empty, 1.0, total)) + top)
    return merged.to(q.dtype), merged_lse


@functools.cache
def compiled_attend_few_more_keys():
    # dynamic: training and evaluation lengths differ, and each length would otherwise be another compile
    return torch.compile(attend_few_more_keys, dynamic=True)
