"""Causal linear attention in chunks: softmax(q·k) replaced by phi(q)·phi(k), never a T×S matrix.

With non-negative features phi, query i attends as
``out_i = sum_{j<=i} (phi_q_i·phi_k_j) v_j / sum_{j<=i} phi_q_i·phi_k_j``.
The sums are prefix sums, so the work is O(n·M·D): within a chunk of C positions a small causal C×C
product, across chunks a state sum phi_k_j v_j^T (M, D) and normaliser sum phi_k_j (M,).
A column of ones appended to v makes the same scan carry the normaliser.

The scan walks the sequence in segments of whole chunks and does each segment in a few batched
operations: every chunk's own state, a cumulative sum over the segment's chunks plus the state carried
in from earlier segments, then all chunks' outputs at once. So there are T/segment steps rather than
T/C, and the extra memory is O(segment·(M·D/C + C)) per batch and head, not O(T·M·D/C).
The backward pass is three more scans of the same kind (two of them reversed), so training memory is
the inputs plus one segment's work space, not one state per chunk. Everything accumulates in fp32.
Keys may come with a running log-scale (``key_log_scale``): states are then rescaled as they are carried,
the way online softmax rescales its running sums.

On CUDA, when the attention's inputs are bf16 or fp16 and fla-core is installed (the ``cuda`` extra), the
product runs instead on flash-linear-attention's chunked kernels (``chunk_simple_gla``, a key log-scale as its
log-gate), in fp32 with TF32 tensor-core products: their 10-bit mantissa is finer than the inputs' own. It replaced
a hand-written Triton scan (a one-off probe on the H200, not kept, timed fla at about half that scan's time at 64k;
the committed measurement is ``attnswap bench-kernel --config configs/experiments/bench_kernel_64k.yaml``). fp32
inputs keep the PyTorch scan and its fp32 products; so does ``pytorch_scan()``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from attnswap.kernels.fusion import fused

log = logging.getLogger(__name__)

# Floats of scan work space per (batch, head) and segment. Each chunk of a segment holds its own state
# and its running sum (2·M·E, E = D+1) and its causal block (C·C); those dominate. Every segment is a few
# dozen kernel launches, so fewer, larger segments trade a little memory for much less host work. 2**22
# (16 MiB fp32) gives Performer m=256 segments of 7,168 positions (3 at T=16384); against 2**20 it made a
# forward+backward call at 16k 3x faster on the H100 (58.9 -> 18.1 ms) for 6-15 % more peak memory at 32k
# (benchmarks/results/linear_scan_h100/segment_sizes.json).
_SEGMENT_FLOATS = 2**22
# Steps of the key log-scale between packed documents: exp(-200) underflows to 0 in fp32, so no weight crosses one.
DOCUMENT_GAP = 200.0


def _segment_length(chunk: int, m: int, e: int) -> int:
    """Positions per segment: the most whole chunks whose N·(2·M·E + C·C) fits in _SEGMENT_FLOATS, at least one."""
    return chunk * max(1, _SEGMENT_FLOATS // (2 * m * e + chunk * chunk))


def causal_linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, chunk: int = 64, segment: int | None = None,
    key_log_scale: torch.Tensor | None = None, return_normaliser: bool = False, documents: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention: phi_q (B, H, T, M), phi_k (B, H, S, M), v (B, H, S, D) -> (B, H, T, D) in v's dtype.

    Queries are the last T of the S key positions (T <= S; T = 1 is a decode step against S keys).
    Features must be non-negative. Padding is the caller's job: zero the phi_k rows of padded keys.
    A query whose normaliser is 0 (every visible key padded) outputs 0.
    ``segment`` (a multiple of ``chunk``) is how many positions the scan does per step; None sizes it
    to a fixed work space, see ``_segment_length``. Both shape the PyTorch scan only; fla chunks by its own 64.
    ``key_log_scale`` s (B, H, S), non-decreasing, says key j's features were divided by exp(s_j): the keys count
    as phi_k_j·exp(s_j). A feature map whose values span too wide a range for fp32 stabilises each key by the
    running maximum of what came before it this way, which keeps the attention causal (a maximum over all keys
    would let later keys change earlier outputs).
    ``return_normaliser`` also returns each query's normaliser sum_{j<=i} phi_q_i·phi_k_j, (B, H, T) fp32 (with
    ``key_log_scale``, divided by exp of the query's own slot's scale): the total weight the output averages over,
    which a hybrid needs to weigh this attention against another (kernels/merge.py). Gradients flow through it.
    ``documents`` (B, S), with T = S: sequences packed into rows, each slot's document index (non-decreasing); a
    query sees only its own document's keys. They enter as a key log-scale that steps by ``DOCUMENT_GAP`` at each
    new document, so exp(s_j - s_i) is exactly 0 in fp32 across documents and 1 within one; so they cannot join a
    feature map's own key log-scale (its precision would drown in the steps). They take the PyTorch scan: fla's
    gated kernels are not yet checked on such steps.
    """
    if documents is not None:
        assert key_log_scale is None, "packed documents take the key log-scale; a feature map's own cannot join them"
        assert phi_q.shape[-2] == phi_k.shape[-2] == documents.shape[-1], "documents need queries and keys in one row"
        key_log_scale = (documents.float() * DOCUMENT_GAP)[:, None, :].expand(*phi_k.shape[:-1])
    with torch.autocast(phi_q.device.type, enabled=False):  # fp32 sums and products, whatever autocast says
        return _causal_linear_attention(phi_q, phi_k, v, chunk, segment, key_log_scale, return_normaliser,
                                        use_fla=documents is None)


