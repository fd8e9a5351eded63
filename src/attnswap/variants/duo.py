"""Per-head routing between full attention and a sliding window with sinks (DuoAttention, https://arxiv.org/abs/2410.10819).

Each head h of a layer has one learnable gate g_h (fp32). While training, the head's output mixes the two paths,

    out_h = a_h · full_h + (1 - a_h) · window_h,      a_h = clamp(g_h, 0, 1),

with every gate starting at 1, so a freshly swapped layer is exactly full attention. The L1 penalty Σ|g_h| (mean
over the layer's heads) pulls gates toward 0, and distillation pushes back where a head needs its long range:
the heads whose gates stay high are the "retrieval heads" that must keep full attention. A clamp rather than a
sigmoid, as in DuoAttention: a sigmoid cannot start at exactly full attention, and the penalty acts on g itself,
so a gate above 1 (where the clamp passes no gradient) still comes down.

Hardening (``DuoState.harden``) fixes a boolean per head, True = full, in the ``full_heads`` buffer (saved with
the state). A hardened layer is one masked attention over all its heads: the mask is causal for full heads and
the window (+ sinks) for the others, so FlexAttention runs both kinds of head in one block-sparse call. Its
generation cache (``kept_state``) keeps every token for the full heads only, the window's slots for the others,
where the heads of one KV head agree (``attnswap plan --objective recall`` routes whole KV heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from attnswap.errors import AttnswapError
from attnswap.kernels.kv_cache import KeptState
from attnswap.kernels.masks import MaskFn, draw, materialize, to_index_mask
from attnswap.variants.base import AttnContext, check
from attnswap.variants.full import Full
from attnswap.variants.masked import MaskedVariant
from attnswap.variants.window import Window, WindowParams, sliding_window_mask

FULL = Full()


@dataclass(frozen=True)
class DuoParams:
    w: int = 256  # the cheap heads' window: each query sees itself and the w-1 tokens before it
    sinks: int = 4  # ... plus the first `sinks` real tokens of its row

    def __post_init__(self):
        WindowParams(self.w, self.sinks)  # the same checks as the window variant's


class DuoState(nn.Module):
    """One layer's gates (H,) fp32 and, once hardened, which heads stay full (``full_heads`` (H,) bool)."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.gate = nn.Parameter(torch.ones(num_heads))
        self.register_buffer("hardened", torch.zeros((), dtype=torch.bool))
        self.register_buffer("full_heads", torch.ones(num_heads, dtype=torch.bool))

    def share(self) -> torch.Tensor:
        """(H,) fp32 share a_h of full attention in each head's output: the gates clamped to [0, 1]."""
        return self.gate.float().clamp(0.0, 1.0)

    @torch.no_grad()
    def harden(self, full_heads: torch.Tensor) -> None:
        """Fix the routing for good: ``full_heads`` (H,) bool, True where a head keeps full attention."""
        check(full_heads.shape == self.full_heads.shape,
              f"duo harden needs one flag per head ({self.full_heads.numel()}), got shape {tuple(full_heads.shape)}")
        self.full_heads.copy_(full_heads.to(torch.bool))
        self.hardened.fill_(True)

    def extra_repr(self) -> str:
        return f"heads={self.gate.numel()}, hardened={bool(self.hardened)}"


