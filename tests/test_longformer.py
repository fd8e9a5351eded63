"""variants/longformer.py: global tokens, the full-window limit, the dense reference, and a swapped GPT-2."""

from __future__ import annotations

import pytest
import torch

import attnswap
from attnswap.errors import AttnswapError
from attnswap.kernels.masks import materialize
from attnswap.variants import AttnContext
from attnswap.variants.full import Full
from attnswap.variants.longformer import Longformer, LongformerParams
from tests.conftest import assert_attend_matches_reference, TOLERANCE, random_batch, random_qkv, tiny_gpt2


def longformer(**params) -> Longformer:
    return Longformer(LongformerParams(**params))


def test_longformer_label_and_validation():
    assert Longformer().label == "longformer_w64_g1"
    assert longformer(w=8, global_tokens=2, global_stride=16).label == "longformer_w8_g2_s16"
    for bad in (dict(w=0), dict(global_tokens=-1), dict(global_stride=-2)):
        with pytest.raises(AttnswapError, match=next(iter(bad))):
            LongformerParams(**bad)


def test_global_tokens_see_and_are_seen_by_all():
    n, pad = 15, 3
    variant = longformer(w=2, global_tokens=2, global_stride=5)
    key_valid = torch.ones(2, n, dtype=torch.bool)
    key_valid[0, :pad] = False
    q, k, _ = random_qkv(batch=2, heads=1, q_len=n)
    index_mask, _, _ = variant.index_mask(q, k, AttnContext(scaling=1.0, key_valid=key_valid), None)
    allowed = materialize(index_mask, 2, 1, n, n, "cpu")[:, 0]  # (B, T, S)
    pos = torch.arange(n)
    causal_real = (pos[None, :] <= pos[:, None]) & key_valid[:, None, :]  # (B, T, S)
    for row, first in enumerate((pad, 0)):
        rel = pos - first
        is_global = (rel >= 0) & ((rel < 2) | (rel % 5 == 0))
        assert is_global.sum() == 4, "expected relative positions 0, 1 (leading) and 5, 10 (stride)"
        for g in pos[is_global].tolist():
            assert torch.equal(allowed[row, g], causal_real[row, g]), f"global query {g} must see every earlier token"
            assert torch.equal(allowed[row, :, g], causal_real[row, :, g]), f"global key {g} must be seen by all later"
        ordinary = ~is_global[:, None] & ~is_global[None, :]
        far = (pos[:, None] - pos[None, :]) >= 2
        assert not allowed[row][ordinary & far].any(), "ordinary tokens further apart than w must not meet"


@pytest.mark.parametrize("left_pad", [0, 5], ids=["no_padding", "left_padding"])
def test_window_covering_everything_equals_full(left_pad):
    q, k, v = random_qkv(q_len=29)
    key_valid = None
    if left_pad:
        key_valid = torch.ones(2, 29, dtype=torch.bool)
        key_valid[0, :left_pad] = False
    ctx = AttnContext(scaling=0.25, key_valid=key_valid)
    out = longformer(w=29, global_tokens=0).attend(q, k, v, ctx, None)
    torch.testing.assert_close(out, Full().reference(q, k, v, ctx, None), rtol=0, atol=TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("params", [dict(w=5), dict(w=4, global_tokens=3, global_stride=7)], ids=["w5_g1", "w4_g3_s7"])
def test_longformer_matches_reference_with_padding_and_decode(params, dtype):
    variant = longformer(**params)
    assert_attend_matches_reference(variant, dtype)


def _logits(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding does not shift GPT-2's position embeddings
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions).logits


def test_swapped_gpt2_is_unaffected_by_left_padding():
    """Global tokens are counted from each row's first real token, so padding a row changes nothing."""
    model = attnswap.swap(tiny_gpt2(), longformer(w=3, global_tokens=2, global_stride=6))
    ids, mask = random_batch(batch=2, length=27, left_pad=8)
    padded = _logits(model, ids, mask)
    alone = _logits(model, ids[:1, 8:], mask[:1, 8:])
    assert (padded[0, 8:] - alone[0]).abs().max().item() <= 1e-5
    assert torch.isfinite(padded).all()


def test_swapped_gpt2_with_covering_window_reproduces_original():
    model = tiny_gpt2()
    ids, mask = random_batch(batch=2, length=27, left_pad=8)
    original = _logits(model, ids, mask)
    attnswap.swap(model, longformer(w=27, global_tokens=1, global_stride=4))
    real = mask.bool()
    assert (_logits(model, ids, mask) - original)[real].abs().max().item() <= 1e-5


def test_without_stride_longformer_is_the_window_with_sinks():
    """Causal and stride-free, a global query may only look back at global keys: the window-with-sinks mask."""
    from attnswap.variants.window import Window, WindowParams

    q, k, _ = random_qkv(batch=2, heads=2, q_len=23)
    key_valid = torch.ones(2, 23, dtype=torch.bool)
    key_valid[0, :4] = False
    small = AttnContext(scaling=1.0, key_valid=key_valid)
    for w, g in ((5, 3), (2, 6)):  # a window narrower than the global tokens too
        masks = [variant.index_mask(q, k, small, None)[0]
                 for variant in (longformer(w=w, global_tokens=g), Window(WindowParams(w=w, sinks=g)))]
        assert torch.equal(*(materialize(m, 2, 1, 23, 23, "cpu") for m in masks))
