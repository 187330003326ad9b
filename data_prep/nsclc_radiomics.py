"""NSCLC-Radiomics (and any CT + RTSTRUCT/SEG collection) -> per-structure NIfTI masks + datalist.

Input (``--root``), the TCIA layout (one series per folder)::

    NSCLC-Radiomics/LUNG1-001/<study>/<CT series>/1-001.dcm ...
    NSCLC-Radiomics/LUNG1-001/<study>/<RTSTRUCT series>/1-1.dcm
    NSCLC-Radiomics/LUNG1-001/<study>/<SEG series>/1-1.dcm        (optional)

Each folder's first DICOM header says what it holds: CT series folders are read with
:func:`medspan.data.readers.read_dicom_series` (sorted by position, HU, RAS affine); every
RTSTRUCT or SEG file is parsed with pydicom (highdicom is not needed).

Matching a structure set to its CT: the referenced SeriesInstanceUID (RTSTRUCT:
ReferencedFrameOfReferenceSequence / RTReferencedStudySequence / RTReferencedSeriesSequence;
SEG: ReferencedSeriesSequence), else the only CT series with the same FrameOfReferenceUID.
When a CT has both an RTSTRUCT and a SEG, ``--prefer`` (default ``rtstruct``) says which is used.

RTSTRUCT -> mask, per structure (StructureSetROISequence ROIName, ROIContourSequence):
each CLOSED_PLANAR contour goes to the slice whose SOPInstanceUID its ContourImageSequence
references, else to the slice at its position (within a quarter slice); its points (LPS mm) are
mapped to (column, row) with the CT's affine and filled with ``skimage.draw.polygon`` (pixel
centres inside the polygon). Several contours of one structure on one slice combine by XOR
(even-odd rule: a contour inside another is a hole). POINT / OPEN contours are counted, not drawn.
SEG -> mask: each frame (BINARY, or FRACTIONAL >= half the maximum) goes to the CT slice of its
ReferencedSOPInstanceUID (DerivationImageSequence / SourceImageSequence), else of its
PlanePositionSequence; the frames must lie on the CT's pixel grid.

Outputs (``--out``)::

    images/<case>.nii.gz                 CT, int16 HU, the series' RAS affine
    masks/<case>/<structure>.nii.gz      uint8 0/1 per structure, same grid and affine as the CT
    cases/<case>.json                    the case record (structures, sources, voxel counts, files)
    datalist.json                        entries {"image", "label", "case_id", "patient_id"}; label is
                                         a dict {structure: path}, or, with --structures, a list
                                         aligned with the top-level "structures"
    report.json / report.txt

Case ids are the PatientID (``LUNG1-001``; a second CT of the same patient gets ``_s2``).
Problems (a corrupt file, a structure set whose CT is not found, a structure name defined twice for
one CT, contours that fall on no slice, a case missing a ``--structures`` name) go to the report;
the rest is converted. ``--structures`` matches names case-insensitively ignoring non-alphanumerics
(``Lung-Left`` = ``lung_left``). ``--clinical`` adds the columns of a CSV (column ``PatientID``) to
each entry under ``clinical``.

Example::

    python -m data_prep.nsclc_radiomics --root /data/NSCLC-Radiomics --out data/nsclc \\
        --structures GTV-1 Lung-Left Lung-Right --workers 4
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from skimage.draw import polygon

from medspan.data.datalist import split_datalist
from medspan.data.readers import read_dicom_series
from medspan.errors import DataError
from medspan.io import write_json_atomic, write_nifti_atomic

from .common import (
    Report,
    add_common_arguments,
    converter_main,
    is_done,
    run_converter,
    run_items,
)
from .ct_common import (
    read_header,
    safe_name,
    sop_slice_index,
    world_to_voxel,
    write_datalist_if_changed,
)

__all__ = [
    "norm_name",
    "StructureSource",
    "discover",
    "rtstruct_masks",
    "seg_masks",
    "convert_case",
    "convert",
    "add_arguments",
    "run",
    "main",
]

SETTINGS_VERSION = 1


def norm_name(name: str) -> str:
    """Structure-name key: lower case, alphanumerics only (``"Lung-Left"`` -> ``"lungleft"``)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass
class StructureSource:
    """An RTSTRUCT or SEG file and the CT series it references."""

    path: str
    kind: str  # "rtstruct" | "seg"
    referenced_series: list[str] = field(default_factory=list)
    frame_of_reference: str = ""


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------


def _read_full(path: Path):
    try:
        return pydicom.dcmread(path)
    except Exception as e:
        raise DataError(path, f"corrupt DICOM file ({type(e).__name__}: {e})") from e


