"""Far keys (attention sinks, Longformer's global keys): the window and Longformer variants, whose far keys flex leaves
to a branch merged by log-sum-exp (kernels/sinks_branch.py), against the dense reference on CUDA; and the far pairs'
key and value sums of NSA's split sink tile (kernels/sink_key_grads.py) against the dense gradient, with the autograd
Functions that add them in place.
"""

from __future__ import annotations

import pytest
import torch

from attnswap.kernels import flex, sink_key_grads
from attnswap.kernels.sink_key_grads import far_key_gradients, far_key_gradients_reference
from attnswap.kernels.flex import build_block_mask
from attnswap.kernels.masks import materialize, to_index_mask
from attnswap.variants import AttnContext, get_variant
from attnswap.variants.window import sliding_window_mask
from tests.conftest import TOLERANCE, left_padded_keys, random_qkv

CUDA = torch.cuda.is_available()
# The CUDA tests take the far keys apart from this many queries (lengths of 2048-2500 keep the dense reference cheap), whatever the
# production threshold flex.FAR_KEYS_MIN_QUERIES.
FAR_FROM = 2048


def test_strided_global_tokens_are_not_few_far_keys():
    q, k, _ = random_qkv(1, 1, 64, 64, dim=16)
    ctx = AttnContext(scaling=0.25)
    assert get_variant("longformer:w=20,global_tokens=3,global_stride=16")._far_keys(q, k, ctx) is None
    assert get_variant("window:w=20")._far_keys(q, k, ctx) is None


@pytest.mark.parametrize("with_grad_lse", [False, True], ids=["out", "out_and_lse"])
def test_far_key_sums_equal_the_dense_gradient_on_those_pairs(with_grad_lse):
    batch, heads, q_len, kv_len, scaling = 2, 3, 40, 40, 0.3
    q, k, v = (x.requires_grad_() for x in random_qkv(batch, heads, q_len, kv_len, dim=8))
    allowed = torch.rand(batch, heads, q_len, kv_len, generator=torch.Generator().manual_seed(1)) < 0.6
    allowed |= torch.eye(q_len, kv_len, dtype=torch.bool)
    scores = (q @ k.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ v
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse) if with_grad_lse else None
    slots = torch.tensor([[0, 3, 7], [1, 2, 30]])
    far_allowed = torch.stack([allowed[b][:, :, slots[b]] for b in range(batch)])
    far_allowed[:, :, :5] = False  # a far key's nearby queries are left to the walks

    # The dense gradient of the same loss, restricted to the far pairs by a mask on the scores' gradient.
    keep = torch.zeros_like(allowed)
    for b in range(batch):
        keep[b][:, :, slots[b]] = far_allowed[b]
    scores_leaf = scores.detach().requires_grad_()
    probs = torch.softmax(scores_leaf, dim=-1)
    loss = ((probs @ v.detach()) * grad_out).sum()
    if grad_lse is not None:
        loss = loss + (torch.logsumexp(scores_leaf, dim=-1) * grad_lse).sum()
    (grad_scores,) = torch.autograd.grad(loss, scores_leaf)
    grad_scores = grad_scores.masked_fill(~keep, 0.0).nan_to_num()
    want_dk = grad_scores.transpose(-1, -2) @ q.detach() * scaling
    want_dv = (probs.detach().masked_fill(~keep, 0.0)).transpose(-1, -2) @ grad_out

    index = slots[:, None, :, None].expand(-1, heads, -1, 8)
    dk, dv = far_key_gradients_reference(q.detach(), k.detach().gather(2, index), v.detach().gather(2, index),
                                         out.detach(), grad_out, lse.detach(), grad_lse, far_allowed, scaling)
    torch.testing.assert_close(dk, want_dk.gather(2, index), rtol=0, atol=1e-5)
    torch.testing.assert_close(dv, want_dv.gather(2, index), rtol=0, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_flex_log_sum_exp_is_the_natural_one():
    q, k, v = (x.cuda() for x in random_qkv(1, 2, 512, 512, dim=64))
    index_mask = to_index_mask(sliding_window_mask(100, 4, torch.zeros(1, dtype=torch.long, device="cuda")), 0, 0,
                               None)
    block_mask = build_block_mask(index_mask, None, None, 512, 512, "cuda")
    _, lse = flex.flex_masked_attention(q, k, v, block_mask, 0.125, return_lse=True)
    allowed = materialize(index_mask, 1, 1, 512, 512, "cuda")
    want = torch.logsumexp((q @ k.transpose(-1, -2) * 0.125).masked_fill(~allowed, float("-inf")), dim=-1)
    torch.testing.assert_close(lse, want, rtol=0, atol=1e-4)


def _window_case(dtype, q_len, pads, device, spec="window:w=256,sinks=4"):
    variant = get_variant(spec)
    batch = len(pads)
    q, k, v = (x.to(device).requires_grad_() for x in random_qkv(batch, 4, q_len, q_len, dim=64, dtype=dtype))
    key_valid = left_padded_keys(batch, q_len, pads)
    ctx = AttnContext(scaling=0.125, key_valid=key_valid.to(device) if any(pads) else None)
    return variant, q, k, v, ctx


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_far, rows_per_entry, programs", [(5, 1, 1024), (100, 64, 1024), (4, 1, 3)],
                         ids=["sinks", "nsa_tile", "several_tiles_per_program"])
