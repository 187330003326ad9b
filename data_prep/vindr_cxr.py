"""VinDr-CXR (DICOM + per-radiologist labels and boxes) -> a MONAI datalist with a PNG cache.

Input (``--root``: the PhysioNet release folder, ``vindr-cxr/1.0.0``)::

    train/<image_id>.dicom                    15,000 DICOMs (also accepted: .dcm)
    test/<image_id>.dicom                     3,000
    annotations/image_labels_train.csv        image_id, rad_ID, <28 labels: 22 local + 6 global> (0/1),
                                              one row per image and radiologist (3 per image)
    annotations/image_labels_test.csv         image_id, <the same labels>: the 5-radiologist consensus
    annotations/annotations_train.csv         image_id, rad_id, class_name, x_min, y_min, x_max, y_max
    annotations/annotations_test.csv          (the same; rad_id may be absent); "No finding" rows
                                              have empty coordinates

Pixels: every DICOM goes through :func:`medspan.data.readers.read_dicom_2d` (any transfer syntax
pydicom decodes: native, JPEG, JPEG-LS, JPEG 2000, RLE; modality LUT / rescale; MONOCHROME1
inverted so that higher = brighter), then ``--intensity``:

- ``voi`` (default): the file's VOI LUT Sequence, else its first WindowCenter/WindowWidth
  (DICOM LINEAR), else the full modality range -> [0, 1] (MONOCHROME1: ``1 - y``);
- ``--window C W``: that window instead (modality units);
- ``minmax``: no VOI; the image's own min..max -> [0, 1].

The [0, 1] picture is resized by area averaging and stored as ``rint(v * 255)`` (or 65535 with
``--bits 16``); see :mod:`data_prep.cxr_common`.

Labels (``classes`` = the label columns of image_labels_train.csv, in its order): for the test
set the consensus row; for the training set the radiologists' votes combined by ``--vote``:
``majority`` (default; more than half of the image's readers), ``any`` or ``all``. Entries
also carry ``label_votes`` (positive readers per class) and ``n_readers``. Boxes (all readers')
are ``boxes`` ``[x_min, y_min, x_max, y_max]`` in cached-image pixels with ``box_labels`` and
``box_readers``.

Sections: ``test`` = the official test set; ``training`` / ``validation`` = the training set,
split by ``--val-fraction`` / ``--seed``. The release is de-identified without patient links, so
each image is its own patient (``patient_id`` = ``image_id``).

Problems (report.json; the rest is converted): a DICOM that cannot be read or decoded, a label
or box row whose image is missing, a DICOM without label rows, a repeated image id (in train and
test, or as .dicom and .dcm), a repeated (image, radiologist) label row, an unreadable row.

Example::

    medspan prepare vindr-cxr --root /data/vindr-cxr/1.0.0 --out data/vindr512 --size 512 --workers 2
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from medspan.data.datalist import write_datalist
from medspan.data.readers import read_dicom_2d
from medspan.errors import DataError

from .common import (
    Report,
    add_common_arguments,
    converter_main,
    is_done,
    run_converter,
    run_items,
)
from .cxr_common import (
    CacheSpec,
    add_cache_arguments,
    add_split_arguments,
    check_settings,
    patient_split,
    png_shape,
    read_csv,
    scale_boxes,
    spec_from_args,
    write_cached,
)

__all__ = [
    "VOTES",
    "DicomJob",
    "add_arguments",
    "cache_dicom",
    "combine_votes",
    "convert",
    "dicom_picture",
    "find_dicoms",
    "main",
    "read_annotations",
    "read_image_labels",
    "run",
]

NAME = "vindr_cxr"
VOTES = ("majority", "any", "all")
INTENSITIES = ("voi", "minmax")
SPLITS = ("train", "test")


# --------------------------------------------------------------------------------------------
# CSVs
# --------------------------------------------------------------------------------------------


def _reader_column(header: Sequence[str]) -> int | None:
    return next((i for i, h in enumerate(header) if h.lower() == "rad_id"), None)


def read_image_labels(
    path: str | os.PathLike, report: Report | None = None
) -> tuple[list[str], dict[str, list[tuple[str, list[int]]]]]:
    """``image_labels_*.csv`` -> ``(classes, {image_id: [(reader, 0/1 per class), ...]})``.

    ``reader`` is the ``rad_ID`` value, or ``"consensus"`` when the file has no such column.
    Bad rows and repeated (image, reader) rows go to ``report``.

    Raises:
        DataError: missing file or no ``image_id`` column.
    """
    path = Path(path)
    header, rows = read_csv(path)
    if "image_id" not in header:
        raise DataError(path, f"no image_id column (columns: {header})")
    id_col, rad_col = header.index("image_id"), _reader_column(header)
    class_cols = [i for i in range(len(header)) if i not in (id_col, rad_col) and header[i]]
    classes = [header[i] for i in class_cols]
    out: dict[str, list[tuple[str, list[int]]]] = {}
    for n, cells in enumerate(rows, start=1):
        if not any(c.strip() for c in cells):
            continue
        try:
            image_id = cells[id_col].strip()
            reader = cells[rad_col].strip() if rad_col is not None else "consensus"
            values = [int(float(cells[i])) for i in class_cols]
            if not image_id or any(v not in (0, 1) for v in values):
                raise ValueError("empty image_id or a value other than 0/1")
        except (ValueError, IndexError) as e:
            if report is not None:
                report.problem(f"{path.name} row {n}", f"cannot read label row ({e})")
            continue
        if any(r == reader for r, _ in out.get(image_id, [])):
            if report is not None:
                report.problem(f"{path.name} row {n}", f"repeated labels of image {image_id} by {reader}; row skipped")
            continue
        out.setdefault(image_id, []).append((reader, values))
    return classes, out


def read_annotations(
    path: str | os.PathLike, report: Report | None = None
) -> dict[str, list[tuple[str, str, list[float]]]]:
    """``annotations_*.csv`` -> ``{image_id: [(class_name, reader, [x_min, y_min, x_max, y_max]), ...]}``.

    Rows with empty coordinates ("No finding") give no box. Bad rows go to ``report``.
    """
    path = Path(path)
    header, rows = read_csv(path)
    need = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max")
    missing = [c for c in need if c not in header]
    if missing:
        raise DataError(path, f"missing column(s) {missing} (columns: {header})")
    col = {h: i for i, h in enumerate(header)}
    rad_col = _reader_column(header)
    out: dict[str, list[tuple[str, str, list[float]]]] = {}
    for n, cells in enumerate(rows, start=1):
        if not any(c.strip() for c in cells):
            continue
        try:
            image_id, cls = cells[col["image_id"]].strip(), cells[col["class_name"]].strip()
            coords = [cells[col[c]].strip() for c in need[2:]]
            reader = cells[rad_col].strip() if rad_col is not None else ""
            out.setdefault(image_id, [])
            if all(c == "" for c in coords):
                continue
            box = [float(c) for c in coords]
            if not (box[2] > box[0] and box[3] > box[1]):
                raise ValueError(f"empty box {box}")
        except (ValueError, IndexError) as e:
            if report is not None:
                report.problem(f"{path.name} row {n}", f"cannot read box row ({e})")
            continue
        out[image_id].append((cls, reader, box))
    return out


def combine_votes(rows: Sequence[tuple[str, Sequence[int]]], vote: str = "majority") -> tuple[list[int], list[int]]:
    """Per-reader 0/1 rows -> ``(labels, votes)``: votes = positive readers per class.

    ``majority``: ``2 * votes > readers``; ``any``: ``votes > 0``; ``all``: ``votes == readers``.

    Example::

        combine_votes([("R1", [1, 0, 1]), ("R2", [1, 0, 0]), ("R3", [0, 0, 0])])   # ([1, 0, 0], [2, 0, 1])
    """
    if vote not in VOTES:
        raise ValueError(f"vote must be one of {VOTES}, got {vote!r}")
    votes = np.sum([list(v) for _, v in rows], axis=0).astype(int).tolist()
    n = len(rows)
    if vote == "majority":
        labels = [int(2 * v > n) for v in votes]
    elif vote == "any":
        labels = [int(v > 0) for v in votes]
    else:
        labels = [int(v == n) for v in votes]
    return labels, votes


def find_dicoms(folder: str | os.PathLike, report: Report | None = None) -> dict[str, Path]:
    """``{image_id: path}`` of the ``.dicom`` / ``.dcm`` files of one split folder."""
    folder = Path(folder)
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    for p in sorted(folder.iterdir(), key=lambda q: (q.stem, q.suffix != ".dicom")):
        if p.suffix.lower() not in (".dicom", ".dcm") or not p.is_file():
            continue
        if p.stem in out:
            if report is not None:
                report.problem(p, f"image id {p.stem} repeats {out[p.stem].name}; skipped")
            continue
        out[p.stem] = p
    return out


# --------------------------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomJob:
    """One DICOM to cache, with the intensity mapping (``window`` = (center, width) or None)."""

    case_id: str
    source: str
    output: str
    spec: CacheSpec
    intensity: str = "voi"
    window: tuple[float, float] | None = None


def dicom_picture(path: str | os.PathLike, intensity: str = "voi",
                  window: Sequence[float] | None = None) -> tuple[np.ndarray, float]:
    """A DICOM as ``(values float64 (rows, cols), top)`` with higher = brighter (see module doc).

    Example::

        values, top = dicom_picture("train/000434271f63a053c4128a0ba6352c7f.dicom")   # top 1.0
    """
    if intensity not in INTENSITIES:
        raise ValueError(f"intensity must be one of {INTENSITIES}, got {intensity!r}")
    if window is not None:
        arr, _ = read_dicom_2d(path, window=window)
        return np.asarray(arr, dtype=np.float64).T, 1.0
    if intensity == "voi":
        arr, _ = read_dicom_2d(path, apply_voi_lut=True)
        return np.asarray(arr, dtype=np.float64).T, 1.0
    arr, _ = read_dicom_2d(path)
    values = np.asarray(arr, dtype=np.float64).T
    lo, hi = float(values.min()), float(values.max())
    return values - lo, (hi - lo) if hi > lo else 1.0


def _dicom_shape(path: str) -> tuple[int, int]:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        return int(ds.Rows), int(ds.Columns)
    except Exception as e:
        raise DataError(path, f"cannot read the DICOM header ({type(e).__name__}: {e})") from e


def cache_dicom(job: DicomJob) -> dict[str, Any]:
    """Cache one DICOM as PNG (skipped when done). Module-level: runs in worker processes."""
    if is_done(job.output):
        return {"image": job.output, "src_shape": _dicom_shape(job.source), "out_shape": png_shape(job.output),
                "skipped": True}
    values, top = dicom_picture(job.source, job.intensity, job.window)
    out = write_cached(values, top, job.spec, job.output)
    return {"image": job.output, "src_shape": values.shape, "out_shape": out, "skipped": False}


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------


def convert(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: CacheSpec | None = None,
    *,
    intensity: str = "voi",
    window: Sequence[float] | None = None,
    vote: str = "majority",
    boxes: bool = True,
    val_fraction: float = 0.1,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> tuple[Path, Report]:
    """Convert VinDr-CXR at ``root`` into ``out_dir``; returns ``(datalist path, report)``.

    Raises:
        DataError: no ``annotations/image_labels_train.csv``, or ``out_dir`` made with other settings.

    Example::

        path, report = convert("/data/vindr-cxr/1.0.0", "data/vindr256", CacheSpec(256), workers=2)
    """
    spec = spec or CacheSpec(size=512)
    if intensity not in INTENSITIES or vote not in VOTES:
        raise ValueError(f"intensity must be in {INTENSITIES} and vote in {VOTES}")
    if not spec.cache:
        raise ValueError("DICOM images are always cached (no --no-cache)")
    root, out_dir = Path(root), Path(out_dir).resolve()
    ann = root / "annotations"
    if not (ann / "image_labels_train.csv").is_file():
        raise DataError(root, "no annotations/image_labels_train.csv (is --root the vindr-cxr/1.0.0 folder?)")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(NAME, out_dir)
    win = None if window is None else tuple(float(v) for v in window)
    check_settings(out_dir, {"converter": NAME, "intensity": intensity, "window": win, **spec.as_dict()})

    classes: list[str] = []
    records: list[tuple[str, str, Path, list[tuple[str, list[int]]], list]] = []
    owner: dict[str, str] = {}
    for split in SPLITS:
        labels_csv = ann / f"image_labels_{split}.csv"
        if not labels_csv.is_file():
            report.count(f"no_{split}_labels")
            continue
        cls, labels = read_image_labels(labels_csv, report)
        if split == "train":
            classes = cls
        elif cls != classes:
            missing = [c for c in classes if c not in cls]
            if missing:
                report.problem(labels_csv.name, f"class column(s) {missing} missing; taken as 0")
            labels = {k: [(r, [v[cls.index(c)] if c in cls else 0 for c in classes]) for r, v in rows]
                      for k, rows in labels.items()}
        box_csv = ann / f"annotations_{split}.csv"
        box_table = read_annotations(box_csv, report) if boxes and box_csv.is_file() else {}
        dicoms = find_dicoms(root / split, report)
        for image_id in sorted(set(labels) - set(dicoms)):
            report.problem(f"{labels_csv.name}: {image_id}", f"labelled image {split}/{image_id}.dicom not found")
        for image_id in sorted(set(box_table) - set(dicoms) - set(labels)):
            report.problem(f"{box_csv.name}: {image_id}", f"boxed image {split}/{image_id}.dicom not found")
        for image_id, path in sorted(dicoms.items()):
            if image_id not in labels:
                report.problem(path, f"no rows in {labels_csv.name}; skipped")
                continue
            if image_id in owner:
                report.problem(path, f"image id also in {owner[image_id]}/; skipped")
                continue
            owner[image_id] = split
            records.append((split, image_id, path, labels[image_id], box_table.get(image_id, [])))

    jobs = [DicomJob(image_id, str(path), str(out_dir / "images" / f"{image_id}.png"), spec, intensity, win)
            for _s, image_id, path, _l, _b in records]
    results = run_items(cache_dicom, jobs, workers=workers, report=report, key=lambda j: j.source,
                        desc=NAME, progress=progress)
    parts: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for (split, image_id, _p, label_rows, box_rows), res in zip(records, results):
        if res is None:
            continue
        report.count("skipped_existing" if res["skipped"] else "images_written")
        labels, votes = combine_votes(label_rows, vote)
        e: dict[str, Any] = {"image": res["image"], "case_id": image_id, "patient_id": image_id, "labels": labels,
                             "label_votes": votes, "n_readers": len(label_rows)}
        if box_rows:
            e["boxes"] = scale_boxes([b for _c, _r, b in box_rows], res["src_shape"], res["out_shape"])
            e["box_labels"] = [c for c, _r, _b in box_rows]
            e["box_readers"] = [r for _c, r, _b in box_rows]
        parts[split].append(e)
    report.count("images", sum(len(v) for v in parts.values()))
    training, validation = patient_split(parts["train"], val_fraction, seed)
    sections = {"training": training, "validation": validation, "test": parts["test"]}
    how = f"window {win}" if win else ("the file's VOI LUT / window" if intensity == "voi" else "per-image min-max")
    datalist = write_datalist(
        out_dir / "datalist.json", sections,
        name=f"VinDr-CXR ({spec.describe()})",
        description=(f"Converted by data_prep.vindr_cxr: pixels via read_dicom_2d (MONOCHROME1 inverted), {how}; "
                     f"labels = image_labels_*.csv columns, training readers combined by '{vote}'; boxes "
                     "[x_min, y_min, x_max, y_max] in cached-image pixels, all readers; test = the official test set; "
                     f"validation = fraction {val_fraction} (seed {seed}) of the training set, one image per patient."),
        classes=classes,
    )
    for k, v in sections.items():
        report.count(k, len(v))
    return datalist, report


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``medspan prepare vindr-cxr``."""
    parser.add_argument("--root", required=True, help="the vindr-cxr/1.0.0 folder (train/, test/, annotations/)")
    parser.add_argument("--intensity", choices=INTENSITIES, default="voi",
                        help="voi: the file's VOI LUT / window (default); minmax: per-image range")
    parser.add_argument("--window", type=float, nargs=2, default=None, metavar=("CENTER", "WIDTH"),
                        help="apply this window (modality units) instead")
    parser.add_argument("--vote", choices=VOTES, default="majority", help="combine the 3 training readers (default majority)")
    parser.add_argument("--no-boxes", action="store_true", help="ignore annotations_*.csv")
    add_cache_arguments(parser, default_size=512, no_cache=False)
    add_split_arguments(parser)
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Convert; print the datalist path. Exit status: 0, 1 (--strict and problems), 2 (cannot start)."""
    return run_converter(NAME, lambda: convert(
        args.root, args.out, spec_from_args(args), intensity=args.intensity, window=args.window,
        vote=args.vote, boxes=not args.no_boxes, val_fraction=args.val_fraction,
        seed=args.seed, workers=args.workers, progress=not args.quiet),
        args.strict)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data_prep.vindr_cxr --root R --out DIR [--size 512] [--window C W] [--vote majority]``."""
    return converter_main("data_prep.vindr_cxr", __doc__, add_arguments, run, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
