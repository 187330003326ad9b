"""Image readers: DICOM (2D and series), PNG/JPEG, NIfTI, NRRD/MHA/MHD, and a MONAI ``ImageReader``.

DICOM is medspan's own reader (MONOCHROME1, VOI LUT, files without preamble, JPEG-LS/2000 through
pydicom's plugins, series checks). PNG/JPEG and NIfTI go through MONAI's ``PILReader`` and
``NibabelReader``; NRRD/MHA/MHD through SimpleITK (MONAI's ``ITKReader`` needs the ``itk`` package,
which medspan does not depend on). :func:`read_image` dispatches on what a path is, and
:class:`MedspanReader` puts it behind ``LoadImage``.

Every reader returns ``(array, meta)`` with the array in MONAI's spatial order (the transpose of
the numpy/PIL ``(rows, cols)`` view):

==========================  ====================  ===========================================
input                       array                 dtype
==========================  ====================  ===========================================
2D DICOM file               ``(x, y)``            float32, modality units (HU for CT)
folder of one DICOM series  ``(x, y, z)``         float32, modality units (HU for CT)
PNG / JPEG / BMP / TIFF     ``(x, y)``            as stored (uint8, uint16, ...), as PILReader
NIfTI                       ``(x, y, z)``         float32 (scaled), as NibabelReader
NRRD / MHA / MHD            ``(x, y[, z])``       as stored, as ITKReader
==========================  ====================  ===========================================

``meta`` always holds ``affine`` and ``original_affine`` (4x4, RAS), ``spacing`` (one value per
spatial axis), ``spatial_shape``, ``original_channel_dim``, ``space`` ("RAS"),
``filename_or_obj`` and ``reader``. Colour images become grey (``meta["rgb_to_gray"] = True``)
unless ``rgb_to_gray=False``, in which case the colour channel is last: ``(x, y, 3)``.

DICOM pixel values go through the modality LUT (RescaleSlope/RescaleIntercept); MONOCHROME1 is
inverted so that larger always means brighter, like MONOCHROME2. A VOI LUT or window is applied
only on request and then maps the values to ``[0, 1]``. 2D images (DICOM or PNG) get a
pixel-grid affine ``diag(sx, sy, 1, 1)``; series, NIfTI and ITK formats get their patient-space
RAS affine (as MONAI's ITKReader with ``affine_lps_to_ras=True``).

Every input problem raises :class:`medspan.errors.DataError` naming the file (or folder).

Example::

    arr, meta = read_image("ct_folder/")            # (512, 512, 16) float32 HU, meta["affine"]
    arr, meta = read_dicom_2d("cxr.dcm", window=(2048, 4096))   # (x, y) in [0, 1]
    load = LoadImaged(keys="image", reader=MedspanReader(apply_voi_lut=True))
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from monai.data import ImageReader, NibabelReader, PILReader
from monai.utils import ensure_tuple
from nibabel.filebasedimages import ImageFileError
from PIL import UnidentifiedImageError
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from medspan.errors import DataError

PathLike = str | os.PathLike

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
IMAGE_SUFFIXES = PIL_SUFFIXES + NIFTI_SUFFIXES + ITK_SUFFIXES + DICOM_SUFFIXES
"""Every file suffix :func:`read_image` reads by name (a DICOM file may also have none)."""

# ITU-R BT.601 luma weights, the ones PIL's convert("L") uses
_LUMA = np.array([0.299, 0.587, 0.114])
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """Convert a colour array ``(..., 3)`` to grey ``(...)``.

    When the three channels are equal everywhere (grey stored as RGB) the first channel is
    returned unchanged (same dtype, exact); otherwise the ITU-R BT.601 luma
    ``0.299 R + 0.587 G + 0.114 B`` as float32.

    Example::

        rgb_to_gray(np.dstack([a, a, a])) is an exact copy of a
    """
    if rgb.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels last, got shape {rgb.shape}")
    first = rgb[..., 0]
    if np.array_equal(first, rgb[..., 1]) and np.array_equal(first, rgb[..., 2]):
        return np.array(first)
    return (rgb.astype(np.float64) @ _LUMA).astype(np.float32)


_gray = rgb_to_gray  # the readers' ``rgb_to_gray`` argument shadows the function's name


def window_to_unit(
    values: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2) with output range ``[0, 1]`` (float64).

    ``LINEAR``: values ``<= c - 0.5 - (w - 1) / 2`` -> 0, ``> c - 0.5 + (w - 1) / 2`` -> 1,
    in between ``(x - (c - 0.5)) / (w - 1) + 0.5``. ``LINEAR_EXACT`` uses ``c`` and ``w``
    as given; ``SIGMOID`` is ``1 / (1 + exp(-4 (x - c) / w))``.

    Example::

        window_to_unit(np.array([-200., 39.5, 300.]), 40, 400)  # -> [0., 0.5, 1.]
    """
    x = np.asarray(values, dtype=np.float64)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"window width must be > 0 for SIGMOID, got {width}")
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"window width must be >= 1 for LINEAR, got {width}")
        center, width = center - 0.5, width - 1.0
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"window width must be > 0 for LINEAR_EXACT, got {width}")
    else:
        raise ValueError(f"unsupported VOI LUT function {function!r}")
    if width == 0:  # LINEAR with width 1: a step at the centre
        return (x > center).astype(np.float64)
    return np.clip((x - center) / width + 0.5, 0.0, 1.0)


