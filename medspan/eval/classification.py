"""Multi-label classification metrics: per-class ROC AUC with bootstrap intervals, positive weights.

* :func:`multilabel_auc`: per-class AUC (MONAI's ``compute_roc_auc``), the mean over the classes
  that have enough positives *and* negatives, and percentile-bootstrap 95 % intervals (cases
  resampled with replacement, fixed by a seed) for each class and for the mean. Classes with too
  few positives or negatives are reported with their counts and a status, never silently averaged.
* :func:`positive_weights`: ``n_neg / n_pos`` per class, the ``pos_weight`` of
  ``torch.nn.BCEWithLogitsLoss``.
* :func:`format_auc_table`: a markdown table of a report.

AUC here is the Mann-Whitney statistic: the probability that a random positive scores above a
random negative, ties counting one half (what MONAI and scikit-learn compute). The bootstrap does
not call MONAI a thousand times: a resample is a vector of case multiplicities ``w``, and the AUC
of the resample is the weighted Mann-Whitney sum over the cases sorted once per class
(:func:`_weighted_auc`), exact and vectorised over replicates; with ``w = 1`` it equals MONAI's
value (tested, ties included).

Example::

    >>> import torch
    >>> r = multilabel_auc(torch.tensor([[0.1], [0.4], [0.35], [0.8]]), torch.tensor([[0], [0], [1], [1]]),
    ...                    ["finding"], min_positives=1, n_boot=200)
    >>> r["per_class"]["finding"]["auc"], r["mean_auc"]
    (0.75, 0.75)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_roc_auc

from medspan.errors import DataError

__all__ = ["format_auc_table", "multilabel_auc", "positive_weights"]

_CHUNK = 64
"""Bootstrap replicates drawn and scored at a time (fixed, so the draws do not depend on N)."""


def _as_2d(x: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{what} must be (N, K), got shape {a.shape}")
    return a


def _check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """``labels`` as float64 0/1; anything else (NaN, -1 uncertain, 0.5) is a DataError."""
    y = labels.astype(np.float64)
    bad = ~((y == 0.0) | (y == 1.0))
    if bad.any():
        i, k = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(
            where,
            f"labels must be 0 or 1; {int(bad.sum())} entries are not (first: case {i}, class {k}, "
            f"value {labels[i, k].item()!r}); resolve uncertain or missing labels before scoring",
        )
    return y


def _weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC of one class under many case weightings (bootstrap multiplicities).

    Args:
        scores: ``(N,)`` scores of one class.
        labels: ``(N,)`` 0/1 labels.
        weights: ``(R, N)`` non-negative case weights (a bootstrap resample = counts of each case).

    Returns:
        ``(R,)`` float64: ``sum_{i pos, j neg} w_i w_j ([s_i > s_j] + [s_i = s_j] / 2) / (W_pos W_neg)``;
        NaN for a row whose positive or negative weight is 0. With all weights 1 this is the AUC.
    """
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], labels[order]
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first element of each tie group
    group = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1  # (N,) tie-group id of each element
    pos = w * y
    neg = w * (1.0 - y)
    neg_group = np.add.reduceat(neg, starts, axis=1)  # (R, G) negative weight of each tie group
    neg_below = np.cumsum(neg_group, axis=1) - neg_group  # negative weight strictly below the group
    num = (pos * (neg_below[:, group] + 0.5 * neg_group[:, group])).sum(1)
    w_pos, w_neg = pos.sum(1), neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((w_pos > 0) & (w_neg > 0), num / (w_pos * w_neg), np.nan)


def _interval(values: np.ndarray, ci: float) -> list[float] | None:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return None
    lo, hi = np.quantile(v, [(1.0 - ci) / 2.0, 1.0 - (1.0 - ci) / 2.0])
    return [float(lo), float(hi)]


