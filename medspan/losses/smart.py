"""The four SMARTFormer (DAGMaN) loss terms, each a small function or module with explicit state.

With ``u`` a view, ``ũ`` = ``u`` masked for the student (attention-guided), ``û``/``v̂`` = the two
views with the teacher's patch dropout, ``m`` the stage-3 cell mask (True = masked):

* **AMIP** -- :func:`masked_l1`: ``L = sum_{masked voxels, channels} |pred - u| / (n_masked_voxels * C)``
  (SimMIM / SMIT: L1 on masked voxels only, normalised by their number). Weight 1.
* **AMPD** -- :class:`DistillCE` with a mask (iBOT's masked patch-token loss): per image
  ``L_b = sum_i m_i * CE(t_i, s_i) / sum_i m_i`` over the stage-3 tokens, then the mean over the
  images that have a masked token; teacher(û) vs student(ũ) (same view). Weight 0.1.
* **AITD** -- :class:`DistillCE` on the SA branch's CLS projections, teacher(v̂) vs student(ũ)
  (cross view, DINO). Weight 0.1.
* **GITD** -- :class:`DistillCE` on the projections of the average-pooled stage-4 token,
  teacher(v̂) vs student(ũ). Weight 0.1.

``CE(t, s) = -sum_k softmax((t - c) / tau_t)_k * log_softmax(s / tau_s)_k``: the teacher is centred
(centre ``c``, an EMA of the teacher outputs) and sharpened, as in DINO. :class:`DistillCE` shares
:class:`medspan.losses.dino.CenteredDistillation` with :class:`~medspan.losses.dino.DINOLoss` (same
temperatures, same centre buffer and its all-reduced EMA update); its rows are paired by the caller
instead of DINO's all-pairs-of-crops.

Example:
    >>> loss = DistillCE(out_dim=4, nepochs=1)
    >>> s, t = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    >>> m = torch.tensor([[True, False, False], [False, False, False]])
    >>> float(loss(s, t, epoch=0, mask=m))            # uniform vs uniform: log 4
    1.3862943649291992
"""

from __future__ import annotations

import torch
from torch import Tensor

from medspan.losses.dino import CenteredDistillation

__all__ = ["DistillCE", "masked_l1"]


