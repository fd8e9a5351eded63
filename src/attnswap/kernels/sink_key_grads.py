"""The key gradients of a few far-attended keys, taken apart from FlexAttention's backward: NSA's sink tile.

FlexAttention's backward gives each key block one program that walks every query block attending it. NSA forces each
row's sink block into every query block's selection, so that one program walked the whole sequence. The block mask
keeps the whole pattern for the forward and the queries' gradients, and only the walk of the sink block (the block
mask's transposed, ``q_indices`` half) is cut to the query blocks not wholly after it (``kernels/nsa.py``,
``selected_split_block_mask``; NSA 19.7 ms at 64k against 22.2, H200). The pairs that cut drops, a far key and a
query from afar, get their key and value gradients here from the forward's output and log-sum-exp, as
FlashAttention's backward does:
p = exp(q·k·scale - lse), ds = p (dout·v - rowsum(dout ∘ out) + dlse), dv += pᵀ dout, dk += dsᵀ q · scale.
The window's sinks and Longformer's global keys are a branch of their own instead (kernels/sinks_branch.py), which
also takes them out of the forward.

On CUDA this is one Triton kernel that reads q, dout and out once, in tiles of queries, and a sum of its per-program
partials; ``far_key_gradients_reference`` is the same sum in PyTorch: the CPU path and the kernel's test oracle.
"""

from __future__ import annotations

from typing import Callable

import torch

MAX_FAR_KEYS = 128  # the kernel's key tile at most; more far keys take the PyTorch path
PROGRAMS = 1024  # about how many programs the kernel launches; each sums as many query tiles as that leaves it


