"""Elementwise glue fused into one kernel on CUDA.

Eager, a few lines of elementwise arithmetic over (B, H, T, ·) fp32 tensors are one kernel launch and one pass over
memory each, forward and backward; at long sequences they rival the kernels they surround. Linear attention's values
column and normalisation fused this way took Hedgehog from 3.48 to 2.77 ms forward+backward at 16k (H200,
benchmarks/results/bench_kernel_64k_h200/1e2b843).
``fused(fn, like)`` hands back ``fn`` compiled where ``like`` is on CUDA, so the compiler writes the pass once, and
``fn`` itself elsewhere: on the CPU, where the tests compare it with the same code eager, and inside an outer
``torch.compile`` (``distill --compile true``), which fuses it with its neighbours anyway.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

Fn = TypeVar("Fn", bound=Callable)


def fused(fn: Fn, like: torch.Tensor) -> Fn:
    return _compiled(fn) if like.is_cuda and not torch.compiler.is_compiling() else fn


@functools.cache
def _compiled(fn: Fn) -> Fn:
    return torch.compile(fn)
