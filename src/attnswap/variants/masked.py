"""Shared mechanism of every mask-based variant: vary the mask, share the kernels."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from attnswap.kernels.counting import allowed_fractions, allowed_pairs_by_head
from attnswap.kernels.dense import dense_probs
from attnswap.kernels.flex import FarKeys, far_keys_pay, masked_attention
from attnswap.kernels.masks import MaskFn, materialize, materialize_bias, to_index_mask
from attnswap.variants.base import AttnContext, Variant


class MaskedVariant(Variant):
    """A variant defined by a positional mask (and optionally an additive score bias).

    Subclasses implement ``positional_mask``; causality and key padding are added here, once.
    """

    # Whether positional_mask reads the head index; False lets one block mask serve every head.
    mask_varies_by_head: ClassVar[bool] = True
    # index_mask() composes the model's mask and reads positions, so both reach every path.
    honours_model_mask = True
    honours_query_positions = True

    def positional_mask(self, ctx: AttnContext, batch: int, device: torch.device, state: nn.Module | None) -> MaskFn:
        raise NotImplementedError

    def far_keys(self, ctx: AttnContext, batch: int, device: torch.device) -> tuple[MaskFn, int] | None:
        """The positional mask without the few keys every query may attend from afar (each row's first ``n`` real
        tokens: attention sinks, global keys), and ``n``; None where the mask has none. A long call runs flex over the
        rest and the far keys as a branch merged with it (kernels/sinks_branch.py): same result, and no query tile
        carries the far keys' tile."""
        return None

    def score_bias(self, state: nn.Module | None, ctx: AttnContext, q_pos, kv_pos) -> MaskFn | None:
        """Optional additive bias over (b, h, q_idx, kv_idx); the mixture uses it for its weights."""
        return None

    def index_mask(self, q, k, ctx: AttnContext, state: nn.Module | None) -> tuple[MaskFn, torch.Tensor, torch.Tensor]:
        q_pos, kv_pos = ctx.positions(q.shape[-2], k.shape[-2], q.device)
        positional = self.positional_mask(ctx, q.shape[0], q.device, state)
        q_map, kv_map = ctx.position_maps(q.shape[-2], k.shape[-2])
        return to_index_mask(positional, q_map, kv_map, ctx.key_valid, ctx.model_mask), q_pos, kv_pos

    def cost(self, n, measure, state, heads, head_dim, layer=0) -> torch.Tensor:
        """flops: the pairs the mask allows over the causal triangle's n(n+1)/2. kv: the keys the last query sees,
        over n; exact where a key out of sight stays out of sight (windows, sinks, strides, full), an undercount for
        dilations and Longformer, whose later queries see keys the last one does not."""
        positional = self.positional_mask(AttnContext(scaling=1.0), 1, torch.device("cpu"), state)
        pairs, last_row = allowed_pairs_by_head(to_index_mask(positional, 0, 0, None), heads, n)
        return pairs / (n * (n + 1) / 2) if measure == "flops" else last_row / n

    def call_flops(self, q, k, ctx, state, block, run):
        """The full 4·B·H·T·S·D times the fraction of ``block``×``block`` tiles with any allowed pair: what a
        block-sparse kernel computes."""
        batch, heads, q_len, head_dim = q.shape
        kv_len = k.shape[-2]
        with torch.no_grad():
            index_mask, _, _ = self.index_mask(q, k, ctx, state)
            tiles, pairs = allowed_fractions(index_mask, batch, heads, q_len, kv_len, block, q.device)
        return 4.0 * batch * heads * q_len * kv_len * head_dim * tiles, f"allowed {block}x{block} tiles", pairs

    def probs(self, q, k, ctx: AttnContext, state: nn.Module | None) -> torch.Tensor:
        """Dense attention probabilities (B, H, T, S) in fp32, for evaluation and tests."""
        index_mask, q_pos, kv_pos = self.index_mask(q, k, ctx, state)
        batch, heads, q_len, _ = q.shape
        allowed = materialize(index_mask, batch, heads, q_len, k.shape[-2], q.device)
        bias_fn = self.score_bias(state, ctx, q_pos, kv_pos)
        bias = None if bias_fn is None else materialize_bias(bias_fn, batch, heads, q_len, k.shape[-2], q.device)
        return dense_probs(q, k, allowed, ctx.scaling, bias)

    def mask_key(self, ctx: AttnContext, state: nn.Module | None) -> tuple | None:
        """Everything the index mask depends on besides the shapes, so its block mask is built once and reused.

        Tensors count by identity and in-place version: unpadded batches share one block mask per length,
        a padded batch builds one per forward, and an optimizer step on the state invalidates it.
        A variant whose mask reads anything else (ctx.layer_idx, ...) must add it here. None (build every call)
        where the model adds a mask of its own: a function cannot be keyed by what it captured.
        """
        if ctx.model_mask is not None:
            return None
        learnable = () if state is None else (*state.parameters(), *state.buffers())
        return (self.spec, ctx.key_valid, ctx.first_real, ctx.q_positions, ctx.kv_positions, learnable)

    def attend(self, q, k, v, ctx, state, return_lse: bool = False):
        """``return_lse``: also each query's log-sum-exp (B, H, T) fp32, to merge with attention over other keys."""
        index_mask, q_pos, kv_pos = self.index_mask(q, k, ctx, state)
        return masked_attention(
            q, k, v, index_mask, ctx.scaling, self.score_bias(state, ctx, q_pos, kv_pos),
            cache_key=self.mask_key(ctx, state),
            per_batch=ctx.key_valid is not None or ctx.first_real is not None or ctx.model_mask is not None,
            per_head=self.mask_varies_by_head or ctx.model_mask is not None,  # a caller's 4-D mask may vary by head
            return_lse=return_lse,
            far_keys=self._far_keys(q, k, ctx) if far_keys_pay(q) else None,  # not built for calls it cannot serve
        )

    def _far_keys(self, q, k, ctx: AttnContext) -> FarKeys | None:
        # The far keys are slots first_real .. first_real + n - 1: keys in slot order, one sequence per row, and no
        # model mask that could reach a pair outside both the near mask and the far keys.
        if ctx.kv_positions is not None or ctx.documents is not None or ctx.model_mask is not None:
            return None
        batch = q.shape[0]
        split = self.far_keys(ctx, batch, q.device)
        if split is None:
            return None
        near, count = split
        q_map, kv_map = ctx.position_maps(q.shape[-2], k.shape[-2])
        return FarKeys(ctx.first_real_token(batch, q.device), count,
                       to_index_mask(near, q_map, kv_map, ctx.key_valid))

