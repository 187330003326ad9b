"""Any folder tree of DICOM / PNG / NIfTI images (no labels) -> an unlabeled pretraining datalist.

Every file under ``--root`` is looked at once (hidden files and folders, and ``--out`` when it lies
inside the root, are skipped):

- PNG / JPEG / BMP / TIFF -> one 2D entry each (the file itself).
- NIfTI (``.nii``, ``.nii.gz``) and MHA / NRRD -> one entry each; 2D or 3D from the header.
- DICOM (the ``DICM`` preamble, or a ``.dcm`` / no suffix file that parses as DICOM), grouped by
  SeriesInstanceUID:

  * non-image objects (RTSTRUCT, SR, PR, SEG, KO, REG, RTPLAN, RTDOSE, DICOMDIR..., see
    :func:`data_prep.ct_common.classify_header`) are skipped and counted (``non_image_objects``);
    localizers / scouts (ImageType ``LOCALIZER``) are skipped and counted (``localizers``);
    derived images (ImageType ``DERIVED`` or ``SECONDARY``) only with ``--skip-derived``
    (``derived_images``);
  * a series of two or more single-frame images that all carry ImagePositionPatient and
    ImageOrientationPatient (CT, MR, PET) is a **3D series**: it is read with
    :func:`medspan.data.readers.read_dicom_series` (which checks one orientation, one size, one
    spacing and regular slice gaps) and written as one NIfTI, ``series/<case_id>.nii.gz`` (HU,
    int16 when integral, RAS affine). Choice: a NIfTI rather than the series folder, because
    folders often mix series and loading one NIfTI is much faster than parsing hundreds of
    slices at every epoch. ``--series-output folder`` points the entry at the series folder
    instead when that folder holds no other image series (the series is still read once to
    check it);
  * any other image (radiographs: CR / DX / MG ..., a single slice) is a **2D entry** pointing at
    the DICOM file itself (read by :class:`medspan.data.readers.MedspanReader`).

Problems go to the report, per file or per series, and the rest is converted: a corrupt file, a
file that cannot be decoded, a series with missing slices or mixed orientations (the reader's
message names the series), a DICOM file whose SOPInstanceUID was already seen (a duplicate copy:
the first is used), a broken link. With ``--verify`` (default on) every 2D file and volume is
decoded once; ``--no-verify`` only reads headers.

Outputs (``--out``)::

    series/<case_id>.nii.gz     3D DICOM series as NIfTI (atomic; a re-run skips existing ones)
    datalist.json               every entry: {"image", "case_id", "ndim", "source", "modality"?,
                                "patient_id"?, "series_instance_uid"?}; training (+ validation
                                with --val-fraction, by patient)
    datalist_2d.json, datalist_3d.json   the same entries split by dimension (each written when non-empty)
    report.json / report.txt

Case ids: 3D series ``<PatientID>_<10 hex of sha1(SeriesInstanceUID)>``; files: their path
relative to the root with ``/`` -> ``__`` and the suffix dropped.

Example::

    python -m data_prep.folder --root /data/unlabeled_ct --out data/unlabeled --workers 4 --skip-derived
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medspan.data.datalist import spatial_shape, split_datalist
from medspan.data.readers import read_dicom_series, read_image
from medspan.errors import DataError
from medspan.io import write_json_atomic, write_nifti_atomic

from .common import (
    Report,
    add_common_arguments,
    converter_main,
    is_done,
    refuse_non_finite,
    run_converter,
    run_items,
)
from .ct_common import (
    DicomHeader,
    classify_header,
    integral_dtype,
    read_header,
    safe_name,
    write_datalist_if_changed,
)

__all__ = ["scan", "plan", "convert", "add_arguments", "run", "main"]

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")


def _kind_by_suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(PIL_SUFFIXES):
        return "pil"
    if name.endswith(VOLUME_SUFFIXES):
        return "volume"
    return "maybe_dicom"


def _files(root: Path, exclude: Path | None) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (exclude is None or (here / d).resolve() != exclude)
        )
        out += [here / f for f in sorted(filenames) if not f.startswith(".")]
    return out


def _scan_one(path: Path) -> tuple[str, Any]:
    """``(kind, payload)``: ("pil" | "volume", path), ("dicom", DicomHeader) or ("other", path)."""
    kind = _kind_by_suffix(path)
    if kind != "maybe_dicom":
        if not path.exists():
            raise DataError(path, "file does not exist (broken link?)")
        return kind, path
    header = read_header(path)
    return ("dicom", header) if header is not None else ("other", path)


def scan(
    root: str | os.PathLike,
    report: Report,
    workers: int = 1,
    progress: bool = True,
    exclude: str | os.PathLike | None = None,
) -> list[tuple[str, Any]]:
    """Look at every file under ``root`` once (headers only); unreadable files go to the report.

    Example::

        found = scan("data/mixed", report)      # [('dicom', DicomHeader(...)), ('pil', Path(...)), ...]
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "folder not found")
    ex = Path(exclude).resolve() if exclude is not None else None
    files = _files(root, ex)
    found = run_items(_scan_one, files, workers=workers, report=report, key=str, desc="scan", progress=progress)
    return [f for f in found if f is not None]


