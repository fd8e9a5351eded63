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

One more Triton launch adds the queries' far gradient ds·k·scale in place to flex's dq, and the far keys' sums to flex's
dk and dv at their slots; the sums reach it as placeholders' gradients, so nothing of size (B, H, T, D) is written
beyond the two passes.
``far_branch_reference`` and ``far_branch_backward_reference`` are the same sums in PyTorch: the CPU path and the
kernels' test oracle.
"""

from __future__ import annotations

from typing import Callable

import torch

from attnswap.kernels.sink_key_grads import triton_next_power_of_2

MAX_FAR_KEYS = 64  # the kernels' key tile at most; more far keys take the PyTorch path
PROGRAMS = 4096  # about how many programs the backward launches; each sums as many query tiles as that leaves it
QUERY_TILE = 64


def attend_with_far_branch(attend: Callable[..., tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor,
                           k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, allowed: torch.Tensor,
                           scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend(q, k, v)``: out (B, H, T, D) and lse (B, H, T) fp32 over the near pairs. Returns the attention over
    those and the far pairs ``allowed`` (B, 1 or H, T, n) between each query and the keys at ``slots`` (B, n), out and
    lse, with every gradient of the union."""
    fast = q.is_cuda and triton is not None and slots.shape[-1] <= MAX_FAR_KEYS
    q, k, v, score_placeholder, key_placeholder = _AddFarGradients.apply(q, k, v, slots, scaling, fast)
    out_near, lse_near = attend(q, k, v)
    return _MergeFarBranch.apply(out_near, lse_near, q, k, v, slots, allowed, score_placeholder, key_placeholder,
                                 scaling, fast)


class _AddFarGradients(torch.autograd.Function):
    """q, k, v unchanged, and two placeholders whose gradients, the far scores' ds (B, H, T, n) and the far keys'
    sums, are added in place to the gradients the near attention gives q (ds·k_far·scale) and k, v (at the slots).
    The sums travel as the placeholders' gradients, so autograd orders the two ends, and nothing of size (B, H, S, D)
    is made beside the near attention's own gradients."""

    @staticmethod
    def forward(ctx, q, k, v, slots, scaling, fast):
        ctx.save_for_backward(k, slots)
        ctx.scaling, ctx.fast = scaling, fast
        ctx.set_materialize_grads(False)
        batch, heads, q_len, dim = q.shape
        n_far = slots.shape[-1]
        sums = (2, batch * heads, _backward_grid(q_len, batch * heads)[0], n_far, dim) if fast \
            else (2, batch, heads, n_far, dim)
        # Placeholders are never read, only their gradients: empty, no fill.
        return (q.view_as(q), k.view_as(k), v.view_as(v), q.new_empty((batch, heads, q_len, n_far)),
                q.new_empty(sums, dtype=torch.float32))

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v, grad_scores, far_sums):
        k, slots = ctx.saved_tensors
        if grad_scores is None:
            return grad_q, grad_k, grad_v, None, None, None
        # The gradients the near attention's backward just made are autograd's alone; broadcast ones are copied, and
        # one that is None (its input needs none) is zeros, which autograd then drops.
        shapes = ((*grad_scores.shape[:3], k.shape[-1]), k.shape, k.shape)
        grad_q, grad_k, grad_v = (k.new_zeros(shape) if g is None else g if g.is_contiguous() else g.contiguous()
                                  for g, shape in zip((grad_q, grad_k, grad_v), shapes))
        (add_far_gradients if ctx.fast else add_far_gradients_reference)(
            grad_q, grad_k, grad_v, grad_scores, far_sums, k, slots, ctx.scaling)
        return grad_q, grad_k, grad_v, None, None, None


class _MergeFarBranch(torch.autograd.Function):
    """The near attention merged with the far pairs; the backward hands the near attention the union's gradient and
    the far pairs' to the placeholders."""

    @staticmethod
    def forward(ctx, out_near, lse_near, q, k, v, slots, allowed, score_placeholder, key_placeholder, scaling, fast):
        merge = far_branch if fast else far_branch_reference
        out, lse = merge(q, out_near, lse_near, k, v, slots, allowed, scaling)
        ctx.save_for_backward(q, k, v, slots, out_near, lse_near, lse, allowed)
        ctx.scaling, ctx.fast = scaling, fast
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, slots, out_near, lse_near, lse, allowed = ctx.saved_tensors
        if grad_out is None:  # only lse is used: out's gradient is zero
            grad_out = torch.zeros_like(out_near)
        backward = far_branch_backward if ctx.fast else far_branch_backward_reference
        grad_out_near, grad_lse_near, grad_scores, far_sums = backward(
            q, grad_out, grad_lse, out_near, lse_near, lse, k, v, slots, allowed, ctx.scaling)
        return (grad_out_near, grad_lse_near, None, None, None, None, None, grad_scores.to(q.dtype), far_sums,
                None, None)


