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


@pytest.mark.parametrize("w", [1, 4, 30], ids=["w1", "w4", "w_beyond_sequence"])
def test_sinks_apart_equal_one_mask_of_window_and_sinks(w, sinks_apart_on_cpu, monkeypatch):
    """The pure window merged with the sink branch equals the single window+sinks mask and the dense reference, in
    outputs, log-sum-exps and gradients: with a left-padded row, sinks inside some queries' windows (counted once)
    and a decode-sized block of queries against a longer cache; the sinks' products in pieces of 8 queries."""
    from attnswap.kernels import pieces
    from attnswap.variants.masked import MaskedVariant

    monkeypatch.setattr(pieces, "POSITIONS_PER_PIECE", 8)

    variant = get_variant(f"window:w={w},sinks=3")
    key_valid = torch.ones(2, 19, dtype=torch.bool)
    key_valid[0, :5] = False
    for q_len in (19, 4):
        q, k, v = random_qkv(q_len=q_len, kv_len=19, requires_grad=True)
        ctx = AttnContext(scaling=0.3, key_valid=key_valid)
        assert variant._sinks_apart(q, ctx)
        apart, apart_lse = variant.attend(q, k, v, ctx, None, return_lse=True)
        together, together_lse = MaskedVariant.attend(variant, q, k, v, ctx, None, return_lse=True)
        torch.testing.assert_close(apart, together, rtol=0, atol=1e-6)
        torch.testing.assert_close(apart, variant.reference(q, k, v, ctx, None), rtol=0, atol=1e-6)
        torch.testing.assert_close(apart_lse, together_lse, rtol=0, atol=1e-5, msg="log-sum-exp")
        weights = torch.randn_like(apart)  # a gradient that weighs every output differently
        for name, g_apart, g_together in zip("qkv", torch.autograd.grad((apart * weights).sum(), (q, k, v)),
                                             torch.autograd.grad((together * weights).sum(), (q, k, v))):
            torch.testing.assert_close(g_apart, g_together, rtol=0, atol=1e-5, msg=f"d{name}")


def test_sinks_go_apart_only_for_flex_and_keys_in_order(monkeypatch):
    import attnswap.variants.window as window_module

    q, _, _ = random_qkv(q_len=19)
    plain = AttnContext(scaling=0.3)
    assert not get_variant("window:w=4,sinks=3")._sinks_apart(q, plain), "on the CPU the scores are materialised"
    monkeypatch.setattr(window_module, "flex_serves", lambda q: True)
    assert get_variant("window:w=4,sinks=3")._sinks_apart(q, plain)
    assert not get_variant("window:w=4")._sinks_apart(q, plain), "no sinks"
    assert not get_variant("window:w=4,sinks=3")._sinks_apart(q, AttnContext(scaling=0.3, kv_positions=torch.arange(19)))
    assert not get_variant("window:w=4,sinks=3")._sinks_apart(q, AttnContext(scaling=0.3, model_mask=lambda *a: True))


def test_sinks_apart_through_flex_forward_on_the_cpu(monkeypatch, sinks_apart_on_cpu):
    """The pure window through FlexAttention (uncompiled, forward only on the CPU) hands the merge its natural-log
    log-sum-exp: what runs on CUDA."""
    import warnings

    import attnswap.variants.masked as masked_module
    from attnswap.kernels import flex

    def flex_attention(q, k, v, index_mask, scaling, score_bias=None, *, cache_key, per_batch, per_head, return_lse):
        block_mask = flex.block_mask_for(index_mask, q.shape[0], q.shape[1], q.shape[2], k.shape[2], "cpu",
                                         cache_key=cache_key, per_batch=per_batch, per_head=per_head)
        return flex.flex_masked_attention(q, k, v, block_mask, scaling, backend=None, return_lse=return_lse)

    monkeypatch.setattr(masked_module, "masked_attention", flex_attention)
    variant = get_variant("window:w=200,sinks=4")
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
def test_sinks_apart_on_cuda_equal_the_single_mask(dtype):
    from attnswap.variants.masked import MaskedVariant

    q, k, v = (x.cuda() for x in random_qkv(batch=1, heads=4, q_len=2048, dim=64, dtype=dtype))
    for x in (q, k, v):
        x.requires_grad_(True)
    ctx = AttnContext(scaling=0.125)
    variant = get_variant("window:w=256,sinks=4")
    assert variant._sinks_apart(q, ctx)
    apart, single = variant.attend(q, k, v, ctx, None), MaskedVariant.attend(variant, q, k, v, ctx, None)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(apart.float(), single.float(), rtol=0, atol=tol)
    weights = torch.randn_like(apart, dtype=torch.float32)
    for name, g_a, g_s in zip("qkv", torch.autograd.grad((apart.float() * weights).sum(), (q, k, v)),
                              torch.autograd.grad((single.float() * weights).sum(), (q, k, v))):
        torch.testing.assert_close(g_a.float(), g_s.float(), rtol=0, atol=tol * 10, msg=f"d{name}")
