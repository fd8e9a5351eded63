"""Counting what a computation does, for the cost model and the benchmarks: allowed tiles of a mask, FLOPs of a call."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from attnswap.kernels.masks import MaskFn, mask_bands

BACKWARD_FLOP_FACTOR = 2.5  # a backward pass costs this many forwards (FlashAttention's count: dq, dk, dv, ds)


def allowed_fractions(index_mask: MaskFn, batch: int, heads: int, q_len: int, kv_len: int, block: int,
                      device) -> tuple[float, float]:
    """(fraction of block×block tiles holding any allowed pair, fraction of allowed pairs) of an index mask.

    Evaluated ``block`` query rows at a time, so memory stays B·H·block·S at any length.
    """
    kv_blocks = -(-kv_len // block)
    tiles = pairs = 0
    for allowed in mask_bands(index_mask, batch, heads, q_len, kv_len, device, block):  # (B, H, rows, S)
        pairs += int(allowed.sum())
        padded = F.pad(allowed, (0, kv_blocks * block - kv_len))
        tiles += int(padded.view(batch, heads, allowed.shape[2], kv_blocks, block).any(dim=4).any(dim=2).sum())
    q_blocks = -(-q_len // block)
    return tiles / (batch * heads * q_blocks * kv_blocks), pairs / (batch * heads * q_len * kv_len)


def allowed_pairs_by_head(index_mask: MaskFn, heads: int, n: int, rows_at_once: int = 256) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """((H,) allowed (query, key) pairs of an n×n self-attention mask, (H,) keys the last query sees), float64."""
    pairs = torch.zeros(heads, dtype=torch.float64)
    with torch.no_grad():
        for rows in mask_bands(index_mask, 1, heads, n, n, "cpu", rows_at_once):  # (1, H, rows, n)
            pairs += rows.sum(dim=(0, 2, 3)).double()
    return pairs, rows[0, :, -1].sum(dim=-1).double()


def counted_flops(run: Callable[[Any], None]) -> int:
    """The FLOPs ``FlopCounterMode`` sees in one ``run``, leaving compiled functions compiled.

    A function compiled with ``torch.compile`` and called under the counter runs eagerly from then on, silently
    (Hedgehog's compiled feature map, counted at 16k, ran eagerly at 64k: H200, benchmarks/results/
    bench_kernel_64k_h200/1e2b843); dynamo forgets that once reset, and compiles it again on the next call.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run(None)
    torch._dynamo.reset()
    return counter.get_total_flops()
