"""Writing phantom datasets to disk: PNG / DICOM / NIfTI files and a MONAI datalist.

The writers derive case ``i``'s seed from ``(seed, i)`` with :func:`~medspan.data.synthetic.shapes.case_seed`,
so a case does not depend on how many cases are written or on the number of worker processes.
Every file is written under a temporary name and renamed; a re-run skips finished cases.
"""


from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

from medspan.data.synthetic.ct import (
    CT_DEFAULT_FOV,
    CT_STRUCTURES,
    ct_geometry,
    synth_ct,
)
from medspan.data.synthetic.cxr import CXR_GENERATOR_VERSION, CXR_STRUCTURES, synth_cxr
from medspan.data.synthetic.shapes import GENERATOR_VERSION, case_seed
from medspan.errors import DataError
from medspan.io import (
    atomic_write,
    remove_stale_temporaries,
    worker_pool,
    write_json_atomic,
    write_nifti_atomic,
    write_png_atomic,
)

_PARAMS_FILE = ".synth.json"
_DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
_CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage


def _validation_indices(n: int, val_fraction: float) -> set[int]:
    """Cases ``i`` with ``floor((i + 1) f) > floor(i f)``: evenly spread and independent of ``n``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    f = Fraction(val_fraction).limit_denominator(10_000)
    return {i for i in range(n) if ((i + 1) * f).__floor__() > (i * f).__floor__()}


def _write_dataset_json(out: Path, entries: list[dict[str, Any]], val_fraction: float, **meta: Any) -> Path:
    """``out/dataset.json``: ``meta`` first, then the cases split by :func:`_validation_indices`."""
    val = _validation_indices(len(entries), val_fraction)
    datalist = {
        **meta,
        "training": [e for i, e in enumerate(entries) if i not in val],
        "validation": [e for i, e in enumerate(entries) if i in val],
        "test": [],
    }
    return write_json_atomic(datalist, out / "dataset.json", indent=1)


def _check_params(out_dir: Path, params: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix cases generated with other settings into ``out_dir`` (unless ``overwrite``)."""
    path = out_dir / _PARAMS_FILE
    if path.exists() and not overwrite:
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(path, f"unreadable generator settings ({exc}); delete it or pass overwrite=True") from exc
        if old != params:
            diff = {k: (old.get(k), params.get(k)) for k in sorted(set(old) | set(params)) if old.get(k) != params.get(k)}
            raise DataError(
                path, f"folder was generated with other settings {diff} (old, new); use another folder or overwrite=True"
            )
    write_json_atomic(params, path, indent=1)


