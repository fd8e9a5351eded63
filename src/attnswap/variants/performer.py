"""Performer: softmax attention by positive orthogonal random features, FAVOR+ (https://arxiv.org/abs/2009.14794)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from attnswap.variants.base import AttnContext, check
from attnswap.variants.linear_base import LinearFeatures, LinearVariant, show_pattern


MAX_FEATURES = 16384  # per head: the feature maps of one layer are heads x m x head_dim fp32 values


@dataclass(frozen=True)
class PerformerParams:
    m: int = 256  # random features per head
    redraw: int = 0  # draw new features every `redraw` forward calls in training mode; 0 = never
    orthogonal: bool = True  # block-orthogonal rows (lower variance) instead of i.i.d. Gaussian ones
    seed: int = 0
    chunk: int = 64  # chunk length of the linear-attention kernel

    def __post_init__(self):
        check(1 <= self.m <= MAX_FEATURES, f"performer needs m >= 1 random features per head, at most "
                                            f"{MAX_FEATURES} (m in 1..{MAX_FEATURES}), got m={self.m}")
        check(self.redraw >= 0, f"redraw must be >= 0 (0 = never), got redraw={self.redraw}")
        check(self.chunk >= 1, f"chunk must be >= 1, got chunk={self.chunk}")


def gaussian_features(num_heads: int, m: int, head_dim: int, orthogonal: bool,
                      generator: torch.Generator) -> torch.Tensor:
    """Projections ω (H, m, D) whose rows are N(0, I) in distribution.

    Orthogonal: each block of D rows is an orthonormal basis (QR of a Gaussian matrix), and each row is
    rescaled to the norm of an independent Gaussian vector (chi-distributed), which keeps the marginals Gaussian.
    """
    if not orthogonal:
        return torch.randn(num_heads, m, head_dim, generator=generator)
    blocks = math.ceil(m / head_dim)
    basis, upper = torch.linalg.qr(torch.randn(num_heads, blocks, head_dim, head_dim, generator=generator))
    # Householder QR leaves R's diagonal of either sign, which biases Q's columns; flipping them makes Q Haar.
    basis = basis * torch.sign(torch.diagonal(upper, dim1=-2, dim2=-1)).unsqueeze(-2)
    rows = basis.transpose(-1, -2).reshape(num_heads, blocks * head_dim, head_dim)[:, :m]  # Q's columns as rows
    norms = torch.randn(num_heads, m, head_dim, generator=generator).norm(dim=-1, keepdim=True)
    return rows * norms


class PerformerFeatures(nn.Module):
    """The random projections of one layer: a persistent buffer ω (H, m, D), redrawn on schedule; nothing trainable."""

    def __init__(self, num_heads: int, head_dim: int, params: PerformerParams):
        super().__init__()
        self.params, self.num_heads, self.head_dim = params, num_heads, head_dim
        self.draws = 0
        self.training_calls = 0
        self.register_buffer("omega", self._draw())

    def _draw(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.params.seed + 1_000_003 * self.draws)  # one stream per draw
        return gaussian_features(self.num_heads, self.params.m, self.head_dim, self.params.orthogonal, generator)

    def count_call(self) -> None:
        """After every ``redraw``-th forward call in training mode, draw new projections."""
        if not (self.training and self.params.redraw):
            return
        self.training_calls += 1
        if self.training_calls % self.params.redraw == 0:
            self.draws += 1
            # A new tensor, not an in-place copy: the autograd graph of the last call still holds the old one.
            self.omega = self._draw().to(self.omega)


FEATURE_EPS = 1e-4  # relative to a feature's largest value, 1 after stabilising


def random_feature_logits(x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """ω·x - |x|²/2: x (B, H, N, D), ω (H, m, D) -> (B, H, N, m). exp of it, over sqrt(m), is the feature map."""
    return torch.einsum("bhnd,hmd->bhnm", x, omega) - x.square().sum(dim=-1, keepdim=True) / 2


class Performer(LinearVariant):
    name = "performer"
    Params = PerformerParams
    summary = "FAVOR+ positive orthogonal random features approximating softmax (linear time)"
    honours_packed_documents = False  # its running key log-scale leaves none for the documents (kernels/linear.py)

    @property
    def label(self) -> str:
        p = self.params
        return f"performer_m{p.m}" + (f"_redraw{p.redraw}" if p.redraw else "") + ("" if p.orthogonal else "_iid")

    def make_state(self, num_heads: int, head_dim: int) -> nn.Module:
        return PerformerFeatures(num_heads, head_dim, self.params)

    def feature_map(self, q, k, ctx: AttnContext, state: PerformerFeatures, running_scale=None):
        assert state is not None, "performer needs its state (make_state); swap() creates it"
        omega = state.omega.float()
        # Splitting the scaling between q and k makes E[phi(q)·phi(k)] = exp(scaling · q·k).
        logits_q = random_feature_logits(q.float() * ctx.scaling**0.5, omega)  # (B, H, T, m)
        logits_k = random_feature_logits(k.float() * ctx.scaling**0.5, omega)  # (B, H, S, m)
        if ctx.key_valid is not None:
            logits_k = logits_k.masked_fill(~ctx.key_valid[:, None, :, None], float("-inf"))
        # exp of the logits spans more than fp32 holds, so both sides are stabilised. For q, one constant per query
        # (it cancels in the normalised ratio). For k, each key by the running maximum of the keys up to it: the
        # kernel carries that scale (key_log_scale), so the keys keep their true relative weights, and no key is
        # divided by anything a later key decides -- a maximum over all keys, as in FAVOR+'s reference code, lets
        # later tokens change earlier outputs through the kernel epsilon and through underflow. Padded keys set
        # no maximum; before the first real key the scale is a finite floor.
        stab_q = logits_q.amax(dim=-1, keepdim=True).detach()
        own = logits_k.detach().amax(dim=-1)  # (B, H, S)
        if running_scale is not None:  # these keys continue a cached sequence whose maximum so far is running_scale
            own = torch.cat([running_scale.unsqueeze(-1), own], dim=-1)
        running = own.cummax(dim=-1).values[..., -k.shape[-2]:]  # (B, H, S)
        key_log_scale = running.clamp_min(torch.finfo(torch.float32).min)
        scale = omega.shape[-2] ** -0.5
        # FAVOR+'s kernel epsilon keeps every feature >= FEATURE_EPS of its key's scale, so a query's normaliser
        # never underflows to ~1e-40 (whose backward, num / den², was NaN on the teacher); padded keys are still
        # zeroed by LinearVariant.features.
        return LinearFeatures((torch.exp(logits_q - stab_q) + FEATURE_EPS) * scale,
                              (torch.exp(logits_k - key_log_scale.unsqueeze(-1)) + FEATURE_EPS) * scale,
                              key_log_scale)

    def attend(self, q, k, v, ctx, state):
        out = super().attend(q, k, v, ctx, state)
        state.count_call()
        return out


def main() -> None:
    show_pattern(Performer(PerformerParams(m=64)))


if __name__ == "__main__":
    main()
