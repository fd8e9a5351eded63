"""variants/hedgehog.py: the learned feature map, the chunked path against the reference, a tiny GPT-2, save/load."""

from __future__ import annotations

import pytest
import torch

import attnswap
from attnswap.errors import AttnswapError
from attnswap.hf.swap import attention_modules, variant_state_dict
from attnswap.variants import AttnContext, get_variant, register
import attnswap.variants.hedgehog as hedgehog
from attnswap.variants.hedgehog import Hedgehog, HedgehogParams
from tests.conftest import TOLERANCE, random_batch, random_qkv, tiny_gpt2


def _perturbed_state(variant, heads, head_dim, seed=0):
    """A state moved off its identity start, so that the test exercises a general learned map."""
    state = variant.make_state(heads, head_dim)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in state.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return state


def test_hedgehog_features_start_from_identity_and_are_positive():
    state = Hedgehog().make_state(3, 8)
    assert torch.equal(state.weight, torch.eye(8).expand(2, 3, 8, 8)) and state.bias.abs().max() == 0
    assert all(p.dtype == torch.float32 and p.requires_grad for p in state.parameters())
    q, _, _ = random_qkv(q_len=5, dim=8)
    phi = state(q)
    assert phi.shape == (2, 3, 5, 16) and (phi > 0).all()
    torch.testing.assert_close(phi.sum(-1), torch.full((2, 3, 5), 2.0))  # two softmaxes, each summing to 1
    assert Hedgehog(HedgehogParams(feature_dim=5)).make_state(3, 8).weight.shape == (2, 3, 8, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("q_len,kv_len", [(23, 23), (1, 23), (5, 23)], ids=["prefill", "decode", "chunked_prefill"])
def test_hedgehog_matches_reference_with_padding(q_len, kv_len, dtype):
    variant = Hedgehog(HedgehogParams(feature_dim=12, chunk=8))
    state = _perturbed_state(variant, 3, 16)
    q, k, v = random_qkv(q_len=q_len, kv_len=kv_len, dtype=dtype, requires_grad=True)
    key_valid = torch.ones(2, kv_len, dtype=torch.bool)
    key_valid[0, :4] = False
    ctx = AttnContext(scaling=0.3, key_valid=key_valid)
    fast, ref = variant.attend(q, k, v, ctx, state), variant.reference(q, k, v, ctx, state)
    assert fast.dtype == dtype
    torch.testing.assert_close(fast.float(), ref, rtol=0, atol=TOLERANCE[dtype])
    grad_out = torch.randn(fast.shape, generator=torch.Generator().manual_seed(1))
    inputs = (q, k, v, state.weight, state.bias)
    grads_fast = torch.autograd.grad(fast, inputs, grad_out.to(dtype))
    grads_ref = torch.autograd.grad(ref, inputs, grad_out)
    for name, g_fast, g_ref in zip(("q", "k", "v", "W", "b"), grads_fast, grads_ref):
        assert g_fast.abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(g_fast.float(), g_ref.float(), rtol=0, atol=TOLERANCE[dtype], msg=f"d{name}")


def test_hedgehog_with_reordered_key_slots_equals_plain_order():
    # A rolling cache stores keys out of position order and says so through kv_positions.
    variant = Hedgehog(HedgehogParams(chunk=4))
    state = _perturbed_state(variant, 3, 16)
    q, k, v = random_qkv(q_len=3, kv_len=11)
    plain = variant.attend(q, k, v, AttnContext(scaling=0.3), state)
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    ctx = AttnContext(scaling=0.3, q_positions=torch.arange(8, 11), kv_positions=order)
    rolled = variant.attend(q, k[:, :, order], v[:, :, order], ctx, state)
    torch.testing.assert_close(rolled, plain, rtol=0, atol=TOLERANCE[torch.float32])


def test_hedgehog_params_are_validated_and_named():
    with pytest.raises(AttnswapError, match="feature_dim"):
        HedgehogParams(feature_dim=-1)
    with pytest.raises(AttnswapError, match="chunk"):
        HedgehogParams(chunk=0)
    assert Hedgehog(HedgehogParams(feature_dim=64)).label == "hedgehog_f64"
    assert Hedgehog().label == "hedgehog"


def test_hedgehog_in_tiny_gpt2_trains_with_padding_and_round_trips(tmp_path):
    register(Hedgehog)
    model = tiny_gpt2()
    ids, mask = random_batch(length=19, left_pad=6)
    attnswap.swap(model, Hedgehog(HedgehogParams(chunk=8)))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".attnswap." in name for name in trainable)
    logits = model(ids, attention_mask=mask).logits
    assert torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][mask[:, 1:].bool()], ids[:, 1:][mask[:, 1:].bool()])
    loss.backward()
    for module in attention_modules(model):
        assert module.attnswap.weight.grad.abs().sum() > 0 and module.attnswap.bias.grad.abs().sum() > 0
    with torch.no_grad():  # a "trained" map, so the round trip has something to restore
        for p in model.parameters():
            if p.requires_grad:
                p.sub_(p.grad)
        before = model(ids, attention_mask=mask).logits
    loaded = attnswap.load(attnswap.save(model, tmp_path / "hedgehog"))
    saved_state, loaded_state = variant_state_dict(model), variant_state_dict(loaded)
    assert saved_state.keys() == loaded_state.keys() and len(saved_state) == 4  # W and b in each of 2 layers
    assert all(torch.equal(saved_state[key], loaded_state[key]) for key in saved_state)
    with torch.no_grad():
        after = loaded(ids, attention_mask=mask).logits
    assert (before - after)[mask.bool()].abs().max() <= 1e-5


