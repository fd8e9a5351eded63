"""variants/hybrid.py, kernels/merge.py: window softmax + delayed linear attention under one normaliser, against its
dense reference; bounded-state generation (cache.HybridLayer) against generation without a cache."""

from __future__ import annotations

import warnings

import pytest
import torch

import attnswap
from attnswap.errors import AttnswapError
from attnswap.kernels.dense import dense_attention
from attnswap.kernels.flex import masked_attention
from attnswap.kernels.kv_cache import RollingKV
from attnswap.kernels.masks import causal, to_index_mask
from attnswap.kernels.merge import merge_attention
from attnswap.hf.swap import attention_modules, observe_attention, swap
from attnswap.variants import AttnContext, get_variant
from attnswap.variants.hybrid import Hybrid, HybridParams, HybridState, delayed, merged_parts
from tests.conftest import TOLERANCE, random_batch, random_qkv, tiny_gpt2, tiny_llama


def _trained_state(variant: Hybrid, heads: int, head_dim: int, seed: int = 0) -> HybridState:
    """A state moved off its start, with a balance that gives the far part real weight."""
    state = variant.make_state(heads, head_dim)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in state.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        state.balance.add_(3.0)
    return state


def _padded_context(batch: int, kv_len: int, left_pad: int) -> AttnContext:
    key_valid = torch.ones(batch, kv_len, dtype=torch.bool)
    key_valid[0, :left_pad] = False
    return AttnContext(scaling=0.3, key_valid=key_valid)


# --- kernels/merge.py --------------------------------------------------------------------------
def test_merging_two_key_sets_equals_softmax_over_their_union():
    q, k, v = random_qkv(q_len=9, kv_len=9)
    ctx = AttnContext(scaling=0.3)
    even = lambda b, h, qp, kp: kp % 2 == 0  # noqa: E731
    odd = lambda b, h, qp, kp: kp % 2 == 1  # noqa: E731
    parts = [masked_attention(q, k, v, to_index_mask(m, 0, 0, None), ctx.scaling, return_lse=True) for m in (even, odd)]
    merged, lse = merge_attention(*zip(*parts))
    whole, whole_lse = masked_attention(q, k, v, to_index_mask(causal, 0, 0, None), ctx.scaling, return_lse=True)
    torch.testing.assert_close(merged, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, whole_lse, rtol=0, atol=1e-5)
    # Query 0 sees no odd key: that part's lse is -inf, and it changes nothing.
    assert parts[1][1][:, :, 0].eq(float("-inf")).all()


