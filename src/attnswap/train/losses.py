"""Distillation losses: KL of next-token distributions without whole logits, and attention-weight cross-entropy.

A (B, T, V) logits tensor of a 50,257-word vocabulary is 1.6 GB in fp32 at B=8, T=1024, and a KL step used to hold
four of them (teacher, student, their log-softmaxes). ``chunked_kl`` takes the final hidden states instead and
applies the LM head ``chunk`` positions at a time; each chunk's student logits are recomputed in the backward
(activation checkpointing), so one chunk of logits is alive at a time, forward and backward.

Where the LM head is frozen (every distillation run: only attention and its neighbours train), ``chunked_kl`` goes
further, the way fused linear-cross-entropy kernels do (Liger-Kernel): each chunk's gradient with respect to the
student's hidden states, (softmax(s/T) - softmax(t/T))·T/N @ W, is computed in the forward pass, while the chunk's
logits exist anyway, and kept (N × D, small); the backward pass only scales it. So there is no recomputation, three
vocabulary-sized matmuls per chunk instead of five, and on CUDA the softmaxes, the KL, the top-1 agreement and the
gradient of a chunk run as one compiled kernel over bf16 logits. The vocabulary is padded to a multiple of 128 rows
of the head's weight, with a bias that keeps the padding out of every softmax: cuBLAS has no fast kernel for 50,257
columns (odd, so its rows are misaligned), and in the H200 profile of a window distillation step the LM-head matmuls
took 22 % of GPU time and the fp32 loss arithmetic most of the rest (benchmarks/results/distill_speed_h200/profile_86fd6fd).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 4096  # positions per chunk: 4096 × 50,257 fp32 logits = 0.8 GB, a few per chunk in flight
VOCAB_ALIGNMENT = 128  # rows the head's weight is padded to a multiple of, for cuBLAS's aligned kernels
# The padded rows' logit: far enough below any real logit that exp() of it is exactly 0 in fp32, finite so that
# p·(log p - log q) is 0·(finite) and not 0·(-inf + inf).
PADDING_LOGIT = -1e4


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(P_teacher ‖ P_student) per position, averaged over all positions, times T² (Hinton et al.); fp32."""
    kl, _, _ = _kl_terms(student_logits, teacher_logits, temperature, 0.0, False)
    return kl / student_logits[..., 0].numel() * temperature**2


def _chunk_kl_and_agreement(student_hidden, teacher_hidden, head: nn.Module, temperature: float):
    kl, agree, _ = _kl_terms(head(student_hidden), head(teacher_hidden), temperature, 0.0, False)
    return kl, agree


def chunked_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, head: nn.Module, temperature: float = 1.0,
               chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """``kl_divergence(head(student_hidden), head(teacher_hidden))`` and the count of positions whose top-1 tokens
    agree, from final hidden states (B, T, D), never holding more than ``chunk`` positions of logits.

    The teacher's hidden states are detached; gradients reach the student's states and whatever of ``head`` learns.
    A frozen linear head takes the fused path (see the module's doc); any other head is applied chunk by chunk under
    activation checkpointing.
    """
    student = student_hidden.flatten(0, -2)  # (N, D)
    teacher = teacher_hidden.detach().flatten(0, -2)
    if _frozen_linear(head):
        return _FusedLinearKL.apply(student, teacher, head.weight, head.bias, temperature, chunk)
    total = student.new_zeros((), dtype=torch.float32)
    agree = torch.zeros((), dtype=torch.long, device=student.device)
    for start in range(0, student.shape[0], chunk):
        rows = slice(start, start + chunk)
        if torch.is_grad_enabled() and student.requires_grad:
            kl, same = checkpoint(_chunk_kl_and_agreement, student[rows], teacher[rows], head, temperature,
                                  use_reentrant=False)
        else:
            kl, same = _chunk_kl_and_agreement(student[rows], teacher[rows], head, temperature)
        total, agree = total + kl, agree + same
    return total / student.shape[0] * temperature**2, agree


def _frozen_linear(head: nn.Module) -> bool:
    return isinstance(head, nn.Linear) and not any(p.requires_grad for p in head.parameters())


class _FusedLinearKL(torch.autograd.Function):
    """KL(softmax(t W^T / T) ‖ softmax(s W^T / T)) · T² / N and top-1 agreements for hidden states s, t (N, D) and a
    frozen head (W (V, D), bias (V,) or None); the gradient for s is made in the forward pass."""

    @staticmethod
    def forward(ctx, student, teacher, weight, bias, temperature, chunk):
        needs_grad = ctx.needs_input_grad[0]
        weight, padding_bias = _padded_head(weight, bias)
        terms = _compiled_kl_terms() if student.is_cuda else _kl_terms
        rows = student.shape[0]
        grad_scale = temperature / rows  # d(sum KL · T² / N) / d logits = (q - p) / T · T² / N
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        agree = torch.zeros((), dtype=torch.long, device=student.device)
        grad = torch.empty_like(student) if needs_grad else None
        with torch.autocast(student.device.type, enabled=False):  # the dtypes are chosen here, not by autocast
            for start in range(0, rows, chunk):
                part = slice(start, start + chunk)
                student_logits = torch.addmm(padding_bias, student[part].to(weight.dtype), weight.t())
                teacher_logits = torch.addmm(padding_bias, teacher[part].to(weight.dtype), weight.t())
                kl, same, grad_logits = terms(student_logits, teacher_logits, temperature, grad_scale, needs_grad)
                total, agree = total + kl, agree + same
                if needs_grad:
                    grad[part] = torch.matmul(grad_logits, weight).to(grad.dtype)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(agree)
        return total / rows * temperature**2, agree

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_agree):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None, None, None


def _padded_head(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """W padded with zero rows to a multiple of VOCAB_ALIGNMENT, and the bias (0 without one) with PADDING_LOGIT in
    the padded rows, both in W's dtype."""
    vocab = weight.shape[0]
    padded = -(-vocab // VOCAB_ALIGNMENT) * VOCAB_ALIGNMENT
    padding_bias = weight.new_full((padded,), PADDING_LOGIT)
    padding_bias[:vocab] = 0.0 if bias is None else bias.detach().to(weight.dtype)
    return F.pad(weight.detach(), (0, 0, 0, padded - vocab)), padding_bias


def _kl_terms(student_logits, teacher_logits, temperature: float, grad_scale: float, with_grad: bool):
    """Logits (..., V): KL(softmax(teacher / T) ‖ softmax(student / T)) summed over rows, top-1 agreements and,
    ``with_grad``, d(KL sum · grad_scale · T)/d student logits in the logits' dtype (None without). fp32 arithmetic."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum()
    agree = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum()
    grad = ((log_q.exp() - p) * grad_scale).to(student_logits.dtype) if with_grad else None
    return kl, agree, grad


@functools.cache
def _compiled_kl_terms():
    return torch.compile(_kl_terms, dynamic=False, fullgraph=True)


def attention_cross_entropy(teacher_probs: torch.Tensor, student_probs: torch.Tensor) -> torch.Tensor:
    """Hedgehog's attention-transfer loss: -sum_j p_teacher(j) log p_student(j), averaged over query rows; (B, H, T, S)
    fp32 inputs whose rows sum to 1 (or to 0 for a row with no key, which then counts nothing)."""
    rows = teacher_probs.sum(dim=-1)  # 1 for real rows, 0 for rows with no allowed key
    ce = -(teacher_probs * torch.log(student_probs.clamp_min(1e-12))).sum(dim=-1)
    return ce.sum() / rows.sum().clamp_min(1.0)
