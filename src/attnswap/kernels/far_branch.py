"""A few far-attended keys (sinks, global keys) as a branch of their own, merged with a pure-window FlexAttention.

In one block mask the sinks' key tile is live for every query tile: each query tile's forward and dQ loop runs one
more 128-wide tile for 4 keys, and flex's backward walks the sinks' column in one program per head. Here flex sees
the near mask alone (a pure window), and the far pairs (a far key and a query whose near mask leaves it out, at most
MAX_FAR_KEYS keys) are a second attention merged with it by log-sum-exp (kernels/merge.py's rule), both ends in one
Triton pass each:

- forward: out = a·out_w + Σ_j p_j v_j, lse = log(exp(lse_w) + Σ_j exp(s_j)), with s_j = q·k_j·scale,
  p_j = exp(s_j - lse) and a = exp(lse_w - lse);
- backward, as FlashAttention's with the union's normaliser: D = dout·out - dlse; the far scores' gradient
  ds_j = p_j (dout·v_j - D); flex gets dout_w = a·dout and dlse_w = a (dout·out_w - D), which turns its own gradient
  into the union's (its probabilities times a are the union's).

The queries' far gradient ds·k·scale is added in place to flex's (a GEMM of n columns), and the far keys' sums at their
slots (kernels/far_keys.py's placeholder), so nothing of size (B, H, T, D) is written beyond the two passes.
``far_branch_reference`` and ``far_branch_backward_reference`` are the same sums in PyTorch: the CPU path and the
kernels' test oracle.
"""

from __future__ import annotations

from typing import Callable

import torch

from attnswap.kernels.far_keys import AddAtFarSlots, triton_next_power_of_2

MAX_FAR_KEYS = 64  # the kernels' key tile at most; more far keys take the PyTorch path
PROGRAMS = 1024  # about how many programs the backward launches; each sums as many query tiles as that leaves it