def multilabel_auc(
    scores: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    classes: Sequence[str],
    *,
    min_positives: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    where: str = "scores",
) -> dict[str, Any]:
    """Per-class ROC AUC, their mean, and percentile-bootstrap intervals.

    A class is averaged only when it has at least ``min_positives`` positives **and** at least as
    many negatives (AUC is symmetric in the two, and an AUC from two negatives is as noisy as one
    from two positives); otherwise its status says which side is short and it is listed in
    ``excluded``. Point AUCs come from ``monai.metrics.compute_roc_auc`` per class.

    The bootstrap draws ``n_boot`` resamples of the N cases with replacement
    (``numpy.random.default_rng(seed)``, in fixed chunks, so the same seed gives the same interval
    on any machine). A class's interval uses the replicates in which it has at least one positive
    and one negative; the mean's interval uses the replicates in which *every* averaged class
    does (a replicate missing one class would change what is averaged), and ``n_boot_used`` says
    how many that was. Intervals are the ``(1 - ci) / 2`` and ``1 - (1 - ci) / 2`` quantiles
    (numpy's linear interpolation). ``n_boot=0`` skips the bootstrap (intervals ``None``).

    Args:
        scores: ``(N, K)`` (or ``(N,)`` for one class) real scores, e.g. logits or probabilities.
        labels: ``(N, K)`` 0/1 labels.
        classes: the K class names.
        min_positives: the fewest positives (and negatives) a class needs to be scored.
        n_boot: bootstrap replicates.
        seed: the bootstrap's random seed.
        ci: interval coverage, in (0, 1).
        where: what the scores are (a file, a run), named in a :class:`DataError`.

    Returns:
        ``{"per_class": {name: {"auc", "ci", "n_pos", "n_neg", "status", "n_boot"}}, "mean_auc",
        "mean_ci", "n_boot_used", "n_cases", "classes_averaged", "excluded", "ci_level"}``, plain
        Python values. ``auc``/``ci`` are ``None`` for a class that is not ``"ok"``; ``mean_auc``
        is ``None`` when no class is. ``excluded`` lists ``{"class", "status", "reason"}``.

    Raises:
        DataError: NaN/infinite scores or labels that are not 0/1 (naming the class and case).
        ValueError: shapes that do not match ``classes``.

    Example::

        >>> r = multilabel_auc(np.array([[0.1, 0.9], [0.4, 0.2], [0.35, 0.3], [0.8, 0.1]]),
        ...                    np.array([[0, 1], [0, 0], [1, 0], [1, 0]]), ["a", "b"], min_positives=2, n_boot=0)
        >>> r["per_class"]["a"]["auc"], r["per_class"]["b"]["status"], r["mean_auc"]
        (0.75, 'too_few_positives', 0.75)
    """
    s = _as_2d(scores, "scores")
    y_raw = _as_2d(labels, "labels")
    names = [str(c) for c in classes]
    if s.shape != y_raw.shape or s.shape[1] != len(names):
        raise ValueError(
            f"scores {s.shape} and labels {y_raw.shape} must both be (N, K) with K = {len(names)} classes"
        )
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if min_positives < 1 or n_boot < 0:
        raise ValueError(f"min_positives must be >= 1 and n_boot >= 0, got {min_positives} and {n_boot}")
    s = s.astype(np.float64)
    finite = np.isfinite(s)
    if not finite.all():
        k = int(np.argwhere(~finite)[0][1])
        rows = np.flatnonzero(~finite[:, k])
        raise DataError(
            where,
            f"{int((~finite).sum())} scores are NaN or infinite (class {names[k]!r}: {rows.size} cases, "
            f"first case {int(rows[0])}); the model produced non-finite outputs",
        )
    y = _check_labels(y_raw, where)
    n = s.shape[0]

    per_class: dict[str, dict[str, Any]] = {}
    excluded: list[dict[str, str]] = []
    ok: list[int] = []
    for k, name in enumerate(names):
        n_pos = int(y[:, k].sum())
        n_neg = n - n_pos
        if n_pos < min_positives:
            status = "too_few_positives"
            reason = f"{n_pos} positives < {min_positives}"
        elif n_neg < min_positives:
            status = "too_few_negatives"
            reason = f"{n_neg} negatives < {min_positives}"
        else:
            status, reason = "ok", ""
        auc = None
        if status == "ok":
            ok.append(k)
            auc = float(compute_roc_auc(torch.from_numpy(s[:, k]), torch.from_numpy(y[:, k])))
        else:
            excluded.append({"class": name, "status": status, "reason": reason})
        per_class[name] = {"auc": auc, "ci": None, "n_pos": n_pos, "n_neg": n_neg, "status": status, "n_boot": 0}

    mean_auc = float(np.mean([per_class[names[k]]["auc"] for k in ok])) if ok else None
    mean_ci: list[float] | None = None
    n_used = 0
    if ok and n_boot > 0:
        rng = np.random.default_rng(seed)
        boot = np.empty((n_boot, len(ok)), dtype=np.float64)
        for start in range(0, n_boot, _CHUNK):
            r = min(_CHUNK, n_boot - start)
            idx = rng.integers(0, n, size=(r, n))
            counts = np.bincount((idx + n * np.arange(r)[:, None]).ravel(), minlength=r * n)
            counts = counts.reshape(r, n).astype(np.float64)  # (r, N) multiplicity of each case
            for j, k in enumerate(ok):
                boot[start : start + r, j] = _weighted_auc(s[:, k], y[:, k], counts)
        for j, k in enumerate(ok):
            col = boot[:, j]
            per_class[names[k]]["ci"] = _interval(col, ci)
            per_class[names[k]]["n_boot"] = int(np.isfinite(col).sum())
        full = np.isfinite(boot).all(1)
        n_used = int(full.sum())
        mean_ci = _interval(boot[full].mean(1), ci) if n_used else None
    return {
        "per_class": per_class,
        "mean_auc": mean_auc,
        "mean_ci": mean_ci,
        "n_boot_used": n_used,
        "n_cases": int(n),
        "classes_averaged": [names[k] for k in ok],
        "excluded": excluded,
        "ci_level": float(ci),
    }


