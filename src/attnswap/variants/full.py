"""Full causal attention: the identity swap, and how the frozen teacher runs inside a swapped model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnswap.kernels.decode import DecodeStep, slot_attention
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
    honours_score_bias = True  # attend() hands a float 4-D mask to SDPA as the stock model does

    def positional_mask(self, ctx, batch, device, state):
        return causal

    def index_mask(self, q, k, ctx, state):
        if ctx.model_mask is None:
            return super().index_mask(q, k, ctx, state)
        # The model's own mask is the whole answer: causality included, or left out as a caller's 4-D mask may.
        q_pos, kv_pos = ctx.positions(q.shape[-2], k.shape[-2], q.device)
        return ctx.model_mask, q_pos, kv_pos

    def probs(self, q, k, ctx, state):
        if ctx.dense_mask is not None and ctx.dense_mask.dtype != torch.bool:  # the score bias, added in fp32
            scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * ctx.scaling
            return torch.softmax(scores + ctx.dense_mask[..., : k.shape[-2]].float(), dim=-1)
        return super().probs(q, k, ctx, state)

    def attend(self, q, k, v, ctx, state):
        q_len, kv_len = q.shape[-2], k.shape[-2]
        if ctx.dense_mask is not None:  # a caller's 4-D mask goes to SDPA as the stock model gives it
            given = ctx.dense_mask[..., :kv_len]
            if given.dtype == torch.bool:
                return sdpa_masked(q, k, v, given, ctx.scaling)
            # An additive mask may hold any bias, not only 0 and -inf.
            return F.scaled_dot_product_attention(q, k, v, attn_mask=given, scale=ctx.scaling)
        plain = (ctx.key_valid is None and ctx.model_mask is None and ctx.q_positions is None
                 and ctx.kv_positions is None)
        # SDPA's is_causal aligns the top-left corner, so it is only right when T == S; one query sees every key.
        # Two branches rather than is_causal=q_len > 1: under torch.compile with dynamic shapes that is a symbolic
        # bool, which SDPA refuses.
        if plain and q_len == 1:
            return F.scaled_dot_product_attention(q, k, v, scale=ctx.scaling)
        if plain and q_len == kv_len:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=ctx.scaling)
        index_mask, _, _ = self.index_mask(q, k, ctx, state)
        allowed = materialize(index_mask, q.shape[0], 1, q_len, kv_len, q.device)
        return sdpa_masked(q, k, v, allowed, ctx.scaling)

    def decode(self, q, step: DecodeStep, state) -> torch.Tensor:
        """Every valid slot of a preallocated cache (attnswap.hf.cache.FullLayer)."""
        return slot_attention(q, step.keys, step.values, step.valid, step.scaling)


def main() -> None:
    from attnswap.kernels.masks import draw

    q_pos = kv_pos = torch.arange(12)
    print(draw(materialize(to_index_mask(causal, q_pos, kv_pos, None), 1, 1, 12, 12, "cpu")[0, 0]))


if __name__ == "__main__":
    main()
