"""DINO self-distillation loss with an explicit centre (a registered buffer).

For student outputs of ``ncrops`` views and teacher outputs of the ``n_global`` global views
(normally 2), with teacher temperature ``tau_t(epoch)`` and student temperature ``tau_s``::

    t_q = softmax((teacher_q - center) / tau_t)           (no gradient)
    s_v = log_softmax(student_v / tau_s)
    L   = mean over pairs (q, v), v != q, of  mean_batch( -sum_k t_q[k] * s_v[k] )

(the teacher view q and the student view v are the same image view when ``v == q``; those pairs
are skipped, as in DINO). After the loss the centre is updated from the teacher outputs,
``center = m * center + (1 - m) * mean_batch(teacher)``, all-reduced over processes when
``torch.distributed`` is initialised.

The centre, its update and the temperatures live in :class:`CenteredDistillation`, the base that
:class:`DINOLoss` shares with SMARTFormer's :class:`medspan.losses.smart.DistillCE` (which pairs rows
given by the caller instead of all pairs of crops).

Example:
    >>> loss_fn = DINOLoss(out_dim=8, ncrops=4, nepochs=10)
    >>> s, t = torch.randn(4 * 2, 8), torch.randn(2 * 2, 8)
    >>> loss = loss_fn(s, t, epoch=0)  # scalar; the centre is updated in place
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CenteredDistillation", "DINOLoss"]


class CenteredDistillation(nn.Module):
    """Shared state of the centred, sharpened teacher -> student cross-entropies (DINO, iBOT-style).

    Holds what every such loss needs, and nothing about how rows are paired: the centre buffer
    and its all-reduced EMA update, the teacher-temperature schedule, the student temperature.
    Subclasses define ``forward``: :class:`DINOLoss` pairs crops (all teacher views x all other
    student views), :class:`medspan.losses.smart.DistillCE` pairs rows given by the caller.

    Args:
        out_dim: K, the head's output width.
        warmup_teacher_temp: teacher temperature at epoch 0.
        teacher_temp: teacher temperature after the warm-up.
        warmup_teacher_temp_epochs: linear warm-up length in epochs (0 = none).
        nepochs: training length; epochs beyond it keep the last temperature.
        student_temp: student temperature.
        center_momentum: EMA momentum of the centre.

    The centre is ``self.center`` (1, K), a buffer (saved in ``state_dict``). The teacher
    temperature per epoch is ``self.teacher_temp_schedule`` (numpy, length ``nepochs``).
    """

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        nepochs: int = 100,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if not 0 <= warmup_teacher_temp_epochs <= nepochs:
            raise ValueError(
                f"warmup_teacher_temp_epochs ({warmup_teacher_temp_epochs}) must be in [0, nepochs={nepochs}]"
            )
        self.out_dim = int(out_dim)
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate(
            (
                np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
            )
        )

    def teacher_temp_at(self, epoch: int) -> float:
        """Teacher temperature for ``epoch`` (clamped to the schedule's last entry)."""
        sched = self.teacher_temp_schedule
        return float(sched[min(max(int(epoch), 0), len(sched) - 1)])

    def student_log_probs(self, student: Tensor) -> Tensor:
        """``log_softmax(student / tau_s)`` over the last axis (same shape as ``student``)."""
        return F.log_softmax(student / self.student_temp, dim=-1)

    def teacher_probs(self, teacher: Tensor, epoch: int) -> Tensor:
        """``softmax((teacher - center) / tau_t(epoch))`` over the last axis, without gradient."""
        center = self.center.to(teacher.dtype)
        return F.softmax((teacher - center) / self.teacher_temp_at(epoch), dim=-1).detach()

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """``center = m * center + (1 - m) * mean over all rows (and processes) of teacher_output``.

        Args:
            teacher_output: (M, K) teacher outputs of the step.
        """
        batch_center = teacher_output.detach().sum(dim=0, keepdim=True).to(self.center.dtype)
        count = teacher_output.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            count *= dist.get_world_size()
        batch_center = batch_center / count
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


class DINOLoss(CenteredDistillation):
    """Cross-entropy between the centred, sharpened teacher and the student over view pairs.

    Args:
        out_dim: K, the head's output width.
        ncrops: number of student views (global + local).
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs, student_temp,
            center_momentum: as :class:`CenteredDistillation`.

    The centre is ``self.center`` (1, K), a buffer (saved in ``state_dict``). The teacher
    temperature per epoch is ``self.teacher_temp_schedule`` (numpy, length ``nepochs``).
    """

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        nepochs: int = 100,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        if ncrops < 2:
            raise ValueError(f"ncrops must be >= 2, got {ncrops}")
        super().__init__(
            out_dim,
            warmup_teacher_temp=warmup_teacher_temp,
            teacher_temp=teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            nepochs=nepochs,
            student_temp=student_temp,
            center_momentum=center_momentum,
        )
        self.ncrops = int(ncrops)

    def forward(
        self,
        student_output: Tensor,
        teacher_output: Tensor,
        epoch: int,
        update_center: bool = True,
    ) -> Tensor:
        """Loss for one step.

        Args:
            student_output: (ncrops * B, K), rows grouped by crop (crop 0 rows first).
            teacher_output: (n_global * B, K), the teacher's outputs on the global crops, which
                are also the student's first ``n_global`` crops.
            epoch: current epoch (selects the teacher temperature).
            update_center: update the centre from ``teacher_output`` after computing the loss.

        Returns:
            scalar tensor (float32 for half inputs, else the input dtype).
        """
        if student_output.ndim != 2 or student_output.shape[1] != self.out_dim:
            raise ValueError(f"student_output must be (ncrops*B, {self.out_dim}), got {tuple(student_output.shape)}")
        if teacher_output.ndim != 2 or teacher_output.shape[1] != self.out_dim:
            raise ValueError(f"teacher_output must be (n_global*B, {self.out_dim}), got {tuple(teacher_output.shape)}")
        if student_output.shape[0] % self.ncrops:
            raise ValueError(f"student_output has {student_output.shape[0]} rows, not a multiple of ncrops={self.ncrops}")
        b = student_output.shape[0] // self.ncrops
        if b == 0 or teacher_output.shape[0] % b or not 1 <= teacher_output.shape[0] // b <= self.ncrops:
            raise ValueError(
                f"teacher_output has {teacher_output.shape[0]} rows; expected n_global * B with B={b} "
                f"(from student_output {tuple(student_output.shape)} and ncrops={self.ncrops})"
            )
        n_global = teacher_output.shape[0] // b
        if student_output.dtype in (torch.float16, torch.bfloat16):
            student_output = student_output.float()
        if teacher_output.dtype in (torch.float16, torch.bfloat16):
            teacher_output = teacher_output.float()

        student_logp = self.student_log_probs(student_output).chunk(self.ncrops)
        teacher_p = self.teacher_probs(teacher_output, epoch).chunk(n_global)

        total = student_output.new_zeros(())
        n_terms = 0
        for iq, q in enumerate(teacher_p):
            for v in range(self.ncrops):
                if v == iq:
                    continue
                total = total + torch.sum(-q * student_logp[v], dim=-1).mean()
                n_terms += 1
        total = total / n_terms
        if update_center:
            self.update_center(teacher_output)
        return total
