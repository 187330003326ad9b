"""What the CT converters share: DICOM header scanning, NIfTI writing, resampling, crops.

Used by ``lidc_idri``, ``msd_lung``, ``nsclc_radiomics`` and ``folder`` (and the CT benchmark).

Arrays are in MONAI order ``(x, y, z)`` (``x`` = DICOM column, ``y`` = row) with a 4x4 RAS
``affine`` mapping voxel indices to millimetres, exactly as :func:`medspan.data.readers.read_image`
returns them; NIfTI files are written with that affine as both qform and sform.

Resampling convention (:func:`resample_to_spacing`): the field of view is kept, i.e. the outer
corners of the first and last voxels stay where they are (as MONAI's ``Spacing`` with
``align_corners=False``); the new shape is ``round(shape * old_spacing / new_spacing)`` (at least 1).
Images use trilinear interpolation (edge values repeated outside), label maps nearest neighbour.

Example::

    arr, meta = read_image("Task06_Lung/imagesTr/lung_001.nii.gz")
    out, aff = resample_to_spacing(arr, meta["affine"], (1.5, 1.5, 1.5))
    write_nifti_atomic(out, "cache/lung_001.nii.gz", aff, dtype=np.int16)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from scipy.ndimage import affine_transform

from medspan.data.datalist import PATH_KEYS, format_datalist
from medspan.data.readers import has_dicom_preamble, read_image
from medspan.errors import DataError
from medspan.io import write_nifti_atomic, write_text_atomic

__all__ = [
    "NON_IMAGE_MODALITIES",
    "DicomHeader",
    "read_header",
    "classify_header",
    "safe_name",
    "spacing_of",
    "integral_dtype",
    "sample_on_grid",
    "resample_to_spacing",
    "crop_grid",
    "resample_file",
    "sop_slice_index",
    "world_to_voxel",
    "write_datalist_if_changed",
    "write_ct_series",
]

#: DICOM modalities that never hold an image volume / picture to pretrain on
NON_IMAGE_MODALITIES: frozenset[str] = frozenset(
    ("RTSTRUCT RTPLAN RTDOSE RTRECORD SR PR KO SEG REG FID DOC PLAN RWV AU ECG HD").split()
)
#: SOP Class UID prefixes of non-image objects (SR, presentation states, RT, SEG, KO, registration, raw data...)
_NON_IMAGE_SOP_PREFIXES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection (88.59)
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.481.",  # RT objects (RTSTRUCT .3, RTPLAN .5, RTDOSE .2 ...)
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration (66.1), fiducials, SEG (66.4)
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF/CDA
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.1.3.10",  # media storage directory (DICOMDIR)
)
_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima", "")


# --------------------------------------------------------------------------------------------
# DICOM headers
# --------------------------------------------------------------------------------------------


@dataclass
class DicomHeader:
    """The header fields the CT converters need from one DICOM file (no pixel data read).

    ``position`` / ``orientation`` are ImagePositionPatient / ImageOrientationPatient (LPS mm)
    or ``None``; ``image_type`` the upper-cased ImageType values.
    """

    path: Path
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    frame_of_reference_uid: str = ""
    patient_id: str = ""
    modality: str = ""
    image_type: tuple[str, ...] = ()
    rows: int = 0
    columns: int = 0
    frames: int = 1
    position: tuple[float, float, float] | None = None
    orientation: tuple[float, ...] | None = None
    series_description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and np.isfinite(out).all() else None


def read_header(path: str | os.PathLike) -> DicomHeader | None:
    """Read the header of one file (``stop_before_pixels``); ``None`` when it is not DICOM.

    A file with the ``DICM`` preamble that cannot be parsed raises :class:`DataError` (a corrupt
    DICOM file); a file without the preamble counts as DICOM only when a forced read finds a
    SOP Class UID or Rows/Columns in it (and only for the suffixes ``.dcm``, ``.dicom``, ``.ima``
    or none).

    Example::

        h = read_header("LIDC-IDRI-0001/ct/-100.000000.dcm")
        h.modality, h.series_instance_uid, h.position    # ('CT', '1.3.6...', (-166.0, -171.7, -100.0))
    """
    p = Path(path)
    if not p.exists():
        raise DataError(p, "file does not exist (broken link?)")
    preamble = has_dicom_preamble(p)
    if not preamble:
        name = p.name.lower()
        suffix = "" if "." not in name else name[name.rfind(".") :]
        if suffix not in _DICOM_SUFFIXES:
            return None
    try:
        ds = pydicom.dcmread(p, stop_before_pixels=True, force=not preamble)
        sop_class = str(ds.get("SOPClassUID", "") or "")
        rows = int(ds.get("Rows", 0) or 0)
    except Exception as e:  # pydicom raises many kinds on corrupt headers
        if preamble:
            raise DataError(p, f"corrupt DICOM header ({type(e).__name__}: {e})") from e
        return None
    if not preamble and not (sop_class or rows):
        return None
    image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or []))
    return DicomHeader(
        path=p,
        sop_class_uid=sop_class,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        study_instance_uid=str(ds.get("StudyInstanceUID", "") or ""),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
        patient_id=str(ds.get("PatientID", "") or ""),
        modality=str(ds.get("Modality", "") or "").upper(),
        image_type=image_type,
        rows=rows,
        columns=int(ds.get("Columns", 0) or 0),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        series_description=str(ds.get("SeriesDescription", "") or ""),
    )


def classify_header(h: DicomHeader, skip_derived: bool = False) -> str:
    """What a DICOM file is for pretraining: ``"image"``, ``"non_image"``, ``"localizer"`` or ``"derived"``.

    ``non_image``: a non-image modality (RTSTRUCT, SR, PR, KO, SEG, REG, RTPLAN, RTDOSE...), a
    non-image SOP class, or no Rows/Columns. ``localizer``: ImageType holds ``LOCALIZER``
    (scouts/topograms). ``derived``: ImageType ``DERIVED`` or ``SECONDARY`` (reformats, MIPs,
    screen captures), reported as such only when ``skip_derived`` is asked.

    Example::

        classify_header(h)          # 'image'
    """
    if h.modality in NON_IMAGE_MODALITIES or any(h.sop_class_uid.startswith(p) for p in _NON_IMAGE_SOP_PREFIXES):
        return "non_image"
    if not (h.rows and h.columns):
        return "non_image"
    if "LOCALIZER" in h.image_type:
        return "localizer"
    if skip_derived and ("DERIVED" in h.image_type[:1] or "SECONDARY" in h.image_type[1:2]):
        return "derived"
    return "image"


def safe_name(text: str, fallback: str = "x") -> str:
    """A file-name-safe version of ``text``: runs of characters outside ``[A-Za-z0-9._-]`` become ``_``.

    Example::

        safe_name("GTV-1 (primary)")   # 'GTV-1_primary_'
    """
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip(".")
    return out or fallback


# --------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing ``(sx, sy, sz)`` mm: the norms of the affine's first three columns."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def integral_dtype(array: np.ndarray) -> str:
    """``"int16"`` when every value is an integer within int16 range (CT in HU), else ``"float32"``."""
    a = np.asarray(array)
    if a.size == 0:
        return "int16"
    if np.issubdtype(a.dtype, np.integer) or np.array_equal(a, np.rint(a)):
        lo, hi = float(a.min()), float(a.max())
        if lo >= -32768 and hi <= 32767:
            return "int16"
    return "float32"


# --------------------------------------------------------------------------------------------
# resampling and crops
# --------------------------------------------------------------------------------------------


def sample_on_grid(
    array: np.ndarray,
    affine: np.ndarray,
    out_affine: np.ndarray,
    out_shape: Sequence[int],
    order: int = 1,
    cval: float = 0.0,
    mode: str = "constant",
) -> np.ndarray:
    """Sample ``array`` (voxel grid ``affine``) on another grid (``out_affine``, ``out_shape``).

    Output voxel ``j`` takes the value of ``array`` at the world point ``out_affine @ j``
    (``order`` 0 = nearest, 1 = trilinear); points outside get ``cval`` (``mode="constant"``) or
    the edge value (``mode="nearest"``). Returns float32 ``out_shape``.

    Example::

        crop = sample_on_grid(hu, aff, crop_aff, (64, 64, 64), order=1, cval=-1024)
    """
    out_shape = tuple(int(s) for s in out_shape)
    m = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(out_affine, dtype=np.float64)
    # only the source box the output grid reaches (+1 voxel) is cast to float32 and sampled
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, out_shape[0] - 1) for j in (0, out_shape[1] - 1) for k in (0, out_shape[2] - 1)]
    )
    reach = (m @ corners.T)[:3]
    lo = np.maximum(np.floor(reach.min(axis=1)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(reach.max(axis=1)).astype(int) + 2, np.asarray(array.shape[:3]))
    if (hi <= lo).any():  # the grid lies wholly outside the volume
        if mode == "constant":
            return np.full(out_shape, cval, dtype=np.float32)
        lo, hi = np.zeros(3, int), np.asarray(array.shape[:3])
    src = np.asarray(array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], dtype=np.float32)
    matrix = m[:3, :3]
    if np.allclose(matrix, np.diag(np.diag(matrix))):
        matrix = np.diag(matrix)  # diagonal: scipy's faster path
    return affine_transform(
        src,
        matrix,
        offset=m[:3, 3] - lo,
        output_shape=out_shape,
        order=order,
        mode=mode,
        cval=float(cval),
        prefilter=False,
    ).astype(np.float32, copy=False)


def resample_to_spacing(
    array: np.ndarray, affine: np.ndarray, spacing: float | Sequence[float], order: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a volume ``(x, y, z)`` to ``spacing`` mm, keeping its directions and field of view.

    New shape ``n' = max(1, round(n * s / s'))``; voxel ``j`` of the result lies at old voxel
    index ``(j + 0.5) * s' / s - 0.5`` (outer corners kept, as MONAI ``Spacing``). ``order`` 1
    (images) is trilinear with edge values repeated; 0 (label maps) is nearest neighbour.

    Returns:
        ``(float32 array, new 4x4 affine)``.

    Example::

        out, aff = resample_to_spacing(np.zeros((512, 512, 120)), diag(0.7, 0.7, 2.5), 1.5)
        out.shape   # (239, 239, 200)
    """
    affine = np.asarray(affine, dtype=np.float64)
    old = spacing_of(affine)
    new = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    if (new <= 0).any():
        raise ValueError(f"spacing must be positive, got {spacing}")
    shape = np.asarray(array.shape[:3])
    new_shape = np.maximum(1, np.rint(shape * old / new).astype(int))
    scale = new / old
    out_affine = affine.copy()
    out_affine[:3, :3] = affine[:3, :3] @ np.diag(scale)
    out_affine[:3, 3] = affine[:3, :3] @ (0.5 * scale - 0.5) + affine[:3, 3]
    out = sample_on_grid(array, affine, out_affine, new_shape, order=order, mode="nearest")
    return out, out_affine


