"""Put an attention variant into a Hugging Face model's self-attention layers and take it out again, in place.

``swap`` switches the model's ``attn_implementation`` to attnswap's (``hf/attention.py``) and gives each chosen
self-attention module its variant and the variant's parameters, so the trainable set is exactly the ``*.attnswap.*``
parameters; the original weights are shared, never copied, so ``original_attention`` runs the original model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from attnswap.errors import AttnswapError
from attnswap.hf.attention import IMPL_NAME, STATE_ATTR, is_self_attention
from attnswap.hf.masks import whole_rows_mask
from attnswap.variants import Variant, get_variant

# What else a swap sets up on a model, registered by the layers above it (hf/saved.py makes save_pretrained keep
# the variant), so that this module imports none of them.
_ON_SWAP: list[Callable[[nn.Module], None]] = []


def on_swap(function: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """Run ``function(model)`` at the end of every ``swap`` (a decorator)."""
    _ON_SWAP.append(function)
    return function


@dataclass
class SwapRecord:
    """What ``swap`` changed, kept on the model so that ``unswap`` can undo it exactly."""

    variant: Variant
    layers: list[int]
    original_impl: str
    requires_grad: dict[str, bool] = field(repr=False)
    hook: "torch.utils.hooks.RemovableHandle | None" = field(default=None, repr=False)  # removed by unswap


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


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a decoder, in layer order."""
    found = [m for m in model.modules() if is_self_attention(m)]
    found.sort(key=lambda m: m.layer_idx)
    n_layers = getattr(model.config, "num_hidden_layers", len(found))
    assert len(found) == n_layers, f"found {len(found)} attention modules for {n_layers} layers"
    return found


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
    model.config.attnswap = {"variant": variant.spec, "layers": chosen, "original_attn_implementation": record.original_impl}
    for function in _ON_SWAP:
        function(model)
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
    if "save_pretrained" in vars(model):  # bound by an on_swap hook
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
