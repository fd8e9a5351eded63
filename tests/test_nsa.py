"""variants/nsa.py and kernels/nsa.py: the gather route (CPU) against the dense oracle, selection rules, memory, swap;
the FlexAttention route is checked in test_nsa_flex.py."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnswap
from attnswap.errors import AttnswapError
from attnswap.kernels.dense import dense_probs
from attnswap.kernels.nsa import block_importance, compressed_attention, nsa_branches, pool_blocks, select_blocks
from attnswap.hf.swap import attention_modules, variant_state_dict
from attnswap.variants import AttnContext, register
from attnswap.variants.nsa import INITIAL_GATES, NSA, NSAParams, gated_sum
from tests.conftest import TOLERANCE, random_batch, random_qkv, tiny_gpt2

GRAD_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}

# (T, S, block, top_k, window, left_pad): odd lengths, partial blocks, padding, decode (T=1) and a chunk (T<S).
CASES = {
    "T37_b8": (37, 37, 8, 2, 8, 0),
    "T70_b16_pad": (70, 70, 16, 2, 20, 9),
    "T37_b8_k3_pad_whole_blocks": (37, 37, 8, 3, 5, 19),
    "decode_S45": (1, 45, 8, 3, 9, 3),
    "chunk_T5_S70": (5, 70, 16, 2, 20, 4),
    "k1_w1": (37, 37, 8, 1, 1, 0),
}


def _inputs(q_len, kv_len, left_pad, dtype, heads=3, dim=16, device="cpu", requires_grad=True):
    q, k, v = (t.to(device).requires_grad_(requires_grad) for t in
               random_qkv(batch=2, heads=heads, q_len=q_len, kv_len=kv_len, dim=dim, dtype=dtype))
    key_valid = None
    if left_pad:
        key_valid = torch.ones(2, kv_len, dtype=torch.bool, device=device)
        key_valid[0, :left_pad] = False
    return q, k, v, AttnContext(scaling=0.3, key_valid=key_valid)


def _gates(variant, heads, dim):
    state = variant.make_state(heads, dim)
    with torch.no_grad():  # away from the zero init, so the gates depend on q
        state.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
        state.bias.add_(torch.randn(state.bias.shape, generator=torch.Generator().manual_seed(2)))
    return state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_nsa_matches_reference_outputs_and_gradients(case, dtype):
    q_len, kv_len, block, top_k, window, left_pad = case
    variant = NSA(NSAParams(block=block, top_k=top_k, window=window))
    q, k, v, ctx = _inputs(q_len, kv_len, left_pad, dtype)
    assert_attend_matches_reference(variant, q, k, v, ctx, _gates(variant, 3, 16), dtype)


def assert_attend_matches_reference(variant, q, k, v, ctx, state, dtype):
    """``attend`` against the dense oracle: outputs, and the gradients of q, k, v and the gates."""
    fast, ref = variant.attend(q, k, v, ctx, state), variant.reference(q, k, v, ctx, state)
    assert fast.dtype == dtype
    torch.testing.assert_close(fast.float(), ref, rtol=0, atol=TOLERANCE[dtype])

    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3)).to(ref.device)
    tensors = dict(q=q, k=k, v=v, W=state.weight, b=state.bias)
    assert_grads_close(tensors, fast.float() * grad_out, ref * grad_out, dtype)


def assert_grads_close(tensors: dict, fast: torch.Tensor, ref: torch.Tensor, dtype):
    """The gradients of ``fast.sum()`` and ``ref.sum()`` with respect to each named tensor agree."""
    grads_fast = torch.autograd.grad(fast.sum(), list(tensors.values()))
    grads_ref = torch.autograd.grad(ref.sum(), list(tensors.values()))
    for name, g_fast, g_ref in zip(tensors, grads_fast, grads_ref):
        # Gradients are compared relative to their largest entry once that exceeds 1: a bf16 gradient of size 4
        # has steps of 2**-5, and the gate gradients sum over B·T·D terms.
        scale = max(1.0, g_ref.abs().max().item())
        torch.testing.assert_close(g_fast.float() / scale, g_ref.float() / scale, rtol=0, atol=GRAD_TOLERANCE[dtype],
                                   msg=lambda m, name=name: f"d{name}: {m}")


def test_nsa_all_padding_rows_give_zeros_with_finite_gradients():
    variant = NSA(NSAParams(block=4, top_k=2, window=3))
    q, k, v, ctx = _inputs(11, 11, left_pad=6, dtype=torch.float32)
    out = variant.attend(q, k, v, ctx, variant.make_state(3, 16))
    assert out[0, :, :6].abs().max() == 0
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("case", [(37, 37, 8, 0), (1, 45, 8, 3), (9, 70, 16, 5)], ids=["T37", "decode", "chunk"])
def test_nsa_full_coverage_selected_and_sliding_equal_causal_attention(case):
    q_len, kv_len, block, left_pad = case
    q, k, v, ctx = _inputs(q_len, kv_len, left_pad, torch.float32)
    top_k, window = -(-kv_len // block), kv_len  # every block, every token
    _, o_sel, o_win = nsa_branches(q, k, v, ctx.scaling, block, top_k, window, ctx.key_valid,
                                   ctx.first_real_token(2, q.device))
    pos = torch.arange(kv_len)
    allowed = pos <= pos[kv_len - q_len:, None]
    if ctx.key_valid is not None:
        allowed = allowed & ctx.key_valid[:, None, None, :]
    full = dense_probs(q, k, allowed, ctx.scaling) @ v
    torch.testing.assert_close(o_sel, full, rtol=0, atol=2e-5)
    torch.testing.assert_close(o_win, full, rtol=0, atol=2e-5)


def test_nsa_selection_always_includes_own_and_first_block():
    block, top_k, kv_len = 4, 3, 30
    g = torch.Generator().manual_seed(0)
    p_cmp = torch.rand(2, 3, kv_len, 8, generator=g)  # arbitrary scores: the forced blocks must win anyway
    key_valid = torch.ones(2, kv_len, dtype=torch.bool)
    key_valid[0, :9] = False  # row 0's first real token is in block 2
    first_real = key_valid.long().argmax(-1)
    selected = select_blocks(block_importance(p_cmp, 0, block), key_valid, first_real, 0, block, top_k)  # (B, H, nQB, K)
    assert selected.shape == (2, 3, 8, top_k)
    for b, first_block in enumerate([2, 0]):
        for qb in range(8):
            chosen = set(selected[b, :, qb].flatten().tolist()) - {-1}
            per_head = [set(selected[b, h, qb].tolist()) - {-1} for h in range(3)]
            candidates = [j for j in range(qb + 1) if j >= (2 if b == 0 else 0)]
            assert all(qb in s for s in per_head), f"row {b} query block {qb} misses its own block"
            if first_block <= qb:
                assert all(first_block in s for s in per_head), f"row {b} query block {qb} misses the first block"
            assert all(len(s) == min(top_k, max(len(candidates), 1)) for s in per_head)
            assert chosen <= set(candidates) | {qb}, f"row {b} query block {qb} chose padding or the future"


def test_nsa_selection_follows_compressed_probabilities():
    p_cmp = torch.zeros(1, 1, 24, 6)
    p_cmp[:, :, 20:, 3] = 1.0  # the queries of block 5 look at block 3
    selected = select_blocks(block_importance(p_cmp, 0, 4), None, torch.zeros(1, dtype=torch.long), 0, 4, 3)
    assert sorted(selected[0, 0, 5].tolist()) == [0, 3, 5]


def test_nsa_outputs_ignore_later_blocks():
    # Selection is shared by a query block, so causality holds at block granularity: changing every token of later
    # blocks (queries included) leaves all earlier outputs unchanged.
    variant = NSA(NSAParams(block=8, top_k=2, window=8))
    q, k, v, ctx = _inputs(37, 37, 0, torch.float32)
    out = variant.attend(q, k, v, ctx, None)
    changed = [x.detach().clone() for x in (q, k, v)]
    for x in changed:
        x[:, :, 24:] = torch.randn_like(x[:, :, 24:])
    torch.testing.assert_close(variant.attend(*changed, ctx, None)[:, :, :24], out[:, :, :24], rtol=0, atol=0)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op creates (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), f"{func} -> {tuple(t.shape)}"
        return out


def test_nsa_efficient_path_allocates_no_full_score_matrix():
    length, block = 512, 16
    variant = NSA(NSAParams(block=block, top_k=2, window=16))
    q, k, v, ctx = _inputs(length, length, 7, torch.float32, heads=2)
    full_scores = 2 * 2 * length * length  # B·H·T·S
    state = variant.make_state(2, 16)
    with _LargestTensor() as fast:
        variant.attend(q, k, v, ctx, state).square().sum().backward()
    # Largest expected: (B, H, T, 32) scores over 2 gathered blocks and (B, H, T, S/block) compressed scores.
    assert fast.numel <= full_scores // 8, f"efficient path made a T×S-sized tensor: {fast.op}"
    with _LargestTensor() as dense:  # the same probe sees the reference's T×S scores
        variant.reference(q, k, v, ctx, state)
    assert dense.numel >= full_scores


def test_nsa_params_are_validated_and_named():
    assert NSA().label == "nsa_b32_k4_w64"
    assert NSA(NSAParams(block=8, top_k=2, window=16)).spec == "nsa:block=8,top_k=2,window=16"
    for bad in [dict(block=0), dict(top_k=0), dict(window=0)]:
        with pytest.raises(AttnswapError, match=next(iter(bad))):
            NSAParams(**bad)
    q, k, v = random_qkv(q_len=5)
    with pytest.raises(AttnswapError, match="rolling"):
        NSA().attend(q, k, v, AttnContext(scaling=1.0, kv_positions=torch.arange(5), q_positions=torch.arange(5)), None)


def test_nsa_initial_gates():
    state = NSA().make_state(4, 16)
    q = torch.randn(2, 4, 7, 16)
    torch.testing.assert_close(state(q), torch.tensor(INITIAL_GATES).expand(2, 4, 7, 3))


def test_nsa_swap_trains_gates_on_padded_batch():
    model = tiny_gpt2()
    ids, mask = random_batch(batch=2, length=37, left_pad=5)
    attnswap.swap(model, NSA(NSAParams(block=8, top_k=2, window=8)))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".attnswap." in name for name in trainable)
    loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    for module in attention_modules(model):
        for name, param in module.attnswap.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"layer {module.layer_idx} {name} has no grad"


def test_nsa_save_load_round_trip(tmp_path):
    register(NSA)
    model = tiny_gpt2()
    attnswap.swap(model, NSA(NSAParams(block=8, top_k=3, window=8)))
    with torch.no_grad():
        for module in attention_modules(model):
            module.attnswap.bias.add_(torch.randn_like(module.attnswap.bias))
            module.attnswap.weight.normal_(0.0, 0.05)
    ids, mask = random_batch(length=29, left_pad=4)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    attnswap.save(model, tmp_path / "nsa")
    loaded = attnswap.load(tmp_path / "nsa")
    with torch.no_grad():
        got = loaded(ids, attention_mask=mask).logits
    for key, value in variant_state_dict(model).items():
        assert torch.equal(variant_state_dict(loaded)[key], value), key
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_nsa_cached_generation_matches_uncached_when_every_block_is_selected():
    # Decode (T=1 against the cache) through a real model. With every block selected, prefill and decode agree;
    # with fewer, a decoding query ranks blocks alone, not with the rest of its query block, and logits may differ.
    model = tiny_gpt2()
    attnswap.swap(model, NSA(NSAParams(block=4, top_k=16, window=5)))
    ids, mask = random_batch(batch=2, length=21, left_pad=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, output_scores=True,
                  return_dict_in_generate=True, pad_token_id=0)
    cached, uncached = model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(step_cached, step_uncached, rtol=0, atol=1e-5)


@pytest.mark.parametrize("q_len, kv_len", [(70, 70), (37, 70)])
def test_compressed_branch_in_query_chunks_equals_one_pass(q_len, kv_len):
    """Chunked and checkpointed, the compressed branch gives the same output, selection importance and gradients
    as one pass, and autograd keeps no chunk's T×nKB probabilities (they are recomputed in the backward)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, requires_grad=True) for n in (q_len, kv_len, kv_len))
    key_valid = torch.ones(2, kv_len, dtype=torch.bool)
    key_valid[1, :11] = False
    whole, whole_importance = compressed_attention(q, k, v, 0.3, 4, key_valid, chunk=q_len)
    grads_whole = torch.autograd.grad(whole.square().sum(), (q, k, v))

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        chunked, chunked_importance = compressed_attention(q, k, v, 0.3, 4, key_valid, chunk=12)
    n_kb = whole_importance.shape[-1]
    score_shaped = [shape for shape in saved if len(shape) == 4 and shape[-1] == n_kb and shape[-2] != n_kb]
    assert saved and not score_shaped, f"scores or probabilities were kept for backward: {score_shaped}"
    grads_chunked = torch.autograd.grad(chunked.square().sum(), (q, k, v))
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked_importance, whole_importance, rtol=0, atol=1e-6)
    for a, b in zip(grads_chunked, grads_whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_compiled_gated_sum_equals_the_eager_one_with_gradients():
    """What CUDA runs (one compiled pass), here compiled for the CPU: the same mix and gradients, in bf16 branches."""
    g = torch.Generator().manual_seed(0)
    gates = torch.rand(2, 3, 37, 3, generator=g, requires_grad=True)
    branches = [torch.randn(2, 3, 37, 8, generator=g).bfloat16().requires_grad_(True) for _ in range(3)]
    weights = torch.randn(2, 3, 37, 8, generator=g)
    results = []
    for mix in (gated_sum, torch.compile(gated_sum)):
        out = mix(gates, *branches)
        results.append((out, *torch.autograd.grad((out.float() * weights).sum(), (gates, *branches))))
    for name, eager, compiled in zip(("out", "dgates", "d0", "d1", "d2"), *results):
        assert compiled.dtype == eager.dtype, name
        torch.testing.assert_close(compiled.float(), eager.float(), rtol=1e-2, atol=1e-2, msg=name)
    want = sum(gates[..., i, None].detach() * b.detach().float() for i, b in enumerate(branches))
    torch.testing.assert_close(results[0][0].float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_the_compiled_block_pooling_equals_the_eager_one_with_gradients(padded):
    """What the flex route runs on CUDA (one compiled pass per tensor), here compiled for the CPU: the same pooled keys,
    counts and gradient, for a length that is not whole blocks."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 37, 8, generator=g).bfloat16().requires_grad_(True)
    key_valid = (torch.arange(37) >= torch.tensor([[0], [9]])) if padded else None
    weights = torch.randn(2, 3, 5, 8, generator=g)
    results = []
    for pool in (pool_blocks, torch.compile(pool_blocks)):
        pooled, counts = pool(x, key_valid, 8)
        results.append((pooled, counts, *torch.autograd.grad((pooled * weights).sum(), x)))
    for name, eager, compiled in zip(("pooled", "counts", "dx"), *results):
        assert compiled.dtype == eager.dtype, name
        torch.testing.assert_close(compiled.float(), eager.float(), rtol=1e-5, atol=1e-5, msg=name)
