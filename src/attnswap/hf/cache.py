"""Generation whose memory does not grow with the generated length: HF cache layers over attnswap's kernels.

``bounded_cache(model)`` builds a ``transformers`` Cache for a swapped model, to pass as
``model.generate(..., past_key_values=bounded_cache(model))``. A window layer keeps ``w + sinks`` key/value
slots (``RollingLayer``), a Hedgehog or Performer layer its running linear-attention sums (``RecurrentLayer``),
a hybrid layer both: the slots of its window and the sums of the keys that left it (``HybridLayer``), a routed
layer (a hardened duo) every token for its full heads and the window's slots for the others (``RoutedLayer``);
layers left unswapped keep HF's growing ``DynamicLayer``.

How an attention call learns what the cache holds: the keys a bounded layer returns carry an
``attnswap_slots`` attribute, which ``hf.attention.attnswap_attention`` reads before anything else touches them.
It turns the call's context into one for the slots (``context``) and runs the variant on them (``attend``).
The tag travels with the tensor, so the same model may run with any other cache in between.

A decode step (one new token) takes a path of its own: the layer writes the token into its preallocated slots
in place and tags them with itself, and ``hf.attention.attnswap_attention`` hands the step to the layer's ``decode``,
which runs the variant's ``decode`` over the slots as cached (grouped key heads unexpanded) and the running state:
no mask built, no host sync, the same shapes every step. ``decode_greedy`` (attnswap.hf.decoding) captures such
steps as one CUDA graph; ``bounded_cache(model, max_length=...)`` gives the unswapped layers preallocated slots
for that (``FullLayer``), as a StaticCache does.

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
from attnswap.hf.attention import STATE_ATTR
from attnswap.hf.masks import ModelMask
from attnswap.hf.swap import attention_modules, swapped_variant
from attnswap.kernels.decode import DecodeStep
from attnswap.kernels.kv_cache import CacheView, KeptState, RollingKV, linear_attention_extend
from attnswap.variants.base import AttnContext, Variant

SLOTS_ATTR = "attnswap_slots"  # the attribute on returned keys that hf.attention.attnswap_attention looks for


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
        self.rolling.first_real, self.rolling.real = first_real, ctx.key_valid
        return dataclasses.replace(ctx, key_valid=key_valid, q_positions=self.view.q_positions,
                                   kv_positions=self.view.positions, first_real=first_real)

    def attend(self, variant: Variant, q, k, v, ctx: AttnContext, state: nn.Module | None) -> torch.Tensor:
        # Sink slots sit at stand-in positions that only the same sink count reads right (see CacheView).
        _check_kept(variant, ctx.layer_idx, KeptState(self.rolling.window, self.rolling.sinks))
        return variant.attend(q, k, v, ctx, state)


def _check_kept(variant: Variant, layer_idx: int, kept: KeptState | None, state: nn.Module | None = None) -> None:
    """Refuse a variant that needs another cache than the one this layer keeps (``original_attention`` on a
    bounded cache, say)."""
    if variant.kept_state(layer_idx, state) != kept:
        held = ("every token" if kept is None else
                f"a window of {kept.window} with {kept.sinks} sinks" + (" and a linear state" if kept.linear else "")
                if kept.window else "a linear-attention state")
        raise AttnswapError(f"a cache that keeps {held} cannot run variant {variant.spec!r} in layer {layer_idx} "
                            "(original_attention?); generate with the default cache instead")


def _padding(attention_mask) -> torch.Tensor | None:
    """Which positions so far are real, (B, seen) bool, from a call's mask; None where every one is. A mask that says
    more than padding is refused."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, ModelMask) or attention_mask.function is not None:
        raise AttnswapError("the bounded cache serves causal attention with padding only, not this model's own "
                            "mask (sliding window, 4-D mask); generate with the default cache instead")
    return attention_mask.padding


def _decode_mask(attention_mask) -> torch.Tensor | None:
    """The new token's padding (B,) bool from a decode step's mask, None where every row's is real."""
    padding = _padding(attention_mask)
    return None if padding is None else padding[:, -1]


class _BoundedLayer(CacheLayerMixin):
    """What every layer here shares: dtype and device from the first keys it sees, a size in bytes, and host
    counters (``seen``) that a captured run of decode steps leaves alone (``counting``) and advances after."""

    counting = True  # False: a decode step leaves ``seen`` as it is; ``advance`` catches up
    capturable = True  # whether its tensors keep their addresses from step to step (captured decode steps)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def settle(self) -> None:
        """Bring everything to the form a decode step writes in place."""

    def advance(self, steps: int) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise AttnswapError("the bounded cache does not support beam search; generate with num_beams=1")


