"""variants/mixture.py: candidate masks, the soft mixture against its definition, the L1 penalty, hardening."""

from __future__ import annotations

import pytest
import torch

import attnswap
from attnswap.errors import AttnswapError
from attnswap.kernels.masks import materialize, to_index_mask
from attnswap.hf.attention import STATE_ATTR
from attnswap.hf.swap import attention_modules, l1_penalty
from attnswap.variants import AttnContext, register
from attnswap.variants.base import parse_params
from attnswap.variants.full import Full
from attnswap.variants.mixture import (
    DEFAULT_CANDIDATES, Mixture, MixtureParams, candidate_mask, density, harden, report, survivors,
)
from attnswap.variants.window import Window
from tests.conftest import TOLERANCE, random_batch, random_qkv, tiny_gpt2

SHORT = ("win4", "sink2", "dil3_3", "stride5", "full")  # every shape of candidate, visible within 23 tokens


def _mixture(candidates=SHORT, **kwargs) -> Mixture:
    return Mixture(MixtureParams(candidates=candidates, **kwargs))


def _padded_ctx(batch: int, kv_len: int, pad: int = 4) -> AttnContext:
    key_valid = torch.ones(batch, kv_len, dtype=torch.bool)
    key_valid[0, :pad] = False
    return AttnContext(scaling=0.3, key_valid=key_valid)


# --- candidates and parameters -----------------------------------------------------------------
DEFINITIONS = {
    "win5": lambda q, kv, first: q - kv < 5,
    "sink2": lambda q, kv, first: kv - first < 2,
    "dil3_4": lambda q, kv, first: (q - kv) % 4 == 0 and q - kv < 12,
    "stride4": lambda q, kv, first: (kv - first) % 4 == 3,
    "full": lambda q, kv, first: True,
}


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
def test_candidate_masks_match_their_definitions(name):
    n, first_real = 17, torch.tensor([3, 0])
    key_valid = torch.arange(n).unsqueeze(0) >= first_real.unsqueeze(1)  # (2, n): row 0 left-padded by 3
    pos = torch.arange(n)
    allowed = materialize(to_index_mask(candidate_mask(name, first_real), pos, pos, key_valid), 2, 1, n, n, "cpu")
    expected = torch.tensor([[[kv <= q and kv >= first and DEFINITIONS[name](q, kv, first) for kv in range(n)]
                              for q in range(n)] for first in first_real.tolist()])
    assert torch.equal(allowed[:, 0], expected)


@pytest.mark.parametrize("candidates", [("win4", "window8"), ("win0",), ("dil4",), ()], ids=str)
def test_bad_candidate_is_one_line_error_naming_the_forms(candidates):
    with pytest.raises(AttnswapError, match="winN|at least one|zero size"):
        MixtureParams(candidates=candidates)


@pytest.mark.parametrize("params", [dict(per="token"), dict(weights="relu"), dict(init=1.0),
                                    dict(candidates=("win4", "win4"))], ids=str)
def test_bad_parameters_are_refused(params):
    with pytest.raises(AttnswapError):
        MixtureParams(**params)


def test_spec_round_trips_and_defaults_follow_the_stated_rule():
    params = parse_params("mixture", MixtureParams, "candidates=win4+dil64_4+sink4,per=layer,weights=softmax")
    assert params == MixtureParams(candidates=("win4", "dil64_4", "sink4"), per="layer", weights="softmax")
    variant = Mixture(params)
    assert parse_params("mixture", MixtureParams, variant.spec.partition(":")[2]) == params
    assert variant.label == "mixture_k3_layer_softmax"
    assert Mixture().label == "mixture_k10_head"
    assert DEFAULT_CANDIDATES[:7] == tuple(f"win{2 ** i}" for i in range(2, 9))


# --- the soft mixture --------------------------------------------------------------------------
def _randomised_state(variant: Mixture, heads: int, seed: int = 0):
    state = variant.make_state(heads, 16)
    with torch.no_grad():
        state.logits.copy_(torch.randn(state.logits.shape, generator=torch.Generator().manual_seed(seed)))
    return state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per,weights", [("head", "sigmoid"), ("layer", "softmax")])