def test_materialised_lse_is_the_log_normaliser_with_clean_gradients():
    q, k, v = random_qkv(q_len=6, requires_grad=True)
    ctx = _padded_context(2, 6, left_pad=3)
    index_mask = to_index_mask(causal, 0, 0, ctx.key_valid)
    out, lse = masked_attention(q, k, v, index_mask, ctx.scaling, return_lse=True)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril() & ctx.key_valid[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) * ctx.scaling).masked_fill(~allowed, float("-inf"))
    real_rows = allowed.any(-1).expand_as(lse)
    torch.testing.assert_close(lse[real_rows], torch.logsumexp(scores, -1)[real_rows])
    assert lse[~real_rows].eq(float("-inf")).all()
    torch.testing.assert_close(out, dense_attention(q, k, v, allowed, ctx.scaling), rtol=0, atol=1e-5)
    grads = torch.autograd.grad(out.sum() + lse[real_rows].sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def test_flex_lse_is_the_natural_log_normaliser():
    """FlexAttention (uncompiled here; compiled on CUDA) hands out its LSE the same way as the materialised path."""
    from attnswap.kernels import flex

    variant = get_variant("window:w=5,sinks=2")
    q, k, v = random_qkv(q_len=37, dim=16)
    ctx = _padded_context(2, 37, left_pad=9)
    index_mask, _, _ = variant.index_mask(q, k, ctx, None)
    block_mask = flex.build_block_mask(index_mask, 2, None, 37, 37, "cpu", block_size=16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the uncompiled path's "materializes the full scores" notice
        out, lse = flex.flex_masked_attention(q, k, v, block_mask, ctx.scaling, backend=None, return_lse=True)
    ref_out, ref_lse = flex.materialised_attention(q, k, v, index_mask, ctx.scaling, return_lse=True)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=2e-5)
    real = ref_lse.isfinite()
    assert torch.equal(lse.isfinite(), real) and not real.all(), "padded queries: -inf in both"
    torch.testing.assert_close(lse[real], ref_lse[real], rtol=0, atol=2e-5)


# --- the variant against its reference ------------------------------------------------------
CASES = {  # (T, S, w, sinks, chunk): odd lengths, not multiples of the chunk; T < w and T > w; chunked prefill
    "prefill-T>w": (23, 23, 5, 2, 4),
    "prefill-T<w": (7, 7, 9, 2, 4),
    "no-sinks": (19, 19, 4, 0, 8),
    "decode": (1, 23, 5, 2, 4),
    "chunked-prefill": (6, 23, 5, 3, 4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("q_len,kv_len,w,sinks,chunk", CASES.values(), ids=CASES.keys())
def test_hybrid_matches_reference_with_padding(q_len, kv_len, w, sinks, chunk, dtype):
    variant = Hybrid(HybridParams(w=w, sinks=sinks, feature_dim=12, chunk=chunk))
    state = _trained_state(variant, 3, 16)
    q, k, v = random_qkv(batch=3, q_len=q_len, kv_len=kv_len, dtype=dtype, requires_grad=True)
    ctx = _padded_context(3, kv_len, left_pad=4)
    fast, ref = variant.attend(q, k, v, ctx, state), variant.reference(q, k, v, ctx, state)
    assert fast.dtype == dtype
    torch.testing.assert_close(fast.float(), ref, rtol=0, atol=TOLERANCE[dtype])
    grad_out = torch.randn(fast.shape, generator=torch.Generator().manual_seed(1))
    inputs = (q, k, v, state.feature_map.weight, state.feature_map.bias, state.balance)
    grads_fast = torch.autograd.grad(fast, inputs, grad_out.to(dtype))
    grads_ref = torch.autograd.grad(ref, inputs, grad_out)
    for name, g_fast, g_ref in zip(("q", "k", "v", "W", "b", "balance"), grads_fast, grads_ref):
        if q_len == kv_len and kv_len > w or name in "qkv":  # the far part exists: every tensor is reached
            assert g_fast.abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(g_fast.float(), g_ref.float(), rtol=0, atol=TOLERANCE[dtype] * 5, msg=f"d{name}")


def _assert_attend_matches_reference(variant, q, k, v, ctx, state) -> torch.Tensor:
    """fp32: the efficient path equals the reference in outputs and q/k/v gradients; returns the output."""
    fast, ref = variant.attend(q, k, v, ctx, state), variant.reference(q, k, v, ctx, state)
    torch.testing.assert_close(fast, ref, rtol=0, atol=TOLERANCE[torch.float32])
    grad_out = torch.randn(fast.shape, generator=torch.Generator().manual_seed(1))
    for name, g_fast, g_ref in zip("qkv", torch.autograd.grad(fast, (q, k, v), grad_out),
                                   torch.autograd.grad(ref, (q, k, v), grad_out)):
        torch.testing.assert_close(g_fast, g_ref, rtol=0, atol=TOLERANCE[torch.float32] * 5, msg=f"d{name}")
    return fast.detach()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention with backward needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hybrid_fused_path_matches_reference_on_cuda(dtype):
    """FlexAttention's window with its LSE (T >= 128) and the fused linear scan (bf16) against the reference."""
    variant = Hybrid(HybridParams(w=100, sinks=4, chunk=64))
    state = _trained_state(variant, 3, 64).cuda()
    q, k, v = (t.cuda().to(dtype).requires_grad_(True) for t in random_qkv(q_len=300, dim=64))
    ctx = _padded_context(2, 300, left_pad=9)
    ctx.key_valid = ctx.key_valid.cuda()
    fast, ref = variant.attend(q, k, v, ctx, state), variant.reference(q, k, v, ctx, state)
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(fast.float(), ref, rtol=0, atol=tolerance)
    inputs = (q, k, v, state.feature_map.weight, state.balance)
    for name, g_fast, g_ref in zip(("q", "k", "v", "W", "balance"),
                                   torch.autograd.grad(fast.float().square().sum(), inputs),
                                   torch.autograd.grad(ref.square().sum(), inputs)):
        # The balance's gradient sums over every query of its head: in bf16 it is held to a relative tolerance (on
        # the H200 it missed the absolute one, benchmarks/results/recipe_h200/recipe_hybrid256_lr2e-4/cuda_tests.txt).
        rtol = tolerance if name == "balance" else 0.0
        torch.testing.assert_close(g_fast.float(), g_ref.float(), rtol=rtol, atol=tolerance * 10, msg=f"d{name}")


def test_hybrid_rows_sum_to_one_and_split_at_the_window():
    variant = Hybrid(HybridParams(w=3, sinks=1, chunk=4))
    state = _trained_state(variant, 3, 16)
    q, k, _ = random_qkv(q_len=11)
    ctx = _padded_context(2, 11, left_pad=2)
    probs = variant.probs(q, k, ctx, state)
    real = ctx.key_valid
    torch.testing.assert_close(probs.sum(-1)[real[:, None].expand(-1, 3, -1)], torch.ones(3 * (9 + 11)))
    assert probs[~real[:, None, :, None].expand_as(probs)].abs().max() == 0, "a padded query or key got weight"
    assert probs.triu(1).abs().max() == 0, "a query saw the future"
    assert (probs[0, :, 10, 3:8] > 0).all(), "far, non-sink keys of row 0 get linear-attention weight"
    # Lower the balance: the far part's weight vanishes and the hybrid becomes its window.
    with torch.no_grad():
        state.balance.fill_(-60.0)
    window = get_variant("window:w=3,sinks=1").probs(q, k, ctx, None)
    torch.testing.assert_close(variant.probs(q, k, ctx, state), window, rtol=0, atol=1e-6)


def test_hybrid_state_starts_from_hedgehog_and_the_balance_init():
    state = Hybrid().make_state(4, 8)
    assert sorted(name for name, _ in state.named_parameters()) == ["balance", "feature_map.bias", "feature_map.weight"]
    assert all(p.dtype == torch.float32 and p.requires_grad for p in state.parameters())
    assert torch.equal(state.feature_map.weight, torch.eye(8).expand(2, 4, 8, 8))


def test_hybrid_params_are_validated_and_named():
    for bad in ("w=0", "sinks=-1", "feature_dim=-2", "chunk=0"):
        with pytest.raises(AttnswapError, match=bad.split("=")[0]):
            get_variant(f"hybrid:{bad}")
    assert get_variant("hybrid:w=64,sinks=4,feature_dim=0,chunk=64").label == "hybrid64_sinks4"
    assert get_variant("hybrid:w=32,sinks=0,feature_dim=16").label == "hybrid32_f16"


def test_hybrid_in_tiny_gpt2_trains_only_its_state_and_round_trips(tmp_path):
    model = tiny_gpt2()
    ids, mask = random_batch(length=19, left_pad=6)
    swap(model, "hybrid:w=4,sinks=1,chunk=8")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.attnswap.{p}" for i in range(2)
                         for p in ("balance", "feature_map.weight", "feature_map.bias")}
    logits = model(ids, attention_mask=mask).logits
    real = mask[:, 1:].bool()
    torch.nn.functional.cross_entropy(logits[:, :-1][real], ids[:, 1:][real]).backward()
    for module in attention_modules(model):
        assert all(p.grad.abs().sum() > 0 for p in module.attnswap.parameters())
    loaded = attnswap.load(attnswap.save(model, tmp_path / "hybrid"))
    with torch.no_grad():
        again = loaded(ids, attention_mask=mask).logits
    assert (logits - again)[mask.bool()].abs().max() <= 1e-5


# --- bounded-state generation ------------------------------------------------------------------
def test_departing_keys_are_the_ones_each_new_token_pushes_out():
    window = 4
    cache, seen = RollingKV(window, sinks=1), 0
    for block in (6, 1, 1, 3, 1, 9):
        positions = torch.arange(seen, seen + block, dtype=torch.float32)
        k = positions.view(1, 1, -1, 1).expand(2, 1, block, 1)  # a key's value is its position
        departing, _ = cache.departing(k, -k)
        cache.append(k, -k)
        cache.first_real = torch.tensor([2, 0])
        expected = (positions - window).clamp(min=0)  # a negative position: zeros
        assert torch.equal(departing[:, 0, :, 0], expected.expand(2, block)), f"block {block} after {seen}"
        seen += block


W = 5
GENERATION = {  # model, prompt length: > w + sinks (far state from the prompt) and < w (decoding fills it)
    "gpt2-long-prompt": (tiny_gpt2, 13),
    "llama-gqa-short-prompt": (tiny_llama, 3),
}


def _generate(model, ids, mask, **kwargs):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3 * W, min_new_tokens=3 * W, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True, output_scores=True, **kwargs)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("factory,length", GENERATION.values(), ids=GENERATION.keys())
def test_bounded_cache_generates_like_no_cache(factory, length):
    """Left-padded batch: the same tokens and scores as without a cache; decode steps attend over w + sinks slots
    and the cache holds those slots plus one linear state per layer, however long the text; the padded row as alone."""
    from attnswap.hf.cache import HybridLayer, bounded_cache

    model = swap(factory(), Hybrid(HybridParams(w=W, sinks=2, chunk=4)))
    for module in attention_modules(model):  # a trained state, so the far part matters
        module.attnswap.load_state_dict(_trained_state(model.attnswap_record.variant, module.attnswap.balance.shape[0],
                                                       module.attnswap.feature_map.weight.shape[2]).state_dict())
    ids, mask = random_batch(batch=2, length=length, left_pad=2)
    keys_seen, cache = [], bounded_cache(model)
    with observe_attention(model, lambda module, variant, q, k, *rest: keys_seen.append((q.shape[-2], k.shape[-2]))):
        tokens, scores = _generate(model, ids, mask, past_key_values=cache)
    ref_tokens, ref_scores = _generate(model, ids, mask, use_cache=False)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, atol=TOLERANCE[torch.float32], rtol=0)
    assert {s for t, s in keys_seen if t == 1} == {W + 2}, f"decode steps attended over {keys_seen} keys"
    heads, head_dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    for layer in cache.layers:
        assert isinstance(layer, HybridLayer) and layer.keys.shape[-2] == W + 2
        features = 2 * head_dim  # Hedgehog's two softmax halves
        assert [tuple(t.shape) for t in layer.far_state] == [(2, heads, features, head_dim), (2, heads, features)]
    real = mask[0].bool()  # the left-padded row
    alone, _ = _generate(model, ids[:1, real], None, past_key_values=bounded_cache(model))
    assert torch.equal(tokens[0, -3 * W :], alone[0, -3 * W :]), "the padded row differs from its unpadded self"


