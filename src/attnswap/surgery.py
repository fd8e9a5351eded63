"""Put an attention variant into a Hugging Face causal LM, take it out again, save and load the result.

The swap goes through transformers' own attention registry, not through patched HF code: one function,
``attnswap_attention``, is registered in ``AttentionInterface`` under the name ``"attnswap"``, and the
model's ``attn_implementation`` is switched to it. Each swapped attention module carries its variant
(``module.attnswap_variant``) and, where the variant learns something, its parameters under the fixed
attribute ``module.attnswap`` -- so the trainable set is exactly the ``*.attnswap.*`` parameters.

A mask function is registered under the same name in ``AttentionMaskInterface``; without it transformers
hands custom attention functions ``attention_mask=None``. Ours (``model_mask``) keeps what transformers'
mask machinery composed -- its causal mask function with the config's sliding window, packed documents and
padding, and the queries' offset into the cache -- as a ``ModelMask``; each variant ANDs that with its own
pattern, as transformers' flex backend does. A caller's 4-D mask arrives as given and is composed the same way.
A variant that cannot honour some mask is refused with an AttnswapError, never run as if it were not there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from attnswap.errors import AttnswapError
from attnswap.kernels.masks import device_arange
from attnswap.variants import AttnContext, Variant, get_variant
from attnswap.variants.full import Full

IMPL_NAME = "attnswap"
STATE_ATTR = "attnswap"  # learnable variant parameters live under this attribute of each attention module
STATE_FILE = "attnswap.safetensors"
_FULL = Full()


@dataclass
class SwapRecord:
    """What ``swap`` changed, kept on the model so that ``unswap`` can undo it exactly."""

    variant: Variant
    layers: list[int]
    original_impl: str
    requires_grad: dict[str, bool] = field(repr=False)
    hook: "torch.utils.hooks.RemovableHandle | None" = field(default=None, repr=False)  # removed by unswap


# --- the registered attention function ---------------------------------------------------------
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


# A forward given only these (others None) is of whole rows: no mask, no positions, no cache, no token types.
_PLAIN_CALL_INPUTS = frozenset({"input_ids", "inputs_embeds", "use_cache", "output_attentions", "output_hidden_states",
                                "return_dict"})


def _whole_rows_unless_told_otherwise(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook on a swapped model's base: a call with tokens alone (``_PLAIN_CALL_INPUTS``) gets
    ``whole_rows_mask`` as its attention mask, which is what transformers would conclude eagerly. Without it a
    compiled ``model(ids, use_cache=False)`` got a packing mask, which Hedgehog, Performer, NSA, the mixture and the
    hybrid refused (tests/test_dropin.py). Under another implementation (``set_attn_implementation("sdpa")`` on a
    swapped model) it does nothing: that model runs stock."""
    if module.config._attn_implementation != IMPL_NAME:
        return None
    given = {name for name, value in kwargs.items() if value is not None}
    if len(args) > 1 or not given <= _PLAIN_CALL_INPUTS:
        return None
    tokens = args[0] if args else kwargs.get("input_ids")
    tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
    mask = None if tokens is None else whole_rows_mask(module.config, tokens)
    return None if mask is None else (args, {**kwargs, "attention_mask": mask})


