"""Self-distillation pretraining engine (DINO + optional anatomical attention prior) on MONAI engines.

:class:`SelfDistillationTrainer` is a :class:`monai.engines.Trainer` (hence an ignite ``Engine``):
every MONAI / ignite handler (stats, validation, MLflow, checkpoints) attaches to it as usual.
One iteration:

1. the teacher (EMA of the student, no gradient) embeds the global crops;
2. the student embeds all crops, and returns the last block's CLS->patch attention of the global crops
   with gradient;
3. ``loss = DINO(student, teacher) + w_prior * SPAN(attention, warped priors) [+ w_sar * SAR(attention logits)]``;
4. backward, gradient clipping, optimizer step (LR / weight decay from per-iteration schedules),
   the last layer of the DINO head is frozen during the first epochs, then the EMA update of the teacher.

A non-finite loss stops the run with :class:`medspan.errors.TrainingError` naming the epoch, the
iteration and the cases of the batch; checkpoints written at earlier epochs stay as they were.

Batches are dicts produced by :class:`medspan.data.multicrop.MultiCropd` and collated by MONAI's
``DataLoader``::

    global_crops  (B, n_global, C, G, G)      global views
    local_crops   (B, n_local,  C, L, L)      local views (may be absent or n_local = 0)
    global_priors (B, n_global, S, G, G)      priors warped with the global views (only with a prior loss)
    case_id       list[str]                   optional, used in error messages
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.engines import Trainer
from torch import nn

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


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Split parameters into a weight-decayed group and a group without decay (biases, norms, tokens).

    Args:
        model: the student (backbone + head).

    Returns:
        two optimizer parameter groups; the second has ``weight_decay = 0`` and the flag ``no_decay``.

    Example::

        opt = torch.optim.AdamW(param_groups(student), lr=5e-4)
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "no_decay": True}]


def schedule_value(schedule: float | Sequence[float] | np.ndarray | None, index: int, default: float = 0.0) -> float:
    """Value of a per-iteration schedule at ``index`` (clamped to its last entry); a scalar is constant."""
    if schedule is None:
        return default
    if isinstance(schedule, (int, float)):
        return float(schedule)
    n = len(schedule)
    if n == 0:
        return default
    return float(schedule[min(index, n - 1)])


def apply_schedules(
    optimizer: torch.optim.Optimizer,
    it: int,
    lr_schedule: float | Sequence[float] | np.ndarray | None,
    wd_schedule: float | Sequence[float] | np.ndarray | None,
    momentum_schedule: float | Sequence[float] | np.ndarray | None,
) -> dict[str, float]:
    """Set iteration ``it``'s learning rate (all groups) and weight decay (groups without ``no_decay``).

    Returns ``{"lr", "wd", "momentum"}`` (``lr`` / ``wd`` only when their schedule is given; the EMA
    momentum defaults to 0.996).
    """
    values: dict[str, float] = {}
    if lr_schedule is not None:
        lr = schedule_value(lr_schedule, it)
        for g in optimizer.param_groups:
            g["lr"] = lr
        values["lr"] = lr
    if wd_schedule is not None:
        wd = schedule_value(wd_schedule, it)
        for g in optimizer.param_groups:
            if not g.get("no_decay", False):
                g["weight_decay"] = wd
        values["wd"] = wd
    values["momentum"] = schedule_value(momentum_schedule, it, default=0.996)
    return values


def case_ids(batch: Mapping) -> str:
    """The first 8 ``case_id`` of a batch, for error messages (``"unknown cases"`` without ids)."""
    ids = batch.get("case_id")
    if ids is None:
        return "unknown cases"
    ids = list(ids)
    return ", ".join(map(str, ids[:8])) + (" ..." if len(ids) > 8 else "")


class SelfDistillationTrainer(Trainer):
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
        freeze_last_layer: epochs during which the last layer of the DINO head gets no update.
        amp: autocast (bfloat16 by default) on CUDA; ignored on CPU.
        amp_dtype: autocast dtype.
        handlers: MONAI / ignite handlers to attach.
        epoch_length: iterations per epoch (default: ``len(train_data_loader)``).

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
        lr_schedule: float | Sequence[float] | np.ndarray | None = None,
        wd_schedule: float | Sequence[float] | np.ndarray | None = None,
        momentum_schedule: float | Sequence[float] | np.ndarray | None = 0.996,
        prior_loss: nn.Module | None = None,
        prior_weight: float | Sequence[float] | np.ndarray = 1.0,
        sar_loss: nn.Module | None = None,
        sar_weight: float | Sequence[float] | np.ndarray = 0.0,
        clip_grad: float | None = 3.0,
        freeze_last_layer: int = 1,
        amp: bool = False,
        amp_dtype: torch.dtype | str = torch.bfloat16,
        handlers: Sequence | None = None,
        epoch_length: int | None = None,
        global_key: str = "global_crops",
        local_key: str = "local_crops",
        prior_key: str = "global_priors",
        attention_heads: Sequence[int] | None = None,
        iteration_update: Callable | None = None,
    ) -> None:
        super().__init__(
            device=torch.device(device) if isinstance(device, str) else device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            iteration_update=iteration_update,
            handlers=None,
            amp=False,
            decollate=False,
        )
        self.student = student
        self.teacher = teacher
        self.network = student  # the name MONAI handlers look for
        self.dino_loss = dino_loss
        self.optimizer = optimizer
        self.lr_schedule = lr_schedule
        self.wd_schedule = wd_schedule
        self.momentum_schedule = momentum_schedule
        self.prior_loss = prior_loss
        self.prior_weight = prior_weight
        self.sar_loss = sar_loss
        self.sar_weight = sar_weight
        self.clip_grad = clip_grad
        self.freeze_last_layer = int(freeze_last_layer)
        self.use_amp = bool(amp) and self.state.device.type == "cuda"
        self.amp_dtype = getattr(torch, amp_dtype) if isinstance(amp_dtype, str) else amp_dtype
        self.global_key, self.local_key, self.prior_key = global_key, local_key, prior_key
        self.attention_heads = None if attention_heads is None else list(attention_heads)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if handlers:
            self._register_handlers(handlers)

    # ------------------------------------------------------------------ helpers
    def _set_schedules(self, it: int) -> dict[str, float]:
        return apply_schedules(self.optimizer, it, self.lr_schedule, self.wd_schedule, self.momentum_schedule)

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
        sched = self._set_schedules(it)
        globals_ = self._views(batchdata, self.global_key)
        locals_ = self._views(batchdata, self.local_key)
        if not globals_:
            raise TrainingError(f"batch has no '{self.global_key}' (cases: {case_ids(batchdata)})")

        w_prior = schedule_value(self.prior_weight, it) if self.prior_loss is not None else 0.0
        w_sar = schedule_value(self.sar_weight, it) if self.sar_loss is not None else 0.0
        need_attn = w_prior > 0 or w_sar > 0

        self.student.train()
        self.teacher.train()
        autocast = torch.autocast(self.state.device.type, dtype=self.amp_dtype, enabled=self.use_amp)
        with autocast:
            with torch.no_grad():
                teacher_out = self.teacher(globals_)
            if need_attn:
                student_out, feats = self.student(globals_ + locals_, return_attention=True,
                                                  attn_heads=self.attention_heads)
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

        if not torch.isfinite(loss):
            bad = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
            raise TrainingError(
                f"non-finite loss at epoch {engine.state.epoch}, iteration {engine.state.iteration} ({bad}); "
                f"cases: {case_ids(batchdata)}. Training stopped; the last checkpoint written before this "
                "epoch is intact."
            )

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if self.clip_grad:
            grad_norm = float(nn.utils.clip_grad_norm_(self.student.parameters(), self.clip_grad))
        if epoch < self.freeze_last_layer:
            for name, p in self.student.named_parameters():
                if "last_layer" in name:
                    p.grad = None
        self.optimizer.step()

        from medspan.ssl.teacher import ema_update

        ema_update(self.student, self.teacher, sched["momentum"])

        out: dict[str, float] = {"loss": float(loss.detach())}
        out.update({k: float(v.detach()) for k, v in terms.items()})
        out.update(sched)
        out["w_prior"] = w_prior
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        engine.state.output = [out]  # MONAI's decollated convention: batch-level values in item 0
        return engine.state.output
