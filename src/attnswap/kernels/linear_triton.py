"""The causal linear-attention scan as one fused Triton kernel: the running state stays on chip.

``_causal_scan`` in ``kernels/linear.py`` computes out_i = sum_{j<=i} (a_i·b_j) exp(s_j - s_i) c_j with batched
PyTorch operations, a few dozen kernel launches per segment that each write their intermediate (chunk states,
running sums, decay matrices) to memory and read it back. Here one program per (batch·head, block of a's features,
block of c's features) walks the sequence chunk by chunk and keeps its block of the state (BK × BV, fp32) in
registers: per chunk it loads a, b, c and s once, writes its output once, and launches nothing. The forward pass and
the three scans of the backward pass (``_CausalProduct``) all run on it.

A program sees only a block of a's and b's features, so its output is that block's share of the sum a_i·b_j; the
shares of the feature blocks are added afterwards. With a log-scale s, the state is kept at the scale of the last
position it has seen and every factor applied is exp(earlier s - later s) <= 1, as in the PyTorch scan.

On CUDA the kernel is compiled by Triton. On CPU it serves only in Triton's interpreter (``TRITON_INTERPRET=1`` set
before triton is imported; slow, for the tests).
"""

import contextlib
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships with CUDA builds of torch; the CPU suite installs it for the interpreter
    triton = tl = None

constexpr = tl.constexpr if tl is not None else None  # the kernel's compile-time parameters

BLOCK = 64  # features of a, b and c per program
_enabled = True


def serves(x: torch.Tensor, chunk: int) -> bool:
    """Whether the fused scan runs for tensors like ``x``: Triton importable, x on CUDA (or on the CPU under Triton's
    interpreter), and a chunk that tl.dot accepts (a power of two >= 16)."""
    if not _enabled or triton is None or chunk < 16 or chunk & (chunk - 1):
        return False
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


@contextlib.contextmanager
def unfused():
    """The PyTorch scan wherever the fused one would serve: to compare them, and to count FLOPs (FlopCounterMode
    sees PyTorch operators, not the work inside a Triton kernel)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def fused_causal_scan(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, chunk: int,
                      log_scale: "torch.Tensor | None" = None, precision: str = "tf32") -> torch.Tensor:
    """``_causal_scan`` fused: a, b (B, H, T, K), c (B, H, T, V) fp32, log_scale (B, H, T) or None -> (B, H, T, V).

    ``precision`` is tl.dot's input precision: "tf32" (tensor cores, 10-bit mantissa) or "ieee" (fp32 products: for
    tests; on the H100 Performer at 16k took 537 ms with it against 12 ms with TF32 and 18 ms with the PyTorch scan,
    benchmarks/results/linear_scan_h100/).
    """
    *lead, length, k_dim = a.shape
    v_dim = c.shape[-1]
    heads = math.prod(lead)
    a, b = (x.reshape(heads, length, k_dim).contiguous() for x in (a, b))
    c = c.reshape(heads, length, v_dim).contiguous()
    scale = a if log_scale is None else log_scale.reshape(heads, length).float().contiguous()  # a: an unused pointer
    block_k = max(16, min(BLOCK, triton.next_power_of_2(k_dim)))
    block_v = max(16, min(BLOCK, triton.next_power_of_2(v_dim)))
    k_blocks, v_blocks = triton.cdiv(k_dim, block_k), triton.cdiv(v_dim, block_v)
    shares = c.new_empty(k_blocks, heads, length, v_dim)
    _scan_kernel[(heads, k_blocks, v_blocks)](
        a, b, c, scale, shares, length, k_dim, v_dim, HAS_SCALE=log_scale is not None, CHUNK=chunk,
        BLOCK_K=block_k, BLOCK_V=block_v, PRECISION=precision)
    out = shares[0] if k_blocks == 1 else shares.sum(dim=0)
    return out.reshape(*lead, length, v_dim)


def _scan_kernel(A, B, C, S, OUT, length, k_dim, v_dim, HAS_SCALE: constexpr, CHUNK: constexpr,
                 BLOCK_K: constexpr, BLOCK_V: constexpr, PRECISION: constexpr):
    head, k_block, v_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows_in_chunk = tl.arange(0, CHUNK)
    cols_k = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    cols_v = v_block * BLOCK_V + tl.arange(0, BLOCK_V)
    a_ptr, b_ptr = A + head * length * k_dim, B + head * length * k_dim
    c_ptr = C + head * length * v_dim
    out_ptr = OUT + (k_block * tl.num_programs(0) + head) * length * v_dim
    causal = rows_in_chunk[:, None] >= rows_in_chunk[None, :]
    state = tl.zeros((BLOCK_K, BLOCK_V), dtype=tl.float32)
    if HAS_SCALE:
        state_scale = tl.load(S + head * length)
    start = 0
    while start < length:  # not range(): Triton's interpreter cannot index with a runtime bound under numpy >= 2.4
        rows = start + rows_in_chunk
        in_k = (rows[:, None] < length) & (cols_k[None, :] < k_dim)
        in_v = (rows[:, None] < length) & (cols_v[None, :] < v_dim)
        a = tl.load(a_ptr + rows[:, None] * k_dim + cols_k[None, :], mask=in_k, other=0.0)
        b = tl.load(b_ptr + rows[:, None] * k_dim + cols_k[None, :], mask=in_k, other=0.0)
        c = tl.load(c_ptr + rows[:, None] * v_dim + cols_v[None, :], mask=in_v, other=0.0)
        scores = tl.dot(a, tl.trans(b), input_precision=PRECISION)  # (CHUNK, CHUNK)
        if HAS_SCALE:
            # Rows past the end repeat the last scale, so the chunk's maximum is its last real position's.
            s = tl.load(S + head * length + tl.minimum(rows, length - 1))
            chunk_scale = tl.max(s, axis=0)
            scores = scores * tl.exp(tl.where(causal, s[None, :] - s[:, None], float("-inf")))
            a = a * tl.exp(state_scale - s)[:, None]  # the state's scale to each query's own
            b = b * tl.exp(s - chunk_scale)[:, None]  # each key to the scale the state moves to
            carry = tl.exp(state_scale - chunk_scale)
            state_scale = chunk_scale
        else:
            scores = tl.where(causal, scores, 0.0)
        out = tl.dot(scores, c, input_precision=PRECISION) + tl.dot(a, state, input_precision=PRECISION)
        tl.store(out_ptr + rows[:, None] * v_dim + cols_v[None, :], out, mask=in_v)
        if HAS_SCALE:
            state = state * carry
        state += tl.dot(tl.trans(b), c, input_precision=PRECISION)
        start += CHUNK


if triton is not None:
    _scan_kernel = triton.jit(_scan_kernel)
