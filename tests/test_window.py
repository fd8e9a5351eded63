"""variants/window.py: the sliding window (and sinks) against hand-computed cases and the dense reference."""

from __future__ import annotations

import pytest
import torch

from attnswap.kernels.masks import materialize
from attnswap.variants import AttnContext, get_variant
from tests.conftest import assert_attend_matches_reference, random_qkv


def test_window_of_one_attends_only_to_itself():
    q, k, v = random_qkv(batch=2, heads=2, q_len=9)
    variant = get_variant("window:w=1")
    ctx = AttnContext(scaling=0.25)
    # Softmax over a single key is 1, so each output row is its own value row.
    torch.testing.assert_close(variant.reference(q, k, v, ctx, None), v, rtol=0, atol=1e-6)
    torch.testing.assert_close(variant.attend(q, k, v, ctx, None), v, rtol=0, atol=1e-6)


def test_window_mask_matches_hand_drawn_pattern():
    variant = get_variant("window:w=2,sinks=1")
    q, k, _ = random_qkv(batch=1, heads=1, q_len=5)
    index_mask, _, _ = variant.index_mask(q, k, AttnContext(scaling=1.0), None)
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 0, 1, 1, 0],
        [1, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(materialize(index_mask, 1, 1, 5, 5, "cpu")[0, 0], expected)


def test_sinks_are_the_first_real_tokens_of_each_row():
    variant = get_variant("window:w=1,sinks=2")
    key_valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    q, k, _ = random_qkv(batch=2, heads=1, q_len=6)
    index_mask, _, _ = variant.index_mask(q, k, AttnContext(scaling=1.0, key_valid=key_valid), None)
    allowed = materialize(index_mask, 2, 1, 6, 6, "cpu")
    assert allowed[0, 0, 5].tolist() == [False, False, True, True, False, True]
    assert allowed[1, 0, 5].tolist() == [True, True, False, False, False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", ["window:w=5", "window:w=7,sinks=3"])
def test_window_matches_reference_with_padding_and_decode(spec, dtype):
    variant = get_variant(spec)
    assert_attend_matches_reference(variant, dtype)


def test_all_padding_rows_give_zeros_not_nan():
    variant = get_variant("window:w=3")
    q, k, v = random_qkv(q_len=6)
    key_valid = torch.ones(2, 6, dtype=torch.bool)
    key_valid[0, :3] = False
    out = variant.attend(q, k, v, AttnContext(scaling=0.3, key_valid=key_valid), None)
    assert torch.isfinite(out).all()
    assert out[0, :, :3].abs().max() == 0


@pytest.mark.parametrize("q_len, kv_len", [(9, 9), (4, 11), (1, 11)])
def test_slots_in_order_need_no_position_lookup(q_len, kv_len):
    """Without explicit positions the mask adds an offset to the index instead of looking positions up (a
    load per score inside the kernel); both must allow exactly the same pairs."""
    from attnswap.kernels.masks import to_index_mask
    from attnswap.variants.window import sliding_window_mask

    ctx = AttnContext(scaling=1.0)
    q_map, kv_map = ctx.position_maps(q_len, kv_len)
    assert (q_map, kv_map) == (kv_len - q_len, 0)
    positional = sliding_window_mask(3, 2, torch.zeros(2, dtype=torch.long))
    looked_up = to_index_mask(positional, torch.arange(kv_len - q_len, kv_len), torch.arange(kv_len), None)
    offset = to_index_mask(positional, q_map, kv_map, None)
    expected = materialize(looked_up, 2, 1, q_len, kv_len, "cpu")
    assert torch.equal(materialize(offset, 2, 1, q_len, kv_len, "cpu"), expected)
    assert expected[0, 0, -1].sum() == min(kv_len, 5)  # the last query: its window of 3 and 2 sinks


@pytest.mark.parametrize("w, length", [(5, 512), (200, 512), (200, 300)])  # windows in one block and across two;
def test_folded_sinks_equal_the_reference_in_outputs_and_gradients(w, length):  # a last fold of 44 queries
    variant = get_variant(f"window:w={w},sinks=4,fold=128")
    q, k, v = random_qkv(batch=2, heads=2, q_len=length, requires_grad=True)
    ctx = AttnContext(scaling=0.3)
    assert variant._folds(q, k, ctx)
    for return_lse in (False, True):
        fast = variant.attend(q, k, v, ctx, None, return_lse=return_lse)
        single = get_variant(f"window:w={w},sinks=4").attend(q, k, v, ctx, None, return_lse=return_lse)
        if return_lse:
            torch.testing.assert_close(fast[1], single[1], rtol=0, atol=1e-5, msg="log-sum-exp")
            fast, single = fast[0], single[0]
        torch.testing.assert_close(fast, variant.reference(q, k, v, ctx, None), rtol=0, atol=1e-5)
        torch.testing.assert_close(fast, single, rtol=0, atol=1e-5)
    ref = variant.reference(q, k, v, ctx, None)
    fast = variant.attend(q, k, v, ctx, None)
    weights = torch.randn_like(ref)  # a gradient that weighs every output differently
    for name, g_fast, g_ref in zip("qkv", torch.autograd.grad((fast * weights).sum(), (q, k, v)),
                                   torch.autograd.grad((ref * weights).sum(), (q, k, v))):
        torch.testing.assert_close(g_fast, g_ref, rtol=0, atol=1e-4, msg=f"d{name}")


def test_folds_serve_only_plain_sequences_of_two_folds_or_more():
    variant = get_variant("window:w=16,sinks=4,fold=128")
    q, k, _ = random_qkv(batch=1, heads=1, q_len=384)
    assert variant._folds(q, k, AttnContext(scaling=1.0))
    assert variant._folds(q[:, :, :300], k[:, :, :300], AttnContext(scaling=1.0)), "a last fold of 44 queries"
    assert not variant._folds(q[:, :, :128], k[:, :, :128], AttnContext(scaling=1.0)), "a single fold"
    assert not variant._folds(q[:, :, -1:], k, AttnContext(scaling=1.0)), "a decode step"
    padded = AttnContext(scaling=1.0, key_valid=torch.ones(1, 384, dtype=torch.bool))
    assert not variant._folds(q, k, padded), "padding"
    for bad in ("window:w=16,sinks=4,fold=100", "window:w=16,sinks=200,fold=128"):
        with pytest.raises(Exception, match="fold"):
            get_variant(bad)


def test_folded_sinks_through_flex_forward_on_the_cpu(monkeypatch):
    """The folds' block mask and FlexAttention (uncompiled, forward only on the CPU): what runs on CUDA."""
    import warnings

    import attnswap.variants.window as window_module
    from attnswap.kernels import flex

    def flex_attention(q, k, v, index_mask, scaling, score_bias=None, *, cache_key, per_batch, per_head, return_lse):
        block_mask = flex.block_mask_for(index_mask, q.shape[0], q.shape[1], q.shape[2], k.shape[2], "cpu",
                                         cache_key=cache_key, per_batch=per_batch, per_head=per_head)
        return flex.flex_masked_attention(q, k, v, block_mask, scaling, backend=None, return_lse=return_lse)

    monkeypatch.setattr(window_module, "masked_attention", flex_attention)
    variant = get_variant("window:w=200,sinks=4,fold=128")
    q, k, v = random_qkv(batch=2, heads=2, q_len=512)
    ctx = AttnContext(scaling=0.3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the uncompiled path's "materializes the full scores" notice
        out, lse = variant.attend(q, k, v, ctx, None, return_lse=True)
    torch.testing.assert_close(out, variant.reference(q, k, v, ctx, None), rtol=0, atol=1e-5)
    assert torch.isfinite(lse).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention with backward needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_folded_sinks_on_cuda_equal_the_single_mask(dtype):
    q, k, v = (x.cuda() for x in random_qkv(batch=1, heads=4, q_len=2048, dim=64, dtype=dtype))
    for x in (q, k, v):
        x.requires_grad_(True)
    ctx = AttnContext(scaling=0.125)
    folded, single = get_variant("window:w=256,sinks=4,fold=512"), get_variant("window:w=256,sinks=4")
    assert folded._folds(q, k, ctx)
    out_f, out_s = folded.attend(q, k, v, ctx, None), single.attend(q, k, v, ctx, None)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out_f.float(), out_s.float(), rtol=0, atol=tol)
    weights = torch.randn_like(out_f, dtype=torch.float32)
    for name, g_f, g_s in zip("qkv", torch.autograd.grad((out_f.float() * weights).sum(), (q, k, v)),
                              torch.autograd.grad((out_s.float() * weights).sum(), (q, k, v))):
        torch.testing.assert_close(g_f.float(), g_s.float(), rtol=0, atol=tol * 10, msg=f"d{name}")


def test_a_parameter_added_later_leaves_earlier_specs_as_they_were():
    assert get_variant("window:w=5,sinks=2").spec == "window:w=5,sinks=2"  # as runs before `fold` saved it
    folded = get_variant("window:w=5,sinks=2,fold=256")
    assert folded.spec == "window:w=5,sinks=2,fold=256" and get_variant(folded.spec).params == folded.params
    assert folded.label == "window5_sinks2_fold256"