def _pixel_grid_affine(spacing: Sequence[float]) -> np.ndarray:
    """4x4 affine of a 2D image whose axes are the pixel grid: ``diag(sx, sy, 1, 1)``."""
    affine = np.eye(4)
    for i, s in enumerate(spacing[:3]):
        affine[i, i] = float(s)
    return affine


def _spacing_of(affine: np.ndarray, rank: int) -> np.ndarray:
    """Column norms of the first ``rank`` columns of a 4x4 affine."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :rank] ** 2).sum(axis=0))


def _finish_meta(meta: dict, array: np.ndarray, rank: int, path: PathLike) -> dict:
    """Add the keys MONAI expects (``spatial_shape``, ``original_channel_dim``, ``affine``...)."""
    meta.setdefault("affine", _pixel_grid_affine(meta.get("spacing", (1.0,) * rank)))
    meta["affine"] = np.asarray(meta["affine"], dtype=np.float64)
    meta["original_affine"] = meta["affine"].copy()
    meta["spatial_shape"] = np.asarray(array.shape[:rank])
    meta["original_channel_dim"] = float("nan") if array.ndim == rank else -1
    meta["spacing"] = np.asarray(meta.get("spacing", _spacing_of(meta["affine"], rank)), dtype=np.float64)
    meta["space"] = "RAS"
    meta["filename_or_obj"] = str(path)
    return meta


def _has_suffix(path: PathLike, suffixes: Sequence[str]) -> bool:
    name = str(path).lower()
    return any(name.endswith(s) for s in suffixes)


def image_stem(path: PathLike) -> str:
    """The file name without its image suffix (longest of :data:`IMAGE_SUFFIXES`, any case).

    Example::

        >>> image_stem("/data/ct/lung_001.nii.gz"), image_stem("/data/LIDC-0001/ct/")
        ('lung_001', 'ct')
    """
    name = Path(str(path).rstrip("/")).name
    for sfx in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(sfx):
            return name[: -len(sfx)]
    return name


def _str(value: Any) -> str:
    """A DICOM attribute as a plain string ('' when absent)."""
    return "" if value is None else str(value)


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------


def has_dicom_preamble(path: PathLike) -> bool:
    """True when ``path`` is a DICOM Part 10 file: 128 bytes, then ``DICM`` (read errors: False)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _ensure_transfer_syntax(ds):
    """Give a dataset read without (0002,0010) the transfer syntax its encoding was read with."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return ds
    implicit, little = ds.original_encoding
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little in (True, None) else ExplicitVRBigEndian
    return ds


def _read_without_preamble(path: Path):
    """A legacy DICOM file without the 128-byte preamble + "DICM", or None if it is not one."""
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception:  # random bytes make the forced parser fail in many ways
        return None
    return _ensure_transfer_syntax(ds) if all(k in ds for k in ("PixelData", "Rows", "Columns")) else None


def _dcmread(path: PathLike):
    """``pydicom.dcmread`` that turns every failure into a :class:`DataError` naming ``path``.

    Files without the "DICM" prefix are accepted only when a forced read finds an image in them.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(path, "file does not exist")
    if p.is_dir():
        raise DataError(path, "is a folder, not a DICOM file (use read_dicom_series for a series)")
    try:
        return _ensure_transfer_syntax(pydicom.dcmread(p))
    except InvalidDicomError as e:
        ds = _read_without_preamble(p)
        if ds is None:
            raise DataError(path, f"not a DICOM file ({e})") from e
        return ds
    except Exception as e:  # truncated/corrupt headers raise EOFError, struct.error, ValueError...
        raise DataError(path, f"truncated or corrupt DICOM file ({type(e).__name__}: {e})") from e


def _check_image(ds, path: PathLike) -> None:
    if "PixelData" not in ds:
        kind = ("FloatPixelData", "DoubleFloatPixelData")
        extra = " (float pixel data is not supported)" if any(k in ds for k in kind) else ""
        raise DataError(path, f"DICOM file has no pixel data{extra or ' (truncated file, or not an image)'}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(path, f"multi-frame DICOM ({frames} frames) is not supported; expected one 2D image")


def _check_native_length(ds, path: PathLike, tsyntax: Any) -> None:
    """Name a truncated file as such: native pixel data shorter than Rows x Columns x ... bytes."""
    if tsyntax is None or tsyntax.is_encapsulated or _str(ds.get("PhotometricInterpretation")) == "YBR_FULL_422":
        return
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits < 8 or bits % 8:
        return
    expected = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("SamplesPerPixel", 1) or 1)
    expected *= int(ds.get("NumberOfFrames", 1) or 1) * bits // 8
    found = len(ds.PixelData)
    if found < expected:
        raise DataError(path, f"truncated DICOM file: {found} bytes of pixel data, expected {expected}")


