"""Sliding-window attention, optionally with attention sinks (StreamingLLM, https://arxiv.org/abs/2309.17453)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from attnswap.kernels.flex import flex_serves
from attnswap.kernels.masks import device_constant, draw, materialize, to_index_mask
from attnswap.kernels.merge import attend_few_more_keys, compiled_attend_few_more_keys
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
        p = self.params
        return f"window{p.w}" + (f"_sinks{p.sinks}" if p.sinks else "")

    def positional_mask(self, ctx: AttnContext, batch: int, device, state):
        return sliding_window_mask(self.params.w, self.params.sinks, ctx.first_real_token(batch, device))

    # --- sinks as a branch of their own ----------------------------------------------------------------
    # In one block mask the sinks' key block is live for every query block, and FlexAttention's backward walks that
    # column in a single program: window 256 + 4 sinks forward+backward took 1.14 ms at 16k against the plain
    # window's 0.42 (H200; its backward kernel 937 us against 284 us). So where flex serves and the keys are the
    # sequence in order, the block mask stays a pure window and the sink keys beyond each query's window are attended
    # as a few extra keys, merged by log-sum-exp in one compiled function (kernels/merge.py). Two earlier tries were
    # slower and are gone: the same branch through a materialised SDPA and an eager fp32 merge (3.17 ms at 16k), and
    # copies of the sinks' block per fold of queries (2.45 ms at 16k: benchmarks/results/bench_kernel_64k_h200/session7).
    def attend(self, q, k, v, ctx: AttnContext, state, return_lse: bool = False):
        if not self._sinks_apart(q, ctx):
            return super().attend(q, k, v, ctx, state, return_lse)
        return self.attend_sinks_apart(q, k, v, ctx, return_lse)

    def _sinks_apart(self, q, ctx: AttnContext) -> bool:
        """Sinks go their own way where flex serves (elsewhere scores are materialised anyway) and the keys are the
        sequence in order (no rolling cache, no model mask, which may restart sinks per packed document): sink i is
        then key slot first_real + i."""
        plain = ctx.model_mask is None and ctx.q_positions is None and ctx.kv_positions is None
        return self.params.sinks > 0 and plain and flex_serves(q)

    def attend_sinks_apart(self, q, k, v, ctx: AttnContext, return_lse: bool = False):
        """``attend`` as the pure window merged with the sinks outside it; equal to the single mask."""
        out, lse = self._window_alone.attend(q, k, v, ctx, None, return_lse=True)
        sink_k, sink_v, allowed = self._sinks_beyond_window(q, k, v, ctx)
        merge = attend_few_more_keys
        if q.is_cuda and not torch.compiler.is_compiling():
            merge = compiled_attend_few_more_keys()
        out, lse = merge(q, out, lse, sink_k, sink_v, allowed, ctx.scaling)
        return (out, lse) if return_lse else out

    @functools.cached_property
    def _window_alone(self) -> Window:
        return Window(WindowParams(w=self.params.w))

    def _sinks_beyond_window(self, q, k, v, ctx: AttnContext):
        """The sink keys and values (B, H, sinks, D) and which query sees which of them beyond its window (B, 1, T,
        sinks): the window part has those within it, and w >= 1 makes this causal too."""
        batch, heads, q_len, head_dim = q.shape
        kv_len = k.shape[-2]
        slots = ctx.first_real_token(batch, q.device)[:, None] + torch.arange(self.params.sinks, device=q.device)
        exists = slots < kv_len
        slots = slots.clamp(max=kv_len - 1)  # (B, sinks)
        if ctx.key_valid is not None:
            exists = exists & ctx.key_valid.gather(1, slots)
        rows = slots[:, None, :, None].expand(batch, heads, self.params.sinks, head_dim)
        q_pos, _ = ctx.positions(q_len, kv_len, q.device)
        allowed = exists[:, None, None, :] & (q_pos[None, None, :, None] - slots[:, None, None, :] >= self.params.w)
        return k.gather(2, rows), v.gather(2, rows), allowed


def main() -> None:
    pos = torch.arange(12)
    mask = sliding_window_mask(3, 2, torch.zeros(1, dtype=torch.long))
    print(draw(materialize(to_index_mask(mask, pos, pos, None), 1, 1, 12, 12, "cpu")[0, 0]))


if __name__ == "__main__":
    main()
