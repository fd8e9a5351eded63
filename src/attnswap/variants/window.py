"""Sliding-window attention, optionally with attention sinks (StreamingLLM, https://arxiv.org/abs/2309.17453)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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
    # column in a single program: window 256 + 4 sinks forward+backward was 4.7x flash at 16k against 12.7x without
    # sinks (H100, bench_kernel_graphs_h100). Attending the sink keys as a branch of their own, merged by log-sum-exp
    # (5cf6b96), was exact but slower still (3.17 ms against 0.41 ms for the window alone at 16k, H200,
    # benchmarks/results/bench_kernel_64k_h200), and was reverted. ``fold`` spreads that column instead: the queries
    # are cut into folds of ``fold`` positions, stacked along the batch, and each fold attends to its own copy of the
    # keys it can see (the sinks' block, then its window's keys), so the sink block's backward is shared by T/fold
    # programs. The copies cost (fold + window + 128)/fold of the keys' memory. Its speed on a GPU is not measured
    # yet, so fold=0 (one block mask) stays the default.
    def attend(self, q, k, v, ctx: AttnContext, state, return_lse: bool = False):
        if not self._folds(q, k, ctx):
            return super().attend(q, k, v, ctx, state, return_lse)
        return self._folded_attend(q, k, v, ctx, return_lse)

    def _folds(self, q, k, ctx: AttnContext) -> bool:
        """Whether the folded path serves: sinks, keys that are the queries' own sequence in order, no padding and no
        model mask (sink i is then position i), and at least two whole folds."""
        p = self.params
        plain = (ctx.model_mask is None and ctx.q_positions is None and ctx.kv_positions is None
                 and ctx.key_valid is None and ctx.first_real is None)
        length = q.shape[-2]
        return (p.fold > 0 and p.sinks > 0 and plain and length == k.shape[-2] and length % p.fold == 0
                and length >= 2 * p.fold)

    def _folded_attend(self, q, k, v, ctx: AttnContext, return_lse: bool):
        batch, _, length, _ = q.shape
        fold, folds, lookback = self.params.fold, length // self.params.fold, self._lookback

        def by_fold(x: torch.Tensor) -> torch.Tensor:  # (B, H, G·L, ·) -> (B·G, H, L, ·)
            return x.unflatten(2, (folds, fold)).transpose(1, 2).flatten(0, 1)

        def fold_keys(x: torch.Tensor) -> torch.Tensor:  # (B, H, S, D) -> (B·G, H, P + W' + L, D)
            windows = F.pad(x, (0, 0, lookback, 0)).unfold(2, lookback + fold, fold)  # (B, H, G, D, W' + L)
            windows = windows.permute(0, 2, 1, 4, 3)  # (B, G, H, W' + L, D)
            sink_block = x[:, None, :, :BLOCK_SIZE].expand(-1, folds, -1, -1, -1)
            return torch.cat([sink_block, windows], dim=3).flatten(0, 1)

        def unfold(x: torch.Tensor) -> torch.Tensor:  # (B·G, H, L[, ·]) -> (B, H, G·L[, ·]): outputs and LSEs
            return x.unflatten(0, (batch, folds)).transpose(1, 2).flatten(2, 3)

        result = masked_attention(by_fold(q), fold_keys(k), fold_keys(v), self._fold_mask(folds, q.device),
                                  ctx.scaling, cache_key=(self.spec, "folds", length), per_batch=True,
                                  per_head=False, return_lse=return_lse)
        return tuple(map(unfold, result)) if return_lse else unfold(result)

    @functools.cached_property
    def _lookback(self) -> int:
        """W': the window's keys before a fold's first query, rounded up to whole blocks so the window stays aligned."""
        return -(-(self.params.w - 1) // BLOCK_SIZE) * BLOCK_SIZE

    def _fold_mask(self, folds: int, device):
        """Index mask of a fold (batch index b = row·G + g): key slot j < P is sink block position j, slot j >= P is
        position g·L - W' + (j - P). A sink is taken from the sink block only beyond the query's window, where the
        window part does not hold it."""
        p = self.params
        n_folds, fold, lookback, sink_block, width, sinks = (
            device_constant(value, device) for value in (folds, p.fold, self._lookback, BLOCK_SIZE, p.w, p.sinks))

        def mask(b, h, q_idx, kv_idx):
            start = (b % n_folds) * fold
            q_pos = start + q_idx
            in_sinks = kv_idx < sink_block
            kv_pos = torch.where(in_sinks, kv_idx, start - lookback + kv_idx - sink_block)
            distance = q_pos - kv_pos
            window = ~in_sinks & (kv_pos >= 0) & (distance >= 0) & (distance < width)
            return window | (in_sinks & (kv_pos < sinks) & (distance >= width))

        mask.__name__ = f"window{p.w}_sinks{p.sinks}_fold{p.fold}"
        return mask


def main() -> None:
    pos = torch.arange(12)
    mask = sliding_window_mask(3, 2, torch.zeros(1, dtype=torch.long))
    print(draw(materialize(to_index_mask(mask, pos, pos, None), 1, 1, 12, 12, "cpu")[0, 0]))


if __name__ == "__main__":
    main()