def attend_with_far_branch(attend: Callable[..., tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor,
                           k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, allowed: torch.Tensor,
                           scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend(q, k, v)``: out (B, H, T, D) and lse (B, H, T) fp32 over the near pairs. Returns the attention over
    those and the far pairs ``allowed`` (B, 1 or H, T, n) between each query and the keys at ``slots`` (B, n), out and
    lse, with every gradient of the union."""
    index = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])  # (B, H, n, D)
    far_k, far_v = k.detach().gather(2, index), v.detach().gather(2, index)
    q, query_placeholder = _AddFarQueryGradient.apply(q, far_k, scaling)
    k, v, key_placeholder = AddAtFarSlots.apply(k, v, slots)
    out_near, lse_near = attend(q, k, v)
    return _MergeFarBranch.apply(out_near, lse_near, q, far_k, far_v, allowed, query_placeholder, key_placeholder,
                                 scaling)


class _AddFarQueryGradient(torch.autograd.Function):
    """q unchanged, and a placeholder whose gradient, the far scores' ds (B, H, T, n), adds ds·far_k·scale to q's."""

    @staticmethod
    def forward(ctx, q, far_k, scaling):
        ctx.save_for_backward(far_k)
        ctx.scaling = scaling
        ctx.set_materialize_grads(False)
        return q.view_as(q), q.new_zeros((*q.shape[:-1], far_k.shape[-2]))

    @staticmethod
    def backward(ctx, grad_q, grad_scores):
        (far_k,) = ctx.saved_tensors
        if grad_scores is None:
            return grad_q, None, None
        batch, heads, q_len, dim = far_k.shape[0], far_k.shape[1], grad_scores.shape[2], far_k.shape[-1]
        flat_scores, flat_k = grad_scores.reshape(batch * heads, q_len, -1), far_k.reshape(batch * heads, -1, dim)
        if grad_q is None:
            return torch.bmm(flat_scores, flat_k).view(batch, heads, q_len, dim) * ctx.scaling, None, None
        # The gradient flex's backward just made is autograd's alone; a broadcast one is copied first.
        grad_q = grad_q if grad_q.is_contiguous() else grad_q.contiguous()
        grad_q.view(batch * heads, q_len, dim).baddbmm_(flat_scores, flat_k, alpha=ctx.scaling)
        return grad_q, None, None


class _MergeFarBranch(torch.autograd.Function):
    """The near attention merged with the far pairs; the backward hands flex the union's gradient and the far pairs'
    to the two placeholders."""

    @staticmethod
    def forward(ctx, out_near, lse_near, q, far_k, far_v, allowed, query_placeholder, key_placeholder, scaling):
        fast = _kernels_serve(q, far_k)
        out, lse = (far_branch if fast else far_branch_reference)(q, out_near, lse_near, far_k, far_v, allowed,
                                                                 scaling)
        ctx.save_for_backward(q, out_near, lse_near, lse, far_k, far_v, allowed)
        ctx.scaling, ctx.fast = scaling, fast
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, out_near, lse_near, lse, far_k, far_v, allowed = ctx.saved_tensors
        if grad_out is None:  # only lse is used: out's gradient is zero
            grad_out = torch.zeros_like(out_near)
        backward = far_branch_backward if ctx.fast else far_branch_backward_reference
        grad_out_near, grad_lse_near, grad_scores, grad_far_k, grad_far_v = backward(
            q, grad_out, grad_lse, out_near, lse_near, lse, far_k, far_v, allowed, ctx.scaling)
        return (grad_out_near, grad_lse_near, None, None, None, None, grad_scores.to(q.dtype),
                torch.stack((grad_far_k, grad_far_v)), None)


def _kernels_serve(q: torch.Tensor, far_k: torch.Tensor) -> bool:
    return q.is_cuda and triton is not None and far_k.shape[-2] <= MAX_FAR_KEYS


# --- PyTorch: the CPU path and the kernels' oracle --------------------------------------------------------------
def _far_probabilities(q, far_k, allowed, lse, scaling) -> torch.Tensor:
    """exp(s - lse) on the allowed far pairs, 0 elsewhere and on rows with no key, (B, H, T, n) fp32."""
    scores = torch.matmul(q.float(), far_k.float().transpose(-1, -2)) * scaling
    finite = torch.isfinite(lse)[..., None]
    probs = torch.exp(scores - torch.where(finite, lse[..., None], 0.0))
    return torch.where(allowed & finite, probs, 0.0)


def _near_weight(lse_near, lse) -> torch.Tensor:
    finite = torch.isfinite(lse)
    return torch.where(finite, torch.exp(lse_near - torch.where(finite, lse, 0.0)), 0.0)


def far_branch_reference(q, out_near, lse_near, far_k, far_v, allowed, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """Out (B, H, T, D) in q's dtype and lse (B, H, T) fp32 of the near attention merged with the far pairs."""
    scores = (torch.matmul(q.float(), far_k.float().transpose(-1, -2)) * scaling).masked_fill(~allowed, float("-inf"))
    both = torch.cat((lse_near[..., None], scores.expand(*lse_near.shape, -1)), dim=-1)
    top = both.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    total = torch.exp(both - top).sum(-1)
    lse = torch.where(total > 0, top[..., 0] + torch.log(torch.where(total > 0, total, 1.0)), float("-inf"))
    out = _near_weight(lse_near, lse)[..., None] * out_near.float() + torch.matmul(
        _far_probabilities(q, far_k, allowed, lse, scaling), far_v.float())
    return out.to(q.dtype), lse


def far_branch_backward_reference(q, grad_out, grad_lse, out_near, lse_near, lse, far_k, far_v, allowed, scaling):
    """The gradients of far_branch_reference's out and lse: for the near attention's out and lse (what flex's
    backward takes), the far scores' ds (B, H, T, n) fp32, and the far keys' dk, dv (B, H, n, D) fp32."""
    probs = _far_probabilities(q, far_k, allowed, lse, scaling)
    near = _near_weight(lse_near, lse)
    grad_out = grad_out.float()
    out = near[..., None] * out_near.float() + torch.matmul(probs, far_v.float())
    delta = (grad_out * out).sum(-1) - (0 if grad_lse is None else grad_lse)
    grad_scores = probs * (torch.matmul(grad_out, far_v.float().transpose(-1, -2)) - delta[..., None])
    grad_out_near = (near[..., None] * grad_out).to(out_near.dtype)
    grad_lse_near = near * ((grad_out * out_near.float()).sum(-1) - delta)
    grad_far_k = torch.matmul(grad_scores.transpose(-1, -2), q.float()) * scaling
    grad_far_v = torch.matmul(probs.transpose(-1, -2), grad_out)
    return grad_out_near, grad_lse_near, grad_scores, grad_far_k, grad_far_v


# --- Triton -------------------------------------------------------------------------------------------------------
def _tiles(q, far_k) -> dict:
    key_tile = max(16, triton_next_power_of_2(far_k.shape[-2]))  # tl.dot needs 16 rows
    return dict(DIM=q.shape[-1], DIM_TILE=triton_next_power_of_2(q.shape[-1]), KEY_TILE=key_tile,
                QUERY_TILE=64 if key_tile <= 32 else 32, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _rows(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of a (B, H, T, ...) tensor along B, H, T; 0 along a broadcast head. The kernels read its last axis as
    contiguous."""
    assert t.dim() == 3 or t.stride(-1) == 1, "the far-branch kernels read rows as contiguous"
    return t.stride(0), t.stride(1) if t.shape[1] > 1 else 0, t.stride(2)


def _unit_stride(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def far_branch(q, out_near, lse_near, far_k, far_v, allowed, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """``far_branch_reference`` as one Triton pass over q and out_near (CUDA, at most MAX_FAR_KEYS keys)."""
    batch, heads, q_len, dim = q.shape
    q, out_near = _unit_stride(q, out_near)
    out = torch.empty_like(q)
    lse = q.new_empty((batch, heads, q_len), dtype=torch.float32)
    tiles = _tiles(q, far_k)
    allowed = allowed.expand(batch, -1, -1, -1)
    _merge_far_tiles[(-(-q_len // tiles["QUERY_TILE"]), batch * heads)](
        q, out_near, lse_near, allowed, far_k.contiguous(), far_v.contiguous(), out, lse,
        *_rows(q), *_rows(out_near), *_rows(lse_near), *_rows(allowed), *_rows(out),
        heads, q_len, far_k.shape[-2], scaling, **tiles, num_warps=4)
    return out, lse


def far_branch_backward(q, grad_out, grad_lse, out_near, lse_near, lse, far_k, far_v, allowed, scaling):
    """``far_branch_backward_reference`` as one Triton pass over q, dout and out_near, and a sum of its per-program
    partial dk, dv; ds comes in q's dtype."""
    batch, heads, q_len, dim = q.shape
    q, grad_out, out_near = _unit_stride(q, grad_out, out_near)
    n_far = far_k.shape[-2]
    tiles = _tiles(q, far_k)
    n_tiles = -(-q_len // tiles["QUERY_TILE"])
    steps = max(1, n_tiles * batch * heads // PROGRAMS)
    chunks = -(-n_tiles // steps)
    grad_out_near = torch.empty_like(out_near)
    grad_lse_near = lse.new_empty(lse.shape)
    grad_scores = q.new_empty((batch, heads, q_len, n_far))
    partial = q.new_empty((2, batch * heads, chunks, tiles["KEY_TILE"], dim), dtype=torch.float32)
    has_grad_lse = grad_lse is not None
    allowed = allowed.expand(batch, -1, -1, -1)
    _far_backward_tiles[(chunks, batch * heads)](
        q, grad_out, grad_lse if has_grad_lse else lse, out_near, lse_near, lse, allowed,
        far_k.contiguous(), far_v.contiguous(), grad_out_near, grad_lse_near, grad_scores, partial,
        *_rows(q), *_rows(grad_out), *_rows(grad_lse if has_grad_lse else lse), *_rows(out_near), *_rows(lse_near),
        *_rows(lse), *_rows(allowed), *_rows(grad_out_near), *_rows(grad_lse_near), *_rows(grad_scores),
        heads, q_len, n_far, scaling, STEPS=steps, HAS_GRAD_LSE=has_grad_lse, **tiles, num_warps=4)
    sums = partial.sum(dim=2)[:, :, :n_far].view(2, batch, heads, n_far, dim)
    return grad_out_near, grad_lse_near, grad_scores, sums[0], sums[1]


try:  # Triton comes with torch's CUDA builds; the CPU path does not need it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _far_scores(q, fk, lse, allowed, scaling, PRECISION: tl.constexpr):
        """The far probabilities exp(s - lse) of a (QUERY_TILE, KEY_TILE) tile, 0 where not allowed."""
        scores = tl.dot(q, tl.trans(fk), input_precision=PRECISION) * scaling
        finite = lse != float("-inf")
        probs = tl.exp(scores - tl.where(finite, lse, 0.0)[:, None])
        return tl.where((allowed != 0) & finite[:, None], probs, 0.0)

    @triton.jit
    def _merge_far_tiles(
        Q, ON, LN, ALLOWED, FK, FV, OUT, LSE,
        sqb, sqh, sqt, sob, soh, sot, slb, slh, slt, sab, sah, sat, sub, suh, sut,
        heads, q_len, n_far, scaling,
        DIM: tl.constexpr, DIM_TILE: tl.constexpr, KEY_TILE: tl.constexpr, QUERY_TILE: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        scaling = scaling.to(tl.float32)  # inductor hands a Python float over as fp64
        tile, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        rows = tile * QUERY_TILE + tl.arange(0, QUERY_TILE)
        cols = tl.arange(0, DIM_TILE)
        keys = tl.arange(0, KEY_TILE)
        row_ok = rows < q_len
        tile_ok = row_ok[:, None] & (cols[None, :] < DIM)
        far_at = bh * n_far * DIM + keys[:, None] * DIM + cols[None, :]  # far_k/far_v (B, H, n, D), contiguous
        far_ok = (keys[:, None] < n_far) & (cols[None, :] < DIM)
        fk = tl.load(FK + far_at, mask=far_ok, other=0.0)
        fv = tl.load(FV + far_at, mask=far_ok, other=0.0)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + cols[None, :], mask=tile_ok, other=0.0)
        on = tl.load(ON + b * sob + h * soh + rows[:, None] * sot + cols[None, :], mask=tile_ok, other=0.0)
        lse_near = tl.load(LN + b * slb + h * slh + rows * slt, mask=row_ok, other=float("-inf"))
        allowed = tl.load(ALLOWED + b * sab + h * sah + rows[:, None] * sat + keys[None, :],
                          mask=row_ok[:, None] & (keys[None, :] < n_far), other=0)
        scores = tl.dot(q, tl.trans(fk), input_precision=PRECISION) * scaling
        scores = tl.where(allowed != 0, scores, float("-inf"))
        top = tl.maximum(lse_near, tl.max(scores, axis=1))
        top = tl.where(top == float("-inf"), 0.0, top)
        near = tl.exp(lse_near - top)
        probs = tl.exp(scores - top[:, None])
        total = near + tl.sum(probs, axis=1)
        inverse = tl.where(total > 0, 1.0 / total, 0.0)
        out = (near * inverse)[:, None] * on.to(tl.float32) + tl.dot(
            (probs * inverse[:, None]).to(fv.dtype), fv, input_precision=PRECISION)
        lse = tl.where(total > 0, top + tl.log(total), float("-inf"))
        tl.store(OUT + b * sub + h * suh + rows[:, None] * sut + cols[None, :], out.to(OUT.dtype.element_ty),
                 mask=tile_ok)
        tl.store(LSE + (b * heads + h) * q_len + rows, lse, mask=row_ok)

    @triton.jit
    def _far_backward_tiles(
        Q, DO, DLSE, ON, LN, LSE, ALLOWED, FK, FV, DON, DLN, DS, PARTIAL,
        sqb, sqh, sqt, sdb, sdh, sdt, sgb, sgh, sgt, sob, soh, sot, snb, snh, snt, slb, slh, slt, sab, sah, sat,
        swb, swh, swt, sxb, sxh, sxt, ssb, ssh, sst,
        heads, q_len, n_far, scaling,
        DIM: tl.constexpr, DIM_TILE: tl.constexpr, KEY_TILE: tl.constexpr, QUERY_TILE: tl.constexpr,
        STEPS: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        scaling = scaling.to(tl.float32)  # inductor hands a Python float over as fp64
        chunk, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        cols = tl.arange(0, DIM_TILE)
        keys = tl.arange(0, KEY_TILE)
        far_at = bh * n_far * DIM + keys[:, None] * DIM + cols[None, :]
        far_ok = (keys[:, None] < n_far) & (cols[None, :] < DIM)
        fk = tl.load(FK + far_at, mask=far_ok, other=0.0)
        fv = tl.load(FV + far_at, mask=far_ok, other=0.0)
        dk = tl.zeros((KEY_TILE, DIM_TILE), dtype=tl.float32)
        dv = tl.zeros((KEY_TILE, DIM_TILE), dtype=tl.float32)
        for step in range(STEPS):
            rows = (chunk * STEPS + step) * QUERY_TILE + tl.arange(0, QUERY_TILE)
            row_ok = rows < q_len
            tile_ok = row_ok[:, None] & (cols[None, :] < DIM)
            pair_ok = row_ok[:, None] & (keys[None, :] < n_far)
            q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + cols[None, :], mask=tile_ok, other=0.0)
            do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdt + cols[None, :], mask=tile_ok, other=0.0)
            on = tl.load(ON + b * sob + h * soh + rows[:, None] * sot + cols[None, :], mask=tile_ok,
                         other=0.0).to(tl.float32)
            lse_near = tl.load(LN + b * snb + h * snh + rows * snt, mask=row_ok, other=float("-inf"))
            lse = tl.load(LSE + b * slb + h * slh + rows * slt, mask=row_ok, other=float("-inf"))
            allowed = tl.load(ALLOWED + b * sab + h * sah + rows[:, None] * sat + keys[None, :], mask=pair_ok,
                              other=0)
            probs = _far_scores(q, fk, lse, allowed, scaling, PRECISION)
            finite = lse != float("-inf")
            near = tl.where(finite, tl.exp(lse_near - tl.where(finite, lse, 0.0)), 0.0)
            do32 = do.to(tl.float32)
            out = near[:, None] * on + tl.dot(probs.to(fv.dtype), fv, input_precision=PRECISION)
            delta = tl.sum(do32 * out, axis=1)
            if HAS_GRAD_LSE:
                delta -= tl.load(DLSE + b * sgb + h * sgh + rows * sgt, mask=row_ok, other=0.0)
            grad_scores = probs * (tl.dot(do, tl.trans(fv), input_precision=PRECISION) - delta[:, None])
            tl.store(DON + b * swb + h * swh + rows[:, None] * swt + cols[None, :],
                     (near[:, None] * do32).to(DON.dtype.element_ty), mask=tile_ok)
            tl.store(DLN + b * sxb + h * sxh + rows * sxt, near * (tl.sum(do32 * on, axis=1) - delta), mask=row_ok)
            tl.store(DS + b * ssb + h * ssh + rows[:, None] * sst + keys[None, :],
                     grad_scores.to(DS.dtype.element_ty), mask=pair_ok)
            dk += tl.dot(tl.trans(grad_scores.to(q.dtype)), q, input_precision=PRECISION) * scaling
            dv += tl.dot(tl.trans(probs.to(do.dtype)), do, input_precision=PRECISION)
        at = (bh * tl.num_programs(0) + chunk) * KEY_TILE * DIM + keys[:, None] * DIM + cols[None, :]
        ok = cols[None, :] < DIM
        half = tl.num_programs(1) * tl.num_programs(0) * KEY_TILE * DIM
        tl.store(PARTIAL + at, dk, mask=ok)
        tl.store(PARTIAL + half + at, dv, mask=ok)
