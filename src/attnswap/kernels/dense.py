"""Dense attention over a materialised T×S score matrix: the oracle every efficient path is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    score_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities in fp32.

    q (B, H, T, D), k (B, H, S, D), ``allowed`` bool broadcastable to (B, H, T, S),
    ``score_bias`` float broadcastable to (B, H, T, S), added to the scaled scores.
    Returns (B, H, T, S); a query row with no allowed key is all zeros (never NaN).
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling  # (B, H, T, S)
    if score_bias is not None:
        scores = scores + score_bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    score_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked softmax attention in fp32: (B, H, T, D) from q (B, H, T, D), k/v (B, H, S, D)."""
    return torch.matmul(dense_probs(q, k, allowed, scaling, score_bias), v.float())


def sdpa_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """The same function through ``scaled_dot_product_attention`` in the input dtype.

    SDPA returns NaN for a query row that may attend to nothing (an all-padding row); those rows are
    zeroed so a padded batch never poisons the residual stream.
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling)
    empty_row = ~allowed.any(dim=-1, keepdim=True)  # (B|1, H|1, T, 1)
    return out.masked_fill(empty_row, 0.0)