def attention_context(module: nn.Module, variant: Variant, attention_mask, scaling: float, query: torch.Tensor,
                      key: torch.Tensor, position_ids: torch.Tensor | None = None, cache_slots=None) -> AttnContext:
    """The AttnContext of one attention call: transformers' mask (a ``ModelMask``, a caller's 4-D mask, a 2-D
    padding mask or None) in the form variants read, refusing what ``variant`` cannot honour. ``cache_slots``: what
    a bounded cache (attnswap.cache) says its keys hold; it places the queries itself."""
    batch, q_len, kv_len, device = query.shape[0], query.shape[-2], key.shape[-2], query.device
    ctx = AttnContext(scaling=scaling, layer_idx=getattr(module, "layer_idx", 0) or 0)
    documents = None
    if attention_mask is None:  # transformers made no mask (e.g. a paged cache): plain causal attention
        return ctx
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return dataclasses.replace(ctx, key_valid=attention_mask.bool())
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool and variant.honours_score_bias:
            # Added to the scores as SDPA adds it (a 0/1 float mask included, which is a bias, not a mask).
            return dataclasses.replace(ctx, dense_mask=attention_mask)
        ctx = dataclasses.replace(ctx, dense_mask=attention_mask,
                                  model_mask=dense_mask_function(attention_mask, variant))
    elif isinstance(attention_mask, ModelMask):
        ctx = dataclasses.replace(ctx, key_valid=attention_mask.padding, model_mask=attention_mask.function)
        q_start = attention_mask.q_offset - attention_mask.kv_offset  # query 0's key slot
        packed = (ctx.model_mask is not None and position_ids is not None and ctx.key_valid is None
                  and isinstance(q_start, int) and q_start == 0 and q_len == kv_len)
        if packed:
            # Sequences packed into one row (or any call without a cache): each token's position is its position
            # in its own document, so windows, sinks and global tokens start afresh there, as for it alone.
            positions = position_ids.expand(batch, -1)
            first = torch.zeros(batch, dtype=torch.long, device=device)
            ctx = dataclasses.replace(ctx, q_positions=positions, kv_positions=positions, first_real=first)
            if variant.honours_packed_documents and not variant.honours_model_mask:
                documents = attention_mask.packed_documents(positions)
        elif cache_slots is None and not (isinstance(q_start, int) and q_start == kv_len - q_len):
            # Not the last T slots: a StaticCache, whose slots are preallocated.
            ctx = dataclasses.replace(ctx, q_positions=device_arange(0, q_len, device) + q_start)
    else:
        raise AttnswapError(f"attnswap got an attention mask of type {type(attention_mask).__name__} "
                            f"{tuple(getattr(attention_mask, 'shape', ()))}; pass a 2-D attention_mask or a 4-D mask")
    if cache_slots is not None:
        if ctx.model_mask is not None:
            raise AttnswapError("the bounded cache serves causal attention with padding only, not this model's own "
                                "mask (sliding window, 4-D mask); generate with the default cache instead")
        return cache_slots.context(ctx)
    if documents is not None:  # the model's mask said no more than the documents, which the variant applies itself
        return dataclasses.replace(ctx, documents=documents)
    if ctx.model_mask is not None and not variant.honours_model_mask:
        traced = " (under torch.compile with use_cache=False, transformers assumes packed rows unless it gets one)"
        raise AttnswapError(f"variant {variant.spec!r} cannot apply this model's own mask (the config's sliding window, "
                            "packed sequences or a 4-D attention mask); run it on unpacked, padded batches with a "
                            f"2-D attention_mask{traced if torch.compiler.is_compiling() else ''}")
    if ctx.q_positions is not None and not variant.honours_query_positions:
        raise AttnswapError(f"variant {variant.spec!r} needs the queries to be the last keys of the cache; generate "
                            "with the default DynamicCache (or attnswap.cache.bounded_cache), not a StaticCache")
    return ctx


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


