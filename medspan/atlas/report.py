"""Quality report of a :func:`medspan.atlas.build.build_priors` folder, with Dice where ground truth exists.

For every registered image whose datalist entry has a ``label`` (one mask per structure), the
warped exemplar masks are compared with the ground truth. Four priors are scored side by side, in
the same run, on the same images:

* ``registered``: the exemplar's masks warped by the final transform (nearest neighbour);
* ``affine``: the exemplar's masks warped by the affine stage only;
* ``population``: the population prior of the folder (mean of the warped exemplar masks in the
  common frame), stretched onto the image and thresholded at 0.5;
* ``population_gt``: the mean of the OTHER images' ground-truth masks (leave-one-out), thresholded
  at 0.5: what a labeled set would give as a fixed prior.

The exemplar itself is left out of the statistics. Written into ``report_dir`` (default
``<priors folder>/report``): ``report.json`` (every number, per image and summarised), ``report.md``
(the tables) and ``overlay_worst_best.png`` (the worst and best cases: ground truth in green, the
registered masks in red; 3D images as axial, coronal and sagittal slices). Without ground truth the
report summarises the quality records and draws the cases with the worst and best final metric.

Example::

    summary = priors_report("runs/mhh_priors")
    summary["dice"]["registered"]["left_lung"]       # {'mean': ..., 'median': ..., 'min': ...}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

from medspan.atlas.build import FLAGGED, STATUSES, align_labels, dice
from medspan.atlas.statistics import load_prior, read_masks, resize_prior
from medspan.data.datalist import (
    datalist_sections,
    load_datalist,
    read_datalist_json,
    resolve_paths,
)
from medspan.data.readers import read_image
from medspan.errors import DataError
from medspan.io import write_json_atomic, write_png_atomic, write_text_atomic

__all__ = ["PRIOR_KINDS", "format_report", "overlay_grid", "priors_report"]

PRIOR_KINDS: tuple[str, ...] = ("registered", "affine", "population", "population_gt")
_TITLES = {
    "registered": "registered",
    "affine": "affine only",
    "population": "population (warped)",
    "population_gt": "population (GT, leave-one-out)",
}


def _stats(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()),
            "n": int(v.size)}


def _ground_truth(datalist: Path, structures: Sequence[str]) -> dict[str, list[str]]:
    """image path -> label paths (one per structure) from every section of ``datalist`` and its
    top-level ``exemplar`` record (as ``data_prep.mhh_covid_lungs`` writes it), if labeled."""
    doc = read_datalist_json(datalist)
    known = doc.get("structures")
    out: dict[str, list[str]] = {}
    entries = []
    for section in datalist_sections(doc):
        if doc.get(section):
            entries += load_datalist(datalist, section, require=("image",), check_files=False)
    if isinstance(doc.get("exemplar"), dict) and "image" in doc["exemplar"]:  # a labeled-exemplar record
        entries.append(resolve_paths(doc["exemplar"], Path(datalist).resolve().parent))
    for e in entries:
        if "label" not in e:
            continue
        e = align_labels(dict(e), known, structures)
        label = e.get("label")
        if isinstance(label, list) and len(label) == len(structures) and all(isinstance(x, str) for x in label):
            img = e["image"][0] if isinstance(e["image"], list) else e["image"]
            out[os.path.normpath(str(img))] = label
    return out


def priors_report(
    priors_dir: str | os.PathLike,
    datalist: str | os.PathLike | None = None,
    report_dir: str | os.PathLike | None = None,
    n_cases: int = 3,
) -> dict[str, Any]:
    """Score and summarise a priors folder; write ``report.json``, ``report.md`` and the overlay PNG.

    Args:
        priors_dir: a folder written by :func:`~medspan.atlas.build.build_priors`.
        datalist: where the ground truth comes from (default: the folder's ``datalist.json``, which
            keeps the input's ``label`` keys).
        report_dir: output folder (default ``<priors_dir>/report``).
        n_cases: how many worst and best cases the overlay shows.

    Returns:
        the summary written to ``report.json``: ``counts``, ``jacobian``, ``seconds``, ``flagged``,
        ``dice`` (``{kind: {structure or "mean": {mean, median, min, max, n}}}``, empty without
        ground truth), ``per_image`` and the paths written.
    """
    pdir = Path(priors_dir).resolve()
    qpath, apath = pdir / "quality.json", pdir / "atlas.json"
    if not qpath.is_file() or not apath.is_file():
        raise DataError(pdir, "not a build-priors folder (quality.json / atlas.json missing)")
    records = json.loads(qpath.read_text(encoding="utf-8"))
    atlas = json.loads(apath.read_text(encoding="utf-8"))
    structures = list(atlas["settings"]["structures"])
    rdir = Path(report_dir) if report_dir is not None else pdir / "report"
    gt = _ground_truth(Path(datalist) if datalist is not None else pdir / "datalist.json", structures)
    pop = load_prior(pdir / "population_prior.npy")

    jac_min = [r["jacobian"]["min"] for r in records if r.get("jacobian", {}).get("min") is not None]
    folded = [r["case_id"] for r in records if (r.get("jacobian") or {}).get("folded_fraction", 0) > 0]
    summary: dict[str, Any] = {
        "priors_dir": str(pdir),
        "method": atlas["settings"]["registration"]["method"],
        "exemplar": atlas["settings"]["exemplar"],
        "structures": structures,
        "images": len(records),
        "counts": {s: sum(r["status"] == s for r in records) for s in STATUSES},
        "flagged": [{"case_id": r["case_id"], "status": r["status"], "reasons": r.get("reasons") or [],
                     "error": r.get("error")} for r in records if r["status"] in FLAGGED],
        "jacobian": {"min": float(min(jac_min)) if jac_min else None, "folded_images": folded},
        "seconds": _stats([r["seconds"] for r in records if r.get("seconds") is not None and r["status"] != "exemplar"]),
    }

    # ground truth: every labeled, registered, non-exemplar image
    scored = [r for r in records if r["status"] not in ("exemplar", "failed") and os.path.normpath(r["image"]) in gt]
    per_image: list[dict[str, Any]] = []
    if scored:
        truths = {r["case_id"]: read_masks(gt[os.path.normpath(r["image"])]) for r in scored}
        frame = pop.shape[1:]
        gt_frame = {cid: resize_prior(t, frame) for cid, t in truths.items()}
        gt_sum = sum(gt_frame.values())
        for r in scored:
            t = truths[r["case_id"]]
            if t.shape[0] != len(structures):
                raise DataError(r["image"], f"{t.shape[0]} ground-truth masks for {len(structures)} structures")
            preds: dict[str, np.ndarray] = {}
            if r.get("masks") and Path(r["masks"]).is_file():
                z = np.load(r["masks"])
                preds["registered"], preds["affine"] = z["registered"], z["affine"]
            preds["population"] = resize_prior(pop, t.shape[1:]) > 0.5
            if len(gt_frame) > 1:
                loo = (gt_sum - gt_frame[r["case_id"]]) / (len(gt_frame) - 1)
                preds["population_gt"] = resize_prior(loo, t.shape[1:]) > 0.5
            row = {"case_id": r["case_id"], "image": r["image"], "status": r["status"], "dice": {}}
            for kind, p in preds.items():
                if p.shape != t.shape:
                    raise DataError(r["image"], f"{kind} masks {p.shape} do not match the ground truth {t.shape}")
                row["dice"][kind] = {s: dice(p[i], t[i]) for i, s in enumerate(structures)}
            per_image.append(row)
    dice_summary: dict[str, Any] = {}
    for kind in PRIOR_KINDS:
        rows = [p["dice"][kind] for p in per_image if kind in p["dice"]]
        if not rows:
            continue
        dice_summary[kind] = {s: _stats([d[s] for d in rows]) for s in structures}
        dice_summary[kind]["mean"] = _stats([float(np.mean([d[s] for s in structures])) for d in rows])
    summary["dice"] = dice_summary
    summary["per_image"] = per_image

    # overlay of the worst and best cases
    if per_image:
        ranked = sorted(per_image, key=lambda p: float(np.mean(list(p["dice"].get("registered", {"x": 0}).values()))))
        pick = ranked[:n_cases] + [p for p in ranked[-n_cases:] if p not in ranked[:n_cases]]
        labels = {p["case_id"]: f"{p['case_id']} Dice {np.mean(list(p['dice']['registered'].values())):.3f}"
                  for p in pick if "registered" in p["dice"]}
        chosen = [(next(r for r in records if r["case_id"] == p["case_id"]), labels.get(p["case_id"], p["case_id"]))
                  for p in pick]
    else:
        usable = [r for r in records if r.get("masks") and r["status"] != "exemplar"]
        usable.sort(key=lambda r: r.get("metrics", {}).get("metric_final", 0.0), reverse=True)  # worst (highest) first
        pick = usable[:n_cases] + [r for r in usable[-n_cases:] if r not in usable[:n_cases]]
        chosen = [(r, f"{r['case_id']} {r['status']} MI {r.get('metrics', {}).get('metric_final', float('nan')):.3f}")
                  for r in pick]
    rdir.mkdir(parents=True, exist_ok=True)
    if chosen:
        cases = []
        for r, title in chosen:
            truth = None
            key = os.path.normpath(r["image"])
            if key in gt:
                truth = read_masks(gt[key])
            pred = np.load(r["masks"])["registered"] if r.get("masks") else None
            cases.append({"image": r["image"], "truth": truth, "pred": pred, "title": title})
        legend = ("green: ground truth, red: registered exemplar masks; worst cases first, then the best"
                  if per_image else "red: registered exemplar masks; worst final similarity first, then the best")
        summary["overlay"] = str(overlay_grid(cases, rdir / "overlay_worst_best.png", legend=legend))
    summary["report_json"] = str(rdir / "report.json")
    summary["report_md"] = str(rdir / "report.md")
    write_json_atomic(summary, rdir / "report.json")
    write_text_atomic(format_report(summary) + "\n", rdir / "report.md")
    return summary


def format_report(summary: dict[str, Any]) -> str:
    """The printed report: quality counts, Jacobian, time, and the Dice table (mean / median / min)."""
    c = summary["counts"]
    lines = [
        f"[medspan] priors report: {summary['priors_dir']} (method {summary['method']}, exemplar {Path(summary['exemplar']).name})",
        "images: " + str(summary["images"]) + " (" + ", ".join(f"{k} {v}" for k, v in c.items()) + ")",
    ]
    j = summary["jacobian"]
    if j["min"] is not None:
        lines.append(f"Jacobian determinant min {j['min']:.3f}; images with folding: {len(j['folded_images'])}")
    s = summary["seconds"]
    if s["n"]:
        lines.append(f"seconds per registration: median {s['median']:.3f}, max {s['max']:.3f} (n={s['n']})")
    for f in summary["flagged"]:
        why = f["error"] or "; ".join(f["reasons"][-2:])
        lines.append(f"  flagged {f['case_id']}: {f['status']}: {why}")
    d = summary["dice"]
    if d:
        n = next(iter(d.values()))["mean"]["n"]
        kinds = [k for k in PRIOR_KINDS if k in d]
        lines.append(f"Dice vs ground truth on {n} images (exemplar excluded): mean / median / min")
        header = f"{'structure':<14}" + "".join(f"{_TITLES[k]:<33}" for k in kinds)
        lines.append(header.rstrip())
        for s in [*summary["structures"], "mean"]:
            cells = "".join(f"{d[k][s]['mean']:.3f} / {d[k][s]['median']:.3f} / {d[k][s]['min']:.3f}".ljust(33) for k in kinds)
            lines.append((f"{s:<14}" + cells).rstrip())
    else:
        lines.append("no ground truth: Dice not computed")
    if "overlay" in summary:
        lines.append(f"overlay: {summary['overlay']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# pictures
# ----------------------------------------------------------------------------------------------


def _to_uint8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    lo, hi = np.percentile(a, [1, 99]) if a.size else (0.0, 1.0)
    return (np.clip((a - lo) / (hi - lo + 1e-6), 0, 1) * 255).astype(np.uint8)


def _panel(gray_rc: np.ndarray, truth_rc: np.ndarray | None, pred_rc: np.ndarray | None) -> np.ndarray:
    rgb = np.repeat(gray_rc[..., None], 3, axis=-1)
    for masks, colour in ((truth_rc, (0, 220, 0)), (pred_rc, (255, 40, 40))):
        if masks is None:
            continue
        for m in masks:
            rgb[find_boundaries(m, mode="inner")] = colour
    return rgb


def _views(image: np.ndarray, affine: np.ndarray | None, truth: np.ndarray | None, pred: np.ndarray | None,
           size: int) -> list[np.ndarray]:
    """Panels (rows, cols, 3) uint8: one for 2D (x, y); axial / coronal / sagittal for 3D (x, y, z)."""
    def fit(rgb: np.ndarray, aspect: float = 1.0) -> np.ndarray:
        h, w = rgb.shape[:2]
        scale = size / max(h * aspect, w)
        return np.asarray(Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * aspect * scale))),
                                                      Image.Resampling.NEAREST))

    if image.ndim == 2:
        t = None if truth is None else truth.transpose(0, 2, 1)
        p = None if pred is None else pred.transpose(0, 2, 1)
        return [fit(_panel(_to_uint8(image.T), t, p))]

    ornt = nib.orientations.io_orientation(np.asarray(affine) if affine is not None else np.eye(4))
    canon = lambda a: nib.orientations.apply_orientation(a, ornt)
    img = canon(image)
    t = None if truth is None else np.stack([canon(m) for m in truth])
    p = None if pred is None else np.stack([canon(m) for m in pred])
    ref = p if p is not None and p.any() else t
    centre = (np.array(img.shape) // 2) if ref is None or not ref.any() else np.round(
        np.argwhere(ref.any(axis=0)).mean(axis=0)).astype(int)
    spacing = np.sqrt((np.asarray(affine if affine is not None else np.eye(4))[:3, :3] ** 2).sum(axis=0))
    sp = spacing[np.asarray(ornt[:, 0], dtype=int).argsort()] if affine is not None else np.ones(3)
    i, j, k = (int(c) for c in centre)
    out = []
    # axial (x, y) at z=k: rows = y from anterior (top) to posterior, cols = x from patient right to left
    sl = lambda a, s: None if a is None else np.stack([m[s] for m in a])
    views = [
        (img[:, :, k], sl(t, np.s_[:, :, k]), sl(p, np.s_[:, :, k]), sp[1] / sp[0]),
        (img[:, j, :], sl(t, np.s_[:, j, :]), sl(p, np.s_[:, j, :]), sp[2] / sp[0]),
        (img[i, :, :], sl(t, np.s_[i, :, :]), sl(p, np.s_[i, :, :]), sp[2] / sp[1]),
    ]
    for a, tt, pp, aspect in views:
        # picture: rows = second axis reversed (anterior / superior up), cols = first axis reversed
        # (radiological: the patient's right on the left; anterior on the left in the sagittal view)
        pic = lambda x: x[::-1, ::-1].T
        rc = _panel(_to_uint8(pic(a)), None if tt is None else np.stack([pic(m) for m in tt]),
                    None if pp is None else np.stack([pic(m) for m in pp]))
        out.append(fit(rc, aspect))
    return out


def overlay_grid(
    cases: Sequence[dict[str, Any]], path: str | os.PathLike, size: int = 256, legend: str | None = None
) -> Path:
    """Draw cases (one row each) into a PNG: ground truth green, prediction red, a title per row.

    Args:
        cases: dicts with ``image`` (path), ``truth`` and ``pred`` (bool (S, *spatial) in MONAI order or
            None) and ``title``.
        path: the PNG to write (atomically).
        size: longest side of a panel in pixels.
        legend: a line of text above the grid (None: none).
    """
    rows = []
    for c in cases:
        arr, meta = read_image(c["image"])
        panels = _views(np.asarray(arr, dtype=np.float32), meta.get("affine"), c.get("truth"), c.get("pred"), size)
        h = max(p.shape[0] for p in panels)
        strip = np.zeros((h + 16, sum(p.shape[1] for p in panels) + 4 * (len(panels) - 1), 3), np.uint8)
        x = 0
        for p in panels:
            strip[16:16 + p.shape[0], x:x + p.shape[1]] = p
            x += p.shape[1] + 4
        im = Image.fromarray(strip)
        ImageDraw.Draw(im).text((2, 2), str(c.get("title", "")), fill=(255, 255, 255))
        rows.append(np.asarray(im))
    if not rows:
        raise ValueError("overlay_grid needs at least one case")
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
    if len(rows) > 1 and grid.shape[1] < 3 * size and rows[0].ndim == 3 and all(r.shape == rows[0].shape for r in rows):
        # 2D cases: lay them out in two rows (worst on top, best below) rather than one column
        half = (len(rows) + 1) // 2
        top = np.concatenate([np.pad(r, ((0, 4), (0, 4), (0, 0))) for r in rows[:half]], axis=1)
        bottom = np.concatenate([np.pad(r, ((0, 4), (0, 4), (0, 0))) for r in rows[half:]], axis=1)
        bottom = np.pad(bottom, ((0, 0), (0, top.shape[1] - bottom.shape[1]), (0, 0)))
        grid = np.concatenate([top, bottom], axis=0)
    if legend:
        grid = np.concatenate([np.zeros((16, grid.shape[1], 3), np.uint8), grid], axis=0)
        im = Image.fromarray(grid)
        ImageDraw.Draw(im).text((2, 2), legend, fill=(255, 255, 255))
        grid = np.asarray(im)
    return write_png_atomic(grid, path)