def _file_case_id(root: Path, path: Path) -> str:
    rel = path.relative_to(root).as_posix()
    for suffix in (".nii.gz",) + PIL_SUFFIXES + VOLUME_SUFFIXES + (".dcm", ".dicom"):
        if rel.lower().endswith(suffix):
            rel = rel[: -len(suffix)]
            break
    return safe_name(rel.replace("/", "__"))


def plan(
    root: str | os.PathLike, found: Sequence[tuple[str, Any]], report: Report, skip_derived: bool = False
) -> list[dict[str, Any]]:
    """Turn scanned files into jobs: ``{"kind": "file2d" | "volume" | "dicom2d" | "series", ...}``.

    Counts skipped objects in the report (non-image, localizer, derived, other files) and reports
    duplicated SOPInstanceUIDs and multi-frame files.
    """
    root = Path(root)
    jobs: list[dict[str, Any]] = []
    series: dict[str, list[DicomHeader]] = {}
    seen_sop: dict[str, Path] = {}
    for kind, payload in found:
        if kind == "other":
            report.count("other_files")
        elif kind in ("pil", "volume"):
            jobs.append(
                {
                    "kind": "file2d" if kind == "pil" else "volume",
                    "path": str(payload),
                    "case_id": _file_case_id(root, payload),
                }
            )
        else:
            h: DicomHeader = payload
            what = classify_header(h, skip_derived)
            if what != "image":
                report.count(
                    {"non_image": "non_image_objects", "localizer": "localizers", "derived": "derived_images"}[what]
                )
                if what == "non_image":
                    report.count(f"non_image_{h.modality or 'unknown'}")
                continue
            if h.sop_instance_uid and h.sop_instance_uid in seen_sop:
                report.problem(
                    h.path,
                    f"duplicate SOPInstanceUID {h.sop_instance_uid}: also {seen_sop[h.sop_instance_uid]};"
                    " the first is used",
                )
                continue
            if h.sop_instance_uid:
                seen_sop[h.sop_instance_uid] = h.path
            if h.frames > 1:
                report.problem(h.path, f"multi-frame DICOM ({h.frames} frames) is not supported")
                continue
            series.setdefault(h.series_instance_uid, []).append(h)
    for uid, headers in sorted(series.items(), key=lambda kv: str(kv[1][0].path)):
        volumetric = len(headers) >= 2 and all(h.position is not None and h.orientation is not None for h in headers)
        if volumetric:
            pid = headers[0].patient_id or "series"
            digest = hashlib.sha1(uid.encode()).hexdigest()[:10]
            folders = {h.path.parent for h in headers}
            jobs.append(
                {
                    "kind": "series",
                    "files": [str(h.path) for h in headers],
                    "series_instance_uid": uid,
                    "case_id": f"{safe_name(pid)}_{digest}",
                    "patient_id": headers[0].patient_id,
                    "modality": headers[0].modality,
                    "folder": str(folders.pop()) if len(folders) == 1 else None,
                }
            )
        else:
            for h in headers:
                jobs.append(
                    {
                        "kind": "dicom2d",
                        "path": str(h.path),
                        "case_id": _file_case_id(root, h.path),
                        "patient_id": h.patient_id,
                        "modality": h.modality,
                        "series_instance_uid": uid,
                    }
                )
    return jobs


def _volume_ndim(path: str) -> int:
    try:
        shape = spatial_shape(path)
    except Exception as e:  # nibabel / SimpleITK raise many kinds on a bad header
        raise DataError(path, f"cannot read the header ({type(e).__name__}: {e})") from e
    dims = [s for s in (shape or ())[:3]]
    return 3 if len(dims) == 3 and dims[2] > 1 else 2


def convert_job(job: dict[str, Any]) -> dict[str, Any]:
    """Do one job of :func:`plan` (module level, for worker processes); returns its datalist entry."""
    kind = job["kind"]
    entry: dict[str, Any] = {"case_id": job["case_id"]}
    for key in ("patient_id", "modality", "series_instance_uid"):
        if job.get(key):
            entry[key] = job[key]
    if kind in ("file2d", "dicom2d", "volume"):
        if job["verify"]:
            array, meta = read_image(job["path"])  # decodes: a corrupt file raises DataError
            refuse_non_finite(array, job["path"])  # NaN voxels: a named problem, not an entry
            shape = [int(v) for v in meta["spatial_shape"]]
            ndim = 3 if len(shape) >= 3 and shape[2] > 1 else 2
        else:
            ndim = _volume_ndim(job["path"]) if kind == "volume" else 2
        return dict(entry, image=job["path"], ndim=ndim, source=kind, skipped=False)

    out = Path(job["out"])
    nifti = out / "series" / f"{job['case_id']}.nii.gz"
    marker = out / "series" / f"{job['case_id']}.json"
    if job["series_output"] == "folder" and job["folder"] and job["folder_alone"]:
        if is_done(marker):
            return dict(entry, image=job["folder"], ndim=3, source="series", skipped=True)
        array, meta = read_dicom_series(job["files"])
        write_json_atomic(
            {"series_instance_uid": job["series_instance_uid"], "shape": list(array.shape), "spacing": meta["spacing"]},
            marker,
        )
        return dict(entry, image=job["folder"], ndim=3, source="series", skipped=False)
    if is_done(nifti):
        return dict(entry, image=str(nifti), ndim=3, source="series", skipped=True)
    array, meta = read_dicom_series(job["files"])
    refuse_non_finite(array, job["folder"] or job["files"][0])
    write_nifti_atomic(array, nifti, meta["affine"], dtype=integral_dtype(array))
    return dict(entry, image=str(nifti), ndim=3, source="series", skipped=False)


