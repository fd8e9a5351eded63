"""Block-sparse masked attention: FlexAttention on CUDA, a correct materialising fallback elsewhere.

On CUDA, ``flex_attention`` is compiled once (``compiled_flex_attention``) and skips every block of
BLOCK_SIZE × BLOCK_SIZE scores that the mask rules out. The mask's block structure (a ``BlockMask``) is
built once per mask and shape and kept in a small LRU cache (``block_mask_for``). Elsewhere, and for short
query blocks (decode steps), the T×S scores are materialised: correct, and cheap at those sizes.

The recompile trap: compiled flex specialises on every (B, T, S) shape, grad mode and mask constant.
Past dynamo's recompile limit (8 by default) torch silently runs flex unfused, materialising the T×S
scores (an OOM at 16k tokens). So the limit is raised to RECOMPILE_LIMIT, and flex is compiled with
``fullgraph=True``: should even that be exceeded, the call fails with an AttnswapError instead of
silently falling back.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from attnswap.errors import AttnswapError
from attnswap.kernels.dense import sdpa_masked
from attnswap.kernels.sinks_branch import attend_with_far_branch
from attnswap.kernels.masks import MaskFn, index_grid, mask_bands, materialize, materialize_bias

BLOCK_SIZE = 128  # flex_attention's default tile
# Shorter query blocks (decode steps, T=1) materialise: T×S is small there, and as S grows by one token
# per step, every step would otherwise be a new compiled shape.
FLEX_MIN_QUERIES = BLOCK_SIZE
FLEX_MIN_HEAD_DIM = 16  # the Triton kernel's tl.dot needs head_dim >= 16
RECOMPILE_LIMIT = 128  # compiled shapes × grad modes × mask constants per process; dynamo's default is 8
MASK_CACHE_SIZE = 32
MASK_EVAL_BUDGET = 1 << 25  # mask entries evaluated at once while building a block mask (bounds memory at 16k)
# Far keys are a branch of their own (kernels/sinks_branch.py) from this many queries on: window 256 + 4 sinks took
# 0.21 ms forward+backward so at 4096 against the single mask's 0.30 (H200, bf16, 12 heads of 64;
# benchmarks/results/bench_kernel_64k_h200/b3249e6).
# Shorter lengths are not measured.
FAR_KEYS_MIN_QUERIES = 4096

_BLOCK_MASKS: OrderedDict[Hashable, tuple[object, list[torch.Tensor]]] = OrderedDict()


@dataclass(frozen=True)
class FarKeys:
    """A few keys that every query may attend from afar (attention sinks): ``count`` key slots from ``first`` (B,) on,
    and ``near_mask``, the index mask without them. Flex runs the near mask alone; the far pairs are a branch merged
    with it by log-sum-exp (kernels/sinks_branch.py)."""

    first: torch.Tensor
    count: int
    near_mask: MaskFn


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index_mask: MaskFn,
    scaling: float,
    score_bias: MaskFn | None = None,
    *,
    cache_key: Hashable = None,
    per_batch: bool = True,
    per_head: bool = True,
    return_lse: bool = False,
    far_keys: FarKeys | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted to ``index_mask``: (B, H, T, D) from q (B, H, T, D), k/v (B, H, S, D).

    ``score_bias(b, h, q_idx, kv_idx)`` is an optional float added to the scaled scores; gradients reach
    the tensors it captures. ``cache_key`` names what the mask depends on besides the shapes (see
    ``block_mask_for``); None rebuilds the block mask every call. ``per_batch``/``per_head`` False say the
    mask is the same for every row/head, so its block mask is built once and broadcast.
    A query row with no allowed key outputs zeros.
    ``return_lse`` also returns each row's log-sum-exp of its allowed (biased) scaled scores, (B, H, T) fp32,
    -inf for a row with no allowed key: what merges this attention with one over other keys (kernels/merge.py).
    ``far_keys`` says which few keys ``index_mask`` lets every query attend (they must cover every pair outside the
    near mask); the result is the same, and a long call runs no far keys' tile in every query tile.
    """
    batch, heads, q_len, _ = q.shape
    # Inductor (torch 2.11, H100) fails to lower the backward of the mixture's score_mod ("Buffers cannot be
    # created while lowering a pointwise subgraph"), so a learnable bias trains through the materialising path;
    # inference with a bias (a hardened mixture) still runs fused.
    trains_bias = score_bias is not None and torch.is_grad_enabled()
    if flex_serves(q) and not trains_bias:
        if far_keys is not None and score_bias is None and far_keys_pay(q):
            block_mask, slots, far_allowed = block_mask_for(
                index_mask, batch, heads, q_len, k.shape[-2], q.device,
                cache_key=cache_key, per_batch=per_batch, per_head=per_head, far_keys=far_keys)
            out, lse = attend_with_far_branch(
                lambda q, k, v: flex_masked_attention(q, k, v, block_mask, scaling, return_lse=True),
                q, k, v, slots, far_allowed, scaling)
            return (out, lse) if return_lse else out
        block_mask = block_mask_for(index_mask, batch, heads, q_len, k.shape[-2], q.device,
                                    cache_key=cache_key, per_batch=per_batch, per_head=per_head)
        return flex_masked_attention(q, k, v, block_mask, scaling, score_bias, return_lse=return_lse)
    return materialised_attention(q, k, v, index_mask, scaling, score_bias, return_lse=return_lse)