def _gradients_of_mismatched_sharp_maps(sharpness: float, floor: float = hedgehog.FEATURE_FLOOR) -> list[torch.Tensor]:
    """Maps so sharp that every query's features and every key's sit on different coordinates: phi(q)·phi(k) is
    about exp(-sharpness), the normaliser with it, and its gradient -num / den² overflows without the floor."""
    variant = Hedgehog(HedgehogParams(feature_dim=8, chunk=8, floor=floor))
    state = variant.make_state(1, 8)
    with torch.no_grad():
        state.weight.mul_(sharpness)
    unit = (8**-0.5) ** -0.5  # undoes the half of the scaling the map applies, so the logits are ±sharpness
    q = torch.zeros(1, 1, 16, 8)
    q[..., 0], q[..., 1] = unit, -unit
    k = torch.zeros(1, 1, 16, 8)
    k[..., 2], k[..., 3] = unit, -unit
    v = torch.randn(1, 1, 16, 8, generator=torch.Generator().manual_seed(0))
    inputs = [t.requires_grad_(True) for t in (q, k, v)] + [state.weight]
    out = variant.attend(*inputs[:3], AttnContext(scaling=8**-0.5), state)
    return list(torch.autograd.grad(out.square().sum(), inputs))


def test_the_feature_floor_keeps_gradients_of_sharp_maps_finite():
    assert all(torch.isfinite(g).all() for g in _gradients_of_mismatched_sharp_maps(100.0))
    assert not all(torch.isfinite(g).all() for g in _gradients_of_mismatched_sharp_maps(100.0, floor=0.0))  # the risk
    assert all(torch.isfinite(g).all() for g in _gradients_of_mismatched_sharp_maps(100.0, floor=1e-6))


def test_the_spec_sets_the_floor():
    from attnswap.variants import get_variant

    variant = get_variant("hedgehog:floor=1e-6")
    assert variant.params.floor == 1e-6 and variant.label == "hedgehog_floor1e-06"
    assert variant.make_state(2, 4).floor == 1e-6
    assert get_variant("hybrid:w=8,floor=0.001").make_state(2, 4).feature_map.floor == 1e-3
    with pytest.raises(AttnswapError, match=r"floor must be in \[0, 1\)"):
        get_variant("hedgehog:floor=1")
    assert get_variant("hedgehog:floor=0.0001").label == "hedgehog"  # the default's spec is the plain one


@pytest.mark.slow
def test_the_compiled_feature_map_equals_the_eager_one_with_gradients():
    """What CUDA runs (one compiled function, in fla's layout), here compiled for the CPU: the same features and
    gradients."""
    state = _perturbed_state(Hedgehog(), heads=3, head_dim=8)
    x = torch.randn(2, 3, 37, 8, dtype=torch.bfloat16, requires_grad=True)
    weights = torch.randn(2, 3, 37, 16)
    results = []
    for features in (hedgehog.softmax_features, torch.compile(hedgehog.softmax_features_in_fla_layout)):
        phi = features(x, state.weight[state.KEYS], state.bias[state.KEYS], 0.5, 1e-4)
        results.append((phi, *torch.autograd.grad((phi * weights).sum(), (x, state.weight, state.bias))))
    for name, eager, compiled in zip(("phi", "dx", "dW", "db"), *results):
        assert compiled.dtype == eager.dtype, name
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6, msg=name)


def test_a_parameter_added_later_leaves_earlier_specs_as_they_were():
    assert get_variant("hedgehog").spec == "hedgehog:feature_dim=0,chunk=64"  # as runs before `floor` saved it
    floored = get_variant("hedgehog:floor=1e-6")
    assert floored.spec == "hedgehog:feature_dim=0,chunk=64,floor=1e-06"
    assert get_variant(floored.spec).params == floored.params and floored.label == "hedgehog_floor1e-06"
