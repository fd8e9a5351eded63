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
