"""Causal linear attention in chunks: softmax(q·k) replaced by phi(q)·phi(k), never a T×S matrix.

With non-negative features phi, query i attends as
``out_i = sum_{j<=i} (phi_q_i·phi_k_j) v_j / sum_{j<=i} phi_q_i·phi_k_j``.
The sums are prefix sums, so the work is O(n·M·D): within a chunk of C positions a small causal C×C
product, across chunks a carried state sum phi_k_j v_j^T (M, D) and normaliser sum phi_k_j (M,).
A column of ones appended to v makes the same scan carry the normaliser. The backward pass is three
more scans of the same kind (two of them reversed), so training memory is the inputs plus one chunk,
not one state per chunk. Everything accumulates in fp32.
"""

from __future__ import annotations

import torch


def causal_linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, chunk: int = 64
) -> torch.Tensor:
    """Causal linear attention: phi_q (B, H, T, M), phi_k (B, H, S, M), v (B, H, S, D) -> (B, H, T, D) in v's dtype.

    Queries are the last T of the S key positions (T <= S; T = 1 is a decode step against S keys).
    Features must be non-negative. Padding is the caller's job: zero the phi_k rows of padded keys.
    A query whose normaliser is 0 (every visible key padded) outputs 0.
    """
    q_len, kv_len = phi_q.shape[-2], phi_k.shape[-2]
    assert q_len <= kv_len, f"queries are the last T of S keys, got T={q_len} > S={kv_len}"
    assert chunk >= 1, f"chunk must be >= 1, got {chunk}"
    phi_q, phi_k, v32 = phi_q.float(), phi_k.float(), v.float()
    prefix = kv_len - q_len  # keys every query sees: folded into one state up front
    ones = v32.new_ones(*v32.shape[:-2], q_len, 1)
    v_ones = torch.cat([v32[..., prefix:, :], ones], dim=-1)  # (B, H, T, D+1)
    num_den = _CausalProduct.apply(phi_q, phi_k[..., prefix:, :], v_ones, chunk)  # (B, H, T, D+1)
    num, den = num_den[..., :-1], num_den[..., -1:]
    if prefix:
        kv, z = linear_attention_state(phi_k[..., :prefix, :], v32[..., :prefix, :])
        num = num + torch.matmul(phi_q, kv)
        den = den + torch.matmul(phi_q, z.unsqueeze(-1))
    return _normalise(num, den).to(v.dtype)


def linear_attention_state(phi_k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrent state after S keys: phi_k (B, H, S, M), v (B, H, S, D) -> kv (B, H, M, D), z (B, H, M), fp32."""
    phi_k = phi_k.float()
    return torch.matmul(phi_k.transpose(-1, -2), v.float()), phi_k.sum(dim=-2)


def linear_attention_step(phi_q: torch.Tensor, kv: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Queries that see every key in a state: phi_q (B, H, 1, M), kv (B, H, M, D), z (B, H, M) -> (B, H, 1, D) fp32.

    Decoding keeps (kv, z) and adds phi_k v^T and phi_k of each new token before its step.
    """
    phi_q = phi_q.float()
    return _normalise(torch.matmul(phi_q, kv), torch.matmul(phi_q, z.unsqueeze(-1)))


def _normalise(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num (..., T, D) / den (..., T, 1), 0 where den is 0; the guarded divisor keeps gradients free of NaN."""
    empty = den == 0
    return torch.where(empty, 0.0, num / torch.where(empty, 1.0, den))


def _causal_scan(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, chunk: int) -> torch.Tensor:
    """out_i = sum_{j<=i} (a_i·b_j) c_j for a, b (B, H, T, M), c (B, H, T, E) -> (B, H, T, E)."""
    q_len = a.shape[-2]
    out = c.new_empty(*a.shape[:-1], c.shape[-1])
    state = c.new_zeros(*a.shape[:-2], a.shape[-1], c.shape[-1])  # (B, H, M, E): sum of b_j c_j^T so far
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=a.device).tril()
    for start in range(0, q_len, chunk):
        end = min(start + chunk, q_len)
        a_c, b_c, c_c = a[..., start:end, :], b[..., start:end, :], c[..., start:end, :]
        scores = torch.matmul(a_c, b_c.transpose(-1, -2))  # (B, H, C, C)
        scores = scores.masked_fill(~causal[: end - start, : end - start], 0.0)
        out[..., start:end, :] = torch.matmul(a_c, state) + torch.matmul(scores, c_c)
        state = state + torch.matmul(b_c.transpose(-1, -2), c_c)
    return out


class _CausalProduct(torch.autograd.Function):
    """``_causal_scan`` with a backward made of scans, saving only the inputs.

    With L = sum_{j<=i} (a_i·b_j)(g_i·c_j): dL/da_i = sum_{j<=i} (g_i·c_j) b_j is a forward scan;
    dL/db_j = sum_{i>=j} (c_j·g_i) a_i and dL/dc_j = sum_{i>=j} (b_j·a_i) g_i are scans of the reversed sequence.
    """

    @staticmethod
    def forward(ctx, a, b, c, chunk):
        ctx.save_for_backward(a, b, c)
        ctx.chunk = chunk
        return _causal_scan(a, b, c, chunk)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        a, b, c = ctx.saved_tensors
        chunk = ctx.chunk
        a_r, b_r, c_r, grad_r = (x.flip(-2) for x in (a, b, c, grad))
        grad_a = _causal_scan(grad, c, b, chunk)
        grad_b = _causal_scan(c_r, grad_r, a_r, chunk).flip(-2)
        grad_c = _causal_scan(b_r, a_r, grad_r, chunk).flip(-2)
        return grad_a, grad_b, grad_c, None
