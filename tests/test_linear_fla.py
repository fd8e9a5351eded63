"""kernels/linear.py on fla-core: the same causal linear attention as the PyTorch scan, outputs and gradients.

The CUDA tests need fla-core (``pip install 'attnswap[cuda]'``) and skip without it. fla's kernels do not run under
Triton's CPU interpreter (its autotuner asks for a GPU driver, and its loops call ``.to`` on indices the interpreter
makes plain ints), so on the CPU the tests here check only what surrounds them: the gate convention, the layout and
the choice of op, with a naive simple GLA standing in for fla.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch

from attnswap.kernels import linear
from attnswap.kernels.kv_cache import linear_attention_extend
from attnswap.kernels.linear import _CausalProduct, _fla_causal_product, causal_linear_attention, pytorch_scan

# Relative to the largest reference value: fla's products are TF32 (10-bit mantissa), the outputs and dv bf16.
TF32_TOL = 5e-3
BF16_TOL = 1e-2


def assert_close_to_scale(got, want, tol, name):
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=tol * want.abs().max().item(),
                               msg=lambda m: f"{name}: {m}")


def climbing_log_scale(batch, heads, length, generator, floor_until=0):
    """A non-decreasing key log-scale (B, H, S) that climbs 400 nats, far past what exp holds; batch row 0 sits at
    finfo.min for its first ``floor_until`` keys, as Performer's does before its first real key."""
    s = torch.cumsum(torch.rand(batch, heads, length, generator=generator) * 400 / length, dim=-1)
    s[0, :, :floor_until] = torch.finfo(torch.float32).min
    return s


# --- CPU: the glue around fla, with a naive simple GLA in its place ---------------------------------------

def naive_simple_gla(q, k, v, g=None, scale=1.0):
    """fla's simple GLA written out: q, k (B, T, H, K), v (B, T, H, V), g (B, T, H) -> (o (B, T, H, V), None),
    o_i = scale·sum_{j<=i} (q_i·k_j) exp(g_{j+1} + … + g_i) v_j; in base 2, as fla, which multiplies g by 1/ln 2."""
    weights = torch.einsum("bihk,bjhk->bhij", q, k) * scale  # (B, H, T, T)
    length = q.shape[1]
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    if g is not None:
        cum = (g.float() / math.log(2)).transpose(1, 2).cumsum(dim=-1)  # (B, H, T)
        weights = weights * torch.exp2((cum[..., :, None] - cum[..., None, :]).masked_fill(future, float("-inf")))
    return torch.einsum("bhij,bjhv->bihv", weights.masked_fill(future, 0.0), v).contiguous(), None  # as fla allocates


def fake_fla(gated_backward_sound=True, calls=None):
    def op(name):
        def run(*args, **kwargs):
            if calls is not None:
                calls.append(name)
            return naive_simple_gla(*args, **kwargs)
        return run
    return SimpleNamespace(chunk=op("chunk"), fused_chunk=op("fused_chunk"), gated_backward_sound=gated_backward_sound)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "key_log_scale"])
