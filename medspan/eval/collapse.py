"""Encoder health: cheap figures that tell a degenerate (collapsed) encoder before its numbers are trusted.

A comparison "SPAN vs DINO vs scratch" means little if one pretraining run has not learned: a
collapsed baseline makes any gain look larger than it is. :func:`encoder_health` computes, on
the labeled set a downstream task uses:

* :func:`knn_accuracy`: leave-one-out cosine k-NN accuracy of the CLS features (does the feature
  space already separate the labels?);
* :func:`effective_rank`: ``exp`` of the entropy of the normalised singular values of the
  centred features (Roy & Vetterli, 2007): 1 for features on a line, ``D`` for isotropic ones;
* :func:`head_similarity`: mean pairwise cosine similarity of the last block's heads' CLS->patch
  attention maps (1.0: all heads look at the same place, i.e. one head);
* :func:`border_attention`: mean share of attention on the outermost ring of patches (a DINO run
  that has not learned sits on the image border), next to :func:`border_share`, the ring's
  share of the patches (what uniform attention gives);

and flags the encoder with the reasons (thresholds in :func:`encoder_health`).
:func:`encoder_features` extracts the CLS features and attention of a
:class:`medspan.models.vit.VisionTransformer` (anything with its ``forward_features``).

Example::

    >>> import torch
    >>> feats = torch.cat([torch.eye(4), -torch.eye(4)])          # 8 cases, 4 directions
    >>> labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    >>> effective_rank(feats)
    4.0
    >>> encoder_health(torch.ones(8, 4), labels)["collapsed"]      # constant features
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "border_attention",
    "border_share",
    "effective_rank",
    "encoder_features",
    "encoder_health",
    "format_health_table",
    "head_similarity",
    "knn_accuracy",
]

_ROWS = 1024
"""Rows of the (N, N) similarity matrix computed at a time."""


def _features(features: torch.Tensor) -> torch.Tensor:
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {tuple(features.shape)}")
    return features.detach().cpu().to(torch.float64)


def _neighbours(features: torch.Tensor, k: int) -> torch.Tensor:
    """``(N, k)`` indices of each case's k most cosine-similar other cases, most similar first.

    Ties go to the lower index (stable sort); a case is never its own neighbour.
    """
    f = F.normalize(_features(features), dim=1)
    n = f.shape[0]
    out = []
    for start in range(0, n, _ROWS):
        sim = f[start : start + _ROWS] @ f.T  # (r, N)
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = -math.inf  # leave one out
        out.append(torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k])
    return torch.cat(out)


def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Leave-one-out cosine k-NN accuracy.

    Each case is classified from its ``k`` most cosine-similar other cases (``k`` is capped at
    N - 1; ties in similarity go to the lower index).

    * ``labels`` ``(N,)`` int: majority vote; a tie between classes goes to the class of the
      nearest neighbour among the tied ones. Returns the fraction of cases classified right
      (chance: the majority-class rate).
    * ``labels`` ``(N, K)`` multi-hot: per class, a case is called positive when the share of
      positive neighbours exceeds the class's prevalence (a plain majority would call every rare
      finding negative and score 0.5 whatever the features). Returns the balanced accuracy
      ``(TPR + TNR) / 2`` averaged over the classes that have positives and negatives (chance:
      0.5; NaN if no class has both).

    Args:
        features: ``(N, D)`` features.
        labels: ``(N,)`` int class labels or ``(N, K)`` 0/1 multi-hot labels.
        k: neighbours.

    Example::

        >>> f = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> knn_accuracy(f, torch.tensor([0, 0, 1, 1]), k=1)
        1.0
    """
    n = features.shape[0]
    if labels.shape[0] != n or labels.ndim not in (1, 2):
        raise ValueError(f"labels must be (N,) or (N, K) with N = {n}, got shape {tuple(labels.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(int(k), n - 1)
    nbr = _neighbours(features, k)  # (N, k)
    lab = labels.detach().cpu()
    if lab.ndim == 1:
        _, y = torch.unique(lab, return_inverse=True)  # classes 0..C-1
        c = int(y.max()) + 1
        nl = y[nbr]  # (N, k) neighbours' classes
        votes = F.one_hot(nl, c).sum(1)  # (N, C)
        tied = votes == votes.max(1, keepdim=True).values
        first = tied.gather(1, nl).to(torch.int64).argmax(1, keepdim=True)  # nearest neighbour in a tied class
        pred = nl.gather(1, first).squeeze(1)
        return float((pred == y).to(torch.float64).mean())
    y = lab.to(torch.float64)
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("multi-hot labels must be 0 or 1")
    share = y[nbr].mean(1)  # (N, K) share of positive neighbours
    pred = share > y.mean(0, keepdim=True)
    pos = y.bool()
    n_pos, n_neg = pos.sum(0), (~pos).sum(0)
    valid = (n_pos > 0) & (n_neg > 0)
    if not bool(valid.any()):
        return float("nan")
    tpr = (pred & pos).sum(0)[valid] / n_pos[valid]
    tnr = (~pred & ~pos).sum(0)[valid] / n_neg[valid]
    return float(((tpr + tnr) / 2.0).mean())


def _chance(labels: torch.Tensor) -> float:
    """What :func:`knn_accuracy` scores without information: majority rate (int) or 0.5 (multi-hot)."""
    if labels.ndim == 2:
        return 0.5
    _, counts = torch.unique(labels.detach().cpu(), return_counts=True)
    return float(counts.max()) / float(counts.sum())


def effective_rank(features: torch.Tensor) -> float:
    """Effective rank of the centred features (Roy & Vetterli, 2007).

    ``exp(-sum_i p_i log p_i)`` with ``p_i = s_i / sum_j s_j`` over the singular values ``s`` of
    the column-centred ``(N, D)`` features, in float64. It lies in ``[1, min(N - 1, D)]``;
    singular values below ``s_max * max(N, D) * eps`` (``eps`` of the input's dtype: float32
    features carry float32 rounding) count as 0, as in a numerical rank. Features
    with no spread at all (centred norm below 1e-6 of the raw norm: a constant encoder) give 0.0.

    Note: centring removes one direction, so the identity ``(D, D)`` gives ``D - 1``;
    ``[I; -I]`` (already centred) gives ``D``.

    Example::

        >>> effective_rank(torch.arange(6.0)[:, None] * torch.tensor([[1.0, 2.0, 3.0]]))   # rank 1
        1.0
    """
    x = _features(features)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("features contain NaN or infinite values")
    xc = x - x.mean(0, keepdim=True)
    if float(torch.linalg.norm(xc)) <= 1e-6 * max(float(torch.linalg.norm(x)), 1e-300):
        return 0.0
    s = torch.linalg.svdvals(xc)
    eps = torch.finfo(features.dtype if features.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float64).eps
    s = s[s > s.max() * max(x.shape) * eps]
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p)).sum()))


