"""Native Sparse Attention's three branches without a T×S tensor (NSA, https://arxiv.org/abs/2502.11089).

Key slots are cut into blocks of ``block`` slots on the absolute-position grid; queries (the last T of the S
slots) are grouped into query blocks on the same grid, so query block i and key block i cover the same positions.

    compressed  softmax over mean-pooled key blocks that end at or before the query:   T × S/block scores
    selected    per query block, exact softmax over its top_k key blocks:              T × top_k·block scores
    sliding     exact softmax over the last ``window`` tokens:                         T × window scores

Two routes compute them, to the same result.

FlexAttention (``flex_route``: CUDA, query blocks long enough for its kernel, ``block`` a divisor or a multiple
of its 128-wide tile): ``flex_nsa_branches``. The compressed branch is one flex call over the S/block pooled keys;
the selection's importance is then recomputed from flex's log-sum-exp, without autograd, a query chunk at a time.
The selected branch is one flex call whose BlockMask is built straight from the selected indices: a query tile
visits the key tiles its query blocks selected, and the mask_mod keeps each query block to its own selection, so
nothing is gathered. The sliding branch is the window variant's kernel; variants/nsa.py calls it, as kernels import
no variants.

Gather (elsewhere: CPU, decode steps, other block sizes): ``nsa_branches``. The compressed branch runs in fp32
query chunks under activation checkpointing; selected and sliding share ``block_gather_attention``, which gathers
whole key blocks per query block, so every score tensor is (B, H, nQB, block, K·block).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import checkpoint

from attnswap.kernels.sink_key_grads import with_far_key_gradients
from attnswap.kernels.flex import (BLOCK_SIZE, FLEX_MIN_HEAD_DIM, FLEX_MIN_QUERIES, block_mask_for,
                                   block_mask_with_walks, far_keys_pay, flex_masked_attention, ordered_blocks)
from attnswap.kernels.fusion import fused
from attnswap.kernels.masks import MaskFn, device_constant

PositionRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
COMPRESSED_QUERY_CHUNK = 2048  # queries per step of the compressed branch (bounds its scores to chunk × S/block)
COMPRESSED_FOLD = 8192  # queries per batch entry of the flex route's compressed call (flex_compressed_attention)
IMPORTANCE_QUERY_CHUNK = 4096  # queries per step of the flex route's importance (no autograd: only the forward's)


def num_blocks(length: int, block: int) -> int:
    return -(-length // block)


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``allowed`` (broadcastable bool).

    A finite fill instead of -inf keeps rows with nothing allowed free of NaN, in the forward and the backward;
    those rows come out as zeros.
    """
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) * allowed.any(dim=-1, keepdim=True)


