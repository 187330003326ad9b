"""Attention maps as segmentations, measured during training with a MONAI evaluator.

Three parts, composed in bundle configs:

- :class:`AttentionProbe` -- a network for ``monai.engines.SupervisedEvaluator``: image (B, C, *S) ->
  CLS->patch attention of every head of the last block, upsampled to the image, (B, H, *S).
- :class:`AttentionSegMetric` -- an ignite metric fed with ``(pred, label)`` = (attention maps,
  structure masks (B, S, *S)); it keeps the per-head x per-structure AP and Dice tables; its value is
  the mean AP over structures of the head that stands for each structure (the assigned head when
  heads are assigned, else the best head).
- :class:`AttentionSegReport` -- an evaluator handler that turns the tables into scalar metrics
  (``ap/<structure>/assigned``, ``ap/<structure>/best_free``, ``ap/<structure>/best``, ``dice/...``)
  that MLflow / stats handlers log, writes ``summary_epoch=N.json`` and ``latest_summary.json``,
  and an overlay PNG of the first validation images per epoch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from torch import nn

from medspan.eval.attention_seg import (
    attention_ap,
    attention_dice,
    attention_to_maps,
    summarize_heads,
)
from medspan.eval.overlay import attention_overlay
from medspan.io import write_json_atomic

__all__ = ["AttentionProbe", "AttentionSegMetric", "AttentionSegReport", "head_map"]

logger = logging.getLogger(__name__)


def head_map(head_structures: Mapping[Any, str] | None, structures: Sequence[str]) -> dict[int, int]:
    """Turn ``{"0": "left_lung", ...}`` (JSON-friendly) into ``{0: index of left_lung in structures}``.

    Raises:
        ValueError: a structure name that is not in ``structures``.
    """
    out: dict[int, int] = {}
    for h, name in (head_structures or {}).items():
        if name is None:
            continue
        if name not in structures:
            raise ValueError(f"head {h} is assigned unknown structure {name!r}; known: {list(structures)}")
        out[int(h)] = list(structures).index(name)
    return out


class AttentionProbe(nn.Module):
    """Last-block CLS->patch attention of every head, upsampled to the input size.

    Args:
        backbone: a :class:`medspan.models.vit.VisionTransformer` (or a module with a ``backbone`` attribute).

    Shapes: input (B, C, *S) -> output (B, H, *S), each map a distribution over patches resampled.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = getattr(backbone, "backbone", backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone.forward_features(x, return_attention=True)
        return attention_to_maps(out.cls_attn.float(), out.grid, tuple(x.shape[2:]))


class AttentionSegMetric(Metric):
    """Per-head x per-structure AP and Dice of attention maps, averaged over images.

    Args:
        structures: structure names, in the order of the label channels.
        head_to_structure: head index -> structure index (empty for plain DINO).
        dice_mass: attention mass kept when thresholding for Dice (DINO protocol: 0.6).
        output_transform: maps the engine output to ``(pred (B, H, *S), label (B, S, *S))``.
    """

    def __init__(
        self,
        structures: Sequence[str],
        head_to_structure: Mapping[int, int] | None = None,
        dice_mass: float = 0.6,
        output_transform: Callable = lambda x: (x["pred"], x["label"]),
    ) -> None:
        self.structures = list(structures)
        self.head_to_structure = dict(head_to_structure or {})
        self.dice_mass = dice_mass
        self.ap_table: torch.Tensor | None = None
        self.dice_table: torch.Tensor | None = None
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._ap_sum = self._ap_n = self._dice_sum = self._dice_n = None

    def update(self, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        maps, masks = output
        maps = torch.as_tensor(maps).detach().float().cpu()
        masks = torch.as_tensor(masks).detach().cpu() > 0.5
        if masks.shape[1] != len(self.structures):
            raise ValueError(
                f"validation label has {masks.shape[1]} channels but {len(self.structures)} structures are "
                f"named ({self.structures})"
            )
        for b in range(maps.shape[0]):
            ap = attention_ap(maps[b : b + 1], masks[b : b + 1])
            dice = attention_dice(maps[b : b + 1], masks[b : b + 1], mass=self.dice_mass)
            if self._ap_sum is None:
                self._ap_sum = torch.zeros_like(ap, dtype=torch.float64)
                self._ap_n = torch.zeros_like(ap, dtype=torch.float64)
                self._dice_sum = torch.zeros_like(dice, dtype=torch.float64)
                self._dice_n = torch.zeros_like(dice, dtype=torch.float64)
            ok = ~torch.isnan(ap)
            self._ap_sum += torch.where(ok, ap, 0).double()
            self._ap_n += ok.double()
            okd = ~torch.isnan(dice)
            self._dice_sum += torch.where(okd, dice, 0).double()
            self._dice_n += okd.double()

    def completed(self, engine: Engine, name: str) -> None:
        """Compute the value as ignite does, and list this metric (with its tables) in
        ``engine.state.attention_seg[name]`` for :class:`AttentionSegReport`."""
        super().completed(engine, name)
        found = getattr(engine.state, "attention_seg", None) or {}
        found[name] = self
        engine.state.attention_seg = found

    def compute(self) -> float:
        if self._ap_sum is None:
            raise RuntimeError("AttentionSegMetric needs at least one validation image")
        self.ap_table = (self._ap_sum / self._ap_n).float()  # NaN where a structure never occurs
        self.dice_table = (self._dice_sum / self._dice_n).float()
        values = []
        for s in range(len(self.structures)):
            heads = [h for h, t in self.head_to_structure.items() if t == s]
            col = self.ap_table[:, s]
            v = col[heads].nanmean() if heads else col.nan_to_num(-1).max()
            if torch.isfinite(v) and v >= 0:
                values.append(float(v))
        return float(np.mean(values)) if values else float("nan")


class AttentionSegReport:
    """Evaluator handler: scalar metrics, JSON summaries and an overlay PNG per validation.

    Args:
        metric_name: name under which :class:`AttentionSegMetric` is attached to the evaluator.
        output_dir: run directory; writes ``attention/summary_epoch=N.json``, ``latest_summary.json``,
            and ``overlays/attention_epoch=N.png``.
        n_overlay: validation images drawn in the overlay (0: no overlay).
        image_key / label_key: batch keys of the validation views.
    """

    def __init__(
        self,
        metric_name: str,
        output_dir: str | os.PathLike,
        n_overlay: int = 2,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        self.metric_name = metric_name
        self.output_dir = Path(output_dir)
        self.n_overlay = n_overlay
        self.image_key, self.label_key = image_key, label_key
        self._sample: dict[str, torch.Tensor] | None = None
        self.last_summary: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._capture)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)

    def _reset(self, engine: Engine) -> None:
        self._sample = None

    def _capture(self, engine: Engine) -> None:
        if self._sample is not None or self.n_overlay <= 0:
            return
        out = engine.state.output
        if isinstance(out, list):  # decollated
            out = {k: torch.stack([torch.as_tensor(o[k]) for o in out]) for k in ("image", "pred", "label")}
        n = self.n_overlay
        self._sample = {k: torch.as_tensor(out[k])[:n].detach().float().cpu() for k in ("image", "pred", "label")}

    def _metric(self, engine: Engine) -> AttentionSegMetric:
        metric = (getattr(engine.state, "attention_seg", None) or {}).get(self.metric_name)
        if metric is None:
            raise RuntimeError(f"no AttentionSegMetric attached to the evaluator (name {self.metric_name!r})")
        return metric

    def _report(self, engine: Engine) -> None:
        metric = self._metric(engine)
        if metric.ap_table is None:
            return
        summary = summarize_heads(metric.ap_table, metric.structures, metric.head_to_structure)
        epoch = int(engine.state.epoch)
        flat: dict[str, float] = {}
        for s_idx, name in enumerate(metric.structures):
            info = summary[name]
            for tag in ("assigned", "best_free", "best"):
                v = info.get(f"{tag}_ap")
                if v is not None and np.isfinite(v):
                    flat[f"ap/{name}/{tag}"] = float(v)
            h = info.get("assigned_head")
            if h is not None and metric.dice_table is not None:
                flat[f"dice/{name}/assigned"] = float(metric.dice_table[h, s_idx])
            if metric.dice_table is not None:
                col = metric.dice_table[:, s_idx].nan_to_num(-1)
                flat[f"dice/{name}/best"] = float(col.max())
        engine.state.metrics.update(flat)
        record = {
            "epoch": epoch,
            "structures": metric.structures,
            "head_to_structure": {str(k): metric.structures[v] for k, v in metric.head_to_structure.items()},
            "ap_table": metric.ap_table.tolist(),
            "dice_table": metric.dice_table.tolist() if metric.dice_table is not None else None,
            "summary": summary,
            "key_metric": float(engine.state.metrics.get(self.metric_name, float("nan"))),
        }
        self.last_summary = record
        write_json_atomic(record, self.output_dir / "attention" / f"summary_epoch={epoch}.json")
        write_json_atomic(record, self.output_dir / "latest_summary.json")
        if self._sample is not None:
            self._overlay(metric, epoch)

    def _overlay(self, metric: AttentionSegMetric, epoch: int) -> None:
        s = self._sample
        assert s is not None
        names = {h: metric.structures[t] for h, t in metric.head_to_structure.items()}
        n_heads = s["pred"].shape[1]
        titles = [f"head {h}" + (f": {names[h]}" if h in names else " (free)") for h in range(n_heads)]
        for i in range(s["image"].shape[0]):
            path = self.output_dir / "overlays" / f"attention_epoch={epoch}_img{i}.png"
            try:
                attention_overlay(s["image"][i].numpy(), s["pred"][i].numpy(), s["label"][i].numpy(), titles, path)
            except Exception as e:  # an overlay must never stop training
                logger.warning("overlay %s failed: %s", path, e)
