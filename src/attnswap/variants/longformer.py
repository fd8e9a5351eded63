"""Longformer: a sliding window plus global tokens (Beltagy et al. 2020, https://arxiv.org/abs/2004.05150)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnswap.kernels.sinks_branch import MAX_FAR_KEYS
from attnswap.kernels.masks import draw, materialize, or_masks, to_index_mask
from attnswap.variants.base import AttnContext, check
from attnswap.variants.masked import MaskedVariant
from attnswap.variants.window import sliding_window_mask


@dataclass(frozen=True)
class LongformerParams:
    w: int = 64  # each query sees itself and the w-1 tokens before it
    global_tokens: int = 1  # the first `global_tokens` real tokens of each row are global
    global_stride: int = 0  # > 0: so is every token at a multiple of it (counted from the first real token)

    def __post_init__(self):
        check(self.w >= 1, f"window w must be >= 1, got w={self.w}")
        check(self.global_tokens >= 0, f"global_tokens must be >= 0, got global_tokens={self.global_tokens}")
        check(self.global_stride >= 0, f"global_stride must be >= 0 (0 = none), got global_stride={self.global_stride}")


def global_token_mask(global_tokens: int, global_stride: int, first_real: torch.Tensor, keys: bool = True):
    """Positional mask: a global query sees every key, a global key is seen by every query (first_real (B,)).

    A token is global when its position relative to its row's first real token is below ``global_tokens``
    or, with ``global_stride`` > 0, a multiple of it. Causality is added by ``to_index_mask``. ``keys`` False: the
    global queries' rows alone (what flex runs once the global keys are a branch of their own, kernels/sinks_branch.py).
    """

    def is_global(b, pos):
        rel = pos - first_real[b]
        hit = (rel >= 0) & (rel < global_tokens)
        if global_stride:
            hit = hit | ((rel >= 0) & (rel % global_stride == 0))
        return hit

    def mask(b, h, q, kv):
        return is_global(b, q) | is_global(b, kv) if keys else is_global(b, q)

    mask.__name__ = (f"global{global_tokens}" + (f"_stride{global_stride}" if global_stride else "")
                     + ("" if keys else "_queries"))
    return mask


def longformer_mask(w: int, global_tokens: int, global_stride: int, first_real: torch.Tensor):
    """Positional mask: the sliding window of width w, or either end a global token."""
    return or_masks(sliding_window_mask(w, 0, first_real), global_token_mask(global_tokens, global_stride, first_real))


class Longformer(MaskedVariant):
    name = "longformer"
    Params = LongformerParams
    summary = "sliding window of w tokens plus global tokens that see and are seen by every token"
    mask_varies_by_head = False

    @property
    def label(self) -> str:
        p = self.params
        return f"longformer_w{p.w}_g{p.global_tokens}" + (f"_s{p.global_stride}" if p.global_stride else "")

    def positional_mask(self, ctx: AttnContext, batch: int, device, state):
        p = self.params
        return longformer_mask(p.w, p.global_tokens, p.global_stride, ctx.first_real_token(batch, device))

    def far_keys(self, ctx: AttnContext, batch: int, device):
        p = self.params
        if p.global_stride or not 0 < p.global_tokens <= MAX_FAR_KEYS:  # strided global keys are not few
            return None
        first_real = ctx.first_real_token(batch, device)
        near = or_masks(sliding_window_mask(p.w, 0, first_real),
                        global_token_mask(p.global_tokens, 0, first_real, keys=False))
        return near, p.global_tokens


def main() -> None:
    pos = torch.arange(12)
    mask = longformer_mask(3, 1, 5, torch.zeros(1, dtype=torch.long))
    print(draw(materialize(to_index_mask(mask, pos, pos, None), 1, 1, 12, 12, "cpu")[0, 0]))


if __name__ == "__main__":
    main()