def _decode(ds, path: PathLike) -> np.ndarray:
    """Decoded stored values ``(rows, cols)`` or ``(rows, cols, 3)`` (colour as RGB)."""
    _check_image(ds, path)
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    _check_native_length(ds, path, tsyntax)
    try:
        raw = ds.pixel_array
    except Exception as e:  # decoder plugins raise RuntimeError, ValueError, NotImplementedError...
        name = getattr(tsyntax, "name", tsyntax) or "unknown transfer syntax"
        raise DataError(path, f"cannot decode pixel data ({name}): {type(e).__name__}: {e}") from e
    if raw.ndim not in (2, 3):
        raise DataError(path, f"unexpected pixel array shape {raw.shape}")
    return raw


def _modality_range(ds) -> tuple[float, float]:
    """Output range of the modality LUT for the stored-value range of ``ds`` (lo, hi)."""
    bits = int(ds.get("BitsStored", 8) or 8)
    if ds.get("ModalityLUTSequence"):
        depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**depth - 1)
    if int(ds.get("PixelRepresentation", 0) or 0) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    lo, hi = lo * slope + intercept, hi * slope + intercept
    return (lo, hi) if lo <= hi else (hi, lo)


def _apply_voi(values: np.ndarray, ds, window: Sequence[float] | None) -> tuple[np.ndarray, str]:
    """Map modality values to ``[0, 1]`` with the given window, else the file's VOI LUT/window.

    Returns the mapped values and which VOI was used: "window", "file-lut", "file-window" or
    "full-range" (no VOI in the file: the full modality range is stretched to [0, 1]).
    """
    if window is not None:
        center, width = (float(v) for v in window)
        return window_to_unit(values, center, width, "LINEAR"), "window"
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        depth = int(item.LUTDescriptor[2])
        lut_in = np.rint(values).astype(np.int64)
        return apply_voi(lut_in, ds).astype(np.float64) / float(2**depth - 1), "file-lut"
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = ds.WindowCenter, ds.WindowWidth
        center = float(center[0] if ds["WindowCenter"].VM > 1 else center)
        width = float(width[0] if ds["WindowWidth"].VM > 1 else width)
        function = _str(ds.get("VOILUTFunction", "LINEAR")) or "LINEAR"
        return window_to_unit(values, center, width, function), "file-window"
    lo, hi = _modality_range(ds)
    return np.clip((values - lo) / max(hi - lo, 1e-12), 0.0, 1.0), "full-range"


def _dicom_values(
    ds,
    path: PathLike,
    *,
    apply_voi_lut: bool = False,
    window: Sequence[float] | None = None,
    rgb_to_gray_: bool = True,
) -> tuple[np.ndarray, dict]:
    """Decoded, rescaled, MONOCHROME1-inverted values ``(rows, cols[, 3])`` float32 and meta."""
    raw = _decode(ds, path)
    photometric = _str(ds.get("PhotometricInterpretation", "")).upper()
    meta: dict[str, Any] = {"original_dtype": str(raw.dtype), "rgb_to_gray": False}
    if photometric == "PALETTE COLOR":
        try:
            raw_rgb = apply_color_lut(raw, ds)
        except Exception as e:
            raise DataError(path, f"cannot apply the palette colour LUT: {e}") from e
        values = raw_rgb.astype(np.float64)
        colour = True
    elif raw.ndim == 3:
        values, colour = raw.astype(np.float64), True
    else:
        try:
            values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
        except Exception as e:
            raise DataError(path, f"cannot apply the modality LUT / rescale: {e}") from e
        colour = False
    if colour and rgb_to_gray_:
        values = _gray(values).astype(np.float64)
        meta["rgb_to_gray"] = True

    voi = "none"
    if window is not None or apply_voi_lut:
        try:
            values, voi = _apply_voi(values, ds, window)
        except (ValueError, NotImplementedError) as e:
            raise DataError(path, f"cannot apply the VOI LUT / window: {e}") from e
        if photometric == "MONOCHROME1":
            values = 1.0 - values
    elif photometric == "MONOCHROME1":
        lo, hi = _modality_range(ds)
        values = (lo + hi) - values
    meta["voi"] = voi
    if window is not None:
        meta["window"] = np.asarray([float(v) for v in window])
    return values.astype(np.float32), meta


