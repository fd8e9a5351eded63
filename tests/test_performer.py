"""variants/performer.py: FAVOR+ features, the chunked path against the implied-matrix reference, redraws, save/load."""

from __future__ import annotations

import pytest
import torch

import attnswap
from attnswap.errors import AttnswapError
from attnswap.kernels.dense import dense_attention
from attnswap.hf.swap import attention_modules
from attnswap.variants import AttnContext, register
from attnswap.variants.performer import Performer, PerformerParams, gaussian_features
from tests.conftest import TOLERANCE, random_batch, random_qkv, tiny_gpt2


def _padded_ctx(batch, kv_len, pad, scaling=0.3):
    key_valid = torch.ones(batch, kv_len, dtype=torch.bool)
    key_valid[0, :pad] = False
    return AttnContext(scaling=scaling, key_valid=key_valid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("q_len,kv_len", [(23, 23), (1, 23), (5, 23)], ids=["prefill", "decode", "chunked_prefill"])
def test_performer_matches_reference_with_padding(q_len, kv_len, dtype):
    variant = Performer(PerformerParams(m=24, chunk=8))
    state = variant.make_state(3, 16)
    q, k, v = random_qkv(q_len=q_len, kv_len=kv_len, dtype=dtype, requires_grad=True)
    ctx = _padded_ctx(2, kv_len, pad=4)
    fast, ref = variant.attend(q, k, v, ctx, state), variant.reference(q, k, v, ctx, state)
    assert fast.dtype == dtype
    torch.testing.assert_close(fast.float(), ref, rtol=0, atol=TOLERANCE[dtype])
    grad_out = torch.randn(fast.shape, generator=torch.Generator().manual_seed(1))
    grads_fast = torch.autograd.grad(fast, (q, k, v), grad_out.to(dtype))
    grads_ref = torch.autograd.grad(ref, (q, k, v), grad_out)
    # bf16 gradients come back rounded to bf16 (spacing 2^-5 at magnitude 5), so they are held to bf16's own
    # relative precision on top of the absolute tolerance.
    rtol = 0 if dtype == torch.float32 else 2**-6
    for name, g_fast, g_ref in zip("qkv", grads_fast, grads_ref):
        torch.testing.assert_close(g_fast.float(), g_ref.float(), rtol=rtol, atol=TOLERANCE[dtype], msg=f"d{name}")


def test_performer_outputs_never_depend_on_later_keys():
    """Each key is stabilised by the running maximum up to it, so a later key that sets a new maximum (here the
    largest logit any key can reach) changes no earlier output. With one maximum over all keys it moved them by
    as much as their own size (the FAVOR+ epsilon and underflow act relative to that maximum)."""
    variant = Performer(PerformerParams(m=64, chunk=8))
    state = variant.make_state(2, 16)
    q, k, v = random_qkv(batch=1, heads=2, q_len=20, dim=16)
    ctx = AttnContext(scaling=16**-0.5)
    before = variant.attend(q, k, v, ctx, state)
    k_late = k.clone()
    k_late[0, :, -1] = state.omega[:, 0] * 16**0.25  # undoes the scaling: the logit's maximum, |omega|^2 / 2
    after = variant.attend(q, k_late, v, ctx, state)
    assert (after[..., -1, :] - before[..., -1, :]).abs().max() > 1e-3, "the later key must matter where it is seen"
    torch.testing.assert_close(after[..., :-1, :], before[..., :-1, :], rtol=0, atol=1e-6)


def test_performer_all_padding_rows_give_zeros_not_nan():
    variant = Performer(PerformerParams(m=16, chunk=4))
    q, k, v = random_qkv(q_len=9, requires_grad=True)
    out = variant.attend(q, k, v, _padded_ctx(2, 9, pad=5), variant.make_state(3, 16))
    assert out[0, :, :5].abs().max() == 0
    out.square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_performer_implied_attention_rows_are_causal_distributions():
    variant = Performer(PerformerParams(m=32))
    q, k, _ = random_qkv(q_len=11)
    probs = variant.probs(q, k, _padded_ctx(2, 11, pad=3), variant.make_state(3, 16))
    assert (probs >= 0).all() and probs.triu(diagonal=1).abs().max() == 0
    assert probs[0, :, :, :3].abs().max() == 0
    torch.testing.assert_close(probs[0, :, 3:].sum(-1), torch.ones(3, 8))
    torch.testing.assert_close(probs[1].sum(-1), torch.ones(3, 11))


def test_orthogonal_features_are_orthogonal_in_blocks_and_unbiased():
    omega = gaussian_features(2, 4 * 3000, 4, orthogonal=True, generator=torch.Generator().manual_seed(0))
    block = omega[0, :4]
    directions = block / block.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(directions @ directions.T, torch.eye(4), atol=1e-5, rtol=0)
    # Rows must be N(0, I) in distribution: mean 0 and covariance I (a Householder sign bias shows up in the mean).
    rows = omega.reshape(-1, 4)
    assert rows.mean(0).abs().max() < 0.05, rows.mean(0)
    torch.testing.assert_close(rows.T @ rows / rows.shape[0], torch.eye(4), atol=0.05, rtol=0)


def test_performer_error_to_softmax_falls_with_more_features():
    q, k, v = random_qkv(batch=2, heads=2, q_len=33, dim=16)
    q, k = q * 0.5, k * 0.5  # moderate norms: the regime where random features are accurate
    ctx = AttnContext(scaling=16**-0.5)
    exact = dense_attention(q, k, v, torch.ones(33, 33, dtype=torch.bool).tril(), ctx.scaling)
    errors = []
    for m in (16, 64, 256, 1024):
        per_seed = []
        for seed in range(3):
            variant = Performer(PerformerParams(m=m, seed=seed))
            per_seed.append((variant.attend(q, k, v, ctx, variant.make_state(2, 16)) - exact).abs().mean())
        errors.append(torch.stack(per_seed).mean().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), f"mean abs error over m=16,64,256,1024: {errors}"
    assert errors[-1] < 0.25 * errors[0], errors


def test_redraw_changes_features_after_n_training_calls_and_never_in_eval():
    variant = Performer(PerformerParams(m=8, redraw=3))
    state = variant.make_state(2, 4)
    q, k, v = random_qkv(batch=1, heads=2, q_len=5, dim=4)
    ctx = AttnContext(scaling=0.5)
    first = state.omega.clone()
    state.eval()
    for _ in range(5):
        variant.attend(q, k, v, ctx, state)
    assert torch.equal(state.omega, first), "eval calls must not redraw"
    state.train()
    for _ in range(2):
        variant.attend(q, k, v, ctx, state)
    assert torch.equal(state.omega, first), "redrawn before 3 training calls"
    variant.attend(q, k, v, ctx, state)
    assert not torch.equal(state.omega, first), "not redrawn after 3 training calls"
    assert state.omega.shape == first.shape


def test_performer_params_are_validated_and_named():
    with pytest.raises(AttnswapError, match="m >= 1"):
        PerformerParams(m=0)
    with pytest.raises(AttnswapError, match="redraw"):
        PerformerParams(redraw=-1)
    assert Performer().label == "performer_m256"
    assert Performer(PerformerParams(m=64, redraw=10, orthogonal=False)).label == "performer_m64_redraw10_iid"


def test_performer_in_tiny_gpt2_trains_and_round_trips_redrawn_features(tmp_path):
    register(Performer)
    model = tiny_gpt2()
    ids, mask = random_batch(left_pad=5)
    attnswap.swap(model, Performer(PerformerParams(m=16, redraw=1)), trainable="all")
    model.train()
    logits = model(ids, attention_mask=mask).logits  # one training call: every layer redraws once
    assert torch.isfinite(logits).all()
    logits[mask.bool()].logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    states = [m.attnswap for m in attention_modules(model)]
    initial = Performer(PerformerParams(m=16)).make_state(4, 8).omega
    assert not torch.equal(states[0].omega, initial)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    loaded = attnswap.load(attnswap.save(model, tmp_path / "performer"))
    for original, restored in zip(states, (m.attnswap for m in attention_modules(loaded))):
        assert torch.equal(original.omega, restored.omega), "the redrawn ω must survive save/load"
    with torch.no_grad():
        after = loaded(ids, attention_mask=mask).logits
    assert (before - after)[mask.bool()].abs().max() <= 1e-5


def test_performer_gradients_stay_finite_when_early_keys_underflow():
    """Early keys of large norm have logits far below the shared key stabiliser (set by later keys), so the
    first queries' normalisers underflow; the pretrained teacher hit this at step 1 (gradient norm NaN)."""
    from attnswap.variants import AttnContext
    from attnswap.variants.performer import Performer, PerformerParams

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    k[:, :, :5] *= 8.0
    q.requires_grad_(True)
    k.requires_grad_(True)
    variant = Performer(PerformerParams(m=64))
    state = variant.make_state(2, 16)
    out = variant.attend(q, k, v, AttnContext(scaling=16 ** -0.5), state)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_features_of_a_continuation_equal_those_of_the_whole_sequence():
    """A cached decode step sees only its new keys; handed the running scale of the keys before them, it gets the
    features and scales a forward over the whole sequence gives those keys (so cached generation is exact)."""
    variant = Performer(PerformerParams(m=16, chunk=4))
    state = variant.make_state(3, 16)
    q, k, _ = random_qkv(q_len=23, kv_len=23)
    ctx = AttnContext(scaling=0.3)
    whole = variant.features(q, k, ctx, state)
    head = variant.features(q[..., :15, :], k[..., :15, :], ctx, state)
    tail = variant.features(q[..., 15:, :], k[..., 15:, :], ctx, state, running_scale=head.key_log_scale[..., -1])
    torch.testing.assert_close(tail.key_log_scale, whole.key_log_scale[..., 15:], rtol=0, atol=0)
    torch.testing.assert_close(tail.k, whole.k[..., 15:, :], rtol=0, atol=1e-7)
    alone = variant.features(q[..., 15:, :], k[..., 15:, :], ctx, state)
    assert not torch.equal(alone.key_log_scale, whole.key_log_scale[..., 15:]), "the test needs a scale to carry"