def test_fla_gate_and_layout_match_the_pytorch_scan(scaled):
    """The product as fla is called for it (log-gate from the key log-scale, clamped; (B, T, H, ·) layout) equals
    the PyTorch scan, forward and gradients, with a scale that starts at finfo.min and then climbs 400 nats."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(2, 3, 37, 6, generator=g, requires_grad=True) for _ in range(2))
    c = torch.randn(2, 3, 37, 5, generator=g, requires_grad=True)
    log_scale = climbing_log_scale(2, 3, 37, g, floor_until=4) if scaled else None
    grad_out = torch.randn(2, 3, 37, 5, generator=g)
    got = _fla_causal_product(fake_fla(), a, b, c.transpose(1, 2), log_scale).transpose(1, 2)
    want = _CausalProduct.apply(a, b, c, 8, 16, log_scale)
    assert_close_to_scale(got, want, 1e-5, "out")
    for name, gr, ex in zip(("da", "db", "dc"), torch.autograd.grad(got, (a, b, c), grad_out),
                            torch.autograd.grad(want, (a, b, c), grad_out)):
        assert torch.isfinite(gr).all(), f"{name} has NaN/inf"
        assert_close_to_scale(gr, ex, 1e-5, name)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "key_log_scale"])
@pytest.mark.parametrize("prefix, return_normaliser", [(0, True), (7, True), (0, False)],
                         ids=["own_keys", "after_a_prefix", "own_keys_in_fla_layout"])
def test_the_whole_fla_route_matches_the_pytorch_scan(scaled, prefix, return_normaliser, monkeypatch):
    """causal_linear_attention as it runs with fla (fla's layout and gate around it): outputs, normalisers and
    gradients equal the PyTorch scan's, after a prefix of cached keys too; without a normaliser asked for, training's
    route, which stays in fla's layout throughout."""
    g = torch.Generator().manual_seed(2)
    phi_q = torch.rand(2, 3, 30, 6, generator=g, requires_grad=True)
    phi_k = torch.rand(2, 3, 30 + prefix, 6, generator=g, requires_grad=True)
    v = torch.randn(2, 3, 30 + prefix, 5, generator=g, requires_grad=True)
    log_scale = climbing_log_scale(2, 3, 30 + prefix, g) if scaled else None
    calls = []
    monkeypatch.setattr(linear, "_fla_serving", lambda phi_q, v: fake_fla(calls=calls))
    got = causal_linear_attention(phi_q, phi_k, v, chunk=8, key_log_scale=log_scale,
                                  return_normaliser=return_normaliser)
    assert calls == ["chunk"]
    monkeypatch.setattr(linear, "_fla_serving", lambda phi_q, v: None)
    want = causal_linear_attention(phi_q, phi_k, v, chunk=8, key_log_scale=log_scale,
                                   return_normaliser=return_normaliser)
    if not return_normaliser:  # stand-ins with no gradient of their own, for the loss below
        assert got.shape == want.shape and got.transpose(1, 2).is_contiguous(), "out is a view of fla's layout"
        got, want = (got, got.new_zeros(got.shape[:-1])), (want, want.new_zeros(want.shape[:-1]))
    weights = torch.randn(want[0].shape, generator=g)
    for name, x, y in zip(("out", "normaliser"), got, want):
        assert_close_to_scale(x, y, 1e-5, name)
    loss = [(out * weights).sum() + normaliser.sum() for out, normaliser in (got, want)]
    for name, gr, ex in zip(("dphi_q", "dphi_k", "dv"), torch.autograd.grad(loss[0], (phi_q, phi_k, v)),
                            torch.autograd.grad(loss[1], (phi_q, phi_k, v))):
        assert_close_to_scale(gr, ex, 1e-5, name)


@pytest.mark.parametrize("sound, grad, expected", [(True, True, "chunk"), (False, False, "chunk"),
                                                   (False, True, "fused_chunk")],
                         ids=["sound_backward", "unsound_no_grad", "unsound_with_grad"])
def test_gated_product_avoids_an_unsound_chunked_backward(sound, grad, expected):
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.rand(1, 2, 9, 4, generator=g, requires_grad=grad) for _ in range(3))
    c = c.transpose(1, 2)  # values come in fla's layout
    calls = []
    _fla_causal_product(fake_fla(sound, calls), a, b, c, climbing_log_scale(1, 2, 9, g))
    assert calls == [expected]
    calls.clear()
    _fla_causal_product(fake_fla(sound, calls), a, b, c, None)
    assert calls == ["chunk"], "without a gate the chunked op always serves"


