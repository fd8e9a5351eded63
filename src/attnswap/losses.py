"""Distillation losses: KL of next-token distributions without whole logits, and attention-weight cross-entropy.

A (B, T, V) logits tensor of a 50,257-word vocabulary is 1.6 GB in fp32 at B=8, T=1024, and a KL step used to hold
four of them (teacher, student, their log-softmaxes). ``chunked_kl`` takes the final hidden states instead and
applies the LM head ``chunk`` positions at a time; each chunk's student logits are recomputed in the backward
(activation checkpointing), so one chunk of logits is alive at a time, forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 4096  # positions per chunk: 4096 × 50,257 fp32 logits = 0.8 GB, a few per chunk in flight


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(P_teacher ‖ P_student) per position, averaged over all positions, times T² (Hinton et al.); fp32."""
    return _kl_sum(student_logits.flatten(0, -2), teacher_logits.flatten(0, -2), temperature) \
        / student_logits[..., 0].numel() * temperature**2


def _kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over rows of KL(softmax(teacher / T) ‖ softmax(student / T)); logits (N, V), computed in fp32."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum()


def _chunk_kl_and_agreement(student_hidden, teacher_hidden, head: nn.Module, temperature: float):
    student, teacher = head(student_hidden), head(teacher_hidden)  # (N, V) each
    agree = (student.argmax(-1) == teacher.argmax(-1)).sum()
    return _kl_sum(student, teacher, temperature), agree


def chunked_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, head: nn.Module, temperature: float = 1.0,
               chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """``kl_divergence(head(student_hidden), head(teacher_hidden))`` and the count of positions whose top-1 tokens
    agree, from final hidden states (B, T, D), never holding more than ``chunk`` positions of logits.

    The teacher's hidden states are detached; gradients reach the student's states and whatever of ``head`` learns.
    """
    student = student_hidden.flatten(0, -2)  # (N, D)
    teacher = teacher_hidden.detach().flatten(0, -2)
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


def attention_cross_entropy(teacher_probs: torch.Tensor, student_probs: torch.Tensor) -> torch.Tensor:
    """Hedgehog's attention-transfer loss: -sum_j p_teacher(j) log p_student(j), averaged over query rows; (B, H, T, S)
    fp32 inputs whose rows sum to 1 (or to 0 for a row with no key, which then counts nothing)."""
    rows = teacher_probs.sum(dim=-1)  # 1 for real rows, 0 for rows with no allowed key
    ce = -(teacher_probs * torch.log(student_probs.clamp_min(1e-12))).sum(dim=-1)
    return ce.sum() / rows.sum().clamp_min(1.0)
