"""kernels/flex.py: block masks against the dense mask, FlexAttention against the dense reference, the
block-mask cache, and the guard against compiled flex silently falling back to its unfused path.

On CPU, flex_attention has no backward and its uncompiled path ignores the block structure, so CPU tests
check the block masks directly and the flex forward against the reference; the compiled, block-sparse
path with gradients is checked on CUDA.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn
from torch.nn.attention import flex_attention as torch_flex
from torch.nn.attention.flex_attention import create_block_mask

from attnswap.kernels import flex
from attnswap.kernels.masks import materialize
from attnswap.variants import AttnContext
from attnswap.variants.longformer import Longformer, LongformerParams
from attnswap.variants.window import Window, WindowParams
from tests.conftest import TOLERANCE, random_qkv

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="compiled FlexAttention with backward needs CUDA")


class BiasedWindow(Window):
    """A window plus a learnable per-head distance bias: stands in for the mixture's weights."""

    def make_state(self, num_heads, head_dim):
        state = nn.Module()
        state.slope = nn.Parameter(torch.linspace(-0.3, 0.2, num_heads))
        return state

    def score_bias(self, state, ctx, q_pos, kv_pos):
        slope = state.slope

        def bias(b, h, q, kv):
            return slope[h] * (q_pos[q] - kv_pos[kv]).float()

        return bias


VARIANTS = {
    "window": Window(WindowParams(w=23)),
    "window_sinks": Window(WindowParams(w=23, sinks=3)),
    "longformer": Longformer(LongformerParams(w=23, global_tokens=2, global_stride=41)),
    "biased_window": BiasedWindow(WindowParams(w=23)),
}
# (T, S): odd lengths, not multiples of any block size, and prefill with T < S
SHAPES = [(75, 75), (61, 75)]
BLOCK = 16  # small blocks on CPU so that a short sequence has many of them


def _setup(name, q_len, kv_len, dtype=torch.float32, device="cpu", requires_grad=False, left_pad=9):
    variant = VARIANTS[name]
    q, k, v = (t.to(device).detach().requires_grad_(requires_grad)
               for t in random_qkv(batch=2, heads=3, q_len=q_len, kv_len=kv_len, dim=16, dtype=dtype))
    key_valid = torch.ones(2, kv_len, dtype=torch.bool, device=device)
    key_valid[0, :left_pad] = False
    state = variant.make_state(3, 16)
    state = None if state is None else state.to(device)
    return variant, q, k, v, AttnContext(scaling=0.3, key_valid=key_valid), state


def _assert_grads_close(grads_fast, grads_ref, dtype):
    for label, g_fast, g_ref in zip(("q", "k", "v", "slope"), grads_fast, grads_ref):
        scale = g_ref.abs().max().clamp(min=1.0)  # the slope gradient sums over B×H×T×S scores
        torch.testing.assert_close(g_fast.float() / scale, g_ref.float() / scale, rtol=0,
                                   atol=TOLERANCE[dtype] * 10, msg=f"d{label}")


def _listed(num, indices, n_kv):
    """BlockMask (num, indices) -> dense (B, H, n_q, n_kv) bool of the listed blocks."""
    listed = torch.arange(indices.shape[-1]) < num[..., None]
    dense = torch.zeros(*indices.shape[:-1], n_kv + 1, dtype=torch.bool)
    dense.scatter_(-1, torch.where(listed, indices.long(), n_kv), True)
    return dense[..., :n_kv]


