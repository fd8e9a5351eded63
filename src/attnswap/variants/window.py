"""Sliding-window attention, optionally with attention sinks (StreamingLLM, https://arxiv.org/abs/2309.17453)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


class Window(MaskedVariant):
    name = "window"
    Params = WindowParams
    summary = "each token sees the last w tokens (+ optional sink tokens at the start)"
    mask_varies_by_head = False

    @property
    def label(self) -> str:
        return f"window{self.params.w}" + (f"_sinks{self.params.sinks}" if self.params.sinks else "")

    def positional_mask(self, ctx: AttnContext, batch: int, device, state):
        return sliding_window_mask(self.params.w, self.params.sinks, ctx.first_real_token(batch, device))

    # Sinks stay in the one block mask. Attending the sink keys as a branch of their own beside a pure-window block
    # mask, merged by log-sum-exp (5cf6b96), was exact but slower: on the H200, forward+backward at 16k, 3.17 ms against
    # 0.41 ms for the window alone and 5.34 ms for flash (benchmarks/results/bench_kernel_64k_h200), where the single
    # mask had taken 1.12 ms on the H100 beside a 0.42 ms window (bench_kernel_graphs_h100). So it was reverted.


def main() -> None:
    pos = torch.arange(12)
    mask = sliding_window_mask(3, 2, torch.zeros(1, dtype=torch.long))
    print(draw(materialize(to_index_mask(mask, pos, pos, None), 1, 1, 12, 12, "cpu")[0, 0]))


if __name__ == "__main__":
    main()
