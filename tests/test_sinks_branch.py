"""Far keys (attention sinks, global keys) as a branch merged with the near attention by log-sum-exp
(kernels/sinks_branch.py), against dense attention over the whole mask.

On the CPU the branch runs its PyTorch sums around a dense near attention; on CUDA its Triton passes are checked
against those sums, and the window and Longformer variants (flex over the near mask) against the dense reference in
tests/test_sink_key_grads.py.
"""

from __future__ import annotations

import pytest
import torch

from attnswap.kernels import sinks_branch
from attnswap.kernels.sinks_branch import (attend_with_far_branch, far_branch_backward,
                                         far_branch_backward_reference, far_branch_reference)
from attnswap.kernels.flex import build_far_branch_masks, materialised_attention
from attnswap.kernels.masks import materialize
from attnswap.variants import AttnContext, get_variant
from tests.conftest import TOLERANCE, left_padded_keys, random_qkv

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("spec", ["window:w=20,sinks=4", "longformer:w=20,global_tokens=3"])
@pytest.mark.parametrize("q_len, kv_len, pads", [(150, 150, [0, 0]), (150, 150, [37, 5]), (70, 181, [20, 0])],
                         ids=["whole", "left_padded", "chunk_padded"])
def test_near_mask_and_far_pairs_partition_the_mask(spec, q_len, kv_len, pads):
    batch = 2
    variant = get_variant(spec)
    q, k, _ = random_qkv(batch, 1, q_len, kv_len, dim=16)
    ctx = AttnContext(scaling=0.25, key_valid=left_padded_keys(batch, kv_len, pads))
    index_mask, _, _ = variant.index_mask(q, k, ctx, None)
    far = variant._far_keys(q, k, ctx)
    block_mask, slots, allowed = build_far_branch_masks(index_mask, far, batch, None, q_len, kv_len, "cpu",
                                                        block_size=16)
    mask = materialize(index_mask, batch, 1, q_len, kv_len, "cpu")[:, 0]
    near = materialize(block_mask.mask_mod, batch, 1, q_len, kv_len, "cpu")[:, 0]
    far_pairs = torch.zeros_like(mask)
    for b in range(batch):
        far_pairs[b][:, slots[b]] |= allowed[b, 0]
    assert allowed.any(), "the case has no far pair: it tests nothing"
    assert not (near & far_pairs).any(), "a pair is both near and far: it would count twice"
    assert torch.equal(near | far_pairs, mask), "near and far pairs must make up the mask exactly"


def _union_case(batch=2, heads=3, q_len=40, dim=8, dtype=torch.float64, seed=0):
    """A dense near attention (a window of 6, two rows left-padded) and 3 far keys from each row's first real slot."""
    q, k, v = random_qkv(batch, heads, q_len, q_len, dim=dim, dtype=dtype, requires_grad=True, seed=seed)
    pads = torch.tensor([0, 5][:batch])
    position = torch.arange(q_len)
    causal = position[None, :] <= position[:, None]
    real = position[None, :] >= pads[:, None]  # (B, S)
    near = (causal & (position[:, None] - position[None, :] < 6))[None] & real[:, None, :]  # (B, T, S)
    slots = pads[:, None] + torch.arange(3)
    whole = near.clone()
    for b in range(batch):
        whole[b][:, slots[b]] |= causal[:, slots[b]]
    allowed = torch.stack([whole[b][:, slots[b]] & ~near[b][:, slots[b]] for b in range(batch)])[:, None]
    return q, k, v, near[:, None], whole[:, None], slots, allowed


def _dense(q, k, v, allowed, scaling):
    return materialised_attention(q, k, v, lambda b, h, i, j: allowed[b, 0, i, j], scaling, return_lse=True)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager_fullgraph"])