def _attn(attn: torch.Tensor) -> torch.Tensor:
    if attn.ndim != 3:
        raise ValueError(f"attn must be (N, H, P), got shape {tuple(attn.shape)}")
    a = attn.detach().cpu().to(torch.float64)
    if not bool(torch.isfinite(a).all()):
        raise ValueError("attn contains NaN or infinite values")
    return a


def head_similarity(attn: torch.Tensor) -> float:
    """Mean pairwise cosine similarity of the heads' attention maps.

    Per case, the cosine similarity of every pair of heads' ``P``-vectors, averaged over the
    ``H (H - 1) / 2`` pairs and the N cases. 1.0: all heads identical; 0.0: heads on disjoint
    patches. Attention is non-negative, so near-uniform maps also give ~1 (no head has a
    place of its own). NaN with fewer than 2 heads.

    Args:
        attn: ``(N, H, P)`` CLS->patch attention.

    Example::

        >>> round(head_similarity(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])), 6)  # (0 + 2 / sqrt(2)) / 3
        0.471405
    """
    a = _attn(attn)
    h = a.shape[1]
    if h < 2:
        return float("nan")
    u = F.normalize(a, dim=2)
    gram = u @ u.transpose(1, 2)  # (N, H, H)
    iu = torch.triu_indices(h, h, offset=1)
    return float(gram[:, iu[0], iu[1]].mean())