class _CountedLayer(_BoundedLayer):
    """A layer that counts the positions it has seen itself (``seen``): any sequence length fits."""

    seen = 0

    def advance(self, steps: int) -> None:
        self.seen += steps

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1


class RollingLayer(_BoundedLayer):
    """A cache layer of ``window + sinks`` key/value slots (see ``kernels.kv_cache``)."""

    reads_departing = False  # whether a decode step needs the token that leaves the window

    def __init__(self, window: int, sinks: int = 0):
        super().__init__()
        self.window, self.sinks = window, sinks
        self.rolling = RollingKV(window, sinks)
        self._departing: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def kept(self) -> KeptState | None:
        return KeptState(self.window, self.sinks)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(window={self.window}, sinks={self.sinks})"

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value_states (B, Hkv, T, D) -> the keys/values (B, Hkv, S, D) the T new queries attend over."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[-2] == 1:
            self._departing = self.rolling.step_(key_states, value_states, departing=self.reads_departing)
            if self.counting:
                self.rolling.seen += 1
            self.keys, self.values = self.rolling.keys, self.rolling.values
            setattr(self.keys, SLOTS_ATTR, self)  # hf.attention.attnswap_attention hands the step to ``decode``
            return self.keys, self.values
        view = self.rolling.append(key_states, value_states)
        self.keys, self.values = self.rolling.keys, self.rolling.values
        setattr(view.keys, SLOTS_ATTR, self.slots(view))
        return view.keys, view.values

    def slots(self, view: CacheView) -> RollingSlots:
        """What the attention call over ``view`` learns from the cache (see ``SLOTS_ATTR``)."""
        return RollingSlots(self.rolling, view)

    def decode(self, module: nn.Module, variant: Variant, q: torch.Tensor, attention_mask, scaling: float,
               state: nn.Module | None) -> torch.Tensor:
        """The attention of a decode step's query q (B, H, 1, D) over the slots just written: (B, H, 1, D)."""
        layer_idx = getattr(module, "layer_idx", 0) or 0
        _check_kept(variant, layer_idx, self.kept)
        real = _decode_mask(attention_mask)
        if real is not None:
            self.rolling.mark_padded(real)
        step = self._step(scaling, real)
        out = variant.decode(q, step, state)
        self._stepped(step)
        return out

    def _stepped(self, step: DecodeStep) -> None:
        """What the layer keeps of a step's running state (a hybrid's, which its first step may start)."""

    def _step(self, scaling: float, real: torch.Tensor | None) -> DecodeStep:
        return DecodeStep(scaling, new_keys=None, new_values=None, keys=self.rolling.keys,
                          values=self.rolling.values, valid=self.rolling.valid, new_real=real)

    def tensors(self) -> list[torch.Tensor]:
        return self.rolling.tensors()

    def settle(self) -> None:
        self.rolling.settle()

    def advance(self, steps: int) -> None:
        self.rolling.seen += steps

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.rolling.seen + query_length, 0  # all positions so far, as for a growing cache

    def get_seq_length(self) -> int:
        return self.rolling.seen  # positions seen, not slots kept: HF numbers the next tokens from it

    def get_max_length(self) -> int:
        return -1  # any sequence length fits

    def reset(self) -> None:
        self.rolling = RollingKV(self.window, self.sinks)
        self.keys = self.values = self._departing = None
        self.is_initialized = False


class FullLayer(RollingLayer):
    """An unswapped layer's cache for captured decode steps: ``max_length`` preallocated key/value slots, position p
    in slot p, as transformers' StaticLayer keeps them. A longer call reads the slots in position order, so the
    variant's own path serves it."""

    def __init__(self, max_length: int):
        super().__init__(window=max_length, sinks=0)
        self.max_length = max_length

    @property
    def kept(self) -> KeptState | None:
        return None

    def __repr__(self) -> str:
        return f"FullLayer(max_length={self.max_length})"

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.rolling.seen + key_states.shape[-2] > self.max_length:
            raise AttnswapError(f"this bounded cache keeps {self.max_length} tokens in its unswapped layers; build it "
                                "with a larger max_length")
        return super().update(key_states, value_states, *args, **kwargs)

    def slots(self, view: CacheView) -> InOrderSlots:
        return InOrderSlots(self.rolling)

    def get_max_length(self) -> int:
        return self.max_length