def _run_cases(fn: Callable[..., dict[str, Any]], jobs: list[tuple], workers: int, progress: bool, desc: str) -> list[dict]:
    """Run ``fn(*job)`` for every job, in ``workers`` processes; results in job order."""
    bar = tqdm(total=len(jobs), desc=desc, unit="case") if progress else None
    results: list[dict] = []
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(fn(*job))
                if bar is not None:
                    bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")
            with worker_pool(workers, mp_context=ctx) as pool:
                chunk = max(1, min(16, len(jobs) // (4 * workers)))
                for res in pool.map(fn, *zip(*jobs), chunksize=chunk):
                    results.append(res)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


def _dicom_base(case_id: str, modality: str, sop_class: str, uid_seed: str) -> Dataset:
    """A pydicom Dataset with patient/study/series modules filled in deterministically."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[uid_seed, "frame"])
    ds.PatientName = f"SYNTH^{case_id}"
    ds.PatientID = f"SYNTH-{case_id}"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "medspan synthetic phantom"
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def _write_dicom(path: Path, ds: Dataset) -> None:
    atomic_write(path, lambda tmp: dcmwrite(tmp, ds, enforce_file_format=True))


def _cxr_case_paths(case_id: str, fmt: str) -> dict[str, str]:
    ext = "png" if fmt == "png" else "dcm"
    paths = {"image": f"images/{case_id}.{ext}"}
    for name in (*CXR_STRUCTURES, "body"):
        paths[name] = f"masks/{case_id}_{name}.png"
    paths["findings"] = f"masks/{case_id}_findings.json"
    return paths


def _write_cxr_case(
    out_dir: str, index: int, seed: int, size: int, fmt: str, bit_depth: int, force: bool, findings: bool = True
) -> dict[str, Any]:
    out = Path(out_dir)
    case_id = f"cxr_{index:04d}"
    paths = _cxr_case_paths(case_id, fmt)
    if force or not all((out / p).exists() for p in paths.values()):
        case = synth_cxr(seed, size, findings=findings)
        record = {"findings": case["params"]["findings"], "details": case["params"]["finding_details"]}
        for name in (*CXR_STRUCTURES, "body"):
            write_png_atomic(case["masks"][name].astype(np.uint8) * np.uint8(255), out / paths[name], compress_level=1)
        img = case["image"]
        if fmt == "png":
            arr = np.rint(img * 255.0).astype(np.uint8) if bit_depth == 8 else np.rint(img * 65535.0).astype(np.uint16)
            write_png_atomic(arr, out / paths["image"], compress_level=3)
        else:
            ds = _dicom_base(case_id, "DX", _DX_SOP_CLASS, f"medspan-cxr-{seed}")
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(f"medspan-cxr-{seed}", "image")
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.ViewPosition = "PA"
            ds.PatientOrientation = ["L", "F"]  # columns run to the patient's left, rows to the feet
            ds.InstanceNumber = 1
            ds.Rows, ds.Columns = img.shape
            ds.PixelSpacing = ds.ImagerPixelSpacing = [f"{case['spacing'][1]:.6g}", f"{case['spacing'][0]:.6g}"]
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.WindowCenter, ds.WindowWidth = 32768, 65536
            ds.PresentationLUTShape = "IDENTITY"
            ds.PixelData = np.rint(img * 65535.0).astype("<u2").tobytes()
            _write_dicom(out / paths["image"], ds)
        write_json_atomic(record, out / paths["findings"], indent=1)  # last: it marks the case complete
    else:
        record = _read_json(out / paths["findings"])
    return {
        "image": paths["image"],
        "label": [paths[s] for s in CXR_STRUCTURES],
        "body": paths["body"],
        "case_id": case_id,
        "patient_id": case_id,
        "findings": record["findings"],
        "seed": int(seed),
    }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(path, f"unreadable ({exc}); delete it to regenerate the case") from exc


def _uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=list(parts)))


def write_cxr_dataset(
    out_dir: str | os.PathLike,
    n: int,
    size: int = 256,
    seed: int = 0,
    fmt: str = "png",
    val_fraction: float = 0.2,
    workers: int = 1,
    bit_depth: int = 8,
    overwrite: bool = False,
    progress: bool = False,
    findings: bool = True,
) -> Path:
    """Write ``n`` phantom CXRs, one PNG mask per structure and a MONAI datalist.

    Layout under ``out_dir``: ``images/cxr_0000.png`` (grayscale, ``bit_depth`` 8 or 16) or
    ``images/cxr_0000.dcm`` (DX, MONOCHROME2, 16-bit, PixelSpacing, deterministic UIDs),
    ``masks/cxr_0000_<structure>.png`` (uint8 0/255, also ``_body``), ``masks/cxr_0000_findings.json``
    (``{"findings": {name: bool}, "details": {...}}``, :func:`synth_cxr`'s ``params``) and ``dataset.json``::

        {"name": ..., "modality": "CXR", "structures": [...], "spacing": [sx, sy],
         "training": [{"image": "images/cxr_0000.png", "label": ["masks/cxr_0000_left_lung.png", ...],
                       "body": "masks/cxr_0000_body.png", "case_id": "cxr_0000", "patient_id": "cxr_0000",
                       "findings": {"cardiomegaly": false, "nodule": true, ...}, "seed": ...}],
         "validation": [...], "test": []}

    Each case is its own patient (``patient_id`` = ``case_id``). ``findings=False``: phantoms
    without nodule / effusion / pneumothorax (``synth_cxr(..., findings=False)``).

    Paths are relative to the datalist. Case ``i`` uses ``case_seed(seed, i)``; it is in the
    validation split when ``floor((i + 1) * val_fraction) > floor(i * val_fraction)``. Every file
    is written atomically; a re-run with the same settings skips complete cases (settings are kept
    in ``.synth.json``; other settings raise :class:`DataError` unless ``overwrite``).

    Returns:
        the path of ``dataset.json``.

    Example::

        >>> dl = write_cxr_dataset("/tmp/cxr", n=4, size=128)  # doctest: +SKIP
    """
    if fmt not in ("png", "dicom"):
        raise ValueError(f"fmt must be 'png' or 'dicom', got {fmt!r}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out_dir)
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out, out / "images", out / "masks")
    params = {"kind": "cxr", "version": CXR_GENERATOR_VERSION, "size": int(size), "seed": int(seed), "format": fmt,
              "findings": bool(findings)}
    if fmt == "png":
        params["bit_depth"] = int(bit_depth)
    _check_params(out, params, overwrite)
    jobs = [(str(out), i, case_seed(seed, i), int(size), fmt, int(bit_depth), bool(overwrite), bool(findings))
            for i in range(n)]
    entries = _run_cases(_write_cxr_case, jobs, workers, progress, "synth cxr")
    spacing = 400.0 / size
    return _write_dataset_json(
        out, entries, val_fraction,
        name="medspan synthetic chest X-rays",
        description="phantom PA chest radiographs (medspan.data.synthetic.synth_cxr); masks follow the SCR convention",
        modality="CXR",
        structures=list(CXR_STRUCTURES),
        spacing=[spacing, spacing],
        generator=params,
    )


def _ct_case_paths(case_id: str, fmt: str) -> dict[str, str]:
    paths = {"image": f"images/{case_id}.nii.gz" if fmt == "nifti" else f"images/{case_id}"}
    for name in (*CT_STRUCTURES, "body"):
        paths[name] = f"masks/{case_id}_{name}.nii.gz"
    paths["nodule_label"] = f"masks/{case_id}_nodules.nii.gz"
    paths["records"] = f"masks/{case_id}_nodules.json"
    return paths


def _save_nifti(path: Path, array_zyx: np.ndarray, affine: np.ndarray, dtype: type) -> None:
    """Write a ``(z, y, x)`` phantom array as the usual ``(x, y, z)`` NIfTI with ``affine``."""
    write_nifti_atomic(array_zyx.transpose(2, 1, 0), path, affine, dtype=dtype)


def _write_ct_series(folder: Path, case: dict[str, Any], case_id: str, seed: int) -> None:
    """One DICOM file per axial slice (CT Image Storage, HU = stored - 1024), written atomically as a folder."""
    image = case["image"]
    nz, ny, nx = image.shape
    sx, sy, sz = case["spacing"]
    geo = ct_geometry(image.shape, case["spacing"])
    stored = (np.rint(image) + 1024).astype("<u2")
    uid_seed = f"medspan-ct-{seed}"

    def write(tmp: str) -> None:
        os.mkdir(tmp)
        for k in range(nz):
            ds = _dicom_base(case_id, "CT", _CT_SOP_CLASS, uid_seed)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(uid_seed, "slice", str(k))
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [f"{geo['x'][0]:.4f}", f"{geo['y'][0]:.4f}", f"{geo['z'][k]:.4f}"]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.SliceLocation = f"{geo['z'][k]:.4f}"
            ds.SliceThickness = f"{sz:.6g}"
            ds.SpacingBetweenSlices = f"{sz:.6g}"
            ds.PixelSpacing = [f"{sy:.6g}", f"{sx:.6g}"]  # row spacing, column spacing
            ds.PatientPosition = "HFS"
            ds.Rows, ds.Columns = ny, nx
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
            ds.WindowCenter, ds.WindowWidth = -600, 1600
            ds.KVP = 120
            ds.PixelData = stored[k].tobytes()
            dcmwrite(os.path.join(tmp, f"{k:04d}.dcm"), ds, enforce_file_format=True)

    atomic_write(folder, write)


def _write_ct_case(
    out_dir: str, index: int, seed: int, shape: tuple[int, int, int], spacing: tuple[float, ...] | None,
    nodules: int | None, fmt: str, force: bool,
) -> dict[str, Any]:
    out = Path(out_dir)
    case_id = f"ct_{index:04d}"
    paths = _ct_case_paths(case_id, fmt)
    if force or not all((out / p).exists() for p in paths.values()):
        case = synth_ct(seed, shape, spacing, nodules)
        aff = case["affine"]
        for name in (*CT_STRUCTURES, "body"):
            _save_nifti(out / paths[name], case["masks"][name], aff, np.uint8)
        _save_nifti(out / paths["nodule_label"], case["nodules"], aff, np.uint8 if len(case["nodule_records"]) < 256 else np.int16)
        if fmt == "nifti":
            _save_nifti(out / paths["image"], case["image"], aff, np.int16)
        else:
            _write_ct_series(out / paths["image"], case, case_id, seed)
        records = case["nodule_records"]
        write_json_atomic(records, out / paths["records"], indent=1)
    else:
        records = json.loads((out / paths["records"]).read_text())
    return {
        "image": paths["image"],
        "label": [paths[s] for s in CT_STRUCTURES],
        "body": paths["body"],
        "nodule_label": paths["nodule_label"],
        "nodules": records,
        "case_id": case_id,
        "seed": int(seed),
    }


def write_ct_dataset(
    out_dir: str | os.PathLike,
    n: int,
    shape: tuple[int, int, int] = (96, 96, 96),
    seed: int = 0,
    fmt: str = "nifti",
    spacing: Sequence[float] | None = None,
    nodules: int | None = None,
    val_fraction: float = 0.2,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``n`` phantom chest CTs with masks, nodule labels and a MONAI datalist.

    ``shape`` is the :func:`synth_ct` array shape ``(nz, ny, nx)``; ``spacing`` is ``(sx, sy, sz)``
    mm. Files hold the usual ``(x, y, z)`` arrays:

    * ``images/ct_0000.nii.gz``: int16 HU, RAS affine ``diag(-sx, -sy, sz)`` (LPS axes, qform =
      sform, code 1); or ``images/ct_0000/`` a DICOM series (CT Image Storage, one file per slice,
      ImagePositionPatient / ImageOrientationPatient ``[1,0,0,0,1,0]``, 12-bit stored values with
      RescaleIntercept -1024, RescaleSlope 1, deterministic UIDs).
    * ``masks/ct_0000_<structure>.nii.gz``: uint8 0/1 for CT_STRUCTURES and ``body``;
      ``masks/ct_0000_nodules.nii.gz``: nodule label map (0 background, k = nodule k);
      ``masks/ct_0000_nodules.json``: the nodule records.
    * ``dataset.json``: like :func:`write_cxr_dataset`, with ``"modality": "CT"``, ``"spacing":
      [sx, sy, sz]`` and per entry ``"nodule_label"`` and ``"nodules"`` (records: ``label``,
      ``centre_voxel_xyz``, ``centre_mm_ras``, ``centre_mm_lps``, ``diameter_mm``, ``malignancy``, ...).

    Atomic writes, re-runs skip complete cases, case ``i`` uses ``case_seed(seed, i)``.

    Returns:
        the path of ``dataset.json``.
    """
    if fmt not in ("nifti", "dicom"):
        raise ValueError(f"fmt must be 'nifti' or 'dicom', got {fmt!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    shape = tuple(int(s) for s in shape)
    if spacing is None:
        spacing = tuple(f / s for f, s in zip(CT_DEFAULT_FOV, shape[::-1]))
    spacing = tuple(float(s) for s in spacing)
    out = Path(out_dir)
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out, out / "images", out / "masks")
    params = {
        "kind": "ct", "version": GENERATOR_VERSION, "shape_zyx": list(shape), "spacing_xyz": list(spacing),
        "seed": int(seed), "format": fmt, "nodules": nodules,
    }
    _check_params(out, params, overwrite)
    jobs = [(str(out), i, case_seed(seed, i), shape, spacing, nodules, fmt, bool(overwrite)) for i in range(n)]
    entries = _run_cases(_write_ct_case, jobs, workers, progress, "synth ct")
    return _write_dataset_json(
        out, entries, val_fraction,
        name="medspan synthetic chest CTs",
        description="phantom chest CTs in HU (medspan.data.synthetic.synth_ct); nodule malignancy 1..5 "
        "from size, spiculation and lobulation (see nodule_malignancy)",
        modality="CT",
        structures=list(CT_STRUCTURES),
        spacing=list(spacing),
        shape=list(shape[::-1]),
        generator=params,
    )
