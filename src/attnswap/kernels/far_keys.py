"""The key gradients of a few far-attended keys (attention sinks), taken apart from FlexAttention's backward.

FlexAttention's backward gives each key block one program that walks every query block attending it. A sink's key
block is attended by every query block, so that one program walks the whole sequence while every other walks a
window's few blocks: window 256 + 4 sinks took 1.12 ms forward+backward at 16k against the plain window's 0.44, and
4.34 against 1.60 ms at 64k (H200, benchmarks/results/bench_kernel_64k_h200/session8).

The forward and the queries' gradients lose nothing by the sinks' block (one more key block per query block). So the
block mask keeps the whole pattern for them, and only the walk of each key block (the block mask's transposed,
``q_indices`` half) is cut to the query blocks that reach it without the far keys (``kernels/flex.py``,
``build_split_block_mask``). The pairs that cut drops, a far key and a query from afar, are (T, n) for n far keys:
their key and value gradients are summed here from the forward's output and log-sum-exp, as FlashAttention's backward
does: p = exp(q·k·scale - lse), ds = p (dout·v - rowsum(dout ∘ out) + dlse), dv += pᵀ dout, dk += dsᵀ q · scale.

On CUDA this is one Triton kernel that reads q, dout and out once, in tiles of queries, and a sum of its per-tile
partials; ``far_key_gradients_reference`` is the same sum in PyTorch: the CPU path and the kernel's test oracle.
"""

from __future__ import annotations

import torch

MAX_FAR_KEYS = 16  # the kernel's key tile (tl.dot needs 16 rows); more far keys take the PyTorch path
QUERY_TILE = 128


