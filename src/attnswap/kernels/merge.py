"""Merge attentions over disjoint key sets by their log-normalisers, as FlashAttention merges its key blocks.

An attention part p over key set K_p is an average out_p = sum_{j in K_p} w_j v_j / Z_p with total weight
Z_p = sum_{j in K_p} w_j, carried as lse_p = log Z_p. Attention over the union of the key sets is
``out = sum_p exp(lse_p - lse) out_p`` with ``lse = log sum_p exp(lse_p)``: each part keeps its relative weights,
and the parts share one normaliser. A part's weights need not be softmax scores: a linear-attention part with
normaliser F and a learned scale exp(beta) relative to a softmax part enters as lse = lse_softmax + beta + log F
(variants/hybrid.py).
"""

from __future__ import annotations

from typing import Sequence

import torch


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