def test_far_key_kernel_matches_the_reference_on_cuda(dtype, n_far, rows_per_entry, programs, monkeypatch):
    monkeypatch.setattr(sink_key_grads, "PROGRAMS", programs)
    batch, heads, q_len, dim = 2, 3, 1000, 64
    q, k, v = (x.cuda() for x in random_qkv(batch, heads, q_len, n_far, dim=dim, dtype=dtype))
    out, grad_out = (x.cuda() for x in random_qkv(batch, heads, q_len, q_len, dim=dim, dtype=dtype, seed=1)[:2])
    lse = torch.randn(batch, heads, q_len, device="cuda") + 3
    grad_lse = torch.randn(batch, heads, q_len, device="cuda")
    allowed = torch.rand(batch, 1, -(-q_len // rows_per_entry), n_far, device="cuda") < 0.7
    for g in (None, grad_lse):
        got = far_key_gradients(q, k, v, out, grad_out, lse, g, allowed, 0.125, rows_per_entry)
        want = far_key_gradients_reference(q, k, v, out, grad_out, lse, g, allowed, 0.125, rows_per_entry)
        for got_part, want_part in zip(got, want):
            scale = want_part.abs().max()
            torch.testing.assert_close(got_part / scale, want_part / scale, rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pads", [[0], [300, 0]], ids=["whole", "left_padded"])
@pytest.mark.parametrize("spec", ["window:w=256,sinks=4", "longformer:w=256,global_tokens=4"],
                         ids=["window", "longformer"])
def test_far_keys_on_flex_match_the_reference(dtype, pads, spec, monkeypatch):
    monkeypatch.setattr(flex, "FAR_KEYS_MIN_QUERIES", FAR_FROM)
    q_len = 2500
    variant, q, k, v, ctx = _window_case(dtype, q_len, pads, "cuda", spec)
    assert variant._far_keys(q, k, ctx) is not None
    fast = variant.attend(q, k, v, ctx, None)
    grads_fast = torch.autograd.grad(fast.float().square().sum(), (q, k, v))
    ref = variant.reference(q, k, v, ctx, None)
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(fast.float(), ref, rtol=0, atol=TOLERANCE[dtype])
    sink = torch.zeros(q_len, dtype=torch.bool)
    for pad in pads:
        sink[pad : pad + 4] = True
    for name, got, want in zip("qkv", grads_fast, grads_ref):
        scale = want.abs().max()
        for rows, where in ((sink, "sink slots"), (~sink, "other slots")):
            torch.testing.assert_close(got.float()[:, :, rows] / scale, want.float()[:, :, rows] / scale, rtol=0,
                                       atol=TOLERANCE[dtype], msg=lambda m, n=name, w=where: f"d{n} at {w}: {m}")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_far_keys_compile_whole_and_equal_eager(monkeypatch):
    monkeypatch.setattr(flex, "FAR_KEYS_MIN_QUERIES", FAR_FROM)
    variant, q, k, v, ctx = _window_case(torch.bfloat16, FAR_FROM, [0], "cuda")

    def loss(q, k, v):
        return variant.attend(q, k, v, ctx, None).float().square().sum()

    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v), (q, k, v))
    for name, got, want in zip("qkv", compiled, eager):
        scale = want.float().abs().max()
        torch.testing.assert_close(got.float() / scale, want.float() / scale, rtol=0, atol=2e-2, msg=name)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager_fullgraph"])
@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "out_and_lse"])
def test_far_gradients_reach_the_keys_through_autograd_on_cpu(with_lse, compiled):
    """with_far_key_gradients around an attention whose backward skips the far pairs (dense here: those pairs' scores
    see k and v detached) gives k and v the whole dense gradient, added in place to the attention's own."""
    batch, heads, q_len, scaling = 2, 3, 30, 0.3
    q, k, v = random_qkv(batch, heads, q_len, q_len, dim=8, requires_grad=True)
    allowed = torch.ones(q_len, q_len).tril().bool()
    slots = torch.tensor([[0, 1], [2, 5]])
    far_pairs = torch.zeros(batch, 1, q_len, q_len, dtype=torch.bool)
    for b in range(batch):
        far_pairs[b, 0, 10:, slots[b]] = True
    far_allowed = torch.stack([far_pairs[b][..., slots[b]] for b in range(batch)])  # (B, 1, T, n)

    def dense(k, v, skip_far: bool):
        scores = q @ k.transpose(-1, -2) * scaling
        if skip_far:
            scores = torch.where(far_pairs, q @ k.detach().transpose(-1, -2) * scaling, scores)
        scores = scores.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[..., None])
        if not skip_far:
            return probs @ v, lse
        return probs.masked_fill(far_pairs, 0) @ v + probs.masked_fill(~far_pairs, 0) @ v.detach(), lse

    loss = lambda o, l: o.square().sum() + (l.sin().sum() if with_lse else 0)  # noqa: E731

    def split_loss(q, k, v):
        return loss(*sink_key_grads.with_far_key_gradients(lambda k, v: dense(k, v, True), q, k, v, slots, far_allowed,
                                                     scaling))

    if compiled:  # dynamo and AOTAutograd over both autograd Functions, the in-place add included
        split_loss = torch.compile(split_loss, backend="aot_eager", fullgraph=True)
    want_out, want_lse = dense(k, v, False)
    got = torch.autograd.grad(split_loss(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(want_out, want_lse), (q, k, v))
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")