def _structure_source(path: Path, kind: str) -> StructureSource:
    ds = _read_full(path)
    refs: list[str] = []
    if kind == "rtstruct":
        for fr in ds.get("ReferencedFrameOfReferenceSequence", []) or []:
            for st in fr.get("RTReferencedStudySequence", []) or []:
                for se in st.get("RTReferencedSeriesSequence", []) or []:
                    if se.get("SeriesInstanceUID"):
                        refs.append(str(se.SeriesInstanceUID))
        frame = ""
        frs = ds.get("ReferencedFrameOfReferenceSequence") or []
        if frs and frs[0].get("FrameOfReferenceUID"):
            frame = str(frs[0].FrameOfReferenceUID)
        frame = frame or str(ds.get("FrameOfReferenceUID", "") or "")
    else:
        for se in ds.get("ReferencedSeriesSequence", []) or []:
            if se.get("SeriesInstanceUID"):
                refs.append(str(se.SeriesInstanceUID))
        frame = str(ds.get("FrameOfReferenceUID", "") or "")
    return StructureSource(str(path), kind, refs, frame)


@dataclass(frozen=True)
class Case:
    """One CT series with the structure files that reference it."""

    case_id: str
    patient_id: str
    series_dir: str
    series_uid: str
    sources: tuple[tuple[str, str], ...]  # (kind, path)


