"""kernels/nsa.py's FlexAttention route against the dense oracle (NSA.branch_probs) and its pieces one by one.

On CPU, flex_attention has no backward and its uncompiled path ignores the block structure, so CPU tests check the
selected branch's block mask directly and each branch's forward against the oracle (the mask_mod states the whole
branch); the compiled, block-sparse route with gradients, through ``NSA.attend``, is checked on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from attnswap.kernels.nsa import (block_importance, compressed_attention, exact_pooled_scores,
                                  flex_compressed_attention, flex_nsa_branches, flex_route, flex_tile,
                                  importance_from_lse, pool_blocks, select_blocks, selected_block_mask,
                                  selected_split_block_mask, selection_table)
from attnswap.kernels import flex
from attnswap.kernels.masks import materialize
from attnswap.variants.nsa import NSA, NSAParams
from tests.conftest import TOLERANCE, random_qkv
from tests.test_nsa import _gates, _inputs, assert_attend_matches_reference, assert_grads_close

CUDA = torch.cuda.is_available()
SPLIT_FROM = 2048  # the CUDA cases take NSA's split sink tile from this many queries (flex.FAR_KEYS_MIN_QUERIES)

# (T, S, block, top_k, window, left_pad): blocks not dividing T or S, padding over whole blocks and part of one,
# and a prefill chunk (T < S) whose first query sits inside a block.
CPU_CASES = {
    "T150_b16": (150, 150, 16, 3, 20, 0),
    "T150_b16_pad": (150, 150, 16, 3, 20, 37),
    "chunk_T70_S181_pad": (70, 181, 16, 2, 20, 20),
}
CUDA_CASES = {
    "T1000_b64": (1000, 1000, 64, 4, 64, 0),  # the bench-kernel path: no key_valid, first_real None
    "chunk_T261_S333_b32_pad": (261, 333, 32, 3, 40, 150),
    "T300_b16_k5_pad": (300, 300, 16, 5, 23, 9),
    # long enough for the sink tile's split walk (from SPLIT_FROM queries in these tests), whole and padded
    "T2100_b64": (2100, 2100, 64, 4, 64, 0),
    "chunk_T2080_S2300_b64_pad": (2080, 2300, 64, 4, 64, 200),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CPU_CASES.values(), ids=CPU_CASES.keys())
def test_flex_branches_match_reference_on_cpu(case, dtype):
    q_len, kv_len, block, top_k, window, left_pad = case
    variant = NSA(NSAParams(block=block, top_k=top_k, window=window))
    q, k, v, ctx = _inputs(q_len, kv_len, left_pad, dtype, requires_grad=False)
    o_cmp, o_sel = flex_nsa_branches(q, k, v, ctx.scaling, block, top_k, ctx.key_valid,
                                     ctx.first_real_token(2, q.device), backend=None)
    p_cmp, p_sel, _ = variant.branch_probs(q, k, ctx)
    assert o_cmp.dtype == o_sel.dtype == dtype
    torch.testing.assert_close(o_cmp.float(), p_cmp @ v.float(), rtol=0, atol=TOLERANCE[dtype], msg="compressed")
    torch.testing.assert_close(o_sel.float(), p_sel @ v.float(), rtol=0, atol=TOLERANCE[dtype], msg="selected")


@pytest.mark.parametrize("fold", [64, 150], ids=["3folds", "unfolded"])
@pytest.mark.parametrize("q_len, kv_len, left_pad", [(150, 150, 37), (70, 181, 20)], ids=["T150_pad", "chunk_pad"])
def test_flex_compressed_branch_with_queries_folded_into_the_batch(q_len, kv_len, left_pad, fold):
    block = 16
    variant = NSA(NSAParams(block=block))
    q, k, v, ctx = _inputs(q_len, kv_len, left_pad, torch.float32, requires_grad=False)
    out, importance = flex_compressed_attention(q, k, v, ctx.scaling, block, ctx.key_valid, backend=None, fold=fold)
    p_cmp, _, _ = variant.branch_probs(q, k, ctx)
    torch.testing.assert_close(out, p_cmp @ v, rtol=0, atol=2e-5)
    _, unfolded = flex_compressed_attention(q, k, v, ctx.scaling, block, ctx.key_valid, backend=None, fold=q_len)
    torch.testing.assert_close(importance, unfolded, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tile", [16, 32, 64], ids=["tile=block", "tile=2blocks", "tile=4blocks"])
@pytest.mark.parametrize("q_len, kv_len", [(150, 150), (70, 181)], ids=["T150", "chunk"])
def test_selected_block_mask_lists_the_tiles_of_the_selected_blocks(q_len, kv_len, tile):
    block, n_kb = 16, -(-kv_len // 16)
    q_start = (kv_len - q_len) // block * block  # query row 0 of the block mask: its first query block's start
    n_qb = n_kb - q_start // block
    g = torch.Generator().manual_seed(0)
    importance = torch.rand(2, 3, n_qb, n_kb, generator=g)
    key_valid = torch.ones(2, kv_len, dtype=torch.bool)
    key_valid[0, : q_start + 40] = False  # row 0's first real key is 2.5 blocks in: fewer candidates, unused slots
    selected = select_blocks(importance, key_valid, key_valid.long().argmax(-1), kv_len - q_len, block, 3)
    assert (selected < 0).any(), "the case should leave some selection slots unused"
    block_mask = selected_block_mask(selected, q_start, kv_len - q_start, kv_len, block, key_valid, tile=tile)
    assert block_mask.BLOCK_SIZE == (tile, tile)
    # the selection table, coarsened: a tile is listed when any of its query blocks selected any of its key blocks
    per_tile = tile // block
    coarse = torch.zeros(2, 3, -(-n_qb // per_tile), -(-n_kb // per_tile), dtype=torch.bool)
    for b, h, i, j in selection_table(selected, n_kb).nonzero().tolist():
        coarse[b, h, i // per_tile, j // per_tile] = True
    assert torch.equal(block_mask.to_dense().bool(), coarse)
    # the backward walks the transposed lists: the same tiles, seen from the keys
    q_dense = torch.zeros_like(coarse).transpose(-1, -2)
    for b, h, j in torch.cartesian_prod(*(torch.arange(n) for n in q_dense.shape[:3])).tolist():
        q_dense[b, h, j, block_mask.q_indices[b, h, j, : block_mask.q_num_blocks[b, h, j]].long()] = True
    assert torch.equal(q_dense.transpose(-1, -2), coarse)


@pytest.mark.parametrize("tile", [16, 32], ids=["tile=block", "tile=2blocks"])
@pytest.mark.parametrize("q_len, kv_len, left_pad", [(150, 150, 0), (150, 150, 37), (70, 181, 20)],
                         ids=["T150", "T150_pad", "chunk_pad"])
def test_split_selection_leaves_the_sink_tile_to_the_far_sums(q_len, kv_len, left_pad, tile):
    """Every pair of the selected branch is either inside a block its key tile's backward walk lists, or a far pair of
    the sink tile handed to kernels/sink_key_grads.py, never both; and the forward half is the plain block mask's."""
    block, n_kb = 16, -(-kv_len // 16)
    q_start = (kv_len - q_len) // block * block
    n_qb, rows = n_kb - q_start // block, kv_len - q_start
    key_valid = torch.ones(2, kv_len, dtype=torch.bool)
    key_valid[0, :left_pad] = False
    first_real = key_valid.long().argmax(-1)
    importance = torch.rand(2, 3, n_qb, n_kb, generator=torch.Generator().manual_seed(0))
    selected = select_blocks(importance, key_valid, first_real, kv_len - q_len, block, 3)
    block_mask, slots, far = selected_split_block_mask(selected, first_real, q_start, rows, kv_len, block, key_valid,
                                                       tile=tile)
    plain = selected_block_mask(selected, q_start, rows, kv_len, block, key_valid, tile=tile)
    assert torch.equal(block_mask.kv_indices, plain.kv_indices) and torch.equal(block_mask.kv_num_blocks,
                                                                                plain.kv_num_blocks)
    assert block_mask.q_indices.is_contiguous() and block_mask.q_num_blocks.is_contiguous()
    allowed = materialize(block_mask.mask_mod, 2, 3, rows, kv_len, "cpu")  # (B, H, rows, S)
    walked = torch.zeros_like(allowed)
    for b, h, j in torch.cartesian_prod(*(torch.arange(n) for n in block_mask.q_num_blocks.shape)).tolist():
        for i in block_mask.q_indices[b, h, j, : block_mask.q_num_blocks[b, h, j]].tolist():
            walked[b, h, i * tile : (i + 1) * tile, j * tile : (j + 1) * tile] = True
    far_pairs = torch.zeros_like(allowed)
    far_rows = far.repeat_interleave(block, dim=2)[:, :, :rows]  # (B, H, rows, tile)
    for b in range(2):
        far_pairs[b][:, :, slots[b]] |= far_rows[b]
    assert far_pairs.any() and (walked & allowed).any()
    assert not (far_pairs & walked).any(), "a far pair would be summed twice"
    assert not (far_pairs & ~allowed).any(), "a far pair the mask does not allow"
    assert torch.equal(allowed & walked | far_pairs, allowed), "every allowed pair is walked or summed apart"
    assert (block_mask.q_num_blocks <= plain.q_num_blocks).all()
    assert block_mask.q_num_blocks.sum() < plain.q_num_blocks.sum(), "the sink tile's walk is shorter"


@pytest.mark.parametrize("q_len, kv_len, left_pad", [(150, 150, 37), (70, 181, 130)], ids=["T150_pad", "chunk_pad"])
def test_importance_from_lse_matches_block_importance_on_earlier_blocks(q_len, kv_len, left_pad):
    block = 16
    variant = NSA(NSAParams(block=block))
    q, k, _, ctx = _inputs(q_len, kv_len, left_pad, torch.float32, requires_grad=False)
    p_cmp, _, _ = variant.branch_probs(q, k, ctx)  # (B, H, T, S): each block's probability spread on its keys
    n_kb = -(-kv_len // block)
    block_probs = torch.nn.functional.pad(p_cmp, (0, n_kb * block - kv_len)).view(2, 3, q_len, n_kb, block).sum(-1)
    k_cmp, counts = pool_blocks(k, ctx.key_valid, block)
    q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    visible = ((torch.arange(1, n_kb + 1) * block - 1 <= q_pos) & (counts > 0)[:, None, :])[:, None]  # (B, 1, T, nKB)
    scores = q @ k_cmp.transpose(-1, -2) * ctx.scaling
    lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)  # -inf where no block is visible
    got = importance_from_lse(q, k_cmp, lse, ctx.scaling, block, kv_len - q_len, counts > 0)
    q_block = torch.arange((kv_len - q_len) // block, n_kb)[:, None]
    ranked = (torch.arange(n_kb) < q_block) & (counts > 0)[:, None, :]  # (B, nQB, nKB): what select_blocks ranks
    assert ranked.any() and torch.isinf(lse).any()
    expected = block_importance(block_probs, kv_len - q_len, block)
    torch.testing.assert_close(got, expected * ranked[:, None], rtol=0, atol=1e-5)


def test_exact_pooled_scores_keep_fp32_precision_in_bf16():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 50, 64, generator=g).bfloat16()
    k_cmp = torch.randn(1, 2, 9, 64, generator=g)
    q_exact, k_exact = exact_pooled_scores(q, k_cmp)
    assert q_exact.dtype == k_exact.dtype == torch.bfloat16
    reference = q.double() @ k_cmp.double().transpose(-1, -2)
    split = q_exact.double() @ k_exact.double().transpose(-1, -2)  # what the kernel sums (its products are exact)
    rounded = q.double() @ k_cmp.bfloat16().double().transpose(-1, -2)
    assert (split - reference).abs().max() < 1e-4 < (rounded - reference).abs().max()


def test_flex_tile_holds_whole_blocks():
    assert [flex_tile(block) for block in (16, 32, 64, 128, 256)] == [128, 128, 128, 128, 256]


def test_one_compiled_kernel_serves_every_selection():
    """The selection and padding are tensors the masks capture, not constants of the kernels: new inputs of the
    same shapes, with another selection and another padding tensor, compile nothing new."""
    device, backend = ("cuda", "inductor") if CUDA else ("cpu", "eager")
    compiles = []
    for seed, left_pad in [(0, 9), (1, 25), (2, 9)]:
        q, k, v = (t.to(device) for t in random_qkv(2, 3, 150, 150, 16, seed=seed))
        key_valid = torch.ones(2, 150, dtype=torch.bool, device=device)
        key_valid[0, :left_pad] = False
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        flex_nsa_branches(q, k, v, 0.3, 16, 3, key_valid, key_valid.long().argmax(-1), backend=backend)
        compiles.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)
    assert compiles[0] > 0 and compiles[1:] == [0, 0], f"compiles per call: {compiles}"


