"""The decode path of a bounded cache (kernels/decode.py, cache.py, decoding.py): the same greedy tokens as the
materialising path for 256 steps, in a left-padded batch, and a cache whose size does not grow."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from attnswap.hf.cache import FullLayer, bounded_cache
from attnswap.hf.decoding import decode_greedy, decode_one_token, prefill
from attnswap.kernels.decode import slot_attention
from attnswap.hf.swap import attention_modules, swap
from attnswap.variants.hedgehog import Hedgehog, HedgehogParams
from attnswap.variants.hybrid import Hybrid, HybridParams
from attnswap.variants.window import Window, WindowParams
from tests.conftest import TOLERANCE, random_batch, tiny_gpt2, tiny_llama

STEPS = 256


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest, and a busy machine's threads no longer fight over them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gpt2():
    return tiny_gpt2(n_positions=512)


def _hybrid_with_weight_far():
    """A hybrid whose far part carries weight (balance 0 instead of -4), so that a wrong far state shows."""
    model = swap(tiny_llama(), Hybrid(HybridParams(w=8, sinks=2, chunk=4)))
    for module in attention_modules(model):
        module.attnswap.balance.data.zero_()
    return model


CASES = {  # model with its swap; the prompt of 13 tokens is longer than the window, row 0 left-padded by 3
    "gpt2-window": lambda: swap(_gpt2(), Window(WindowParams(w=8))),
    "gpt2-window-sinks": lambda: swap(_gpt2(), Window(WindowParams(w=8, sinks=4))),
    "llama-gqa-window-sinks": lambda: swap(tiny_llama(), Window(WindowParams(w=8, sinks=4))),
    "llama-gqa-hybrid": _hybrid_with_weight_far,
    "llama-gqa-hedgehog": lambda: swap(tiny_llama(), Hedgehog(HedgehogParams(chunk=4))),
    "llama-routed-layer0-full": lambda: swap(tiny_llama(n_layer=3), Window(WindowParams(w=8, sinks=2)), layers=[1, 2]),
}


def _reference(model, ids, mask, steps):
    """Greedy tokens through the variants' materialising path: generate() over a growing DynamicCache."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         pad_token_id=0, past_key_values=DynamicCache())
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("make", CASES.values(), ids=CASES.keys())
def test_decode_greedy_matches_the_materialising_path_for_256_steps(make):
    """A left-padded batch: decode_greedy's tokens equal generate()'s over a DynamicCache (the variant's dense
    path over every key) for 256 steps, far past the window."""
    model = make()
    ids, mask = random_batch(batch=2, length=13, left_pad=3)
    fast = decode_greedy(model, ids, mask, max_new_tokens=STEPS)
    reference = _reference(model, ids, mask, STEPS)
    differs = (fast != reference).any(dim=0).nonzero()
    assert differs.numel() == 0, f"first difference at step {differs[0].item()} of {STEPS}"


def test_routed_model_keeps_preallocated_full_layers():
    """Unswapped layers get max_length preallocated slots: the cache is one size from the first step on."""
    model = CASES["llama-routed-layer0-full"]()
    ids, mask = random_batch(batch=2, length=13, left_pad=3)
    cache = bounded_cache(model, max_length=13 + 20)
    assert isinstance(cache.layers[0], FullLayer) and not isinstance(cache.layers[1], FullLayer)
    decode_greedy(model, ids, mask, max_new_tokens=20, cache=cache)
    assert cache.layers[0].keys.shape[-2] == 33 and cache.layers[1].keys.shape[-2] == 8 + 2
    assert cache.get_seq_length() == 13 + 19, "the host counters caught up after the captured steps"


def test_cache_bytes_do_not_grow_with_the_prompt_or_the_steps():
    """cache.nbytes() is the same after prompts of 16 and 96 tokens and after 1 or 64 steps; a DynamicCache's grows."""
    model = swap(tiny_llama(), Window(WindowParams(w=8, sinks=4)))
    sizes = {}
    for length in (16, 96):
        ids, mask = random_batch(batch=2, length=length, left_pad=3)
        for steps in (2, 64):
            cache = bounded_cache(model)
            decode_greedy(model, ids, mask, max_new_tokens=steps, cache=cache)
            sizes[length, steps] = cache.nbytes()
    assert len(set(sizes.values())) == 1, f"cache bytes by (prompt, steps): {sizes}"
    kv_heads, head_dim, layers = 2, 8, 2
    slots_bytes = layers * 2 * (2 * kv_heads * (8 + 4) * head_dim * 4)  # keys and values, fp32
    assert slots_bytes <= sizes[16, 2] <= slots_bytes * 1.2, "the slots are most of it; bookkeeping is small"
    grown = DynamicCache()
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=grown)
    assert sum(layer.keys.nbytes * 2 for layer in grown.layers) > sizes[96, 64]


def test_decode_step_compiles_whole_and_once():
    """decode_one_token traced by dynamo in one graph (fullgraph) that serves every step, and the same tokens."""
    torch._dynamo.reset()
    model = swap(tiny_llama(), Window(WindowParams(w=8, sinks=4)))
    ids, mask = random_batch(batch=2, length=13, left_pad=3)
    expected = decode_greedy(model, ids, mask, max_new_tokens=24)
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    step = torch.compile(decode_one_token, backend=counter, fullgraph=True)
    cache = bounded_cache(model, max_length=13 + 24)
    token, position = prefill(model, ids, mask, cache)
    cache.start_captured_steps()
    tokens = [token]
    with torch.no_grad():
        for _ in range(23):
            token = step(model, cache, token, position)
            position = position + 1
            tokens.append(token)
    assert torch.equal(torch.cat(tokens, dim=1), expected)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for 23 steps: something recompiled"


def test_slot_attention_reads_grouped_heads_like_expanded_ones():
    """GQA without repeat_interleave: the grouped view gives what expanded keys give, with and without lse."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, 1, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g)
    valid = torch.rand(2, 11, generator=g) > 0.3
    expanded = [x.repeat_interleave(3, dim=1) for x in (k, v)]
    scores = (q @ expanded[0].transpose(-1, -2)) * 0.3
    probs = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)
    want = probs @ expanded[1]
    torch.testing.assert_close(slot_attention(q, k, v, valid, 0.3), want, atol=TOLERANCE[torch.float32], rtol=0)
    out, lse = slot_attention(q, k, v, valid, 0.3, return_lse=True)
    torch.testing.assert_close(out, want, atol=TOLERANCE[torch.float32], rtol=0)
    want_lse = scores.masked_fill(~valid[:, None, None, :], float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse, want_lse, atol=TOLERANCE[torch.float32], rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["gpt2-window-sinks", "llama-gqa-window-sinks", "llama-gqa-hybrid"])
def test_the_captured_decode_step_on_cuda_matches_the_materialising_path(name):
    """On CUDA with the decode step captured as a CUDA graph (compile, reduce-overhead): the same 256 greedy tokens
    as generate() over a DynamicCache. benchmarks/results/generation_h100/decode_equality_cuda.json ran it."""
    torch._dynamo.reset()
    model = (_hybrid_with_weight_far() if name == "llama-gqa-hybrid" else CASES[name]()).cuda()
    ids, mask = (x.cuda() for x in random_batch(batch=2, length=13, left_pad=3))
    fast = decode_greedy(model, ids, mask, max_new_tokens=STEPS, compile=True)
    reference = _reference(model, ids, mask, STEPS)
    differs = (fast != reference).any(dim=0).nonzero()
    assert differs.numel() == 0, f"first difference at step {differs[0].item()} of {STEPS}"