def discover(root: str | os.PathLike, prefer: str = "rtstruct", report: Report | None = None) -> list[Case]:
    """Find CT series folders and RTSTRUCT / SEG files under ``root`` and pair them (see module doc).

    Example::

        cases = discover("NSCLC-Radiomics", report=report)
        cases[0].case_id, cases[0].sources     # 'LUNG1-001', (('rtstruct', '.../1-1.dcm'),)
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "root folder not found")
    report = report or Report("nsclc_radiomics", root)
    cts: dict[str, tuple[Path, str, str]] = {}  # uid -> (folder, patient id, frame of reference)
    sources: list[StructureSource] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        folder = Path(dirpath)
        headers = []
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            try:
                h = read_header(folder / name)
            except DataError as e:
                report.problem(folder / name, e.problem)
                continue
            if h is None:
                continue
            if h.modality == "CT" and any(x.modality == "CT" for x in headers):
                continue
            headers.append(h)
            if h.modality == "CT" and len(headers) == 1:
                break  # a CT series folder (one series per folder): one header is enough
        for h in headers:
            if h.modality == "CT":
                uid = h.series_instance_uid
                if uid in cts:
                    report.problem(folder, f"duplicate CT series {uid}: also in {cts[uid][0]}; using that one")
                    continue
                pid = h.patient_id or folder.relative_to(root).parts[0]
                cts[uid] = (folder, pid, h.frame_of_reference_uid)
            elif h.modality in ("RTSTRUCT", "SEG"):
                try:
                    sources.append(_structure_source(h.path, h.modality.lower()))
                except DataError as e:
                    report.problem(h.path, e.problem)
            else:
                report.count("other_objects")

    by_ct: dict[str, list[StructureSource]] = {}
    for src in sources:
        uid = next((u for u in src.referenced_series if u in cts), None)
        if uid is None and src.frame_of_reference:
            same = [u for u, (_, _, f) in cts.items() if f == src.frame_of_reference]
            uid = same[0] if len(same) == 1 else None
        if uid is None:
            want = ", ".join(src.referenced_series) or f"frame of reference {src.frame_of_reference or '?'}"
            report.problem(src.path, f"{src.kind.upper()} refers to CT series {want}, which is not under {root}")
            continue
        by_ct.setdefault(uid, []).append(src)

    cases: list[Case] = []
    used: dict[str, int] = {}
    for uid, (folder, pid, _) in sorted(cts.items(), key=lambda kv: str(kv[1][0])):
        srcs = by_ct.get(uid, [])
        if not srcs:
            report.count("ct_series_without_structures")
            continue
        kinds = {s.kind for s in srcs}
        if len(kinds) > 1:
            srcs = [s for s in srcs if s.kind == prefer]
            report.count(f"ct_with_rtstruct_and_seg_used_{prefer}")
        used[pid] = used.get(pid, 0) + 1
        case_id = safe_name(pid) if used[pid] == 1 else f"{safe_name(pid)}_s{used[pid]}"
        cases.append(
            Case(case_id, pid, str(folder), uid, tuple((s.kind, s.path) for s in sorted(srcs, key=lambda s: s.path)))
        )
    return cases


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------


def _slice_of(k_sop: int | None, idx: np.ndarray, nz: int) -> int | None:
    if k_sop is not None:
        return k_sop
    z = float(np.mean(idx[:, 2]))
    k = int(round(z))
    return k if 0 <= k < nz and abs(z - k) <= 0.25 else None


def rtstruct_masks(
    path: str | os.PathLike, shape: Sequence[int], affine: np.ndarray, sop_to_k: dict[str, int]
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Rasterise every structure of an RTSTRUCT on the CT grid.

    Args:
        shape: the CT's ``(x, y, z)``; affine: its RAS affine; sop_to_k: SOPInstanceUID -> slice.

    Returns:
        ``({ROIName: bool mask (x, y, z)}, {ROIName: number of contours on no slice})``; names in
        StructureSetROISequence order, a name used twice raises DataError.

    Example::

        masks, missed = rtstruct_masks("rt.dcm", hu.shape, meta["affine"], sop_slice_index(folder, ...))
    """
    ds = _read_full(Path(path))
    nx, ny, nz = (int(s) for s in shape)
    names: dict[int, str] = {}
    for item in ds.get("StructureSetROISequence", []) or []:
        name = str(item.get("ROIName", "") or f"roi{item.ROINumber}").strip()
        if name in names.values():
            raise DataError(path, f"structure name {name!r} is used by two ROIs")
        names[int(item.ROINumber)] = name
    if not names or "ROIContourSequence" not in ds:
        raise DataError(path, "RTSTRUCT without StructureSetROISequence / ROIContourSequence (truncated file?)")
    masks = {name: np.zeros((nx, ny, nz), dtype=bool) for name in names.values()}
    missed = {name: 0 for name in names.values()}
    for rc in ds.ROIContourSequence:
        if "ReferencedROINumber" not in rc:
            raise DataError(path, "an ROIContourSequence item without ReferencedROINumber (truncated file?)")
        number = int(rc.ReferencedROINumber)
        if number not in names:
            raise DataError(path, f"ROIContourSequence refers to ROI number {number}, not in StructureSetROISequence")
        name = names[number]
        slices: dict[int, np.ndarray] = {}
        for c in rc.get("ContourSequence", []) or []:
            if str(c.get("ContourGeometricType", "CLOSED_PLANAR")).upper() != "CLOSED_PLANAR":
                continue
            if "ContourData" not in c:
                raise DataError(path, f"structure {name!r}: a contour without ContourData (truncated file?)")
            data = np.asarray([float(v) for v in c.ContourData], dtype=np.float64)
            n_points = int(c.get("NumberOfContourPoints", data.size // 3) or 0)
            if data.size % 3 or data.size != 3 * n_points:
                raise DataError(path, f"structure {name!r}: ContourData holds {data.size} values for {n_points} points")
            if data.size < 9:
                continue  # fewer than 3 points: no area
            idx = world_to_voxel(data.reshape(-1, 3), affine)
            sop = None
            images = c.get("ContourImageSequence") or []
            if images and images[0].get("ReferencedSOPInstanceUID"):
                sop = sop_to_k.get(str(images[0].ReferencedSOPInstanceUID))
            k = _slice_of(sop, idx, nz)
            if k is None:
                missed[name] += 1
                continue
            rr, cc = polygon(idx[:, 1], idx[:, 0], shape=(ny, nx))
            fill = np.zeros((nx, ny), dtype=bool)
            fill[cc, rr] = True
            slices[k] = slices[k] ^ fill if k in slices else fill
        for k, m in slices.items():
            masks[name][:, :, k] = m
    return masks, missed


def seg_masks(
    path: str | os.PathLike, shape: Sequence[int], affine: np.ndarray, sop_to_k: dict[str, int]
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Read every segment of a DICOM SEG onto the CT grid; same returns as :func:`rtstruct_masks`.

    Example::

        masks, missed = seg_masks("seg.dcm", hu.shape, meta["affine"], sop_to_k)
    """
    ds = _read_full(Path(path))
    nx, ny, nz = (int(s) for s in shape)
    if int(ds.get("Rows", 0)) != ny or int(ds.get("Columns", 0)) != nx:
        raise DataError(
            path,
            f"SEG frames are {ds.get('Rows')}x{ds.get('Columns')}, the CT slices {ny}x{nx}; "
            "only SEGs on the CT grid are supported",
        )
    names: dict[int, str] = {}
    for s in ds.get("SegmentSequence", []) or []:
        name = str(s.get("SegmentLabel", "") or f"segment{s.SegmentNumber}").strip()
        if name in names.values():
            raise DataError(path, f"segment label {name!r} is used by two segments")
        names[int(s.SegmentNumber)] = name
    try:
        frames = np.asarray(ds.pixel_array)
    except Exception as e:
        raise DataError(path, f"cannot decode the SEG frames ({type(e).__name__}: {e})") from e
    frames = frames.reshape(-1, ny, nx)
    if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        frames = frames >= float(ds.get("MaximumFractionalValue", 255)) / 2.0
    else:
        frames = frames > 0
    masks = {name: np.zeros((nx, ny, nz), dtype=bool) for name in names.values()}
    missed = {name: 0 for name in names.values()}
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != len(frames):
        raise DataError(path, f"{len(frames)} frames but {len(per_frame)} PerFrameFunctionalGroupsSequence items")

    def item(group, seq: str):
        for g in (group, shared):
            if g is not None and g.get(seq):
                return g.get(seq)[0]
        return None

    for f, fg in enumerate(per_frame):
        ident = item(fg, "SegmentIdentificationSequence")
        number = int(ident.ReferencedSegmentNumber) if ident is not None else -1
        if number not in names:
            raise DataError(path, f"frame {f + 1} refers to segment {number}, not in SegmentSequence")
        sop = None
        deriv = item(fg, "DerivationImageSequence")
        if deriv is not None and deriv.get("SourceImageSequence"):
            sop = sop_to_k.get(str(deriv.SourceImageSequence[0].get("ReferencedSOPInstanceUID", "")))
        plane = item(fg, "PlanePositionSequence")
        k = sop
        if plane is not None and plane.get("ImagePositionPatient") is not None:
            idx = world_to_voxel(np.asarray([[float(v) for v in plane.ImagePositionPatient]]), affine)
            if np.abs(idx[0, :2]).max() > 0.25:
                raise DataError(
                    path, f"frame {f + 1} is not on the CT's pixel grid (offset {idx[0, :2].round(2)} voxels)"
                )
            if k is None:
                k = _slice_of(None, idx, nz)
        if k is None:
            missed[names[number]] += 1
            continue
        masks[names[number]][:, :, k] |= frames[f].T
    return masks, missed


# --------------------------------------------------------------------------------------------
# one case, the dataset
# --------------------------------------------------------------------------------------------


def convert_case(job: dict[str, Any]) -> dict[str, Any]:
    """Convert one case (a :class:`Case` as a dict plus ``out``, ``settings``); returns its record.

    Problems that concern one structure (contours on no slice, a name defined twice) are listed
    in ``record["problems"]``; the other structures are still written.
    """
    out = Path(job["out"])
    case_id, settings = job["case_id"], job["settings"]
    record_path = out / "cases" / f"{case_id}.json"
    if record_path.is_file():
        try:
            old = json.loads(record_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if (
            old
            and old.get("settings") == settings
            and old.get("sources") == [list(s) for s in job["sources"]]
            and is_done(*[out / p for p in old.get("files", [])])
        ):
            old["skipped"] = True
            return old

    hu, meta = read_dicom_series(job["series_dir"])
    affine = np.asarray(meta["affine"], dtype=np.float64)
    sop_to_k = sop_slice_index(job["series_dir"], affine, hu.shape[2])
    problems: list[str] = []
    structures: dict[str, dict[str, Any]] = {}
    masks: dict[str, np.ndarray] = {}
    for kind, path in job["sources"]:
        try:
            found, missed = (rtstruct_masks if kind == "rtstruct" else seg_masks)(path, hu.shape, affine, sop_to_k)
        except DataError as e:
            problems.append(str(e))
            continue
        for name, m in found.items():
            if name in masks:
                problems.append(
                    f"{path}: structure {name!r} is also defined in {structures[name]['source']}; the first is used"
                )
                continue
            if missed[name]:
                problems.append(f"{path}: structure {name!r}: {missed[name]} contour(s)/frame(s) fall on no CT slice")
            masks[name] = m
            structures[name] = {"source": path, "kind": kind, "voxels": int(m.sum()), "missed": missed[name]}

    image = out / "images" / f"{case_id}.nii.gz"
    write_nifti_atomic(hu, image, affine, dtype="int16")
    files = [image]
    taken: set[str] = set()
    for name, m in masks.items():
        stem = safe_name(name, "structure")
        while stem.lower() in taken:  # names differing only in punctuation / case
            stem += "_"
        taken.add(stem.lower())
        p = out / "masks" / case_id / f"{stem}.nii.gz"
        write_nifti_atomic(m, p, affine, dtype="uint8")
        structures[name]["file"] = p.relative_to(out).as_posix()
        files.append(p)
    record = {
        "case_id": case_id,
        "patient_id": job["patient_id"],
        "series_instance_uid": job["series_uid"],
        "series_dir": job["series_dir"],
        "sources": [list(s) for s in job["sources"]],
        "settings": settings,
        "shape": [int(s) for s in hu.shape],
        "image": image.relative_to(out).as_posix(),
        "structures": structures,
        "problems": problems,
        "files": [p.relative_to(out).as_posix() for p in files],
    }
    write_json_atomic(record, record_path)
    record["skipped"] = False
    return record


def _read_clinical(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "clinical CSV not found")
    with open(p, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if "PatientID" not in (reader.fieldnames or []):
            raise DataError(p, f"no PatientID column (columns: {reader.fieldnames})")
        return {row["PatientID"].strip(): {k: v for k, v in row.items() if k != "PatientID"} for row in reader}


def convert(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    structures: Sequence[str] | None = None,
    prefer: str = "rtstruct",
    clinical: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    report: Report | None = None,
) -> Report:
    """Convert an NSCLC-Radiomics-like tree (see the module doc); returns the report.

    Example::

        report = convert("NSCLC-Radiomics", "data/nsclc", structures=["GTV-1"])
    """
    if prefer not in ("rtstruct", "seg"):
        raise ValueError(f"prefer must be 'rtstruct' or 'seg', got {prefer!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = report or Report("nsclc_radiomics", out)
    clin = _read_clinical(clinical) if clinical else {}
    cases = discover(root, prefer, report)
    settings = {"version": SETTINGS_VERSION}
    jobs = [dict(c.__dict__, out=str(out), settings=settings) for c in cases]
    records = run_items(
        convert_case,
        jobs,
        workers=workers,
        report=report,
        key=lambda j: f"{j['case_id']} ({j['series_dir']})",
        desc="nsclc-radiomics",
        progress=progress,
    )
    entries = []
    for rec in records:
        if rec is None:
            continue
        report.count("cases")
        report.count("skipped_existing" if rec.get("skipped") else "converted")
        for p in rec["problems"]:
            report.problem(rec["case_id"], p)
        names = rec["structures"]
        report.count("structures", len(names))
        entry: dict[str, Any] = {
            "image": str(out / rec["image"]),
            "case_id": rec["case_id"],
            "patient_id": rec["patient_id"],
        }
        if structures:
            by_key = {norm_name(n): n for n in names}
            missing = [s for s in structures if norm_name(s) not in by_key]
            if missing:
                report.problem(rec["case_id"], f"structure(s) {missing} not found; it has {sorted(names)}")
                continue
            entry["label"] = [str(out / names[by_key[norm_name(s)]]["file"]) for s in structures]
        else:
            entry["label"] = {n: str(out / v["file"]) for n, v in names.items()}
        if rec["patient_id"] in clin:
            entry["clinical"] = clin[rec["patient_id"]]
        entries.append(entry)
    train, val = split_datalist(entries, val_fraction, seed=seed, group_key="patient_id") if entries else ([], [])
    meta: dict[str, Any] = {
        "name": "NSCLC-Radiomics structures",
        "modality": "CT",
        "description": "per-structure uint8 masks from RTSTRUCT / SEG (data_prep.nsclc_radiomics)",
    }
    if structures:
        meta["structures"] = list(structures)
    write_datalist_if_changed(out / "datalist.json", {"training": train, "validation": val, "test": []}, **meta)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``medspan prepare nsclc-radiomics`` / ``python -m data_prep.nsclc_radiomics``."""
    parser.add_argument("--root", required=True, help="NSCLC-Radiomics folder (TCIA layout)")
    parser.add_argument(
        "--structures",
        nargs="+",
        default=None,
        help="structures for the datalist's aligned label list (e.g. GTV-1 Lung-Left Lung-Right)",
    )
    parser.add_argument(
        "--prefer",
        choices=("rtstruct", "seg"),
        default="rtstruct",
        help="which to use when a CT has both an RTSTRUCT and a SEG (default rtstruct)",
    )
    parser.add_argument("--clinical", default=None, help="clinical CSV with a PatientID column (optional)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation fraction, by patient (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Convert and write the report; 1 only with ``--strict`` and problems, 2 on fatal errors."""
    return run_converter("nsclc_radiomics", lambda: convert(
        args.root,
        args.out,
        structures=args.structures,
        prefer=args.prefer,
        clinical=args.clinical,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
    ), args.strict)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data_prep.nsclc_radiomics --root R --out D [--structures GTV-1 ...] [--workers N]``."""
    return converter_main("data_prep.nsclc_radiomics", __doc__, add_arguments, run, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