def with_far_key_gradients(attend: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                           q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                           allowed: torch.Tensor, scaling: float, rows_per_entry: int = 1
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend(k, v)``: out (B, H, T, D) and lse (B, H, T) fp32 of q's attention, whose backward leaves out the pairs
    ``allowed`` (B, 1 or H, T / rows_per_entry, n) between each query and the far keys at key ``slots`` (B, n), one
    entry per ``rows_per_entry`` consecutive queries (NSA's selection holds per query block). Returns them unchanged,
    with those pairs' gradients added to k's and v's in the backward.

    The sums are added in place to the gradients ``attend`` gives k and v, at the far slots alone: a (B, H, S, D)
    gradient of zeros beside them would cost a fill, a scatter and autograd's sum of the two, three passes over
    memory. The sums travel from the output's end to the keys' end as the gradient of a placeholder, so autograd
    orders the two ends and nothing is shared outside it.
    """
    k, v, placeholder = _AddAtFarSlots.apply(k, v, slots)
    out, lse = attend(k, v)
    return _SumFarPairs.apply(out, lse, q, k, v, placeholder, slots, allowed, scaling, rows_per_entry)


class _AddAtFarSlots(torch.autograd.Function):
    """k, v unchanged, and a placeholder whose gradient, (2, B, H, n, D) fp32, is added to theirs at ``slots``."""

    @staticmethod
    def forward(ctx, k, v, slots):
        ctx.save_for_backward(slots)
        ctx.kv_len, ctx.dtype = k.shape[-2], k.dtype
        ctx.set_materialize_grads(False)
        placeholder = k.new_zeros((2, k.shape[0], k.shape[1], slots.shape[-1], k.shape[-1]), dtype=torch.float32)
        return k.view_as(k), v.view_as(v), placeholder

    @staticmethod
    def backward(ctx, grad_k, grad_v, far_grads):
        (slots,) = ctx.saved_tensors
        if far_grads is not None:
            grad_k, grad_v = (_add_at(grad, ctx, slots, far) for grad, far in zip((grad_k, grad_v), far_grads))
        return grad_k, grad_v, None


def _add_at(grad: torch.Tensor | None, ctx, slots: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
    index = slots[:, None, :, None].expand(-1, far.shape[1], -1, far.shape[-1])  # (B, H, n, D)
    if grad is None:
        return far.new_zeros(*far.shape[:2], ctx.kv_len, far.shape[-1], dtype=ctx.dtype).scatter_(
            2, index, far.to(ctx.dtype))
    # The gradient attend's backward just made is autograd's alone; a broadcast one (expanded zeros) is copied.
    grad = grad if grad.is_contiguous() else grad.contiguous()
    return grad.scatter_add_(2, index, far.to(grad.dtype))


class _SumFarPairs(torch.autograd.Function):
    """out, lse unchanged; in the backward, the far pairs' key and value sums as the placeholder's gradient."""

    @staticmethod
    def forward(ctx, out, lse, q, k, v, placeholder, slots, allowed, scaling, rows_per_entry):
        ctx.save_for_backward(out, lse, q, k, v, slots, allowed)
        ctx.scaling, ctx.rows_per_entry = scaling, rows_per_entry
        ctx.set_materialize_grads(False)
        return out.view_as(out), lse.view_as(lse)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        out, lse, q, k, v, slots, allowed = ctx.saved_tensors
        far_grads = None
        if grad_out is not None and ctx.needs_input_grad[5]:
            index = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])  # (B, H, n, D)
            far_k, far_v = k.gather(2, index), v.gather(2, index)
            sums = far_key_gradients if q.is_cuda and slots.shape[-1] <= MAX_FAR_KEYS else far_key_gradients_reference
            far_grads = torch.stack(sums(q, far_k, far_v, out, grad_out, lse, grad_lse, allowed, ctx.scaling,
                                         ctx.rows_per_entry))
        return grad_out, grad_lse, None, None, None, far_grads, None, None, None, None


def far_key_gradients_reference(q, far_k, far_v, out, grad_out, lse, grad_lse, allowed, scaling, rows_per_entry=1
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """dk, dv (B, H, n, D) fp32 of the far keys far_k, far_v (B, H, n, D) from the ``allowed`` pairs, (B, 1|H, T, n)
    or one entry per ``rows_per_entry`` queries."""
    allowed = allowed.repeat_interleave(rows_per_entry, dim=2)[:, :, : q.shape[2]]
    q, grad_out = q.float(), grad_out.float()
    scores = torch.matmul(q, far_k.float().transpose(-1, -2)) * scaling  # (B, H, T, n)
    probs = torch.exp(scores - lse[..., None]).masked_fill(~allowed, 0.0)
    delta = (grad_out * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse
    grad_scores = probs * (torch.matmul(grad_out, far_v.float().transpose(-1, -2)) - delta[..., None])
    return torch.matmul(grad_scores.transpose(-1, -2), q) * scaling, torch.matmul(probs.transpose(-1, -2), grad_out)


def far_key_gradients(q, far_k, far_v, out, grad_out, lse, grad_lse, allowed, scaling, rows_per_entry=1
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``far_key_gradients_reference`` as one Triton pass over q, dout and out (CUDA, at most MAX_FAR_KEYS keys)."""
    batch, heads, q_len, dim = q.shape
    n_far = far_k.shape[2]
    key_tile = max(16, triton_next_power_of_2(n_far))  # tl.dot needs 16 rows
    query_tile = 128 if key_tile <= 32 else 64  # a (query_tile, key_tile) fp32 score tile stays in registers
    tiles = -(-q_len // query_tile)
    steps = max(1, tiles * batch * heads // PROGRAMS)  # query tiles per program
    chunks = -(-tiles // steps)
    partial = q.new_empty((2, batch * heads, chunks, key_tile, dim), dtype=torch.float32)
    has_grad_lse = grad_lse is not None
    grad_lse = grad_lse if has_grad_lse else lse  # any tensor: unread without HAS_GRAD_LSE
    allowed = allowed.expand(batch, -1, -1, -1)
    _far_key_gradient_tiles[(chunks, batch * heads)](
        q, grad_out, out, lse, grad_lse, allowed, far_k.contiguous(), far_v.contiguous(), partial,
        *q.stride(), *grad_out.stride(), *out.stride(), *lse.stride(), *grad_lse.stride(),
        allowed.stride(0), allowed.stride(1) if allowed.shape[1] > 1 else 0, allowed.stride(2), allowed.stride(3),
        heads, q_len, n_far, rows_per_entry,
        SCALE=scaling, DIM=dim, DIM_TILE=triton_next_power_of_2(dim), KEY_TILE=key_tile, QUERY_TILE=query_tile,
        STEPS=steps, HAS_GRAD_LSE=has_grad_lse, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4 if key_tile <= 32 else 8,
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
        heads, q_len, n_far, rows_per_entry,
        SCALE: tl.constexpr, DIM: tl.constexpr, DIM_TILE: tl.constexpr, KEY_TILE: tl.constexpr,
        QUERY_TILE: tl.constexpr, STEPS: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        chunk, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        cols = tl.arange(0, DIM_TILE)
        keys = tl.arange(0, KEY_TILE)
        far_at = bh * n_far * DIM + keys[:, None] * DIM + cols[None, :]  # far_k/far_v (B, H, n, D), contiguous
        far_ok = (keys[:, None] < n_far) & (cols[None, :] < DIM)
        fk = tl.load(FK + far_at, mask=far_ok, other=0.0)
        fv = tl.load(FV + far_at, mask=far_ok, other=0.0)
        dk = tl.zeros((KEY_TILE, DIM_TILE), dtype=tl.float32)
        dv = tl.zeros((KEY_TILE, DIM_TILE), dtype=tl.float32)
        for step in range(STEPS):
            rows = (chunk * STEPS + step) * QUERY_TILE + tl.arange(0, QUERY_TILE)
            row_ok = rows < q_len
            tile_ok = row_ok[:, None] & (cols[None, :] < DIM)
            q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + cols[None, :] * sqd, mask=tile_ok, other=0.0)
            do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdot + cols[None, :] * sdod, mask=tile_ok,
                         other=0.0)
            o = tl.load(O + b * sob + h * soh + rows[:, None] * sot + cols[None, :] * sod, mask=tile_ok, other=0.0)
            lse = tl.load(LSE + b * slb + h * slh + rows * slt, mask=row_ok, other=0.0)
            entries = rows // rows_per_entry
            allowed = tl.load(ALLOWED + b * sab + h * sah + entries[:, None] * sat + keys[None, :] * san,
                              mask=row_ok[:, None] & (keys[None, :] < n_far), other=0)
            scores = tl.dot(q, tl.trans(fk), input_precision=PRECISION) * SCALE  # (QUERY_TILE, KEY_TILE) fp32
            probs = tl.where(allowed != 0, tl.exp(scores - lse[:, None]), 0.0)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
            if HAS_GRAD_LSE:
                delta -= tl.load(DLSE + b * sgb + h * sgh + rows * sgt, mask=row_ok, other=0.0)
            grad_scores = probs * (tl.dot(do, tl.trans(fv), input_precision=PRECISION) - delta[:, None])
            dk += tl.dot(tl.trans(grad_scores.to(q.dtype)), q, input_precision=PRECISION) * SCALE
            dv += tl.dot(tl.trans(probs.to(do.dtype)), do, input_precision=PRECISION)
        at = (bh * tl.num_programs(0) + chunk) * KEY_TILE * DIM + keys[:, None] * DIM + cols[None, :]
        ok = cols[None, :] < DIM
        half = tl.num_programs(1) * tl.num_programs(0) * KEY_TILE * DIM
        tl.store(PARTIAL + at, dk, mask=ok)
        tl.store(PARTIAL + half + at, dv, mask=ok)
