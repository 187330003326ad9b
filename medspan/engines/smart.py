"""SMARTFormer (DAGMaN) pretraining engine on MONAI engines.

:class:`SmartTrainer` is a :class:`medspan.engines.step.StepTrainer` (a :class:`monai.engines.Trainer`,
an ignite ``Engine``), a sibling of :class:`medspan.engines.pretrain.SelfDistillationTrainer` sharing
its update step and schedules. One iteration, for two views u and v of a CT crop:

1. **noisy teacher** (EMA of the student, no gradient): patch dropout (:class:`~medspan.ssl.teacher.PatchDropout`)
   zeroes a random ``ratio`` of each view's input patch tokens -> û, v̂; one batched forward gives the
   teacher's SA-branch attention, CLS / pooled / patch projections of both views;
2. **attention-guided mask** on the stage-3 grid from the teacher's head-averaged CLS attention on û
   (:class:`~medspan.ssl.masking.MaskingPolicy`: top ``ratio`` cells, ``hint`` of them visible), mapped to
   the input patch grid; the student sees ũ (masked patch embeddings replaced by its mask token);
3. **losses** (:mod:`medspan.losses.smart`): ``w_rec * L1(masked voxels of u)`` + ``w_ampd *``
   masked patch-token distillation teacher(û) -> student(ũ) + ``w_aitd *`` SA-CLS distillation
   teacher(v̂) -> student(ũ) + ``w_gitd *`` pooled stage-4 distillation teacher(v̂) -> student(ũ)
   [+ ``w_prior *`` SPAN prior on the student's SA heads (3D priors cropped with the views)];
   with ``symmetric=True`` the student also sees ṽ and the roles swap (twice the student cost);
4. the shared update (:class:`medspan.engines.step.TrainStep`): backward, gradient clipping (global
   norm, or per parameter with ``clip_mode="per_param"``), the DINO heads' last layers frozen during
   the first epochs, AdamW step (per-iteration LR / weight-decay schedules), EMA update of the
   teacher; then the centres of the three distillation losses are updated from all the teacher's
   outputs of the step.

Batches (collated by MONAI's ``DataLoader`` from :class:`medspan.data.ct_views.RandCropViewsd`)::

    views        (B, V>=2, C, *S)   the crops u, v (intensity in [0, 1])
    view_priors  (B, V, P, *S)      priors cropped with the same boxes (only with a prior loss)
    case_id      list[str]          optional, named in error messages

A non-finite loss, gradient or weight stops the run with :class:`~medspan.errors.TrainingError`
naming the epoch, the iteration, the first offending tensors and the cases, before any checkpoint or
export handler of that iteration / epoch runs; checkpoints of earlier epochs stay intact.

Example::

    trainer = SmartTrainer(device, 10, loader, student, teacher, opt, DistillCE(K), DistillCE(K), DistillCE(K),
                           masking=MaskingPolicy("attention"), noise=PatchDropout(0.7), momentum_schedule=mom)
    trainer.run()
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from medspan.engines.dist import is_main_rank
from medspan.engines.step import Schedule, StepTrainer, case_ids, schedule_value, unwrap
from medspan.errors import TrainingError
from medspan.io import write_json_atomic
from medspan.losses.smart import DistillCE, masked_l1
from medspan.ssl.masking import MaskingPolicy, upsample_mask
from medspan.ssl.teacher import PatchDropout

__all__ = ["DEFAULT_WEIGHTS", "LOSS_TERMS", "LossTermAverager", "SmartTrainer", "format_losses"]

logger = logging.getLogger(__name__)

LOSS_TERMS: tuple[str, ...] = ("rec", "ampd", "aitd", "gitd", "prior", "sar")
"""Names of the loss terms in the iteration output (AMIP is ``rec``)."""

DEFAULT_WEIGHTS: dict[str, float] = {"rec": 1.0, "ampd": 0.1, "aitd": 0.1, "gitd": 0.1}
"""DAGMaN's weights: reconstruction 1, the three distillation terms 0.1 each."""