def positive_weights(labels: torch.Tensor | np.ndarray, max_weight: float = 100.0) -> torch.Tensor:
    """``pos_weight`` for ``torch.nn.BCEWithLogitsLoss``: ``n_neg / n_pos`` per class, clipped.

    The weight is clipped to ``[1 / max_weight, max_weight]``: a class with no positive in the
    labels gets ``max_weight`` (its positive term cannot matter in this data, but the weight must
    be finite), and a class with no negative gets ``1 / max_weight`` rather than 0 (which would
    switch its positive term off entirely).

    Args:
        labels: ``(N, K)`` 0/1 training labels.
        max_weight: the largest weight, > 1.

    Returns:
        ``(K,)`` float32 tensor.

    Example::

        >>> positive_weights(torch.tensor([[1, 0], [0, 0], [0, 0], [0, 1]]))
        tensor([3., 3.])
    """
    if max_weight <= 1.0:
        raise ValueError(f"max_weight must be > 1, got {max_weight}")
    y = _check_labels(_as_2d(labels, "labels"), "labels")
    n_pos = y.sum(0)
    n_neg = y.shape[0] - n_pos
    with np.errstate(divide="ignore"):
        w = np.where(n_pos > 0, n_neg / np.maximum(n_pos, 1.0), max_weight)
    return torch.from_numpy(np.clip(w, 1.0 / max_weight, max_weight)).to(torch.float32)


def _fmt(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.3f}"


def _fmt_ci(c: Sequence[float] | None) -> str:
    return "-" if c is None else f"{c[0]:.3f}-{c[1]:.3f}"


def format_auc_table(report: dict[str, Any], title: str) -> str:
    """Markdown table of a :func:`multilabel_auc` report: one row per class, then the mean.

    Example::

        >>> r = multilabel_auc(np.array([[0.1], [0.4], [0.35], [0.8]]), np.array([[0], [0], [1], [1]]),
        ...                    ["a"], min_positives=1, n_boot=0)
        >>> print(format_auc_table(r, "toy"))
        **toy** (4 cases)
        <BLANKLINE>
        | class | n_pos | AUC | 95% CI | status |
        |---|---:|---:|---|---|
        | a | 2 | 0.750 | - | ok |
        | **mean** (1 of 1 classes) | | **0.750** | - | |
    """
    level = f"{100.0 * report.get('ci_level', 0.95):g}% CI"
    lines = [
        f"**{title}** ({report['n_cases']} cases)",
        "",
        f"| class | n_pos | AUC | {level} | status |",
        "|---|---:|---:|---|---|",
    ]
    for name, r in report["per_class"].items():
        status = r["status"] if r["status"] == "ok" else r["status"].replace("_", " ")
        lines.append(f"| {name} | {r['n_pos']} | {_fmt(r['auc'])} | {_fmt_ci(r['ci'])} | {status} |")
    n_avg, n_all = len(report["classes_averaged"]), len(report["per_class"])
    lines.append(
        f"| **mean** ({n_avg} of {n_all} classes) | | **{_fmt(report['mean_auc'])}** | {_fmt_ci(report['mean_ci'])} | |"
    )
    return "\n".join(lines)
