"""Attention maps read as segmentations: an interpretability measure for SPAN heads.

For each head of the last block, the CLS→patch attention is upsampled to image size and scored
against each anatomical structure's mask:

* :func:`attention_ap`: pixel-level average precision (as ``sklearn.metrics.average_precision_score``),
  per image, averaged over the images where the structure is present;
* :func:`attention_dice`: DINO's protocol, keep the smallest set of pixels that holds ``mass``
  (60 %) of the map's mass and take the Dice with the mask;
* :func:`summarize_heads` / :func:`format_summary`: the assigned (regularized) head of each
  structure against the best free head and against a baseline's best head.

All metrics are vectorised in torch (sorting and cumulative sums, no Python loop over pixels)
and computed in float64 so they agree with scikit-learn to ~1e-12.

Axis convention: a ViT's patch embedding over a MONAI ``(C, x, y)`` image flattens its
``(gx, gy)`` patch grid row-major, so token ``i * gy + j`` is patch ``(i, j)`` = (x index,
y index). :func:`attention_to_maps` undoes exactly that, and maps come out ``(.., x, y)``
like the masks.

Example::

    >>> import torch
    >>> masks = torch.zeros(1, 1, 4, 4, dtype=torch.bool); masks[0, 0, :2, :2] = True
    >>> attention_ap(masks.float(), masks)      # a head whose map is the mask itself
    tensor([[1.]], dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "attention_ap",
    "attention_dice",
    "attention_to_maps",
    "format_summary",
    "mass_keep_mask",
    "summarize_heads",
]


# ----------------------------------------------------------------------------- maps


def attention_to_maps(attn: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Turn per-token attention into image-size maps.

    Args:
        attn: ``(B, H, N)`` attention of each head over the N = ``grid[0] * grid[1]`` patch
            tokens (CLS entry already dropped); token ``i * grid[1] + j`` is patch ``(i, j)``.
        grid: patch grid ``(g0, g1)``.
        size: output spatial size ``(s0, s1)``.

    Returns:
        ``(B, H, s0, s1)`` float maps, bilinear upsampling with ``align_corners=False`` (float64 stays float64,
        other dtypes become float32).

    Example::

        >>> a = torch.zeros(1, 1, 6); a[0, 0, 1 * 3 + 2] = 1.0      # token of patch (1, 2)
        >>> attention_to_maps(a, (2, 3), (2, 3))[0, 0].nonzero().tolist()
        [[1, 2]]
    """
    if attn.ndim != 3:
        raise ValueError(f"attn must be (B, H, N), got shape {tuple(attn.shape)}")
    g0, g1 = int(grid[0]), int(grid[1])
    if attn.shape[-1] != g0 * g1:
        raise ValueError(
            f"attn has {attn.shape[-1]} tokens but grid {(g0, g1)} has {g0 * g1} (drop the CLS entry first)"
        )
    x = attn if attn.dtype in (torch.float32, torch.float64) else attn.float()
    b, h, _ = x.shape
    x = x.reshape(b, h, g0, g1)
    out = (int(size[0]), int(size[1]))
    if (g0, g1) == out:
        return x.clone()
    return F.interpolate(x, size=out, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- AP


def _ap_rows(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Average precision of ``R`` score rows against ``T`` target rows each.

    Args:
        scores: ``(R, P)`` real scores.
        targets: ``(R, T, P)`` bool targets (several targets share one score row).

    Returns:
        ``(R, T)`` float64 AP. sklearn's step-wise definition is
        ``sum_k (recall_k - recall_{k-1}) * precision_k`` over the distinct score thresholds k.
        That equals ``sum_i t_i * precision(end of i's tie group) / n_pos``. A row with no
        positive gets 0.0, as sklearn returns.
    """
    r, p = scores.shape
    order = torch.argsort(scores, dim=-1, descending=True)
    s = torch.gather(scores, -1, order)
    t = torch.gather(targets, -1, order.unsqueeze(1).expand(r, targets.shape[1], p)).to(torch.float64)
    tp = torch.cumsum(t, dim=-1)
    rank = torch.arange(1, p + 1, dtype=torch.float64, device=scores.device)
    precision = tp / rank
    # index of the last element of each element's tie group (reverse running minimum)
    is_last = torch.ones_like(s, dtype=torch.bool)
    is_last[:, :-1] = s[:, 1:] != s[:, :-1]
    idx = torch.arange(p, device=scores.device).expand(r, p)
    ends = torch.where(is_last, idx, torch.full_like(idx, p - 1))
    ends = torch.flip(torch.cummin(torch.flip(ends, [-1]), dim=-1).values, [-1])
    prec_end = torch.gather(precision, -1, ends.unsqueeze(1).expand_as(precision))
    n_pos = tp[..., -1]
    ap = (t * prec_end).sum(-1) / n_pos.clamp_min(1.0)
    return torch.where(n_pos > 0, ap, torch.zeros_like(ap))


def _check_finite(x: torch.Tensor, what: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or infinite values")


def _check_maps_masks(maps: torch.Tensor, masks: torch.Tensor) -> None:
    if maps.ndim < 3 or masks.ndim != maps.ndim:
        raise ValueError(
            f"maps (B, H, *size) and masks (B, S, *size) expected, got {tuple(maps.shape)} and {tuple(masks.shape)}"
        )
    if maps.shape[0] != masks.shape[0] or maps.shape[2:] != masks.shape[2:]:
        raise ValueError(
            f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must share batch size and spatial size"
        )
    _check_finite(maps, "maps")


def attention_ap(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pixel AP of every head's map against every structure's mask.

    Args:
        maps: ``(B, H, *size)`` attention maps (any real scores).
        masks: ``(B, S, *size)`` bool (or 0/1) structure masks on the same grid.

    Returns:
        ``(H, S)`` float64: for each (head, structure), the AP per image, averaged over the images
        where the structure's mask is non-empty; NaN where the structure is never present.

    Example::

        >>> m = torch.zeros(1, 1, 8, 8, dtype=torch.bool); m[0, 0, 2:4, 2:4] = True
        >>> attention_ap(1.0 - m.float(), m).item()     # inverted map: AP = prevalence 4/64
        0.0625
    """
    _check_maps_masks(maps, masks)
    b, h = maps.shape[:2]
    s = masks.shape[1]
    flat_maps = maps.reshape(b, h, -1)
    flat_masks = masks.reshape(b, s, -1).bool()
    total = torch.zeros(h, s, dtype=torch.float64, device=maps.device)
    count = torch.zeros(s, dtype=torch.float64, device=maps.device)
    for i in range(b):  # one image at a time keeps memory at (H, S, P)
        present = flat_masks[i].any(-1)
        if not bool(present.any()):
            continue
        ap = _ap_rows(flat_maps[i], flat_masks[i].unsqueeze(0).expand(h, s, -1))
        total += torch.where(present, ap, torch.zeros_like(ap))
        count += present.to(torch.float64)
    return total / count  # 0 / 0 = NaN where never present


def mass_keep_mask(maps: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """The smallest set of each map's largest pixels that holds ``mass`` of its mass (DINO's rule).

    Negative values are clipped to 0. Pixels tied with the last kept value are all kept, so the
    result does not depend on sort order; an all-zero map keeps every pixel. Used by
    :func:`attention_dice` and by ``medspan.eval.segmentation.attention_masks``.

    Args:
        maps: ``(B, H, *size)`` attention maps.
        mass: fraction of each map's mass to keep, in (0, 1].

    Returns:
        ``(B, H, *size)`` bool.

    Example::

        >>> mass_keep_mask(torch.tensor([[[5.0, 3.0, 2.0, 0.0]]])).tolist()   # 5 + 3 >= 60 % of 10
        [[[True, True, False, False]]]
    """
    if maps.ndim < 2:
        raise ValueError(f"maps must be (B, H, *size), got shape {tuple(maps.shape)}")
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    _check_finite(maps, "maps")
    b, h = maps.shape[:2]
    m = maps.reshape(b, h, -1).to(torch.float64).clamp_min(0.0)
    p = m.shape[-1]
    vals = torch.sort(m, dim=-1, descending=True).values
    cum = torch.cumsum(vals, dim=-1) / m.sum(-1, keepdim=True)
    first = (cum < mass).sum(-1, keepdim=True).clamp_max(p - 1)  # first index reaching `mass`
    keep = m >= torch.gather(vals, -1, first)  # (B, H, P)
    return keep.reshape(maps.shape)


def attention_dice(maps: torch.Tensor, masks: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """Dice of each head's mass-thresholded map with each structure's mask (DINO's protocol).

    Each map (negative values clipped to 0) keeps the smallest set of its largest pixels that
    holds at least ``mass`` of its total mass; pixels tied with the last kept value are all
    kept, so the result does not depend on sort order. An all-zero map keeps every pixel.

    Args:
        maps: ``(B, H, *size)`` non-negative attention maps.
        masks: ``(B, S, *size)`` bool masks.
        mass: fraction of the map's mass to keep.

    Returns:
        ``(H, S)`` float64 Dice, mean over the images where the structure is present (NaN where never).

    Example::

        >>> a = torch.tensor([[[[5.0, 3.0], [2.0, 0.0]]]]); m = torch.tensor([[[[True, False], [True, False]]]])
        >>> attention_dice(a, m).item()    # keeps {5, 3}; Dice = 2 * 1 / (2 + 2)
        0.5
    """
    _check_maps_masks(maps, masks)
    b, h = maps.shape[:2]
    s = masks.shape[1]
    keep = mass_keep_mask(maps, mass).reshape(b, h, -1).to(torch.float64)  # (B, H, P)
    mk = masks.reshape(b, s, -1).bool().to(torch.float64)  # (B, S, P)
    inter = torch.bmm(keep, mk.transpose(1, 2))  # (B, H, S)
    dice = 2.0 * inter / (keep.sum(-1)[:, :, None] + mk.sum(-1)[:, None, :])
    present = (mk.sum(-1) > 0).to(torch.float64)  # (B, S)
    return (dice * present[:, None, :]).sum(0) / present.sum(0)[None, :]


# ----------------------------------------------------------------------------- summaries


def _best(column: torch.Tensor, heads: Sequence[int]) -> tuple[int | None, float | None]:
    """Head with the highest finite value among ``heads`` (lowest index on ties)."""
    best_h, best_v = None, None
    for hd in heads:
        v = float(column[hd])
        if math.isfinite(v) and (best_v is None or v > best_v):
            best_h, best_v = hd, v
    return best_h, best_v


def summarize_heads(
    ap: torch.Tensor, structures: Sequence[str], head_to_structure: Mapping[int, int]
) -> dict[str, dict[str, Any]]:
    """Per structure: its assigned head, the best free head and the best head overall.

    Args:
        ap: ``(H, S)`` AP (e.g. from :func:`attention_ap`); NaN entries are ignored.
        structures: the S structure names.
        head_to_structure: regularized head index -> structure index. Heads not in it are free.

    Returns:
        ``{name: {"assigned_head", "assigned_ap", "best_free_head", "best_free_ap", "best_head",
        "best_ap", "assigned_heads"}}``, with Python ints/floats or ``None`` (no assigned head,
        no free head, or no finite AP). When several heads share a structure, ``assigned_head``
        is the best of them and ``assigned_heads`` lists them all.

    Example::

        >>> ap = torch.tensor([[0.9, 0.1], [0.2, 0.3], [0.5, 0.6]])
        >>> s = summarize_heads(ap, ["lung", "heart"], {0: 0})
        >>> s["lung"]["assigned_head"], s["lung"]["best_free_head"], s["lung"]["best_head"]
        (0, 2, 0)
        >>> s["heart"]["assigned_head"], s["heart"]["best_head"]
        (None, 2)
    """
    if ap.ndim != 2 or ap.shape[1] != len(structures):
        raise ValueError(f"ap must be (H, S) with S = {len(structures)} structures, got {tuple(ap.shape)}")
    n_heads = ap.shape[0]
    for hd, st in head_to_structure.items():
        if not (0 <= int(hd) < n_heads and 0 <= int(st) < len(structures)):
            raise ValueError(f"head_to_structure entry {hd} -> {st} is out of range (H={n_heads}, S={len(structures)})")
    a = ap.detach().to(torch.float64).cpu()
    free = [hd for hd in range(n_heads) if hd not in {int(k) for k in head_to_structure}]
    out: dict[str, dict[str, Any]] = {}
    for si, name in enumerate(structures):
        col = a[:, si]
        mine = sorted(int(hd) for hd, st in head_to_structure.items() if int(st) == si)
        ah, av = _best(col, mine)
        if ah is None and mine:
            ah = mine[0]
        fh, fv = _best(col, free)
        bh, bv = _best(col, range(n_heads))
        out[name] = {
            "assigned_head": ah,
            "assigned_ap": av,
            "best_free_head": fh,
            "best_free_ap": fv,
            "best_head": bh,
            "best_ap": bv,
            "assigned_heads": mine,
        }
    return out


def _cell(ap: float | None, head: int | None) -> str:
    if ap is None:
        return "-"
    return f"{100.0 * ap:5.1f} (h{head})" if head is not None else f"{100.0 * ap:5.1f}"


def format_summary(
    summary: Mapping[str, Mapping[str, Any]], baseline_summary: Mapping[str, Mapping[str, Any]] | None = None
) -> str:
    """Fixed-width table of :func:`summarize_heads` results, AP on a 0-100 scale.

    Columns: structure | assigned head AP | best free head AP | (baseline best head AP) | gap.
    ``gap`` is assigned AP − baseline best AP when a baseline is given (the honest comparison:
    the baseline may pick its best head per structure), else assigned AP − best free AP, in AP
    points. ``-`` marks a missing value. With no assigned head at all and no baseline (a plain DINO
    run) the table has one column: the best head per structure.

    Example::

        >>> s = summarize_heads(torch.tensor([[0.8], [0.5]]), ["heart"], {0: 0})
        >>> print(format_summary(s))
        structure  assigned    best free   gap
        heart       80.0 (h0)   50.0 (h1)  +30.0
    """
    if baseline_summary is None and all(r.get("assigned_ap") is None for r in summary.values()):
        # no guided heads (plain DINO): one column, the best head per structure
        rows = [[str(n), _cell(r.get("best_ap"), r.get("best_head"))] for n, r in summary.items()]
        widths = [max(len(x) for x in col) for col in zip(["structure", "best head"], *rows)]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [["structure", "best head"], *rows]
        )
    headers = ["structure", "assigned", "best free"]
    headers += (["baseline best"] if baseline_summary is not None else []) + ["gap"]
    rows = []
    for name, r in summary.items():
        row = [
            str(name),
            _cell(r.get("assigned_ap"), r.get("assigned_head")),
            _cell(r.get("best_free_ap"), r.get("best_free_head")),
        ]
        ref = r.get("best_free_ap")
        if baseline_summary is not None:
            br = baseline_summary.get(name, {})
            row.append(_cell(br.get("best_ap"), br.get("best_head")))
            ref = br.get("best_ap")
        mine = r.get("assigned_ap")
        row.append(f"{100.0 * (mine - ref):+.1f}" if mine is not None and ref is not None else "-")
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [headers, *rows]]
    return "\n".join(lines)