def attnswap_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry. query (B, H, T, D), key/value (B, Hkv, S, D) -> ((B, T, H, D), None).

    ``dropout`` is not applied: distillation keeps the model in eval mode so teacher and student are deterministic.
    """
    variant = getattr(module, "attnswap_variant", None)
    if variant is None and not _is_self_attention(module):
        return _stock_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if variant is None:
        # A layer a saved swap never reached (the folder was loaded without attnswap.load): refuse, never full.
        saved = getattr(getattr(module, "config", None), "attnswap", None)
        if saved and module.layer_idx in saved["layers"]:
            raise AttnswapError(f"layer {module.layer_idx} was saved with variant {saved['variant']!r} but carries "
                                "none; load the folder with attnswap.load, or with AutoModelForCausalLM.from_pretrained "
                                "after `import attnswap`")
        variant = _FULL
    if getattr(module, "attnswap_bypass", False):
        variant = _FULL
    # A bounded cache (attnswap.cache) tags the keys it returns with what it holds; read it before GQA copies them.
    cache_slots = getattr(key, "attnswap_slots", None)
    if hasattr(cache_slots, "decode"):  # a bounded cache's decode step reads its slots and state as it keeps them
        scaling, state = scaling if scaling is not None else query.shape[-1] ** -0.5, getattr(module, STATE_ATTR, None)
        for observer in getattr(module, "attnswap_observers", ()):  # the keys as cached: Hkv heads
            observer(module, variant, query, key, value, AttnContext(scaling=scaling, layer_idx=module.layer_idx), state)
        with torch.profiler.record_function("attnswap.attention"):
            out = cache_slots.decode(module, variant, query, attention_mask, scaling, state)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: expand once, here, so variants see H key heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    ctx = attention_context(module, variant, attention_mask, scaling, query, key, kwargs.get("position_ids"),
                            cache_slots)
    state = getattr(module, STATE_ATTR, None)
    for observer in getattr(module, "attnswap_observers", ()):
        observer(module, variant, query, key, value, ctx, state)
    weights = _weights_if_asked(variant, query, key, ctx, state) if cache_slots is None else None
    with torch.profiler.record_function("attnswap.attention"):  # bench isolates attention time by this range
        if weights is not None:  # as eager: the output from the weights returned, so their gradients flow
            out = torch.matmul(weights, value)
        elif cache_slots is None:
            out = variant.attend(query, key, value, ctx, state)  # (B, H, T, D)
        else:  # the cache may hold a running state that the new keys extend
            out = cache_slots.attend(variant, query, key, value, ctx, state)
    return out.to(query.dtype).transpose(1, 2).contiguous(), weights


def _weights_if_asked(variant: Variant, query, key, ctx: AttnContext, state) -> torch.Tensor | None:
    """The variant's attention matrix (B, H, T, S) where the caller asked for ``output_attentions`` (transformers
    collects what the attention function returns), as eager gives it; None otherwise, and where a variant implies no
    matrix, as SDPA gives it."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers without output capturing: no weights, as from SDPA
        return None
    collected = _active_collector.get()
    if not collected or "attentions" not in collected:
        return None
    try:
        return variant.probs(query, key, ctx, state).to(query.dtype)
    except NotImplementedError:
        return None


def _stock_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """A module swap leaves alone (cross-attention) under the model's original implementation, with the mask that
    implementation's own mask function makes: exactly what the unswapped model runs."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = (getattr(module.config, "attnswap", None) or {}).get("original_attn_implementation", "sdpa")
    if isinstance(attention_mask, ModelMask):
        attention_mask = attention_mask.stock(original)
    if original == "eager":
        function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if function is None:
            raise AttnswapError(f"{type(module).__name__} has no eager_attention_forward to run unswapped; load the "
                                "model with attn_implementation='sdpa' before swapping")
    else:
        function = ALL_ATTENTION_FUNCTIONS[original]
    return function(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    # The classmethods write the class-wide mapping, which is what mask creation checks.
    AttentionInterface.register(IMPL_NAME, attnswap_attention)
    AttentionMaskInterface.register(IMPL_NAME, model_mask)


_register()


# --- finding the attention layers --------------------------------------------------------------
def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a decoder, in layer order."""
    found = [m for m in model.modules() if _is_self_attention(m)]
    found.sort(key=lambda m: m.layer_idx)
    n_layers = getattr(model.config, "num_hidden_layers", len(found))
    assert len(found) == n_layers, f"found {len(found)} attention modules for {n_layers} layers"
    return found


def _is_self_attention(module: nn.Module) -> bool:
    """A decoder layer's self-attention: what swap replaces; any other attention module runs stock."""
    return (type(module).__name__.endswith("Attention") and isinstance(getattr(module, "layer_idx", None), int)
            and not getattr(module, "is_cross_attention", False))


def _resolve_layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    n_layers = len(attention_modules(model))
    if layers is None:
        return list(range(n_layers))
    chosen = sorted({int(i) for i in layers})
    bad = [i for i in chosen if not 0 <= i < n_layers]
    if bad:
        raise AttnswapError(f"layer index {bad[0]} out of range; this model has layers 0..{n_layers - 1}")
    if not chosen:
        raise AttnswapError("layers is empty; give at least one layer index or leave it out for all layers")
    return chosen


