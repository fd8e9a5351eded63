"""kernels/linear_triton.py: the fused Triton scan against float64 references and against the PyTorch scan.

The kernel runs on CUDA, or on the CPU under Triton's interpreter, which must be switched on before triton is
imported: on a CPU-only machine ``test_fused_scan_under_triton_interpreter`` runs this file again in a subprocess
with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import TOLERANCE

from attnswap.kernels import linear_triton
from attnswap.kernels.linear import causal_linear_attention
from attnswap.kernels.linear_triton import fused_causal_scan

pytestmark = pytest.mark.skipif(linear_triton.triton is None, reason="triton is not installed")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
needs_kernel = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED,
                                  reason="needs CUDA, or the CPU under Triton's interpreter (run by the test below)")


def reference_scan(a, b, c, log_scale):
    """out_i = sum_{j<=i} (a_i·b_j) exp(s_j - s_i) c_j in float64, through the dense T×T weights."""
    a, b, c = (x.double() for x in (a, b, c))
    weights = torch.matmul(a, b.transpose(-1, -2))
    length = a.shape[-2]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    if log_scale is not None:
        s = log_scale.double()
        weights = weights * torch.exp((s[..., None, :] - s[..., :, None]).masked_fill(~causal, float("-inf")))
    return torch.matmul(weights * causal, c)


CASES = {
    # name: (batch, heads, length, k_dim, v_dim, chunk, scaled)
    "ragged_length": (2, 3, 203, 8, 5, 16, False),
    "ragged_length_scaled": (2, 3, 203, 8, 5, 16, True),
    "two_feature_blocks_each_side": (1, 2, 150, 70, 65, 16, True),
    "one_chunk": (1, 1, 64, 16, 16, 64, False),
    "shorter_than_chunk": (2, 1, 9, 4, 3, 64, True),
}


# tl.dot's input precision -> tolerance relative to the output's scale. TF32 keeps 10 mantissa bits (the
# interpreter computes in fp32 either way).
PRECISIONS = {"ieee": 2e-6, "tf32": 2e-3}


@needs_kernel
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fused_scan_matches_float64(case, precision):
    """Lengths that are not whole chunks, feature dims that are not whole blocks (two partial blocks of a's and
    c's features: shares summed across programs), and a log-scale climbing far past what exp holds."""
    batch, heads, length, k_dim, v_dim, chunk, scaled = case
    g = torch.Generator().manual_seed(length)
    a, b = (torch.rand(batch, heads, length, k_dim, generator=g) for _ in range(2))
    c = torch.randn(batch, heads, length, v_dim, generator=g)
    log_scale = torch.cumsum(torch.rand(batch, heads, length, generator=g) * 400 / length, -1) if scaled else None
    got = linear_triton.fused_causal_scan(*(x.to(DEVICE) for x in (a, b, c)), chunk,
                                          None if log_scale is None else log_scale.to(DEVICE), precision)
    want = reference_scan(a, b, c, log_scale)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=PRECISIONS[precision] * want.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "key_log_scale"])
def test_attention_through_the_fused_scan_equals_the_pytorch_scan(scaled, monkeypatch):
    """causal_linear_attention forward and backward (three more scans, two reversed) with the fused kernel, against
    the same call with the PyTorch scan, with keys before the queries. bf16 values: only those take the fused path."""
    g = torch.Generator().manual_seed(3)
    phi_q = torch.rand(2, 3, 150, 24, generator=g)
    phi_k = torch.rand(2, 3, 181, 24, generator=g)
    v = torch.randn(2, 3, 181, 16, generator=g).bfloat16()
    log_scale = torch.cumsum(torch.rand(2, 3, 181, generator=g), -1) if scaled else None
    grad_out = torch.randn(2, 3, 150, 16, generator=g).bfloat16()
    calls = []
    monkeypatch.setattr(linear_triton, "fused_causal_scan",
                        lambda *args, **kwargs: calls.append(1) or fused_causal_scan(*args, **kwargs))
    results = []
    for fused in (True, False):
        inputs = [x.to(DEVICE).requires_grad_(True) for x in (phi_q, phi_k, v)]
        with contextlib.nullcontext() if fused else linear_triton.unfused():
            out = causal_linear_attention(*inputs, chunk=16, key_log_scale=None if log_scale is None
                                          else log_scale.to(DEVICE))
            results.append((out, *torch.autograd.grad(out, inputs, grad_out.to(DEVICE))))
        assert len(calls) == 4, "the forward scan and the backward's three must run fused, and only those"
    for name, got, want in zip(("out", "dphi_q", "dphi_k", "dv"), *results):
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=TOLERANCE[torch.bfloat16],
                                   msg=lambda m: f"{name}: {m}")


@needs_kernel
def test_fused_scan_serves_only_chunks_tl_dot_accepts():
    x = torch.zeros(1, device=DEVICE)
    assert linear_triton.serves(x, 16) and linear_triton.serves(x, 64)
    assert not linear_triton.serves(x, 8) and not linear_triton.serves(x, 48)


def test_fused_scan_under_triton_interpreter():
    if DEVICE == "cuda" or INTERPRETED:
        pytest.skip("the tests above run the kernel directly here")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert summary.startswith("14 passed, 1 skipped"), summary  # every kernel test ran; only this one skipped


@needs_kernel
def test_linear_attention_flops_are_counted_through_the_pytorch_scan():
    """FlopCounterMode cannot see inside the Triton kernel, so bench-kernel counts linear attention's FLOPs with the
    PyTorch scan: more than the counter sees of a fused call, which still counts the feature maps."""
    from torch.utils.flop_counter import FlopCounterMode

    from attnswap.bench_kernel import case_flops
    from attnswap.variants import AttnContext, get_variant

    variant = get_variant("hedgehog")
    state = variant.make_state(2, 16).to(DEVICE)
    ctx = AttnContext(scaling=16**-0.5)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=g).bfloat16().to(DEVICE) for _ in range(3))

    def run(_):
        with torch.no_grad():
            variant.attend(q, k, v, ctx, state)

    flops, source, _ = case_flops(variant, q, k, ctx, state, 128, False, run)
    with FlopCounterMode(display=False) as fused:
        run(None)
    assert source == "counted (FlopCounterMode)"
    assert flops > fused.get_total_flops() > 0
