"""One decode step (T = 1) over a bounded cache: attention over preallocated slots and a running linear state.

Everything here has static shapes and reads no tensor value on the host, so a whole decode step can be captured
once as a CUDA graph (``torch.compile(mode="reduce-overhead")``) and replayed. No mask is built: which slots hold a
real token is the cache's own state, ``valid`` (B, C) bool, updated in place as tokens arrive.

Grouped-query attention reads the Hkv key heads as they are cached: the H = Hkv·G queries are viewed as
(B, Hkv, G, D), query head h reading key head h // G, which is the order ``repeat_interleave`` gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DecodeStep:
    """What one layer's cache hands its variant for one new token.

    ``keys``/``values`` (B, Hkv, C, D): the slots, the new token already written in; ``valid`` (B, C) bool: which
    slots hold a real token (None: the layer keeps no slots). ``new_keys``/``new_values`` (B, Hkv, 1, D): the new
    token. ``linear`` [kv (B, H, M, D), z (B, H, M)(, scale (B, H))] fp32: a running linear-attention state, which
    the variant folds new keys into in place (None: none kept, or not yet started). ``departing_keys``/``values``
    (B, Hkv, 1, D) and ``departing_keep`` (B,) bool: the token that left the window at this step and whether it
    enters the linear state (real, and not a sink). ``new_real`` (B,) bool: whether the new token is real (None:
    it is; a layer with slots has marked it in ``valid`` already).
    """

    scaling: float
    new_keys: torch.Tensor
    new_values: torch.Tensor
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    linear: list[torch.Tensor] | None = None
    departing_keys: torch.Tensor | None = None
    departing_values: torch.Tensor | None = None
    departing_keep: torch.Tensor | None = None
    new_real: torch.Tensor | None = None


def grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """q (B, H, 1, D) -> (B, Hkv, G, D), G = H / Hkv: query head h next to the key head h // G it reads."""
    batch, heads, _, dim = q.shape
    return q.reshape(batch, kv_heads, heads // kv_heads, dim)


def slot_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, scaling: float,
                   return_lse: bool = False):
    """Softmax attention of one query per head over the valid slots.

    q (B, H, 1, D), keys/values (B, Hkv, C, D), valid (B, C) bool -> (B, H, 1, D) in q's dtype; ``return_lse``:
    (B, H, 1, D) fp32 and each query's log-sum-exp (B, H, 1) fp32, to merge with attention over other keys.
    """
    batch, heads, _, dim = q.shape
    q_grouped = grouped(q, keys.shape[1])  # (B, Hkv, G, D)
    allowed = valid[:, None, None, :]  # (B, 1, 1, C)
    if not return_lse:
        out = F.scaled_dot_product_attention(q_grouped, keys, values, attn_mask=allowed, scale=scaling)
        return out.reshape(batch, heads, 1, values.shape[-1])
    scores = torch.matmul(q_grouped.float(), keys.float().transpose(-1, -2)) * scaling  # (B, Hkv, G, C)
    # The finite floor keeps a row without any valid slot finite; only a padded query has one.
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, Hkv, G, 1)
    out = torch.matmul(torch.exp(scores - lse), values.float())  # (B, Hkv, G, D)
    return out.reshape(batch, heads, 1, values.shape[-1]), lse.reshape(batch, heads, 1)


def linear_state_step_(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, linear: list[torch.Tensor],
                       key_log_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one key into a running linear-attention state in place, then read it with one query.

    phi_q/phi_k (B, H, 1, M) non-negative fp32, v (B, H, 1, D); ``linear`` [kv (B, H, M, D), z (B, H, M)] fp32,
    with a third entry, the keys' running log-scale (B, H), where ``key_log_scale`` (B, H, 1) comes with the key
    (see ``kernels.linear.causal_linear_attention``). Returns (out (B, H, 1, D) fp32, normaliser phi_q·z (B, H, 1)
    fp32); out is 0 where the normaliser is 0.
    """
    kv, z = linear[0], linear[1]
    phi_k = phi_k.float()
    if key_log_scale is not None:  # the scale only grows: bring the sums to the new key's scale first
        scale = linear[2]
        new_scale = key_log_scale[..., 0].float()
        decay = torch.exp(scale - new_scale)  # (B, H)
        kv.mul_(decay[..., None, None])
        z.mul_(decay[..., None])
        scale.copy_(new_scale)
    kv.add_(phi_k.transpose(-1, -2) * v.float())  # (B, H, M, 1) * (B, H, 1, D)
    z.add_(phi_k[..., 0, :])
    phi_q = phi_q.float()
    normaliser = torch.matmul(phi_q, z.unsqueeze(-1))  # (B, H, 1, 1)
    numerator = torch.matmul(phi_q, kv)  # (B, H, 1, D)
    out = numerator / torch.where(normaliser == 0, 1.0, normaliser)
    return out, normaliser[..., 0]
