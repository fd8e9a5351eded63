"""Native Sparse Attention: gated compressed, selected and sliding branches (https://arxiv.org/abs/2502.11089)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from attnswap.errors import AttnswapError
from attnswap.kernels.dense import dense_probs
from attnswap.kernels.fusion import fused
from attnswap.kernels.nsa import (block_importance, flex_nsa_branches, flex_route, nsa_branches, num_blocks,
                                  select_blocks, selection_table)
from attnswap.kernels.pieces import matmul_by_pieces
from attnswap.variants.base import AttnContext, Variant, check
from attnswap.variants.window import Window, WindowParams


@dataclass(frozen=True)
class NSAParams:
    block: int = 32  # tokens per block, for compression, selection and query grouping alike
    top_k: int = 4  # key blocks each query block attends to exactly, its own block and the first block included
    window: int = 64  # sliding branch: each query sees itself and the window-1 tokens before it

    def __post_init__(self):
        check(self.block >= 1, f"nsa block must be >= 1, got block={self.block}")
        check(self.top_k >= 1, f"nsa top_k must be >= 1, got top_k={self.top_k}")
        check(self.window >= 1, f"nsa window must be >= 1, got window={self.window}")


# Gate order: compressed, selected, sliding. At the start the swapped model should behave like its teacher:
# the selected branch (own block, first block, best-scoring blocks) is the closest to full attention, the
# window adds exact local context, the compressed branch only a blur. Gates summing to 1 keep the output's scale.
INITIAL_GATES = (0.05, 0.85, 0.10)


class NSAGates(nn.Module):
    """Per-head gates g = sigmoid(q·W_h + b_h) for the three branches: weight (H, D, 3), bias (H, 3)."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        # W = 0: the gates start exactly at INITIAL_GATES, whatever the query norms; W still gets gradients.
        self.weight = nn.Parameter(torch.zeros(num_heads, head_dim, 3))
        self.bias = nn.Parameter(torch.logit(torch.tensor(INITIAL_GATES)).repeat(num_heads, 1))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, D) -> gates (B, H, T, 3) fp32."""
        # The weight's gradient is (D, 3) summed over every position: as one GEMM, 2.15 ms at 64k on the H200
        # (benchmarks/results/bench_kernel_64k_h200/fd63970), so in pieces (kernels/pieces.py).
        logits = matmul_by_pieces(q.float(), self.weight) + self.bias[:, None, :]
        return torch.sigmoid(logits)


def gated_sum(gates: torch.Tensor, *branches: torch.Tensor) -> torch.Tensor:
    """sum_i gates[..., i] · branch_i in fp32, in the first branch's dtype: gates (B, H, T, 3), branches (B, H, T, D).

    One compiled pass on CUDA (kernels/fusion.py): eager, each gate is a strided slice, and elementwise kernels over
    strided operands run unvectorised, likely the 14 such kernels, 1.6 ms, of NSA's forward+backward at 64k (H200,
    benchmarks/results/bench_kernel_64k_h200/f60d4ad; the fused sum is not measured yet).
    """
    total = sum(gates[..., i, None] * branch.float() for i, branch in enumerate(branches))
    return total.to(branches[0].dtype)


class NSA(Variant):
    name = "nsa"
    Params = NSAParams
    summary = "gated mix of block-compressed, top-k block-selected and sliding-window attention"

    @property
    def label(self) -> str:
        p = self.params
        return f"nsa_b{p.block}_k{p.top_k}_w{p.window}"

    def make_state(self, num_heads: int, head_dim: int) -> nn.Module:
        return NSAGates(num_heads, head_dim)

    def gates(self, q: torch.Tensor, state: nn.Module | None) -> torch.Tensor:
        """(B, H, T, 3) fp32; without learned state, the initial gates."""
        if state is None:
            return torch.tensor(INITIAL_GATES, device=q.device).expand(*q.shape[:-1], 3)
        return state(q)

    def _first_real(self, ctx: AttnContext, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if ctx.q_positions is not None or ctx.kv_positions is not None:
            raise AttnswapError(
                "nsa needs the whole sequence in the KV cache (its blocks are positions 0..S-1); "
                "run it with the default dynamic cache, not a rolling one"
            )
        if q.shape[-2] > k.shape[-2]:
            raise AttnswapError(f"nsa got {q.shape[-2]} queries for {k.shape[-2]} keys; queries must be the last keys")
        return ctx.first_real_token(q.shape[0], q.device)

    # --- the dense oracle -----------------------------------------------------------------------
    def branch_probs(self, q, k, ctx: AttnContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each branch's attention over the original keys, (B, H, T, S) fp32: compressed, selected, sliding."""
        p = self.params
        first_real = self._first_real(ctx, q, k)
        q_len, kv_len, device = q.shape[-2], k.shape[-2], q.device
        n_kb = num_blocks(kv_len, p.block)
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # (T, 1)
        kv_pos = torch.arange(kv_len, device=device)  # (S,)
        real = ctx.key_valid if ctx.key_valid is not None else torch.ones(1, kv_len, dtype=torch.bool, device=device)
        causal = (kv_pos <= q_pos) & real[:, None, :]  # (B|1, T, S)

        # Compressed: the pooled key is a mean, so a block's score is the mean of its real keys' scores, and
        # its probability falls evenly on those keys.
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * ctx.scaling  # (B, H, T, S)
        key_block = kv_pos // p.block
        member = (key_block[:, None] == torch.arange(n_kb, device=device)) & real[..., None]  # (B|1, S, nKB)
        pool = member.float() / member.sum(1, keepdim=True).clamp(min=1)  # (B|1, S, nKB)
        block_scores = torch.matmul(scores, pool[:, None])  # (B, H, T, nKB)
        ended = (torch.arange(1, n_kb + 1, device=device) * p.block - 1) <= q_pos  # (T, nKB)
        visible = ended & member.any(1)[:, None, :]  # (B|1, T, nKB)
        block_probs = torch.softmax(block_scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)
        block_probs = torch.nan_to_num(block_probs, nan=0.0)
        compressed = torch.matmul(block_probs, pool[:, None].transpose(-1, -2))  # (B, H, T, S)

        selected = select_blocks(block_importance(block_probs, kv_len - q_len, p.block), ctx.key_valid, first_real,
                                 kv_len - q_len, p.block, p.top_k)
        chosen = selection_table(selected, n_kb)  # (B, H, nQB, nKB)
        q_block = q_pos[:, 0] // p.block - (kv_len - q_len) // p.block  # (T,)
        in_selected = chosen[:, :, q_block][..., key_block]  # (B, H, T, S)
        sel = dense_probs(q, k, in_selected & causal[:, None], ctx.scaling)
        win = dense_probs(q, k, (causal & (q_pos - kv_pos < p.window))[:, None], ctx.scaling)
        return compressed, sel, win

    def cost(self, n, measure, state, heads, head_dim, layer=0) -> torch.Tensor:
        """flops: per query, its top_k·block selected keys, its window and one compressed summary per block, each
        capped by the causal prefix. kv: every key and its block summaries are kept."""
        p = self.params
        if measure == "kv":
            share = (n + n // p.block) / n
        else:
            seen = torch.arange(1, n + 1, dtype=torch.float64)  # keys in each query's causal prefix
            pairs = seen.clamp(max=p.top_k * p.block) + seen.clamp(max=p.window) + seen // p.block
            share = float(pairs.clamp(max=seen).sum()) / (n * (n + 1) / 2)
        return torch.full((heads,), share, dtype=torch.float64)

    def probs(self, q, k, ctx: AttnContext, state: nn.Module | None) -> torch.Tensor:
        """The gate-weighted sum of the three branches' attention matrices, (B, H, T, S) fp32."""
        gates = self.gates(q, state)[..., None]  # (B, H, T, 3, 1)
        return sum(gates[..., i, :] * branch for i, branch in enumerate(self.branch_probs(q, k, ctx)))

    # --- the efficient path ---------------------------------------------------------------------
    def attend(self, q, k, v, ctx: AttnContext, state: nn.Module | None) -> torch.Tensor:
        """Compressed and selected through FlexAttention and the sliding branch through the window variant's kernel
        where flex's fused kernel runs; elsewhere all three by block gathers (kernels/nsa.py)."""
        p = self.params
        first_real = self._first_real(ctx, q, k)
        if flex_route(q, p.block):
            o_cmp, o_sel = flex_nsa_branches(q, k, v, ctx.scaling, p.block, p.top_k, ctx.key_valid, first_real)
            branches = (o_cmp, o_sel, self._window.attend(q, k, v, ctx, None))
        else:
            branches = nsa_branches(q, k, v, ctx.scaling, p.block, p.top_k, p.window, ctx.key_valid, first_real)
        return fused(gated_sum, q)(self.gates(q, state), *branches).to(q.dtype)


    @functools.cached_property
    def _window(self) -> Window:
        """The sliding branch: causal attention over the last ``window`` tokens, the window variant exactly."""
        return Window(WindowParams(w=self.params.window))


def main() -> None:
    from attnswap.kernels.masks import draw

    torch.manual_seed(0)
    variant = NSA(NSAParams(block=2, top_k=3, window=3))
    q, k = torch.randn(2, 1, 1, 12, 8).unbind(0)
    names = ("compressed: blocks of 2 once they have ended", "selected: own block, first block, best other block",
             "sliding: window of 3")
    for name, branch in zip(names, variant.branch_probs(q, k, AttnContext(scaling=8**-0.5))):
        print(f"{name}\n{draw(branch[0, 0] > 0)}\n")
    print(f"initial gates (compressed, selected, sliding): {INITIAL_GATES}")


if __name__ == "__main__":
    main()