def crop_grid(
    centre_ras: Sequence[float], affine: np.ndarray, size: int | Sequence[int], spacing: float | Sequence[float]
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The affine and shape of a crop of ``size`` voxels at ``spacing`` mm centred on ``centre_ras``.

    The crop's axes have the directions of ``affine``'s axes (a crop of an axial CT is axial);
    its centre (between the two middle voxels for even sizes) is ``centre_ras``.

    Example::

        aff, shape = crop_grid([10.0, -40.0, -115.0], meta["affine"], 64, 1.0)
    """
    affine = np.asarray(affine, dtype=np.float64)
    size3 = np.broadcast_to(np.asarray(size, dtype=int), (3,)).copy()
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    directions = affine[:3, :3] / spacing_of(affine)
    out = np.eye(4)
    out[:3, :3] = directions @ np.diag(sp)
    out[:3, 3] = np.asarray(centre_ras, dtype=np.float64) - out[:3, :3] @ ((size3 - 1) / 2.0)
    return out, (int(size3[0]), int(size3[1]), int(size3[2]))


def resample_file(
    src: str | os.PathLike, dst: str | os.PathLike, spacing: float | Sequence[float], label: bool = False
) -> dict[str, Any]:
    """Read a volume (NIfTI, DICOM series folder...), resample it to ``spacing``, write NIfTI ``dst``.

    Images keep int16 when the resampled values are integral after rounding (CT in HU: they are
    rounded to int16), label maps (``label=True``: nearest neighbour) are written as uint8 (int16
    above 255 labels). Returns ``{"shape", "spacing"}`` of the result.

    Example::

        resample_file("imagesTr/lung_001.nii.gz", "cache/imagesTr/lung_001.nii.gz", 1.5)
    """
    array, meta = read_image(src)
    if array.ndim != 3:
        raise DataError(src, f"expected a 3D volume, got shape {array.shape}")
    out, aff = resample_to_spacing(array, meta["affine"], spacing, order=0 if label else 1)
    if label:
        dtype = "uint8" if out.size == 0 or (out.min() >= 0 and out.max() <= 255) else "int16"
    else:
        dtype = "int16" if integral_dtype(array) == "int16" else "float32"
    write_nifti_atomic(out, dst, aff, dtype=dtype)
    return {"shape": list(out.shape), "spacing": spacing_of(aff).round(6).tolist()}


def world_to_voxel(points_lps: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Continuous voxel indices ``(n, 3)`` = (x/column, y/row, z/slice) of LPS points ``(n, 3)`` (DICOM mm).

    Example::

        world_to_voxel(np.array([[-166.0, -171.7, -100.0]]), meta["affine"])   # [[0., 0., 15.]]
    """
    pts = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    ras = np.c_[-pts[:, 0], -pts[:, 1], pts[:, 2], np.ones(len(pts))]
    return (np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ ras.T).T[:, :3]


def sop_slice_index(series_dir: str | os.PathLike, affine: np.ndarray, n_slices: int) -> dict[str, int]:
    """SOPInstanceUID -> slice index ``k`` of the volume read from ``series_dir`` (by its position).

    Each file's ImagePositionPatient is mapped through the inverse of the volume's ``affine``;
    files that are not slices of the volume are left out.

    Example::

        hu, meta = read_dicom_series(folder)
        sop_slice_index(folder, meta["affine"], hu.shape[2])   # {'1.2.3.3.1.1': 0, ...}
    """
    out: dict[str, int] = {}
    for f in sorted(Path(series_dir).iterdir()):
        if not f.is_file():
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "ImagePositionPatient"])
            pos = _floats(ds.get("ImagePositionPatient"), 3)
        except Exception:  # not DICOM: read_dicom_series ignored it too
            continue
        if pos is None or "SOPInstanceUID" not in ds:
            continue
        idx = world_to_voxel(np.asarray([pos]), affine)[0]
        k = int(round(idx[2]))
        if 0 <= k < n_slices and abs(idx[2] - k) < 0.25:
            out[str(ds.SOPInstanceUID)] = k
    return out


