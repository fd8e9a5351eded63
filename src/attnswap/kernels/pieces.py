"""Products whose gradient sums over every position, as batches of GEMMs.

x (…, N, a) @ w (…, a, b) with w shared by all N positions: the gradient of w is x^T·g, an (a, b) output summed over
N. cuBLAS runs that as one GEMM per leading index, on a few dozen tiles when a and b are small: 4.5 ms per side for
Hedgehog's (64, 64) map at 64k positions, 12 heads (fp32), 2.15 ms for NSA's (64, 3) gates at 64k, 1.1 ms each for
a sink branch's (64, 4) at 16k (H200, benchmarks/results/bench_kernel_64k_h200/0ce0b5d). Positions taken in pieces
make it one GEMM per piece and a sum: Hedgehog's GEMMs then left the list of its largest kernels. (Written as a
broadcast product and a sum instead, the compiler's reduction over N was slower still: 1.6 ms at 16k.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POSITIONS_PER_PIECE = 1024


def matmul_by_pieces(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w for x (…, N, a) and w (…, a, b) broadcast over the positions: (…, N, b), w's gradient in pieces."""
    length = x.shape[-2]
    if length <= POSITIONS_PER_PIECE:
        return torch.matmul(x, w)
    pieces = F.pad(x, (0, 0, 0, -length % POSITIONS_PER_PIECE)).unflatten(-2, (-1, POSITIONS_PER_PIECE))
    return torch.matmul(pieces, w.unsqueeze(-3)).flatten(-3, -2)[..., :length, :]
