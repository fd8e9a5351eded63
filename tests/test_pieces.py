"""kernels/pieces.py: products taken in pieces of positions equal one product, in values and gradients."""

from __future__ import annotations

import pytest
import torch

from attnswap.kernels import pieces


@pytest.mark.parametrize("length", [5, 8, 20, 24], ids=["one_short_piece", "one_piece", "ragged", "whole_pieces"])
@pytest.mark.parametrize("shared", ["per_head", "per_row"])  # Hedgehog's map (H, D, f); the sink keys (B, H, D, S)
def test_pieces_equal_one_product(length, shared, monkeypatch):
    monkeypatch.setattr(pieces, "POSITIONS_PER_PIECE", 8)
    x = torch.randn(2, 3, length, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(*((3,) if shared == "per_head" else (2, 3)), 16, 6, dtype=torch.float64, requires_grad=True)
    got, want = pieces.matmul_by_pieces(x, w), torch.matmul(x, w)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    for name, g_got, g_want in zip("xw", torch.autograd.grad(got, (x, w), grad), torch.autograd.grad(want, (x, w), grad)):
        torch.testing.assert_close(g_got, g_want, msg=f"d{name}")
