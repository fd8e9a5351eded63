"""hf/cache.RoutedLayer: a hardened duo generates with every token kept for its full KV heads and the window's slots for
the others, the same tokens and scores as the materialising path over a DynamicCache, in a left-padded batch."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from attnswap.errors import AttnswapError
from attnswap.hf.cache import RoutedLayer, bounded_cache
from attnswap.hf.decoding import decode_greedy
from attnswap.hf.swap import attention_modules, swap
from tests.conftest import TOLERANCE, random_batch, tiny_llama

W, SINKS, STEPS = 8, 2, 48
# Per layer, per query head (4 query heads over 2 KV heads): which heads stay full.
ROUTINGS = {
    "mixed-layers": [[True, True, False, False], [False, False, True, True]],
    "one-layer-all-window": [[False, False, False, False], [True, True, False, False]],
    "one-layer-all-full": [[True, True, True, True], [False, False, True, True]],
}


def _routed(routing):
    model = swap(tiny_llama(n_layer=2, seed=1), f"duo:w={W},sinks={SINKS}")
    for module, flags in zip(attention_modules(model), routing):
        module.attnswap.harden(torch.tensor(flags))
    return model


def _generate(model, ids, mask, **kwargs):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True, output_scores=True, **kwargs)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
def test_a_routed_cache_generates_like_the_materialising_path(routing):
    model = _routed(routing)
    ids, mask = random_batch(batch=2, length=13, left_pad=3)  # longer than the window; row 0 left-padded
    cache = bounded_cache(model)
    assert all(isinstance(layer, RoutedLayer) for layer in cache.layers)
    tokens, scores = _generate(model, ids, mask, past_key_values=cache)
    ref_tokens, ref_scores = _generate(model, ids, mask, past_key_values=DynamicCache())
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, atol=TOLERANCE[torch.float32], rtol=0)
    seen = 13 + STEPS - 1
    for layer, flags in zip(cache.layers, routing):
        full_kv = sum(flags) // 2
        assert (0 if layer.full_keys is None else layer.full_keys.shape[1]) == full_kv
        if full_kv:
            assert layer.full_keys.shape[-2] == seen, "the full heads keep every token"
        if full_kv < 2:
            assert layer.window_slots.rolling.keys.shape[1:3] == (2 - full_kv, W + SINKS), "the others: the slots"


def test_a_routed_cache_prefilled_in_chunks_matches_one_forward():
    model = _routed(ROUTINGS["mixed-layers"])
    ids, _ = random_batch(batch=2, length=30)
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        cache = bounded_cache(model)
        parts = [model(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True).logits
                 for a, b in ((0, 11), (11, 12), (12, 30))]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=TOLERANCE[torch.float32], rtol=0)


def test_only_the_full_heads_cache_grows():
    """Bytes per token, once the prompt is folded in: one key and one value per full KV head, nothing for the window's
    heads; less than a DynamicCache holds at the same length."""
    model = _routed(ROUTINGS["mixed-layers"])  # one full KV head in each of the 2 layers
    sizes = {}
    for length in (40, 80):
        ids, mask = random_batch(batch=1, length=length)
        cache, dynamic = bounded_cache(model), DynamicCache()
        for held in (cache, dynamic):
            model.generate(ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                           pad_token_id=0, past_key_values=held)
        sizes[length] = cache.nbytes()
        dynamic_bytes = sum(x.keys.numel() * 2 * x.keys.element_size() for x in dynamic.layers)
        assert sizes[length] < dynamic_bytes, (sizes[length], dynamic_bytes)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    per_token = 2 * (head_dim * 2 * 4 + 1)  # layers x (key + value, fp32, of one full KV head + a real flag)
    assert sizes[80] - sizes[40] == 40 * per_token


def test_query_heads_of_one_kv_head_routed_apart_are_refused():
    model = _routed([[True, False, True, False], [True, True, False, False]])
    ids, mask = random_batch(batch=1, length=13)
    with pytest.raises(AttnswapError, match="route whole KV heads"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0, past_key_values=bounded_cache(model))


def test_an_unhardened_duo_and_captured_steps_are_refused():
    model = swap(tiny_llama(n_layer=2), f"duo:w={W},sinks={SINKS}")
    with pytest.raises(AttnswapError, match="hardened duo"):
        bounded_cache(model)
    routed = _routed(ROUTINGS["mixed-layers"])
    ids, mask = random_batch(batch=1, length=13)
    with pytest.raises(AttnswapError, match="grows for its full heads"):
        decode_greedy(routed, ids, mask, max_new_tokens=4, cache=bounded_cache(routed))