@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "out_and_lse"])
def test_far_branch_equals_attention_over_the_union_on_cpu(with_lse, compiled):
    scaling = 0.3
    q, k, v, near, whole, slots, allowed = _union_case()

    def loss(out, lse):
        lse = lse.masked_fill(~torch.isfinite(lse), 0.0)
        return out.square().sum() + (lse.sin().sum() if with_lse else 0)

    def branch_loss(q, k, v):
        return loss(*attend_with_far_branch(lambda q, k, v: _dense(q, k, v, near, scaling), q, k, v, slots,
                                            allowed, scaling))

    if compiled:  # dynamo and AOTAutograd over the three autograd Functions, the in-place adds included
        branch_loss = torch.compile(branch_loss, backend="aot_eager", fullgraph=True)
    out, lse = attend_with_far_branch(lambda q, k, v: _dense(q, k, v, near, scaling), q, k, v, slots, allowed,
                                      scaling)
    want_out, want_lse = _dense(q, k, v, whole, scaling)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-6)  # the lse is fp32
    torch.testing.assert_close(lse, want_lse.float(), rtol=0, atol=1e-5)
    got = torch.autograd.grad(branch_loss(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(want_out, want_lse), (q, k, v))
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


def test_far_branch_keeps_rows_without_keys_finite():
    """A padded query row sees no key, near or far: output 0, lse -inf, and no NaN in any gradient."""
    near_out = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    lse_near = torch.tensor([[[float("-inf"), 0.5, float("-inf")]]])
    q, k, v = random_qkv(1, 1, 3, 2, dim=4, dtype=torch.float64)
    slots = torch.tensor([[0, 1]])
    allowed = torch.tensor([[[[False, False], [True, False], [True, True]]]])
    out, lse = far_branch_reference(q, near_out, lse_near, k, v, slots, allowed, 0.5)
    assert torch.equal(out[0, 0, 0], torch.zeros(4, dtype=torch.float64)) and lse[0, 0, 0] == float("-inf")
    assert torch.isfinite(lse[0, 0, 1:]).all()
    grads = far_branch_backward_reference(q, torch.ones_like(out), torch.ones_like(lse), near_out, lse_near, lse,
                                          k, v, slots, allowed, 0.5)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_far, heads_allowed, programs", [(4, 1, 2048), (40, 3, 2048), (4, 1, 3)],
                         ids=["sinks", "global_keys_per_head", "several_tiles_per_program"])
def test_far_branch_kernels_match_the_reference_on_cuda(dtype, n_far, heads_allowed, programs, monkeypatch):
    monkeypatch.setattr(sinks_branch, "PROGRAMS", programs)
    batch, heads, q_len, kv_len, dim, scaling = 2, 3, 1000, 1100, 64, 0.125
    q, k, v = (x.cuda() for x in random_qkv(batch, heads, q_len, kv_len, dim=dim, dtype=dtype))
    out_near, grad_out = (x.cuda() for x in random_qkv(batch, heads, q_len, q_len, dim=dim, dtype=dtype, seed=1)[:2])
    slots = torch.stack([torch.arange(n_far) + 7, torch.arange(n_far) + kv_len - n_far + 2]).cuda()
    slots[1, -2:] = -1  # past the keys
    lse_near = torch.randn(batch, heads, q_len, device="cuda") + 3
    lse_near[0, :, :5] = float("-inf")  # rows that see no near key
    grad_lse = torch.randn(batch, heads, q_len, device="cuda")
    allowed = (torch.rand(batch, heads_allowed, q_len, n_far, device="cuda") < 0.7) & (slots >= 0)[:, None, None]
    allowed[0, :, :2] = False  # and no far key: empty rows
    got = sinks_branch.far_branch(q, out_near, lse_near, k, v, slots, allowed, scaling)
    want = far_branch_reference(q, out_near, lse_near, k, v, slots, allowed, scaling)
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=0, atol=TOLERANCE[dtype], msg="out")
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=TOLERANCE[dtype], msg="lse")
    lse = want[1]
    for g in (None, grad_lse):
        got = far_branch_backward(q, grad_out, g, out_near, lse_near, lse, k, v, slots, allowed, scaling)
        want = far_branch_backward_reference(q, grad_out, g, out_near, lse_near, lse, k, v, slots, allowed, scaling)
        for name, got_part, want_part in zip(("dout_near", "dlse_near", "ds"), got, want):
            scale = want_part.float().abs().max()
            torch.testing.assert_close(got_part.float() / scale, want_part.float() / scale, rtol=0,
                                       atol=TOLERANCE[dtype], msg=lambda m, n=name: f"{n}: {m}")
        # The in-place adds: the partial sums of the kernel path against the reference's whole sums.
        grads = [torch.randn_like(x) for x in (q, k, v)]
        fast_grads, slow_grads = [g.clone() for g in grads], [g.clone() for g in grads]
        sinks_branch.add_far_gradients(*fast_grads, got[2], got[3], k, slots, scaling)
        sinks_branch.add_far_gradients_reference(*slow_grads, want[2], want[3], k, slots, scaling)
        for name, fast, slow, before in zip("qkv", fast_grads, slow_grads, grads):
            scale = (slow - before).float().abs().max()
            torch.testing.assert_close((fast - before).float() / scale, (slow - before).float() / scale, rtol=0,
                                       atol=2 * TOLERANCE[dtype], msg=lambda m, n=name: f"added to d{n}: {m}")