# --- swap / unswap -----------------------------------------------------------------------------
def swap(model: nn.Module, variant: "str | Variant", layers: Sequence[int] | None = None,
         trainable: str = "variant") -> nn.Module:
    """Put ``variant`` into the chosen self-attention layers of ``model`` (all by default), in place.

    ``trainable``: "variant" (only the variant's parameters learn), "none", or "all".
    Returns the model. The original weights are shared, not copied: ``original_attention(model)``
    runs the same model as the original.
    """
    if getattr(model.config, "is_encoder_decoder", False):
        raise AttnswapError(f"{type(model).__name__} is an encoder-decoder; attnswap swaps the self-attention of "
                            "decoder-only causal LMs (GPT-2 with add_cross_attention keeps its cross-attention stock)")
    if is_swapped(model):
        unswap(model)
    variant = get_variant(variant)
    variant.check_layers(len(attention_modules(model)))
    chosen = _resolve_layers(model, layers)
    if trainable not in ("variant", "none", "all"):
        raise AttnswapError(f"trainable must be one of variant, none, all; got {trainable!r}")
    record = SwapRecord(
        variant=variant,
        layers=chosen,
        original_impl=model.config._attn_implementation or "eager",
        requires_grad={name: p.requires_grad for name, p in model.named_parameters()},
    )
    modules = attention_modules(model)
    head_dim, num_heads = head_shape(model)
    weight = next(model.parameters())
    for idx in chosen:
        module = modules[idx]
        module.attnswap_variant = variant
        state = variant.make_state(num_heads, head_dim)
        if state is not None:
            # Learnable variant parameters stay fp32 even in a bf16 model: they are few and need precision.
            setattr(module, STATE_ATTR, state.to(device=weight.device, dtype=torch.float32))
    for name, param in model.named_parameters():
        param.requires_grad_(trainable == "all" or (trainable == "variant" and f".{STATE_ATTR}." in f".{name}"))
    model.set_attn_implementation(IMPL_NAME)
    record.hook = model.base_model.register_forward_pre_hook(_whole_rows_unless_told_otherwise, with_kwargs=True)
    model.attnswap_record = record
    model.save_pretrained = functools.partial(save, model)  # so save_pretrained / push_to_hub keep the variant
    model.config.attnswap = {"variant": variant.spec, "layers": chosen, "original_attn_implementation": record.original_impl}
    return model


def unswap(model: nn.Module) -> nn.Module:
    """Undo ``swap``: the original attention, parameters and trainability, in place."""
    record: SwapRecord | None = getattr(model, "attnswap_record", None)
    if record is None:
        return model
    for module in attention_modules(model):
        for attr in ("attnswap_variant", STATE_ATTR, "attnswap_bypass"):
            if hasattr(module, attr):
                delattr(module, attr)
    for name, param in model.named_parameters():
        param.requires_grad_(record.requires_grad.get(name, param.requires_grad))
    model.set_attn_implementation(record.original_impl)
    record.hook.remove()
    del model.attnswap_record
    del model.save_pretrained
    if hasattr(model.config, "attnswap"):
        del model.config.attnswap
    return model


def is_swapped(model: nn.Module) -> bool:
    return getattr(model, "attnswap_record", None) is not None


def swapped_variant(model: nn.Module) -> Variant | None:
    record = getattr(model, "attnswap_record", None)
    return None if record is None else record.variant