@pytest.mark.parametrize("candidates", [SHORT, DEFAULT_CANDIDATES], ids=["short", "default"])
def test_mixture_matches_reference_with_padding_and_decode(candidates, per, weights, dtype):
    variant = _mixture(candidates, per=per, weights=weights)
    state = _randomised_state(variant, heads=3)
    if per == "head":
        state.harden(0.5)  # heads keep different candidates
    for q_len, kv_len in [(23, 23), (1, 23), (5, 23)]:
        q, k, v = random_qkv(q_len=q_len, kv_len=kv_len, dtype=dtype, requires_grad=True)
        ctx = _padded_ctx(2, kv_len)
        fast, ref = variant.attend(q, k, v, ctx, state), variant.reference(q, k, v, ctx, state)
        torch.testing.assert_close(fast.float(), ref, rtol=0, atol=TOLERANCE[dtype])
        inputs = (q, k, v, state.logits)
        grads_fast = torch.autograd.grad(fast.float().square().sum(), inputs)
        grads_ref = torch.autograd.grad(ref.square().sum(), inputs)
        for name, g_fast, g_ref in zip(("q", "k", "v", "logits"), grads_fast, grads_ref):
            torch.testing.assert_close(g_fast.float(), g_ref.float(), rtol=0, atol=TOLERANCE[dtype] * 10,
                                       msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("candidates", [("full",), ("win64",), ("win8", "full")], ids=str)
def test_mixture_covering_everything_equals_full_attention(candidates):
    variant = _mixture(candidates)
    state = _randomised_state(variant, heads=3)
    q, k, v = random_qkv(q_len=23)
    ctx = _padded_ctx(2, 23)
    expected = Full().reference(q, k, v, ctx, None)
    if len(candidates) == 1:  # one candidate: log M is a constant per head, which softmax ignores
        torch.testing.assert_close(variant.attend(q, k, v, ctx, state).float(), expected, rtol=0, atol=2e-5)
    # With several, full attention is the limit where the covering candidate outweighs the others.
    with torch.no_grad():
        state.logits[:, :-1] = -30.0
    torch.testing.assert_close(variant.attend(q, k, v, ctx, state).float(), expected, rtol=0, atol=2e-5)


def test_all_padding_rows_and_keyless_queries_give_zeros_not_nan():
    variant = _mixture(("stride4",))  # the first three tokens of a row see no summary token
    state = variant.make_state(3, 16)
    q, k, v = random_qkv(q_len=9)
    out = variant.attend(q, k, v, _padded_ctx(2, 9, pad=3), state)
    assert torch.isfinite(out).all()
    assert out[0, :, :6].abs().max() == 0 and out[1, :, :3].abs().max() == 0


def test_gradients_reach_mixture_weights_in_swapped_gpt2():
    model = tiny_gpt2()
    attnswap.swap(model, Mixture())
    ids, mask = random_batch(left_pad=5)
    logits = model(ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + l1_penalty(model)
    loss.backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.{STATE_ATTR}.logits" for i in range(2)}
    for module in attention_modules(model):
        grad = getattr(module, STATE_ATTR).logits.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0


# --- the L1 penalty ----------------------------------------------------------------------------
def _fit_to_window4(l1_weight: float, steps: int = 100) -> torch.Tensor:
    """Fit a mixture to win4 attention by cross-entropy (+ L1); returns the normalised weights (H, K)."""
    # dil4_1 is win4 under another name: no attention loss can tell them apart, only the penalty can.
    variant = _mixture(("win4", "dil4_1", "win16", "sink4", "full"))
    state = variant.make_state(2, 8)
    q, k, _ = random_qkv(batch=2, heads=2, q_len=24, dim=8)
    ctx = AttnContext(scaling=1.0)
    target = Window(Window.Params(w=4)).probs(q, k, ctx, None)
    optimiser = torch.optim.Adam(state.parameters(), lr=0.1)
    for _ in range(steps):
        student = variant.probs(q, k, ctx, state)
        cross_entropy = -(target * student.clamp_min(1e-30).log()).sum(-1).mean()
        loss = cross_entropy + l1_weight * variant.l1_penalty(state)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return state.normalised().detach()


def test_l1_penalty_leaves_one_of_identical_candidates_and_drops_useless_ones():
    with_l1 = _fit_to_window4(l1_weight=0.2)
    local, others = with_l1[:, :2], with_l1[:, 2:]
    assert (others < 0.1).all(), f"useless candidates kept: {with_l1}"
    assert torch.equal(local.max(-1).values, torch.ones(2)) and (local.min(-1).values < 0.1).all(), f"{with_l1}"
    without_l1 = _fit_to_window4(l1_weight=0.0, steps=50)
    torch.testing.assert_close(without_l1[:, 0], without_l1[:, 1])  # the tie stays: attention alone cannot break it


def test_l1_penalty_is_scale_free():
    variant = _mixture(SHORT, weights="sigmoid")
    state = variant.make_state(2, 8)
    assert variant.l1_penalty(state).item() == pytest.approx(len(SHORT))  # equal weights: every one counts fully
    with torch.no_grad():
        state.logits.fill_(-3.0)  # all weights ~20x smaller, still equal: same attention, same penalty
    assert variant.l1_penalty(state).item() == pytest.approx(len(SHORT))


# --- hardening ---------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", ["sigmoid", "softmax"])
def test_hardening_keeps_outputs_drops_zero_weight_candidates_and_reduces_density(weights):
    variant = _mixture(SHORT, weights=weights)
    state = variant.make_state(3, 16)
    with torch.no_grad():  # -1e4 gives weights of exactly zero under both parametrisations
        state.logits[0, 1:] = -1e4  # head 0: win4 only
        state.logits[1, 2:] = -1e4  # head 1: win4 + sink2; head 2 keeps all five
    q, k, v = random_qkv(batch=2, heads=3, q_len=21)
    ctx = _padded_ctx(2, 21)
    soft = variant.attend(q, k, v, ctx, state)
    dense_before = density(state, 12)
    harden(state, 0.1)
    assert state.kept.tolist() == [[True] + [False] * 4, [True, True] + [False] * 3, [True] * 5]
    torch.testing.assert_close(variant.attend(q, k, v, ctx, state), soft, rtol=0, atol=2e-5)
    torch.testing.assert_close(variant.reference(q, k, v, ctx, state), soft, rtol=0, atol=2e-5)
    dense_after = density(state, 12)
    assert dense_after[0].item() == pytest.approx(42 / 78)  # win4 on 12 tokens: 1 + 2 + 3 + 4 * 9 of 78 keys
    assert (dense_after[:2] < dense_before[:2]).all() and dense_after[2] == dense_before[2] == 1.0
    assert variant.l1_penalty(state).item() == pytest.approx((1 + 2 + 5) / 3)
    assert survivors(state)["kept"] == [["win4"], ["win4", "sink2"], list(SHORT)]


def test_hardened_mask_is_per_head_union_of_kept_candidates():
    variant = _mixture(SHORT)
    state = variant.make_state(3, 16)
    state.kept.copy_(torch.tensor([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool))
    q, k, _ = random_qkv(batch=2, heads=3, q_len=19)
    ctx = _padded_ctx(2, 19)
    index_mask, q_pos, kv_pos = variant.index_mask(q, k, ctx, state)
    allowed = materialize(index_mask, 2, 3, 19, 19, "cpu")
    first_real = ctx.first_real_token(2, "cpu")

    def only(*names):
        masks = [to_index_mask(candidate_mask(n, first_real), q_pos, kv_pos, ctx.key_valid) for n in names]
        return torch.stack([materialize(m, 2, 1, 19, 19, "cpu")[:, 0] for m in masks]).any(0)

    for head, names in enumerate([("win4",), ("sink2", "dil3_3"), ("stride5",)]):
        assert torch.equal(allowed[:, head], only(*names)), f"head {head}"


def test_harden_refuses_bad_threshold_and_models_without_a_mixture():
    with pytest.raises(AttnswapError, match="threshold"):
        _mixture().make_state(2, 8).harden(1.5)
    model = tiny_gpt2()
    attnswap.swap(model, "window:w=4")
    with pytest.raises(AttnswapError, match="no mixture state"):
        harden(model, 0.1)


def test_hardened_state_round_trips_through_save_and_load(tmp_path):
    register(Mixture)
    model = tiny_gpt2()
    attnswap.swap(model, Mixture())
    generator = torch.Generator().manual_seed(1)
    for module in attention_modules(model):
        with torch.no_grad():
            getattr(module, STATE_ATTR).logits.copy_(torch.randn(4, 10, generator=generator) * 2)
    summary = harden(model, 0.3)
    assert any(len(kept) < 10 for layer in summary.values() for kept in layer["kept"]), "nothing was dropped"
    ids, mask = random_batch(left_pad=5)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    attnswap.save(model, tmp_path / "mixture")
    loaded = attnswap.load(tmp_path / "mixture")
    assert report(loaded, 64) == report(model, 64)
    with torch.no_grad():
        got = loaded(ids, attention_mask=mask).logits
    assert (got - expected)[mask.bool()].abs().max().item() <= 1e-5
