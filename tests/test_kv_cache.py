"""The bounded cache (kernels/kv_cache.py, cache.py): constant memory, and the same tokens as recomputing everything."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from attnswap.hf.cache import RollingLayer, bounded_cache
from attnswap.errors import AttnswapError
from attnswap.kernels.kv_cache import RollingKV
from attnswap.hf.swap import observe_attention, original_attention, swap
from attnswap.variants.full import Full
from attnswap.variants.hedgehog import Hedgehog, HedgehogParams
from attnswap.variants.longformer import Longformer, LongformerParams
from attnswap.variants.performer import Performer, PerformerParams
from attnswap.variants.window import Window, WindowParams, sliding_window_mask
from tests.conftest import TOLERANCE, random_batch, tiny_gpt2, tiny_llama

W = 8  # window of the generation tests; they generate 4 * W tokens


# --- the kernel alone ----------------------------------------------------------------------------
def _visible(view, first_real, window, sinks):
    """Per row and query: the token positions a window+sinks query sees among the view's slots."""
    mask = sliding_window_mask(window, sinks, first_real)
    q = view.q_positions[None, :, None]  # (1, T, 1)
    kv = view.positions[None, None, :]  # (1, 1, S)
    tokens = view.token_positions[:, None, :]  # (B, 1, S)
    rows = torch.arange(first_real.shape[0])[:, None, None]
    seen = (kv <= q) & mask(rows, 0, q, kv) & (tokens >= first_real[:, None, None])
    return [[sorted(tokens[b, 0][seen[b, t]].tolist()) for t in range(q.shape[1])] for b in range(len(first_real))]


def _expected(q_positions, first_real, window, sinks):
    return [[[p for p in range(f, q + 1) if q - p < window or p - f < sinks] for q in q_positions.tolist()]
            for f in first_real.tolist()]


BLOCKS = {"long-prompt": [13, *[1] * 6, 5, *[1] * 20, 2], "short-prompt": [2, *[1] * 14, 3, *[1] * 10]}


@pytest.mark.parametrize("blocks", BLOCKS.values(), ids=BLOCKS.keys())
@pytest.mark.parametrize("window,sinks", [(8, 2), (8, 0), (3, 4), (1, 1)], ids=lambda x: str(x))
def test_rolling_kv_holds_exactly_what_window_and_sinks_queries_see(window, sinks, blocks):
    """Blocks and single steps in any order: every query sees its window and its row's sinks, each key once,
    with the key that was appended for that position, and the slots stay at window + sinks."""
    first_real = torch.tensor([3, 0])  # row 0 is left-padded by 3
    cache = RollingKV(window, sinks)
    seen = 0
    for block in blocks:
        positions = torch.arange(seen, seen + block, dtype=torch.float32)
        k = positions.view(1, 1, -1, 1).expand(2, 1, block, 1)  # a key's value is its position
        view = cache.append(k, -k)
        cache.first_real = first_real  # what the attention call tells the cache
        seen += block
        present = view.token_positions >= 0
        assert torch.equal(view.keys[:, 0, :, 0][present], view.token_positions[present].float()), "slot != its token"
        assert torch.equal(view.values, -view.keys)
        assert _visible(view, first_real, window, sinks) == _expected(view.q_positions, first_real, window, sinks)
        assert cache.keys.shape[-2] == window + sinks, f"{cache.keys.shape[-2]} slots after {seen} tokens"
        if block == 1:
            assert view.keys.shape[-2] == window + sinks, "a decode step attends over exactly the slots"


# --- through HF generate -----------------------------------------------------------------------
WINDOW = {"sinks2": Window(WindowParams(w=W, sinks=2)), "nosinks": Window(WindowParams(w=W))}
CASES = {  # model, variant, prompt length (13 > w + sinks: the prompt fills the cache; 6 < w: decoding does)
    "gpt2-window-sinks2-long-prompt": (tiny_gpt2, WINDOW["sinks2"], 13),
    "gpt2-window-nosinks": (tiny_gpt2, WINDOW["nosinks"], 13),
    "llama-window-sinks2-short-prompt": (tiny_llama, WINDOW["sinks2"], 6),
    "llama-window-nosinks": (tiny_llama, WINDOW["nosinks"], 6),
    "llama-hedgehog": (tiny_llama, Hedgehog(HedgehogParams(chunk=4)), 13),
    "gpt2-performer": (tiny_gpt2, Performer(PerformerParams(m=16, chunk=4)), 13),
}


def _generate(model, ids, mask, **kwargs):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4 * W, min_new_tokens=4 * W, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True, output_scores=True, **kwargs)
    return out.sequences, torch.stack(out.scores)


def _held(layer):
    """Shapes of the tensors a bounded cache layer keeps between steps."""
    if isinstance(layer, RollingLayer):
        return [tuple(layer.keys.shape), tuple(layer.values.shape)]
    return [tuple(t.shape) for t in layer.state]