def _ring(grid: tuple[int, int]) -> torch.Tensor:
    gh, gw = int(grid[0]), int(grid[1])
    if gh < 1 or gw < 1:
        raise ValueError(f"grid must be two positive sizes, got {grid}")
    ring = torch.ones(gh, gw, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    return ring.reshape(-1)


def border_share(grid: tuple[int, int]) -> float:
    """Share of a ``(gh, gw)`` patch grid on its outermost ring: what uniform attention puts there.

    Example::

        >>> border_share((8, 8))     # 28 of 64 patches
        0.4375
    """
    ring = _ring(grid)
    return float(ring.sum()) / ring.numel()


def border_attention(attn: torch.Tensor, grid: tuple[int, int]) -> float:
    """Mean fraction of each attention map's mass on the outermost ring of patches.

    Args:
        attn: ``(N, H, P)`` non-negative attention, ``P = gh * gw``, token ``i * gw + j`` = patch ``(i, j)``.
        grid: the patch grid ``(gh, gw)``.

    Returns:
        The ring's share of each map's mass, averaged over the maps with positive mass (NaN if none).

    Example::

        >>> a = torch.zeros(1, 1, 9); a[0, 0, 4] = 3.0; a[0, 0, 0] = 1.0     # 3x3 grid: centre + corner
        >>> border_attention(a, (3, 3))
        0.25
    """
    a = _attn(attn)
    ring = _ring(grid)
    if a.shape[2] != ring.numel():
        raise ValueError(f"attn has {a.shape[2]} tokens but grid {tuple(grid)} has {ring.numel()}")
    total = a.sum(2)
    share = a[:, :, ring].sum(2) / total
    ok = total > 0
    return float(share[ok].mean()) if bool(ok.any()) else float("nan")


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def encoder_health(
    features: torch.Tensor,
    labels: torch.Tensor | None,
    attn: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
    *,
    k: int = 5,
    min_rank: float = 2.0,
    min_rank_fraction: float = 0.05,
    knn_margin: float = 0.02,
    max_head_similarity: float = 0.95,
    max_border: float = 0.5,
    border_ratio: float = 1.5,
) -> dict[str, Any]:
    """The health figures of one encoder and whether it looks collapsed, with the reasons.

    Flags of collapse (each adds a reason; any one makes ``collapsed`` true):

    * features not finite, or with no spread at all (effective rank 0);
    * effective rank below ``max(min_rank, min_rank_fraction * min(D, N - 1))``: fewer than 2
      directions, or fewer than 5 % of the directions the sample could span (``min(D, N - 1)``,
      not D: 20 cases cannot show a rank above 19 whatever the width);
    * head similarity above ``max_head_similarity``: the heads are one head;
    * border attention above ``max(max_border, border_ratio * border_share(grid))``: most mass on
      the outer ring, and clearly more than uniform attention would put there (on a grid of
      4 x 4 the ring is 75 % of the patches, so 0.5 alone would flag uniform maps).

    A note, not a collapse (``notes``): k-NN accuracy at most chance + ``knn_margin`` (chance: the
    majority-class rate for int labels, 0.5 for the balanced accuracy of multi-hot ones): the
    features carry no label information a neighbour can see. A healthy encoder pretrained on
    anatomy can be at chance for subtle findings, so this alone does not call it degenerate.

    The figures are cheap sanity checks, not a benchmark: a healthy flag does not mean the
    encoder is good, only that its downstream numbers are worth comparing.

    Args:
        features: ``(N, D)`` CLS features of the labeled set.
        labels: ``(N,)`` int or ``(N, K)`` multi-hot labels, or None (no labels: k-NN skipped).
        attn: ``(N, H, P)`` last-block CLS->patch attention, or None (head figures skipped).
        grid: ``(gh, gw)`` patch grid of ``attn`` (needed for the border figure).

    Returns:
        ``{"n", "dim", "knn_accuracy", "knn_chance", "k", "effective_rank", "rank_threshold",
        "head_similarity", "border_attention", "border_share", "border_threshold", "collapsed",
        "reasons", "notes"}``; figures that were not computed are ``None``.

    Example::

        >>> f = torch.cat([torch.eye(4), -torch.eye(4)]) + 0.01 * torch.arange(8.0)[:, None]
        >>> h = encoder_health(f, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), k=1)
        >>> h["collapsed"], h["notes"]
        (False, ['k-NN accuracy 0.000 <= chance 0.250 + 0.02: no label signal a neighbour sees'])
    """
    n, d = int(features.shape[0]), int(features.shape[1]) if features.ndim == 2 else -1
    out: dict[str, Any] = {
        "n": n, "dim": d, "knn_accuracy": None, "knn_chance": None if labels is None else _chance(labels),
        "k": None if labels is None else min(int(k), n - 1),
        "effective_rank": None, "rank_threshold": None, "head_similarity": None, "border_attention": None,
        "border_share": None, "border_threshold": None, "collapsed": False, "reasons": [], "notes": [],
    }
    reasons: list[str] = out["reasons"]
    x = _features(features)
    if not bool(torch.isfinite(x).all()):
        reasons.append("features contain NaN or infinite values")
    else:
        er = effective_rank(x)
        floor = max(min_rank, min_rank_fraction * min(d, n - 1))
        out["effective_rank"], out["rank_threshold"] = er, floor
        if er == 0.0:
            reasons.append("features are constant (no spread across cases)")
        elif er < floor:
            reasons.append(f"effective rank {er:.2f} < {floor:.2f}")
        if labels is not None:
            acc = knn_accuracy(x, labels, k=k)
            out["knn_accuracy"] = _finite(acc)
            if math.isfinite(acc) and acc <= out["knn_chance"] + knn_margin:
                out["notes"].append(f"k-NN accuracy {acc:.3f} <= chance {out['knn_chance']:.3f} + {knn_margin:g}: "
                                    "no label signal a neighbour sees")
    if attn is not None:
        hs = head_similarity(attn)
        out["head_similarity"] = _finite(hs)
        if math.isfinite(hs) and hs > max_head_similarity:
            reasons.append(f"head similarity {hs:.3f} > {max_head_similarity:g}")
        if grid is not None:
            ba, share = border_attention(attn, grid), border_share(grid)
            limit = max(max_border, border_ratio * share)
            out["border_attention"], out["border_share"], out["border_threshold"] = _finite(ba), share, limit
            if math.isfinite(ba) and ba > limit:
                reasons.append(f"border attention {ba:.3f} > {limit:.3f}")
    out["collapsed"] = bool(reasons)
    return out


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_health_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of :func:`encoder_health` results, one row per encoder.

    Example::

        >>> h = encoder_health(torch.ones(8, 4), torch.tensor([0, 1] * 4))
        >>> print(format_health_table({"dino": h}))
        | encoder | k-NN acc (chance) | eff. rank (of D) | head sim. | border (uniform) | verdict |
        |---|---:|---:|---:|---:|---|
        | dino | 0.125 (0.500) | 0.0 (4) | - | - | **collapsed**: features are constant (no spread across cases) (k-NN accuracy 0.125 <= chance 0.500 + 0.02: no label signal a neighbour sees) |
    """
    lines = [
        "| encoder | k-NN acc (chance) | eff. rank (of D) | head sim. | border (uniform) | verdict |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        knn = f"{_f(r.get('knn_accuracy'), '.3f')} ({_f(r.get('knn_chance'), '.3f')})"
        rank = f"{_f(r.get('effective_rank'), '.1f')} ({r.get('dim', '-')})"
        border = "-" if r.get("border_attention") is None else (
            f"{r['border_attention']:.3f} ({_f(r.get('border_share'), '.3f')})"
        )
        verdict = "**collapsed**: " + "; ".join(r["reasons"]) if r.get("collapsed") else "ok"
        if r.get("notes"):
            verdict += " (" + "; ".join(r["notes"]) + ")"
        lines.append(f"| {name} | {knn} | {rank} | {_f(r.get('head_similarity'), '.3f')} | {border} | {verdict} |")
    return "\n".join(lines)


def _images(batch: Any, image_key: str) -> torch.Tensor:
    x = batch[image_key] if isinstance(batch, Mapping) else batch[0] if isinstance(batch, (list, tuple)) else batch
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor batch (or a dict with {image_key!r}), got {type(x).__name__}")
    return x.as_tensor() if hasattr(x, "as_tensor") else x  # MONAI MetaTensor -> plain tensor


def encoder_features(
    encoder: torch.nn.Module,
    data: torch.Tensor | Iterable[Any],
    device: str | torch.device = "cpu",
    *,
    batch_size: int = 64,
    image_key: str = "image",
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """CLS features and last-block CLS->patch attention of every image, without gradient.

    Args:
        encoder: a :class:`medspan.models.vit.VisionTransformer` (anything whose
            ``forward_features(x, return_attention=True)`` returns ``.cls``, ``.cls_attn``, ``.grid``).
            It runs in eval mode; its previous mode is restored afterwards.
        data: ``(N, C, *spatial)`` images (run in chunks of ``batch_size``), or an iterable of
            batches (a DataLoader: tensors, ``(image, ...)`` tuples or dicts with ``image_key``),
            read in order (do not shuffle: the rows must match the labels).
        device: where the encoder runs (it is moved there).

    Returns:
        ``(cls (N, D), attn (N, H, P), grid)``: float32 tensors on the CPU and the patch grid.

    Example::

        >>> from medspan.models.vit import build_vit                  # doctest: +SKIP
        >>> cls, attn, grid = encoder_features(build_vit("vit_toy"), torch.randn(10, 1, 64, 64))  # doctest: +SKIP
        >>> cls.shape, attn.shape, grid                               # doctest: +SKIP
        (torch.Size([10, 96]), torch.Size([10, 6, 64]), (8, 8))
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches: Iterable[Any]
    if isinstance(data, torch.Tensor):
        batches = (data[i : i + batch_size] for i in range(0, data.shape[0], batch_size))
    else:
        batches = data
    was_training = encoder.training
    encoder.to(device).eval()
    feats, attns, grid = [], [], None
    try:
        with torch.no_grad():
            for batch in batches:
                out = encoder.forward_features(_images(batch, image_key).to(device), return_attention=True)
                if grid is not None and tuple(out.grid) != grid:
                    raise ValueError(f"images give patch grids {grid} and {tuple(out.grid)}: resize them to one size")
                grid = tuple(int(g) for g in out.grid)
                feats.append(out.cls.float().cpu())
                attns.append(out.cls_attn.float().cpu())
    finally:
        encoder.train(was_training)
    if grid is None:
        raise ValueError("no images given")
    return torch.cat(feats), torch.cat(attns), grid
