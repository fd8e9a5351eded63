"""Sliding-window attention, optionally with attention sinks (StreamingLLM, https://arxiv.org/abs/2309.17453)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnswap.kernels.flex import BLOCK_SIZE, masked_attention
from attnswap.kernels.masks import device_constant, draw, materialize, to_index_mask
from attnswap.variants.base import OPTIONAL, AttnContext, check
from attnswap.variants.masked import MaskedVariant


@dataclass(frozen=True)
class WindowParams:
    w: int = 64  # each query sees itself and the w-1 tokens before it
    sinks: int = 0  # ... plus the first `sinks` real tokens of its row
    # > 0: with sinks, queries in folds of this many, each with its own copy of the sinks (see Window.attend)
    fold: int = field(default=0, metadata=OPTIONAL)

    def __post_init__(self):
        check(self.w >= 1, f"window w must be >= 1, got w={self.w}")
        check(self.sinks >= 0, f"sinks must be >= 0, got sinks={self.sinks}")
        check(self.fold == 0 or (self.fold >= BLOCK_SIZE and self.fold % BLOCK_SIZE == 0),
              f"fold must be 0 or a multiple of {BLOCK_SIZE}, got fold={self.fold}")
        check(self.sinks <= BLOCK_SIZE or self.fold == 0, f"fold needs sinks <= {BLOCK_SIZE}, got sinks={self.sinks}")


def sliding_window_mask(w: int, sinks: int, first_real: torch.Tensor):
    """Positional mask: q - kv < w, or kv among the first `sinks` real tokens (first_real (B,))."""
    width = device_constant(w, first_real.device)

    def mask(b, h, q, kv):
        near = (q - kv) < width
        if sinks == 0:
            return near
        return near | ((kv - first_real[b]) < sinks)

    mask.__name__ = f"window{w}" + (f"_sinks{sinks}" if sinks else "")
    return mask


class Window(MaskedVariant):
    name = "window"
    Params = WindowParams
    summary = "each token sees the last w tokens (+ optional sink tokens at the start)"
    mask_varies_by_head = False

    @property
    def label(self) -> str:
        p = self.params
        return f"window{p.w}" + (f"_sinks{p.sinks}" if p.sinks else "") + (f"_fold{p.fold}" if p.fold else "")

    def positional_mask(self, ctx: AttnContext, batch: int, device, state):
        return sliding_window_mask(self.params.w, self.params.sinks, ctx.first_real_token(batch, device))

    # --- sinks and FlexAttention's backward ----------------------------------------------------------
    # In one block mask the sinks' key block is live for every query block, and FlexAttention's backward walks that
    # column in a single program: window 256 + 4 sinks forward+backward was 4.7x flash at 16k against 13x without
    # sinks (H200, benchmarks/results/bench_kernel_64k_h200/session6). Attending the sink keys as a branch of their
    # own, merged by log-sum-exp (5cf6b96), was exact but slower still (3.17 ms at 16k) and was reverted; so was a
    # first ``fold`` that stacked query folds along the batch, each with its own copy of its keys (1.35 ms against the
    # single mask's 1.13 ms at 16k, 56fb6d7). ``fold`` now spreads the column without moving the queries: the keys get
    # one copy of the sinks' block per ``fold`` queries in front of them, and the queries of fold g see only copy g,
    # so each copy's backward walks fold/128 query blocks. The copies cost 128 keys per fold. Off by default until
    # measured.
    def attend(self, q, k, v, ctx: AttnContext, state, return_lse: bool = False):
        if not self._folds(q, k, ctx):
            return super().attend(q, k, v, ctx, state, return_lse)
        length = q.shape[-2]
        copies = -(-length // self.params.fold)

        def with_sink_copies(x: torch.Tensor) -> torch.Tensor:  # (B, H, S, D) -> (B, H, copies·P + S, D)
            return torch.cat([x[:, :, :BLOCK_SIZE]] * copies + [x], dim=2)

        return masked_attention(q, with_sink_copies(k), with_sink_copies(v), self._fold_mask(copies, q.device),
                                ctx.scaling, cache_key=(self.spec, "folds", length), per_batch=False,
                                per_head=False, return_lse=return_lse)

    def _folds(self, q, k, ctx: AttnContext) -> bool:
        """Whether the folded path serves: sinks, keys that are the queries' own sequence in order, no padding and no
        model mask (sink i is then position i), and at least two folds."""
        p = self.params
        plain = (ctx.model_mask is None and ctx.q_positions is None and ctx.kv_positions is None
                 and ctx.key_valid is None and ctx.first_real is None)
        length = q.shape[-2]
        return p.fold > 0 and p.sinks > 0 and plain and length == k.shape[-2] and length > p.fold

    def _fold_mask(self, copies: int, device):
        """Index mask over the folded keys: slot j < copies·P is position j % P of sink copy j // P, seen only by the
        queries of fold j // P and only beyond their window (the window part holds the sinks within it); slot
        j >= copies·P is position j - copies·P, seen within the window."""
        p = self.params
        copied, fold, sink_block, width, sinks = (
            device_constant(value, device) for value in (copies * BLOCK_SIZE, p.fold, BLOCK_SIZE, p.w, p.sinks))

        def mask(b, h, q_idx, kv_idx):
            in_copies = kv_idx < copied
            sink = kv_idx % sink_block
            from_copy = (in_copies & (kv_idx // sink_block == q_idx // fold) & (sink < sinks)
                         & (q_idx - sink >= width))
            distance = q_idx - (kv_idx - copied)
            return from_copy | (~in_copies & (distance >= 0) & (distance < width))

        mask.__name__ = f"window{p.w}_sinks{p.sinks}_fold{p.fold}"
        return mask


def main() -> None:
    pos = torch.arange(12)
    mask = sliding_window_mask(3, 2, torch.zeros(1, dtype=torch.long))
    print(draw(materialize(to_index_mask(mask, pos, pos, None), 1, 1, 12, 12, "cpu")[0, 0]))


if __name__ == "__main__":
    main()