def _dicom_tags(ds) -> dict:
    return {
        "photometric_interpretation": _str(ds.get("PhotometricInterpretation", "")),
        "modality": _str(ds.get("Modality", "")),
        "patient_id": _str(ds.get("PatientID", "")),
        "study_instance_uid": _str(ds.get("StudyInstanceUID", "")),
        "series_instance_uid": _str(ds.get("SeriesInstanceUID", "")),
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
    }


def _pixel_spacing_xy(ds) -> tuple[tuple[float, float], str]:
    """(x, y) spacing in mm and where it came from (PixelSpacing is (row, column) = (y, x))."""
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        if value is not None and len(value) >= 2:
            dy, dx = float(value[0]), float(value[1])
            if np.isfinite([dx, dy]).all() and dx > 0 and dy > 0:
                return (dx, dy), key
    return (1.0, 1.0), "default"


def read_dicom_2d(
    path: PathLike,
    *,
    apply_voi_lut: bool = False,
    window: Sequence[float] | None = None,
    rgb_to_gray: bool = True,
) -> tuple[np.ndarray, dict]:
    """Read one single-frame 2D DICOM file (any transfer syntax pydicom can decode).

    Steps: decode -> modality LUT (RescaleSlope/Intercept) -> MONOCHROME1 inversion
    (``lo + hi - value`` over the modality range of BitsStored, so higher = brighter) ->
    on request, VOI: ``window=(center, width)`` (DICOM LINEAR) or, with ``apply_voi_lut``,
    the file's VOI LUT Sequence / first WindowCenter+Width (full range if it has none); the
    VOI output is ``[0, 1]`` (MONOCHROME1: ``1 - y``).

    Args:
        path: the DICOM file.
        apply_voi_lut: apply the file's VOI LUT or window.
        window: ``(center, width)`` in modality units; overrides ``apply_voi_lut``.
        rgb_to_gray: colour images become grey (BT.601 luma); else ``(x, y, 3)``.

    Returns:
        ``(array, meta)``: float32 ``(x, y)`` = ``pixel_array.T``; meta with ``spacing``
        ``(x, y)`` mm (``spacing_source``: PixelSpacing, ImagerPixelSpacing or default=1.0),
        ``photometric_interpretation``, ``modality``, ``patient_id``, ``series_instance_uid``,
        ``original_dtype``, ``voi``, ``affine`` (``diag(sx, sy, 1, 1)``), ``filename_or_obj``.

    Example::

        arr, meta = read_dicom_2d("cr.dcm")           # MONOCHROME1 comes back inverted
        arr.shape == (ds.Columns, ds.Rows)
    """
    ds = _dcmread(path)
    values, meta = _dicom_values(ds, path, apply_voi_lut=apply_voi_lut, window=window, rgb_to_gray_=rgb_to_gray)
    array = np.ascontiguousarray(np.swapaxes(values, 0, 1))
    spacing, source = _pixel_spacing_xy(ds)
    meta.update(_dicom_tags(ds))
    meta.update({"spacing": np.asarray(spacing), "spacing_source": source, "reader": "pydicom"})
    meta["affine"] = _pixel_grid_affine(spacing)
    return array, _finish_meta(meta, array, 2, path)


def _series_files(folder_or_files: PathLike | Sequence[PathLike]) -> tuple[str, list[Path]]:
    if isinstance(folder_or_files, (str, os.PathLike)):
        folder = Path(folder_or_files)
        if not folder.exists():
            raise DataError(folder, "folder does not exist")
        if not folder.is_dir():
            raise DataError(folder, "expected a folder of DICOM files")
        return str(folder), sorted(p for p in folder.iterdir() if p.is_file())
    files = [Path(f) for f in folder_or_files]
    if not files:
        raise DataError("<empty list>", "no files given for the DICOM series")
    parents = {str(f.parent) for f in files}
    where = parents.pop() if len(parents) == 1 else f"{files[0]} (+{len(files) - 1} files)"
    return where, files