# --------------------------------------------------------------------------------------------
# datalists
# --------------------------------------------------------------------------------------------


def write_datalist_if_changed(
    path: str | os.PathLike,
    sections: Mapping[str, Sequence[Mapping[str, Any]]],
    path_keys: Sequence[str] = PATH_KEYS,
    **meta: Any,
) -> bool:
    """:func:`~medspan.data.datalist.write_datalist`, but leave the file untouched if its text is unchanged.

    A re-run that finds nothing new therefore changes no file (mtimes stay). Returns ``True`` if
    the file was (re)written.
    """
    path = Path(path)
    text = format_datalist(path, sections, path_keys=path_keys, **meta)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    write_text_atomic(text, path)
    return True


# --------------------------------------------------------------------------------------------
# fixture writer (tests, benchmarks)
# --------------------------------------------------------------------------------------------


def write_ct_series(
    folder: str | os.PathLike,
    hu: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    *,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    uid_prefix: str = "1.2.826.0.1.3680043.8.498.1",
    patient_id: str = "PAT-0001",
    series_number: int = 1,
    transfer_syntax: str | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    modality: str = "CT",
    skip: Sequence[int] = (),
    file_names: str = "{k:04d}.dcm",
) -> list[dict[str, Any]]:
    """Write a CT series, one DICOM file per slice, as a scanner would (tests and benchmarks).

    Args:
        folder: created if needed.
        hu: ``(x, y, z)`` values in HU; stored as ``(hu - intercept) / slope`` (uint16, 12 bits
            stored, rounded), so ``hu`` is read back exactly when it is a multiple of ``slope``.
        spacing: ``(sx, sy, sz)`` mm (PixelSpacing = ``[sy, sx]``).
        origin: ImagePositionPatient of slice 0 (LPS mm); slice ``k`` lies at
            ``origin + k * sz * normal`` with ``normal = row x column`` of ``orientation``.
        orientation: ImageOrientationPatient (row direction, column direction).
        uid_prefix: the study, series and SOP UIDs are ``<prefix>.<series_number>[.k]`` variants.
        transfer_syntax: a compressed syntax UID (JPEG-LS, JPEG 2000, RLE...) to encode with
            ``ds.compress``; default explicit VR little endian.
        skip: slice indices not written (a series with missing slices).
        file_names: file name pattern with ``k``.

    Returns:
        one dict per written slice: ``path``, ``k``, ``sop_instance_uid``, ``position`` (LPS),
        ``series_instance_uid``.

    Example::

        write_ct_series(tmp / "ct", np.full((32, 32, 4), -1000.0), (0.7, 0.7, 2.5), (-10, -10, -100))
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hu = np.asarray(hu, dtype=np.float64)
    nx, ny, nz = hu.shape
    sx, sy, sz = (float(v) for v in spacing)
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    stored = np.rint((hu - intercept) / slope)
    if stored.min() < 0 or stored.max() > 4095:
        raise ValueError("values do not fit 12 unsigned bits with this slope/intercept")
    stored = stored.astype(np.uint16)
    study = f"{uid_prefix}.1"
    series = f"{uid_prefix}.2.{series_number}"
    written = []
    for k in range(nz):
        if k in skip:
            continue
        pos = np.asarray(origin, dtype=np.float64) + k * sz * normal
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop = f"{uid_prefix}.3.{series_number}.{k + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = f"{uid_prefix}.4"
        ds.PatientID, ds.PatientName = patient_id, patient_id.replace("-", "^")
        ds.Modality = modality
        ds.ImageType = list(image_type)
        ds.SeriesNumber, ds.InstanceNumber = series_number, k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]
        ds.SliceThickness = f"{sz:.6f}"
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "HU"
        pixels = np.ascontiguousarray(stored[:, :, k].T)  # (rows, cols) = (y, x)
        ds.PixelData = pixels.tobytes()
        if transfer_syntax is not None:
            ds.compress(transfer_syntax, pixels)
        path = folder / file_names.format(k=k)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        written.append(
            {"path": path, "k": k, "sop_instance_uid": sop, "position": pos.tolist(), "series_instance_uid": series}
        )
    return written