def _causal_linear_attention(phi_q, phi_k, v, chunk, segment, key_log_scale, return_normaliser, use_fla=True):
    q_len, kv_len = phi_q.shape[-2], phi_k.shape[-2]
    assert q_len <= kv_len, f"queries are the last T of S keys, got T={q_len} > S={kv_len}"
    assert chunk >= 1, f"chunk must be >= 1, got {chunk}"
    if segment is None:
        segment = _segment_length(chunk, phi_q.shape[-1], v.shape[-1] + 1)
    assert segment >= chunk and segment % chunk == 0, f"segment must be a multiple of chunk={chunk}, got {segment}"
    phi_q, phi_k = phi_q.float(), phi_k.float()
    prefix = kv_len - q_len  # keys every query sees: folded into one state up front
    log_scale = None if key_log_scale is None else key_log_scale.detach().float()
    keys, own_scale = phi_k[..., prefix:, :], None if log_scale is None else log_scale[..., prefix:]
    # With fla, the ones column costs a second, all but empty tile of values (fla tiles them by 32 or 64). A running
    # sum of the keys' features as the normaliser instead cost more than that tile: the compiler's cumsum took 2.4 ms
    # forward and 2.2 ms backward at 64k (H200, benchmarks/results/bench_kernel_64k_h200/0ce0b5d).
    fla = _fla_serving(phi_q, v) if use_fla else None
    if fla is not None and not prefix:  # training and prefill: all in fla's layout
        values = fused(_values_with_ones, v)(v.transpose(1, 2))  # (B, T, H, D+1)
        num_den = _fla_causal_product(fla, phi_q, keys, values, own_scale)
        out = fused(_normalised, v)(num_den, v.dtype).transpose(1, 2)
        return (out, num_den[..., -1].transpose(1, 2)) if return_normaliser else out
    v_ones = _values_with_ones(v[..., prefix:, :])  # (B, H, T, D+1)
    if fla is not None:
        num_den = _fla_causal_product(fla, phi_q, keys, v_ones.transpose(1, 2), own_scale).transpose(1, 2)
    else:
        num_den = _CausalProduct.apply(phi_q, keys, v_ones, chunk, segment, own_scale)
    num, den = num_den[..., :-1], num_den[..., -1:]
    if prefix:
        prefix_k, q_factor = phi_k[..., :prefix, :], 1.0
        if log_scale is not None:  # the prefix state at the scale of its last key, then to each query's own
            last = log_scale[..., prefix - 1 : prefix]
            prefix_k = prefix_k * torch.exp(log_scale[..., :prefix] - last).unsqueeze(-1)
            q_factor = torch.exp(last - log_scale[..., prefix:]).unsqueeze(-1)
        kv, z = linear_attention_state(prefix_k, v[..., :prefix, :])
        num = num + torch.matmul(phi_q, kv) * q_factor
        den = den + torch.matmul(phi_q, z.unsqueeze(-1)) * q_factor
    out = _normalise(num, den).to(v.dtype)
    return (out, den[..., 0]) if return_normaliser else out