def _load_series_headers(where: str, files: list[Path]) -> tuple[list[tuple[Path, Any]], int]:
    """Read every file; skip non-DICOM and non-image DICOM files (counted); fail on broken ones."""
    datasets, ignored = [], 0
    no_pixels: list[tuple[Path, str]] = []
    for f in files:
        if not f.exists():
            raise DataError(f, "file does not exist")
        try:
            ds = _ensure_transfer_syntax(pydicom.dcmread(f))
        except InvalidDicomError:
            ds = _read_without_preamble(f)
            if ds is None:
                ignored += 1
                continue
        except Exception as e:
            if has_dicom_preamble(f):
                raise DataError(f, f"truncated or corrupt DICOM file in series ({type(e).__name__}: {e})") from e
            ignored += 1
            continue
        if "PixelData" not in ds:  # DICOMDIR, SR, RTSTRUCT... or a truncated slice (checked below)
            ignored += 1
            no_pixels.append((f, _str(ds.get("SeriesInstanceUID", ""))))
            continue
        datasets.append((f, ds))
    if not datasets:
        raise DataError(where, f"no DICOM image files found ({ignored} other files ignored)")
    uids = {_str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
    for f, uid in no_pixels:
        if uid and uid in uids:
            raise DataError(f, "DICOM file of this series has no pixel data (truncated file?)")
    return datasets, ignored


def _require_same(where: str, what: str, values: list) -> None:
    """Raise a :class:`DataError` listing the distinct ``values`` (with counts) if there are several."""
    uniq: dict[Any, int] = {}
    for v in values:
        uniq[v] = uniq.get(v, 0) + 1
    if len(uniq) > 1:
        found = ", ".join(f"{k} ({n} files)" for k, n in uniq.items())
        raise DataError(where, f"mixed {what} in one series: {found}")


def is_dicom_series(folder: PathLike) -> bool:
    """True when ``folder`` holds the slices of ONE CT/MR series, from the headers only (no pixels).

    That is: at least two DICOM image files (``.dcm``, or files with the DICM preamble), one
    SeriesInstanceUID, each a single frame with ImagePositionPatient and ImageOrientationPatient.
    Such a folder is one 3D image, even when :func:`read_dicom_series` will refuse it (a missing
    slice, a duplicated position): the user must see that problem, not a pile of 2D images.
    A folder of unrelated 2D radiographs (no positions, or several series) gives False.

    Example::

        is_dicom_series("LIDC-IDRI-0001/ct")   # True
    """
    p = Path(folder)
    if not p.is_dir():
        return False
    files = sorted(f for f in p.iterdir() if f.is_file() and (_has_suffix(f, DICOM_SUFFIXES) or has_dicom_preamble(f)))
    if len(files) < 2:
        return False
    uids = set()
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=not has_dicom_preamble(f))
        except Exception:  # noqa: BLE001, S112 - an unreadable header: the series reader names that file
            continue
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            return False
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            return False
        uids.add(_str(ds.get("SeriesInstanceUID", "")))
    return len(uids) == 1 and "" not in uids