class SmartTrainer(StepTrainer):
    """SMARTFormer pretraining: noisy EMA teacher, attention-guided masking, four loss terms.

    Args:
        device: where to train.
        max_epochs: number of epochs.
        train_data_loader: yields view batches (module docstring).
        student: :class:`medspan.models.swin_ca.SmartFormer`, trained (may be DDP-wrapped).
        teacher: a copy of the student (:func:`medspan.ssl.teacher.copy_teacher`), moved by EMA only.
        optimizer: optimizer over ``param_groups(student)``.
        patch_loss, cls_loss, global_loss: :class:`~medspan.losses.smart.DistillCE` of AMPD,
            AITD and GITD (their centres are state to checkpoint).
        masking: how the student's stage-3 mask is chosen (``"attention"`` or ``"random"``).
        noise: the teacher's patch dropout (None or ratio 0: a clean teacher).
        lr_schedule, wd_schedule, momentum_schedule: per-iteration schedules (arrays) or constants.
        weights: loss weights ``{"rec", "ampd", "aitd", "gitd"}`` (missing keys: DAGMaN's values).
        prior_loss: optional :class:`medspan.losses.span.SpanPriorLoss` on the student's
            SA-branch CLS attention (3D SPAN); ``prior_weight`` its weight (scalar or schedule).
        sar_loss: optional :class:`medspan.losses.spatial_entropy.SpatialEntropyLoss` (SAR) on the
            student's SA-branch CLS->token attention **logits** on the stage-3 grid (26-connectivity
            in 3D); ``sar_weight`` its weight (scalar or per-iteration schedule, e.g.
            :func:`~medspan.losses.spatial_entropy.sar_schedule`).
        symmetric: also train the student on the second view (roles of u and v swapped).
        clip_grad: max gradient norm (None: off).
        clip_mode: ``"global"`` (one norm over all gradients, the default) or ``"per_param"`` (each
            parameter's gradient clipped on its own, as DINO); see :class:`medspan.engines.step.TrainStep`.
        freeze_last_layer: epochs during which the heads' ``last_layer`` gets no update.
        amp: autocast (bf16 by default) on CUDA; ignored on CPU.
        handlers: MONAI / ignite handlers to attach.
        epoch_length: iterations per epoch (default ``len(train_data_loader)``).
        view_key / prior_key: batch keys.
        keep_preview: keep the first sample of the last step (input, masks, reconstruction) for
            :class:`medspan.engines.smart_validation.ReconstructionPreview`.

    The iteration output (``engine.state.output[0]``) holds ``loss`` and the terms of
    :data:`LOSS_TERMS` that are on, their weighted sum being ``loss``, plus ``lr``, ``wd``,
    ``momentum``, ``mask_fraction`` (masked voxels / voxels), ``noise_fraction`` and ``grad_norm``.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        student: nn.Module,
        teacher: nn.Module,
        optimizer: torch.optim.Optimizer,
        patch_loss: DistillCE,
        cls_loss: DistillCE,
        global_loss: DistillCE,
        masking: MaskingPolicy | None = None,
        noise: PatchDropout | None = None,
        lr_schedule: Schedule | None = None,
        wd_schedule: Schedule | None = None,
        momentum_schedule: Schedule | None = 0.996,
        weights: Mapping[str, float] | None = None,
        prior_loss: nn.Module | None = None,
        prior_weight: Schedule = 0.0,
        sar_loss: nn.Module | None = None,
        sar_weight: Schedule = 0.0,
        symmetric: bool = False,
        clip_grad: float | None = 3.0,
        freeze_last_layer: int = 1,
        amp: bool = False,
        amp_dtype: torch.dtype | str = torch.bfloat16,
        handlers: Sequence | None = None,
        epoch_length: int | None = None,
        view_key: str = "views",
        prior_key: str = "view_priors",
        keep_preview: bool = True,
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
        self.patch_loss, self.cls_loss, self.global_loss = patch_loss, cls_loss, global_loss
        self.masking = masking if masking is not None else MaskingPolicy("attention")
        self.noise = noise
        unknown = set(weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; known: {sorted(DEFAULT_WEIGHTS)}")
        self.weights = {**DEFAULT_WEIGHTS, **{k: float(v) for k, v in (weights or {}).items()}}
        self.prior_loss, self.prior_weight = prior_loss, prior_weight
        self.sar_loss, self.sar_weight = sar_loss, sar_weight
        self.symmetric = bool(symmetric)
        self.view_key, self.prior_key = view_key, prior_key
        self.keep_preview = bool(keep_preview)
        self.preview: dict[str, torch.Tensor] | None = None
        self.attach_handlers(handlers)

    # ------------------------------------------------------------------ helpers

    def _views(self, batch: Mapping, key: str, what: str) -> torch.Tensor:
        x = batch.get(key)
        if x is None:
            raise TrainingError(f"batch has no '{key}' ({what}; cases: {case_ids(batch)})")
        x = torch.as_tensor(x).to(self.state.device, non_blocking=True)
        if x.ndim < 4 or x.shape[1] < 2:
            raise TrainingError(
                f"'{key}' must be (B, V>=2, C, *spatial), got {tuple(x.shape)} (cases: {case_ids(batch)})"
            )
        return x.float()

    # ------------------------------------------------------------------ iteration
    def _iteration(self, engine: SmartTrainer, batchdata: dict[str, Any]) -> list[dict[str, float]]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        it = engine.state.iteration - 1
        epoch = engine.state.epoch - 1  # 0-based, as DINO's schedules
        sched = self.begin_iteration()
        views = self._views(batchdata, self.view_key, "the two crops of each volume")
        u, v = views[:, 0], views[:, 1]
        b = u.shape[0]
        backbone = unwrap(self.student).backbone
        patch_grid, grid3 = backbone.grids(u.shape[2:])
        dev = self.state.device
        w_prior = schedule_value(self.prior_weight, it) if self.prior_loss is not None else 0.0
        w_sar = schedule_value(self.sar_weight, it) if self.sar_loss is not None else 0.0

        self.student.train()
        self.teacher.train()
        with self.autocast():
            # 1. noisy teacher on both views, one batched forward
            with torch.no_grad():
                drop = self.noise(2 * b, patch_grid, dev) if self.noise is not None else None
                t = self.teacher(torch.cat([u, v]), token_mask=drop, mask_mode="zero", recon=False)
            # first step only (with init_center): start each centre from the teacher's batch mean
            self.patch_loss.prime_center(t.patch_proj.reshape(-1, t.patch_proj.shape[-1]).float())
            self.cls_loss.prime_center(t.cls_proj.float())
            self.global_loss.prime_center(t.global_proj.float())
            t_attn = t.features.cls_attn.float().mean(1)  # (2B, N3) head-averaged
            # 2. attention-guided (or random) masks of the student views
            s_idx = [0, 1] if self.symmetric else [0]
            masks = [self.masking(t_attn[i * b : (i + 1) * b], b, grid3, dev) for i in s_idx]
            m3 = torch.cat(masks)  # (Bs, *grid3)
            x_s = torch.cat([views[:, i] for i in s_idx])
            token_mask = upsample_mask(m3, backbone.stage3_factor)
            s = self.student(x_s, token_mask=token_mask, mask_mode="token")

            def teacher_rows(out: torch.Tensor, which: list[int]) -> torch.Tensor:
                return torch.cat([out[i * b : (i + 1) * b] for i in which])

            same, other = s_idx, [1 - i for i in s_idx]
            voxel_mask = upsample_mask(m3, backbone.patch_size * backbone.stage3_factor)
            terms: dict[str, torch.Tensor] = {}
            terms["rec"] = masked_l1(s.recon, x_s, voxel_mask)
            terms["ampd"] = self.patch_loss(
                s.patch_proj, teacher_rows(t.patch_proj, same), epoch, mask=m3.flatten(1), update_center=False
            )
            terms["aitd"] = self.cls_loss(s.cls_proj, teacher_rows(t.cls_proj, other), epoch, update_center=False)
            terms["gitd"] = self.global_loss(
                s.global_proj, teacher_rows(t.global_proj, other), epoch, update_center=False
            )
            loss = sum(self.weights[k] * terms[k] for k in ("rec", "ampd", "aitd", "gitd"))
            if w_prior > 0:
                pri = self._views(batchdata, self.prior_key, "priors cropped with the views (prior loss is on)")
                priors = torch.cat([pri[:, i] for i in s_idx])
                terms["prior"] = self.prior_loss(s.features.cls_attn.float(), priors, s.features.grid)
                loss = loss + w_prior * terms["prior"]
            if w_sar > 0:
                terms["sar"] = self.sar_loss(s.features.cls_logits.float(), s.features.grid)
                loss = loss + w_sar * terms["sar"]

        step = self.update(loss, sched, terms, batchdata)  # checks, backward, clip, freeze, step, EMA
        with torch.no_grad():  # centres from every teacher output of the step (both views)
            self.patch_loss.update_center(t.patch_proj.reshape(-1, t.patch_proj.shape[-1]).float())
            self.cls_loss.update_center(t.cls_proj.float())
            self.global_loss.update_center(t.global_proj.float())

        if self.keep_preview:
            self.preview = {
                "image": x_s[0].detach(),
                "teacher_drop": (drop[0] if drop is not None else torch.zeros(patch_grid, dtype=torch.bool)).detach(),
                "teacher_attn": t_attn[0].detach().reshape(grid3),
                "mask": voxel_mask[0].detach(),
                "recon": s.recon[0].detach().float(),
                "patch_size": torch.tensor(backbone.patch_size),
            }
        out: dict[str, float] = {"loss": float(loss.detach())}
        out.update({k: float(v.detach()) for k, v in terms.items()})
        out.update(sched)
        out["w_prior"] = w_prior
        out["mask_fraction"] = float(voxel_mask.float().mean())
        out["noise_fraction"] = float(drop.float().mean()) if drop is not None else 0.0
        out.update(step)
        engine.state.output = [out]  # MONAI's decollated convention: batch-level values in item 0
        return engine.state.output


class LossTermAverager:
    """Mean of each loss term over every epoch; ``history`` is a list of ``{"epoch", term: mean}``.

    Also writes ``losses.json`` into ``output_dir`` (if given) after every epoch and puts the means
    into ``engine.state.metrics`` as ``epoch/<term>`` (so stats / MLflow handlers can log them).

    Args:
        keys: iteration-output entries to average (missing ones are skipped).
        output_dir: run folder.
    """

    def __init__(
        self, keys: Sequence[str] = ("loss", *LOSS_TERMS), output_dir: str | os.PathLike | None = None
    ) -> None:
        self.keys = tuple(keys)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.history: list[dict[str, float]] = []
        self._sum: dict[str, float] = {}
        self._n = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        self._sum, self._n = {}, 0
        if self.output_dir is not None and not self.history and (self.output_dir / "losses.json").is_file():
            try:  # a resumed run continues the history
                saved = json.loads((self.output_dir / "losses.json").read_text())
                self.history = [h for h in saved if h.get("epoch", 0) < engine.state.epoch]
            except (OSError, ValueError):
                pass

    def _update(self, engine: Engine) -> None:
        out = engine.state.output
        out = out[0] if isinstance(out, (list, tuple)) else out
        for k in self.keys:
            if k in out:
                self._sum[k] = self._sum.get(k, 0.0) + float(out[k])
        self._n += 1

    def _complete(self, engine: Engine) -> None:
        if not self._n:
            return
        means = {k: v / self._n for k, v in self._sum.items()}
        self.history.append({"epoch": int(engine.state.epoch), **means})
        engine.state.metrics.update({f"epoch/{k}": v for k, v in means.items()})
        if self.output_dir is not None:
            if is_main_rank():
                write_json_atomic(self.history, self.output_dir / "losses.json")


def format_losses(means: Mapping[str, float], weights: Mapping[str, float] | None = None) -> str:
    """Fixed-width table of per-term loss means (and weighted contributions)."""
    names = {
        "rec": "AMIP masked-voxel L1",
        "ampd": "AMPD patch distillation",
        "aitd": "AITD SA-CLS distillation",
        "gitd": "GITD pooled-token distillation",
        "prior": "SPAN prior (SA heads)",
        "sar": "SAR spatial entropy (SA heads)",
        "loss": "total",
    }
    rows = []
    for k in (*LOSS_TERMS, "loss"):
        if k not in means:
            continue
        w = "" if weights is None or k not in weights else f"{weights[k]:g}"
        contrib = "" if not w else f"{weights[k] * means[k]:.4f}"
        rows.append([k, names.get(k, k), f"{means[k]:.4f}", w, contrib])
    head = ["term", "what", "mean", "weight", "weighted"]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows])
