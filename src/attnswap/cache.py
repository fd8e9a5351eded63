"""Generation whose memory does not grow with the generated length: HF cache layers over attnswap's kernels.

``bounded_cache(model)`` builds a ``transformers`` Cache for a swapped model, to pass as
``model.generate(..., past_key_values=bounded_cache(model))``. A window layer keeps ``w + sinks`` key/value
slots (``RollingLayer``), a Hedgehog or Performer layer its running linear-attention sums (``RecurrentLayer``),
a hybrid layer both: the slots of its window and the sums of the keys that left it (``HybridLayer``);
layers left unswapped keep HF's growing ``DynamicLayer``.

How an attention call learns what the cache holds: the keys a bounded layer returns carry an
``attnswap_slots`` attribute, which ``surgery.attnswap_attention`` reads before anything else touches them.
It turns the call's context into one for the slots (``context``) and runs the variant on them (``attend``).
The tag travels with the tensor, so the same model may run with any other cache in between.

Padding: every layer's ``get_mask_sizes`` asks for the padding mask of all positions seen so far, as a
growing cache would (so mixed caches agree), and that (B, seen) mask reaches the attention call. The
window context picks each slot's entry out of it and finds each row's first real token, which the cache
remembers to choose the row's sinks; the linear context keeps the entries of the new tokens.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from attnswap.errors import AttnswapError
from attnswap.kernels.kv_cache import CacheView, RollingKV, linear_attention_extend
from attnswap.surgery import attention_modules, swapped_variant
from attnswap.variants.base import AttnContext, Variant
from attnswap.variants.hybrid import Hybrid
from attnswap.variants.linear_base import LinearVariant
from attnswap.variants.window import Window

SLOTS_ATTR = "attnswap_slots"  # the attribute on returned keys that surgery.attnswap_attention looks for


# --- window variants: rolling key/value slots -----------------------------------------------------
@dataclasses.dataclass
class RollingSlots:
    """The slots of one attention call of a ``RollingLayer``."""

    rolling: RollingKV
    view: CacheView

    def context(self, ctx: AttnContext) -> AttnContext:
        """ctx.key_valid arrives as (B, seen) over every position so far and leaves as (B, S) over the slots."""
        token_positions = self.view.token_positions  # (B, S), -1 = empty slot
        present = token_positions >= 0
        if ctx.key_valid is None:
            first_real = torch.zeros(token_positions.shape[0], dtype=torch.long, device=token_positions.device)
            key_valid = present
        else:
            real = ctx.key_valid  # (B, seen)
            assert real.shape[-1] == self.rolling.seen, f"mask covers {real.shape[-1]} of {self.rolling.seen} positions"
            # A row with no real token yet gets a first real token past the end: no sink before it.
            first_real = torch.where(real.any(dim=-1), real.long().argmax(dim=-1), real.shape[-1])
            key_valid = present & real.gather(1, token_positions.clamp(min=0))
        self.rolling.first_real = first_real
        return dataclasses.replace(ctx, key_valid=key_valid, q_positions=self.view.q_positions,
                                   kv_positions=self.view.positions, first_real=first_real)

    def attend(self, variant: Variant, q, k, v, ctx: AttnContext, state: nn.Module | None) -> torch.Tensor:
        # Sink slots sit at stand-in positions that only the same sink count reads right (see CacheView).
        window, sinks = self.rolling.window, self.rolling.sinks
        if not (isinstance(variant, Window) and (variant.params.w, variant.params.sinks) == (window, sinks)):
            raise AttnswapError(f"a cache of window {window} with {sinks} sinks cannot run variant {variant.spec!r} "
                                "(original_attention?); generate with the default cache instead")
        return variant.attend(q, k, v, ctx, state)


class _BoundedLayer(CacheLayerMixin):
    """What both bounded layers share: they learn dtype and device from the first keys they see."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True