@pytest.mark.parametrize("per_head", [False, True], ids=["broadcast_heads", "per_head"])
@pytest.mark.parametrize("q_len,kv_len", SHAPES, ids=lambda n: str(n))
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_block_mask_matches_create_block_mask(name, q_len, kv_len, per_head, monkeypatch):
    monkeypatch.setattr(flex, "MASK_EVAL_BUDGET", 2 * 3 * BLOCK * kv_len)  # one query block per band
    variant, q, k, _, ctx, state = _setup(name, q_len, kv_len)
    index_mask, _, _ = variant.index_mask(q, k, ctx, state)
    heads = 3 if per_head else None
    ours = flex.build_block_mask(index_mask, 2, heads, q_len, kv_len, "cpu", block_size=BLOCK)
    theirs = create_block_mask(index_mask, 2, heads, q_len, kv_len, device="cpu", BLOCK_SIZE=BLOCK)
    n_kv = -(-kv_len // BLOCK)
    for part in ("kv", "full_kv"):
        num, idx = getattr(ours, f"{part}_num_blocks"), getattr(ours, f"{part}_indices")
        ref_num, ref_idx = getattr(theirs, f"{part}_num_blocks"), getattr(theirs, f"{part}_indices")
        assert torch.equal(_listed(num, idx, n_kv), _listed(ref_num, ref_idx, n_kv)), f"{part} blocks differ"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_block_mask_applied_blockwise_equals_dense_mask(name):
    """What a block-sparse kernel computes: full blocks all allowed, partial blocks mask_mod, the rest nothing."""
    q_len, kv_len = SHAPES[1]
    variant, q, k, _, ctx, state = _setup(name, q_len, kv_len)
    index_mask, _, _ = variant.index_mask(q, k, ctx, state)
    block_mask = flex.build_block_mask(index_mask, 2, None, q_len, kv_len, "cpu", block_size=BLOCK)
    n_kv = -(-kv_len // BLOCK)
    up = lambda blocks: blocks.repeat_interleave(BLOCK, 2).repeat_interleave(BLOCK, 3)[..., :q_len, :kv_len]  # noqa: E731
    partial = up(_listed(block_mask.kv_num_blocks, block_mask.kv_indices, n_kv))
    full = up(_listed(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, n_kv))
    dense = materialize(index_mask, 2, 1, q_len, kv_len, "cpu")
    assert not (partial & full).any(), "a block is both partial and full"
    assert torch.equal(full | (partial & dense), dense)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("q_len,kv_len", SHAPES, ids=lambda n: str(n))
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_flex_forward_matches_reference(name, q_len, kv_len, dtype):
    variant, q, k, v, ctx, state = _setup(name, q_len, kv_len, dtype)
    index_mask, q_pos, kv_pos = variant.index_mask(q, k, ctx, state)
    block_mask = flex.build_block_mask(index_mask, 2, 3, q_len, kv_len, "cpu", block_size=BLOCK)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the uncompiled path's "materializes the full scores" notice
        out = flex.flex_masked_attention(q, k, v, block_mask, ctx.scaling,
                                         variant.score_bias(state, ctx, q_pos, kv_pos), backend=None)
        ref = variant.reference(q, k, v, ctx, state)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=TOLERANCE[dtype])
    padding_queries = max(0, 9 - (kv_len - q_len))  # queries are the last T of S slots; row 0 has 9 pads
    assert out[0, :, :padding_queries].abs().sum() == 0, "all-padding rows are not zero"


def test_materialised_bias_gradient_reaches_captured_parameter():
    variant, q, k, v, ctx, state = _setup("biased_window", *SHAPES[1], requires_grad=True)
    fast, ref = variant.attend(q, k, v, ctx, state), variant.reference(q, k, v, ctx, state)
    torch.testing.assert_close(fast, ref, rtol=0, atol=TOLERANCE[torch.float32])
    inputs = (q, k, v, state.slope)
    grads_fast = torch.autograd.grad(fast.square().sum(), inputs)
    _assert_grads_close(grads_fast, torch.autograd.grad(ref.square().sum(), inputs), torch.float32)


def test_block_mask_cache_is_keyed_by_tensor_identity_and_version():
    variant, q, k, _, ctx, _ = _setup("window_sinks", *SHAPES[0])
    build = lambda ctx: flex.block_mask_for(variant.index_mask(q, k, ctx, None)[0], 2, 3, *SHAPES[0], "cpu",  # noqa: E731
                                            cache_key=variant.mask_key(ctx, None), per_head=False, block_size=BLOCK)
    unpadded = AttnContext(scaling=0.3)
    assert build(unpadded) is build(AttnContext(scaling=0.3)), "unpadded batches should share one block mask"
    assert build(ctx) is build(ctx), "layers of one padded forward should share one block mask"
    same_values = AttnContext(scaling=0.3, key_valid=ctx.key_valid.clone())
    assert build(same_values) is not build(ctx), "a new padding tensor must rebuild"
    first = build(ctx)
    ctx.key_valid[1, :5] = False  # in place: the version changes, so must the block mask
    assert build(ctx) is not first
    for n in range(flex.MASK_CACHE_SIZE + 3):
        flex.block_mask_for(lambda b, h, q, kv: kv <= q, 1, 1, 20 + n, 20 + n, "cpu", cache_key="causal", block_size=BLOCK)
    assert len(flex._BLOCK_MASKS) <= flex.MASK_CACHE_SIZE


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_compiled_flex_never_falls_back_to_unfused(monkeypatch):
    """Many lengths × grad modes through the compiled singleton, past dynamo's default limit of 8 compiles:
    no recompile-limit log, no "called without torch.compile" warning, no error.

    On CPU the singleton is compiled with the "eager" backend: dynamo's guards and limits are the same,
    while Inductor's C++ flex costs ~30 s per compile here and has no backward.
    """
    device, backend = ("cuda", "inductor") if CUDA else ("cpu", "eager")
    block = flex.BLOCK_SIZE if CUDA else BLOCK
    # flex shows its fallback warning once per process; forget that it was shown (where torch tracks it)
    monkeypatch.setattr(torch_flex, "_WARNINGS_SHOWN", set(), raising=False)
    records = _Records()
    dynamo_log = logging.getLogger("torch._dynamo")  # does not propagate to the root logger
    dynamo_log.addHandler(records)
    compiles_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for length in range(2 * block + 1, 2 * block + 6):  # 5 lengths × 2 grad modes
                for grad in (False, True):
                    variant, q, k, v, ctx, _ = _setup("window_sinks", length, length, device=device)
                    index_mask, _, _ = variant.index_mask(q, k, ctx, None)
                    block_mask = flex.block_mask_for(index_mask, 2, 3, length, length, device,
                                                     cache_key=variant.mask_key(ctx, None), block_size=block)
                    with torch.set_grad_enabled(grad):  # grad mode alone is a recompile
                        flex.flex_masked_attention(q, k, v, block_mask, ctx.scaling, backend=backend)
    finally:
        dynamo_log.removeHandler(records)
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"] - compiles_before
    assert compiles > 8, f"only {compiles} compiles: the test no longer exercises dynamo's default limit"
    assert not [m for m in records.messages if "recompile_limit" in m or "cache_size_limit" in m], records.messages
    assert not [w for w in caught if "without torch.compile" in str(w.message)]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_compiled_flex_matches_reference_with_gradients(name, dtype):
    # T < S, neither a multiple of 128; row 0's padding covers whole blocks and part of one
    variant, q, k, v, ctx, state = _setup(name, 261, 333, dtype, device="cuda", requires_grad=True, left_pad=150)
    fast, ref = variant.attend(q, k, v, ctx, state), variant.reference(q, k, v, ctx, state)
    torch.testing.assert_close(fast.float(), ref, rtol=0, atol=TOLERANCE[dtype])
    inputs = (q, k, v) + (() if state is None else (state.slope,))
    grads_fast = torch.autograd.grad(fast.float().square().sum(), inputs)
    _assert_grads_close(grads_fast, torch.autograd.grad(ref.square().sum(), inputs), dtype)


def test_one_compiled_kernel_serves_every_window_size():
    """The window size is a tensor captured by the mask, not a constant of the kernel: sweeping w (the
    window experiments distil 7 sizes) compiles once per shape, not once per size."""
    device, backend = ("cuda", "inductor") if CUDA else ("cpu", "eager")
    block = flex.BLOCK_SIZE if CUDA else BLOCK
    length = 2 * block + 7
    compiles = []
    for w in (5, 17, 40):
        variant = Window(WindowParams(w=w))
        q, k, v = (t.to(device) for t in random_qkv(1, 2, length, length, 32))
        ctx = AttnContext(scaling=32**-0.5)
        index_mask, _, _ = variant.index_mask(q, k, ctx, None)
        block_mask = flex.block_mask_for(index_mask, None, None, length, length, device,
                                         cache_key=variant.mask_key(ctx, None), per_batch=False, per_head=False,
                                         block_size=block)
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        out = flex.flex_masked_attention(q, k, v, block_mask, ctx.scaling, backend=backend)
        compiles.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)
        torch.testing.assert_close(out.float(), variant.reference(q, k, v, ctx, None), rtol=0, atol=2e-5)
    assert compiles[1:] == [0, 0], f"compiles per window size: {compiles}"
