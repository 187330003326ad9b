"""Segmentation metrics per structure (MONAI Dice and HD95), and masks straight from attention heads.

* :func:`segmentation_metrics`: per structure, the mean Dice (``monai.metrics.DiceMetric``) and
  mean 95th-percentile Hausdorff distance (``monai.metrics.HausdorffDistanceMetric``), in pixels
  or in mm when a spacing is given, with the per-case values and the counts of empty cases;
* :func:`attention_masks`: the zero-label mode, each attention map upsampled to image size and
  thresholded by mass (DINO's rule, the one :func:`medspan.eval.attention_seg.attention_dice`
  uses), i.e. a mask per guided head without a single training label;
* :func:`format_seg_table`: a markdown table of a report.

Empty cases (documented once here, counted in the report):

* target empty: Dice is undefined (MONAI's ``ignore_empty``) and HD95 too; the case is left out
  of both means and counted in ``n_empty_target`` (a chest X-ray always shows both lungs and the
  heart, so this flags a labelling problem);
* prediction empty, target not: Dice is 0 and counts in the Dice mean (a total miss); HD95 is
  not finite (MONAI returns NaN or inf), so the case is left out of the HD95 mean and counted in
  ``n_empty_pred``: read the HD95 together with that count.

Example::

    >>> import torch
    >>> t = torch.zeros(1, 1, 6, 6, dtype=torch.bool); t[0, 0, 1:4, 1:4] = True
    >>> p = torch.zeros_like(t); p[0, 0, 1:4, 2:5] = True          # shifted by one column
    >>> r = segmentation_metrics(p, t, ["heart"])
    >>> round(r["structures"]["heart"]["dice"], 4), r["structures"]["heart"]["hd95"]
    (0.6667, 1.0)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from medspan.eval.attention_seg import attention_to_maps, mass_keep_mask

__all__ = ["attention_masks", "format_seg_table", "segmentation_metrics"]


def _binary(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dtype == torch.bool:
        return x
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or infinite values")
    if not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(f"{what} must be binary (bool or 0/1); threshold probabilities first")
    return x.bool()


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def segmentation_metrics(
    pred: torch.Tensor,
    target: torch.Tensor,
    structures: Sequence[str],
    spacing: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Dice and HD95 per structure, over a batch of cases.

    Args:
        pred: ``(B, S, *spatial)`` bool or 0/1 predicted masks, one channel per structure (2D or 3D).
        target: ``(B, S, *spatial)`` bool or 0/1 reference masks.
        structures: the S structure names.
        spacing: pixel spacing per spatial axis (in the order of the axes, e.g. mm); HD95 is then
            in those units, else in pixels.

    Returns:
        ``{"structures": {name: {"dice", "hd95", "dice_per_case", "hd95_per_case", "n_cases",
        "n_dice", "n_hd95", "n_empty_pred", "n_empty_target"}}, "mean_dice", "mean_hd95",
        "unit"}``. ``dice``/``hd95`` are the means over the cases where they are defined (see the
        module docstring; ``None`` if none is); per-case lists hold ``None`` where undefined.
        ``mean_dice``/``mean_hd95`` average the structures' means (``None`` if none is defined);
        ``unit`` is ``"px"`` or ``"mm"``.

    Example::

        >>> t = torch.zeros(1, 1, 6, 6); t[0, 0, 1:3, 1:3] = 1
        >>> p = torch.zeros_like(t); p[0, 0, 2:4, 2:4] = 1          # shifted one pixel diagonally
        >>> r = segmentation_metrics(p, t, ["lung"])["structures"]["lung"]
        >>> r["dice"], round(r["hd95"], 4)                          # 2*1/(4+4); 1 + 0.85 (sqrt(2) - 1)
        (0.25, 1.3521)
    """
    if pred.shape != target.shape or pred.ndim not in (4, 5):
        raise ValueError(
            f"pred and target must share one (B, S, *spatial) shape, 2D or 3D; got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if pred.shape[1] != len(structures):
        raise ValueError(f"{pred.shape[1]} channels but {len(structures)} structures {list(structures)}")
    n_dims = pred.ndim - 2
    if spacing is not None and len(spacing) != n_dims:
        raise ValueError(f"spacing needs {n_dims} values (one per spatial axis), got {list(spacing)}")
    p = _binary(pred.detach().cpu(), "pred")
    t = _binary(target.detach().cpu(), "target")
    pf, tf = p.float(), t.float()

    dice_m = DiceMetric(include_background=True, reduction="none")
    hd_m = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    with warnings.catch_warnings():  # empty masks are counted below, not warned about per case
        warnings.filterwarnings("ignore", message=r"the (ground truth|prediction) of class .* is all 0")
        warnings.filterwarnings("ignore", message=r".*always_return_as_numpy", category=FutureWarning)  # MONAI-internal
        dice = dice_m(pf, tf).to(torch.float64)  # (B, S)
        hd = (hd_m(pf, tf) if spacing is None else hd_m(pf, tf, spacing=[float(v) for v in spacing]))
        hd = hd.to(torch.float64)
    dims = tuple(range(2, pred.ndim))
    pred_any, target_any = p.any(dim=dims), t.any(dim=dims)  # (B, S)

    out: dict[str, dict[str, Any]] = {}
    for si, name in enumerate(structures):
        dice_cases: list[float | None] = []
        hd_cases: list[float | None] = []
        for b in range(p.shape[0]):
            has_t = bool(target_any[b, si])
            d, h = float(dice[b, si]), float(hd[b, si])
            dice_cases.append(d if has_t and math.isfinite(d) else None)
            hd_cases.append(h if has_t and bool(pred_any[b, si]) and math.isfinite(h) else None)
        dice_ok = [v for v in dice_cases if v is not None]
        hd_ok = [v for v in hd_cases if v is not None]
        out[str(name)] = {
            "dice": _mean(dice_ok),
            "hd95": _mean(hd_ok),
            "dice_per_case": dice_cases,
            "hd95_per_case": hd_cases,
            "n_cases": int(p.shape[0]),
            "n_dice": len(dice_ok),
            "n_hd95": len(hd_ok),
            "n_empty_pred": int((target_any[:, si] & ~pred_any[:, si]).sum()),
            "n_empty_target": int((~target_any[:, si]).sum()),
        }
    dices = [r["dice"] for r in out.values() if r["dice"] is not None]
    hds = [r["hd95"] for r in out.values() if r["hd95"] is not None]
    return {
        "structures": out,
        "mean_dice": _mean(dices),
        "mean_hd95": _mean(hds),
        "unit": "px" if spacing is None else "mm",
    }


def attention_masks(maps: torch.Tensor, size: tuple[int, int], mass: float = 0.6) -> torch.Tensor:
    """Masks from attention maps: upsample each map to ``size`` (bilinear), keep ``mass`` of it.

    The zero-label segmentation of SPAN: the map of the head guided toward a structure, upsampled
    (:func:`medspan.eval.attention_seg.attention_to_maps`, ``align_corners=False``), then the
    smallest set of its largest pixels holding ``mass`` of its mass
    (:func:`medspan.eval.attention_seg.mass_keep_mask`, ties kept, an all-zero map keeps every pixel).

    Args:
        maps: ``(B, S, h, w)`` non-negative attention, one map per structure (e.g. the CLS->patch
            attention of each structure's guided head on the ``(h, w)`` patch grid).
        size: the output size ``(H, W)`` (the image's).
        mass: the fraction of each map's mass the mask holds, in (0, 1].

    Returns:
        ``(B, S, H, W)`` bool.

    Example::

        >>> a = torch.tensor([[[[5.0, 3.0], [2.0, 0.0]]]])
        >>> attention_masks(a, (2, 2))[0, 0].tolist()          # 5 + 3 >= 60 % of 10
        [[True, True], [False, False]]
    """
    if maps.ndim != 4:
        raise ValueError(f"maps must be (B, S, h, w), got shape {tuple(maps.shape)}")
    b, s, h, w = maps.shape
    up = attention_to_maps(maps.reshape(b, s, h * w), (h, w), (int(size[0]), int(size[1])))
    return mass_keep_mask(up, mass)


def _num(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_seg_table(report: Mapping[str, Any], title: str) -> str:
    """Markdown table of a :func:`segmentation_metrics` report: one row per structure, then the mean.

    Example::

        >>> t = torch.zeros(2, 1, 6, 6, dtype=torch.bool); t[:, 0, 1:4, 1:4] = True
        >>> p = t.clone(); p[1] = False                          # case 1: nothing predicted
        >>> print(format_seg_table(segmentation_metrics(p, t, ["heart"]), "toy"))
        **toy**
        <BLANKLINE>
        | structure | Dice | HD95 (px) | cases | empty pred | empty target |
        |---|---:|---:|---:|---:|---:|
        | heart | 0.500 | 0.00 | 2 | 1 | 0 |
        | **mean** | **0.500** | 0.00 | | | |
    """
    lines = [
        f"**{title}**",
        "",
        f"| structure | Dice | HD95 ({report['unit']}) | cases | empty pred | empty target |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["structures"].items():
        lines.append(
            f"| {name} | {_num(r['dice'], 3)} | {_num(r['hd95'], 2)} | {r['n_cases']} | {r['n_empty_pred']} "
            f"| {r['n_empty_target']} |"
        )
    lines.append(f"| **mean** | **{_num(report['mean_dice'], 3)}** | {_num(report['mean_hd95'], 2)} | | | |")
    return "\n".join(lines)
