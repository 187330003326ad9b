"""Self-distillation pretraining engine (DINO + optional anatomical attention prior) on MONAI engines.

:class:`SelfDistillationTrainer` is a :class:`monai.engines.Trainer` (hence an ignite ``Engine``):
every MONAI / ignite handler (stats, validation, MLflow, checkpoints) attaches to it as usual.
One iteration:

1. the teacher (EMA of the student, no gradient) embeds the global crops;
2. the student embeds all crops, and returns the last block's CLS->patch attention of the global crops
   with gradient;
3. ``loss = DINO(student, teacher) + w_prior * SPAN(attention, warped priors) [+ w_sar * SAR(attention logits)]``;
4. the shared update (:class:`medspan.engines.step.TrainStep`): backward, gradient clipping (global
   norm, or per parameter as DINO with ``clip_mode="per_param"``), the last layer of the DINO head
   frozen during the first epochs, optimizer step (LR / weight decay from per-iteration schedules),
   EMA update of the teacher.

A non-finite loss, gradient or weight stops the run with :class:`medspan.errors.TrainingError`
naming the epoch, the iteration, the first offending tensors and the cases of the batch, before
any checkpoint or export handler of that iteration / epoch runs: checkpoints written at earlier
epochs stay as they were, and no non-finite weights are saved.

Batches are dicts produced by :class:`medspan.data.multicrop.MultiCropd` and collated by MONAI's
``DataLoader``::

    global_crops  (B, n_global, C, G, G)      global views
    local_crops   (B, n_local,  C, L, L)      local views (may be absent or n_local = 0)
    global_priors (B, n_global, S, G, G)      priors warped with the global views (only with a prior loss)
    case_id       list[str]                   optional, used in error messages
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from medspan.engines.step import (
    Schedule,
    StepTrainer,
    apply_schedules,
    case_ids,
    param_groups,
    schedule_value,
)
from medspan.errors import TrainingError

__all__ = ["SelfDistillationTrainer", "apply_schedules", "case_ids", "loss_terms", "param_groups", "schedule_value"]


def loss_terms(keys: Sequence[str] = ("loss", "dino", "prior")) -> Callable[[Any], dict[str, float]]:
    """Output transform for stats / tracking handlers: the iteration output -> ``{key: value}``.

    The trainer's ``engine.state.output`` follows MONAI's decollated convention (a list whose first
    item holds the batch-level values), so MONAI's ``from_engine(["loss"], first=True)`` works too.
    """
    keys = tuple(keys)

    def _terms(output: Any) -> dict[str, float]:
        out = output[0] if isinstance(output, (list, tuple)) else output
        return {k: out[k] for k in keys if k in out}

    return _terms


class SelfDistillationTrainer(StepTrainer):
    """DINO self-distillation with an optional anatomical attention prior and spatial-entropy loss.

    Args:
        device: where to train.
        max_epochs: number of epochs.
        train_data_loader: yields multi-crop batches (see module docstring).
        student: :class:`medspan.models.heads.MultiCropWrapper` (backbone + DINO head), trained.
        teacher: a copy of ``student`` updated by EMA only.
        dino_loss: :class:`medspan.losses.dino.DINOLoss` (its centre is part of the state to checkpoint).
        optimizer: optimizer over ``param_groups(student)``.
        lr_schedule: per-iteration learning rate (array of ``max_epochs * len(loader)``) or a constant.
        wd_schedule: per-iteration weight decay for the decayed group, or a constant / None (unchanged).
        momentum_schedule: per-iteration EMA momentum of the teacher (e.g. cosine 0.996 -> 1).
        prior_loss: :class:`medspan.losses.span.SpanPriorLoss` or None (plain DINO).
        prior_weight: weight of the prior loss; scalar or per-iteration schedule. 0 disables it.
        sar_loss: optional spatial-entropy loss called as ``sar_loss(cls_logits, grid)``.
        sar_weight: its weight (scalar or schedule).
        clip_grad: max gradient norm (None: no clipping).
        clip_mode: ``"global"`` (one norm over all gradients, the default) or ``"per_param"``
            (each parameter's gradient norm clipped on its own, as DINO); see
            :class:`medspan.engines.step.TrainStep`.
        freeze_last_layer: epochs during which the last layer of the DINO head gets no update.
        amp: autocast (bfloat16 by default) on CUDA; ignored on CPU.
        amp_dtype: autocast dtype.
        handlers: MONAI / ignite handlers to attach.
        epoch_length: iterations per epoch (default: ``len(train_data_loader)``).

    The prior and SAR losses index heads by their position in the last block, so the student always
    returns the attention of every head (the cost is one CLS row per head).

    Example::

        trainer = SelfDistillationTrainer(device, 10, loader, student, teacher, DINOLoss(4096, 8), opt,
                                          lr_schedule=lrs, momentum_schedule=mom, prior_loss=SpanPriorLoss([0, 1, 2]))
        trainer.run()
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        student: nn.Module,
        teacher: nn.Module,
        dino_loss: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_schedule: Schedule | None = None,
        wd_schedule: Schedule | None = None,
        momentum_schedule: Schedule | None = 0.996,
        prior_loss: nn.Module | None = None,
        prior_weight: Schedule = 1.0,
        sar_loss: nn.Module | None = None,
        sar_weight: Schedule = 0.0,
        clip_grad: float | None = 3.0,
        freeze_last_layer: int = 1,
        amp: bool = False,
        amp_dtype: torch.dtype | str = torch.bfloat16,
        handlers: Sequence | None = None,
        epoch_length: int | None = None,
        global_key: str = "global_crops",
        local_key: str = "local_crops",
        prior_key: str = "global_priors",
        iteration_update: Callable | None = None,
        clip_mode: str = "global",
    ) -> None:
        super().__init__(
            device,
            max_epochs,
            train_data_loader,
            student,
            optimizer,
            teacher=teacher,
            lr_schedule=lr_schedule,
            wd_schedule=wd_schedule,
            momentum_schedule=momentum_schedule,
            clip_grad=clip_grad,
            clip_mode=clip_mode,
            freeze_last_layer=freeze_last_layer,
            amp=amp,
            amp_dtype=amp_dtype,
            epoch_length=epoch_length,
            iteration_update=iteration_update,
        )
        self.student = student
        self.dino_loss = dino_loss
        self.prior_loss = prior_loss
        self.prior_weight = prior_weight
        self.sar_loss = sar_loss
        self.sar_weight = sar_weight
        self.global_key, self.local_key, self.prior_key = global_key, local_key, prior_key
        self.attach_handlers(handlers)

    # ------------------------------------------------------------------ helpers
    def _views(self, batch: dict, key: str) -> list[torch.Tensor]:
        """(B, V, C, *S) -> list of V tensors (B, C, *S) on the device."""
        x = batch.get(key)
        if x is None or x.shape[1] == 0:
            return []
        x = torch.as_tensor(x).to(self.state.device, non_blocking=True)
        return [x[:, v] for v in range(x.shape[1])]

    # ------------------------------------------------------------------ iteration
    def _iteration(self, engine: SelfDistillationTrainer, batchdata: dict[str, Any]) -> list[dict[str, float]]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        it = engine.state.iteration - 1
        epoch = engine.state.epoch - 1  # 0-based, as DINO's schedules
        sched = self.begin_iteration()
        globals_ = self._views(batchdata, self.global_key)
        locals_ = self._views(batchdata, self.local_key)
        if not globals_:
            raise TrainingError(f"batch has no '{self.global_key}' (cases: {case_ids(batchdata)})")

        w_prior = schedule_value(self.prior_weight, it) if self.prior_loss is not None else 0.0
        w_sar = schedule_value(self.sar_weight, it) if self.sar_loss is not None else 0.0
        need_attn = w_prior > 0 or w_sar > 0

        self.student.train()
        self.teacher.train()
        with self.autocast():
            with torch.no_grad():
                teacher_out = self.teacher(globals_)
            if need_attn:  # every head, in position order: the losses index heads by position
                student_out, feats = self.student(globals_ + locals_, return_attention=True)
            else:
                student_out, feats = self.student(globals_ + locals_), None
            dino = self.dino_loss(student_out.float(), teacher_out.float(), epoch)
            loss = dino
            terms = {"dino": dino}
            if w_prior > 0:
                priors = self._views(batchdata, self.prior_key)
                if not priors:
                    raise TrainingError(
                        f"prior loss is on but batch has no '{self.prior_key}' (cases: {case_ids(batchdata)})"
                    )
                prior = self.prior_loss(feats.cls_attn.float(), torch.cat(priors, 0).float(), feats.grid)
                loss = loss + w_prior * prior
                terms["prior"] = prior
            if w_sar > 0:
                sar = self.sar_loss(feats.cls_logits.float(), feats.grid)
                loss = loss + w_sar * sar
                terms["sar"] = sar

        step = self.update(loss, sched, terms, batchdata)  # checks, backward, clip, freeze, step, EMA

        out: dict[str, float] = {"loss": float(loss.detach())}
        out.update({k: float(v.detach()) for k, v in terms.items()})
        out.update(sched)
        out["w_prior"] = w_prior
        out.update(step)
        engine.state.output = [out]  # MONAI's decollated convention: batch-level values in item 0
        return engine.state.output
