"""kernels/linear.py: the chunked causal linear attention against a naive materialising reference."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import TOLERANCE
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from attnswap.kernels.linear import (
    _CausalProduct,
    causal_linear_attention,
    linear_attention_state,
    linear_attention_step,
)


def naive_linear_attention(phi_q, phi_k, v, dtype=torch.float32):
    """The T×S weights phi_q·phi_k, causally masked (queries = last T keys), rows normalised; in ``dtype``.

    A row with nothing visible is the constant 0, so no gradient flows through it.
    """
    q_len, kv_len = phi_q.shape[-2], phi_k.shape[-2]
    weights = torch.matmul(phi_q.to(dtype), phi_k.to(dtype).transpose(-1, -2))  # (B, H, T, S)
    visible = torch.ones(q_len, kv_len, dtype=torch.bool).tril(diagonal=kv_len - q_len)
    weights = weights * visible
    total = weights.sum(dim=-1, keepdim=True)
    empty = total == 0
    return torch.where(empty, 0.0, torch.matmul(weights, v.to(dtype)) / torch.where(empty, 1.0, total))


def random_features(batch, heads, q_len, kv_len, m, dim, dtype, seed=0, pad=0):
    """Positive phi_q (B, H, T, M), phi_k (B, H, S, M), v (B, H, S, D); batch row 0 has its first `pad` keys padded."""
    g = torch.Generator().manual_seed(seed)
    phi_q = torch.randn(batch, heads, q_len, m, generator=g).mul(0.5).exp()
    phi_k = torch.randn(batch, heads, kv_len, m, generator=g).mul(0.5).exp()
    phi_k[0, :, :pad] = 0.0
    v = torch.randn(batch, heads, kv_len, dim, generator=g)
    return tuple(x.to(dtype).requires_grad_(True) for x in (phi_q, phi_k, v))


CASES = {
    # name: (batch, heads, q_len, kv_len, m, dim, chunk, pad)
    "T37_chunk16": (2, 3, 37, 37, 8, 5, 16, 0),
    "T_lt_S": (2, 2, 19, 45, 6, 4, 8, 0),
    "decode_T1": (3, 2, 1, 30, 6, 4, 8, 0),
    "chunk_gt_T": (2, 2, 11, 11, 6, 4, 64, 0),
    "chunk1": (2, 2, 9, 13, 6, 4, 1, 0),
    "padded_keys": (2, 3, 29, 29, 7, 6, 8, 5),
    "padded_T_lt_S": (2, 3, 17, 29, 7, 6, 8, 15),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_chunked_linear_attention_matches_naive(case, dtype):
    batch, heads, q_len, kv_len, m, dim, chunk, pad = case
    inputs = random_features(batch, heads, q_len, kv_len, m, dim, dtype, pad=pad)
    out = causal_linear_attention(*inputs, chunk=chunk)
    want = naive_linear_attention(*inputs)
    assert out.dtype == dtype and out.shape == (batch, heads, q_len, dim)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=0, msg=lambda m: f"out: {m}")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.autograd.grad(out, inputs, grad_out)
    expected = torch.autograd.grad(want, inputs, grad_out.float())
    for name, g, e in zip(("dphi_q", "dphi_k", "dv"), got, expected):
        torch.testing.assert_close(g.float(), e.float(), atol=tol, rtol=0, msg=lambda m: f"{name}: {m}")


def test_all_padding_rows_output_zeros_not_nan():
    phi_q, phi_k, v = random_features(2, 2, 21, 21, 6, 4, torch.float32, pad=9)
    out = causal_linear_attention(phi_q, phi_k, v, chunk=8)
    assert torch.equal(out[0, :, :9], torch.zeros_like(out[0, :, :9])), "queries that see only padding must output 0"
    assert out[0, :, 9:].abs().sum() > 0 and out[1].abs().sum() > 0
    out.square().sum().backward()
    for name, x in zip(("phi_q", "phi_k", "v"), (phi_q, phi_k, v)):
        assert torch.isfinite(x.grad).all(), f"{name}.grad has NaN/inf"


def test_state_step_equals_last_row_of_full_computation():
    phi_q, phi_k, v = (x.detach() for x in random_features(2, 3, 25, 25, 7, 5, torch.float32, pad=4))
    full = causal_linear_attention(phi_q, phi_k, v, chunk=8)
    kv, z = linear_attention_state(phi_k, v)
    assert kv.shape == (2, 3, 7, 5) and z.shape == (2, 3, 7)
    step = linear_attention_step(phi_q[..., -1:, :], kv, z)
    torch.testing.assert_close(step, full[..., -1:, :], atol=TOLERANCE[torch.float32], rtol=0)
    # Decoding token by token: the state after t keys answers query t.
    kv, z = linear_attention_state(phi_k[..., :11, :], v[..., :11, :])
    torch.testing.assert_close(linear_attention_step(phi_q[..., 10:11, :], kv, z), full[..., 10:11, :],
                               atol=TOLERANCE[torch.float32], rtol=0)


def assert_close_to_scale(got, want, tol, name):
    """|got - want| <= tol · max|want|: fp32 sums of many terms are only accurate relative to their scale."""
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * want.abs().max().item(),
                               msg=lambda m: f"{name}: {m}")


SCAN_CASES = {
    # name: (batch, heads, length, m, e, chunk, segment)
    "ragged_5_segments": (2, 3, 203, 8, 5, 16, 48),
    "segment_is_chunk": (2, 2, 100, 6, 7, 8, 8),
    "whole_segments": (3, 1, 96, 5, 4, 16, 48),
    "shorter_than_chunk": (2, 2, 5, 4, 3, 16, 32),
    "chunk1": (2, 2, 23, 4, 3, 1, 4),
}


@pytest.mark.parametrize("case", SCAN_CASES.values(), ids=SCAN_CASES.keys())
def test_segmented_scan_matches_dense_float64(case):
    """The raw scan on signed inputs, forward and all three gradients, against tril(a b^T) c in float64.

    Lengths that are not whole chunks or segments put padding at the end of the forward scan and, through the
    reversed scans of the backward pass, at what is the start of the sequence.
    """
    batch, heads, length, m, e, chunk, segment = case
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(batch, heads, length, m, generator=g) for _ in range(2))
    c = torch.randn(batch, heads, length, e, generator=g)
    grad_out = torch.randn(batch, heads, length, e, generator=g)
    inputs = tuple(x.requires_grad_(True) for x in (a, b, c))
    reference = tuple(x.detach().double().requires_grad_(True) for x in (a, b, c))
    out = _CausalProduct.apply(*inputs, chunk, segment)
    ra, rb, rc = reference
    want = torch.matmul(torch.matmul(ra, rb.transpose(-1, -2)).tril(), rc)
    assert_close_to_scale(out, want, 2e-6, "out")
    got = torch.autograd.grad(out, inputs, grad_out)
    expected = torch.autograd.grad(want, reference, grad_out.double())
    for name, gr, ex in zip(("da", "db", "dc"), got, expected):
        assert_close_to_scale(gr, ex, 2e-6, name)


MULTI_SEGMENT_CASES = {
    # name: (batch, heads, q_len, kv_len, m, dim, chunk, segment, pad)
    "ragged_segments": (2, 3, 203, 203, 8, 5, 16, 48, 0),
    "prefix_keys": (2, 2, 150, 181, 6, 4, 8, 24, 0),
    "padded_prefix_keys": (2, 2, 77, 100, 6, 4, 8, 16, 30),
}


@pytest.mark.parametrize("case", MULTI_SEGMENT_CASES.values(), ids=MULTI_SEGMENT_CASES.keys())
def test_multi_segment_attention_matches_naive_float64(case):
    batch, heads, q_len, kv_len, m, dim, chunk, segment, pad = case
    inputs = random_features(batch, heads, q_len, kv_len, m, dim, torch.float32, pad=pad)
    reference = tuple(x.detach().double().requires_grad_(True) for x in inputs)
    out = causal_linear_attention(*inputs, chunk=chunk, segment=segment)
    want = naive_linear_attention(*reference, dtype=torch.float64)
    assert_close_to_scale(out, want, 2e-6, "out")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, inputs, grad_out)
    expected = torch.autograd.grad(want, reference, grad_out.double())
    for name, gr, ex in zip(("dphi_q", "dphi_k", "dv"), got, expected):
        assert_close_to_scale(gr, ex, 2e-6, name)


def test_segment_must_be_whole_chunks():
    with pytest.raises(AssertionError, match="multiple of chunk"):
        causal_linear_attention(*random_features(1, 1, 10, 10, 4, 3, torch.float32), chunk=8, segment=12)


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op returns, backward ops included."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [x.numel() for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


@pytest.mark.parametrize("segment", [None, 256], ids=["default_segment", "segment256"])
def test_no_tensor_of_t_by_t_elements(segment):
    q_len = 2048
    inputs = random_features(1, 2, q_len, q_len, 16, 8, torch.float32)
    with LargestTensor() as dense:
        naive_linear_attention(*inputs)
    assert dense.largest >= q_len * q_len, "the guard must see a dense product"
    with LargestTensor() as scan:
        out = causal_linear_attention(*inputs, chunk=64, segment=segment)
        torch.autograd.grad(out.square().sum(), inputs)
    assert scan.largest < q_len * q_len // 8, f"largest tensor {scan.largest} elements at T={q_len}"


@pytest.mark.parametrize("q_len, kv_len, segment", [(53, 53, 16), (53, 53, 56), (37, 61, 16)])
def test_key_log_scale_is_a_running_rescale_not_a_change_of_weights(q_len, kv_len, segment):
    """Keys given as phi_k_j with a non-decreasing log-scale s_j count as phi_k_j·exp(s_j): the kernel, which keeps
    every factor <= 1, equals the unscaled computation done in float64 (to the kernel's fp32 precision), outputs and
    gradients, across segments and with keys before the queries. The scale climbs 400 nats, far past what exp holds."""
    g = torch.Generator().manual_seed(5)
    phi_q, phi_k, v = (torch.rand(2, 3, n, d, generator=g, dtype=torch.float64, requires_grad=True)
                       for n, d in ((q_len, 6), (kv_len, 6), (kv_len, 4)))
    log_scale = torch.cumsum(torch.rand(2, 3, kv_len, generator=g, dtype=torch.float64) * 400 / kv_len, dim=-1)
    out = causal_linear_attention(phi_q, phi_k, v, chunk=8, segment=segment, key_log_scale=log_scale)
    # The reference in log space: weights exp(log(phi_q·phi_k_j) + s_j), normalised per query.
    logits = torch.log(phi_q @ phi_k.transpose(-1, -2)) + log_scale[..., None, :]
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    ref = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1) @ v
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(out, (phi_q, phi_k, v), grad),
                         torch.autograd.grad(ref, (phi_q, phi_k, v), grad)):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("segment", [8, 32], ids=["segments_of_one_chunk", "one_segment"])
def test_packed_documents_equal_each_document_alone(segment):
    """Documents across chunk and segment boundaries, one of them shorter than a chunk: outputs, normalisers and
    gradients equal running each document on its own (to fp32 rounding: the scan sums in fp32)."""
    lengths = [11, 3, 18]
    g = torch.Generator().manual_seed(7)
    phi_q, phi_k = (torch.rand(2, 3, 32, 5, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 3, 32, 4, generator=g, requires_grad=True)
    documents = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)).expand(2, -1)
    packed, normaliser = causal_linear_attention(phi_q, phi_k, v, chunk=8, segment=segment, documents=documents,
                                                 return_normaliser=True)
    parts, start = [], 0
    for n in lengths:
        part = slice(start, start + n)
        parts.append(causal_linear_attention(phi_q[..., part, :], phi_k[..., part, :], v[..., part, :], chunk=8,
                                             return_normaliser=True))
        start += n
    torch.testing.assert_close(packed, torch.cat([p[0] for p in parts], dim=-2))
    torch.testing.assert_close(normaliser, torch.cat([p[1] for p in parts], dim=-1))
    weights = torch.randn(packed.shape, generator=g)
    for name, got, want in zip(("dphi_q", "dphi_k", "dv"),
                               torch.autograd.grad((packed * weights).sum(), (phi_q, phi_k, v)),
                               torch.autograd.grad((torch.cat([p[0] for p in parts], dim=-2) * weights).sum(),
                                                   (phi_q, phi_k, v))):
        torch.testing.assert_close(got, want, msg=name)