def read_dicom_series(folder_or_files: PathLike | Sequence[PathLike]) -> tuple[np.ndarray, dict]:
    """Read one CT/MR series (a folder, or a list of files) into a volume in modality units (HU).

    Non-DICOM files and DICOM files without pixel data are skipped and counted
    (``meta["n_ignored_files"]``). Slices are sorted by the projection of ImagePositionPatient
    on the slice normal (row x column direction), not by InstanceNumber or file name. A
    :class:`DataError` naming the folder is raised for: more than one SeriesInstanceUID, mixed
    orientation, mixed rows/columns or pixel spacing, missing position/orientation, duplicated
    positions and inconsistent slice gaps (a missing slice).

    Returns:
        ``(array, meta)``: float32 ``(x, y, z)`` (``x`` = column, ``z`` = increasing along the
        normal); meta: ``affine`` / ``original_affine`` 4x4 RAS (as MONAI's ITKReader:
        direction from ImageOrientationPatient, origin = position of the first slice),
        ``spacing`` ``(sx, sy, sz)``, ``n_slices``, ``n_ignored_files``, the DICOM tags of
        :func:`read_dicom_2d` and ``filename_or_obj`` (the folder).

    Example::

        hu, meta = read_dicom_series("LIDC-IDRI-0001/ct")   # (512, 512, 16), spacing (.70, .70, 2.5)
    """
    where, files = _series_files(folder_or_files)
    datasets, ignored = _load_series_headers(where, files)

    by_uid: dict[str, list] = {}
    for f, ds in datasets:
        by_uid.setdefault(_str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    if len(by_uid) > 1:
        found = ", ".join(f"{uid or '<no SeriesInstanceUID>'} ({len(v)} files)" for uid, v in by_uid.items())
        raise DataError(where, f"{len(by_uid)} DICOM series found, expected one: {found}")

    sizes = [(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) for _, ds in datasets]
    _require_same(where, "rows x columns", [f"{r}x{c}" for r, c in sizes])
    for f, ds in datasets:
        for key, size in (("ImageOrientationPatient", 6), ("ImagePositionPatient", 3)):
            value = ds.get(key)
            if value is None:
                raise DataError(where, f"{f.name} has no {key}; cannot order the slices")
            if len(value) != size or not np.isfinite([float(v) for v in value]).all():
                raise DataError(where, f"{f.name}: {key} must hold {size} finite numbers, got {list(value)}")
    iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in datasets])
    bad = np.abs(iops - iops[0]).max(axis=1) > 1e-4
    if bad.any():
        other = datasets[int(np.argmax(bad))][0].name
        raise DataError(
            where,
            f"mixed orientation in one series: {datasets[0][0].name} has ImageOrientationPatient "
            f"{np.round(iops[0], 4).tolist()}, {other} has {np.round(iops[int(np.argmax(bad))], 4).tolist()}",
        )
    spacings = [_pixel_spacing_xy(ds)[0] for _, ds in datasets]
    _require_same(where, "pixel spacing (x, y)", [tuple(round(v, 5) for v in s) for s in spacings])

    row_dir, col_dir = iops[0, :3], iops[0, 3:]
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 1e-3:
        raise DataError(where, f"degenerate ImageOrientationPatient {iops[0].tolist()}")
    normal = normal / np.linalg.norm(normal)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in datasets])
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    depth = depth[order]
    datasets = [datasets[i] for i in order]

    gaps = np.diff(depth)
    if gaps.size:
        dup = np.flatnonzero(gaps < 1e-3)
        if dup.size:
            i = int(dup[0])
            raise DataError(
                where,
                f"duplicated slice position {depth[i]:.3f} mm along the slice normal: "
                f"{datasets[i][0].name} and {datasets[i + 1][0].name}",
            )
        step = float(np.median(gaps))
        off = np.flatnonzero(np.abs(gaps - step) > max(0.05 * step, 1e-3))
        if off.size:
            i = int(off[0])
            raise DataError(
                where,
                f"inconsistent slice gaps: expected {step:.4g} mm, found {gaps[i]:.4g} mm between "
                f"{datasets[i][0].name} and {datasets[i + 1][0].name} (missing or extra slice?)",
            )
        dz = float(gaps.mean())
    else:
        first = datasets[0][1]
        dz = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)

    slices = []
    for f, ds in datasets:
        values, slice_meta = _dicom_values(ds, f)
        if values.ndim != 2:
            raise DataError(f, "colour DICOM images cannot form a CT/MR volume")
        slices.append(values)
    array = np.ascontiguousarray(np.stack(slices, axis=0).transpose(2, 1, 0))  # (z, r, c) -> (x, y, z)

    (sx, sy) = spacings[0]
    lps = np.eye(4)
    lps[:3, 0] = row_dir * sx
    lps[:3, 1] = col_dir * sy
    lps[:3, 2] = normal * dz
    lps[:3, 3] = positions[order[0]]
    meta: dict[str, Any] = dict(slice_meta)
    meta.update(_dicom_tags(datasets[0][1]))
    meta.update(
        {
            "spacing": np.array([sx, sy, dz]),
            "spacing_source": _pixel_spacing_xy(datasets[0][1])[1],
            "affine": _LPS_TO_RAS @ lps,
            "n_slices": len(datasets),
            "n_ignored_files": ignored,
            "reader": "pydicom-series",
        }
    )
    return array, _finish_meta(meta, array, 3, where)


# ----------------------------------------------------------------------------------------------
# PNG / JPEG, NIfTI, NRRD / MHA
# ----------------------------------------------------------------------------------------------


def read_pil(path: PathLike, *, rgb_to_gray: bool = True) -> tuple[np.ndarray, dict]:
    """Read a PNG/JPEG/BMP/TIFF with MONAI's ``PILReader``: ``(x, y)``.

    The array keeps PIL's dtype (uint8, uint16 for 16-bit PNG, ...). RGB(A)/LA images become
    grey with :func:`rgb_to_gray` (alpha dropped) unless ``rgb_to_gray=False`` (then
    ``(x, y, C)`` as PILReader gives it). Palette images keep their indices, as PILReader.

    Example::

        arr, meta = read_pil("mask.png")   # uint8 (W, H), meta["affine"] = eye(4)
    """
    if not Path(path).is_file():
        raise DataError(path, "file does not exist")
    reader = PILReader()  # reverse_indexing: (rows, cols) -> MONAI's (x, y)
    try:
        img = reader.read(str(path))
        img.load()
        data, header = reader.get_data(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(path, f"cannot read image ({type(e).__name__}: {e})") from e
    meta: dict[str, Any] = {k: header[k] for k in ("mode", "width", "height")}
    meta["format"] = _str(header["format"])
    meta["original_dtype"] = str(data.dtype)
    meta["rgb_to_gray"] = False
    if data.ndim == 3 and rgb_to_gray:
        if img.mode in ("RGB", "RGBA", "RGBX"):
            data = _gray(data[..., :3])
        elif img.mode in ("LA", "La", "PA"):
            data = np.array(data[..., 0])
        else:
            data = _gray(np.swapaxes(np.asarray(img.convert("RGB")), 0, 1))
        meta["rgb_to_gray"] = True
    array = np.ascontiguousarray(data)
    meta.update({"spacing": np.ones(2), "spacing_source": "default", "reader": "PIL"})
    meta["affine"] = np.eye(4)
    return array, _finish_meta(meta, array, 2, path)


def read_nifti(path: PathLike) -> tuple[np.ndarray, dict]:
    """Read a NIfTI (.nii/.nii.gz) with MONAI's ``NibabelReader``: float32 ``(x, y, z[, C])``.

    ``affine`` is the file's (sform/qform) RAS affine, as NibabelReader gives it. More than 3 dims:
    the extra dims are flattened into a last channel axis (``original_channel_dim = -1``).

    Example::

        arr, meta = read_nifti("ct.nii.gz"); meta["affine"]  # == nibabel.load(...).affine
    """
    if not Path(path).is_file():
        raise DataError(path, "file does not exist")
    reader = NibabelReader()
    try:
        img = reader.read(str(path))
        data, header = reader.get_data(img)
        data = np.asarray(data, dtype=np.float32)
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as e:
        raise DataError(path, f"cannot read NIfTI ({type(e).__name__}: {e})") from e
    affine = np.asarray(header["affine"], dtype=np.float64)
    rank = min(data.ndim, 3)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3] + (-1,))
    meta: dict[str, Any] = {
        "original_dtype": str(img.get_data_dtype()),
        "spacing": _spacing_of(affine, rank),
        "affine": affine,
        "reader": "nibabel",
    }
    return data, _finish_meta(meta, data, rank, path)