@pytest.mark.parametrize("return_normaliser", [False, True], ids=["output", "with_normaliser"])
def test_features_and_values_stored_in_fla_layout_reach_fla_without_a_copy(return_normaliser, monkeypatch):
    """Training's route: features stored as (B, T, H, M) (Hedgehog's map on CUDA) and values as the model's own
    (B, T, H, D) reach fla contiguous, so its input guard copies nothing; the output and normaliser are views of its
    output, in the model's (B, H, T, ·) shape."""
    g = torch.Generator().manual_seed(3)
    phi_q, phi_k = (torch.rand(2, 19, 3, 6, generator=g).transpose(1, 2) for _ in range(2))  # (B, H, T, M) views
    v = torch.randn(2, 19, 3, 5, generator=g).transpose(1, 2)
    seen = []

    def recording(*args, **kwargs):
        seen.append([x.is_contiguous() for x in args[:3]])
        return naive_simple_gla(*args, **kwargs)

    monkeypatch.setattr(linear, "_fla_serving", lambda phi_q, v: SimpleNamespace(chunk=recording))
    got = causal_linear_attention(phi_q, phi_k, v, return_normaliser=return_normaliser)
    assert seen == [[True, True, True]], seen
    out = got[0] if return_normaliser else got
    assert out.shape == v.shape and out.transpose(1, 2).is_contiguous()
    monkeypatch.setattr(linear, "_fla_serving", lambda phi_q, v: None)
    want = causal_linear_attention(phi_q, phi_k, v, return_normaliser=return_normaliser)
    for x, y in zip(got if return_normaliser else [got], want if return_normaliser else [want]):
        assert_close_to_scale(x, y, 1e-5, "through fla's layout")


def test_pytorch_scan_switches_fla_off_and_back():
    assert linear._fla_enabled
    with pytorch_scan():
        assert linear._fla() is None
    assert linear._fla_enabled


# --- CUDA: fla itself against the PyTorch scan --------------------------------------------------------

needs_fla = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("fla") is None,
                               reason="needs CUDA and fla-core (pip install 'attnswap[cuda]')")

# One (H, M, D) throughout: fla autotunes and compiles its kernels for every new one, tens of seconds each.
HEADS, M, D = 2, 32, 16


def features(batch, q_len, kv_len, seed, pad=0):
    """Positive phi_q (B, H, T, M), phi_k (B, H, S, M) fp32 and v (B, H, S, D) bf16 on CUDA; batch row 0 has its
    first ``pad`` keys padded (phi_k rows zeroed)."""
    g = torch.Generator().manual_seed(seed)
    phi_q = torch.randn(batch, HEADS, q_len, M, generator=g).mul(0.5).exp() / M
    phi_k = torch.randn(batch, HEADS, kv_len, M, generator=g).mul(0.5).exp() / M
    phi_k[0, :, :pad] = 0.0
    v = torch.randn(batch, HEADS, kv_len, D, generator=g).bfloat16()
    return [x.cuda() for x in (phi_q, phi_k, v)]


CASES = {
    # name: (batch, q_len, kv_len, pad, scaled)
    "ragged_length": (2, 203, 203, 0, False),
    "padded_keys": (2, 150, 150, 37, False),
    "keys_before_queries": (2, 150, 181, 0, False),
    "key_log_scale": (2, 203, 203, 0, True),
    "key_log_scale_padded_keys_before_queries": (2, 150, 181, 40, True),
}


