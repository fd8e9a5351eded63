"""Greedy generation over a bounded cache, one function per job: ``prefill``, ``decode_one_token``, ``decode_greedy``.

A bounded cache keeps the same tensors at every decode step (attnswap.hf.cache), so the step has static shapes and
reads nothing on the host: ``decode_greedy(..., compile=True)`` compiles ``decode_one_token`` once with
``mode="reduce-overhead"``, which on CUDA captures it as a CUDA graph and replays it for every token, as gpt-fast
and transformers' StaticCache + compile do for full attention, but with no maximum length in the swapped layers.
The prompt (prefill) runs eagerly, through the variants' own kernels.

Left padding: each row's positions count its real tokens (as ``generate`` numbers them), its padding stays out of
every slot and state, and each row keeps its own sinks.
"""

from __future__ import annotations

import torch
from torch import nn

from attnswap.hf.cache import BoundedCache, bounded_cache


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids of a left-padded batch, as ``generate`` gives them: real tokens count 0, 1, ..."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


@torch.no_grad()
def prefill(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: BoundedCache
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt ids (B, T) into ``cache``: the first new token (B, 1) and its position ids (B, 1)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    positions = positions_of(attention_mask)
    logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits
    return logits[:, -1:].argmax(-1), positions[:, -1:] + 1


def decode_one_token(model: nn.Module, cache: BoundedCache, token: torch.Tensor, position: torch.Tensor
                     ) -> torch.Tensor:
    """One greedy step: token (B, 1) at position ids (B, 1) -> the next token (B, 1). No mask: the cache knows
    which of its slots are real."""
    logits = model(input_ids=token, position_ids=position, past_key_values=cache, use_cache=True).logits
    return logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode_greedy(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  max_new_tokens: int = 32, compile: bool = False, cache: BoundedCache | None = None) -> torch.Tensor:
    """``max_new_tokens`` greedy tokens (B, N) after the prompt ids (B, T) of a swapped model.

    ``cache`` (default: ``bounded_cache(model, max_length=T + N)``, whose unswapped layers preallocate their slots)
    must keep every layer in tensors a step writes in place. ``compile``: capture the decode step once
    (``torch.compile(mode="reduce-overhead")``); the first steps then include compile time.
    """
    cache = cache if cache is not None else bounded_cache(model, max_length=ids.shape[1] + max_new_tokens)
    token, position = prefill(model, ids, attention_mask, cache)
    tokens = [token]
    cache.start_captured_steps()
    step = compiled_step() if compile else decode_one_token
    for _ in range(max_new_tokens - 1):
        token = step(model, cache, token, position).clone()  # a replayed graph overwrites its output
        position = position + 1
        tokens.append(token)
    cache.finish_captured_steps(max_new_tokens - 1)
    return torch.cat(tokens, dim=1)


_COMPILED = None


def compiled_step():
    """``decode_one_token`` compiled once per process, at its call site (``torch.compile`` keys graphs by model)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(decode_one_token, mode="reduce-overhead")
    return _COMPILED