def _record_decode_steps(cache) -> list[int]:
    """The keys each decode step's attention reads, per layer call: slots for a window, the new token for a linear
    state."""
    seen = []
    for layer in cache.layers:
        def recorded(module, variant, q, *args, _decode=layer.decode, _layer=layer):
            keys = _layer.rolling.keys if isinstance(_layer, RollingLayer) else _layer.step_keys
            seen.append(keys.shape[-2])
            return _decode(module, variant, q, *args)
        layer.decode = recorded
    return seen


@pytest.mark.parametrize("factory,variant,length", CASES.values(), ids=CASES.keys())
def test_bounded_cache_generates_like_full_recomputation(factory, variant, length):
    """Left-padded batch of 2: the same tokens and scores as no cache and as DynamicCache, each row the same as
    generated alone without padding; decode steps see w + sinks slots (window) or the new token (hedgehog)."""
    model = swap(factory(), variant)
    ids, mask = random_batch(batch=2, length=length, left_pad=2)
    heads, head_dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", heads)
    if isinstance(variant, Window):
        slots = W + variant.params.sinks
        held = [(2, kv_heads, slots, head_dim)] * 2
    elif isinstance(variant, Hedgehog):  # features: two softmaxes of head_dim each
        slots, held = 1, [(2, heads, 2 * head_dim, head_dim), (2, heads, 2 * head_dim)]
    else:  # performer: m random features, and the keys' running log-scale
        m = variant.params.m
        slots, held = 1, [(2, heads, m, head_dim), (2, heads, m), (2, heads)]
    cache = bounded_cache(model)
    keys_seen = _record_decode_steps(cache)
    tokens, scores = _generate(model, ids, mask, past_key_values=cache)

    assert len(keys_seen) == (4 * W - 1) * len(cache.layers), "every decode step takes the layers' decode path"
    assert set(keys_seen) == {slots}, f"decode steps attended over {set(keys_seen)} keys"
    assert all(_held(layer) == held for layer in cache.layers), f"cache holds {[_held(x) for x in cache.layers]}"
    for reference in ({"use_cache": False}, {"past_key_values": DynamicCache()}):
        ref_tokens, ref_scores = _generate(model, ids, mask, **reference)
        assert torch.equal(tokens, ref_tokens), f"tokens differ from {reference}"
        torch.testing.assert_close(scores, ref_scores, atol=TOLERANCE[torch.float32], rtol=0)
    for row in range(2):
        real = mask[row].bool()
        alone, _ = _generate(model, ids[row : row + 1, real], None, past_key_values=bounded_cache(model))
        assert torch.equal(tokens[row, -4 * W :], alone[0, -4 * W :]), f"row {row} differs from its unpadded self"


@pytest.mark.parametrize("variant", [Window(WindowParams(w=5, sinks=2)), Hedgehog(HedgehogParams(chunk=4)),
                                     Performer(PerformerParams(m=16, chunk=4))], ids=["window", "hedgehog", "performer"])
def test_bounded_cache_prefill_in_chunks_matches_one_forward(variant):
    """A prompt fed in three blocks (the later ones after a full cache) gives the logits of one forward."""
    model = swap(tiny_llama(), variant)
    ids, mask = random_batch(batch=2, length=19, left_pad=4)
    with torch.no_grad():
        whole = model(ids, attention_mask=mask).logits
        cache, parts = bounded_cache(model), []
        for start, end in [(0, 9), (9, 16), (16, 19)]:
            parts.append(model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache).logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, dim=1)[real], whole[real], atol=TOLERANCE[torch.float32], rtol=0)


def test_bounded_cache_keeps_every_token_of_unswapped_layers():
    """Only swapped layers roll; the others grow, and together they generate what DynamicCache does."""
    model = swap(tiny_gpt2(), WINDOW["sinks2"], layers=[1])
    ids, mask = random_batch(batch=2, length=11, left_pad=3)
    cache = bounded_cache(model)
    tokens, scores = _generate(model, ids, mask, past_key_values=cache)
    assert isinstance(cache.layers[0], DynamicLayer) and isinstance(cache.layers[1], RollingLayer)
    assert cache.layers[1].keys.shape[-2] == W + 2 and cache.layers[0].keys.shape[-2] == 11 + 4 * W - 1
    ref_tokens, ref_scores = _generate(model, ids, mask, past_key_values=DynamicCache())
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, atol=TOLERANCE[torch.float32], rtol=0)


@pytest.mark.parametrize("variant", [Full(), Longformer(LongformerParams(w=5, global_tokens=2))],
                         ids=["full", "longformer"])
def test_bounded_cache_refuses_a_variant_without_a_bound(variant):
    with pytest.raises(AttnswapError, match=f"variant '{variant.name}.*' has no bounded cache"):
        bounded_cache(swap(tiny_gpt2(), variant))


def test_bounded_cache_refuses_an_unswapped_model_and_the_original_attention():
    with pytest.raises(AttnswapError, match="needs a swapped model"):
        bounded_cache(tiny_gpt2())
    for variant in WINDOW["sinks2"], Hedgehog():
        model = swap(tiny_gpt2(), variant)
        ids, mask = random_batch(batch=2, length=5)
        with original_attention(model), pytest.raises(AttnswapError, match="cannot run variant 'full'"):
            model(ids, attention_mask=mask, past_key_values=bounded_cache(model))
