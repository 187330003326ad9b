"""NIH ChestX-ray14 -> a MONAI datalist with 14 findings + "No Finding", official split and boxes.

Input (``--root``, the dataset folder as downloaded from NIH's Box or Kaggle)::

    Data_Entry_2017_v2020.csv        (or Data_Entry_2017.csv; --csv to name another)
    BBox_List_2017.csv               optional: 984 boxes on 880 images
    train_val_list.txt, test_list.txt   optional: the official split, one Image Index per line
    images/00000001_000.png ...      or images_001/images/... (Kaggle), or images_001/... ;
                                     1024 x 1024 8-bit PNGs (a few are RGBA: made grey)

``Data_Entry_2017*.csv`` columns: ``Image Index, Finding Labels, Follow-up #, Patient ID,
Patient Age, Patient Gender, View Position, OriginalImage[Width, Height],
OriginalImagePixelSpacing[x, y]``. The bracketed headers contain an unquoted comma, so they
span two CSV cells each (and the 2017 file has a trailing empty column): the first seven
columns are found by name ("Patient Sex" is accepted for "Patient Gender"), the size and
spacing by position after their header cell. ``Finding Labels`` is ``|``-separated; ``Patient
Age`` is ``58`` (or ``058Y`` in old copies). ``BBox_List_2017.csv``: header ``Image Index,
Finding Label, Bbox [x, y, w, h]`` + empty cells; rows ``name, label, x, y, w, h`` in pixels of
the 1024 x 1024 image; its label "Infiltrate" is the "Infiltration" of the entry table.

Output (``--out``)::

    images/<Image Index stem>.png     the cache (--size, --fit, --bits; --no-cache: none)
    datalist.json                     classes = the 14 findings (CheXNet order) + "No Finding"
    conversion.json, report.json, report.txt

Entries: ``image``, ``case_id`` (Image Index without ``.png``), ``image_index``,
``patient_id``, ``labels`` (multi-hot over ``classes``: the 14 findings, then "No Finding",
which is 1 exactly when no finding is), ``findings`` (the CSV text), ``follow_up``, ``age``,
``sex``, ``view``, and for boxed images ``boxes`` (``[x_min, y_min, x_max, y_max]`` in
cached-image pixels) with ``box_labels`` (class names). Sections: ``test`` = ``test_list.txt``;
``training`` / ``validation`` = ``train_val_list.txt`` split by patient (``--val-fraction``,
``--seed``). Without the list files every image goes to training/validation.

Problems (listed in report.json, the rest is converted): an entry row with too few cells, an
empty or repeated Image Index, an unknown finding, "No Finding" together with a finding, an
image that is missing or cannot be decoded, a box row that cannot be read. ``--strict`` makes
them an exit status 1.

Example::

    medspan prepare nih-cxr14 --root /data/NIH --out data/nih512 --size 512 --workers 2
    python -m data_prep.nih_cxr14 --root /data/NIH --out data/nih_src --no-cache
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medspan.data.datalist import write_datalist
from medspan.errors import DataError

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
    add_split_arguments,
    cache_picture,
    check_settings,
    compact,
    patient_split,
    read_csv,
    scale_boxes,
    spec_from_args,
)

__all__ = [
    "CLASSES",
    "FINDINGS",
    "NihRecord",
    "add_arguments",
    "convert",
    "find_images",
    "main",
    "parse_age",
    "parse_findings",
    "read_bbox_list",
    "read_data_entry",
    "read_image_list",
    "run",
]

#: the 14 findings in the order of the ChestX-ray14 / CheXNet papers
FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"
CLASSES: tuple[str, ...] = FINDINGS + (NO_FINDING,)
#: BBox_List_2017.csv names -> entry-table names
BOX_ALIASES = {"Infiltrate": "Infiltration"}
ENTRY_CSVS = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
BBOX_CSV = "BBox_List_2017.csv"
NAME = "nih_cxr14"


@dataclass(frozen=True)
class NihRecord:
    """One row of the entry table (``row``: 1-based data row number, header not counted)."""

    image_index: str
    findings: str
    labels: tuple[int, ...]
    patient_id: str
    follow_up: int | None
    age: int | None
    sex: str
    view: str
    original_size: tuple[int, int] | None
    spacing: tuple[float, float] | None
    row: int


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------


def parse_findings(text: str) -> tuple[int, ...]:
    """``"Effusion|Mass"`` -> multi-hot over :data:`CLASSES` (15 values).

    Raises:
        ValueError: an unknown finding, an empty label, or "No Finding" with a finding.

    Example::

        parse_findings("Cardiomegaly|Effusion")[:3]   # (0, 1, 1)
        parse_findings("No Finding")[-1]              # 1
    """
    tokens = [t.strip() for t in text.split("|")]
    if not text.strip() or any(not t for t in tokens):
        raise ValueError(f"empty finding in {text!r}")
    unknown = [t for t in tokens if t not in CLASSES]
    if unknown:
        raise ValueError(f"unknown finding(s) {unknown} in {text!r} (known: {', '.join(CLASSES)})")
    if NO_FINDING in tokens and len(set(tokens)) > 1:
        raise ValueError(f"'No Finding' together with findings in {text!r}")
    return tuple(int(c in tokens) for c in CLASSES)


def parse_age(text: str) -> int | None:
    """``"58"``, ``"058Y"`` -> 58; months/days (``"006M"``, ``"020D"``) -> 0; anything else -> None."""
    m = re.fullmatch(r"\s*(\d+)\s*([YyMmDd]?)\s*", text or "")
    if not m:
        return None
    return int(m.group(1)) if m.group(2).upper() in ("", "Y") else 0


def _int_or_none(text: str) -> int | None:
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return None


def _pair(cells: list[str], header: list[str], prefix: str, cast: type) -> tuple | None:
    """The two values of a bracketed NIH column (split over two cells, or one quoted cell)."""
    pos = next((i for i, h in enumerate(header) if h.startswith(prefix)), None)
    if pos is None or pos >= len(cells):
        return None
    try:
        if "," in header[pos]:  # quoted header: one cell "w,h"
            a, b = cells[pos].split(",")
        else:
            a, b = cells[pos], cells[pos + 1]
        return cast(float(a)), cast(float(b))
    except (ValueError, IndexError):
        return None


def _cell(cells: Sequence[str], col: dict[str, int], key: str) -> str:
    """The stripped value of column ``key`` ('' when the column or the cell is absent)."""
    j = col.get(key)
    return cells[j].strip() if j is not None and j < len(cells) else ""


def read_data_entry(path: str | os.PathLike, report: Report | None = None) -> list[NihRecord]:
    """Read ``Data_Entry_2017*.csv``; bad rows go to ``report`` (item ``<file> row N``) and are skipped.

    A repeated Image Index keeps its first row.

    Raises:
        DataError: the file is missing or lacks ``Image Index`` / ``Finding Labels`` / ``Patient ID``.
    """
    path = Path(path)
    header, rows = read_csv(path)
    col = {h: i for i, h in enumerate(header)}
    if "Patient Gender" not in col and "Patient Sex" in col:
        col["Patient Gender"] = col["Patient Sex"]
    missing = [c for c in ("Image Index", "Finding Labels", "Patient ID") if c not in col]
    if missing:
        raise DataError(path, f"missing column(s) {missing} (columns: {header})")
    need = max(col[c] for c in ("Image Index", "Finding Labels", "Patient ID")) + 1
    out: list[NihRecord] = []
    first_row: dict[str, int] = {}

    def bad(i: int, reason: str) -> None:
        if report is not None:
            report.problem(f"{path.name} row {i}", reason)

    for i, cells in enumerate(rows, start=1):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) < need:
            bad(i, f"only {len(cells)} cells, expected at least {need}")
            continue
        name = cells[col["Image Index"]].strip()
        if not name or "/" in name or "\\" in name:
            bad(i, f"unusable Image Index {name!r}")
            continue
        if name in first_row:
            bad(i, f"duplicate Image Index {name} (first in row {first_row[name]}); row skipped")
            continue
        first_row[name] = i
        text = cells[col["Finding Labels"]].strip()
        try:
            labels = parse_findings(text)
        except ValueError as e:
            bad(i, f"{name}: {e}")
            continue

        out.append(NihRecord(
            image_index=name,
            findings=text,
            labels=labels,
            patient_id=_cell(cells, col, "Patient ID"),
            follow_up=_int_or_none(_cell(cells, col, "Follow-up #")),
            age=parse_age(_cell(cells, col, "Patient Age")),
            sex=_cell(cells, col, "Patient Gender"),
            view=_cell(cells, col, "View Position"),
            original_size=_pair(cells, header, "OriginalImage[", int),
            spacing=_pair(cells, header, "OriginalImagePixelSpacing[", float),
            row=i,
        ))
    return out


def read_bbox_list(path: str | os.PathLike, report: Report | None = None) -> dict[str, list[tuple[str, list[float]]]]:
    """``BBox_List_2017.csv`` -> ``{Image Index: [(finding, [x_min, y_min, x_max, y_max]), ...]}``.

    Columns are taken by position (name, label, x, y, w, h); the label "Infiltrate" becomes
    "Infiltration". Unreadable rows go to ``report``.
    """
    path = Path(path)
    _header, rows = read_csv(path)
    boxes: dict[str, list[tuple[str, list[float]]]] = {}
    for i, cells in enumerate(rows, start=1):
        if not any(c.strip() for c in cells):
            continue
        try:
            name, label = cells[0].strip(), cells[1].strip()
            x, y, w, h = (float(c) for c in cells[2:6])
        except (ValueError, IndexError):
            if report is not None:
                report.problem(f"{path.name} row {i}", f"cannot read box row {cells!r}")
            continue
        label = BOX_ALIASES.get(label, label)
        if label not in FINDINGS or w <= 0 or h <= 0:
            if report is not None:
                report.problem(f"{path.name} row {i}", f"unknown finding {label!r} or empty box w={w} h={h}")
            continue
        boxes.setdefault(name, []).append((label, [x, y, x + w, y + h]))
    return boxes


def read_image_list(path: str | os.PathLike) -> list[str]:
    """An official list file (one Image Index per line; blank lines ignored)."""
    p = Path(path)
    try:
        return [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(p, f"cannot read the image list ({e})") from e


def find_images(root: str | os.PathLike, report: Report | None = None) -> dict[str, Path]:
    """``{file name: path}`` of the PNGs in ``images/``, ``images_*/images/`` and ``images_*/``.

    A name found twice keeps its first place (folders in sorted order) and is reported.
    """
    root = Path(root)
    folders = [root / "images"] + sorted(root.glob("images_*/images")) + sorted(root.glob("images_*"))
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as it:
            for e in sorted(it, key=lambda d: d.name):
                if not e.name.lower().endswith(".png") or not e.is_file():
                    continue
                if e.name in found:
                    if report is not None:
                        report.problem(e.path, f"duplicate image file name (using {found[e.name]})")
                    continue
                found[e.name] = Path(e.path)
    return found


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------


def _entry(rec: NihRecord, result: dict[str, Any], boxes: list[tuple[str, list[float]]] | None) -> dict[str, Any]:
    e: dict[str, Any] = {
        "image": result["image"],
        "case_id": Path(rec.image_index).stem,
        "image_index": rec.image_index,
        "patient_id": rec.patient_id,
        "labels": list(rec.labels),
        "findings": rec.findings,
        "follow_up": rec.follow_up,
        "age": rec.age,
        "sex": rec.sex,
        "view": rec.view,
    }
    if boxes:
        e["boxes"] = scale_boxes([b for _, b in boxes], result["src_shape"], result["out_shape"])
        e["box_labels"] = [lab for lab, _ in boxes]
    return compact(e)


def convert(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: CacheSpec | None = None,
    *,
    csv_path: str | os.PathLike | None = None,
    boxes: bool = True,
    views: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> tuple[Path, Report]:
    """Convert NIH ChestX-ray14 at ``root`` into ``out_dir``; returns ``(datalist path, report)``.

    Raises:
        DataError: no entry table, or ``out_dir`` was converted with another cache spec.

    Example::

        path, report = convert("/data/NIH", "data/nih256", CacheSpec(256), workers=2)
    """
    spec = spec or CacheSpec(size=512)
    root, out_dir = Path(root), Path(out_dir).resolve()
    if csv_path is None:
        csv_path = next((root / n for n in ENTRY_CSVS if (root / n).is_file()), root / ENTRY_CSVS[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(NAME, out_dir)
    records = read_data_entry(csv_path, report)
    known = {r.image_index for r in records}
    check_settings(out_dir, {"converter": NAME, **spec.as_dict()})
    if views:
        wanted = {v.upper() for v in views}
        kept = [r for r in records if r.view.upper() in wanted]
        report.count("skipped_view", len(records) - len(kept))
        records = kept
    box_table = read_bbox_list(root / BBOX_CSV, report) if boxes and (root / BBOX_CSV).is_file() else {}

    images = find_images(root, report)
    present: list[NihRecord] = []
    for r in records:
        if r.image_index in images:
            present.append(r)
        else:
            report.problem(r.image_index, f"image file not found under {root} (entry table row {r.row})")
    for name in sorted(set(box_table) - known):
        report.problem(f"{BBOX_CSV}: {name}", "boxed image is not in the entry table")

    jobs = [PictureJob(Path(r.image_index).stem, str(images[r.image_index]),
                       str(out_dir / "images" / f"{Path(r.image_index).stem}.png"), spec) for r in present]
    results = run_items(cache_picture, jobs, workers=workers, report=report, key=lambda j: j.source,
                        desc=NAME, progress=progress)
    entries: dict[str, dict[str, Any]] = {}
    for rec, res in zip(present, results):
        if res is None:
            continue
        report.count("skipped_existing" if res["skipped"] else "images_written")
        entries[rec.image_index] = _entry(rec, res, box_table.get(rec.image_index))
    report.count("images", len(entries))
    report.count("boxed_images", sum("boxes" in e for e in entries.values()))

    train_list, test_list = root / "train_val_list.txt", root / "test_list.txt"
    if train_list.is_file() and test_list.is_file():
        trainval_names, test_names = read_image_list(train_list), read_image_list(test_list)
        for lst, names in ((train_list, trainval_names), (test_list, test_names)):
            for n in sorted(set(names) - known):
                report.problem(f"{lst.name}: {n}", "listed image is not in the entry table")
        listed = set(trainval_names) | set(test_names)
        report.count("not_in_official_lists", sum(1 for n in entries if n not in listed))
        trainval = [entries[n] for n in trainval_names if n in entries]
        test = [entries[n] for n in test_names if n in entries]
    else:
        report.count("no_official_split")
        trainval, test = list(entries.values()), []
    training, validation = patient_split(trainval, val_fraction, seed)
    sections = {"training": training, "validation": validation}
    if test:
        sections["test"] = test
    datalist = write_datalist(
        out_dir / "datalist.json", sections,
        name=f"NIH ChestX-ray14 ({spec.describe()})",
        description=("Converted by data_prep.nih_cxr14: labels = the 14 findings + 'No Finding' (multi-hot, "
                     "aligned with classes); test = test_list.txt; validation = a patient-wise part of "
                     f"train_val_list.txt (fraction {val_fraction}, seed {seed}); boxes [x_min, y_min, x_max, y_max] "
                     "in cached-image pixels."),
        classes=list(CLASSES),
    )
    report.count("training", len(training))
    report.count("validation", len(validation))
    report.count("test", len(test))
    return datalist, report


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``medspan prepare nih-cxr14``."""
    parser.add_argument("--root", required=True, help="the ChestX-ray14 folder (Data_Entry_2017*.csv, images...)")
    parser.add_argument("--csv", default=None, help="entry table (default: Data_Entry_2017_v2020.csv, else Data_Entry_2017.csv)")
    parser.add_argument("--no-boxes", action="store_true", help="ignore BBox_List_2017.csv")
    parser.add_argument("--views", nargs="+", default=None, metavar="VIEW", help="keep only these View Positions (PA AP)")
    add_cache_arguments(parser, default_size=512)
    add_split_arguments(parser)
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Convert; print the datalist path. Exit status: 0, 1 (--strict and problems), 2 (cannot start)."""
    return run_converter(NAME, lambda: convert(
        args.root, args.out, spec_from_args(args), csv_path=args.csv, boxes=not args.no_boxes, views=args.views,
        val_fraction=args.val_fraction, seed=args.seed, workers=args.workers, progress=not args.quiet), args.strict)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data_prep.nih_cxr14 --root R --out DIR [--size 512] [--workers 2] ...``."""
    return converter_main("data_prep.nih_cxr14", __doc__, add_arguments, run, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