class RollingLayer(_BoundedLayer):
    """A cache layer of ``window + sinks`` key/value slots (see ``kernels.kv_cache``)."""

    def __init__(self, window: int, sinks: int = 0):
        super().__init__()
        self.window, self.sinks = window, sinks
        self.rolling = RollingKV(window, sinks)

    def __repr__(self) -> str:
        return f"RollingLayer(window={self.window}, sinks={self.sinks})"

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value_states (B, Hkv, T, D) -> the keys/values (B, Hkv, S, D) the T new queries attend over."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        view = self.rolling.append(key_states, value_states)
        self.keys, self.values = self.rolling.keys, self.rolling.values
        setattr(view.keys, SLOTS_ATTR, self.slots(view))
        return view.keys, view.values

    def slots(self, view: CacheView) -> RollingSlots:
        """What the attention call over ``view`` learns from the cache (see ``SLOTS_ATTR``)."""
        return RollingSlots(self.rolling, view)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.rolling.seen + query_length, 0  # all positions so far, as for a growing cache

    def get_seq_length(self) -> int:
        return self.rolling.seen  # positions seen, not slots kept: HF numbers the next tokens from it

    def get_max_length(self) -> int:
        return -1  # any sequence length fits

    def reset(self) -> None:
        self.rolling = RollingKV(self.window, self.sinks)
        self.keys = self.values = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise AttnswapError("the bounded cache does not support beam search; generate with num_beams=1")


# --- linear variants: a running state ---------------------------------------------------------------
@dataclasses.dataclass
class RecurrentSlots:
    """The new tokens of one attention call of a ``RecurrentLayer``; the past is in the layer's state."""

    layer: RecurrentLayer
    length: int  # T, the new tokens

    def context(self, ctx: AttnContext) -> AttnContext:
        """ctx.key_valid arrives as (B, seen) over every position so far and leaves as (B, T) over the new tokens."""
        if ctx.key_valid is None:
            return ctx
        return dataclasses.replace(ctx, key_valid=ctx.key_valid[:, -self.length :])

    def attend(self, variant: Variant, q, k, v, ctx: AttnContext, state: nn.Module | None) -> torch.Tensor:
        if not isinstance(variant, LinearVariant):
            raise AttnswapError(f"a linear-attention cache cannot run variant {variant.spec!r}; "
                                "generate with the default cache instead")
        held = self.layer.state
        running_scale = held[2] if held is not None and len(held) == 3 else None
        features = variant.features(q, k, ctx, state, running_scale)
        out, self.layer.state = linear_attention_extend(features.q, features.k, v, held, variant.params.chunk,
                                                        features.key_log_scale)
        return out


class RecurrentLayer(_BoundedLayer):
    """A linear-attention layer's cache: the running sums (kv (B, H, M, D), z (B, H, M)) instead of keys and values."""

    def __init__(self):
        super().__init__()
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.seen = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Hands the T new keys/values (B, Hkv, T, D) through; the attention call folds them into the state."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        setattr(key_states, SLOTS_ATTR, RecurrentSlots(self, key_states.shape[-2]))
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen = None, 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise AttnswapError("the bounded cache does not support beam search; generate with num_beams=1")