class Duo(MaskedVariant):
    name = "duo"
    routes_heads = True
    Params = DuoParams
    summary = "per-head gates between full attention and a window + sinks, trained with L1, hardened per head"

    @property
    def label(self) -> str:
        return f"duo_w{self.params.w}_sinks{self.params.sinks}"

    @property
    def cheap(self) -> Window:
        """The variant of the cheap heads."""
        return Window(WindowParams(self.params.w, self.params.sinks))

    def make_state(self, num_heads: int, head_dim: int) -> DuoState:
        return DuoState(num_heads)

    def l1_penalty(self, state: DuoState) -> torch.Tensor | None:
        """Mean over heads of |g_h|; nothing to penalise once the routing is fixed."""
        return None if bool(state.hardened) else state.gate.abs().mean()

    def _state(self, state: DuoState | None) -> DuoState:
        assert isinstance(state, DuoState), "duo needs its make_state() state (swap puts it on the module)"
        return state

    def positional_mask(self, ctx: AttnContext, batch: int, device, state) -> MaskFn:
        """The hardened layer's one mask: every key for a full head, the window (+ sinks) for a cheap one."""
        full_heads = self._state(state).full_heads
        window = sliding_window_mask(self.params.w, self.params.sinks, ctx.first_real_token(batch, device))

        def routed(b, h, q, kv):
            return full_heads[h] | window(b, h, q, kv)

        routed.__name__ = f"duo_{window.__name__}"
        return routed

    def probs(self, q, k, ctx: AttnContext, state) -> torch.Tensor:
        """(B, H, T, S) fp32: a_h·P_full + (1 - a_h)·P_window per head, or the hardened mask's softmax."""
        state = self._state(state)
        if bool(state.hardened):
            return super().probs(q, k, ctx, state)
        share = state.share().view(1, -1, 1, 1)
        return share * FULL.probs(q, k, ctx, None) + (1 - share) * self.cheap.probs(q, k, ctx, None)

    def attend(self, q, k, v, ctx: AttnContext, state) -> torch.Tensor:
        """Hardened: one block-sparse call for all heads. Training: both paths for every head, mixed per head."""
        state = self._state(state)
        if bool(state.hardened):
            return super().attend(q, k, v, ctx, state)
        share = state.share().view(1, -1, 1, 1)
        full, window = FULL.attend(q, k, v, ctx, None), self.cheap.attend(q, k, v, ctx, None)
        return (share * full.float() + (1 - share) * window.float()).to(q.dtype)

    def kept_state(self, layer_idx: int, state=None) -> KeptState | None:
        """Hardened: every token for the full heads, the window and sinks for the others (hf.cache.RoutedLayer).
        Training mixes both paths in every head, which needs every token."""
        if state is None or not bool(state.hardened):
            return None
        return KeptState(window=self.params.w, sinks=self.params.sinks,
                         full_heads=tuple(bool(x) for x in state.full_heads.tolist()))

    def routes(self) -> tuple[Full, Window]:
        return FULL, self.cheap


def route_heads(states: list[DuoState], budget: float, cheap_cost: float, fixed_heads: int = 0) -> list[list[bool]]:
    """Harden ``states`` (one per duo layer) in place: over all of them, the heads with the highest gates keep full
    attention, as many as keep the cost within ``budget`` (a full head costs 1, a cheap head ``cheap_cost``, and
    ``fixed_heads`` more heads stay full anyway). Returns the routing, per layer and head (True = full)."""
    shares = torch.cat([s.share().detach().cpu() for s in states])  # (duo heads,)
    routed = shares.numel()
    lowest = (fixed_heads + routed * cheap_cost) / (fixed_heads + routed)
    if lowest > budget + 1e-12:
        raise AttnswapError(f"budget {budget} is below the cheapest routing (every duo head cheap costs "
                            f"{lowest:.4f}); raise the budget")
    # (fixed + k + (routed - k)·cheap) / (fixed + routed) <= budget, for the largest k
    spare = budget * (fixed_heads + routed) - fixed_heads - routed * cheap_cost
    full_count = min(routed, math.floor(spare / max(1.0 - cheap_cost, 1e-12) + 1e-9))
    full = torch.zeros(routed, dtype=torch.bool)
    full[torch.argsort(shares, descending=True, stable=True)[:full_count]] = True
    routing = []
    for state, flags in zip(states, full.split([s.gate.numel() for s in states])):
        state.harden(flags.to(state.full_heads.device))
        routing.append(flags.tolist())
    return routing


def main() -> None:
    variant = Duo(DuoParams(w=3, sinks=2))
    state = variant.make_state(num_heads=2, head_dim=8)
    state.harden(torch.tensor([True, False]))
    pos = torch.arange(12)
    mask = to_index_mask(variant.positional_mask(AttnContext(scaling=1.0), 1, "cpu", state), pos, pos, None)
    grids = [draw(m).splitlines() for m in materialize(mask, 1, 2, 12, 12, "cpu")[0]]
    print(f"{'head 0 (full)':<14}  head 1 (window 3 + 2 sinks)")
    for rows in zip(*grids):
        print("   ".join(rows))


if __name__ == "__main__":
    main()