@contextlib.contextmanager
def original_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Run a swapped model with its original (full) attention: the frozen teacher, without a second copy.

    Where distillation also trained base weights (MLPs, projections), the original tensors remembered by
    ``keep_original_weights`` are swapped in for the duration, so this is the true original model.
    """
    modules = attention_modules(model)
    kept: dict[str, torch.Tensor] = getattr(model, "attnswap_original_weights", {})
    params = dict(model.named_parameters())
    for module in modules:
        module.attnswap_bypass = True
    for name, tensor in kept.items():
        params[name].data, kept[name] = tensor, params[name].data
    try:
        yield model
    finally:
        for name, tensor in kept.items():
            params[name].data, kept[name] = tensor, params[name].data
        for module in modules:
            module.attnswap_bypass = False


def keep_original_weights(model: nn.Module, original: nn.Module) -> list[str]:
    """Remember ``original``'s tensors wherever the (distilled) ``model``'s differ; returns their names."""
    own = dict(model.named_parameters())
    kept = {}
    for name, param in original.named_parameters():
        mine = own.get(name)
        if mine is not None and mine.shape == param.shape:
            theirs = param.detach().to(device=mine.device, dtype=mine.dtype)
            if not torch.equal(mine.detach(), theirs):
                kept[name] = theirs.clone()
    model.attnswap_original_weights = kept
    return sorted(kept)


@contextlib.contextmanager
def observe_attention(model: nn.Module, observer: Callable) -> Iterator[None]:
    """Call ``observer(module, variant, q, k, v, ctx, state)`` at every attention call (evaluation, tests)."""
    if not is_swapped(model):
        raise AttnswapError("observe_attention needs a swapped model; call swap(model, 'full') first")
    modules = attention_modules(model)
    for module in modules:
        module.attnswap_observers = (*getattr(module, "attnswap_observers", ()), observer)
    try:
        yield
    finally:
        for module in modules:
            module.attnswap_observers = tuple(o for o in module.attnswap_observers if o is not observer)


def variant_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the variant's learnable tensors (``*.attnswap.*``)."""
    return {k: v for k, v in model.state_dict().items() if f".{STATE_ATTR}." in f".{k}"}


def l1_penalty(model: nn.Module) -> torch.Tensor | None:
    """Sum of the variant's L1 penalties over swapped layers (None if the variant has none)."""
    variant = swapped_variant(model)
    if variant is None:
        return None
    terms = [variant.l1_penalty(getattr(m, STATE_ATTR, None)) for m in attention_modules(model)
             if getattr(m, "attnswap_variant", None) is variant]
    terms = [t for t in terms if t is not None]
    return torch.stack(terms).sum() if terms else None


def head_shape(model: nn.Module) -> tuple[int, int]:
    """(head_dim, num_attention_heads) of a model's config."""
    config = model.config
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return head_dim, num_heads


# --- save / load -------------------------------------------------------------------------------
def save(model: nn.Module, directory: str | Path, tokenizer=None, **save_pretrained_kwargs) -> Path:
    """Save a (swapped) model: HF weights + ``attnswap.safetensors`` + a config.json that loads with the variant.

    A swapped model's config.json is ``model_type: attnswap`` (see ``hf_integration``): transformers loads the
    folder with its variant after ``import attnswap`` or with ``trust_remote_code=True``, and refuses it otherwise.
    A swapped model's own ``save_pretrained`` (and so ``push_to_hub``) lands here too.
    """
    from safetensors.torch import save_file

    from attnswap.hf_integration import saved_config, write_auto_module

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_pretrained_kwargs.pop("state_dict", None)
    base_state = {k: v for k, v in model.state_dict().items() if f".{STATE_ATTR}." not in f".{k}"}
    type(model).save_pretrained(model, directory, state_dict=base_state, **save_pretrained_kwargs)  # not ours again
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    elif is_swapped(model):  # recorded, so that loading its tokenizer says why there is none
        model.config.attnswap = {**model.config.attnswap, "tokenizer": False}
    if is_swapped(model):
        state = {k: v.detach().contiguous().cpu() for k, v in variant_state_dict(model).items()}
        tmp = directory / (STATE_FILE + ".tmp")
        save_file(state, str(tmp), metadata={"variant": model.config.attnswap["variant"]})
        tmp.replace(directory / STATE_FILE)  # atomic: a reader never sees half a file
        write_auto_module(directory)
        tmp = directory / "config.json.tmp"
        tmp.write_text(json.dumps(saved_config(model.config, model.config.attnswap), indent=2, sort_keys=True) + "\n")
        tmp.replace(directory / "config.json")
    return directory


def load(directory: str | Path, device: str = "cpu", dtype: str = "float32") -> nn.Module:
    """Load what ``save`` (or a swapped model's ``save_pretrained``) wrote: the base model, the same swap, the
    variant's tensors."""
    from attnswap.models import load_model, read_json_object

    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise AttnswapError(f"no saved model at {directory} (missing {config_file.name})")
    swap_info = read_json_object(config_file).get("attnswap")
    # A saved swap (model_type attnswap) comes back swapped through hf_integration's loader.
    model = load_model(str(directory), device=device, dtype=dtype,
                       attn_implementation=(swap_info or {}).get("original_attn_implementation", "sdpa"))
    if swap_info is not None and not is_swapped(model):  # a config of the original type that carries a swap
        swap(model, swap_info["variant"], layers=swap_info["layers"])
        load_variant_tensors(model, directory)
    return model


