"""The 1000-image NIH ChestX-ray14 subset (64 x 64 thumbnails) -> ``cxr_cls`` and pretraining datalists.

Input (``--root``, the folder ``nih_cxr14_subset`` of ``../shared/data/real``)::

    labels.csv                       path, image_index, subset, split, folder_class, finding_labels,
                                     follow_up, patient_id, patient_age, patient_sex, view
    thumbs64/{train,valid,test}/{0_normal,1_abnormal}/<Image Index>   64 x 64 RGB PNGs (grey x 3)
    fullres/...                      two 512 x 512 images (subset "fullres"; not converted)

Only the rows with ``subset == "thumbs64"`` are converted. ``finding_labels`` is NIH's
``Data_Entry_2017_v2020`` text (``|``-separated findings or "No Finding"); it is parsed exactly as
:mod:`data_prep.nih_cxr14` parses it, so both datalists have the same ``classes`` (the 14 findings
in CheXNet order, then "No Finding", which is 1 exactly when there is no finding) and ``cxr_cls``
reads them the same way. Normal vs abnormal is the "No Finding" column (abnormal = 1 - it; its AUC
is the same task). ``folder_class`` (the third party's 0_normal / 1_abnormal folder) is kept in the
entry; where it disagrees with the NIH labels the NIH labels win and the case is counted.

Output (``--out``)::

    images/<Image Index stem>.png     8-bit greyscale PNG (the first channel, exactly; --size 0 keeps 64)
    datalist.json                     classes + sections training / validation / test (cxr_cls)
    pretrain_datalist.json            the training section's images, unlabeled (for medspan build-priors,
                                      then span_cxr)
    conversion.json, report.json, report.txt

Entries: ``image``, ``case_id`` (Image Index stem), ``image_index``, ``patient_id``, ``labels``
(multi-hot over ``classes``), ``findings`` (the CSV text), ``folder_class``, ``source_split`` (the
CSV's split), ``follow_up``, ``age``, ``sex``, ``view``.

**Patient-wise split.** The third party's train / valid / test split is by image, and 30 of the 264
patients have images in two or three splits. Each patient's images all go to ONE split: the one
that holds most of that patient's images; a tie goes to the first of test, valid, train (the
evaluation sets are the small ones). Moved images keep their CSV split in ``source_split``;
``report.json`` lists every such patient (``patient_moves``) and counts ``images_moved``.

``report.json`` also holds ``positives``: per section, the number of positive images per class
(and ``images``), and ``classes_with_min_positives``: per section, the classes with at least
``MIN_REPORTED_POSITIVES`` (20) positives.

Problems (listed in report.json, the rest is converted): a row with an empty or repeated Image
Index, an unknown split or finding, an empty patient id, a missing or unreadable image.

Example::

    medspan prepare nih-cxr14-subset --root ../shared/data/real/nih_cxr14_subset --out data/nih1000
    python -m data_prep.nih_cxr14_subset --root ../shared/data/real/nih_cxr14_subset --out data/nih1000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medspan.data.datalist import write_datalist
from medspan.errors import DataError
from medspan.io import write_json_atomic, write_text_atomic

from .common import (
    Report,
    add_common_arguments,
    converter_main,
    run_converter,
    run_items,
)
from .cxr_common import (
    CacheSpec,
    PictureJob,
    add_cache_arguments,
    cache_picture,
    check_settings,
    compact,
    read_csv,
    spec_from_args,
)
from .nih_cxr14 import CLASSES, parse_age, parse_findings

__all__ = [
    "CLASSES",
    "SECTIONS",
    "SPLIT_PRIORITY",
    "SubsetReport",
    "SubsetRow",
    "add_arguments",
    "assign_patient_splits",
    "class_positives",
    "convert",
    "main",
    "read_labels",
    "run",
]

NAME = "nih_cxr14_subset"
SUBSET = "thumbs64"
#: CSV split -> datalist section
SECTIONS: dict[str, str] = {"train": "training", "valid": "validation", "test": "test"}
#: a patient whose images are spread over splits with equal counts goes to the first of these
SPLIT_PRIORITY: tuple[str, ...] = ("test", "valid", "train")
REQUIRED_COLUMNS: tuple[str, ...] = ("path", "image_index", "subset", "split", "finding_labels", "patient_id")
#: the issue's bar for scoring a finding: report which classes reach it per section
MIN_REPORTED_POSITIVES = 20
DATALIST_NAME = "datalist.json"
PRETRAIN_NAME = "pretrain_datalist.json"


@dataclass(frozen=True)
class SubsetRow:
    """One ``thumbs64`` row of labels.csv (``row``: 1-based data row number, header not counted)."""

    image_index: str
    path: str
    split: str
    folder_class: str
    findings: str
    labels: tuple[int, ...]
    patient_id: str
    follow_up: int | None
    age: int | None
    sex: str
    view: str
    row: int


class SubsetReport(Report):
    """A :class:`~data_prep.common.Report` whose ``report.json`` / ``report.txt`` also hold ``extra``
    (per-class positives, the patient moves)."""

    def __init__(self, name: str, out_dir: str | os.PathLike) -> None:
        super().__init__(name, out_dir)
        self.extra: dict[str, Any] = {}

    def write(self) -> Path:
        path = super().write()
        doc = json.loads(path.read_text(encoding="utf-8"))
        doc.update(self.extra)
        write_json_atomic(doc, path)
        lines = [(self.out_dir / "report.txt").read_text(encoding="utf-8").rstrip("\n")]
        for section, counts in self.extra.get("positives", {}).items():
            lines.append(f"positives in {section} ({counts.get('images', 0)} images): "
                         + ", ".join(f"{c} {n}" for c, n in counts.items() if c != "images"))
        for m in self.extra.get("patient_moves", []):
            lines.append(f"patient {m['patient_id']}: images per CSV split {m['images']} -> all in {m['to']}")
        write_text_atomic("\n".join(lines) + "\n", self.out_dir / "report.txt")
        return path


# --------------------------------------------------------------------------------------------
# labels.csv
# --------------------------------------------------------------------------------------------


def _int_or_none(text: str) -> int | None:
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return None


def read_labels(path: str | os.PathLike, report: Report | None = None) -> list[SubsetRow]:
    """Read labels.csv and return its ``thumbs64`` rows; bad rows go to ``report`` and are skipped.

    Rows of other subsets are counted (``other_subset``). A repeated Image Index keeps its first row.

    Raises:
        DataError: the file is missing, unreadable, or lacks one of :data:`REQUIRED_COLUMNS`.

    Example::

        rows = read_labels("../shared/data/real/nih_cxr14_subset/labels.csv")
        len(rows), rows[0].split, rows[0].labels[-1]      # (1000, 'test', 1)
    """
    path = Path(path)
    header, data = read_csv(path)
    col = {h: i for i, h in enumerate(header)}
    missing = [c for c in REQUIRED_COLUMNS if c not in col]
    if missing:
        raise DataError(path, f"missing column(s) {missing} (columns: {header})")

    def cell(cells: list[str], key: str) -> str:
        j = col.get(key)
        return cells[j].strip() if j is not None and j < len(cells) else ""

    def bad(i: int, reason: str) -> None:
        if report is not None:
            report.problem(f"{path.name} row {i}", reason)

    out: list[SubsetRow] = []
    first: dict[str, int] = {}
    for i, cells in enumerate(data, start=1):
        if not any(c.strip() for c in cells):
            continue
        if cell(cells, "subset") != SUBSET:
            if report is not None:
                report.count("other_subset")
            continue
        name, rel = cell(cells, "image_index"), cell(cells, "path")
        if not name or "/" in name or "\\" in name or not rel:
            bad(i, f"unusable image_index {name!r} or path {rel!r}")
            continue
        if name in first:
            bad(i, f"duplicate image_index {name} (first in row {first[name]}); row skipped")
            continue
        first[name] = i
        split = cell(cells, "split")
        if split not in SECTIONS:
            bad(i, f"{name}: unknown split {split!r} (expected one of {list(SECTIONS)})")
            continue
        patient = cell(cells, "patient_id")
        if not patient:
            bad(i, f"{name}: empty patient_id")
            continue
        text = cell(cells, "finding_labels")
        try:
            labels = parse_findings(text)
        except ValueError as e:
            bad(i, f"{name}: {e}")
            continue
        out.append(SubsetRow(
            image_index=name, path=rel, split=split, folder_class=cell(cells, "folder_class"), findings=text,
            labels=labels, patient_id=patient, follow_up=_int_or_none(cell(cells, "follow_up")),
            age=parse_age(cell(cells, "patient_age")), sex=cell(cells, "patient_sex"), view=cell(cells, "view"),
            row=i,
        ))
    return out


# --------------------------------------------------------------------------------------------
# patient-wise split, positives
# --------------------------------------------------------------------------------------------


def assign_patient_splits(pairs: Sequence[tuple[str, str]]) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """One split per patient: the split holding most of its images; ties to the first of :data:`SPLIT_PRIORITY`.

    Args:
        pairs: ``(patient_id, split)`` per image, splits from :data:`SECTIONS` (``train``/``valid``/``test``).

    Returns:
        ``(split_of, moves)``: ``split_of[patient]`` the split every image of that patient goes to;
        ``moves`` one dict per patient found in more than one split, in first-seen order:
        ``{"patient_id", "images": {split: n}, "to": split, "moved": n of its images that change split}``.

    Example::

        assign_patient_splits([("7", "train"), ("7", "test"), ("7", "test"), ("8", "valid"), ("8", "train")])
        # ({'7': 'test', '8': 'valid'},
        #  [{'patient_id': '7', 'images': {'test': 2, 'train': 1}, 'to': 'test', 'moved': 1},
        #   {'patient_id': '8', 'images': {'valid': 1, 'train': 1}, 'to': 'valid', 'moved': 1}])
    """
    counts: dict[str, Counter[str]] = {}
    for patient, split in pairs:
        if split not in SPLIT_PRIORITY:
            raise ValueError(f"unknown split {split!r} of patient {patient!r} (expected one of {SPLIT_PRIORITY})")
        counts.setdefault(patient, Counter())[split] += 1
    split_of: dict[str, str] = {}
    moves: list[dict[str, Any]] = []
    for patient, c in counts.items():
        to = max(SPLIT_PRIORITY, key=lambda s: (c[s], -SPLIT_PRIORITY.index(s)))
        split_of[patient] = to
        if len(c) > 1:
            moves.append({"patient_id": patient, "images": {s: c[s] for s in SPLIT_PRIORITY if c[s]}, "to": to,
                          "moved": sum(c.values()) - c[to]})
    return split_of, moves


def class_positives(sections: Mapping[str, Sequence[Mapping[str, Any]]],
                    classes: Sequence[str] = CLASSES) -> dict[str, dict[str, int]]:
    """Per section: ``{"images": n, <class>: positives, ...}`` from the entries' multi-hot ``labels``.

    Example::

        class_positives({"test": [{"labels": [1, 0]}, {"labels": [1, 1]}]}, ["a", "b"])
        # {'test': {'images': 2, 'a': 2, 'b': 1}}
    """
    out: dict[str, dict[str, int]] = {}
    for name, entries in sections.items():
        row = {"images": len(entries)}
        for k, c in enumerate(classes):
            row[c] = int(sum(int(e["labels"][k]) for e in entries))
        out[name] = row
    return out


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------


def _entry(row: SubsetRow, image: str) -> dict[str, Any]:
    return compact({
        "image": image,
        "case_id": Path(row.image_index).stem,
        "image_index": row.image_index,
        "patient_id": row.patient_id,
        "labels": list(row.labels),
        "findings": row.findings,
        "folder_class": row.folder_class or None,
        "source_split": row.split,
        "follow_up": row.follow_up,
        "age": row.age,
        "sex": row.sex or None,
        "view": row.view or None,
    })


def convert(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: CacheSpec | None = None,
    *,
    workers: int = 1,
    progress: bool = True,
) -> tuple[Path, SubsetReport]:
    """Convert the NIH subset at ``root`` into ``out_dir``; returns ``(datalist path, report)``.

    Args:
        root: the ``nih_cxr14_subset`` folder (``labels.csv``, ``thumbs64/``).
        out_dir: output folder (created; a re-run skips the images already written).
        spec: the image cache (default ``CacheSpec(size=0)``: the thumbnails' own 64 x 64, 8 bits,
            which copies the grey values exactly).
        workers: processes writing images.
        progress: show a progress bar.

    Raises:
        DataError: no or unusable labels.csv, or ``out_dir`` converted with another cache spec.

    Example::

        path, report = convert("../shared/data/real/nih_cxr14_subset", "data/nih1000")
        report.extra["positives"]["test"]["Effusion"]
    """
    spec = spec or CacheSpec(size=0)
    if not spec.cache:
        raise ValueError("the thumbnails are RGB: they are always cached as grey PNGs (no --no-cache)")
    root, out_dir = Path(root), Path(out_dir).resolve()
    rows_path = root / "labels.csv"
    if not rows_path.is_file():
        raise DataError(rows_path, "labels.csv not found (is --root the nih_cxr14_subset folder?)")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = SubsetReport(NAME, out_dir)
    rows = read_labels(rows_path, report)
    check_settings(out_dir, {"converter": NAME, **spec.as_dict()})

    jobs = [PictureJob(Path(r.image_index).stem, str(root / r.path),
                       str(out_dir / "images" / f"{Path(r.image_index).stem}.png"), spec) for r in rows]
    results = run_items(cache_picture, jobs, workers=workers, report=report, key=lambda j: j.source,
                        desc=NAME, progress=progress)
    done: list[tuple[SubsetRow, str]] = []
    for row, res in zip(rows, results):
        if res is None:
            continue
        report.count("skipped_existing" if res["skipped"] else "images_written")
        done.append((row, res["image"]))
    report.count("images", len(done))

    split_of, moves = assign_patient_splits([(r.patient_id, r.split) for r, _ in done])
    sections: dict[str, list[dict[str, Any]]] = {s: [] for s in SECTIONS.values()}
    for row, image in done:
        sections[SECTIONS[split_of[row.patient_id]]].append(_entry(row, image))
    disagree = [r.image_index for r, _ in done
                if r.folder_class and (r.folder_class == "0_normal") != (r.labels[-1] == 1)]
    report.count("patients", len(split_of))
    report.count("patients_in_several_splits", len(moves))
    report.count("images_moved", sum(m["moved"] for m in moves))
    report.count("folder_class_disagrees", len(disagree))
    for name, entries in sections.items():
        report.count(name, len(entries))

    positives = class_positives(sections)
    report.extra = {
        "positives": positives,
        "min_positives": MIN_REPORTED_POSITIVES,
        "classes_with_min_positives": {
            s: [c for c in CLASSES if counts[c] >= MIN_REPORTED_POSITIVES] for s, counts in positives.items()
        },
        "split_rule": ("one split per patient: the one with most of its images, ties to the first of "
                       + ", ".join(SPLIT_PRIORITY)),
        "patient_moves": moves,
        "folder_class_disagrees": disagree,
    }
    datalist = write_datalist(
        out_dir / DATALIST_NAME, sections,
        name=f"NIH ChestX-ray14 1000-image subset ({spec.describe()})",
        description=("Converted by data_prep.nih_cxr14_subset from labels.csv (thumbs64 rows): labels = the 14 "
                     "findings + 'No Finding' (multi-hot, aligned with classes; abnormal = 1 - No Finding); "
                     "sections = the CSV split made patient-wise (each patient in the split holding most of its "
                     "images, ties to test, valid, train; source_split keeps the CSV's)."),
        classes=list(CLASSES),
    )
    write_datalist(
        out_dir / PRETRAIN_NAME,
        {"training": [{"image": e["image"], "case_id": e["case_id"], "patient_id": e["patient_id"]}
                      for e in sections["training"]]},
        name="NIH ChestX-ray14 1000-image subset, training images (unlabeled)",
        description=("The training section of datalist.json without labels, for pretraining: give it priors "
                     "with medspan build-priors (an exemplar from another set, e.g. an MHH lung case at the "
                     "same size), then train span_cxr on build-priors' datalist.json."),
    )
    return datalist, report


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``medspan prepare nih-cxr14-subset``."""
    parser.add_argument("--root", required=True, help="the nih_cxr14_subset folder (labels.csv, thumbs64/)")
    add_cache_arguments(parser, default_size=0, no_cache=False)
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Convert; print the datalist path. Exit status: 0, 1 (--strict and problems), 2 (cannot start)."""
    return run_converter(NAME, lambda: convert(args.root, args.out, spec_from_args(args), workers=args.workers,
                                               progress=not args.quiet), args.strict)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data_prep.nih_cxr14_subset --root R --out DIR [--size 0] [--workers 2]``."""
    return converter_main("data_prep.nih_cxr14_subset", __doc__, add_arguments, run, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
