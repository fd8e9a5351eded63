"""Hedgehog: linear attention with a learned softmax feature map per head (https://arxiv.org/abs/2402.04347)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from attnswap.kernels.fusion import fused
from attnswap.kernels.pieces import matmul_by_pieces
from attnswap.variants.base import OPTIONAL, AttnContext, check
from attnswap.variants.linear_base import LinearFeatures, LinearVariant, show_pattern


# Why a floor: once trained maps grow sharp, phi(q)·phi(k) of two peaked softmaxes can underflow, and the linear
# normaliser with it; its gradient (-num / den²) then overflowed: Hedgehog's bf16 distillation stopped with a NaN
# gradient norm 37 steps into stage 2 (configs/experiments/recipe_hedgehog.yaml at 86fd6fd, H200). Mixing each
# softmax with 1e-4 of the uniform distribution bounds phi(q)·phi(k) away from 0 (tests/test_hedgehog.py builds maps
# whose gradients are NaN without it, finite with it; 1e-6 already suffices there). The floor has a price: stage 1's
# attention cross-entropy stalled at 3.78 instead of 3.52 (benchmarks/results/recipe_h200), so the spec's ``floor``
# sets it. On the CPU (30 steps of stage 1, benchmarks/results/hedgehog_feature_floor_cpu) 1e-6 ends at 3.354 against
# 3.342 without a floor and 3.395 at 1e-4.
FEATURE_FLOOR = 1e-4


@dataclass(frozen=True)
class HedgehogParams:
    feature_dim: int = 0  # f, the width of each softmax half; 0 = the head dimension
    chunk: int = 64  # chunk length of the linear-attention kernel
    floor: float = field(default=FEATURE_FLOOR, metadata=OPTIONAL)  # each softmax half's share of the uniform

    def __post_init__(self):
        check(self.feature_dim >= 0, f"feature_dim must be >= 0 (0 = head_dim), got feature_dim={self.feature_dim}")
        check(self.chunk >= 1, f"chunk must be >= 1, got chunk={self.chunk}")
        check(0 <= self.floor < 1,
              f"floor must be in [0, 1) (a share of the uniform distribution), got floor={self.floor}")


class HedgehogMap(nn.Module):
    """One layer's learned maps x -> x W + b, one per head and per side (queries, keys), as Hedgehog and LoLCATs
    learn them: W (2, H, D, f) and b (2, H, f) in fp32, index 0 for queries and 1 for keys.

    Separate maps matter: with one map shared by both sides, attention transfer on the bundled teacher stalled
    (attention cross-entropy 4.5 -> 3.7 in 200 steps, configs/experiments/recipe_hedgehog.yaml at 4059732).
    """

    QUERIES, KEYS = 0, 1

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, floor: float = FEATURE_FLOOR):
        super().__init__()
        self.floor = floor
        # A rectangular identity: at the start the map softmaxes the (first f) coordinates of x themselves.
        self.weight = nn.Parameter(torch.eye(head_dim, feature_dim).repeat(2, num_heads, 1, 1))
        self.bias = nn.Parameter(torch.zeros(2, num_heads, feature_dim))

    def forward(self, x: torch.Tensor, side: int = QUERIES, scale: float = 1.0) -> torch.Tensor:
        """phi(scale·x): x (B, H, N, D) -> (B, H, N, 2f) fp32, computed in fp32 even under autocast (see
        ``softmax_features``). On CUDA the map is one compiled function: eager, its half-dozen elementwise passes
        over (B, H, N, 2f) fp32 tensors, forward and backward, rival the linear-attention kernel itself at long n."""
        # On CUDA, the features are stored in fla-core's layout (B, N, H, 2f), so that its kernels take them, and hand
        # back their gradients, without a copy each way (kernels/linear.py).
        features = fused(softmax_features_in_fla_layout, x) if x.is_cuda else softmax_features
        with torch.autocast(x.device.type, enabled=False):
            return features(x, self.weight[side], self.bias[side], scale, self.floor)


def softmax_features(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: float,
                     floor: float) -> torch.Tensor:
    """[softmax(l), softmax(-l)] for l = scale·x W + b, each half mixed with ``floor`` of the uniform distribution:
    x (B, H, N, D), weight (H, D, f), bias (H, f) -> (B, H, N, 2f) fp32."""
    logits = matmul_by_pieces(x.float() * scale, weight) + bias[:, None, :]  # weight (H, D, f) per head
    phi = torch.cat([torch.softmax(logits, dim=-1), torch.softmax(-logits, dim=-1)], dim=-1)
    return (1 - floor) * phi + floor / logits.shape[-1]


def softmax_features_in_fla_layout(*args) -> torch.Tensor:
    """``softmax_features``, the same (B, H, N, 2f) tensor stored as (B, N, H, 2f)."""
    return softmax_features(*args).transpose(1, 2).contiguous().transpose(1, 2)


def floor_label(floor: float) -> str:
    return "" if floor == FEATURE_FLOOR else f"_floor{floor:g}"


class Hedgehog(LinearVariant):
    name = "hedgehog"
    Params = HedgehogParams
    summary = "linear attention with a learned per-head softmax feature map, distilled to mimic softmax"

    @property
    def label(self) -> str:
        p = self.params
        return "hedgehog" + (f"_f{p.feature_dim}" if p.feature_dim else "") + floor_label(p.floor)

    def make_state(self, num_heads: int, head_dim: int) -> nn.Module:
        return HedgehogMap(num_heads, head_dim, self.params.feature_dim or head_dim, self.params.floor)

    def feature_map(self, q, k, ctx: AttnContext, state: HedgehogMap, running_scale=None):
        assert state is not None, "hedgehog needs its state (make_state); swap() creates it"
        # The model's scaling, split between q and k, keeps the logits at the scale softmax attention saw.
        half = ctx.scaling**0.5
        return LinearFeatures(state(q, state.QUERIES, half), state(k, state.KEYS, half))


def main() -> None:
    show_pattern(Hedgehog())


if __name__ == "__main__":
    main()