# --- PyTorch: the CPU path and the kernels' oracle --------------------------------------------------------------
def _far_scores(q, far_k, scaling) -> torch.Tensor:
    """q·k·scale against the far keys, (B, H, T, n) fp32."""
    return torch.matmul(q.float(), far_k.float().transpose(-1, -2)) * scaling


def _far_probabilities(scores, allowed, lse) -> torch.Tensor:
    """exp(s - lse) on the allowed far pairs, 0 elsewhere and on rows with no key, (B, H, T, n) fp32."""
    finite = torch.isfinite(lse)[..., None]
    probs = torch.exp(scores - torch.where(finite, lse[..., None], 0.0))
    return torch.where(allowed & finite, probs, 0.0)


def _near_weight(lse_near, lse) -> torch.Tensor:
    finite = torch.isfinite(lse)
    return torch.where(finite, torch.exp(lse_near - torch.where(finite, lse, 0.0)), 0.0)


def far_rows(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x's rows at ``slots`` (B, n), zeros at a slot of -1 (none): (B, H, n, D)."""
    rows = x.gather(2, _slot_index(slots, x))
    return rows.masked_fill((slots < 0)[:, None, :, None], 0.0)


def _slot_index(slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return slots.clamp(min=0)[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1])


def far_branch_reference(q, out_near, lse_near, k, v, slots, allowed, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """Out (B, H, T, D) in q's dtype and lse (B, H, T) fp32 of the near attention merged with the far pairs."""
    scores = _far_scores(q, far_rows(k, slots), scaling)
    allowed_scores = scores.masked_fill(~allowed, float("-inf"))
    both = torch.cat((lse_near[..., None], allowed_scores.expand(*lse_near.shape, -1)), dim=-1)
    top = both.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    total = torch.exp(both - top).sum(-1)
    lse = torch.where(total > 0, top[..., 0] + torch.log(torch.where(total > 0, total, 1.0)), float("-inf"))
    out = _near_weight(lse_near, lse)[..., None] * out_near.float() + torch.matmul(
        _far_probabilities(scores, allowed, lse), far_rows(v, slots).float())
    return out.to(q.dtype), lse


def far_branch_backward_reference(q, grad_out, grad_lse, out_near, lse_near, lse, k, v, slots, allowed, scaling):
    """The gradients of far_branch_reference's out and lse: for the near attention's out and lse (what flex's
    backward takes), the far scores' ds (B, H, T, n) fp32, and the far keys' dk, dv stacked, (2, B, H, n, D) fp32."""
    far_k, far_v = far_rows(k, slots).float(), far_rows(v, slots).float()
    probs = _far_probabilities(_far_scores(q, far_k, scaling), allowed, lse)
    near = _near_weight(lse_near, lse)
    grad_out = grad_out.float()
    out = near[..., None] * out_near.float() + torch.matmul(probs, far_v)
    delta = (grad_out * out).sum(-1) - (0 if grad_lse is None else grad_lse)
    grad_scores = probs * (torch.matmul(grad_out, far_v.transpose(-1, -2)) - delta[..., None])
    grad_out_near = (near[..., None] * grad_out).to(out_near.dtype)
    grad_lse_near = near * ((grad_out * out_near.float()).sum(-1) - delta)
    grad_far_k = torch.matmul(grad_scores.transpose(-1, -2), q.float()) * scaling
    grad_far_v = torch.matmul(probs.transpose(-1, -2), grad_out)
    return grad_out_near, grad_lse_near, grad_scores, torch.stack((grad_far_k, grad_far_v))


def add_far_gradients_reference(grad_q, grad_k, grad_v, grad_scores, far_sums, k, slots, scaling) -> None:
    """Adds, in place, ds·k_far·scale to grad_q and the far keys' sums (2, B, H, n, D) to grad_k, grad_v at the
    slots."""
    grad_q += (torch.matmul(grad_scores.float(), far_rows(k, slots).float()) * scaling).to(grad_q.dtype)
    for grad, sums in zip((grad_k, grad_v), far_sums):  # a slot of -1 has no allowed pair: its sums are zeros
        grad.scatter_add_(2, _slot_index(slots, k), sums.to(grad.dtype))


# --- Triton -------------------------------------------------------------------------------------------------------
def _key_tile(n_far: int) -> int:
    return max(16, triton_next_power_of_2(n_far))  # tl.dot needs 16 rows


def _backward_grid(q_len: int, rows: int) -> tuple[int, int]:
    """(chunks of query tiles, query tiles per chunk) of the backward pass over ``rows`` = B·H sequences."""
    tiles = -(-q_len // QUERY_TILE)
    steps = max(1, tiles * rows // PROGRAMS)
    return -(-tiles // steps), steps


def _constants(q: torch.Tensor, n_far: int, scaling: float) -> dict:
    return dict(SCALE=scaling, DIM=q.shape[-1], DIM_TILE=triton_next_power_of_2(q.shape[-1]),
                KEY_TILE=_key_tile(n_far), PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _rows(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of a (B, H, T, ...) tensor along B, H, T; 0 along a broadcast head. The kernels read a row's last axis
    as contiguous."""
    assert t.dim() == 3 or t.stride(-1) == 1, "the far-branch kernels read rows as contiguous"
    return t.stride(0), t.stride(1) if t.shape[1] > 1 else 0, t.stride(2)


def _unit_stride(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def far_branch(q, out_near, lse_near, k, v, slots, allowed, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """``far_branch_reference`` as one Triton pass over q and out_near (CUDA, at most MAX_FAR_KEYS keys)."""
    batch, heads, q_len, _ = q.shape
    n_far = slots.shape[-1]
    q, out_near, k, v = _unit_stride(q, out_near, k, v)
    out = torch.empty_like(q)
    lse = q.new_empty((batch, heads, q_len), dtype=torch.float32)
    allowed = allowed.expand(batch, -1, -1, -1)
    _merge_far_tiles[(-(-q_len // QUERY_TILE), batch * heads)](
        q, out_near, lse_near, allowed, k, v, slots.contiguous(), out, lse,
        *_rows(q), *_rows(out_near), *_rows(lse_near), *_rows(allowed), *_rows(k), *_rows(v), *_rows(out),
        heads, q_len, n_far, QUERY_TILE=QUERY_TILE, **_constants(q, n_far, scaling), num_warps=4)
    return out, lse


def far_branch_backward(q, grad_out, grad_lse, out_near, lse_near, lse, k, v, slots, allowed, scaling):
    """``far_branch_backward_reference`` as one Triton pass over q, dout and out_near; ds comes in q's dtype, and the
    far keys' sums as per-program partials (2, B·H, chunks, n, D), which add_far_gradients sums."""
    batch, heads, q_len, dim = q.shape
    n_far = slots.shape[-1]
    q, grad_out, out_near, k, v = _unit_stride(q, grad_out, out_near, k, v)
    chunks, steps = _backward_grid(q_len, batch * heads)
    grad_out_near = torch.empty_like(out_near)
    grad_lse_near = lse.new_empty(lse.shape)
    grad_scores = q.new_empty((batch, heads, q_len, n_far))
    partial = q.new_empty((2, batch * heads, chunks, n_far, dim), dtype=torch.float32)
    has_grad_lse = grad_lse is not None
    grad_lse = grad_lse if has_grad_lse else lse  # any tensor: unread without HAS_GRAD_LSE
    allowed = allowed.expand(batch, -1, -1, -1)
    _far_backward_tiles[(chunks, batch * heads)](
        q, grad_out, grad_lse, out_near, lse_near, lse, allowed, k, v, slots.contiguous(),
        grad_out_near, grad_lse_near, grad_scores, partial,
        *_rows(q), *_rows(grad_out), *_rows(grad_lse), *_rows(out_near), *_rows(lse_near), *_rows(lse),
        *_rows(allowed), *_rows(k), *_rows(v), *_rows(grad_out_near), *_rows(grad_lse_near), *_rows(grad_scores),
        heads, q_len, n_far, QUERY_TILE=QUERY_TILE, STEPS=steps, HAS_GRAD_LSE=has_grad_lse,
        **_constants(q, n_far, scaling), num_warps=4)
    return grad_out_near, grad_lse_near, grad_scores, partial


def add_far_gradients(grad_q, grad_k, grad_v, grad_scores, partial, k, slots, scaling) -> None:
    """``add_far_gradients_reference`` from far_branch_backward's partials, in one Triton launch (each launch in a
    CUDA graph costs a few µs beside a 0.5 ms step): programs over grad_q's tiles add ds·k_far·scale, one program per
    far key and head sums its partials and adds them at its slot of grad_k and grad_v."""
    batch, heads, q_len, _ = grad_scores.shape
    n_far = slots.shape[-1]
    k, slots = _unit_stride(k)[0], slots.contiguous()
    query_tile = 128
    tiles = -(-q_len // query_tile)
    _add_far_gradient_tiles[(tiles + n_far, batch * heads)](
        grad_q, grad_k, grad_v, grad_scores, partial, k, slots,
        *_rows(grad_q), *_rows(grad_k), *_rows(grad_v), *_rows(grad_scores), *_rows(k),
        heads, q_len, n_far, tiles, partial.shape[2],
        QUERY_TILE=query_tile, CHUNK_TILE=128, **_constants(k, n_far, scaling), num_warps=8)


try:  # Triton comes with torch's CUDA builds; the CPU path does not need it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _far_tile(X, SLOTS, b, h, sxb, sxh, sxt, n_far, DIM: tl.constexpr, DIM_TILE: tl.constexpr,
                  KEY_TILE: tl.constexpr):
        """The (KEY_TILE, DIM_TILE) rows of x (B, H, S, D) at row b's slots, zeros past n_far and at a slot of -1."""
        keys = tl.arange(0, KEY_TILE)
        cols = tl.arange(0, DIM_TILE)
        slot = tl.load(SLOTS + b * n_far + keys, mask=keys < n_far, other=-1)
        ok = (slot[:, None] >= 0) & (cols[None, :] < DIM)
        return tl.load(X + b * sxb + h * sxh + slot[:, None] * sxt + cols[None, :], mask=ok, other=0.0)

    @triton.jit
    def _merge_far_tiles(
        Q, ON, LN, ALLOWED, K, V, SLOTS, OUT, LSE,
        sqb, sqh, sqt, sob, soh, sot, slb, slh, slt, sab, sah, sat, skb, skh, skt, svb, svh, svt, sub, suh, sut,
        heads, q_len, n_far,
        QUERY_TILE: tl.constexpr, SCALE: tl.constexpr, DIM: tl.constexpr, DIM_TILE: tl.constexpr,
        KEY_TILE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        tile, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        rows = tile * QUERY_TILE + tl.arange(0, QUERY_TILE)
        cols = tl.arange(0, DIM_TILE)
        keys = tl.arange(0, KEY_TILE)
        row_ok = rows < q_len
        tile_ok = row_ok[:, None] & (cols[None, :] < DIM)
        fk = _far_tile(K, SLOTS, b, h, skb, skh, skt, n_far, DIM, DIM_TILE, KEY_TILE)
        fv = _far_tile(V, SLOTS, b, h, svb, svh, svt, n_far, DIM, DIM_TILE, KEY_TILE)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + cols[None, :], mask=tile_ok, other=0.0)
        on = tl.load(ON + b * sob + h * soh + rows[:, None] * sot + cols[None, :], mask=tile_ok, other=0.0)
        lse_near = tl.load(LN + b * slb + h * slh + rows * slt, mask=row_ok, other=float("-inf"))
        allowed = tl.load(ALLOWED + b * sab + h * sah + rows[:, None] * sat + keys[None, :],
                          mask=row_ok[:, None] & (keys[None, :] < n_far), other=0)
        scores = tl.dot(q, tl.trans(fk), input_precision=PRECISION) * SCALE
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
        Q, DO, DLSE, ON, LN, LSE, ALLOWED, K, V, SLOTS, DON, DLN, DS, PARTIAL,
        sqb, sqh, sqt, sdb, sdh, sdt, sgb, sgh, sgt, sob, soh, sot, snb, snh, snt, slb, slh, slt, sab, sah, sat,
        skb, skh, skt, svb, svh, svt, swb, swh, swt, sxb, sxh, sxt, ssb, ssh, sst,
        heads, q_len, n_far,
        QUERY_TILE: tl.constexpr, STEPS: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, SCALE: tl.constexpr,
        DIM: tl.constexpr, DIM_TILE: tl.constexpr, KEY_TILE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        chunk, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        cols = tl.arange(0, DIM_TILE)
        keys = tl.arange(0, KEY_TILE)
        fk = _far_tile(K, SLOTS, b, h, skb, skh, skt, n_far, DIM, DIM_TILE, KEY_TILE)
        fv = _far_tile(V, SLOTS, b, h, svb, svh, svt, n_far, DIM, DIM_TILE, KEY_TILE)
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
            finite = lse != float("-inf")
            safe_lse = tl.where(finite, lse, 0.0)
            scores = tl.dot(q, tl.trans(fk), input_precision=PRECISION) * SCALE
            probs = tl.where((allowed != 0) & finite[:, None], tl.exp(scores - safe_lse[:, None]), 0.0)
            near = tl.where(finite, tl.exp(lse_near - safe_lse), 0.0)
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
            dk += tl.dot(tl.trans(grad_scores.to(q.dtype)), q, input_precision=PRECISION)
            dv += tl.dot(tl.trans(probs.to(do.dtype)), do, input_precision=PRECISION)
        at = (bh * tl.num_programs(0) + chunk) * n_far * DIM + keys[:, None] * DIM + cols[None, :]
        ok = (keys[:, None] < n_far) & (cols[None, :] < DIM)
        half = tl.num_programs(1) * tl.num_programs(0) * n_far * DIM
        tl.store(PARTIAL + at, dk * SCALE, mask=ok)
        tl.store(PARTIAL + half + at, dv, mask=ok)

    @triton.jit
    def _add_far_gradient_tiles(
        GQ, GK, GV, DS, PARTIAL, K, SLOTS, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, ssb, ssh, sst, sxb, sxh, sxt,
        heads, q_len, n_far, tiles, chunks,
        QUERY_TILE: tl.constexpr, CHUNK_TILE: tl.constexpr, SCALE: tl.constexpr,
        DIM: tl.constexpr, DIM_TILE: tl.constexpr, KEY_TILE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        task, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        cols = tl.arange(0, DIM_TILE)
        if task < tiles:  # a tile of queries: ds·k_far·scale
            rows = task * QUERY_TILE + tl.arange(0, QUERY_TILE)
            keys = tl.arange(0, KEY_TILE)
            row_ok = rows < q_len
            fk = _far_tile(K, SLOTS, b, h, sxb, sxh, sxt, n_far, DIM, DIM_TILE, KEY_TILE)
            ds = tl.load(DS + b * ssb + h * ssh + rows[:, None] * sst + keys[None, :],
                         mask=row_ok[:, None] & (keys[None, :] < n_far), other=0.0)
            at = GQ + b * sqb + h * sqh + rows[:, None] * sqt + cols[None, :]
            tile_ok = row_ok[:, None] & (cols[None, :] < DIM)
            grad = tl.load(at, mask=tile_ok, other=0.0).to(tl.float32)
            grad += tl.dot(ds.to(fk.dtype), fk, input_precision=PRECISION) * SCALE
            tl.store(at, grad.to(GQ.dtype.element_ty), mask=tile_ok)
        else:  # a far key: its partial sums (chunks, D) for k and v, added at its slot
            key = task - tiles
            # Slots are distinct or -1 (kernels/flex.py, build_far_branch_masks): no two programs store to one row.
            slot = tl.load(SLOTS + b * n_far + key)
            ok = (cols < DIM) & (slot >= 0)
            for half in tl.static_range(2):
                total = tl.zeros((DIM_TILE,), dtype=tl.float32)
                for start in range(0, chunks, CHUNK_TILE):
                    chunk = start + tl.arange(0, CHUNK_TILE)
                    offsets = (((half * tl.num_programs(1) + bh) * chunks + chunk[:, None]) * n_far + key) * DIM \
                        + cols[None, :]
                    total += tl.sum(tl.load(PARTIAL + offsets, mask=(chunk[:, None] < chunks) & (cols[None, :] < DIM),
                                            other=0.0), axis=0)
                if half == 0:
                    row = GK + b * skb + h * skh + slot * skt + cols
                else:
                    row = GV + b * svb + h * svh + slot * svt + cols
                tl.store(row, (tl.load(row, mask=ok, other=0.0).to(tl.float32) + total).to(GK.dtype.element_ty),
                         mask=ok)