def read_itk(path: PathLike) -> tuple[np.ndarray, dict]:
    """Read NRRD/MHA/MHD (or anything SimpleITK reads) as MONAI's ITKReader: ``(x, y[, z][, C])``.

    Keeps the stored dtype; the affine is converted from ITK's LPS to RAS.

    Example::

        arr, meta = read_itk("ct.mha")   # (x, y, z), meta["spacing"] == image.GetSpacing()
    """
    if not Path(path).is_file():
        raise DataError(path, "file does not exist")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DataError(path, f"cannot read image with SimpleITK: {str(e).strip().splitlines()[-1]}") from e
    data = sitk.GetArrayFromImage(img)  # (z, y, x[, C])
    rank = img.GetDimension()
    if rank > 3:
        raise DataError(path, f"{rank}D images are not supported")
    spatial = tuple(range(rank))[::-1]
    data = np.transpose(data, spatial + tuple(range(rank, data.ndim)))
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(rank, rank)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    lps = np.eye(4)
    lps[:rank, :rank] = direction @ np.diag(spacing)
    lps[:rank, 3] = img.GetOrigin()
    meta: dict[str, Any] = {
        "original_dtype": str(data.dtype),
        "spacing": spacing,
        "affine": _LPS_TO_RAS @ lps,
        "reader": "SimpleITK",
    }
    return np.ascontiguousarray(data), _finish_meta(meta, data, rank, path)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------


def non_finite_counts(array: Any) -> tuple[int, int]:
    """``(NaN voxels, infinite voxels)`` of an array (integer arrays: ``(0, 0)``)."""
    a = np.asarray(array)
    if a.dtype.kind not in "fc":
        return 0, 0
    return int(np.isnan(a).sum()), int(np.isinf(a).sum())


def non_finite_problem(array: Any) -> str | None:
    """The words for an image with NaN / infinite voxels (None when every voxel is finite).

    One sentence for ``medspan info``, the converters (which refuse such an image) and
    ``build-priors``; training on such an image makes every loss NaN.

    Example::

        non_finite_problem(np.array([1.0, np.nan, np.inf, 2.0]))
        # 'image holds 1 NaN and 1 infinite voxels of 4 (50%)'
    """
    nan, inf = non_finite_counts(array)
    if not nan and not inf:
        return None
    total = int(np.asarray(array).size)
    return f"image holds {nan} NaN and {inf} infinite voxels of {total} ({100.0 * (nan + inf) / total:.3g}%)"


def image_kind(path: PathLike) -> str:
    """What :func:`read_image` will do with ``path``: "series", "pil", "nifti", "itk" or "dicom"."""
    p = Path(path)
    if p.is_dir():
        return "series"
    if _has_suffix(p, PIL_SUFFIXES):
        return "pil"
    if _has_suffix(p, NIFTI_SUFFIXES):
        return "nifti"
    if _has_suffix(p, ITK_SUFFIXES):
        return "itk"
    return "dicom"


def read_image(
    path: PathLike,
    *,
    apply_voi_lut: bool = False,
    window: Sequence[float] | None = None,
    rgb_to_gray: bool = True,
) -> tuple[np.ndarray, dict]:
    """Read any supported image, dispatching on what ``path`` is (see :func:`image_kind`).

    A folder is a DICOM series; .png/.jpg/.jpeg/.bmp/.tif go to PIL; .nii/.nii.gz to nibabel;
    .nrrd/.nhdr/.mha/.mhd to SimpleITK; anything else must be a 2D DICOM file. ``apply_voi_lut``
    and ``window`` only concern 2D DICOM; ``rgb_to_gray`` concerns colour DICOM and PIL images.

    Returns:
        ``(array, meta)`` in MONAI order with ``affine``, ``spacing`` etc. (see module doc).

    Example::

        arr, meta = read_image("scan.nii.gz")
    """
    if not Path(path).exists():
        raise DataError(path, "file or folder does not exist")
    kind = image_kind(path)
    if kind == "series":
        return read_dicom_series(path)
    if kind == "pil":
        return read_pil(path, rgb_to_gray=rgb_to_gray)
    if kind == "nifti":
        return read_nifti(path)
    if kind == "itk":
        return read_itk(path)
    return read_dicom_2d(path, apply_voi_lut=apply_voi_lut, window=window, rgb_to_gray=rgb_to_gray)


