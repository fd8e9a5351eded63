"""Mask functions as index predicates, the convention of FlexAttention and transformers' masking_utils.

A *positional* mask function takes ``(batch, head, q_pos, kv_pos)`` as integer tensors of any
broadcastable shapes and returns a bool tensor: may this query position see this key position?
It must use tensor ops only (no Python branching) so that the same function can be evaluated densely
by broadcasting, or per element inside a FlexAttention kernel.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator

import torch

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# Small constant tensors are made once per device: each call of an attention layer needs them, and making
# them anew is a host-to-device copy or a kernel launch per call, which at long lengths is what a block-sparse
# kernel's time is made of. Callers never write into them.
@functools.lru_cache(maxsize=256)
def device_constant(value: int, device: torch.device) -> torch.Tensor:
    """A 0-d int64 tensor holding ``value`` on ``device``.

    A mask function that captures a size as a tensor instead of a Python int lets compiled FlexAttention
    serve every value with one kernel: an int is baked into the kernel, one compilation per value.
    """
    return torch.tensor(value, dtype=torch.long, device=device)


@functools.lru_cache(maxsize=256)
def device_arange(start: int, stop: int, device: torch.device) -> torch.Tensor:
    """``torch.arange(start, stop)`` (int64) on ``device``."""
    return torch.arange(start, stop, device=device)


def and_masks(*fns: MaskFn) -> MaskFn:
    def mask(b, h, q, kv):
        result = fns[0](b, h, q, kv)
        for fn in fns[1:]:
            result = result & fn(b, h, q, kv)
        return result

    mask.__name__ = "_and_".join(fn.__name__ for fn in fns)
    return mask


def or_masks(*fns: MaskFn) -> MaskFn:
    def mask(b, h, q, kv):
        result = fns[0](b, h, q, kv)
        for fn in fns[1:]:
            result = result | fn(b, h, q, kv)
        return result

    mask.__name__ = "_or_".join(fn.__name__ for fn in fns)
    return mask


def causal(b, h, q, kv):
    return kv <= q


def to_index_mask(
    positional: MaskFn,
    q_pos: torch.Tensor | int,
    kv_pos: torch.Tensor | int,
    key_valid: torch.Tensor | None,
    model_mask: MaskFn | None = None,
) -> MaskFn:
    """Turn a positional mask into one over tensor indices, adding causality, key padding and the model's own mask.

    q_pos (T,) or (B, T) and kv_pos (S,) or (B, S) map query/key indices to positions, or are an int (or 0-d
    tensor) added to the index (slots in order: no lookup inside the kernel); key_valid (B, S) marks real keys;
    ``model_mask(b, h, q_idx, kv_idx)`` is what the model itself allows (transformers' mask: its sliding window,
    packed documents, a 4-D mask), ANDed in. The result is what ``flex_attention``'s ``create_block_mask`` expects.
    """

    def index_mask(b, h, q_idx, kv_idx):
        qp, kp = _position(b, q_idx, q_pos), _position(b, kv_idx, kv_pos)
        allowed = (kp <= qp) & positional(b, h, qp, kp)
        if key_valid is not None:
            allowed = allowed & key_valid[b, kv_idx]
        if model_mask is not None:
            allowed = allowed & model_mask(b, h, q_idx, kv_idx)
        return allowed

    index_mask.__name__ = positional.__name__
    return index_mask


def _position(b: torch.Tensor, index: torch.Tensor, positions: torch.Tensor | int) -> torch.Tensor:
    if isinstance(positions, int) or positions.dim() == 0:
        return index + positions
    return positions[index] if positions.dim() == 1 else positions[b, index]  # (B, N): per-row positions (packed)


def index_grid(batch: int, heads: int, q_len: int, kv_len: int, device):
    """Broadcastable index tensors (B,1,1,1), (1,H,1,1), (1,1,T,1), (1,1,1,S)."""
    return (
        torch.arange(batch, device=device).view(-1, 1, 1, 1),
        torch.arange(heads, device=device).view(1, -1, 1, 1),
        torch.arange(q_len, device=device).view(1, 1, -1, 1),
        torch.arange(kv_len, device=device).view(1, 1, 1, -1),
    )


def mask_bands(index_mask: MaskFn, batch: int, heads: int, q_len: int, kv_len: int, device,
               rows: int) -> Iterator[torch.Tensor]:
    """The index mask evaluated ``rows`` query rows at a time, bool (B, H, rows, S) per band (the last may be
    shorter): a long sequence never holds its whole T×S mask."""
    b, h, _, kv = index_grid(batch, heads, 0, kv_len, device)
    for start in range(0, q_len, rows):
        q = torch.arange(start, min(start + rows, q_len), device=device).view(1, 1, -1, 1)
        yield index_mask(b, h, q, kv).expand(batch, heads, q.shape[2], kv_len)


def materialize(index_mask: MaskFn, batch: int, heads: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Evaluate an index mask densely: bool (B, H, T, S)."""
    grid = index_grid(batch, heads, q_len, kv_len, device)
    return index_mask(*grid).expand(batch, heads, q_len, kv_len)


def materialize_bias(bias: MaskFn, batch: int, heads: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Evaluate an additive index-wise score bias densely: float (B, H, T, S)."""
    grid = index_grid(batch, heads, q_len, kv_len, device)
    return bias(*grid).float().expand(batch, heads, q_len, kv_len)


def draw(allowed: torch.Tensor) -> str:
    """A (T, S) bool mask as a ■/⬚ grid, the way transformers' docstrings draw masks."""
    return "\n".join("".join("■" if x else "⬚" for x in row) for row in allowed.tolist())