@dataclasses.dataclass
class InOrderSlots:
    """A ``FullLayer`` call of several tokens: its keys are every position so far, in order, so the variant runs
    as over a growing cache; the cache only learns which of them are real."""

    rolling: RollingKV

    def context(self, ctx: AttnContext) -> AttnContext:
        self.rolling.first_real, self.rolling.real = ctx.first_real_token(self.rolling.keys.shape[0],
                                                                          self.rolling.keys.device), ctx.key_valid
        return ctx

    def attend(self, variant: Variant, q, k, v, ctx: AttnContext, state: nn.Module | None) -> torch.Tensor:
        return variant.attend(q, k, v, ctx, state)


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
        _check_kept(variant, ctx.layer_idx, RecurrentLayer.kept)
        held = self.layer.state
        running_scale = held[2] if held is not None and len(held) == 3 else None
        features = variant.features(q, k, ctx, state, running_scale)
        out, new_state = linear_attention_extend(features.q, features.k, v, held, variant.params.chunk,
                                                 features.key_log_scale)
        self.layer.state = list(new_state)
        return out


class RecurrentLayer(_CountedLayer):
    """A linear-attention layer's cache: the running sums (kv (B, H, M, D), z (B, H, M)) instead of keys and values.
    A decode step folds its token into them in place; its key and value pass through ``step_keys``/``step_values``
    (B, Hkv, 1, D), kept so that every step hands the attention call the same tensors."""

    kept = KeptState(linear=True)

    def __init__(self):
        super().__init__()
        self.state: list[torch.Tensor] | None = None
        self.step_keys = self.step_values = None
        self.seen = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Hands the T new keys/values (B, Hkv, T, D) through; the attention call folds them into the state."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[-2] == 1:
            if self.step_keys is None:
                self.step_keys, self.step_values = torch.zeros_like(key_states), torch.zeros_like(value_states)
            self.step_keys.copy_(key_states)
            self.step_values.copy_(value_states)
            if self.counting:
                self.seen += 1
            setattr(self.step_keys, SLOTS_ATTR, self)
            return self.step_keys, self.step_values
        self.seen += key_states.shape[-2]
        setattr(key_states, SLOTS_ATTR, RecurrentSlots(self, key_states.shape[-2]))
        return key_states, value_states

    def decode(self, module: nn.Module, variant: Variant, q: torch.Tensor, attention_mask, scaling: float,
               state: nn.Module | None) -> torch.Tensor:
        _check_kept(variant, getattr(module, "layer_idx", 0) or 0, self.kept)
        step = DecodeStep(scaling, new_keys=self.step_keys, new_values=self.step_values, linear=self.state,
                          new_real=_decode_mask(attention_mask))
        out = variant.decode(q, step, state)
        self.state = step.linear  # the same tensors, updated in place, unless this step started the state
        return out

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (*(self.state or ()), self.step_keys, self.step_values) if t is not None]

    def reset(self) -> None:
        self.state, self.seen = None, 0
        self.step_keys = self.step_values = None
        self.is_initialized = False


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
        _check_kept(variant, ctx.layer_idx, self.layer.kept)
        exact = variant.window_for(ctx.layer_idx)
        out_window, lse_window = exact.attend(q, k, v, ctx, None, return_lse=True)
        groups = q.shape[1] // self.departing_keys.shape[1]  # grouped-query attention: as hf.attention expands k, v
        far_k, far_v = (x.repeat_interleave(groups, dim=1) for x in (self.departing_keys, self.departing_values))
        phi_q, phi_k = variant.far_features(q, far_k, ctx, state, self.far_keep)
        (out_far, normaliser), far_state = linear_attention_extend(
            phi_q, phi_k, far_v, self.layer.far_state, variant.params.chunk, return_normaliser=True)
        self.layer.far_state = list(far_state)
        return variant.merge(out_window, lse_window, out_far, normaliser, state)


class HybridLayer(RollingLayer):
    """A hybrid layer's cache: ``window + sinks`` key/value slots, and the running linear-attention sums
    (kv (B, H, M, D), z (B, H, M)) of every non-sink key that has left the window."""

    reads_departing = True

    def __init__(self, window: int, sinks: int = 0):
        super().__init__(window, sinks)
        self.far_state: list[torch.Tensor] | None = None
        self._leaving: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def kept(self) -> KeptState | None:
        return KeptState(self.window, self.sinks, linear=True)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # Before the append: it overwrites the ring slots the departing keys are read from. A decode step reads
        # its one departing token itself (``RollingKV.step_``).
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[-2] > 1:
            self._leaving = self.rolling.departing(key_states, value_states)
        return super().update(key_states, value_states, *args, **kwargs)

    def slots(self, view: CacheView) -> HybridSlots:
        return HybridSlots(self.rolling, view, self, *self._leaving)

    def _step(self, scaling: float, real: torch.Tensor | None) -> DecodeStep:
        step = super()._step(scaling, real)
        step.departing_keys, step.departing_values, step.departing_keep = self._departing
        step.linear = self.far_state
        return step

    def _stepped(self, step: DecodeStep) -> None:
        self.far_state = step.linear  # the same tensors, updated in place, unless this step started the state

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + list(self.far_state or ())

    def reset(self) -> None:
        super().reset()
        self.far_state = self._leaving = None