# ----------------------------------------------------------------------------------------------
# MONAI reader
# ----------------------------------------------------------------------------------------------


@dataclass
class LoadedImage:
    """What :meth:`MedspanReader.read` returns per file: the array and meta, or the error."""

    path: str
    array: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    error: DataError | None = None


class MedspanReader(ImageReader):
    """MONAI ``ImageReader`` over :func:`read_image` (DICOM file/series, PNG/JPEG, NIfTI, NRRD, MHA).

    Several files for one key are stacked as channels exactly like MONAI's PILReader:
    ``(C, x, y)`` for grey 2D images (``original_channel_dim = 0``). Errors are raised as
    :class:`DataError` from :meth:`get_data`, not from :meth:`read`: ``LoadImage`` silently
    falls back to its default readers when ``read`` fails (PydicomReader would, e.g., load a
    folder holding two series), so the problem would be hidden.

    Args:
        apply_voi_lut: apply a DICOM file's VOI LUT / window (output ``[0, 1]``).
        window: ``(center, width)`` applied to 2D DICOM (output ``[0, 1]``).
        rgb_to_gray: colour images become grey (set ``False`` for PILReader's ``(x, y, 3)``).

    Example::

        LoadImaged(keys=["image", "masks"], reader=MedspanReader())
        # bundle JSON: "reader": "$medspan.data.readers.MedspanReader()"
    """

    def __init__(
        self, apply_voi_lut: bool = False, window: Sequence[float] | None = None, rgb_to_gray: bool = True
    ) -> None:
        super().__init__()
        if window is not None and len(window) != 2:
            raise ValueError(f"window must be (center, width), got {window!r}")
        self.apply_voi_lut = bool(apply_voi_lut)
        self.window = None if window is None else (float(window[0]), float(window[1]))
        self.rgb_to_gray = bool(rgb_to_gray)

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """True when every name is a folder, has a supported suffix or is a DICOM file."""
        for name in ensure_tuple(filename):
            p = Path(name)
            known = _has_suffix(p, PIL_SUFFIXES + NIFTI_SUFFIXES + ITK_SUFFIXES + DICOM_SUFFIXES)
            if not (p.is_dir() or known or has_dicom_preamble(p)):
                return False
        return True

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> LoadedImage | list[LoadedImage]:
        """Read each file; return one :class:`LoadedImage` (or a list for several files)."""
        options = {"apply_voi_lut": self.apply_voi_lut, "window": self.window, "rgb_to_gray": self.rgb_to_gray}
        options.update({k: v for k, v in kwargs.items() if k in options})
        names = ensure_tuple(data)
        loaded = []
        for name in names:
            try:
                array, meta = read_image(name, **options)
                loaded.append(LoadedImage(str(name), array, meta))
            except DataError as e:
                loaded.append(LoadedImage(str(name), error=e))
        return loaded if len(names) > 1 else loaded[0]

    def get_data(self, img: LoadedImage | Sequence[LoadedImage]) -> tuple[np.ndarray, dict]:
        """Return ``(array, meta)``; several images are stacked as channels (as PILReader)."""
        items = ensure_tuple(img)
        for item in items:
            if item.error is not None:
                raise item.error
        arrays = [item.array for item in items]
        meta = {k: v for k, v in items[0].meta.items() if not (isinstance(v, np.ndarray) and v.dtype.kind in "OUS")}
        for item in items[1:]:
            if not np.array_equal(item.meta["spatial_shape"], meta["spatial_shape"]):
                raise DataError(
                    item.path,
                    f"spatial shape {tuple(item.meta['spatial_shape'])} differs from "
                    f"{tuple(meta['spatial_shape'])} of {items[0].path}; cannot stack as channels",
                )
            if not np.allclose(item.meta["affine"], meta["affine"]):
                raise DataError(item.path, f"affine differs from that of {items[0].path}; cannot stack as channels")
        if len(arrays) == 1:
            return arrays[0], meta
        if np.isnan(meta["original_channel_dim"]):
            meta["original_channel_dim"] = 0
            return np.stack(arrays, axis=0), meta
        return np.concatenate(arrays, axis=int(meta["original_channel_dim"])), meta