@pytest.mark.cuda
@needs_fla
@pytest.mark.parametrize("return_normaliser", [False, True], ids=["output", "with_normaliser"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fla_matches_pytorch_scan(case, return_normaliser, monkeypatch):
    """Outputs, normalisers and all three gradients through fla equal those through the PyTorch scan: lengths
    that are not whole chunks, padded keys, keys before the queries, and a key log-scale that climbs 400 nats from
    finfo.min (Performer's scale before its first real key) -- on fla's fused-chunk op wherever a gated chunked
    backward would be unsound."""
    batch, q_len, kv_len, pad, scaled = case
    g = torch.Generator().manual_seed(q_len + pad)
    log_scale = climbing_log_scale(batch, HEADS, kv_len, g, floor_until=pad).cuda() if scaled else None
    grad_out = torch.randn(batch, HEADS, q_len, D, generator=g).cuda().bfloat16()
    grad_den = torch.randn(batch, HEADS, q_len, generator=g).cuda()
    calls = []
    product = linear._fla_causal_product
    monkeypatch.setattr(linear, "_fla_causal_product", lambda *args: calls.append(1) or product(*args))
    results = []
    for scan in (None, pytorch_scan()):
        inputs = [x.requires_grad_(True) for x in features(batch, q_len, kv_len, seed=q_len, pad=pad)]
        with scan or contextlib.nullcontext():
            got = causal_linear_attention(*inputs, key_log_scale=log_scale, return_normaliser=return_normaliser)
        out, den = got if return_normaliser else (got, None)
        loss = (out.float() * grad_out).sum() + (0 if den is None else (den * grad_den).sum())
        results.append((out, den, *torch.autograd.grad(loss, inputs)))
    assert calls == [1], "fla must serve bf16 attention on CUDA, and pytorch_scan() must switch it off"
    for name, got, want in zip(("out", "normaliser", "dphi_q", "dphi_k", "dv"), *results):
        if want is None:
            continue
        assert got.dtype == want.dtype and torch.isfinite(got).all(), f"{name}: {got.dtype}, or NaN/inf"
        assert_close_to_scale(got, want, BF16_TOL if got.dtype == torch.bfloat16 else TF32_TOL, name)


@pytest.mark.cuda
@needs_fla
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "key_log_scale"])
def test_prefill_through_fla_then_decode_steps_equal_one_pass(scaled):
    """A bounded-state cache: fla prefills 77 tokens, then the state takes 6 decode steps and a block of 5; the
    outputs and normalisers equal one pass over all 88 tokens."""
    prefill, steps, total = 77, [1] * 6 + [5], 88
    phi_q, phi_k, v = features(2, total, total, seed=3, pad=9)
    g = torch.Generator().manual_seed(4)
    log_scale = torch.cumsum(torch.rand(2, HEADS, total, generator=g) * 0.1, dim=-1).cuda() if scaled else None
    with torch.no_grad():
        full, full_den = causal_linear_attention(phi_q, phi_k, v, key_log_scale=log_scale, return_normaliser=True)
        pieces, state, start = [], None, 0
        for length in (prefill, *steps):
            part = slice(start, start + length)
            (out, den), state = linear_attention_extend(
                phi_q[..., part, :], phi_k[..., part, :], v[..., part, :], state,
                key_log_scale=None if log_scale is None else log_scale[..., part], return_normaliser=True)
            pieces.append((out, den))
            start += length
    assert start == total
    assert_close_to_scale(torch.cat([p[0] for p in pieces], dim=-2).float(), full.float(), BF16_TOL, "out")
    assert_close_to_scale(torch.cat([p[1] for p in pieces], dim=-1), full_den, TF32_TOL, "normaliser")


@pytest.mark.cuda
@needs_fla
def test_linear_attention_flops_are_counted_through_the_pytorch_scan():
    """FlopCounterMode cannot see inside fla's Triton kernels, so bench-kernel counts linear attention's FLOPs with
    the PyTorch scan: more than the counter sees of a call on fla, which still counts the feature maps."""
    from torch.utils.flop_counter import FlopCounterMode

    from attnswap.measure.bench_kernel import case_flops
    from attnswap.variants import AttnContext, get_variant

    variant = get_variant("hedgehog")
    state = variant.make_state(HEADS, D).cuda()
    ctx = AttnContext(scaling=D**-0.5)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, 256, D, generator=g).bfloat16().cuda() for _ in range(3))

    def run(_):
        with torch.no_grad():
            variant.attend(q, k, v, ctx, state)

    flops, source, _ = case_flops(variant, q, k, ctx, state, 128, False, run)
    with FlopCounterMode(display=False) as on_fla:
        run(None)
    assert source == "counted (FlopCounterMode)"
    assert flops > on_fla.get_total_flops() > 0
