"""Hybrid attention: exact softmax over a sliding window (+ sinks), Hedgehog linear attention over every earlier
token, one shared normaliser (LoLCATs, https://arxiv.org/abs/2410.10254; Hedgehog, https://arxiv.org/abs/2402.04347).

For query i, the window part W_i is the keys a ``window:w,sinks`` query sees (i - w < j <= i, and the first
``sinks`` real tokens of the row); the far part F_i is every other visible key (j <= i - w, not a sink).
With s_ij = q_i·k_j · scaling, phi Hedgehog's learned feature map and beta_h a learned per-head balance::

    a_ij = exp(s_ij - lse_i)               for j in W_i,  lse_i = log sum_{j in W_i} exp(s_ij)
    a_ij = exp(beta_h) phi(q_i)·phi(k_j)   for j in F_i
    out_i = sum_j a_ij v_j / sum_j a_ij = (out_window_i + exp(beta_h) F_i out_far_i) / (1 + exp(beta_h) F_i)

with F_i = sum_{j in F_i} phi(q_i)·phi(k_j). The window keeps its softmax distribution and total weight 1; the far
part weighs exp(beta_h) F_i against it, so its share grows with the number of far tokens, as softmax's would. This
is the merge of (out_window, lse) with (out_far, lse + beta_h + log F) by log-sum-exp (kernels/merge.py).
A row whose window holds no real key outputs 0 (only a padded query has such a window).

Initial balance: beta = BALANCE_INIT = -4 in every head, chosen on the bundled teacher, untrained, WikiText-2 valid
(first 4,096 tokens, no overlap; benchmarks/results/hybrid_balance_init_cpu/, whose README names the command). With w = 64 and 4 sinks, perplexity (teacher 90.1):

    context 1024   window 256.0   beta -5: 203.5   -4.5: 193.6   -4: 188.5   -3.5: 195.4
    context 512    window 197.7   beta -6: 190.2   -5: 182.1   -4: 173.1   -3.5: 172.2   -3: 179.0   -2: 257.2   0: 825.1

(teacher 108.0 at context 512). So even untrained maps give the far tokens useful weight, and -4 is the best of these
at context 1024 and within 1 % of the best at 512; the far part's weight grows with the number of far tokens, so
longer contexts favour a lower beta. beta = -inf is the window exactly (same perplexity, 197.7).
The other normaliser, the far part's exp(beta) F_i against the window's softmax mass exp(lse_i) itself, never beat
the window untrained (255.5 at best, context 1024; same folder): Hedgehog's features are normalised per token, so
phi(q)·phi(k) carries no per-query scale, and the window's lse supplies one.

Efficient path: the window part through FlexAttention with its log-sum-exp, the far part through the chunked
linear scan on key features delayed by w (shifted right by w with zeros, so query i sees keys <= i - w; sinks and
padding zeroed), merged by their log-normalisers: no T×S tensor. Generation keeps w + sinks key/value slots and a
running linear state of the keys that left the window (``cache.HybridLayer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from attnswap.errors import AttnswapError
from attnswap.kernels.decode import DecodeStep, linear_state_step_, slot_attention
from attnswap.kernels.fusion import fused
from attnswap.kernels.kv_cache import KeptState, linear_attention_extend
from attnswap.kernels.linear import causal_linear_attention
from attnswap.kernels.masks import causal, draw, materialize, to_index_mask
from attnswap.kernels.merge import merge_attention, safe_log
from attnswap.variants.base import OPTIONAL, AttnContext, Variant, check
from attnswap.variants.hedgehog import FEATURE_FLOOR, Hedgehog, HedgehogMap, HedgehogParams, floor_label
from attnswap.variants.linear_base import show_pattern
from attnswap.variants.window import Window, WindowParams

# exp(beta) scales the far part's weight F_i (a sum of phi(q)·phi(k) over far keys) against the window's 1; the value
# is measured (module docstring).
BALANCE_INIT = -4.0


@dataclass(frozen=True)
class HybridParams:
    w: int = 64  # exact softmax over the query and the w-1 tokens before it
    sinks: int = 4  # ... and the first `sinks` real tokens of the row; everything else is linear attention
    feature_dim: int = 0  # f, the width of each softmax half of the Hedgehog map; 0 = the head dimension
    chunk: int = 64  # chunk length of the linear-attention kernel
    floor: float = field(default=FEATURE_FLOOR, metadata=OPTIONAL)  # the Hedgehog map's share of the uniform
    # The layers in wide_layers (e.g. wide_layers=1+7) take an exact window of wide_w tokens instead of w: where the
    # original's long-range attention lives, a wider exact part, still linear time and a bounded cache.
    wide_w: int = field(default=0, metadata=OPTIONAL)
    wide_layers: tuple[int, ...] = field(default=(), metadata=OPTIONAL)

    def __post_init__(self):
        check(0 <= self.floor < 1,
              f"floor must be in [0, 1) (a share of the uniform distribution), got floor={self.floor}")
        check(self.w >= 1, f"hybrid window w must be >= 1, got w={self.w}")
        check((self.wide_w >= 1) == bool(self.wide_layers),
              f"wide_w and wide_layers go together (wide_w >= 1 and at least one layer), got wide_w={self.wide_w}, "
              f"wide_layers={'+'.join(map(str, self.wide_layers)) or 'none'}")
        check(all(layer >= 0 for layer in self.wide_layers), f"wide_layers must be >= 0, got {self.wide_layers}")
        check(self.sinks >= 0, f"sinks must be >= 0, got sinks={self.sinks}")
        check(self.feature_dim >= 0, f"feature_dim must be >= 0 (0 = head_dim), got feature_dim={self.feature_dim}")
        check(self.chunk >= 1, f"chunk must be >= 1, got chunk={self.chunk}")


class HybridState(nn.Module):
    """One layer's learnable state, fp32: Hedgehog's feature maps and a per-head balance beta (H,)."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, floor: float = FEATURE_FLOOR):
        super().__init__()
        self.feature_map = HedgehogMap(num_heads, head_dim, feature_dim, floor)
        self.balance = nn.Parameter(torch.full((num_heads,), BALANCE_INIT))


