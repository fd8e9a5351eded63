"""transformers' mask for one forward, kept as a predicate instead of a T×S tensor (``ModelMask``).

A mask function is registered under attnswap's name in ``AttentionMaskInterface`` (``hf/attention.py``); without it
transformers hands custom attention functions ``attention_mask=None``. Ours (``model_mask``) keeps what transformers'
mask machinery composed -- its causal mask function with the config's sliding window, packed documents and padding,
and the queries' offset into the cache -- as a ``ModelMask``; each variant ANDs that with its own pattern, as
transformers' flex backend does. A caller's 4-D mask arrives as given and becomes a predicate here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from attnswap.errors import AttnswapError
from attnswap.variants import Variant


@dataclass
class ModelMask:
    """What transformers' mask machinery decided for one forward, kept as a predicate instead of a T×S tensor.

    ``padding`` (B, S) marks real keys (None: no padding). ``function(b, h, q_idx, kv_idx)`` is transformers' own
    composed mask over this call's indices (its causality, the config's sliding window, packed documents,
    padding), None where it says no more than causality and padding: then the variants' unmasked fast paths apply.
    Query i sits at position ``q_offset + i`` and key slot j at ``kv_offset + j``; under a StaticCache
    ``q_offset`` is a 0-d tensor, so one compiled graph serves every step.
    """

    padding: torch.Tensor | None
    function: Callable | None
    q_offset: "int | torch.Tensor"
    kv_offset: int
    shape: tuple[int, int, int, int]  # (B, 1, T, S), read by model code that checks a prepared mask's rank
    # packed_documents' answer, worked out at the forward's first attention call and kept for the other layers
    documents: "torch.Tensor | None | bool" = field(default=False, repr=False)
    # The mask the original implementation's own mask function makes from the same arguments, for the modules
    # that run stock (cross-attention); made at the first such call.
    stock_arguments: dict | None = field(default=None, repr=False)
    stock_mask: "torch.Tensor | None | bool" = field(default=False, repr=False)

    # generate() prepares the mask of a StaticCache step before the forward; model code passes a 4-D mask through.
    ndim = 4

    def packed_documents(self, positions: torch.Tensor) -> torch.Tensor | None:
        """``packed_documents(self.function, positions)``, once per forward."""
        if self.documents is False:
            self.documents = packed_documents(self.function, positions)
        return self.documents

    def stock(self, implementation: str):
        """What ``implementation``'s registered mask function (sdpa_mask, eager_mask, …) returns for this call."""
        if self.stock_mask is False:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

            make = ALL_MASK_ATTENTION_FUNCTIONS[implementation if implementation in ALL_MASK_ATTENTION_FUNCTIONS
                                                else "sdpa"]
            self.stock_mask = make(**(self.stock_arguments or {}))
        return self.stock_mask


