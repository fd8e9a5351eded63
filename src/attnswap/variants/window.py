"""Sliding-window attention, optionally with attention sinks (StreamingLLM, https://arxiv.org/abs/2309.17453)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnswap.kernels.decode import DecodeStep, slot_attention
from attnswap.kernels.kv_cache import KeptState
from attnswap.kernels.masks import device_constant, draw, materialize, to_index_mask
from attnswap.variants.base import AttnContext, check
from attnswap.variants.masked import MaskedVariant


@dataclass(frozen=True)
class WindowParams:
    w: int = 64  # each query sees itself and the w-1 tokens before it
    sinks: int = 0  # ... plus the first `sinks` real tokens of its row

    def __post_init__(self):
        check(self.w >= 1, f"window w must be >= 1, got w={self.w}")
        check(self.sinks >= 0, f"sinks must be >= 0, got sinks={self.sinks}")


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


# Sinks and FlexAttention. In one block mask the sinks' key block is live for every query block: each query block runs
# one more 128-wide tile for 4 keys, and flex's backward walks the sinks' column in a single program (window 256 +
# 4 sinks: 1.14 ms forward+backward at 16k against the plain window's 0.43). So in a long call (kernels/flex.py,
# FarKeys) flex runs the pure window, and the sinks are a branch merged with it by log-sum-exp, one Triton pass each
# way (kernels/sinks_branch.py): 0.531 ms at 16k (10.1x flash), 2.02 ms at 64k (39.5x). H200, bf16, 12 heads of 64,
# graph replay; benchmarks/results/bench_kernel_64k_h200/2b5229f and a48b4e6.


class Window(MaskedVariant):
    name = "window"
    Params = WindowParams
    summary = "each token sees the last w tokens (+ optional sink tokens at the start)"
    mask_varies_by_head = False

    @property
    def label(self) -> str:
        p = self.params
        return f"window{p.w}" + (f"_sinks{p.sinks}" if p.sinks else "")

    def positional_mask(self, ctx: AttnContext, batch: int, device, state):
        return sliding_window_mask(self.params.w, self.params.sinks, ctx.first_real_token(batch, device))

    def far_keys(self, ctx: AttnContext, batch: int, device):
        if not self.params.sinks:
            return None
        return sliding_window_mask(self.params.w, 0, ctx.first_real_token(batch, device)), self.params.sinks

    def kept_state(self, layer_idx: int, state=None) -> KeptState:
        return KeptState(window=self.params.w, sinks=self.params.sinks)

    def decode(self, q, step: DecodeStep, state) -> torch.Tensor:
        """The slots hold exactly the window and the sinks of the new query (kernels/kv_cache.py)."""
        return slot_attention(q, step.keys, step.values, step.valid, step.scaling)


def main() -> None:
    pos = torch.arange(12)
    mask = sliding_window_mask(3, 2, torch.zeros(1, dtype=torch.long))
    print(draw(materialize(to_index_mask(mask, pos, pos, None), 1, 1, 12, 12, "cpu")[0, 0]))


if __name__ == "__main__":
    main()