def load_swapped(directory: Path, config, auto_class=None, **from_pretrained_kwargs):
    """The model ``save`` wrote to ``directory`` (config: its ``AttnswapConfig``) under ``auto_class``'s head
    (default: the causal LM), swapped, in eval mode. ``from_pretrained_kwargs``: the caller's public arguments, passed
    to the original architecture's own ``from_pretrained``; ``output_loading_info=True`` returns (model, info)."""
    from transformers import AutoModelForCausalLM

    from attnswap.hf_integration import head_class

    swap_info = config.attnswap
    base_config = config.base()
    requested = from_pretrained_kwargs.pop("attn_implementation", None) or config.base_overrides.get("attn_implementation")
    if requested in (None, IMPL_NAME):  # swap() sets ours after loading, beside the implementation it was saved with
        requested = swap_info.get("original_attn_implementation", "sdpa")
    model_class = head_class(auto_class or AutoModelForCausalLM, base_config)
    loaded = model_class.from_pretrained(str(directory), config=base_config, attn_implementation=requested,
                                         **from_pretrained_kwargs)
    model, info = loaded if isinstance(loaded, tuple) else (loaded, None)
    swap(model, swap_info["variant"], layers=swap_info["layers"])
    load_variant_tensors(model, directory)
    return model.eval() if info is None else (model.eval(), info)


def load_variant_tensors(model: nn.Module, directory: Path) -> None:
    """The variant's learned tensors from ``attnswap.safetensors`` or, as save_pretrained leaves them, the weights."""
    expected = variant_state_dict(model)
    if not expected:
        return
    source = directory / STATE_FILE
    if source.is_file() or not (directory / "model.safetensors").is_file():
        loaded = _read_safetensors(source)
    else:
        source = directory / "model.safetensors"
        loaded = {k: v for k, v in _read_safetensors(source).items() if f".{STATE_ATTR}." in f".{k}"}
    missing, unexpected = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise AttnswapError(f"{source} does not match variant {model.config.attnswap['variant']}: "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(loaded, strict=False)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise AttnswapError(f"missing {path}; save the model again with attnswap.save")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AttnswapError(f"corrupt checkpoint {path}: {exc}; delete it and save again") from None


# --- the `attnswap swap` command ---------------------------------------------------------------
@dataclass
class SwapConfig:
    model: str = ""  # hub name or local directory; empty = the bundled teacher
    variant: str = "window:w=64,sinks=4"
    layers: list[int] | None = None  # default: every layer
    out: str = "runs/swapped"
    device: str = "cpu"
    dtype: str = "float32"
    allow_partial: bool = False  # load a model whose weights do not all match its config (missing ones random)


def swap_to_disk(config: SwapConfig) -> Path:
    """Load ``config.model``, swap in ``config.variant``, save model + tokenizer (when the model has one) to
    ``config.out``: under its lock, never into the model's own folder, each file renamed into place with
    config.json last (``runs.atomic_files``)."""
    from attnswap.models import DEFAULT_MODEL, has_tokenizer, load_model, load_tokenizer
    from attnswap.runs import atomic_files, remove_stale_temps, run_lock

    name = config.model or DEFAULT_MODEL
    variant = get_variant(config.variant)  # a bad spec fails before the weights load
    with run_lock(config.out, inputs={"model": name}) as lock:
        remove_stale_temps(lock.parent)
        model = load_model(name, device=config.device, dtype=config.dtype, allow_partial=config.allow_partial)
        swap(model, variant, layers=config.layers)
        local = Path(name).expanduser()
        tokenizer = None if local.is_dir() and not has_tokenizer(local) else load_tokenizer(name)
        with atomic_files(config.out) as building:
            save(model, building, tokenizer=tokenizer)
    note = "" if tokenizer is not None else f" (no tokenizer: {name} has none; recorded in config.json)"
    print(f"saved {variant.spec} swapped into {name} -> {config.out}{note}")
    return Path(config.out)