def packed_documents(function: Callable, positions: torch.Tensor) -> torch.Tensor | None:
    """Each slot's document index (B, T) where the mask ``function`` over one row's own T slots (queries and keys
    alike) says exactly causal attention within documents whose positions count 0, 1, 2, … (``positions`` (B, T));
    None where it says anything else (the config's sliding window binding, a bidirectional span, positions that do
    not restart at 0) or under torch.compile, where the check would be a graph break.

    transformers composes its mask from intervals (causal, window, chunk, document), so a query's allowed keys are one
    run of slots ending at itself; its first key, its own slot, the slot before the first and the one after itself
    settle that run.
    """
    if torch.compiler.is_compiling():
        return None
    batch, length = positions.shape
    slot = torch.arange(length, device=positions.device).expand(batch, -1)
    previous = torch.cat([positions.new_full((batch, 1), -1), positions[:, :-1]], dim=1)
    restarts = positions == 0
    if not bool((restarts | (positions == previous + 1)).all()):
        return None
    first = slot - positions  # (B, T): the slot of each token's document's first token
    row, head = torch.arange(batch, device=positions.device)[:, None], torch.zeros((), dtype=torch.long)

    def allows(kv: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(function(row, head, slot, kv), device=positions.device).expand(batch, length)

    exact = (allows(first) & allows(slot) & (~allows((first - 1).clamp_min(0)) | (first == 0))
             & (~allows((slot + 1).clamp_max(length - 1)) | (slot == length - 1)))
    return torch.cumsum(restarts, dim=1) - 1 if bool(exact.all()) else None


def model_mask(batch_size: int, q_length: int, kv_length: int, q_offset: "int | torch.Tensor" = 0, kv_offset: int = 0,
               mask_function: Callable | None = None, attention_mask: torch.Tensor | None = None,
               local_size: int | None = None, allow_is_causal_skip: bool = True, **kwargs) -> ModelMask:
    """AttentionMaskInterface entry: transformers' mask for this forward, composed the way its flex backend does."""
    if isinstance(attention_mask, ModelMask):  # prepared by generate() for this step already
        return attention_mask
    stock_arguments = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                           kv_offset=kv_offset, attention_mask=attention_mask, local_size=local_size,
                           allow_is_causal_skip=allow_is_causal_skip, **kwargs)
    if mask_function is not None:
        stock_arguments["mask_function"] = mask_function
    from transformers.masking_utils import (add_offsets_to_mask_function, and_masks, causal_mask_function,
                                            padding_mask_function, prepare_padding_mask)

    if isinstance(q_offset, torch.Tensor):  # a StaticCache's own counter, which its update advances in place
        q_offset = q_offset.clone()
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)  # (B, kv_offset + kv_length); unfilled: False
    function = mask_function or causal_mask_function
    # The config's sliding window binds only once queries reach that far past the first key. Where the function holds
    # more than causality and that window (packed documents), transformers forbids skipping it (allow_is_causal_skip);
    # dropping it anyway let every variant, full included, attend across packed documents (tests/test_dropin.py).
    window_unused = (allow_is_causal_skip and local_size is not None and isinstance(q_offset, int)
                     and q_offset + q_length - kv_offset <= local_size)
    plain = function is causal_mask_function or window_unused
    if padding is not None and not plain:
        function = and_masks(function, padding_mask_function(padding))
    if padding is not None:
        padding = padding[:, kv_offset : kv_offset + kv_length]
        # Eager only: an all-real batch takes the unpadded fast paths. Traced, the test would be a graph break.
        if not torch.compiler.is_compiling() and bool(padding.all()):
            padding = None
    function = None if plain else add_offsets_to_mask_function(function, q_offset, kv_offset)
    return ModelMask(padding=padding, function=function, q_offset=q_offset, kv_offset=kv_offset,
                     shape=(batch_size, 1, q_length, kv_length), stock_arguments=stock_arguments)


def whole_rows_mask(config, ids: torch.Tensor) -> ModelMask | None:
    """A prepared mask for ``ids`` (B, T, …) whose rows are each one whole sequence without padding, as transformers
    would compose it for them: plain causal attention. None where the config's own mask says more within T tokens
    (a sliding window that binds, chunked attention), which transformers must compose itself.

    Handed to the model as its ``attention_mask``, it spares transformers its search for packed rows in
    ``position_ids``: eager that search is a host sync per forward, and traced it cannot rule them out, so it composes
    a packing mask that only mask-honouring variants can apply (the others refuse it), and that every masked variant
    must rebuild a block mask for at every call.
    """
    batch, length = ids.shape[:2]
    window = getattr(config, "sliding_window", None)
    if getattr(config, "attention_chunk_size", None) is not None or (window is not None and window < length):
        return None
    return ModelMask(padding=None, function=None, q_offset=0, kv_offset=0, shape=(batch, 1, length, length))


def dense_mask_function(mask: torch.Tensor, variant: Variant | None = None) -> Callable:
    """A caller's 4-D mask (B|1, H|1, T, S) as an index predicate: bool as given; an additive float one allows its
    zeros and blocks its minimum values, and is refused where it holds any other bias (0/1 floats included: SDPA adds
    them to the scores, it masks nothing), which a predicate cannot express, or under torch.compile, where its values
    cannot be checked."""
    if mask.dtype != torch.bool:
        name = variant.spec if variant is not None else "this variant"
        if torch.compiler.is_compiling():
            raise AttnswapError(f"variant {name!r} cannot check a float 4-D attention mask under torch.compile (only "
                                "full adds it to the scores as SDPA does); pass a boolean 4-D mask")
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | blocked).all()):
            raise AttnswapError(f"variant {name!r} cannot apply a float 4-D attention mask holding a score bias "
                                "(values other than 0 and the dtype's minimum; SDPA adds them to the scores, 0/1 "
                                "floats included), only full can; pass a boolean 4-D mask")
        mask = ~blocked

    def given(b, h, q_idx, kv_idx):
        return mask[b % mask.shape[0], h % mask.shape[1], q_idx, kv_idx]

    return given