def with_far_key_gradients(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           slots: torch.Tensor, allowed: torch.Tensor, scaling: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` (B, H, T, D) and ``lse`` (B, H, T) fp32 of an attention whose backward left out the pairs ``allowed``
    (B, 1 or H, T, n) between each query and the far keys at key ``slots`` (B, n); returned unchanged, with those
    pairs' gradients added to k's and v's in the backward."""
    return _FarKeyGradients.apply(out, lse, q, k, v, slots, allowed, scaling)


class _FarKeyGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, lse, q, k, v, slots, allowed, scaling):
        ctx.save_for_backward(out, lse, q, k, v, slots, allowed)
        ctx.scaling = scaling
        return out.view_as(out), lse.view_as(lse)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        out, lse, q, k, v, slots, allowed = ctx.saved_tensors
        grad_k = grad_v = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            index = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])  # (B, H, n, D)
            far_k, far_v = k.gather(2, index), v.gather(2, index)
            sums = far_key_gradients if q.is_cuda and slots.shape[-1] <= MAX_FAR_KEYS else far_key_gradients_reference
            far_dk, far_dv = sums(q, far_k, far_v, out, grad_out, lse, grad_lse, allowed, ctx.scaling)
            # Slots are distinct within a row, so a scatter into zeros places each sum once.
            grad_k = torch.zeros_like(k).scatter_(2, index, far_dk.to(k.dtype))
            grad_v = torch.zeros_like(v).scatter_(2, index, far_dv.to(v.dtype))
        return grad_out, grad_lse, None, grad_k, grad_v, None, None, None


def far_key_gradients_reference(q, far_k, far_v, out, grad_out, lse, grad_lse, allowed, scaling
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """dk, dv (B, H, n, D) fp32 of the far keys far_k, far_v (B, H, n, D) from the ``allowed`` (B, 1|H, T, n) pairs."""
    q, grad_out = q.float(), grad_out.float()
    scores = torch.matmul(q, far_k.float().transpose(-1, -2)) * scaling  # (B, H, T, n)
    probs = torch.exp(scores - lse[..., None]).masked_fill(~allowed, 0.0)
    delta = (grad_out * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse
    grad_scores = probs * (torch.matmul(grad_out, far_v.float().transpose(-1, -2)) - delta[..., None])
    return torch.matmul(grad_scores.transpose(-1, -2), q) * scaling, torch.matmul(probs.transpose(-1, -2), grad_out)


def far_key_gradients(q, far_k, far_v, out, grad_out, lse, grad_lse, allowed, scaling
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``far_key_gradients_reference`` as one Triton pass over q, dout and out (CUDA, at most MAX_FAR_KEYS keys)."""
    batch, heads, q_len, dim = q.shape
    n_far = far_k.shape[2]
    tiles = -(-q_len // QUERY_TILE)
    partial = q.new_empty((2, batch * heads, tiles, MAX_FAR_KEYS, dim), dtype=torch.float32)
    far_k = far_k.contiguous()
    far_v = far_v.contiguous()
    has_grad_lse = grad_lse is not None
    grad_lse = grad_lse if has_grad_lse else lse  # any tensor: unread without HAS_GRAD_LSE
    allowed = allowed.expand(batch, -1, -1, -1)
    _far_key_gradient_tiles[(tiles, batch * heads)](
        q, grad_out, out, lse, grad_lse, allowed, far_k, far_v, partial,
        *q.stride(), *grad_out.stride(), *out.stride(), *lse.stride(), *grad_lse.stride(),
        allowed.stride(0), allowed.stride(1) if allowed.shape[1] > 1 else 0, allowed.stride(2), allowed.stride(3),
        heads, q_len, n_far, scaling,
        DIM=dim, DIM_TILE=triton_next_power_of_2(dim), KEY_TILE=MAX_FAR_KEYS, QUERY_TILE=QUERY_TILE,
        HAS_GRAD_LSE=has_grad_lse, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    sums = partial.sum(dim=2)[:, :, :n_far].view(2, batch, heads, n_far, dim)
    return sums[0], sums[1]


def triton_next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


try:  # Triton comes with torch's CUDA builds; the CPU path does not need it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _far_key_gradient_tiles(
        Q, DO, O, LSE, DLSE, ALLOWED, FK, FV, PARTIAL,
        sqb, sqh, sqt, sqd, sdob, sdoh, sdot, sdod, sob, soh, sot, sod, slb, slh, slt, sgb, sgh, sgt,
        sab, sah, sat, san,
        heads, q_len, n_far, scaling,
        DIM: tl.constexpr, DIM_TILE: tl.constexpr, KEY_TILE: tl.constexpr, QUERY_TILE: tl.constexpr,
        HAS_GRAD_LSE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        tile, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        rows = tile * QUERY_TILE + tl.arange(0, QUERY_TILE)
        cols = tl.arange(0, DIM_TILE)
        keys = tl.arange(0, KEY_TILE)
        row_ok = rows < q_len
        tile_ok = row_ok[:, None] & (cols[None, :] < DIM)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + cols[None, :] * sqd, mask=tile_ok, other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdot + cols[None, :] * sdod, mask=tile_ok, other=0.0)
        o = tl.load(O + b * sob + h * soh + rows[:, None] * sot + cols[None, :] * sod, mask=tile_ok, other=0.0)
        far_at = bh * n_far * DIM + keys[:, None] * DIM + cols[None, :]  # far_k/far_v (B, H, n, D), contiguous
        far_ok = (keys[:, None] < n_far) & (cols[None, :] < DIM)
        fk = tl.load(FK + far_at, mask=far_ok, other=0.0)
        fv = tl.load(FV + far_at, mask=far_ok, other=0.0)
        lse = tl.load(LSE + b * slb + h * slh + rows * slt, mask=row_ok, other=0.0)
        allowed = tl.load(ALLOWED + b * sab + h * sah + rows[:, None] * sat + keys[None, :] * san,
                          mask=row_ok[:, None] & (keys[None, :] < n_far), other=0)
        scores = tl.dot(q, tl.trans(fk), input_precision=PRECISION) * scaling  # (QUERY_TILE, KEY_TILE) fp32
        probs = tl.where(allowed != 0, tl.exp(scores - lse[:, None]), 0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        if HAS_GRAD_LSE:
            delta -= tl.load(DLSE + b * sgb + h * sgh + rows * sgt, mask=row_ok, other=0.0)
        grad_scores = probs * (tl.dot(do, tl.trans(fv), input_precision=PRECISION) - delta[:, None])
        dk = tl.dot(tl.trans(grad_scores.to(q.dtype)), q, input_precision=PRECISION) * scaling  # (KEY_TILE, DIM_TILE)
        dv = tl.dot(tl.trans(probs.to(do.dtype)), do, input_precision=PRECISION)
        at = (bh * tl.num_programs(0) + tile) * KEY_TILE * DIM + keys[:, None] * DIM + cols[None, :]
        ok = cols[None, :] < DIM
        half = tl.num_programs(1) * tl.num_programs(0) * KEY_TILE * DIM
        tl.store(PARTIAL + at, dk, mask=ok)
        tl.store(PARTIAL + half + at, dv, mask=ok)
