"""Sliding-window attention, optionally with attention sinks (StreamingLLM, https://arxiv.org/abs/2309.17453)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from attnswap.kernels.flex import materialised_attention
from attnswap.kernels.masks import device_constant, draw, materialize, to_index_mask
from attnswap.kernels.merge import merge_attention
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

    # --- sinks as their own branch ---------------------------------------------------------------
    # In one block mask, the sinks' key block is live for every query block, and FlexAttention's backward walks that
    # column in a single program (forward+backward 4.7x flash at 16k against 13x without sinks, issue 17). So where the
    # keys sit in position order, the block mask stays a pure window and the few sink keys are attended densely,
    # (B, H, T, sinks), the two parts merged by their log-sum-exps: the same softmax over the union of the keys.
    def attend(self, q, k, v, ctx: AttnContext, state, return_lse: bool = False):
        if not self._sinks_apart(ctx):
            return super().attend(q, k, v, ctx, state, return_lse)
        out_window, lse_window = self._window_alone.attend(q, k, v, ctx, state, return_lse=True)
        out_sinks, lse_sinks = self._sink_attention(q, k, v, ctx)
        out, lse = merge_attention([out_window, out_sinks], [lse_window, lse_sinks])
        return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)

    def _sinks_apart(self, ctx: AttnContext) -> bool:
        """Sinks go their own way when the keys are the sequence in order (no rolling cache, no model mask, which may
        restart sinks per packed document): then sink i is key slot first_real + i."""
        plain = ctx.model_mask is None and ctx.q_positions is None and ctx.kv_positions is None
        return self.params.sinks > 0 and plain

    @functools.cached_property
    def _window_alone(self) -> "Window":
        return Window(WindowParams(w=self.params.w))

    def _sink_attention(self, q, k, v, ctx: AttnContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over the sink keys that lie outside each query's window: ((B, H, T, D), lse (B, H, T))."""
        batch, heads, q_len, head_dim = q.shape
        kv_len = k.shape[-2]
        first = ctx.first_real_token(batch, q.device)  # (B,)
        slots = first[:, None] + torch.arange(self.params.sinks, device=q.device)  # (B, sinks)
        exists = slots < kv_len
        slots = slots.clamp(max=kv_len - 1)
        if ctx.key_valid is not None:
            exists = exists & ctx.key_valid.gather(1, slots)
        rows = slots[:, None, :, None].expand(batch, heads, self.params.sinks, head_dim)
        sink_k, sink_v = k.gather(2, rows), v.gather(2, rows)  # (B, H, sinks, D)
        q_pos, _ = ctx.positions(q_len, kv_len, q.device)
        width = self.params.w

        def beyond_window(b, h, q_idx, sink_idx):  # the window part has the others; w >= 1 makes this causal too
            return exists[b, sink_idx] & (q_pos[q_idx] - slots[b, sink_idx] >= width)

        return materialised_attention(q, sink_k, sink_v, beyond_window, ctx.scaling, return_lse=True)


def main() -> None:
    pos = torch.arange(12)
    mask = sliding_window_mask(3, 2, torch.zeros(1, dtype=torch.long))
    print(draw(materialize(to_index_mask(mask, pos, pos, None), 1, 1, 12, 12, "cpu")[0, 0]))


if __name__ == "__main__":
    main()
