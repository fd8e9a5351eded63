"""Shared mechanism of every linear-attention variant: vary the feature map, share the kernel."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from attnswap.kernels.counting import counted_flops
from attnswap.kernels.decode import DecodeStep, linear_state_step_
from attnswap.kernels.kv_cache import KeptState, linear_attention_extend
from attnswap.kernels.linear import causal_linear_attention, pytorch_scan
from attnswap.kernels.masks import causal, materialize, to_index_mask
from attnswap.variants.base import AttnContext, Variant


class LinearFeatures(NamedTuple):
    """phi(q) (B, H, T, M) and phi(k) (B, H, S, M) in fp32, both non-negative; ``key_log_scale`` (B, H, S) or None:
    key j's features were divided by exp(key_log_scale_j) to fit fp32 (see ``causal_linear_attention``)."""

    q: torch.Tensor
    k: torch.Tensor
    key_log_scale: torch.Tensor | None = None


class LinearVariant(Variant):
    """Attention weights proportional to phi(q)·phi(k) for a non-negative feature map phi.

    Subclasses implement ``feature_map``; causality, key padding and packed documents are added here, once.
    Their Params carry ``chunk``, the chunk length of the linear-attention kernel.
    """

    honours_packed_documents = True  # where the feature map has no key log-scale of its own (Performer's has)

    def feature_map(self, q, k, ctx: AttnContext, state: nn.Module | None,
                    running_scale: torch.Tensor | None = None) -> LinearFeatures:
        """``running_scale`` (B, H): the key log-scale reached before these keys, when they continue a cached
        sequence; only a map that returns ``key_log_scale`` reads it."""
        raise NotImplementedError

    def features(self, q, k, ctx: AttnContext, state: nn.Module | None,
                 running_scale: torch.Tensor | None = None) -> LinearFeatures:
        """``feature_map`` with the rows of padded keys zeroed, so that no query sees them."""
        features = self.feature_map(q, k, ctx, state, running_scale)
        if ctx.key_valid is None:
            return features
        return features._replace(k=features.k * ctx.key_valid[:, None, :, None])

    def feature_count(self, state: nn.Module | None, heads: int, head_dim: int) -> int:
        """m, the width of phi's output for ``head_dim``-wide heads."""
        probe = torch.zeros(1, heads, 1, head_dim)
        with torch.no_grad():
            return self.feature_map(probe, probe, AttnContext(scaling=head_dim**-0.5), state).q.shape[-1]

    def cost(self, n, measure, state, heads, head_dim, layer=0) -> torch.Tensor:
        """flops: m features spend 4·m·D per token (the state update and its read), so 2m / (n + 1) of the causal
        triangle's 4·D·n(n+1)/2; the feature map is not counted. kv: the state, m·(D + 1) floats, over a full
        cache's 2·D·n."""
        m = self.feature_count(state, heads, head_dim)
        share = 2 * m / (n + 1) if measure == "flops" else m * (head_dim + 1) / (2 * head_dim * n)
        return torch.full((heads,), share, dtype=torch.float64)

    def call_flops(self, q, k, ctx, state, block, run):
        """Counted by ``FlopCounterMode`` on one call through the PyTorch scan: the counter cannot see inside fla's
        Triton kernels, which do the same products."""
        with pytorch_scan():
            total = counted_flops(run)
        return (float(total) if total else None), "counted (FlopCounterMode)", None

    def probs(self, q, k, ctx: AttnContext, state: nn.Module | None) -> torch.Tensor:
        """The implied attention matrix (B, H, T, S) fp32: causal, padded keys excluded, rows summing to 1 (or 0)."""
        features = self.features(q, k, ctx, state)
        q_pos, kv_pos = ctx.positions(q.shape[-2], k.shape[-2], q.device)
        index_mask = to_index_mask(causal, q_pos, kv_pos, ctx.key_valid, ctx.model_mask)  # packed documents' mask
        allowed = materialize(index_mask, q.shape[0], 1, q.shape[-2], k.shape[-2], q.device)
        weights = torch.matmul(features.q, features.k.transpose(-1, -2)) * allowed  # (B, H, T, S)
        if features.key_log_scale is not None:  # key j counts exp(s_j - s_i) for query i (slot i + S - T)
            s = features.key_log_scale.float()
            exponent = s[..., None, :] - s[..., -q.shape[-2]:, None]
            weights = weights * torch.exp(exponent.masked_fill(~allowed, float("-inf")))
        total = weights.sum(dim=-1, keepdim=True)
        return weights / torch.where(total == 0, 1.0, total)

    def attend(self, q, k, v, ctx: AttnContext, state: nn.Module | None) -> torch.Tensor:
        if ctx.slots_out_of_order:  # the chunked kernel needs keys in slot order
            return super().attend(q, k, v, ctx, state)
        features = self.features(q, k, ctx, state)
        return causal_linear_attention(features.q, features.k, v, chunk=self.params.chunk,
                                       key_log_scale=features.key_log_scale, documents=ctx.documents).to(q.dtype)

    def kept_state(self, layer_idx: int, state=None) -> KeptState:
        return KeptState(linear=True)

    def decode(self, q, step: DecodeStep, state: nn.Module | None) -> torch.Tensor:
        """The new token folded into the running state, which its query then reads."""
        groups = q.shape[1] // step.new_keys.shape[1]  # one token: expanding its key heads is cheap
        k, v = (x.repeat_interleave(groups, dim=1) for x in (step.new_keys, step.new_values))
        running_scale = step.linear[2] if step.linear is not None and len(step.linear) == 3 else None
        real = None if step.new_real is None else step.new_real[:, None]  # (B, 1)
        features = self.features(q, k, AttnContext(scaling=step.scaling, key_valid=real), state, running_scale)
        if step.linear is None:  # decoding from an empty cache: the first token starts the state
            out, linear = linear_attention_extend(features.q, features.k, v, None, self.params.chunk,
                                                  features.key_log_scale)
            step.linear = list(linear)
            return out.to(q.dtype)
        out, _ = linear_state_step_(features.q, features.k, v, step.linear, features.key_log_scale)
        return out.to(q.dtype)


def draw_probs(probs: torch.Tensor) -> str:
    """A (T, S) attention matrix as a grid of shades, darker = more weight (each row scaled to its maximum)."""
    shades = " ░▒▓█"
    scaled = probs / probs.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    levels = (scaled * (len(shades) - 1)).round().long()
    return "\n".join("".join(shades[i] * 2 for i in row) for row in levels.tolist())


def show_pattern(variant: LinearVariant, head_dim: int = 16, length: int = 12) -> None:
    """Print the variant's implied attention on ``length`` random tokens next to exact softmax attention."""
    from attnswap.kernels.dense import dense_probs

    q, k = torch.randn(2, 1, 1, length, head_dim, generator=torch.Generator().manual_seed(0)).unbind(0)
    ctx = AttnContext(scaling=head_dim**-0.5)
    probs = variant.probs(q, k, ctx, variant.make_state(1, head_dim))[0, 0]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    exact = dense_probs(q, k, allowed, ctx.scaling)[0, 0]
    print(f"{variant.label} (implied attention):\n{draw_probs(probs)}\n\nsoftmax:\n{draw_probs(exact)}")