def test_static_cache_generates_like_no_cache():
    """A StaticCache places the queries by position among preallocated slots: the reference serves them."""
    model = swap(tiny_llama(), Hybrid(HybridParams(w=W, sinks=2, chunk=4)))
    with torch.no_grad():
        for module in attention_modules(model):
            module.attnswap.balance.fill_(1.0)
    ids, mask = random_batch(batch=2, length=9, left_pad=2)
    tokens, scores = _generate(model, ids, mask, cache_implementation="static")
    ref_tokens, ref_scores = _generate(model, ids, mask, use_cache=False)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, atol=TOLERANCE[torch.float32], rtol=0)


def test_bounded_cache_prefill_in_chunks_matches_one_forward():
    from attnswap.hf.cache import bounded_cache

    model = swap(tiny_llama(), Hybrid(HybridParams(w=4, sinks=1, chunk=4)))
    with torch.no_grad():
        for module in attention_modules(model):
            module.attnswap.balance.fill_(1.0)
    ids, mask = random_batch(batch=2, length=19, left_pad=4)
    with torch.no_grad():
        whole = model(ids, attention_mask=mask).logits
        cache, parts = bounded_cache(model), []
        for start, end in [(0, 9), (9, 10), (10, 16), (16, 19)]:
            parts.append(model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache).logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, dim=1)[real], whole[real], atol=TOLERANCE[torch.float32], rtol=0)


