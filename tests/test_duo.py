"""variants/duo.py: per-head gates between full attention and a window, their L1 penalty, the hardened layer."""

from __future__ import annotations

import warnings

import pytest
import torch

import attnswap
from attnswap.errors import AttnswapError
from attnswap.kernels import flex
from attnswap.hf.attention import STATE_ATTR
from attnswap.hf.swap import attention_modules, l1_penalty
from attnswap.variants import AttnContext, get_variant
from attnswap.variants.duo import Duo, DuoParams
from attnswap.variants.full import Full
from attnswap.variants.window import Window, WindowParams
from tests.conftest import TOLERANCE, random_batch, random_qkv, tiny_gpt2

VARIANT = Duo(DuoParams(w=5, sinks=2))
CHEAP = Window(WindowParams(w=5, sinks=2))
GATES = [1.4, 0.3, -0.2]  # one head clamped to full, one mixed, one clamped to the window
ROUTES = [True, False, True]  # a hardened layer's heads: full, window, full
CUDA = torch.cuda.is_available()


def _padded_ctx(batch: int, kv_len: int, pad: int = 4) -> AttnContext:
    key_valid = torch.ones(batch, kv_len, dtype=torch.bool)
    key_valid[0, :pad] = False
    return AttnContext(scaling=0.3, key_valid=key_valid)


def _state(gates=GATES, routes=None):
    state = VARIANT.make_state(len(gates), 16)
    with torch.no_grad():
        state.gate.copy_(torch.tensor(gates))
    if routes is not None:
        state.harden(torch.tensor(routes))
    return state