def far_keys_pay(q: torch.Tensor) -> bool:
    """Whether a call of queries q (B, H, T, D) serves its far keys apart: flex serves it, and it is long enough
    (FAR_KEYS_MIN_QUERIES) for the far keys' tile in every query tile to cost more than a branch of their own."""
    return flex_serves(q) and q.shape[-2] >= FAR_KEYS_MIN_QUERIES


def flex_serves(q: torch.Tensor) -> bool:
    """Whether FlexAttention's fused kernel serves queries q (B, H, T, D); otherwise scores are materialised."""
    return q.is_cuda and q.shape[-2] >= FLEX_MIN_QUERIES and q.shape[-1] >= FLEX_MIN_HEAD_DIM


def materialised_attention(q, k, v, index_mask: MaskFn, scaling: float, score_bias: MaskFn | None = None,
                           return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The same function through SDPA with a materialised (B, H, T, S) mask: any device, memory O(T×S)."""
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[-2]
    allowed = materialize(index_mask, batch, heads, q_len, kv_len, q.device)
    bias = None if score_bias is None else materialize_bias(score_bias, batch, heads, q_len, kv_len, q.device)
    if bias is None:
        out = sdpa_masked(q, k, v, allowed, scaling)
    else:
        attn_bias = bias.to(q.dtype).masked_fill(~allowed, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scaling)
        out = out.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
    if not return_lse:
        return out
    # SDPA does not hand out its log-sum-exp; at the sizes this path serves, recomputing the scores is cheap.
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling  # (B, H, T, S)
    return out, _allowed_logsumexp(scores if bias is None else scores + bias, allowed)


def _allowed_logsumexp(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logsumexp over each row's allowed scores, (B, H, T): -inf for a row with none, and no NaN in its gradient
    (logsumexp of an all -inf row back-propagates exp(-inf - -inf))."""
    empty = ~allowed.any(dim=-1)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(empty[..., None], 0.0)
    return torch.logsumexp(scores, dim=-1).masked_fill(empty, float("-inf"))


# --- FlexAttention ------------------------------------------------------------------------------
@functools.cache
def compiled_flex_attention(backend: str = "inductor"):
    """``flex_attention`` compiled once per process (per backend: tests use "eager" on CPU to count recompiles)."""
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.7
    setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
    return torch.compile(flex_attention, dynamic=False, fullgraph=True, backend=backend)


def flex_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scaling: float,
    score_bias: MaskFn | None = None,
    *,
    backend: str | None = "inductor",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention over ``block_mask`` (its mask_mod is the index mask): (B, H, T, D).

    ``backend`` is the torch.compile backend; None runs flex uncompiled, which is unfused and, on CPU,
    forward-only: for tests. ``return_lse``: also each row's log-sum-exp (B, H, T) fp32, natural log, -inf for
    an empty row; gradients flow through it.
    """
    from torch._dynamo.exc import FailOnRecompileLimitHit  # here: importing dynamo costs seconds

    score_mod = None if score_bias is None else _bias_score_mod(score_bias)
    flex = flex_attention if backend is None else compiled_flex_attention(backend)
    try:
        if not return_lse:
            return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scaling)
        out, aux = flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                        return_aux=AuxRequest(lse=True))
        return out, aux.lse.float()
    except FailOnRecompileLimitHit:
        limit = getattr(torch._dynamo.config, "recompile_limit", None) or torch._dynamo.config.cache_size_limit
        raise AttnswapError(
            f"compiled flex_attention hit dynamo's recompile limit ({limit}): too many distinct (batch, length, "
            "grad mode) combinations; use a few fixed sequence lengths or raise torch._dynamo.config.recompile_limit"
        ) from None


def _bias_score_mod(bias: MaskFn):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias(b, h, q_idx, kv_idx)

    score_mod.__name__ = f"bias_{getattr(bias, '__name__', 'score')}"
    return score_mod


# --- block masks --------------------------------------------------------------------------------
def block_mask_for(
    index_mask: MaskFn,
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    device,
    *,
    cache_key: Hashable = None,
    per_batch: bool = True,
    per_head: bool = True,
    block_size: int = BLOCK_SIZE,
    far_keys: FarKeys | None = None,
) -> BlockMask | tuple[BlockMask, torch.Tensor, torch.Tensor]:
    """The BlockMask of ``index_mask`` for q (batch, heads, q_len), k (.., kv_len), from the cache when it can be.

    ``cache_key`` must name everything the mask depends on besides these arguments. Tensors inside it
    count by identity and in-place version, and the cache keeps them alive so that an id is never reused:
    an unpadded mask keyed by its spec is built once per shape; one keyed by a batch's padding tensor is
    built once per forward and shared by all layers. None builds every call.
    With ``far_keys``: ``build_far_branch_masks``'s block mask, far slots and far pairs.
    """
    if far_keys is None:
        build = functools.partial(build_block_mask, index_mask, batch if per_batch else None,
                                  heads if per_head else None, q_len, kv_len, device, block_size)
    else:
        build = functools.partial(build_far_branch_masks, index_mask, far_keys, batch, heads if per_head else None,
                                  q_len, kv_len, device, per_batch, block_size)
    if cache_key is None:
        return build()
    pinned: list[torch.Tensor] = []
    # The shape stays in the key even when the block mask broadcasts: the cached mask_mod indexes
    # tensors captured at build time (first_real is (B,)), so they must fit this call.
    key = (_freeze(cache_key, pinned), batch, heads, q_len, kv_len, str(device), per_batch, per_head, block_size,
           None if far_keys is None else far_keys.count)
    if key in _BLOCK_MASKS:
        _BLOCK_MASKS.move_to_end(key)
        return _BLOCK_MASKS[key][0]
    built = build()
    _BLOCK_MASKS[key] = (built, pinned)
    if len(_BLOCK_MASKS) > MASK_CACHE_SIZE:
        _BLOCK_MASKS.popitem(last=False)
    return built


def _freeze(key, pinned: list[torch.Tensor]) -> Hashable:
    if isinstance(key, torch.Tensor):
        pinned.append(key)
        return ("tensor", id(key), key._version)
    if isinstance(key, (tuple, list)):
        return tuple(_freeze(item, pinned) for item in key)
    return key


def build_block_mask(
    index_mask: MaskFn,
    batch: int | None,
    heads: int | None,
    q_len: int,
    kv_len: int,
    device,
    block_size: int = BLOCK_SIZE,
) -> BlockMask:
    """``create_block_mask`` without materialising (B, H, T, S) at once: the mask is evaluated one band of
    query blocks at a time (MASK_EVAL_BUDGET entries), so a 16k × 16k mask needs tens of MB, not GBs.
    ``batch``/``heads`` None: the mask does not vary along that axis and the block mask broadcasts.
    """
    full, partial = _full_and_partial_blocks(index_mask, batch, heads, q_len, kv_len, device, block_size)
    return BlockMask.from_kv_blocks(*ordered_blocks(partial), *ordered_blocks(full), BLOCK_SIZE=block_size,
                                    mask_mod=index_mask, seq_lengths=(q_len, kv_len))


def build_far_branch_masks(
    index_mask: MaskFn,
    far_keys: FarKeys,
    batch: int,
    heads: int | None,
    q_len: int,
    kv_len: int,
    device,
    per_batch: bool = True,
    block_size: int = BLOCK_SIZE,
) -> tuple[BlockMask, torch.Tensor, torch.Tensor]:
    """The block mask of ``far_keys.near_mask`` alone; the far keys' slots (B, n), distinct, -1 past the keys; and the
    far pairs, (B, 1 or H, T, n) bool: what ``index_mask`` allows there and the near mask does not
    (kernels/sinks_branch.py merges them)."""
    block_mask = build_block_mask(far_keys.near_mask, batch if per_batch else None, heads, q_len, kv_len, device,
                                  block_size)
    slots = far_keys.first.expand(batch)[:, None] + torch.arange(far_keys.count, device=device)  # (B, n)
    inside = slots < kv_len
    b, h, q, _ = index_grid(batch, heads or 1, q_len, 0, device)
    kv = slots.clamp(max=kv_len - 1)[:, None, None, :]
    allowed = index_mask(b, h, q, kv) & ~far_keys.near_mask(b, h, q, kv) & inside[:, None, None, :]
    return block_mask, torch.where(inside, slots, -1), allowed.contiguous()


def block_mask_with_walks(partial: torch.Tensor, full: torch.Tensor | None, walked: torch.Tensor, q_len: int,
                          kv_len: int, block_size: int, mask_mod: MaskFn) -> BlockMask:
    """The BlockMask of ``partial`` and ``full`` blocks (bool (B, H, n_q, n_kv); ``full`` None: none), whose backward
    walks (its transposed half: the query blocks each key block's program visits) keep only the ``walked`` blocks. The
    pairs of the blocks left out get no key or value gradient from flex: the caller sums them (kernels/sink_key_grads.py)."""
    lists = [(None, None) if blocks is None else ordered_blocks(blocks) for blocks in (partial, full)]
    walks = [(None, None) if blocks is None else ordered_blocks((blocks & walked).transpose(-1, -2))
             for blocks in (partial, full)]
    return BlockMask((q_len, kv_len), *lists[0], *lists[1], *walks[0], *walks[1],
                     BLOCK_SIZE=(block_size, block_size), mask_mod=mask_mod)


def _full_and_partial_blocks(index_mask: MaskFn, batch: int | None, heads: int | None, q_len: int, kv_len: int,
                             device, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which blocks of ``block_size``² scores the mask allows wholly and which in part, bool (B, H, n_q, n_kv)."""
    n_b, n_h = batch or 1, heads or 1
    n_kv = -(-kv_len // block_size)
    band = max(1, MASK_EVAL_BUDGET // (n_b * n_h * block_size * kv_len)) * block_size
    counts = []
    for allowed in mask_bands(index_mask, n_b, n_h, q_len, kv_len, device, band):
        # Positions past T or S pad with False, so edge blocks are never "full" and always run mask_mod.
        allowed = F.pad(allowed, (0, n_kv * block_size - kv_len, 0, -allowed.shape[2] % block_size))
        blocks = allowed.view(n_b, n_h, -1, block_size, n_kv, block_size)
        counts.append(blocks.sum(dim=(3, 5), dtype=torch.int32))  # (B, H, blocks in band, n_kv)
    count = torch.cat(counts, dim=2)  # (B, H, n_q, n_kv)
    full = count == block_size * block_size  # flex skips mask_mod on these
    return full, (count > 0) & ~full


def ordered_blocks(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, n_q, n_kv) bool -> per query block, the number of listed kv blocks (B, H, n_q) and their
    indices first (B, H, n_q, n_kv), both int32: BlockMask's layout."""
    num = dense.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(dense.to(torch.uint8), dim=-1, descending=True, stable=True).to(torch.int32)
    # flex's kernels read these as contiguous rows; a transposed ``dense`` (a backward walk's list) sorts into
    # transposed strides.
    return num.contiguous(), indices.contiguous()
