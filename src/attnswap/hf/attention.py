"""The attention function transformers calls for a swapped model: one entry for every variant.

The swap goes through transformers' own attention registry, not through patched HF code: ``attnswap_attention`` is
registered in ``AttentionInterface`` under ``IMPL_NAME`` and ``hf/masks.model_mask`` in ``AttentionMaskInterface``
under the same name. Each swapped attention module carries its variant (``module.attnswap_variant``) and, where the
variant learns something, its parameters under ``module.attnswap`` (``STATE_ATTR``). Here the call's mask becomes the
variant's ``AttnContext``; a variant that cannot honour some mask is refused with an AttnswapError, never run as if
the mask were not there. Modules a swap leaves alone (cross-attention) run the original implementation.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from attnswap.errors import AttnswapError
from attnswap.hf.masks import ModelMask, dense_mask_function, model_mask
from attnswap.kernels.masks import device_arange
from attnswap.variants import AttnContext, Variant
from attnswap.variants.full import Full

IMPL_NAME = "attnswap"


STATE_ATTR = "attnswap"  # learnable variant parameters live under this attribute of each attention module


_FULL = Full()


def is_self_attention(module: nn.Module) -> bool:
    """A decoder layer's self-attention: what swap replaces; any other attention module runs stock."""
    return (type(module).__name__.endswith("Attention") and isinstance(getattr(module, "layer_idx", None), int)
            and not getattr(module, "is_cross_attention", False))


def attention_context(module: nn.Module, variant: Variant, attention_mask, scaling: float, query: torch.Tensor,
                      key: torch.Tensor, position_ids: torch.Tensor | None = None, cache_slots=None) -> AttnContext:
    """The AttnContext of one attention call: transformers' mask (a ``ModelMask``, a caller's 4-D mask, a 2-D
    padding mask or None) in the form variants read, refusing what ``variant`` cannot honour. ``cache_slots``: what
    a bounded cache (attnswap.hf.cache) says its keys hold; it places the queries itself."""
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
                            "with the default DynamicCache (or attnswap.hf.cache.bounded_cache), not a StaticCache")
    return ctx


def attnswap_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry. query (B, H, T, D), key/value (B, Hkv, S, D) -> ((B, T, H, D), None).

    ``dropout`` is not applied: distillation keeps the model in eval mode so teacher and student are deterministic.
    """
    variant = getattr(module, "attnswap_variant", None)
    if variant is None and not is_self_attention(module):
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
    # A bounded cache (attnswap.hf.cache) tags the keys it returns with what it holds; read it before GQA copies them.
    cache_slots = getattr(key, "attnswap_slots", None)
    if hasattr(cache_slots, "serve"):  # a routed cache layer: its heads attend over different keys, it runs them
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        with torch.profiler.record_function("attnswap.attention"):
            out = cache_slots.serve(module, variant, query, attention_mask, scaling, getattr(module, STATE_ATTR, None))
        return out.to(query.dtype).transpose(1, 2).contiguous(), None
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