def test_a_hybrid_cache_refuses_another_variant():
    from attnswap.hf.cache import bounded_cache

    model = swap(tiny_gpt2(), "hybrid:w=4,sinks=1")
    ids, mask = random_batch(batch=2, length=5)
    with attnswap.original_attention(model), pytest.raises(AttnswapError, match="cannot run variant 'full'"):
        model(ids, attention_mask=mask, past_key_values=bounded_cache(model))


# --- wide layers ----------------------------------------------------------------------------------
def test_a_wide_layer_takes_its_own_window_and_matches_reference():
    variant = Hybrid(HybridParams(w=5, sinks=2, feature_dim=12, chunk=4, wide_w=11, wide_layers=(1,)))
    assert variant.label == "hybrid5_sinks2_f12_wide11_l1"
    state = _trained_state(variant, 3, 16)
    q, k, v = random_qkv(batch=3, q_len=23, requires_grad=True)
    outs = {}
    for layer in (0, 1):
        ctx = _padded_context(3, 23, left_pad=4)
        ctx.layer_idx = layer
        assert variant.window_for(layer).params.w == (11 if layer == 1 else 5)
        outs[layer] = _assert_attend_matches_reference(variant, q, k, v, ctx, state)
    assert not torch.allclose(outs[0], outs[1]), "the wide layer attends exactly further back"
    with pytest.raises(AttnswapError, match="wide_w and wide_layers go together"):
        HybridParams(wide_w=64)
    with pytest.raises(AttnswapError, match=r"wide_layers names layer 5 but the model has layers 0\.\.1"):
        swap(tiny_gpt2(), "hybrid:w=4,wide_w=8,wide_layers=1+5")