def masked_l1(pred: Tensor, target: Tensor, voxel_mask: Tensor) -> Tensor:
    """Mean absolute error over the masked voxels (all channels).

    Args:
        pred: (B, C, *S) reconstruction.
        target: (B, C, *S) the unmasked input.
        voxel_mask: (B, *S) bool (or 0/1), True = masked voxel.

    Returns:
        scalar ``sum(|pred - target| * m) / (C * sum(m))`` (0 with gradient when nothing is masked),
        computed in float32.

    Example:
        >>> p, t = torch.tensor([[[1.0, 2.0, 3.0]]]), torch.tensor([[[0.0, 0.0, 0.0]]])
        >>> masked_l1(p, t, torch.tensor([[True, False, True]])).item()     # (1 + 3) / 2
        2.0
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if voxel_mask.shape != (pred.shape[0], *pred.shape[2:]):
        raise ValueError(
            f"voxel_mask must be (B, *S) = {(pred.shape[0], *pred.shape[2:])}, got {tuple(voxel_mask.shape)}"
        )
    m = voxel_mask.to(device=pred.device, dtype=torch.float32).unsqueeze(1)
    err = (pred.float() - target.float()).abs() * m
    denom = m.sum() * pred.shape[1]
    return err.sum() / denom.clamp_min(1.0)


class DistillCE(CenteredDistillation):
    """Centred, sharpened teacher -> student cross-entropy over rows paired by the caller.

    Args:
        out_dim: K, the projection head's output width.
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs, student_temp,
            center_momentum: as :class:`~medspan.losses.dino.CenteredDistillation`.
        init_center: start the centre from the first teacher batch (:meth:`prime_center`).

    ``forward(student (..., K), teacher (..., K), epoch, mask=None, update_center=True)``:

    * without ``mask``: the mean over all rows of ``CE(teacher_row, student_row)``;
    * with ``mask`` (B, N) for (B, N, K) inputs: per image the mean over its masked rows, then the
      mean over the images that have at least one (iBOT's patch loss). 0 if none.

    The centre is updated afterwards from *all* teacher rows (every patch token for AMPD, as iBOT).
    """

    def __init__(
        self,
        out_dim: int,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        nepochs: int = 100,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        init_center: bool = False,
    ) -> None:
        super().__init__(
            out_dim,
            warmup_teacher_temp=warmup_teacher_temp,
            teacher_temp=teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            nepochs=nepochs,
            student_temp=student_temp,
            center_momentum=center_momentum,
        )
        self.init_center = bool(init_center)
        # 0 until the first centre update (saved with the centre, so a resumed run does not re-initialise)
        self.register_buffer("center_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """DINO's EMA update of the centre (all-reduced under DDP); counts the updates."""
        super().update_center(teacher_output)
        self.center_updates += 1

    @torch.no_grad()
    def prime_center(self, teacher_output: Tensor) -> bool:
        """With ``init_center``, before the very first update: centre = mean of ``teacher_output`` rows.

        DINO starts the centre at 0, so during its first ~1 / (1 - m) steps the teacher targets keep
        the sample-independent mean logit and every sample gets the same sharpened argmax. Over
        thousands of steps that transient is harmless; in a run of a few hundred steps it teaches the
        student a constant. Call this on the teacher outputs of the first step *before* the loss.

        Returns:
            True if the centre was set (first call with ``init_center``), else False (no change).
        """
        if not self.init_center or int(self.center_updates) > 0:
            return False
        m = self.center_momentum
        self.center_momentum = 0.0
        try:
            super().update_center(teacher_output.detach().reshape(-1, self.out_dim).float())
        finally:
            self.center_momentum = m
        self.center_updates += 1
        return True

    def row_ce(self, student: Tensor, teacher: Tensor, epoch: int) -> Tensor:
        """Per-row cross-entropy (...,) in float32; no centre update."""
        if student.shape != teacher.shape or student.shape[-1] != self.out_dim:
            raise ValueError(
                f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must match "
                f"and end in {self.out_dim}"
            )
        s = self.student_log_probs(student.float())
        t = self.teacher_probs(teacher.float(), epoch)
        return -(t * s).sum(-1)

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        epoch: int,
        mask: Tensor | None = None,
        update_center: bool = True,
    ) -> Tensor:
        """Loss of paired rows.

        Args:
            student: (..., K) student outputs, e.g. (B, K) or (B, N, K).
            teacher: the teacher outputs paired row by row, same shape.
            epoch: selects the teacher temperature.
            mask: (B, N) bool for (B, N, K) inputs: per image the mean over its masked rows, then
                the mean over the images with one (iBOT); None: the mean over all rows.
            update_center: update the centre from every teacher row afterwards.

        Returns:
            scalar float32 tensor.
        """
        ce = self.row_ce(student, teacher, epoch)
        if mask is None:
            loss = ce.mean()
        else:
            if ce.ndim != 2 or tuple(mask.shape) != tuple(ce.shape):
                raise ValueError(
                    f"mask must be (B, N) = {tuple(ce.shape)} for (B, N, K) inputs, got {tuple(mask.shape)}"
                )
            m = mask.to(device=ce.device, dtype=ce.dtype)
            count = m.sum(1)
            per_image = (ce * m).sum(1) / count.clamp_min(1.0)
            has = (count > 0).to(ce.dtype)
            loss = (per_image * has).sum() / has.sum().clamp_min(1.0)
        if update_center:
            self.update_center(teacher.detach().reshape(-1, self.out_dim).float())
        return loss