# --- hybrid variants: rolling slots for the window, a running state for what left it -------------------
@dataclasses.dataclass
class HybridSlots(RollingSlots):
    """A ``RollingSlots`` call that also carries the keys/values (B, Hkv, T, D) the T new tokens push out of the
    window (``RollingKV.departing``); the far part folds them into the layer's linear state."""

    layer: HybridLayer
    departing_keys: torch.Tensor
    departing_values: torch.Tensor
    far_keep: torch.Tensor | None = None  # (B, T): which departing keys enter the far part; set by ``context``

    def context(self, ctx: AttnContext) -> AttnContext:
        """The window's context over the slots; the departing keys' own validity from the (B, seen) mask."""
        positions = self.view.q_positions - self.rolling.window  # (T,) each departing key's position
        slots_ctx = super().context(ctx)
        keep = (positions >= 0) & (positions - self.rolling.first_real[:, None] >= self.rolling.sinks)  # (B, T)
        if ctx.key_valid is not None:
            keep = keep & ctx.key_valid.gather(1, positions.clamp(min=0).expand_as(keep))
        self.far_keep = keep
        return slots_ctx

    def attend(self, variant: Variant, q, k, v, ctx: AttnContext, state: nn.Module | None) -> torch.Tensor:
        window, sinks = self.rolling.window, self.rolling.sinks
        exact = variant.window_for(ctx.layer_idx) if isinstance(variant, Hybrid) else None
        if exact is None or (exact.params.w, exact.params.sinks) != (window, sinks):
            raise AttnswapError(f"a hybrid cache of window {window} with {sinks} sinks cannot run variant "
                                f"{variant.spec!r} (original_attention?); generate with the default cache instead")
        out_window, lse_window = exact.attend(q, k, v, ctx, None, return_lse=True)
        groups = q.shape[1] // self.departing_keys.shape[1]  # grouped-query attention: as surgery expands k, v
        far_k, far_v = (x.repeat_interleave(groups, dim=1) for x in (self.departing_keys, self.departing_values))
        phi_q, phi_k = variant.far_features(q, far_k, ctx, state, self.far_keep)
        (out_far, normaliser), self.layer.far_state = linear_attention_extend(
            phi_q, phi_k, far_v, self.layer.far_state, variant.params.chunk, return_normaliser=True)
        return variant.merge(out_window, lse_window, out_far, normaliser, state)


class HybridLayer(RollingLayer):
    """A hybrid layer's cache: ``window + sinks`` key/value slots, and the running linear-attention sums
    (kv (B, H, M, D), z (B, H, M)) of every non-sink key that has left the window."""

    def __init__(self, window: int, sinks: int = 0):
        super().__init__(window, sinks)
        self.far_state: tuple[torch.Tensor, torch.Tensor] | None = None
        self._departing: tuple[torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return f"HybridLayer(window={self.window}, sinks={self.sinks})"

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # Before the append: it overwrites the ring slots the departing keys are read from.
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._departing = self.rolling.departing(key_states, value_states)
        return super().update(key_states, value_states, *args, **kwargs)

    def slots(self, view: CacheView) -> HybridSlots:
        return HybridSlots(self.rolling, view, self, *self._departing)

    def reset(self) -> None:
        super().reset()
        self.far_state = self._departing = None


# --- building one ---------------------------------------------------------------------------------
class BoundedCache(Cache):
    """One cache layer per decoder layer: bounded where the variant allows it, growing elsewhere."""


def bounded_cache(model: nn.Module) -> BoundedCache:
    """A fresh cache for ``model.generate(..., past_key_values=bounded_cache(model))`` on a swapped model.

    Window layers keep ``w + sinks`` slots, linear-attention layers (Hedgehog, Performer) a running state, with
    Performer's key scale in it, hybrid layers both; unswapped layers keep every token.
    """
    variant = swapped_variant(model)
    if variant is None:
        raise AttnswapError("bounded_cache needs a swapped model; call swap(model, 'window:w=64,sinks=4') first")
    if isinstance(variant, Window):
        make_layer = lambda layer: RollingLayer(variant.params.w, variant.params.sinks)  # noqa: E731
    elif isinstance(variant, Hybrid):
        make_layer = lambda layer: HybridLayer(variant.window_for(layer).params.w, variant.params.sinks)  # noqa: E731
    elif isinstance(variant, LinearVariant):
        make_layer = lambda layer: RecurrentLayer()  # noqa: E731
    else:
        raise AttnswapError(f"variant {variant.spec!r} has no bounded cache; window (w + sinks slots), hedgehog and "
                            "performer (a running state) and hybrid (both) have one; generate with the default cache "
                            "instead")
    swapped = [getattr(module, "attnswap_variant", None) is variant for module in attention_modules(model)]
    return BoundedCache(layers=[make_layer(layer) if bounded else DynamicLayer()
                                for layer, bounded in enumerate(swapped)])
