"""CheXpert -> a MONAI datalist with 14 observations, an uncertainty policy and a view filter.

Input (``--root``: the ``CheXpert-v1.0-small`` folder, or ``CheXpert-v1.0``, or their parent)::

    CheXpert-v1.0-small/train.csv
    CheXpert-v1.0-small/valid.csv
    CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg ...
    CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg ...

CSV columns: ``Path, Sex, Age, Frontal/Lateral, AP/PA`` and the 14 observations ``No Finding,
Enlarged Cardiomediastinum, Cardiomegaly, Lung Opacity, Lung Lesion, Edema, Consolidation,
Pneumonia, Atelectasis, Pneumothorax, Pleural Effusion, Pleural Other, Fracture, Support
Devices``, each ``1.0`` (positive), ``0.0`` (negative), ``-1.0`` (uncertain) or blank (not
mentioned). ``Path`` starts with the dataset folder's name (``CheXpert-v1.0-small/train/...``)
and is resolved against the folder's parent (or, failing that, against the folder itself with
the first part dropped).

Labels (``classes``: the 14 observations in CSV order, or with ``--classes competition`` the 5
competition findings Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion):

=================  =========================================================================
value              label (``label_mask``)
=================  =========================================================================
1.0 / 0.0          1 / 0 (mask 1)
-1.0 (uncertain)   ``--uncertain`` for the 5 competition findings, ``--uncertain-other`` for
                   the rest (default: the same): ``ones`` -> 1, ``zeros`` -> 0 (mask 1);
                   ``ignore`` -> 0 with mask 0; ``--uncertain-for NAME=POLICY`` per finding
blank              ``--blank zeros`` (default) -> 0 (mask 1); ``--blank ignore`` -> 0, mask 0
=================  =========================================================================

``label_mask`` (aligned with ``classes``, 1 = use, 0 = ignore in the loss: multiply the
per-class loss by it) is written on every entry when some policy is ``ignore``; ``labels`` stay
finite numbers (MONAI collates them), the masked ones are 0.

Sections: ``training`` / ``validation`` = train.csv split by patient (``--val-fraction``,
``--seed``); ``test`` = valid.csv (the 234-image, 200-patient radiologist-labelled set that the
public releases carry; the hidden test set is not distributed). With ``--test-csv`` (e.g. the
later-released ``test_labels.csv``) that file is the test set, valid.csv is ``validation`` and
all of train.csv is ``training``. ``--views frontal`` (default), ``lateral`` or ``all`` selects
by the ``Frontal/Lateral`` column.

Entries: ``image``, ``case_id`` (``patient00001_study1_view1_frontal``), ``patient_id``,
``study``, ``view`` (Frontal/Lateral), ``projection`` (AP/PA/LL/RL), ``sex``, ``age``,
``labels`` [, ``label_mask``].

Problems (in report.json; the rest is converted): a row with too few cells, an unknown label
value, a repeated Path, an image that is missing or cannot be decoded.

Example::

    medspan prepare chexpert --root /data/CheXpert-v1.0-small --out data/chexpert320 --size 320 \\
        --uncertain ones --uncertain-other ignore --workers 2
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
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
    spec_from_args,
)

__all__ = [
    "COMPETITION",
    "OBSERVATIONS",
    "POLICIES",
    "ChexpertRecord",
    "add_arguments",
    "convert",
    "find_root",
    "label_vector",
    "main",
    "map_value",
    "read_chexpert_csv",
    "run",
]

META_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
OBSERVATIONS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
COMPETITION: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
POLICIES = ("ones", "zeros", "ignore")
NAME = "chexpert"
_VALUES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1, "": None}


@dataclass(frozen=True)
class ChexpertRecord:
    """One CSV row: the raw observation values (1, 0, -1 or None for blank) in :data:`OBSERVATIONS` order."""

    path: str
    case_id: str
    patient_id: str
    study: str
    view: str
    projection: str
    sex: str
    age: int | None
    values: tuple[int | None, ...]
    row: int


def map_value(value: int | None, uncertain: str, blank: str = "zeros") -> tuple[int, int]:
    """One raw value -> ``(label, mask)`` under the policies (see the module table).

    Example::

        map_value(-1, "ones"), map_value(-1, "ignore"), map_value(None, "zeros")   # (1, 1), (0, 0), (0, 1)
    """
    if uncertain not in POLICIES or blank not in ("zeros", "ignore"):
        raise ValueError(f"unknown policy uncertain={uncertain!r} blank={blank!r}")
    if value is None:
        return (0, 1) if blank == "zeros" else (0, 0)
    if value == -1:
        return {"ones": (1, 1), "zeros": (0, 1), "ignore": (0, 0)}[uncertain]
    if value in (0, 1):
        return int(value), 1
    raise ValueError(f"unknown CheXpert value {value!r}")


def label_vector(
    values: Sequence[int | None],
    classes: Sequence[str],
    uncertain: str = "ones",
    uncertain_other: str | None = None,
    blank: str = "zeros",
    per_class: Mapping[str, str] | None = None,
) -> tuple[list[int], list[int]]:
    """Raw values (in :data:`OBSERVATIONS` order) -> ``(labels, label_mask)`` over ``classes``.

    The uncertainty policy of a class is ``per_class[name]`` if given, else ``uncertain`` for the
    competition findings and ``uncertain_other`` (default ``uncertain``) for the rest.
    """
    other = uncertain if uncertain_other is None else uncertain_other
    per_class = dict(per_class or {})
    labels, mask = [], []
    for c in classes:
        policy = per_class.get(c, uncertain if c in COMPETITION else other)
        lab, m = map_value(values[OBSERVATIONS.index(c)], policy, blank)
        labels.append(lab)
        mask.append(m)
    return labels, mask


def _ids_from_path(path: str) -> tuple[str, str, str]:
    """``.../train/patient00001/study1/view1_frontal.jpg`` -> (case id, patient, study)."""
    parts = PurePosixPath(path.replace("\\", "/")).parts
    if len(parts) < 3:
        raise ValueError(f"Path {path!r} is not <split>/patientNNNNN/studyN/viewN_*.jpg")
    patient, study, view = parts[-3], parts[-2], PurePosixPath(parts[-1]).stem
    return f"{patient}_{study}_{view}", patient, study


def _cell(cells: Sequence[str], col: dict[str, int], key: str) -> str:
    """The stripped value of column ``key`` ('' when the column or the cell is absent)."""
    j = col.get(key)
    return cells[j].strip() if j is not None and j < len(cells) else ""


def read_chexpert_csv(path: str | os.PathLike, report: Report | None = None) -> list[ChexpertRecord]:
    """Read train.csv / valid.csv (or test_labels.csv); bad rows go to ``report`` and are skipped.

    Raises:
        DataError: missing file, or missing ``Path`` / observation columns.
    """
    path = Path(path)
    header, rows = read_csv(path)
    col = {h: i for i, h in enumerate(header)}
    missing = [c for c in ("Path",) + OBSERVATIONS if c not in col]
    if missing:
        raise DataError(path, f"missing column(s) {missing} (columns: {header})")
    need = max(col[c] for c in ("Path",) + OBSERVATIONS) + 1
    seen: dict[str, int] = {}
    out: list[ChexpertRecord] = []

    def bad(i: int, reason: str) -> None:
        if report is not None:
            report.problem(f"{path.name} row {i}", reason)

    for i, cells in enumerate(rows, start=1):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) < need:
            bad(i, f"only {len(cells)} cells, expected {need}")
            continue
        p = cells[col["Path"]].strip()
        try:
            case_id, patient, study = _ids_from_path(p)
        except ValueError as e:
            bad(i, str(e))
            continue
        if case_id in seen:
            bad(i, f"duplicate image {p} (first in row {seen[case_id]}); row skipped")
            continue
        raw = [cells[col[o]].strip() for o in OBSERVATIONS]
        wrong = [(o, r) for o, r in zip(OBSERVATIONS, raw) if r not in _VALUES]
        if wrong:
            bad(i, f"{p}: unknown value(s) {wrong} (expected 1.0, 0.0, -1.0 or blank)")
            continue
        seen[case_id] = i

        try:
            age = int(float(_cell(cells, col, "Age")))
        except ValueError:
            age = None
        out.append(ChexpertRecord(p, case_id, patient, study, _cell(cells, col, "Frontal/Lateral"), _cell(cells, col, "AP/PA"), _cell(cells, col, "Sex"),
                                  age, tuple(_VALUES[r] for r in raw), i))
    return out


def find_root(root: str | os.PathLike) -> Path:
    """The folder holding ``train.csv``: ``root`` itself or its ``CheXpert-v1.0-small`` / ``CheXpert-v1.0``."""
    root = Path(root)
    for cand in (root, root / "CheXpert-v1.0-small", root / "CheXpert-v1.0"):
        if (cand / "train.csv").is_file():
            return cand
    raise DataError(root, "no train.csv here or in CheXpert-v1.0-small/ or CheXpert-v1.0/")


def _resolve_image(folder: Path, rel: str) -> Path | None:
    p = PurePosixPath(rel.replace("\\", "/"))
    for cand in (folder.parent / p, folder / PurePosixPath(*p.parts[1:]) if len(p.parts) > 1 else None, folder / p):
        if cand is not None and cand.is_file():
            return cand
    return None


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------


def convert(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: CacheSpec | None = None,
    *,
    views: str = "frontal",
    uncertain: str = "ones",
    uncertain_other: str | None = None,
    per_class: Mapping[str, str] | None = None,
    blank: str = "zeros",
    classes: str = "all",
    test_csv: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> tuple[Path, Report]:
    """Convert CheXpert at ``root`` into ``out_dir``; returns ``(datalist path, report)``.

    Raises:
        DataError: no train.csv, a bad column layout, or ``out_dir`` made with another cache spec.

    Example::

        path, report = convert("/data/CheXpert-v1.0-small", "data/cx", CacheSpec(320), uncertain="zeros")
    """
    spec = spec or CacheSpec(size=320)
    if views not in ("frontal", "lateral", "all"):
        raise ValueError(f"views must be frontal, lateral or all, got {views!r}")
    class_names = list(COMPETITION if classes == "competition" else OBSERVATIONS)
    for name, pol in (per_class or {}).items():
        if name not in OBSERVATIONS or pol not in POLICIES:
            raise ValueError(f"--uncertain-for {name}={pol}: unknown observation or policy")
    folder = find_root(root)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(NAME, out_dir)
    check_settings(out_dir, {"converter": NAME, **spec.as_dict()})

    parts = {"train": read_chexpert_csv(folder / "train.csv", report)}
    if (folder / "valid.csv").is_file():
        parts["valid"] = read_chexpert_csv(folder / "valid.csv", report)
    if test_csv is not None:
        parts["test"] = read_chexpert_csv(test_csv, report)
    seen: dict[str, str] = {}
    records: list[tuple[str, ChexpertRecord, Path]] = []
    for part, recs in parts.items():
        for r in recs:
            if views != "all" and r.view.lower() != views:
                report.count("skipped_view")
                continue
            if r.case_id in seen:
                report.problem(f"{part}: {r.path}", f"image also listed in {seen[r.case_id]}; skipped")
                continue
            base = Path(test_csv).parent if part == "test" else folder
            src = _resolve_image(base, r.path) or _resolve_image(folder, r.path)
            if src is None:
                report.problem(r.path, f"image not found (CSV {part} row {r.row}, looked under {base.parent})")
                continue
            seen[r.case_id] = part
            records.append((part, r, src))

    jobs = [PictureJob(r.case_id, str(src), str(out_dir / "images" / f"{r.case_id}.png"), spec)
            for _, r, src in records]
    results = run_items(cache_picture, jobs, workers=workers, report=report, key=lambda j: j.source,
                        desc=NAME, progress=progress)
    any_ignore = blank == "ignore" or "ignore" in {uncertain, uncertain_other or uncertain, *(per_class or {}).values()}
    by_part: dict[str, list[dict[str, Any]]] = {p: [] for p in parts}
    for (part, r, _src), res in zip(records, results):
        if res is None:
            continue
        report.count("skipped_existing" if res["skipped"] else "images_written")
        labels, mask = label_vector(r.values, class_names, uncertain, uncertain_other, blank, per_class)
        e: dict[str, Any] = {
            "image": res["image"], "case_id": r.case_id, "patient_id": r.patient_id, "study": r.study,
            "view": r.view, "projection": r.projection, "sex": r.sex, "age": r.age, "labels": labels,
        }
        if any_ignore:
            e["label_mask"] = mask
        by_part[part].append(compact(e))
    report.count("images", sum(len(v) for v in by_part.values()))

    if test_csv is not None:
        training, validation, test = by_part["train"], by_part.get("valid", []), by_part["test"]
    else:
        training, validation = patient_split(by_part["train"], val_fraction, seed)
        test = by_part.get("valid", [])
    sections = {"training": training, "validation": validation, "test": test}
    policy = (f"uncertain: competition findings -> {uncertain}, others -> {uncertain_other or uncertain}"
              + (f", per class {dict(per_class)}" if per_class else "") + f"; blank -> {blank}")
    datalist = write_datalist(
        out_dir / "datalist.json", sections,
        name=f"CheXpert ({views} views, {spec.describe()})",
        description=(f"Converted by data_prep.chexpert from {folder.name}: {policy}. label_mask (when present) "
                     "is 0 where the label is to be ignored. test = "
                     + ("the --test-csv file; validation = valid.csv" if test_csv else
                        f"valid.csv; validation = a patient-wise part of train.csv (fraction {val_fraction}, seed {seed})")
                     + "."),
        classes=class_names,
    )
    for k, v in sections.items():
        report.count(k, len(v))
    return datalist, report


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _per_class(items: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for it in items or []:
        name, sep, pol = it.rpartition("=")
        if not sep:
            raise ValueError(f"--uncertain-for expects NAME=POLICY, got {it!r}")
        out[name.strip()] = pol.strip()
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``medspan prepare chexpert``."""
    parser.add_argument("--root", required=True, help="CheXpert-v1.0-small (or CheXpert-v1.0, or their parent)")
    parser.add_argument("--views", choices=("frontal", "lateral", "all"), default="frontal",
                        help="Frontal/Lateral filter (default frontal)")
    parser.add_argument("--uncertain", choices=POLICIES, default="ones",
                        help="uncertain (-1) labels of the 5 competition findings (default ones)")
    parser.add_argument("--uncertain-other", choices=POLICIES, default=None,
                        help="uncertain labels of the other observations (default: as --uncertain)")
    parser.add_argument("--uncertain-for", nargs="+", default=None, metavar="NAME=POLICY",
                        help="per-observation policy, e.g. 'Cardiomegaly=zeros'")
    parser.add_argument("--blank", choices=("zeros", "ignore"), default="zeros", help="blank (not mentioned) labels")
    parser.add_argument("--classes", choices=("all", "competition"), default="all",
                        help="all 14 observations or the 5 competition findings (default all)")
    parser.add_argument("--test-csv", default=None, help="official test labels CSV; then valid.csv is 'validation'")
    add_cache_arguments(parser, default_size=320)
    add_split_arguments(parser)
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Convert; print the datalist path. Exit status: 0, 1 (--strict and problems), 2 (cannot start)."""
    return run_converter(NAME, lambda: convert(
        args.root, args.out, spec_from_args(args), views=args.views, uncertain=args.uncertain,
        uncertain_other=args.uncertain_other, per_class=_per_class(args.uncertain_for), blank=args.blank,
        classes=args.classes, test_csv=args.test_csv, val_fraction=args.val_fraction, seed=args.seed,
        workers=args.workers, progress=not args.quiet), args.strict)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data_prep.chexpert --root R --out DIR [--size 320] [--uncertain ones] ...``."""
    return converter_main("data_prep.chexpert", __doc__, add_arguments, run, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
