"""Full causal attention: the identity swap, and how the frozen teacher runs inside a swapped model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnswap.kernels.dense import sdpa_masked
from attnswap.kernels.masks import causal, materialize, to_index_mask
from attnswap.variants.masked import MaskedVariant


@dataclass(frozen=True)
class FullParams:
    pass


class Full(MaskedVariant):
    name = "full"
    Params = FullParams
    summary = "ordinary causal softmax attention (identity)"
    mask_varies_by_head = False

    def positional_mask(self, ctx, batch, device, state):
        return causal

    def attend(self, q, k, v, ctx, state):
        q_len, kv_len = q.shape[-2], k.shape[-2]
        plain_positions = ctx.q_positions is None and ctx.kv_positions is None
        if ctx.key_valid is None and plain_positions and q_len in (1, kv_len):
            # SDPA's is_causal aligns the top-left corner, so it is only right when T == S (or T == 1).
            return F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1, scale=ctx.scaling)
        q_pos, kv_pos = ctx.positions(q_len, kv_len, q.device)
        index_mask = to_index_mask(causal, q_pos, kv_pos, ctx.key_valid)
        allowed = materialize(index_mask, q.shape[0], 1, q_len, kv_len, q.device)
        return sdpa_masked(q, k, v, allowed, ctx.scaling)


def main() -> None:
    from attnswap.kernels.masks import draw

    q_pos = kv_pos = torch.arange(12)
    print(draw(materialize(to_index_mask(causal, q_pos, kv_pos, None), 1, 1, 12, 12, "cpu")[0, 0]))


if __name__ == "__main__":
    main()