# --- routed variants: every token for the full heads, the window's slots for the others --------------------
class RoutedLayer(_CountedLayer):
    """A routed layer's cache (``KeptState.full_heads``): the KV heads its full query heads read keep every token,
    growing as DynamicLayer does; the others keep ``window + sinks`` slots (a ``RollingLayer`` of their own). Every
    attention call of the layer comes here (``serve``): each group of heads runs its own variant (``routes``) over
    the keys kept for it, and the outputs go back in head order. Query heads of one KV head must agree, since they
    share its keys."""

    capturable = False  # the full heads' keys grow: no fixed addresses for a captured step

    def __init__(self, kept: KeptState):
        super().__init__()
        self.kept = kept
        self.window_slots = RollingLayer(kept.window, kept.sinks)
        self.full_keys = self.full_values = self.full_real = None
        self.seen = 0
        self._checked: Variant | None = None

    def __repr__(self) -> str:
        return (f"RoutedLayer(full heads {sum(self.kept.full_heads)} of {len(self.kept.full_heads)}, "
                f"window={self.kept.window}, sinks={self.kept.sinks})")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        per_head = torch.tensor(self.kept.full_heads)
        flags = per_head.view(key_states.shape[1], -1)  # (Hkv, G): query head h reads KV head h // G
        if bool((flags.any(dim=1) != flags.all(dim=1)).any()):
            raise AttnswapError("this layer routes query heads of one KV head differently, and they share its keys; "
                                "route whole KV heads (attnswap plan --objective recall does) or generate with the "
                                "default cache")
        device = key_states.device
        self.full_kv, self.window_kv = (x.nonzero().flatten().to(device) for x in (flags[:, 0], ~flags[:, 0]))
        self.full_q, self.window_q = (x.nonzero().flatten().to(device) for x in (per_head, ~per_head))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Keeps the new keys/values (B, Hkv, T, D) of each group; hands the call to ``serve``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self.full_kv.numel():
            keys, values = (x.index_select(1, self.full_kv) for x in (key_states, value_states))
            if self.full_keys is None:
                self.full_keys, self.full_values = keys, values
            else:
                self.full_keys = torch.cat([self.full_keys, keys], dim=-2)
                self.full_values = torch.cat([self.full_values, values], dim=-2)
        self._window_call = None
        if self.window_kv.numel():
            keys, values = (x.index_select(1, self.window_kv) for x in (key_states, value_states))
            self._window_call = self.window_slots.update(keys, values)
        self.seen += new
        setattr(key_states, SLOTS_ATTR, self)
        return key_states, value_states

    def serve(self, module: nn.Module, variant: Variant, q: torch.Tensor, attention_mask, scaling: float,
              state: nn.Module | None) -> torch.Tensor:
        """The layer's attention for queries q (B, H, T, D): (B, H, T, D), full heads over every token kept, the
        others over the window's slots."""
        layer_idx = getattr(module, "layer_idx", 0) or 0
        if variant is not self._checked:
            _check_kept(variant, layer_idx, self.kept, state)
            self._checked = variant
        full, cheap = variant.routes()
        out = q.new_zeros(*q.shape[:-1], self.full_values.shape[-1] if self.full_values is not None
                          else self.window_slots.rolling.values.shape[-1])
        if q.shape[-2] == 1:
            real = _decode_mask(attention_mask)
            if self.full_kv.numel():
                new_real = torch.ones_like(self.full_keys[:, 0, -1:, 0], dtype=torch.bool) if real is None \
                    else real[:, None]
                self.full_real = new_real if self.full_real is None else torch.cat([self.full_real, new_real], -1)
                step = DecodeStep(scaling, new_keys=None, new_values=None, keys=self.full_keys,
                                  values=self.full_values, valid=self.full_real)
                out[:, self.full_q] = full.decode(q[:, self.full_q], step, None).to(out.dtype)
            if self.window_kv.numel():
                out[:, self.window_q] = self.window_slots.decode(
                    module, cheap, q[:, self.window_q], attention_mask, scaling, None).to(out.dtype)
            return out
        padding = _padding(attention_mask)
        ctx = AttnContext(scaling=scaling, key_valid=padding, layer_idx=layer_idx)
        if self.full_kv.numel():
            self.full_real = padding if padding is not None else torch.ones(
                self.full_keys.shape[0], self.seen, dtype=torch.bool, device=self.full_keys.device)
            groups = len(self.full_q) // len(self.full_kv)
            keys, values = (x.repeat_interleave(groups, dim=1) for x in (self.full_keys, self.full_values))
            out[:, self.full_q] = full.attend(q[:, self.full_q], keys, values, ctx, None).to(out.dtype)
        if self.window_kv.numel():
            keys, values = self._window_call
            slots = getattr(keys, SLOTS_ATTR)
            groups = len(self.window_q) // len(self.window_kv)
            keys, values = (x.repeat_interleave(groups, dim=1) for x in (keys, values))
            out[:, self.window_q] = slots.attend(cheap, q[:, self.window_q], keys, values, slots.context(ctx),
                                                 None).to(out.dtype)
        return out

    def tensors(self) -> list[torch.Tensor]:
        held = [t for t in (self.full_keys, self.full_values, self.full_real) if t is not None]
        return held + (self.window_slots.tensors() if self.window_slots.is_initialized else [])

    def reset(self) -> None:
        self.window_slots.reset()
        self.full_keys = self.full_values = self.full_real = self._window_call = None
        self.seen, self._checked, self.is_initialized = 0, None, False