def test_flex_route_needs_cuda_long_queries_and_blocks_that_tile():
    q = torch.zeros(1, 2, 256, 64)
    assert not flex_route(q, 64), "CPU tensors take the gather route"
    if CUDA:
        assert flex_route(q.cuda(), 64)
        assert not flex_route(q.cuda(), 48), "a block that does not tile flex's 128-wide tiles takes the gather route"
        assert not flex_route(q[:, :, :100].cuda(), 64), "short query blocks take the gather route"


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="compiled FlexAttention with backward needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CUDA_CASES.values(), ids=CUDA_CASES.keys())
def test_nsa_flex_route_matches_reference_outputs_and_gradients(case, dtype, monkeypatch):
    monkeypatch.setattr(flex, "FAR_KEYS_MIN_QUERIES", SPLIT_FROM)
    q_len, kv_len, block, top_k, window, left_pad = case
    variant = NSA(NSAParams(block=block, top_k=top_k, window=window))
    q, k, v, ctx = _inputs(q_len, kv_len, left_pad, dtype, dim=64, device="cuda")
    assert flex_route(q, block)
    assert_attend_matches_reference(variant, q, k, v, ctx, _gates(variant, 3, 64).cuda(), dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="compiled FlexAttention with backward needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flex_compressed_branch_folded_matches_gather_route_with_gradients(dtype):
    """The compressed call with its queries folded into the batch (700 queries, 3 folds), against the gather
    route's fp32 chunks: outputs, the gradients of q, k, v, and the importance of the blocks selection ranks."""
    block, q_len, kv_len = 32, 700, 777
    q, k, v, ctx = _inputs(q_len, kv_len, 150, dtype, dim=64, device="cuda")
    fast, fast_importance = flex_compressed_attention(q, k, v, ctx.scaling, block, ctx.key_valid, fold=256)
    ref, ref_importance = compressed_attention(q, k, v, ctx.scaling, block, ctx.key_valid)
    torch.testing.assert_close(fast.float(), ref, rtol=0, atol=TOLERANCE[dtype])
    ranked = fast_importance != 0
    assert ranked.sum() > ranked.numel() // 4
    torch.testing.assert_close(fast_importance[ranked], ref_importance[ranked], rtol=1e-4, atol=1e-5)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3)).cuda()
    assert_grads_close(dict(q=q, k=k, v=v), fast.float() * grad_out, ref * grad_out, dtype)