def convert(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    skip_derived: bool = False,
    series_output: str = "nifti",
    verify: bool = True,
    val_fraction: float = 0.0,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    report: Report | None = None,
) -> Report:
    """Convert a folder of unlabeled images (see the module doc); returns the report.

    Example::

        report = convert("/data/unlabeled", "data/unlabeled", skip_derived=True)
        report.counts["series_3d"], report.counts["non_image_objects"]
    """
    if series_output not in ("nifti", "folder"):
        raise ValueError(f"series_output must be 'nifti' or 'folder', got {series_output!r}")
    root = Path(root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = report or Report("folder", out)
    found = scan(root, report, workers=workers, progress=progress, exclude=out)
    jobs = plan(root, found, report, skip_derived)
    # a series folder can stand for the series only if it holds no other DICOM image (of another
    # series, a localizer, a derived image, a duplicate): the reader would read them all
    images_per_folder: dict[str, int] = {}
    for kind, payload in found:
        if kind == "dicom" and classify_header(payload) != "non_image":
            folder = str(payload.path.parent)
            images_per_folder[folder] = images_per_folder.get(folder, 0) + 1
    for j in jobs:
        j.update(out=str(out), verify=verify, series_output=series_output)
        if j["kind"] == "series":
            j["folder_alone"] = bool(j["folder"]) and images_per_folder.get(j["folder"], 0) == len(j["files"])

    def key(j: dict[str, Any]) -> str:
        if j["kind"] == "series":
            return f"series {j['series_instance_uid']} ({j['folder'] or j['files'][0]})"
        return j["path"]

    results = run_items(convert_job, jobs, workers=workers, report=report, key=key, desc="convert", progress=progress)
    entries = []
    for j, e in zip(jobs, results):
        if e is None:
            continue
        if e.pop("skipped"):
            report.count("skipped_existing")
        if j["kind"] == "series":
            report.count("series_3d")
            if series_output == "folder" and not j["folder_alone"]:
                report.count("series_as_nifti_mixed_folder")
        else:
            report.count("volumes_3d" if e["ndim"] == 3 else "images_2d")
        entries.append(e)

    if val_fraction > 0 and entries:
        train, val = split_datalist(entries, val_fraction, seed=seed, group_key="patient_id")
    else:
        train, val = entries, []
    name = f"unlabeled images from {root.name}"
    write_datalist_if_changed(
        out / "datalist.json",
        {"training": train, "validation": val},
        name=name,
        description="unlabeled pretraining datalist (data_prep.folder)",
    )
    for nd in (2, 3):
        t = [e for e in train if e["ndim"] == nd]
        v = [e for e in val if e["ndim"] == nd]
        if t or v:
            write_datalist_if_changed(
                out / f"datalist_{nd}d.json",
                {"training": t, "validation": v},
                name=f"{name} ({nd}D)",
                description="unlabeled pretraining datalist (data_prep.folder)",
            )
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``medspan prepare folder`` / ``python -m data_prep.folder``."""
    parser.add_argument("--root", required=True, help="folder tree of DICOM / PNG / NIfTI images")
    parser.add_argument(
        "--skip-derived", action="store_true", help="skip DICOM images whose ImageType is DERIVED or SECONDARY"
    )
    parser.add_argument(
        "--series-output",
        choices=("nifti", "folder"),
        default="nifti",
        help="3D DICOM series as a converted NIfTI (default) or as their folder",
    )
    parser.add_argument("--no-verify", action="store_true", help="read headers only; do not decode every image")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="validation fraction, by patient (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Convert and write the report; 1 only with ``--strict`` and problems, 2 on fatal errors."""
    return run_converter("folder", lambda: convert(
        args.root,
        args.out,
        skip_derived=args.skip_derived,
        series_output=args.series_output,
        verify=not args.no_verify,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
    ), args.strict)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data_prep.folder --root R --out D [--skip-derived] [--workers N] [--strict]``."""
    return converter_main("data_prep.folder", __doc__, add_arguments, run, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
