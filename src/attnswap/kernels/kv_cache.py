"""Bounded caches for generation: rolling key/value slots for window attention, a running state for linear attention.

A window layer (with sinks, as in StreamingLLM, https://arxiv.org/abs/2309.17453) keeps ``sinks + window``
slots however long the sequence grows::

    slot:  [ sink 0 … sink s-1 | ring 0 … ring w-1 ]

The ring holds the last ``window`` positions, position p in ring slot p % window. All rows share it:
left padding aligns the rows on the right. A sink slot holds one of its row's first ``sinks`` real tokens
once that token has left the ring; sinks are per row, because padding puts them at different positions.
Every token is in one slot at most, so attention over the slots never sees a key twice. Keys are cached
as the model made them (after rotary embeddings), so evicting is exact: what is kept is what was computed.

A decode step (one new token, ``step_``) writes the ring in place and attends over exactly the ``sinks + window``
slots. It reads no tensor value on the host: the position counter (``position``, 0-d) and which slots hold a
real token (``valid`` (B, C)) live on the device beside the slots, so every step has the same shapes and can be
captured as a CUDA graph. A block of several tokens (the prompt) attends over the kept slots plus the whole block, because
its early queries need keys that its later tokens push out; the block is folded into the slots at the
next append, once the caller has said where each row's first real token is (``first_real``).

A linear-attention layer needs no keys at all: its running sums (``linear_attention_extend``) are the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnswap.kernels.linear import causal_linear_attention, linear_attention_state, linear_attention_step


@dataclass(frozen=True)
class KeptState:
    """What one layer of a variant keeps between decode steps, whatever the sequence length: ``window`` key/value
    slots of the last tokens (0: none) and ``sinks`` of each row's first real tokens, and (``linear``) a running
    linear-attention state of every other token; or, routed (``full_heads``), every token for some heads and the
    window for the others."""

    window: int = 0
    sinks: int = 0
    linear: bool = False
    # A routed layer: per query head, True where it attends over every token (its KV head keeps them all) and
    # False where it keeps to the window; empty: every head keeps the same.
    full_heads: tuple[bool, ...] = ()


@dataclass
class CacheView:
    """The keys and values one attention call sees, and where each of their S slots sits.

    ``positions`` (S,) is the position a mask should use for each slot. Sink slots are given positions
    0..sinks-1, which every later query is causally after and which every row's sink rule
    (``kv - first_real < sinks``) admits, whatever the row's padding. Other slots carry their absolute
    position (padding counted). ``token_positions`` (B, S) is the absolute position of the token each
    row holds in each slot, -1 for an empty slot. ``q_positions`` (T,) are the new queries' positions.
    """

    keys: torch.Tensor  # (B, H, S, D)
    values: torch.Tensor  # (B, H, S, D)
    positions: torch.Tensor  # (S,) long
    token_positions: torch.Tensor  # (B, S) long
    q_positions: torch.Tensor  # (T,) long


class RollingKV:
    """One layer's bounded cache: ``keys``/``values`` (B, H, sinks + window, D), preallocated at the first append."""

    def __init__(self, window: int, sinks: int = 0):
        assert window >= 1 and sinks >= 0, f"need window >= 1 and sinks >= 0, got window={window}, sinks={sinks}"
        self.window, self.sinks = window, sinks
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.seen = 0  # positions appended so far, padding included
        self.first_real: torch.Tensor | None = None  # (B,) each row's first real token; 0 until the caller says
        self.real: torch.Tensor | None = None  # (B, seen) which positions are real, once the caller says; None: all
        self.sink_filled: torch.Tensor | None = None  # (B, sinks) bool
        self.valid: torch.Tensor | None = None  # (B, C) bool: the slot holds a real token
        self.position: torch.Tensor | None = None  # () long, on the device: ``seen`` as the decode steps count it
        self._block: tuple[torch.Tensor, torch.Tensor] | None = None  # a multi-token block not yet folded in

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    def append(self, k: torch.Tensor, v: torch.Tensor) -> CacheView:
        """Add T new tokens, k/v (B, H, T, D); return what their queries attend over."""
        self._settle(k, v)
        if k.shape[-2] == 1:
            return self._step(k, v)
        return self._extend(k, v)

    def departing(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (B, H, T, D) that T new tokens k/v (B, H, T, D) push out of the window, in order:
        new token t (position seen + t) no longer sees position seen + t - window. Zeros where that position is
        negative. Call before ``append``, which overwrites the ring slots they come from. A hybrid folds them
        into its linear state (sinks among them included: excluding those is the caller's job)."""
        self._settle(k, v)
        n, t = self.seen, k.shape[-2]
        leaving = self._arange(n - self.window, min(n, n - self.window + t))  # still in the ring
        slots = self.sinks + leaving % self.window
        in_ring = (leaving >= 0)[:, None]  # (L, 1): a negative position holds no token yet
        from_block = max(0, t - self.window)  # the rest left within the block itself
        return tuple(torch.cat([torch.where(in_ring, buf[:, :, slots], 0.0), new[:, :, :from_block]], dim=-2)
                     for buf, new in ((self.keys, k), (self.values, v)))

    # --- the two ways in ------------------------------------------------------------------------
    def _step(self, k: torch.Tensor, v: torch.Tensor) -> CacheView:
        """One token: ``step_``, and the view of the slots with their positions."""
        n = self.seen
        self.step_(k, v)
        self.seen += 1
        positions, token_positions = self._slot_positions(self.seen)
        return CacheView(self.keys, self.values, positions, token_positions, self._arange(n, n + 1))

    def step_(self, k: torch.Tensor, v: torch.Tensor, departing: bool = False):
        """Write one token k/v (B, H, 1, D) in place, at ``position``, and advance ``position``; ``seen`` is the
        caller's to advance. The token overwrites the ring slot of position - window, which its query no longer sees;
        where that token is one of its row's first ``sinks`` real tokens, it moves to its sink slot first.

        ``departing``: also return the leaving token's key and value (B, H, 1, D) and whether it leaves for good (B,)
        bool: it was real and is no sink (zeros before the ring is full). Nothing here reads a tensor on the host.
        """
        self._settle(k, v)
        slot = (self.position % self.window + self.sinks).view(1)  # (1,) the ring slot of position - window
        offset = self.position - self.window - self.first_real  # (B,) the leaving token's place after first_real
        was_real = self.valid.index_select(1, slot)[:, 0]  # (B,); False for a slot never filled
        leaving = None
        if departing:
            leaving = (self.keys.index_select(2, slot), self.values.index_select(2, slot),
                       was_real & (offset >= self.sinks))
        if self.sinks:
            to_sink = torch.arange(self.sinks, device=k.device) == offset[:, None]  # (B, sinks)
            move = to_sink[:, None, :, None]
            for buf in (self.keys, self.values):
                buf[:, :, : self.sinks] = torch.where(move, buf.index_select(2, slot), buf[:, :, : self.sinks])
            self.valid[:, : self.sinks] = torch.where(to_sink, was_real[:, None], self.valid[:, : self.sinks])
            self.sink_filled |= to_sink
        self.keys.index_copy_(2, slot, k)
        self.values.index_copy_(2, slot, v)
        self.valid.index_fill_(1, slot, True)  # a decode step's token is real; ``mark_padded`` says otherwise
        self.position.add_(1)
        return leaving

    def mark_padded(self, real: torch.Tensor) -> None:
        """The caller's word on the token of the last step: real (B,) bool, False where it was padding."""
        slot = ((self.position - 1) % self.window + self.sinks).view(1)
        self.valid.index_copy_(1, slot, real[:, None])

    def _extend(self, k: torch.Tensor, v: torch.Tensor) -> CacheView:
        """Several tokens: the kept slots that hold anything, then the whole block."""
        n, t = self.seen, k.shape[-2]
        positions, token_positions = self._slot_positions(n)
        # Until a token has left the ring, the sinks are empty and only ring slots 0..n-1 are filled.
        keep = slice(0, self.capacity) if n > self.window else slice(self.sinks, self.sinks + n)
        new_positions = self._arange(n, n + t)
        self._block = (k, v)
        self.seen += t
        return CacheView(
            keys=torch.cat([self.keys[:, :, keep], k], dim=-2),
            values=torch.cat([self.values[:, :, keep], v], dim=-2),
            positions=torch.cat([positions[keep], new_positions]),
            token_positions=torch.cat([token_positions[:, keep], new_positions.expand(k.shape[0], t)], dim=-1),
            q_positions=new_positions,
        )

    def _fold(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fold the last block (positions seen - T .. seen - 1) into the slots: each slot takes its token
        from the old slots or from the block, by position."""
        self._block = None
        end, t = self.seen, k.shape[-2]
        start = end - t
        batch, device = k.shape[0], k.device
        # Ring slot s now holds position p = ring_position(end)[s]; a token still in the ring stays in slot p % w.
        ring_pos = self._ring_positions(end).expand(batch, self.window)
        ring_old = torch.arange(self.sinks, self.capacity, device=device).expand(batch, self.window)
        # Sink j of row b is position first_real + j, taken once it has left the ring, if not taken before.
        sink_pos = self.first_real[:, None] + torch.arange(self.sinks, device=device)  # (B, sinks)
        newly = ~self.sink_filled & (sink_pos < end - self.window) & (sink_pos >= start - self.window)
        sink_old = torch.where(newly, self.sinks + sink_pos % self.window, torch.arange(self.sinks, device=device))
        self.sink_filled |= newly
        pos = torch.cat([torch.where(newly, sink_pos, -1), ring_pos], dim=-1)  # (B, C): -1 = keep the old slot
        old_index = torch.cat([sink_old, ring_old], dim=-1)  # (B, C)
        from_block = pos >= start
        block_index = (pos - start).clamp(0, t - 1)
        for old, new in ((self.keys, k), (self.values, v)):  # in place: the slots keep their address
            taken_old = old.gather(2, _expand_index(old_index, old))
            taken_new = new.gather(2, _expand_index(block_index, new))
            old.copy_(torch.where(from_block[:, None, :, None], taken_new, taken_old))
        _, token_positions = self._slot_positions(end)
        valid = token_positions >= 0
        if self.real is not None:
            valid &= self.real.gather(1, token_positions.clamp(min=0))
        self.valid.copy_(valid)
        self.real = None
        self.position.fill_(end)

    # --- bookkeeping ----------------------------------------------------------------------------
    def _settle(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Bring the slots up to date before new tokens arrive: allocate them at the first call, fold in a block."""
        if self.keys is None:
            self._allocate(k, v)
        self.settle()

    def settle(self) -> None:
        """Fold a pending block into the slots, so that the next step only writes in place."""
        if self._block is not None:
            self._fold(*self._block)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache keeps between calls (for its size in bytes)."""
        kept = (self.keys, self.values, self.valid, self.position, self.first_real, self.sink_filled, self.real,
                *(self._block or ()))
        return [t for t in kept if t is not None]

    def _allocate(self, k: torch.Tensor, v: torch.Tensor) -> None:
        batch, heads, _, dim = k.shape
        self.keys = k.new_zeros(batch, heads, self.capacity, dim)
        self.values = v.new_zeros(batch, heads, self.capacity, v.shape[-1])
        self.sink_filled = torch.zeros(batch, self.sinks, dtype=torch.bool, device=k.device)
        self.valid = torch.zeros(batch, self.capacity, dtype=torch.bool, device=k.device)
        self.position = torch.zeros((), dtype=torch.long, device=k.device)
        if self.first_real is None:
            self.first_real = torch.zeros(batch, dtype=torch.long, device=k.device)

    def _ring_positions(self, seen: int) -> torch.Tensor:
        """(window,) the position in each ring slot after ``seen`` tokens, -1 where none is yet."""
        slots = self._arange(0, self.window)
        pos = seen - self.window + (slots - seen) % self.window
        return torch.where(pos >= 0, pos, -1)

    def _slot_positions(self, seen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask positions (C,) and token positions (B, C) of the slots after ``seen`` tokens (see CacheView)."""
        ring = self._ring_positions(seen)
        sink_ids = self._arange(0, self.sinks)
        sink_tokens = torch.where(self.sink_filled, self.first_real[:, None] + sink_ids, -1)
        token_positions = torch.cat([sink_tokens, ring.expand(sink_tokens.shape[0], self.window)], dim=-1)
        return torch.cat([sink_ids, ring]), token_positions

    def _arange(self, start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end, device=self.keys.device)


def _expand_index(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, C) slot indices -> (B, H, C, D) for ``gather`` along the slot dimension of ``like`` (B, H, S, D)."""
    return index[:, None, :, None].expand(like.shape[0], like.shape[1], index.shape[-1], like.shape[-1])


def linear_attention_extend(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    state: tuple[torch.Tensor, ...] | None,
    chunk: int = 64,
    key_log_scale: torch.Tensor | None = None,
    return_normaliser: bool = False,
) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    """T new tokens of causal linear attention after a running state, and the state after them.

    phi_q/phi_k (B, H, T, M) non-negative, v (B, H, T, D); state (kv (B, H, M, D), z (B, H, M)) fp32, or None
    before the first token. With ``key_log_scale`` (B, H, T), the running scale of the new keys continuing the
    state's (see ``causal_linear_attention``), the state also holds its scale (B, H) and is rescaled as it goes.
    Returns the output (B, H, T, D) in v's dtype and the new state, whose size does not depend on how many tokens
    it has summed. ``return_normaliser``: the output is (output, normaliser (B, H, T) fp32), see
    ``causal_linear_attention``.
    """
    if state is None:
        out = causal_linear_attention(phi_q, phi_k, v, chunk, key_log_scale=key_log_scale,
                                      return_normaliser=return_normaliser)
        if key_log_scale is None:
            return out, linear_attention_state(phi_k, v)
        last = key_log_scale[..., -1:].float()
        kv, z = linear_attention_state(phi_k * torch.exp(key_log_scale - last).unsqueeze(-1), v)
        return out, (kv, z, last[..., 0])
    kv, z, *scale = state
    out, normaliser = [], []
    for t in range(phi_q.shape[-2]):  # a decode step, or (rarely) a block that continues a sequence
        if key_log_scale is not None:  # the scale only grows: bring the sums to this key's scale
            decay = torch.exp(scale[0] - key_log_scale[..., t])  # (B, H)
            kv, z, scale = kv * decay[..., None, None], z * decay[..., None], [key_log_scale[..., t].float()]
        kv_t, z_t = linear_attention_state(phi_k[..., t : t + 1, :], v[..., t : t + 1, :])
        kv, z = kv + kv_t, z + z_t
        out_t, normaliser_t = linear_attention_step(phi_q[..., t : t + 1, :], kv, z, return_normaliser=True)
        out.append(out_t)
        normaliser.append(normaliser_t)
    out = torch.cat(out, dim=-2).to(v.dtype)
    return ((out, torch.cat(normaliser, dim=-1)) if return_normaliser else out), (kv, z, *scale)