def linear_attention_state(phi_k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrent state after S keys: phi_k (B, H, S, M), v (B, H, S, D) -> kv (B, H, M, D), z (B, H, M), fp32."""
    phi_k = phi_k.float()
    return torch.matmul(phi_k.transpose(-1, -2), v.float()), phi_k.sum(dim=-2)


def linear_attention_step(phi_q: torch.Tensor, kv: torch.Tensor, z: torch.Tensor,
                          return_normaliser: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Queries that see every key in a state: phi_q (B, H, 1, M), kv (B, H, M, D), z (B, H, M) -> (B, H, 1, D) fp32.

    Decoding keeps (kv, z) and adds phi_k v^T and phi_k of each new token before its step.
    ``return_normaliser`` also returns phi_q·z, (B, H, 1) fp32, as ``causal_linear_attention`` does.
    """
    phi_q = phi_q.float()
    den = torch.matmul(phi_q, z.unsqueeze(-1))
    out = _normalise(torch.matmul(phi_q, kv), den)
    return (out, den[..., 0]) if return_normaliser else out


def _values_with_ones(v: torch.Tensor) -> torch.Tensor:
    """v (…, D) -> [v, 1] (…, D+1) fp32, contiguous: the ones column carries the normaliser through the scan."""
    v = v.float()
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _normalised(num_den: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[num, den] (..., D+1) fp32 -> num / den (..., D) in ``dtype``, 0 where den is 0."""
    return _normalise(num_den[..., :-1], num_den[..., -1:]).to(dtype)


def _normalise(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num (..., T, D) / den (..., T, 1), 0 where den is 0; the guarded divisor keeps gradients free of NaN."""
    empty = den == 0
    return torch.where(empty, 0.0, num / torch.where(empty, 1.0, den))


def _causal_scan(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, chunk: int, segment: int,
                 log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """out_i = sum_{j<=i} (a_i·b_j) exp(s_j - s_i) c_j for a, b (B, H, T, M), c (B, H, T, E) -> (B, H, T, E).

    ``log_scale`` s (B, H, T) must not decrease along T; None means s = 0 (a plain prefix sum). A segment is
    N = segment/chunk chunks done together: chunk n sees the state carried in from earlier segments plus the
    states b_c^T c_c of chunks before it in the segment, and its own chunk causally. With s, every state is kept
    at the scale of its last position and every factor applied is exp(earlier s - later s) <= 1, so nothing
    overflows however far s climbs.
    """
    q_len = a.shape[-2]
    out = c.new_empty(*a.shape[:-1], c.shape[-1])
    state = c.new_zeros(*a.shape[:-2], 1, a.shape[-1], c.shape[-1])  # (B, H, 1, M, E): sum of b_j c_j^T so far
    state_scale = None if log_scale is None else log_scale[..., :1]  # (B, H, 1): the scale the state is kept at
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=a.device).triu(1)
    for start in range(0, q_len, segment):
        end = min(start + segment, q_len)
        a_s, b_s, c_s = (x[..., start:end, :] for x in (a, b, c))
        if pad := -(end - start) % chunk:
            # Only the last segment is ragged. In a causal scan no position sees the ones after it, so
            # padding at the end (of whichever sequence is scanned, reversed ones included) changes
            # nothing kept; zeros keep the discarded rows finite.
            a_s, b_s, c_s = (F.pad(x, (0, 0, 0, pad)) for x in (a_s, b_s, c_s))
        a_s, b_s, c_s = (x.unflatten(-2, (-1, chunk)) for x in (a_s, b_s, c_s))  # (B, H, N, C, ·)
        b_t = b_s.transpose(-1, -2)
        scores = torch.matmul(a_s, b_t)  # (B, H, N, C, C)
        if log_scale is None:
            # Running sums of [carried state, chunk states]: entry n is chunk n's incoming state, the last the outgoing.
            states = torch.cat([state, torch.matmul(b_t, c_s)], dim=-3).cumsum(dim=-3)  # (B, H, N+1, M, E)
            scores.masked_fill_(future, 0.0)
        else:
            s_s = F.pad(log_scale[..., start:end], (0, pad), mode="replicate") if pad else log_scale[..., start:end]
            s_c = s_s.unflatten(-1, (-1, chunk))  # (B, H, N, C)
            refs = torch.cat([state_scale, s_c[..., -1]], dim=-1)  # (B, H, N+1): scale of each incoming state
            own = torch.matmul(b_t * torch.exp(s_c - s_c[..., -1:]).unsqueeze(-2), c_s)  # chunk states, at their ends
            # Entry n of the running sums is at scale refs[n]: earlier entries k <= n enter times exp(refs[k] - refs[n]).
            states = torch.einsum("bhnk,bhkme->bhnme", _decay(refs), torch.cat([state, own], dim=-3))
            scores.mul_(_decay(s_c))
            a_s = a_s * torch.exp(refs[..., :-1, None] - s_c).unsqueeze(-1)  # to each query's own scale
            state_scale = refs[..., -1:]
        # baddbmm adds the earlier-chunks term onto the in-chunk term inside the product, saving a pass.
        out_s = torch.baddbmm(torch.matmul(scores, c_s).flatten(0, -3), a_s.flatten(0, -3),
                              states[..., :-1, :, :].flatten(0, -3))  # (B·H·N, C, E)
        out[..., start:end, :] = out_s.unflatten(0, a_s.shape[:-2]).flatten(-3, -2)[..., : end - start, :]
        state = states[..., -1:, :, :]
    return out


def _decay(s: torch.Tensor) -> torch.Tensor:
    """(..., L) non-decreasing -> (..., L, L) with [i, j] = exp(s_j - s_i) for j <= i and 0 above the diagonal.

    The exponent is masked before exp: above the diagonal it is positive and could overflow to inf (inf·0 = nan).
    """
    diff = s[..., None, :] - s[..., :, None]
    upper = torch.ones(diff.shape[-2:], dtype=torch.bool, device=s.device).triu(1)
    return torch.exp(diff.masked_fill(upper, float("-inf")))


class _CausalProduct(torch.autograd.Function):
    """``_causal_scan`` with a backward made of scans, saving only the inputs.

    With L = sum_{j<=i} (a_i·b_j) w_ij (g_i·c_j), w_ij = exp(s_j - s_i): dL/da_i = sum_{j<=i} w_ij (g_i·c_j) b_j is a
    forward scan; dL/db_j = sum_{i>=j} w_ij (c_j·g_i) a_i and dL/dc_j = sum_{i>=j} w_ij (b_j·a_i) g_i are scans of the
    reversed sequence, whose scale -s reversed again does not decrease. s is a constant: no gradient reaches it.
    """

    @staticmethod
    def forward(ctx, a, b, c, chunk, segment, log_scale=None):
        ctx.save_for_backward(a, b, c, log_scale)
        ctx.chunk, ctx.segment = chunk, segment
        return _causal_scan(a, b, c, chunk, segment, log_scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        a, b, c, log_scale = ctx.saved_tensors
        chunk, segment = ctx.chunk, ctx.segment
        a_r, b_r, c_r, grad_r = (x.flip(-2) for x in (a, b, c, grad))
        reversed_scale = None if log_scale is None else -log_scale.flip(-1)
        grad_a = _causal_scan(grad, c, b, chunk, segment, log_scale)
        grad_b = _causal_scan(c_r, grad_r, a_r, chunk, segment, reversed_scale).flip(-2)
        grad_c = _causal_scan(b_r, a_r, grad_r, chunk, segment, reversed_scale).flip(-2)
        return grad_a, grad_b, grad_c, None, None, None


# --- fla-core on CUDA --------------------------------------------------------------------------------

# exp(-200) is 0 in fp32, so a log-gate clamped here weighs every key as before; unclamped, a scale of
# finfo.min (Performer before its first real key) minus a real one is -inf once fla multiplies it by 1/ln 2,
# and differences of -inf are NaN.
_LOG_GATE_FLOOR = -200.0
_fla_enabled = True


@contextlib.contextmanager
def pytorch_scan():
    """The PyTorch scan wherever fla would serve: to compare them, and to count FLOPs (FlopCounterMode sees
    PyTorch operators, not the work inside fla's Triton kernels)."""
    global _fla_enabled
    previous, _fla_enabled = _fla_enabled, False
    try:
        yield
    finally:
        _fla_enabled = previous


def _fla_serving(phi_q: torch.Tensor, v: torch.Tensor) -> SimpleNamespace | None:
    """fla-core's ops where they serve: CUDA, bf16 or fp16 attention, fla-core installed and not switched off."""
    return _fla() if v.dtype in (torch.bfloat16, torch.float16) and phi_q.is_cuda else None


def _fla() -> SimpleNamespace | None:
    """fla-core's ops, or None where ``pytorch_scan()`` is on or fla-core is not installed."""
    return _import_fla() if _fla_enabled else None


@functools.cache
def _import_fla() -> SimpleNamespace | None:
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_chunk_simple_gla
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:
        log.warning("fla-core is not installed: causal linear attention runs its slower PyTorch scan on CUDA "
                    "(pip install 'attnswap[cuda]')")
        return None
    # fla refuses the gated backward of chunk_simple_gla under Triton 3.4-3.7.0 on Hopper, which computes it wrong
    # (fla-org/flash-linear-attention#640); fused_chunk_simple_gla's backward is another kernel.
    gated_backward_sound = not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)
    return SimpleNamespace(chunk=chunk_simple_gla, fused_chunk=fused_chunk_simple_gla,
                           gated_backward_sound=gated_backward_sound)


def _fla_causal_product(fla: SimpleNamespace, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                        log_scale: torch.Tensor | None) -> torch.Tensor:
    """``_CausalProduct`` on fla, in its layout: a, b (B, H, T, M), c (B, T, H, E) fp32, log_scale (B, H, T) or None
    -> (B, T, H, E). a and b are taken as (B, T, H, M) views: stored that way (Hedgehog's map), they need no copy.

    fla's simple GLA carries its state as h_t = exp(g_t)·h_{t-1} + b_t c_t^T, so query i weighs key j by
    exp(g_{j+1} + … + g_i): with g_t = s_{t-1} - s_t that is the scan's exp(s_j - s_i) (g_0 would scale an
    initial state; there is none). Where fla's chunked gated backward is unsound and a gradient is wanted, its
    fused-chunk op serves instead, which walks the sequence one chunk at a time: slower (Performer m=256 at 16k on
    the H200, forward+backward, 12.6 ms: benchmarks/results/bench_kernel_64k_h200).
    """
    log_gate, op = None, fla.chunk
    if log_scale is not None:
        log_gate = F.pad(log_scale[..., :-1] - log_scale[..., 1:], (1, 0)).clamp_min(_LOG_GATE_FLOOR)
        log_gate = log_gate.transpose(1, 2)  # (B, T, H)
        wants_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (a, b, c))
        if wants_grad and not fla.gated_backward_sound:
            op = fla.fused_chunk
    out, _ = op(a.transpose(1, 2), b.transpose(1, 2), c, g=log_gate, scale=1.0)
    return out