# --- compressed branch ----------------------------------------------------------------------------
def pool_blocks(x: torch.Tensor, key_valid: torch.Tensor | None, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the real slots of each key block, in fp32.

    x (B, H, S, D), key_valid (B, S) or None -> pooled (B, H, nKB, D), real-slot counts (B|1, nKB).
    A block with no real slot pools to zeros.
    """
    batch, heads, kv_len, dim = x.shape
    n_kb = num_blocks(kv_len, block)
    tail = n_kb * block - kv_len
    valid = key_valid if key_valid is not None else torch.ones(1, kv_len, dtype=torch.bool, device=x.device)
    valid = F.pad(valid, (0, tail)).float()  # (B|1, nKB*block)
    counts = valid.view(-1, n_kb, block).sum(-1)  # (B|1, nKB)
    summed = (F.pad(x.float(), (0, 0, 0, tail)) * valid[:, None, :, None]).view(batch, heads, n_kb, block, dim).sum(-2)
    return summed / counts.clamp(min=1)[:, None, :, None], counts


def compressed_attention(q, k, v, scaling: float, block: int, key_valid: torch.Tensor | None = None,
                         chunk: int = COMPRESSED_QUERY_CHUNK):
    """Softmax attention over mean-pooled blocks, in fp32, ``chunk`` queries at a time.

    q (B, H, T, D) at positions S-T..S-1, k/v (B, H, S, D), key_valid (B, S) or None.
    A query sees a block once the block has ended (last slot <= its position) and if it holds a real key.
    Returns out (B, H, T, D) and ``block_importance`` of the block probabilities, (B, H, nQB, nKB): what the
    selection ranks. fp32 throughout because these probabilities decide the discrete selection, which should
    not flip with the model's dtype.

    The T × S/block scores would grow as n²/block; per chunk they are chunk × S/block, and under autograd each
    chunk is recomputed in the backward pass instead of kept (activation checkpointing), so memory stays linear.
    """
    q_len, kv_len = q.shape[-2], k.shape[-2]
    k_cmp, counts = pool_blocks(k, key_valid, block)  # (B, H, nKB, D), (B|1, nKB)
    v_cmp, _ = pool_blocks(v, key_valid, block)
    n_kb, q_offset = counts.shape[-1], kv_len - q_len
    block_end = torch.arange(1, n_kb + 1, device=q.device) * block - 1  # (nKB,)
    has_key = (counts > 0)[:, None, :]  # (B|1, 1, nKB)
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cmp, v_cmp))
    outs, importance = [], q.new_zeros(*q.shape[:2], n_kb - q_offset // block, n_kb, dtype=torch.float32)
    for start in range(0, q_len, chunk):
        q_pos = torch.arange(q_offset + start, q_offset + min(start + chunk, q_len), device=q.device)
        visible = (block_end <= q_pos[:, None]) & has_key  # (B|1, Tc, nKB)
        args = (q[..., start : start + chunk, :], k_cmp, v_cmp, visible, scaling)
        out, probs = checkpoint(_compressed_chunk, *args, use_reentrant=False) if keep else _compressed_chunk(*args)
        outs.append(out)
        importance.index_add_(2, q_pos // block - q_offset // block, probs.detach())
    return torch.cat(outs, dim=-2), importance


def _compressed_chunk(q, k_cmp, v_cmp, visible, scaling: float):
    probs = masked_softmax(torch.matmul(q.float(), k_cmp.transpose(-1, -2)) * scaling, visible[:, None])
    return torch.matmul(probs, v_cmp), probs


# --- selection ------------------------------------------------------------------------------------
def block_importance(p_cmp: torch.Tensor, q_offset: int, block: int) -> torch.Tensor:
    """Compressed probabilities (B, H, T, nKB) of the queries at positions q_offset.. summed per query block:
    (B, H, nQB, nKB) for query blocks q_offset//block .. nKB-1."""
    q_block = torch.arange(q_offset, q_offset + p_cmp.shape[-2], device=p_cmp.device) // block - q_offset // block
    shape = (*p_cmp.shape[:2], p_cmp.shape[-1] - q_offset // block, p_cmp.shape[-1])
    return p_cmp.detach().new_zeros(shape).index_add_(2, q_block, p_cmp.detach())


def select_blocks(importance: torch.Tensor, key_valid: torch.Tensor | None, first_real: torch.Tensor, q_offset: int,
                  block: int, top_k: int) -> torch.Tensor:
    """The key blocks each query block attends to exactly in the selected branch.

    importance (B, H, nQB, nKB): ``block_importance`` of the compressed probabilities of the queries at positions
    q_offset..; key_valid (B, S) or None; first_real (B,): position of each row's first real token.
    Returns (B, H, nQB, K) long with K = min(top_k, nKB), for query blocks q_offset//block .. nKB-1;
    -1 marks an unused slot (fewer candidates than K).

    Candidates are the key blocks at or before the query block that hold a real key. Ranking, per head: the
    query block's own block, then the block of the row's first real token (an attention sink), then the
    compressed probability summed over the query block's queries in this call.
    """
    batch, heads, _, n_kb = importance.shape
    device = importance.device
    q_block0 = q_offset // block
    scores = importance.detach()  # the ranking is discrete: no gradient flows through it (masked_fill copies)
    kb = torch.arange(n_kb, device=device)  # (nKB,)
    qb = torch.arange(q_block0, n_kb, device=device)[:, None]  # (nQB, 1)
    if key_valid is None:
        has_key = torch.ones(1, n_kb, dtype=torch.bool, device=device)
    else:
        has_key = F.pad(key_valid, (0, n_kb * block - key_valid.shape[-1])).view(batch, n_kb, block).any(-1)
    candidate = (kb <= qb) & has_key[:, None, :]  # (B|1, nQB, nKB)
    sink = kb == (first_real // block)[:, None, None]  # (B, 1, nKB)
    scores = scores.masked_fill(~candidate[:, None], float("-inf"))
    scores = scores.masked_fill((candidate & sink)[:, None], torch.finfo(scores.dtype).max)
    scores = scores.masked_fill(kb == qb, float("inf"))
    top = scores.topk(min(top_k, n_kb), dim=-1)
    return top.indices.masked_fill(top.values == float("-inf"), -1)


def selection_table(selected: torch.Tensor, n_kb: int) -> torch.Tensor:
    """``select_blocks``' indices (B, H, nQB, K), -1 unused, as a table (B, H, nQB, nKB) bool: is key block j selected
    for query block i."""
    table = selected.new_zeros(*selected.shape[:-1], n_kb + 1, dtype=torch.bool)
    return table.scatter_(-1, torch.where(selected < 0, n_kb, selected), True)[..., :n_kb]


def window_blocks(q_offset: int, kv_len: int, block: int, window: int, device) -> torch.Tensor:
    """(nQB, W+1) long: each query block and the W = ceil((window-1)/block) blocks before it (-1 before the start).

    The earliest key a query of block i may see, (i*block) - window + 1, lies W blocks back.
    """
    n_kb = num_blocks(kv_len, block)
    back = min(num_blocks(window - 1, block), n_kb - 1)
    qb = torch.arange(q_offset // block, n_kb, device=device)[:, None]
    return (qb - torch.arange(back, -1, -1, device=device)).clamp(min=-1)


# --- the shared gather kernel ---------------------------------------------------------------------
def block_gather_attention(q_blocks: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                           block_idx: torch.Tensor, scaling: float, q_block0: int = 0,
                           valid_blocks: torch.Tensor | None = None,
                           position_rule: PositionRule | None = None) -> torch.Tensor:
    """Softmax attention of each query block over a few gathered key blocks, with a token-level mask.

    q_blocks (B, H, nQB, bs, D): query block i holds positions (q_block0 + i)·bs + 0..bs-1.
    k_blocks, v_blocks (B, H, nKB, bs, D): key block j holds positions j·bs + 0..bs-1.
    block_idx (B|1, H|1, nQB, K) long: key blocks per query block, -1 for none.
    valid_blocks (B, nKB, bs) bool: real keys (None: all real).
    position_rule(q_pos (nQB, bs, 1), kv_pos (B|1, H|1, nQB, 1, K·bs)) -> bool: an extra token rule on absolute
    positions, on top of causality (kv <= q), padding and unused slots, which are always applied.
    Returns (B, H, nQB, bs, D); a query with no allowed key gets zeros.
    """
    batch, heads, n_qb, bs, dim = q_blocks.shape
    n_sel = block_idx.shape[-1]
    gather_idx = block_idx.clamp(min=0).expand(batch, heads, n_qb, n_sel)
    b = torch.arange(batch, device=q_blocks.device).view(batch, 1, 1, 1)
    h = torch.arange(heads, device=q_blocks.device).view(1, heads, 1, 1)
    keys = k_blocks[b, h, gather_idx].reshape(batch, heads, n_qb, n_sel * bs, dim)  # (B, H, nQB, K·bs, D)
    values = v_blocks[b, h, gather_idx].reshape(batch, heads, n_qb, n_sel * bs, dim)

    offsets = torch.arange(bs, device=q_blocks.device)
    q_pos = ((q_block0 + torch.arange(n_qb, device=q_blocks.device))[:, None] * bs + offsets)[..., None]  # (nQB, bs, 1)
    kv_pos = (block_idx[..., None] * bs + offsets).flatten(-2)[..., None, :]  # (B|1, H|1, nQB, 1, K·bs)
    used = (block_idx >= 0)[..., None].expand(*block_idx.shape, bs).flatten(-2)[..., None, :]
    allowed = used & (kv_pos <= q_pos)  # (B|1, H|1, nQB, bs, K·bs)
    if valid_blocks is not None:
        real = valid_blocks[b, gather_idx].flatten(-2)  # (B, H, nQB, K·bs)
        allowed = allowed & real[..., None, :]
    if position_rule is not None:
        allowed = allowed & position_rule(q_pos, kv_pos)

    scores = torch.matmul(q_blocks, keys.transpose(-1, -2)) * scaling  # (B, H, nQB, bs, K·bs)
    probs = masked_softmax(scores.float(), allowed).to(values.dtype)
    return torch.matmul(probs, values)  # (B, H, nQB, bs, D)


# --- the gather route: all three branches ---------------------------------------------------------
def nsa_branches(q, k, v, scaling: float, block: int, top_k: int, window: int,
                 key_valid: torch.Tensor | None = None, first_real: torch.Tensor | None = None):
    """The compressed, selected and sliding outputs, each (B, H, T, D).

    q (B, H, T, D) at positions S-T..S-1, k/v (B, H, S, D); key_valid (B, S) or None;
    first_real (B,) position of each row's first real token (None: 0). The compressed output is fp32,
    the other two are in q's dtype.
    """
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[-2]
    q_offset = kv_len - q_len
    n_kb = num_blocks(kv_len, block)
    q_block0, tail = q_offset // block, n_kb * block - kv_len
    if first_real is None:
        first_real = torch.zeros(batch, dtype=torch.long, device=q.device)

    o_cmp, importance = compressed_attention(q, k, v, scaling, block, key_valid)
    selected = select_blocks(importance, key_valid, first_real, q_offset, block, top_k)  # (B, H, nQB, K)

    # Queries on the block grid: pad in front to their first block's start, behind to the last block's end.
    lead = q_offset - q_block0 * block
    q_blocks = F.pad(q, (0, 0, lead, tail)).view(batch, heads, n_kb - q_block0, block, dim)
    k_blocks = F.pad(k, (0, 0, 0, tail)).view(batch, heads, n_kb, block, dim)
    v_blocks = F.pad(v, (0, 0, 0, tail)).view(batch, heads, n_kb, block, dim)
    valid_blocks = None if key_valid is None else F.pad(key_valid, (0, tail)).view(batch, n_kb, block)

    def gather(block_idx, position_rule=None):
        out = block_gather_attention(q_blocks, k_blocks, v_blocks, block_idx, scaling, q_block0, valid_blocks,
                                     position_rule)
        return out.reshape(batch, heads, -1, dim)[:, :, lead : lead + q_len]  # (B, H, T, D)

    o_sel = gather(selected)
    o_win = gather(window_blocks(q_offset, kv_len, block, window, q.device),
                   lambda q_pos, kv_pos: q_pos - kv_pos < window)
    return o_cmp, o_sel, o_win


# --- the FlexAttention route ----------------------------------------------------------------------
def flex_route(q: torch.Tensor, block: int) -> bool:
    """Whether ``flex_nsa_branches`` can serve q (B, H, T, D): the conditions of flex's fused kernel, and NSA blocks
    that tile its block mask (``flex_tile``): a divisor or a multiple of its tile."""
    return (q.is_cuda and q.shape[-2] >= FLEX_MIN_QUERIES and q.shape[-1] >= FLEX_MIN_HEAD_DIM
            and (BLOCK_SIZE % block == 0 or block % BLOCK_SIZE == 0))


def flex_nsa_branches(q, k, v, scaling: float, block: int, top_k: int, key_valid: torch.Tensor | None = None,
                      first_real: torch.Tensor | None = None, backend: str | None = "inductor"):
    """The compressed and selected outputs, each (B, H, T, D) in q's dtype, through FlexAttention; the sliding
    branch is the window variant's (variants/nsa.py).

    Arguments as ``nsa_branches``; ``backend`` as ``flex_masked_attention``'s (None: uncompiled, forward only on
    CPU, which ignores the block structure: for tests of the masks).
    """
    q_offset = k.shape[-2] - q.shape[-2]
    if first_real is None:
        first_real = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    o_cmp, importance = flex_compressed_attention(q, k, v, scaling, block, key_valid, backend)
    selected = select_blocks(importance, key_valid, first_real, q_offset, block, top_k)  # (B, H, nQB, K)
    return o_cmp, flex_selected_attention(q, k, v, selected, scaling, block, key_valid, backend, first_real)


def flex_compressed_attention(q, k, v, scaling: float, block: int, key_valid: torch.Tensor | None = None,
                              backend: str | None = "inductor", fold: int = COMPRESSED_FOLD
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``compressed_attention`` as one flex call over the pooled keys: out (B, H, T, D) in q's dtype and the
    selection's importance (B, H, nQB, nKB) fp32, exact for the key blocks before each query block (all that
    ``select_blocks`` ranks) and 0 elsewhere.

    The pooled keys stay fp32 in effect (``exact_pooled_scores``): the selection ranks their probabilities, and
    rounding them to bf16 could flip which blocks are chosen.

    The pooled keys are few and most queries see each of them, and flex's backward gives each tile of keys one
    program that walks every query tile seeing it: at 64k tokens, one program per head would walk 512 query tiles
    while the rest of the GPU idles. So the queries are folded into the batch, ``fold`` at a time, against copies of
    the pooled keys (S/block rows each, cheap; autograd sums their gradients): as many programs share that walk.
    """
    batch, heads, q_len, _ = q.shape
    q_offset = k.shape[-2] - q_len
    folds = -(-q_len // fold)
    rows = -(-q_len // folds)  # queries per fold; the last fold is padded with rows that are dropped
    # One compiled pass each on CUDA (kernels/fusion.py): eager, the fp32 copy, padding, masking and sum were four.
    k_cmp, counts = fused(pool_blocks, k)(k, key_valid, block)  # (B, H, nKB, D) fp32, (B|1, nKB)
    v_cmp, _ = fused(pool_blocks, v)(v, key_valid, block)
    has_key = counts > 0
    mask = ended_blocks_mask(block, q_offset, rows, folds, None if key_valid is None else has_key, q.device)
    block_mask = block_mask_for(mask, batch * folds, heads, rows, k_cmp.shape[-2], q.device,
                                cache_key=("nsa_compressed", block, q_offset, q_len, key_valid),
                                per_batch=key_valid is not None or folds > 1, per_head=False)
    q_exact, k_exact = exact_pooled_scores(q, k_cmp)
    q_folded = F.pad(q_exact, (0, 0, 0, folds * rows - q_len)).unflatten(2, (folds, rows)).transpose(1, 2)
    k_folded, v_folded = (x.repeat_interleave(folds, dim=0) for x in (k_exact, v_cmp.to(q.dtype)))  # (B·folds, ...)
    out, lse = flex_masked_attention(q_folded.flatten(0, 1), k_folded, v_folded, block_mask, scaling, backend=backend,
                                     return_lse=True)  # (B·folds, H, rows, D), (B·folds, H, rows)
    out = out.unflatten(0, (batch, folds)).transpose(1, 2).flatten(2, 3)[:, :, :q_len]  # (B, H, T, D)
    lse = lse.unflatten(0, (batch, folds)).transpose(1, 2).flatten(2, 3)[:, :, :q_len]  # (B, H, T)
    with torch.no_grad():
        importance = importance_from_lse(q, k_cmp, lse, scaling, block, q_offset, has_key)
    return out, importance


def ended_blocks_mask(block: int, q_offset: int, rows: int, folds: int, has_key: torch.Tensor | None,
                      device) -> MaskFn:
    """The compressed branch's index mask over pooled keys, for queries folded into the batch: row q_idx of batch
    entry b is the query at position q_offset + (b % folds)·rows + q_idx of row b // folds. It sees pooled block j
    once the block has ended, and only if it holds a real key (has_key (B, nKB); None: all do)."""
    offset = device_constant(q_offset, device)  # a tensor, so that every chunk offset shares one compiled kernel

    def mask(b, h, q_idx, j):
        ended = (j + 1) * block - 1 <= q_idx + (b % folds) * rows + offset
        return ended if has_key is None else ended & has_key[b // folds, j]

    mask.__name__ = f"nsa_ended_blocks{block}"
    return mask


def exact_pooled_scores(q: torch.Tensor, k_cmp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q', k') in q's dtype whose products q'·k' are q·k_cmp to about fp32 precision, for k_cmp fp32.

    k_cmp is split into hi + lo, both in q's dtype (16 mantissa bits together for bf16), and q, exact in its own
    dtype, is repeated against the two: (B, H, T, 2D) and (B, H, nKB, 2D). The kernel's products are exact and it
    sums in fp32, so bf16 tensor cores score the pooled keys almost as the fp32 reference does.
    """
    if q.dtype == torch.float32:
        return q, k_cmp
    hi = k_cmp.to(q.dtype)
    lo = (k_cmp - hi.float()).to(q.dtype)  # its gradient through hi cancels its own: k_cmp's gradient is hi's
    return torch.cat([q, q], dim=-1), torch.cat([hi, lo], dim=-1)


def importance_from_lse(q, k_cmp, lse, scaling: float, block: int, q_offset: int, has_key: torch.Tensor,
                        chunk: int = IMPORTANCE_QUERY_CHUNK) -> torch.Tensor:
    """The compressed probabilities exp(q·k_cmp·scaling - lse) summed per query block, fp32, (B, H, nQB, nKB):
    ``block_importance`` for the key blocks before each query block, 0 for the rest (later blocks, the own block,
    blocks without a real key), which ``select_blocks`` forces or excludes anyway.

    q (B, H, T, D) at positions q_offset..; k_cmp (B, H, nKB, D) fp32; lse (B, H, T), -inf for a query that sees no
    block; has_key (B|1, nKB). Every query sees every block before its own block, so those probabilities need no
    mask. ``chunk`` queries at a time, each against the blocks before its chunk's end: memory stays linear.
    """
    batch, heads, q_len, _ = q.shape
    n_kb = k_cmp.shape[-2]
    q_block0 = q_offset // block
    n_qb = n_kb - q_block0
    lead = q_offset - q_block0 * block
    # On the block grid; lse = +inf gives the rows outside the queries, and those that see no block, probability 0.
    lse = F.pad(torch.where(torch.isfinite(lse), lse, float("inf")), (lead, n_qb * block - lead - q_len),
                value=float("inf"))
    rows = F.pad(q.float() * scaling, (0, 0, lead, n_qb * block - lead - q_len))
    # One matmul gives score - lse: q is extended by -lse and the keys by 1.
    rows = torch.cat([rows, -lse[..., None]], dim=-1)  # (B, H, nQB·block, D+1)
    keys = F.pad(k_cmp, (0, 1), value=1.0)  # (B, H, nKB, D+1)
    importance = q.new_zeros(batch, heads, n_qb, n_kb, dtype=torch.float32)
    per_step = max(1, chunk // block)
    for first in range(0, n_qb, per_step):
        last = min(first + per_step, n_qb)
        before = q_block0 + last - 1  # the key blocks before the step's last query block
        if before == 0:
            continue
        probs = torch.matmul(rows[:, :, first * block : last * block], keys[:, :, :before].transpose(-1, -2)).exp_()
        importance[:, :, first:last, :before] = probs.view(batch, heads, last - first, block, before).sum(3)
    earlier = torch.arange(n_kb, device=q.device) < torch.arange(q_block0, n_kb, device=q.device)[:, None]
    return importance.masked_fill_(~(earlier & has_key[:, None, :])[:, None], 0.0)


def flex_selected_attention(q, k, v, selected: torch.Tensor, scaling: float, block: int,
                            key_valid: torch.Tensor | None = None, backend: str | None = "inductor",
                            first_real: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention of each query block over its selected key blocks, one flex call, no gather: (B, H, T, D).

    q (B, H, T, D) at positions S-T..S-1, k/v (B, H, S, D), selected (B, H, nQB, K) from ``select_blocks``. The
    queries are padded in front to the start of their first block, so that flex's query tiles hold whole query
    blocks. ``first_real`` (B,), the sink block's row: in a long training call the sink's key tile, which every
    query block selects, is not walked end to end by flex's backward (``selected_split_block_mask``).
    """
    q_len, kv_len = q.shape[-2], k.shape[-2]
    q_start = (kv_len - q_len) // block * block
    lead = kv_len - q_len - q_start
    q_rows = F.pad(q, (0, 0, lead, 0)) if lead else q
    if first_real is not None and backend is not None and far_keys_pay(q_rows) and torch.is_grad_enabled():
        block_mask, slots, far_allowed = selected_split_block_mask(selected, first_real, q_start, lead + q_len,
                                                                   kv_len, block, key_valid)
        out, _ = with_far_key_gradients(
            lambda k, v: flex_masked_attention(q_rows, k, v, block_mask, scaling, backend=backend, return_lse=True),
            q_rows, k, v, slots, far_allowed, scaling, rows_per_entry=block)
    else:
        block_mask = selected_block_mask(selected, q_start, lead + q_len, kv_len, block, key_valid)
        out = flex_masked_attention(q_rows, k, v, block_mask, scaling, backend=backend)
    return out[:, :, lead:]


def selected_block_mask(selected: torch.Tensor, q_start: int, q_len: int, kv_len: int, block: int,
                        key_valid: torch.Tensor | None = None, tile: int | None = None) -> BlockMask:
    """The selected branch as a BlockMask, straight from the indices: O(B·H·nQB·nKB), never T×S.

    selected (B, H, nQB, K) long, -1 for unused slots; query row 0 sits at position q_start (a block start), q_len
    rows; key_valid (B, S) or None. Tiles are ``tile`` wide (default ``flex_tile(block)``), each tile/block NSA blocks
    a side: a query tile lists every key tile that one of its query blocks selected, and the mask_mod (selected,
    causal, real key) keeps each query block to its own selection inside them. flex's unfused path, which ignores
    the tiles, computes the same attention.
    """
    tile = tile or flex_tile(block)
    _, tiles, mask = _selection_tiles(selected, q_start, kv_len, block, key_valid, tile)
    return BlockMask.from_kv_blocks(*ordered_blocks(tiles), BLOCK_SIZE=tile, mask_mod=mask,
                                    seq_lengths=(q_len, kv_len))


def selected_split_block_mask(selected: torch.Tensor, first_real: torch.Tensor, q_start: int, q_len: int,
                              kv_len: int, block: int, key_valid: torch.Tensor | None = None, tile: int | None = None
                              ) -> tuple[BlockMask, torch.Tensor, torch.Tensor]:
    """``selected_block_mask`` whose sink tile (the key tile of each row's sink block, which ``select_blocks`` gives
    every query block) is walked in flex's backward only by the query tiles that do not lie wholly after it; with that
    tile's key slots (B, tile) and the pairs the cut leaves out, (B, H, nQB, tile) bool per query block, whose key and
    value gradients kernels/sink_key_grads.py sums. Without the cut, one program per head walks every query tile of the
    sequence for that key tile.
    """
    tile = tile or flex_tile(block)
    chosen, tiles, mask = _selection_tiles(selected, q_start, kv_len, block, key_valid, tile)
    batch, heads, n_qt, n_kt = tiles.shape
    device = selected.device
    sink_tile = first_real.expand(batch) // block * block // tile  # (B,)
    after = q_start + torch.arange(n_qt, device=device) * tile >= (sink_tile[:, None] + 1) * tile  # (B, nQT)
    cut = after[:, None, :, None] & (torch.arange(n_kt, device=device) == sink_tile[:, None, None, None])
    block_mask = block_mask_with_walks(tiles, None, ~cut, q_len, kv_len, tile, mask)

    slots = sink_tile[:, None] * tile + torch.arange(tile, device=device)  # (B, tile)
    inside = slots < kv_len
    slots = slots.clamp(max=kv_len - 1)
    n_qb = chosen.shape[2]
    picked = chosen.gather(-1, (slots // block)[:, None, None, :].expand(batch, heads, n_qb, tile))  # (B, H, nQB, tile)
    real = inside if key_valid is None else inside & key_valid.gather(1, slots)
    far_rows = after.repeat_interleave(tile // block, dim=1)[:, :n_qb]  # (B, nQB): the query block's tile is cut
    return block_mask, slots, picked & real[:, None, None, :] & far_rows[:, None, :, None]


def _selection_tiles(selected: torch.Tensor, q_start: int, kv_len: int, block: int, key_valid: torch.Tensor | None,
                     tile: int) -> tuple[torch.Tensor, torch.Tensor, MaskFn]:
    """The selection table (B, H, nQB, nKB), the tiles it touches (B, H, nQT, nKT) and the branch's mask_mod."""
    batch, heads, n_qb, _ = selected.shape
    n_kb = num_blocks(kv_len, block)
    chosen = selection_table(selected, n_kb)  # (B, H, nQB, nKB)
    per_tile = tile // block
    padded = F.pad(chosen, (0, -n_kb % per_tile, 0, -n_qb % per_tile))
    tiles = padded.view(batch, heads, padded.shape[2] // per_tile, per_tile, -1, per_tile).any(5).any(3)
    start = device_constant(q_start, selected.device)  # a tensor: one compiled kernel for every offset

    def mask(b, h, q_idx, kv_idx):
        allowed = chosen[b, h, q_idx // block, kv_idx // block] & (kv_idx <= q_idx + start)
        return allowed if key_valid is None else allowed & key_valid[b, kv_idx]

    mask.__name__ = f"nsa_selected{block}"
    return chosen, tiles, mask


def flex_tile(block: int) -> int:
    """The block mask's tile for NSA blocks of ``block``: the block itself where it is whole flex tiles, else flex's
    tile, which then holds several blocks a side. flex's backward on Hopper has one default kernel config in bf16,
    128 wide, and refuses it on narrower mask tiles; flex_route sends other block sizes to the gather route."""
    return block if block % BLOCK_SIZE == 0 else BLOCK_SIZE
