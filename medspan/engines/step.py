"""One optimisation step, shared by every medspan trainer.

:class:`TrainStep` is the update that follows a trainer's forward pass and loss. In order:

1. **loss check**: a non-finite loss raises :class:`~medspan.errors.TrainingError` (nothing changed);
2. ``optimizer.zero_grad(set_to_none=True)``, ``loss.backward()``;
3. **gradient check**: one norm over all gradients (``torch.nn.utils.get_total_norm``); if it is
   not finite the step raises, naming the first tensors with a non-finite gradient. The optimizer
   has not stepped, so the weights are still the good ones;
4. **clipping** (``clip_grad`` set) with ``clip_mode``:

   * ``"global"``: one norm over all gradients, all scaled by ``min(1, clip / (norm + 1e-6))``
     (``torch.nn.utils.clip_grad_norm_``; medspan's behaviour until now, the default);
   * ``"per_param"``: each parameter's gradient scaled by ``min(1, clip / (‖g_p‖ + 1e-6))``
     on its own (DINO's ``utils.clip_gradients``);

5. **last-layer freeze**: during the first ``freeze_last_layer`` epochs the gradients of the
   parameters whose name contains ``last_layer_key`` are dropped (DINO's
   ``cancel_gradients_last_layer``; after clipping, as in DINO);
6. ``optimizer.step()``;
7. **EMA teacher** (when a teacher is given): ``t = m t + (1 - m) s`` (:func:`medspan.ssl.teacher.ema_update`);
8. **weight check**: the student's parameters (and the teacher's) must be finite, else the step
   raises, naming the first non-finite tensors. The error is raised inside the iteration, so no
   handler of this iteration or epoch (checkpoint, weight export) runs: non-finite weights are
   never saved by the engine.

Supervised trainers use it without a teacher and without the freeze (``TrainStep(model, opt,
clip_grad=1.0)``). Every message names the epoch and iteration (ignite's 1-based counters), the
loss terms, the cases of the batch when the trainer passes them, and what to try.

Example::

    step = TrainStep(student, optimizer, teacher=teacher, clip_grad=3.0, freeze_last_layer=1)
    out = step(loss, epoch=engine.state.epoch, iteration=engine.state.iteration,
               momentum=0.996, terms={"dino": dino}, cases="cxr_001, cxr_002")
    out["grad_norm"]   # the global gradient norm before clipping
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.engines import Trainer
from torch import Tensor, nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from medspan.errors import TrainingError
from medspan.ssl.teacher import ema_update

__all__ = [
    "CLIP_MODES",
    "Schedule",
    "StepTrainer",
    "TrainStep",
    "apply_schedules",
    "case_ids",
    "clip_gradients",
    "non_finite_tensors",
    "param_groups",
    "schedule_value",
    "unwrap",
]

CLIP_MODES: tuple[str, ...] = ("global", "per_param")
"""Gradient clipping modes: one norm over all gradients (medspan's default), or DINO's per parameter."""

_EPS = 1e-6  # torch's clip_grad_norm_ and DINO's clip_gradients both add it to the norm

Schedule = float | Sequence[float] | np.ndarray
"""A per-iteration schedule (one value per iteration, the last one kept beyond its end) or a constant."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper (the model itself otherwise)."""
    return getattr(model, "module", model)


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float, mode: str = "global") -> Tensor:
    """Clip the gradients of ``parameters`` in place; return the global gradient norm before clipping.

    Args:
        parameters: the parameters (those without a gradient are skipped).
        max_norm: the largest norm allowed (the global norm, or each parameter's with ``"per_param"``).
        mode: ``"global"``: all gradients scaled by ``min(1, max_norm / (total + 1e-6))`` with
            ``total = ‖(‖g_1‖, ..., ‖g_P‖)‖`` (torch's ``clip_grad_norm_``); ``"per_param"``: each
            gradient ``g_p`` scaled by ``min(1, max_norm / (‖g_p‖ + 1e-6))`` (DINO's ``clip_gradients``).

    Returns:
        0-dim tensor, the L2 norm of all gradients together before clipping.

    Example:
        >>> a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
        >>> a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([1.0])      # norms 5 and 1
        >>> round(float(clip_gradients([a, b], 2.0, "per_param")) ** 2, 4)      # 5^2 + 1^2, before clipping
        26.0
        >>> [round(float(p.grad.norm()), 4) for p in (a, b)]                     # 5 -> 2; 1 stays
        [2.0, 1.0]
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {mode!r}")
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    total = get_total_norm(grads)
    _clip_with_norm(params, grads, float(max_norm), mode, total)
    return total


def _clip_with_norm(params: Sequence[nn.Parameter], grads: Sequence[Tensor], max_norm: float, mode: str,
                    total: Tensor) -> None:
    if mode == "global":
        clip_grads_with_norm_(params, max_norm, total)
        return
    for p, g in zip(params, grads):  # per parameter, as DINO
        coef = max_norm / (torch.linalg.vector_norm(g) + _EPS)
        p.grad.mul_(coef.clamp(max=1.0))


def non_finite_tensors(named: Iterable[tuple[str, Tensor | None]], limit: int = 3) -> tuple[list[str], int]:
    """Names of the first ``limit`` tensors holding a NaN or an infinity, and how many do.

    Args:
        named: ``(name, tensor)`` pairs (``None`` tensors, e.g. a missing gradient, are skipped).
        limit: how many names to return.

    Returns:
        ``(first names in the given order, number of non-finite tensors)``.
    """
    names: list[str] = []
    count = 0
    for name, t in named:
        if t is None or bool(torch.isfinite(t).all()):
            continue
        count += 1
        if len(names) < limit:
            names.append(name)
    return names, count


class TrainStep:
    """The update of one iteration: checks, backward, clipping, freeze, optimizer step, EMA teacher.

    Args:
        model: the trained network (the student; may be DDP-wrapped).
        optimizer: its optimizer.
        teacher: an EMA copy of ``model`` (unwrapped), updated after the step; None: no teacher.
        clip_grad: max gradient norm; None or 0: no clipping (the gradients are still checked).
        clip_mode: ``"global"`` (default, one norm over all gradients) or ``"per_param"`` (DINO).
        freeze_last_layer: number of first epochs in which parameters named ``*last_layer_key*``
            get no update (0: never).
        last_layer_key: the name part that marks those parameters.
        max_named: how many offending tensors an error message names.

    ``step(loss, epoch, iteration, momentum=None, terms=None, cases=None) -> dict`` runs the
    update (see the module docstring) and returns ``{"grad_norm": global norm before clipping}``.
    ``epoch`` and ``iteration`` are ignite's 1-based counters (``engine.state.epoch`` / ``.iteration``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        teacher: nn.Module | None = None,
        clip_grad: float | None = None,
        clip_mode: str = "global",
        freeze_last_layer: int = 0,
        last_layer_key: str = "last_layer",
        max_named: int = 3,
    ) -> None:
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
        if clip_grad is not None and clip_grad < 0:
            raise ValueError(f"clip_grad must be >= 0 or None, got {clip_grad}")
        if freeze_last_layer < 0:
            raise ValueError(f"freeze_last_layer must be >= 0, got {freeze_last_layer}")
        self.model = model
        self.optimizer = optimizer
        self.teacher = teacher
        self.clip_grad = float(clip_grad) if clip_grad else None
        self.clip_mode = clip_mode
        self.freeze_last_layer = int(freeze_last_layer)
        self.last_layer_key = last_layer_key
        self.max_named = int(max_named)

    # ------------------------------------------------------------------ messages
    def _where(self, epoch: int, iteration: int, terms: Mapping[str, Tensor | float] | None, cases: str | None) -> str:
        where = f"epoch {epoch}, iteration {iteration}"
        if terms:
            where += " (" + ", ".join(f"{k}={float(torch.as_tensor(v).detach()):.4g}" for k, v in terms.items()) + ")"
        if cases:
            where += f"; cases: {cases}"
        return where

    def _advice(self) -> str:
        lrs = sorted({float(g["lr"]) for g in self.optimizer.param_groups})
        lr = ", ".join(f"{v:.4g}" for v in lrs)
        clip = f"clip_grad={self.clip_grad:g} ({self.clip_mode})" if self.clip_grad else "no gradient clipping"
        return f"Try a lower learning rate (lr now {lr}; {clip}) or check the batch."

    def _raise_non_finite(self, what: str, named: list[tuple[str, Tensor | None]], where: str, after: str) -> None:
        names, count = non_finite_tensors(named, self.max_named)
        if not count:  # the norm overflowed but every value is finite: nothing to refuse
            return
        more = f" (first: {', '.join(names)})"
        raise TrainingError(
            f"non-finite {what} at {where}: {count} of {len(named)} tensors{more}. {after} {self._advice()}"
        )

    # ------------------------------------------------------------------ the step
    def __call__(
        self,
        loss: Tensor,
        *,
        epoch: int,
        iteration: int,
        momentum: float | None = None,
        terms: Mapping[str, Tensor | float] | None = None,
        cases: str | None = None,
    ) -> dict[str, float]:
        """Run the update for ``loss`` (0-dim tensor with a graph to the model's parameters).

        Args:
            loss: the total loss of the iteration.
            epoch: ignite's 1-based epoch (the freeze applies while ``epoch <= freeze_last_layer``).
            iteration: ignite's 1-based iteration (named in errors).
            momentum: the teacher's EMA momentum (required when there is a teacher).
            terms: the loss terms, named in the error messages.
            cases: the batch's case ids, named in the error messages.

        Returns:
            ``{"grad_norm": float}``, the global gradient norm before clipping.

        Raises:
            TrainingError: non-finite loss, gradients (the optimizer did not step) or weights.
        """
        if self.teacher is not None and momentum is None:
            raise ValueError("TrainStep with a teacher needs the EMA momentum")
        if not torch.isfinite(loss):
            where = self._where(epoch, iteration, terms, cases)
            raise TrainingError(
                f"non-finite loss at {where}. Training stopped before the optimizer step; the weights, the "
                f"checkpoints and the exported model are unchanged. {self._advice()}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

        named = [(n, p) for n, p in unwrap(self.model).named_parameters() if p.grad is not None]
        grads = [p.grad for _, p in named]
        total = get_total_norm(grads) if grads else torch.zeros(())
        grad_norm = float(total)  # the step's one host sync for the gradients
        if not math.isfinite(grad_norm):
            self._raise_non_finite(
                "gradients", [(n, p.grad) for n, p in named], self._where(epoch, iteration, terms, cases),
                "Training stopped before the optimizer step; the weights are unchanged and nothing of this "
                "iteration was saved.",
            )
        if self.clip_grad:
            _clip_with_norm([p for _, p in named], grads, self.clip_grad, self.clip_mode, total)
        if epoch <= self.freeze_last_layer:
            for n, p in named:
                if self.last_layer_key in n:
                    p.grad = None
        self.optimizer.step()
        if self.teacher is not None:
            ema_update(unwrap(self.model), self.teacher, float(momentum))
        self._check_weights(epoch, iteration, terms, cases)
        return {"grad_norm": grad_norm}

    def _check_weights(self, epoch: int, iteration: int, terms: Mapping[str, Tensor | float] | None,
                       cases: str | None) -> None:
        """Raise if the student's (or the teacher's) parameters hold a NaN or an infinity."""
        student = list(unwrap(self.model).named_parameters())
        teacher = [] if self.teacher is None else list(self.teacher.named_parameters())
        norms = [get_total_norm([p.detach() for _, p in group]) for group in (student, teacher) if group]
        if not norms or bool(torch.isfinite(torch.stack(norms)).all()):  # one host sync
            return
        where = self._where(epoch, iteration, terms, cases)
        after = ("Training stopped before any checkpoint or exported model of this iteration and epoch was "
                 "written; checkpoints of earlier epochs are kept.")
        self._raise_non_finite("student weights after the optimizer step", student, where, after)
        self._raise_non_finite("teacher weights after the EMA update", teacher, where, after)


# ---------------------------------------------------------------------- schedules and batches
def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Split parameters into a weight-decayed group and a group without decay (biases, norms, tokens).

    Args:
        model: the trained network (e.g. backbone + head).

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


def schedule_value(schedule: Schedule | None, index: int, default: float = 0.0) -> float:
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
    lr_schedule: Schedule | None,
    wd_schedule: Schedule | None,
    momentum_schedule: Schedule | None,
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


# ---------------------------------------------------------------------- the trainers' base
class StepTrainer(Trainer):
    """A :class:`monai.engines.Trainer` whose iterations end in the shared :class:`TrainStep`.

    Subclasses implement ``_iteration(engine, batch)``: call :meth:`begin_iteration` (schedules),
    compute the loss, then :meth:`update` (the step) and return the output dict list.

    Args:
        device: where to train.
        max_epochs: number of epochs.
        train_data_loader: the batches.
        network: the trained network (may be DDP-wrapped); MONAI handlers find it as ``network``.
        optimizer: its optimizer.
        teacher: an EMA copy (unwrapped) moved after each step; its gradients are switched off. None: none.
        lr_schedule, wd_schedule: per-iteration learning rate / weight decay (arrays) or constants;
            None leaves the optimizer's values.
        momentum_schedule: per-iteration EMA momentum of the teacher (ignored without a teacher).
        clip_grad, clip_mode, freeze_last_layer: as :class:`TrainStep`.
        amp: autocast (``amp_dtype``, bfloat16 by default) on CUDA; ignored on CPU.
        handlers: MONAI / ignite handlers to attach.
        epoch_length: iterations per epoch (default: ``len(train_data_loader)``).
        iteration_update: MONAI's override of ``_iteration`` (rarely needed).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        teacher: nn.Module | None = None,
        lr_schedule: Schedule | None = None,
        wd_schedule: Schedule | None = None,
        momentum_schedule: Schedule | None = 0.996,
        clip_grad: float | None = None,
        clip_mode: str = "global",
        freeze_last_layer: int = 0,
        amp: bool = False,
        amp_dtype: torch.dtype | str = torch.bfloat16,
        handlers: Sequence | None = None,
        epoch_length: int | None = None,
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
        self.network = network  # the name MONAI handlers look for
        self.optimizer = optimizer
        self.teacher = teacher
        self.lr_schedule, self.wd_schedule, self.momentum_schedule = lr_schedule, wd_schedule, momentum_schedule
        self.train_step = TrainStep(
            network,
            optimizer,
            teacher=teacher,
            clip_grad=clip_grad,
            clip_mode=clip_mode,
            freeze_last_layer=freeze_last_layer,
        )
        self.use_amp = bool(amp) and self.state.device.type == "cuda"
        self.amp_dtype = getattr(torch, amp_dtype) if isinstance(amp_dtype, str) else amp_dtype
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)

    def attach_handlers(self, handlers: Sequence | None) -> None:
        """Attach MONAI / ignite handlers (call at the end of a subclass's ``__init__``)."""
        if handlers:
            self._register_handlers(handlers)

    def autocast(self) -> torch.autocast:
        """The autocast context of the forward pass (off on CPU or with ``amp=False``)."""
        return torch.autocast(self.state.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def begin_iteration(self) -> dict[str, float]:
        """Set this iteration's learning rate and weight decay; return ``{"lr", "wd", "momentum"}``."""
        it = self.state.iteration - 1
        return apply_schedules(self.optimizer, it, self.lr_schedule, self.wd_schedule, self.momentum_schedule)

    def update(
        self, loss: Tensor, sched: Mapping[str, float], terms: Mapping[str, Tensor], batch: Mapping
    ) -> dict[str, float]:
        """The shared step on ``loss`` (see :class:`TrainStep`); returns ``{"grad_norm"}``."""
        return self.train_step(
            loss,
            epoch=self.state.epoch,
            iteration=self.state.iteration,
            momentum=sched.get("momentum") if self.teacher is not None else None,
            terms=terms,
            cases=case_ids(batch),
        )