def _per_head(outputs: dict[bool, torch.Tensor], routes: list[bool]) -> torch.Tensor:
    """Stack head h of outputs[routes[h]]: what a layer with those heads routed full / window computes."""
    return torch.stack([outputs[full][:, h] for h, full in enumerate(routes)], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hardened", [False, True], ids=["gated", "hardened"])
def test_duo_matches_reference_with_padding_odd_lengths_and_decode(hardened, dtype):
    for q_len, kv_len in [(23, 23), (1, 23), (5, 23)]:
        state = _state(routes=ROUTES if hardened else None)
        q, k, v = random_qkv(q_len=q_len, kv_len=kv_len, dtype=dtype, requires_grad=True)
        ctx = _padded_ctx(2, kv_len)
        fast, ref = VARIANT.attend(q, k, v, ctx, state), VARIANT.reference(q, k, v, ctx, state)
        torch.testing.assert_close(fast.float(), ref, rtol=0, atol=TOLERANCE[dtype])
        inputs = (q, k, v) if hardened else (q, k, v, state.gate)
        grads_fast = torch.autograd.grad(fast.float().square().sum(), inputs)
        grads_ref = torch.autograd.grad(ref.square().sum(), inputs)
        for name, g_fast, g_ref in zip(("q", "k", "v", "gate"), grads_fast, grads_ref):
            torch.testing.assert_close(g_fast.float(), g_ref.float(), rtol=0, atol=TOLERANCE[dtype] * 10,
                                       msg=lambda m, name=name: f"d{name}: {m}")


def test_gated_reference_mixes_full_and_window_per_head_and_starts_as_full_attention():
    q, k, v = random_qkv(q_len=23)
    ctx = _padded_ctx(2, 23)
    full, window = Full().reference(q, k, v, ctx, None), CHEAP.reference(q, k, v, ctx, None)
    share = torch.tensor([1.0, 0.3, 0.0]).view(1, -1, 1, 1)  # GATES clamped to [0, 1]
    torch.testing.assert_close(VARIANT.reference(q, k, v, ctx, _state()), share * full + (1 - share) * window)
    fresh = VARIANT.make_state(3, 16)
    assert torch.equal(fresh.gate, torch.ones(3)) and not fresh.hardened
    torch.testing.assert_close(VARIANT.attend(q, k, v, ctx, fresh), Full().attend(q, k, v, ctx, None), rtol=0, atol=0)


@pytest.mark.parametrize("routes", [ROUTES, [False, False, False], [True, True, True]], ids=str)
def test_hardened_layer_equals_full_and_window_heads_side_by_side(routes):
    """A hardened layer is one mask over all heads, and equals the dense full / window reference head by head,
    whatever the gates still hold."""
    q, k, v = random_qkv(q_len=29)
    ctx = _padded_ctx(2, 29, pad=6)
    expected = _per_head({True: Full().reference(q, k, v, ctx, None), False: CHEAP.reference(q, k, v, ctx, None)},
                         routes)
    state = _state(routes=routes)
    torch.testing.assert_close(VARIANT.attend(q, k, v, ctx, state).float(), expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(VARIANT.reference(q, k, v, ctx, state), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("q_len,kv_len", [(75, 75), (61, 75)], ids=str)
def test_hardened_block_mask_through_flex_matches_reference(q_len, kv_len):
    """The hardened layer's one head-dependent block mask through FlexAttention (uncompiled on CPU: forward)."""
    q, k, v = random_qkv(q_len=q_len, kv_len=kv_len)
    ctx = _padded_ctx(2, kv_len, pad=9)
    state = _state(routes=ROUTES)
    index_mask, _, _ = VARIANT.index_mask(q, k, ctx, state)
    block_mask = flex.build_block_mask(index_mask, 2, 3, q_len, kv_len, "cpu", block_size=16)
    assert block_mask.kv_num_blocks.shape[1] == 3, "the block mask has one entry per head"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the uncompiled path's "materializes the full scores" notice
        out = flex.flex_masked_attention(q, k, v, block_mask, ctx.scaling, backend=None)
    torch.testing.assert_close(out, VARIANT.reference(q, k, v, ctx, state), rtol=0, atol=2e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="compiled FlexAttention with backward needs CUDA")
@pytest.mark.parametrize("hardened", [False, True], ids=["gated", "hardened"])
def test_duo_fused_path_matches_reference_on_cuda(hardened):
    state = _state(routes=ROUTES if hardened else None).cuda()
    q, k, v = (t.cuda().requires_grad_(True) for t in random_qkv(q_len=300, dim=64))
    key_valid = torch.ones(2, 300, dtype=torch.bool, device="cuda")
    key_valid[0, :9] = False
    ctx = AttnContext(scaling=0.125, key_valid=key_valid)
    fast, ref = VARIANT.attend(q, k, v, ctx, state), VARIANT.reference(q, k, v, ctx, state)
    torch.testing.assert_close(fast.float(), ref, rtol=0, atol=1e-4)
    for g_fast, g_ref in zip(torch.autograd.grad(fast.square().sum(), (q, k, v)),
                             torch.autograd.grad(ref.square().sum(), (q, k, v))):
        torch.testing.assert_close(g_fast, g_ref, rtol=0, atol=1e-3)


def test_l1_penalty_moves_the_gates_down_in_a_swapped_model():
    model = tiny_gpt2()
    attnswap.swap(model, "duo:w=4,sinks=1")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.{STATE_ATTR}.gate" for i in range(2)}
    gates = [getattr(m, STATE_ATTR).gate for m in attention_modules(model)]
    penalty = l1_penalty(model)
    assert penalty.item() == pytest.approx(2.0), "mean |gate| = 1 per layer at the start, two layers"
    optimizer = torch.optim.SGD(gates, lr=0.1)
    penalty.backward()
    for gate in gates:
        assert torch.equal(gate.grad, torch.full((4,), 0.25)), "d mean|g| / dg = sign(g) / H"
    optimizer.step()
    assert all(torch.allclose(gate, torch.full((4,), 0.975)) for gate in gates)
    # Below 1 the distillation loss reaches the gates as well.
    ids, mask = random_batch(left_pad=5)
    logits = model(ids, attention_mask=mask).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert all(gate.grad.abs().sum() > 0 for gate in gates)


def test_hardened_routing_saves_and_loads_and_stops_the_penalty(tmp_path):
    model = tiny_gpt2()
    attnswap.swap(model, "duo:w=4,sinks=1")
    routes = [torch.tensor([True, False, False, True]), torch.tensor([False, False, False, False])]
    for module, route in zip(attention_modules(model), routes):
        getattr(module, STATE_ATTR).harden(route)
    assert l1_penalty(model) is None
    ids, mask = random_batch(left_pad=3)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    loaded = attnswap.load(attnswap.save(model, tmp_path / "model"))
    for module, route in zip(attention_modules(loaded), routes):
        state = getattr(module, STATE_ATTR)
        assert bool(state.hardened) and torch.equal(state.full_heads, route)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, before, rtol=0, atol=1e-5)


def test_spec_round_trips_and_bad_parameters_are_refused():
    assert get_variant(VARIANT.spec).params == VARIANT.params and VARIANT.spec == "duo:w=5,sinks=2"
    assert Duo().label == "duo_w256_sinks4"
    with pytest.raises(AttnswapError, match="w=0"):
        get_variant("duo:w=0")
    with pytest.raises(AttnswapError, match="one flag per head"):
        _state().harden(torch.tensor([True, False]))


@pytest.mark.parametrize("hardened", [False, True], ids=["gated", "hardened"])
def test_generation_with_the_kv_cache_equals_generation_without(hardened):
    """Decode steps (T = 1 against the cache) and prefill take the same per-head routes, padding included."""
    model = tiny_gpt2()
    attnswap.swap(model, "duo:w=4,sinks=1")
    for module, gates in zip(attention_modules(model), ([1.0, 0.2, 0.0, 0.6], [0.0, 0.9, 0.4, 1.0])):
        state = getattr(module, STATE_ATTR)
        state.gate.data.copy_(torch.tensor(gates))
        if hardened:
            state.harden(state.gate > 0.5)
    ids, mask = random_batch(length=9, left_pad=3)
    generated = {use_cache: model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                           use_cache=use_cache, pad_token_id=0)
                 for use_cache in (True, False)}
    assert torch.equal(generated[True], generated[False])
