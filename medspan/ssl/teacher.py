"""EMA teacher for self-distillation.

* :func:`copy_teacher` makes the teacher: a deep copy of the student with gradients off, in eval
  mode and with stochastic depth disabled (DINO builds its teacher without drop-path).
* :func:`ema_update` moves it: ``t = m * t + (1 - m) * s`` for every parameter (with
  ``torch._foreach`` ops, one kernel per group instead of one per tensor), buffers copied.

Example:
    >>> student = torch.nn.Linear(4, 2)
    >>> teacher = copy_teacher(student)
    >>> ema_update(student, teacher, momentum=0.996)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["copy_teacher", "ema_update"]


def copy_teacher(student: nn.Module, disable_drop_path: bool = True) -> nn.Module:
    """Deep copy of ``student`` with ``requires_grad=False`` everywhere, in eval mode.

    Args:
        student: the student network (unwrapped, not the DDP wrapper).
        disable_drop_path: set ``drop_prob = 0`` on every module that has one
            (:class:`medspan.models.vit.DropPath`), so the teacher is deterministic even if
            someone puts it back into train mode.
    """
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if disable_drop_path:
        for m in teacher.modules():
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0
    teacher.eval()
    return teacher


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """In place: ``t = momentum * t + (1 - momentum) * s`` for parameters; buffers copied.

    Parameters and buffers are matched by position (``.parameters()`` / ``.buffers()`` order),
    so pass the unwrapped student (``model.module`` under DDP). Shapes must agree.

    Args:
        student: source network.
        teacher: network updated in place (same architecture).
        momentum: m in [0, 1]; 1 keeps the teacher, 0 copies the student.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    s_params = list(student.parameters())
    t_params = list(teacher.parameters())
    s_bufs = list(student.buffers())
    t_bufs = list(teacher.buffers())
    if len(s_params) != len(t_params) or len(s_bufs) != len(t_bufs):
        raise ValueError(
            f"student and teacher differ: {len(s_params)} vs {len(t_params)} parameters, "
            f"{len(s_bufs)} vs {len(t_bufs)} buffers"
        )
    for s, t in zip(s_params, t_params):
        if s.shape != t.shape:
            raise ValueError(f"parameter shape mismatch: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
    if t_params:
        s_data = [s.detach().to(t.dtype) for s, t in zip(s_params, t_params)]
        t_data = [t.detach() for t in t_params]
        torch._foreach_mul_(t_data, momentum)
        torch._foreach_add_(t_data, s_data, alpha=1.0 - momentum)
    for s, t in zip(s_bufs, t_bufs):
        t.copy_(s)