def test_wide_layers_generate_like_no_cache_and_keep_their_own_slots():
    from attnswap.hf.cache import bounded_cache

    model = swap(tiny_gpt2(), Hybrid(HybridParams(w=W, sinks=2, chunk=4, wide_w=W + 3, wide_layers=(1,))))
    for module in attention_modules(model):
        module.attnswap.load_state_dict(_trained_state(model.attnswap_record.variant, module.attnswap.balance.shape[0],
                                                       module.attnswap.feature_map.weight.shape[2]).state_dict())
    ids, mask = random_batch(batch=2, length=13, left_pad=2)
    cache = bounded_cache(model)
    tokens, scores = _generate(model, ids, mask, past_key_values=cache)
    ref_tokens, ref_scores = _generate(model, ids, mask, use_cache=False)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, atol=TOLERANCE[torch.float32], rtol=0)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [W + 2, W + 3 + 2]


def test_a_wide_layer_costs_its_own_window():
    from attnswap.measure.plan import head_costs

    variant = "hybrid:w=64,sinks=4,wide_w=256,wide_layers=1"
    narrow, wide = (float(head_costs(variant, 1024, "flops", layer=layer).mean()) for layer in (0, 1))
    assert narrow == pytest.approx(float(head_costs("hybrid:w=64,sinks=4", 1024, "flops").mean()))
    assert wide == pytest.approx(float(head_costs("hybrid:w=256,sinks=4", 1024, "flops").mean()))
    assert wide > narrow


@pytest.mark.parametrize("length, slots", [(10, 3), (3, 5), (7, 7)])
def test_delayed_keys_are_shifted_and_stored_in_fla_layout(length, slots):
    x = torch.randn(2, 3, length, 4)
    got = delayed(x, slots)
    torch.testing.assert_close(got, torch.nn.functional.pad(x, (0, 0, slots, 0))[..., :length, :], rtol=0, atol=0)
    assert got.transpose(1, 2).is_contiguous(), "fla takes (B, S, H, ·) without a copy"


@pytest.mark.slow
def test_the_compiled_merge_equals_the_eager_one_with_gradients():
    """What CUDA runs (one compiled pass), here compiled for the CPU: the same merged output and gradients, with a
    query that no part saw (lse -inf, normaliser 0) and one whose far part is empty."""
    g = torch.Generator().manual_seed(2)
    out_window = torch.randn(2, 3, 9, 4, generator=g).bfloat16().requires_grad_(True)
    out_far = torch.randn(2, 3, 9, 4, generator=g).requires_grad_(True)
    lse_window = torch.randn(2, 3, 9, generator=g)
    lse_window[0, 0, 0] = float("-inf")
    lse_window.requires_grad_(True)
    normaliser = torch.rand(2, 3, 9, generator=g)
    normaliser[0, 0, :2] = 0.0
    normaliser.requires_grad_(True)
    balance = torch.randn(3, generator=g).requires_grad_(True)
    inputs = (out_window, lse_window, out_far, normaliser, balance)
    weights = torch.randn(2, 3, 9, 4, generator=g)
    results = []
    for merge in (merged_parts, torch.compile(merged_parts)):
        out = merge(*inputs)
        results.append((out, *torch.autograd.grad((out * weights).sum(), inputs)))
    for name, eager, compiled in zip(("out", "d_out_window", "d_lse_window", "d_out_far", "d_normaliser",
                                      "d_balance"), *results):
        assert torch.isfinite(compiled).all(), f"{name}: NaN or inf"
        torch.testing.assert_close(compiled.float(), eager.float(), rtol=1e-4, atol=1e-5, msg=name)