# --- building one ---------------------------------------------------------------------------------
class BoundedCache(Cache):
    """One cache layer per decoder layer: bounded where the variant allows it, growing (or ``max_length``
    preallocated slots) elsewhere."""

    def nbytes(self) -> int:
        """Bytes of every tensor the cache keeps between calls: constant in the sequence length for bounded layers."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, _BoundedLayer):
                total += layer.nbytes()
            elif getattr(layer, "is_initialized", False):
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        return total

    def start_captured_steps(self) -> None:
        """Before decode steps that a CUDA graph captures: every layer settled into the tensors a step writes in
        place, those tensors at fixed addresses, and the host counters left alone (``finish_captured_steps``)."""
        for layer in self.layers:
            if not isinstance(layer, _BoundedLayer):
                raise AttnswapError("captured decode steps need every layer's cache preallocated; build the cache "
                                    "with bounded_cache(model, max_length=...)")
            if not layer.capturable:
                raise AttnswapError(f"captured decode steps need fixed-size caches, and {layer!r} grows for its full "
                                    "heads; generate with model.generate(past_key_values=bounded_cache(model))")
            layer.settle()
            for tensor in layer.tensors():
                torch._dynamo.mark_static_address(tensor)
            layer.counting = False

    def finish_captured_steps(self, steps: int) -> None:
        """After ``steps`` captured decode steps: the host counters catch up."""
        for layer in self.layers:
            layer.advance(steps)
            layer.counting = True


def bounded_cache(model: nn.Module, max_length: int | None = None) -> BoundedCache:
    """A fresh cache for ``model.generate(..., past_key_values=bounded_cache(model))`` on a swapped model.

    Each swapped layer keeps what its variant names (``Variant.kept_state``): window layers ``w + sinks`` slots,
    linear-attention layers (Hedgehog, Performer) a running state, with Performer's key scale in it, hybrid layers
    both. Unswapped layers keep every token: growing (HF's ``DynamicLayer``), or in ``max_length`` preallocated
    slots (``FullLayer``), which captured decode steps need.
    """
    variant = swapped_variant(model)
    if variant is None:
        raise AttnswapError("bounded_cache needs a swapped model; call swap(model, 'window:w=64,sinks=4') first")
    layers = []
    for layer_idx, module in enumerate(attention_modules(model)):
        swapped = getattr(module, "attnswap_variant", None) is variant
        kept = variant.kept_state(layer_idx, getattr(module, STATE_ATTR, None)) if swapped else None
        if swapped and kept is None:
            raise AttnswapError(f"variant {variant.spec!r} has no bounded cache; window (w + sinks slots), hedgehog "
                                "and performer (a running state), hybrid (both) and a hardened duo (every token for "
                                "its full heads only) have one; generate with the default cache instead")
        layers.append(_layer_for(kept, max_length))
    return BoundedCache(layers=layers)


def _layer_for(kept: KeptState | None, max_length: int | None) -> CacheLayerMixin:
    if kept is None:
        return DynamicLayer() if max_length is None else FullLayer(max_length)
    if kept.full_heads:
        return RoutedLayer(kept)
    if kept.window and kept.linear:
        return HybridLayer(kept.window, kept.sinks)
    if kept.window:
        return RollingLayer(kept.window, kept.sinks)
    return RecurrentLayer()
