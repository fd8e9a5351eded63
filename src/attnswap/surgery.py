"""Put an attention variant into a Hugging Face causal LM, take it out again, save and load the result.

The swap goes through transformers' own attention registry, not through patched HF code: one function,
``attnswap_attention``, is registered in ``AttentionInterface`` under the name ``"attnswap"``, and the
model's ``attn_implementation`` is switched to it. Each swapped attention module carries its variant
(``module.attnswap_variant``) and, where the variant learns something, its parameters under the fixed
attribute ``module.attnswap`` -- so the trainable set is exactly the ``*.attnswap.*`` parameters.

A mask function is registered under the same name in ``AttentionMaskInterface``; without it transformers
hands custom attention functions ``attention_mask=None`` and padded batches are silently wrong. Ours
turns the 2-D padding mask into a (B, S) "key is a real token" tensor, or None when there is no padding;
causality is always applied by the variant itself.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from attnswap.errors import AttnswapError
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


# --- the registered attention function ---------------------------------------------------------
def key_padding_mask(batch_size: int, q_length: int = 0, kv_length: int = 0, kv_offset: int = 0,
                     attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """AttentionMaskInterface entry: (B, kv_length) bool of real keys, or None when nothing is padding."""
    if attention_mask is None:
        return None
    valid = attention_mask[:, kv_offset : kv_offset + kv_length].bool()
    if valid.shape[-1] < kv_length:  # slots a preallocated cache has not filled yet; causality hides them
        fill = valid.new_ones(valid.shape[0], kv_length - valid.shape[-1])
        valid = torch.cat([valid, fill], dim=-1)
    # Host sync, once per forward: an all-real batch takes the unpadded fast paths.
    return None if bool(valid.all()) else valid


def attnswap_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry. query (B, H, T, D), key/value (B, Hkv, S, D) -> ((B, T, H, D), None).

    ``dropout`` is not applied: distillation keeps the model in eval mode so teacher and student are deterministic.
    """
    variant = getattr(module, "attnswap_variant", None)
    if variant is None or getattr(module, "attnswap_bypass", False):
        variant = _FULL
    if attention_mask is not None and attention_mask.dim() != 2:
        raise AttnswapError(
            f"attnswap expects a (batch, keys) padding mask, got shape {tuple(attention_mask.shape)}; "
            "pass a 2-D attention_mask to the model"
        )
    # A bounded cache (attnswap.cache) tags the keys it returns with what it holds; read it before GQA copies them.
    cache_slots = getattr(key, "attnswap_slots", None)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: expand once, here, so variants see H key heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    ctx = AttnContext(scaling=scaling, key_valid=attention_mask, layer_idx=getattr(module, "layer_idx", 0) or 0)
    if cache_slots is not None:
        ctx = cache_slots.context(ctx)
    state = getattr(module, STATE_ATTR, None)
    for observer in getattr(module, "attnswap_observers", ()):
        observer(module, variant, query, key, value, ctx, state)
    with torch.profiler.record_function("attnswap.attention"):  # bench isolates attention time by this range
        if cache_slots is None:
            out = variant.attend(query, key, value, ctx, state)  # (B, H, T, D)
        else:  # the cache may hold a running state that the new keys extend
            out = cache_slots.attend(variant, query, key, value, ctx, state)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    # The classmethods write the class-wide mapping, which is what mask creation checks.
    AttentionInterface.register(IMPL_NAME, attnswap_attention)
    AttentionMaskInterface.register(IMPL_NAME, key_padding_mask)


_register()


# --- finding the attention layers --------------------------------------------------------------
def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a decoder, in layer order."""
    found = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("Attention")
        and isinstance(getattr(m, "layer_idx", None), int)
        and not getattr(m, "is_cross_attention", False)
    ]
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


# --- swap / unswap -----------------------------------------------------------------------------
def swap(model: nn.Module, variant: "str | Variant", layers: Sequence[int] | None = None,
         trainable: str = "variant") -> nn.Module:
    """Put ``variant`` into the chosen self-attention layers of ``model`` (all by default), in place.

    ``trainable``: "variant" (only the variant's parameters learn), "none", or "all".
    Returns the model. The original weights are shared, not copied: ``original_attention(model)``
    runs the same model as the original.
    """
    if is_swapped(model):
        unswap(model)
    variant = get_variant(variant)
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
    model.attnswap_record = record
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
    del model.attnswap_record
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
def save(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Save a (swapped) model: HF weights + config (with the variant spec) + ``attnswap.safetensors``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base_state = {k: v for k, v in model.state_dict().items() if f".{STATE_ATTR}." not in f".{k}"}
    model.save_pretrained(directory, state_dict=base_state)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if is_swapped(model):
        state = {k: v.detach().contiguous().cpu() for k, v in variant_state_dict(model).items()}
        tmp = directory / (STATE_FILE + ".tmp")
        save_file(state, str(tmp), metadata={"variant": model.config.attnswap["variant"]})
        tmp.replace(directory / STATE_FILE)  # atomic: a reader never sees half a file
    return directory


def load(directory: str | Path, device: str = "cpu", dtype: str = "float32") -> nn.Module:
    """Load what ``save`` wrote: the base model, then the same swap, then the variant's tensors."""
    from attnswap.models import load_model, read_json_object

    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise AttnswapError(f"no saved model at {directory} (missing {config_file.name})")
    swap_info = read_json_object(config_file).get("attnswap")
    model = load_model(str(directory), device=device, dtype=dtype,
                       attn_implementation=(swap_info or {}).get("original_attn_implementation", "sdpa"))
    if swap_info is None:
        return model
    swap(model, swap_info["variant"], layers=swap_info["layers"])
    expected = variant_state_dict(model)
    if expected:
        loaded = _read_safetensors(directory / STATE_FILE)
        missing, unexpected = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
        if missing or unexpected:
            raise AttnswapError(
                f"{directory / STATE_FILE} does not match variant {swap_info['variant']}: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        model.load_state_dict(loaded, strict=False)
    return model


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


def swap_to_disk(config: SwapConfig) -> Path:
    """Load ``config.model``, swap in ``config.variant``, save model + tokenizer to ``config.out``."""
    from attnswap.models import DEFAULT_MODEL, load_model, load_tokenizer
    from attnswap.runs import check_output_dir

    name = config.model or DEFAULT_MODEL
    check_output_dir(config.out)  # a bad output path or spec fails before the weights load
    variant = get_variant(config.variant)
    model = load_model(name, device=config.device, dtype=config.dtype)
    swap(model, variant, layers=config.layers)
    out = save(model, config.out, tokenizer=load_tokenizer(name))
    print(f"saved {variant.spec} swapped into {name} -> {out}")
    return out