def merged_parts(out_window: torch.Tensor, lse_window: torch.Tensor, out_far: torch.Tensor, normaliser: torch.Tensor,
                 balance: torch.Tensor) -> torch.Tensor:
    """``Hybrid.merge``'s arithmetic: the far part enters at log-normaliser lse_window + balance_h + log F."""
    lse_far = lse_window + balance[:, None] + safe_log(normaliser)
    return merge_attention([out_window, out_far], [lse_window, lse_far])[0]


def delayed(x: torch.Tensor, slots: int) -> torch.Tensor:
    """x (B, H, S, ·) with each slot holding the row ``slots`` slots before it (zeros in the first ``slots``), stored
    as (B, S, H, ·): fla-core's layout, which its kernels then take without a copy (kernels/linear.py)."""
    length = x.shape[-2]
    kept = max(length - slots, 0)
    return F.pad(x.transpose(1, 2)[:, :kept], (0, 0, 0, 0, length - kept, 0)).transpose(1, 2)


class Hybrid(Variant):
    name = "hybrid"
    Params = HybridParams
    summary = ("exact softmax over the last w tokens (+ sinks), learned-feature-map linear attention over every "
               "earlier token, one shared normaliser, a learned per-head balance")
    honours_query_positions = True  # attend() hands queries placed by position (a StaticCache) to the reference
    honours_packed_documents = True  # the window part applies the packed mask, the far part the documents

    def __init__(self, params: HybridParams | None = None):
        super().__init__(params)
        # The two parts are the existing variants: the window's mask and kernel, Hedgehog's feature map.
        p = self.params
        self.window = Window(WindowParams(w=p.w, sinks=p.sinks))
        self.wide_window = Window(WindowParams(w=p.wide_w, sinks=p.sinks)) if p.wide_w else None
        self.hedgehog = Hedgehog(HedgehogParams(feature_dim=self.params.feature_dim, chunk=self.params.chunk,
                                                floor=self.params.floor))

    @property
    def label(self) -> str:
        p = self.params
        return (f"hybrid{p.w}" + (f"_sinks{p.sinks}" if p.sinks else "")
                + (f"_f{p.feature_dim}" if p.feature_dim else "") + floor_label(p.floor)
                + (f"_wide{p.wide_w}_l{'_'.join(map(str, p.wide_layers))}" if p.wide_w else ""))

    def check_layers(self, n_layers: int) -> None:
        beyond = [layer for layer in self.params.wide_layers if layer >= n_layers]
        if beyond:
            raise AttnswapError(f"wide_layers names layer {beyond[0]} but the model has layers 0..{n_layers - 1}; "
                                "name layers that exist")

    def window_for(self, layer_idx: int) -> Window:
        """The exact part of layer ``layer_idx``: the wide window in ``wide_layers``, else the window of w tokens."""
        return self.wide_window if layer_idx in self.params.wide_layers else self.window

    def make_state(self, num_heads: int, head_dim: int) -> HybridState:
        return HybridState(num_heads, head_dim, self.params.feature_dim or head_dim, self.params.floor)

    # --- the dense reference ----------------------------------------------------------------------
    def cost(self, n, measure, state, heads, head_dim, layer=0) -> torch.Tensor:
        """Its window exactly (its slots, for kv), plus a linear scan over every token (its state)."""
        linear = self.hedgehog.cost(n, measure, state.feature_map, heads, head_dim)
        return self.window_for(layer).cost(n, measure, None, heads, head_dim) + linear

    def probs(self, q, k, ctx: AttnContext, state: HybridState) -> torch.Tensor:
        """The implied attention matrix (B, H, T, S) fp32: causal, padding excluded, rows summing to 1 (0 for a
        row whose window holds no real key)."""
        batch, _, q_len, _ = q.shape
        kv_len = k.shape[-2]
        window = self.window_for(ctx.layer_idx)
        window_probs = window.probs(q, k, ctx, None)  # (B, H, T, S): softmax over W_i
        window_mask, q_pos, kv_pos = window.index_mask(q, k, ctx, None)
        in_window = materialize(window_mask, batch, 1, q_len, kv_len, q.device)
        visible = materialize(to_index_mask(causal, q_pos, kv_pos, ctx.key_valid, ctx.model_mask), batch, 1, q_len,
                              kv_len, q.device)
        features = self.hedgehog.feature_map(q, k, ctx, state.feature_map)
        far = torch.matmul(features.q, features.k.transpose(-1, -2)) * (visible & ~in_window)  # (B, H, T, S)
        far = far * torch.exp(state.balance)[:, None, None] * in_window.any(dim=-1, keepdim=True)
        return (window_probs + far) / (1 + far.sum(dim=-1, keepdim=True))

    # --- the efficient path -----------------------------------------------------------------------
    def attend(self, q, k, v, ctx: AttnContext, state: HybridState) -> torch.Tensor:
        if ctx.slots_out_of_order:
            # Key slots out of position order cannot be delayed by a shift; only the reference reads positions.
            return super().attend(q, k, v, ctx, state)
        window = self.window_for(ctx.layer_idx)
        out_window, lse_window = window.attend(q, k, v, ctx, None, return_lse=True)
        phi_q, phi_k = self.far_features(q, k, ctx, state, self.far_keys(ctx, k.shape[0], k.shape[-2], k.device))
        delayed_k, delayed_v = (delayed(x, window.params.w) for x in (phi_k, v))
        if ctx.documents is not None:
            # A key delayed past the end of its document would reach the next one's queries: none of its own queries
            # sits that far on. Inside its document, the documents' log-scale keeps it from every later document.
            delayed_from = F.pad(ctx.documents, (window.params.w, 0), value=-1)[:, : k.shape[-2]]
            delayed_k = delayed_k * (delayed_from == ctx.documents)[:, None, :, None]
        out_far, normaliser = causal_linear_attention(phi_q, delayed_k, delayed_v, chunk=self.params.chunk,
                                                      return_normaliser=True, documents=ctx.documents)
        return self.merge(out_window, lse_window, out_far, normaliser, state).to(q.dtype)

    def far_keys(self, ctx: AttnContext, batch: int, kv_len: int, device) -> torch.Tensor:
        """(B, S) bool: which keys may enter a far part: real, and not a sink (of their document, in packed rows)."""
        positions = torch.arange(kv_len, device=device) if ctx.documents is None else ctx.kv_positions
        offset = positions - ctx.first_real_token(batch, device)[:, None]  # (B, S)
        keep = offset >= self.params.sinks
        return keep if ctx.key_valid is None else keep & ctx.key_valid

    def far_features(self, q, k, ctx: AttnContext, state: HybridState, keep: torch.Tensor):
        """phi(q) (B, H, T, M), phi(k) (B, H, S, M) fp32, the rows of keys outside ``keep`` (B, S) zeroed."""
        features = self.hedgehog.feature_map(q, k, ctx, state.feature_map)
        return features.q, features.k * keep[:, None, :, None]

    def kept_state(self, layer_idx: int, state=None) -> KeptState:
        return KeptState(window=self.window_for(layer_idx).params.w, sinks=self.params.sinks, linear=True)

    def decode(self, q, step: DecodeStep, state: HybridState) -> torch.Tensor:
        """The window over the slots; the token that left it at this step folded into the far state, which the
        query then reads; the two merged as ``attend`` merges them."""
        out_window, lse_window = slot_attention(q, step.keys, step.values, step.valid, step.scaling, return_lse=True)
        groups = q.shape[1] // step.departing_keys.shape[1]  # one token: expanding its key heads is cheap
        far_k, far_v = (x.repeat_interleave(groups, dim=1) for x in (step.departing_keys, step.departing_values))
        phi_q, phi_k = self.far_features(q, far_k, AttnContext(scaling=step.scaling), state,
                                         step.departing_keep[:, None])
        if step.linear is None:  # decoding from an empty cache: the first token starts the state
            (out_far, normaliser), linear = linear_attention_extend(phi_q, phi_k, far_v, None, self.params.chunk,
                                                                    return_normaliser=True)
            step.linear = list(linear)
        else:
            out_far, normaliser = linear_state_step_(phi_q, phi_k, far_v, step.linear)
        return self.merge(out_window, lse_window, out_far, normaliser, state).to(q.dtype)

    def merge(self, out_window, lse_window, out_far, normaliser, state: HybridState) -> torch.Tensor:
        """The window part (B, H, T, D) with its log-sum-exp (B, H, T) and the far part with its linear-attention
        normaliser F (B, H, T), under one normaliser: (B, H, T, D) fp32 (see the module docstring). One compiled
        pass on CUDA (kernels/fusion.py): eager, its dozen elementwise steps each pass over (B, H, T, D) fp32."""
        return fused(merged_parts, out_window)(out_window, lse_window, out_far, normaliser, state.balance)


def main() -> None:
    variant = Hybrid(HybridParams(w=3, sinks=2))
    q = torch.zeros(1, 1, 12, 16)
    window_mask, _, _ = variant.window.index_mask(q, q, AttnContext(scaling=1.0), None)
    exact = draw(materialize(window_mask, 1, 1, 12, 12, "cpu")[0, 0])
    print(f"exact softmax (■); the rest of the causal triangle is linear attention:\n{exact}\n")
    show_pattern(variant)


if __name__ == "__main__":
    main()
