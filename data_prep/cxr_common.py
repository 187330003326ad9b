"""What the chest X-ray converters share: the image cache (resize + PNG), masks, boxes, settings, CSVs.

Intensity convention of the cache. Every source picture is first read as float64 values in
``[0, top]`` with "higher = brighter" (bone white, air black):

==========================  ====================================================================
source                      values, top
==========================  ====================================================================
8-bit PNG / JPEG            ``v``, 255
16-bit PNG                  ``v``, ``2**b - 1`` with ``b`` = the smallest bit depth >= 8 holding
                            the picture's largest value (12-bit data in a 16-bit PNG keeps contrast)
JSRT raw (12-bit)           ``4095 - v``, 4095 (the raw values are darker-is-higher)
DICOM                       :func:`medspan.data.readers.read_dicom_2d` with its VOI LUT / window
                            (MONOCHROME1 already inverted), 1; or per-image min-max
==========================  ====================================================================

then resized by exact area averaging (:func:`area_resize`; block means for integer factors) and
stored as ``rint(v * (2**bits - 1) / top)`` in an 8- or 16-bit greyscale PNG (:func:`quantize`),
all in float64. So an 8-bit source cached at its own size and 8 bits is copied exactly, and an
8-bit source halved is the rounded 2 x 2 block mean. Masks are resized with the same area weights
(a pixel is inside when at least half of it is, :func:`resize_mask`) and stored as uint8 PNGs
with values {0, 255}. Files on disk are ordinary pictures: arrays here are numpy ``(rows, cols)``;
MONAI's loaders transpose them to ``(x, y)``.

Boxes are ``[x_min, y_min, x_max, y_max]`` in pixel-edge coordinates of the image they belong to
(``x`` = column, ``y`` = row; the whole image spans ``[0, cols] x [0, rows]``), scaled to the cached
image by :func:`scale_boxes` and rounded to 3 decimals.

Example::

    spec = CacheSpec(size=512, bits=8)
    values, top = read_picture("images/00000001_000.png")    # float64 (1024, 1024), 255.0
    rows, cols = write_cached(values, top, spec, "out/images/00000001_000.png")   # (512, 512)
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import sparse

from medspan.data.datalist import split_datalist
from medspan.errors import DataError
from medspan.io import write_json_atomic, write_png_atomic

from .common import is_done

__all__ = [
    "CacheSpec",
    "PictureJob",
    "add_cache_arguments",
    "add_split_arguments",
    "area_resize",
    "cache_picture",
    "centroid_col",
    "check_settings",
    "compact",
    "patient_split",
    "png_shape",
    "quantize",
    "read_csv",
    "read_mask",
    "read_picture",
    "resize_mask",
    "scale_boxes",
    "spec_from_args",
    "to_unit",
    "write_cached",
    "write_mask",
    "write_png",
]

SETTINGS_NAME = "conversion.json"
FITS = ("square", "longest")


# --------------------------------------------------------------------------------------------
# cache specification
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSpec:
    """How images are cached.

    Args:
        size: output size in pixels; ``0`` keeps the source size.
        fit: ``"square"`` (``size x size``, aspect not kept) or ``"longest"`` (the longer side
            becomes ``size``, the other ``round(side * size / longer)``, aspect kept).
        bits: 8 or 16 (PNG bit depth).
        cache: False = no converted copy; the datalist points at the source files (only for
            sources that are already PNG/JPEG; they are still decoded once to find corrupt files).

    Example::

        CacheSpec(512, "longest").out_shape(390, 320)   # (512, 420)
    """

    size: int = 512
    fit: str = "square"
    bits: int = 8
    cache: bool = True

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"size must be >= 0, got {self.size}")
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {self.fit!r}")
        if self.bits not in (8, 16):
            raise ValueError(f"bits must be 8 or 16, got {self.bits}")

    def out_shape(self, rows: int, cols: int) -> tuple[int, int]:
        """Output ``(rows, cols)`` for a source of ``(rows, cols)``."""
        if self.size == 0 or not self.cache:
            return int(rows), int(cols)
        if self.fit == "square":
            return self.size, self.size
        scale = self.size / max(rows, cols)
        return max(1, round(rows * scale)), max(1, round(cols * scale))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """A few words for datalist names, e.g. ``"cache 512 px square, 8-bit PNG"``."""
        if not self.cache:
            return "source images"
        size = f"{self.size} px {self.fit}" if self.size else "source size"
        return f"cache {size}, {self.bits}-bit PNG"


def add_cache_arguments(parser: argparse.ArgumentParser, default_size: int = 512, no_cache: bool = True) -> None:
    """``--size``, ``--fit``, ``--bits`` (and ``--no-cache`` for PNG/JPEG sources)."""
    parser.add_argument("--size", type=int, default=default_size,
                        help=f"cached image size in pixels, 0 = source size (default {default_size})")
    parser.add_argument("--fit", choices=FITS, default="square",
                        help="square: size x size; longest: longer side = size, aspect kept (default square)")
    parser.add_argument("--bits", type=int, choices=(8, 16), default=8, help="PNG bit depth of the cache (default 8)")
    if no_cache:
        parser.add_argument("--no-cache", action="store_true",
                            help="no converted copies: the datalist points at the source images")


def spec_from_args(args: argparse.Namespace) -> CacheSpec:
    return CacheSpec(size=int(args.size), fit=args.fit, bits=int(args.bits), cache=not getattr(args, "no_cache", False))


def add_split_arguments(parser: argparse.ArgumentParser, default_val: float = 0.1) -> None:
    """``--val-fraction`` and ``--seed`` of the patient-wise validation split."""
    parser.add_argument("--val-fraction", type=float, default=default_val,
                        help=f"fraction of the training images (whole patients) put in 'validation' (default {default_val})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split (default 0)")


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def to_unit(arr: np.ndarray, where: str | os.PathLike = "<array>") -> tuple[np.ndarray, float]:
    """Integer picture values -> ``(float64 values, top)``: the values unchanged, ``top`` their white.

    ``top`` is 255 for uint8, ``2**b - 1`` for wider integers (``b`` = the smallest bit depth
    >= 8 holding the largest value), 1 for bool.

    Example::

        to_unit(np.array([[0, 255]], np.uint8))[1]        # 255.0
        to_unit(np.array([[0, 4095]], np.uint16))[1]      # 4095.0  (12 bits used)
    """
    a = np.asarray(arr)
    if a.dtype == bool:
        return a.astype(np.float64), 1.0
    if a.dtype == np.uint8:
        return a.astype(np.float64), 255.0
    if np.issubdtype(a.dtype, np.integer):
        if a.size and int(a.min()) < 0:
            raise DataError(where, f"negative pixel values (min {int(a.min())}) in a {a.dtype} picture")
        top = int(a.max()) if a.size else 0
        return a.astype(np.float64), float(2 ** max(8, top.bit_length()) - 1)
    raise DataError(where, f"unsupported pixel type {a.dtype} (expected 8- or 16-bit integers)")


def read_picture(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Decode a PNG/JPEG as grey ``(values float64 (rows, cols), top)`` (see :func:`to_unit`).

    Colour becomes grey as :func:`medspan.data.readers.rgb_to_gray` does it (the first channel,
    exactly, when the channels are equal, else BT.601 luma with ``top`` 255); alpha is dropped;
    palette pictures are converted to grey. (PIL directly: importing MONAI costs seconds per
    worker process.)

    Raises:
        DataError: missing, corrupt or unsupported file (the message names it).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(path, "file does not exist")
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            arr = np.asarray(im)
    except Exception as e:
        raise DataError(path, f"cannot read image ({type(e).__name__}: {e})") from e
    if arr.ndim == 3:
        rgb = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
        first = rgb[..., 0]
        if all(np.array_equal(first, rgb[..., k]) for k in range(1, rgb.shape[-1])):
            arr = np.ascontiguousarray(first)
        else:
            luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
            return np.clip(luma, 0.0, 255.0), 255.0
    if arr.ndim != 2:
        raise DataError(path, f"unexpected picture shape {arr.shape}")
    return to_unit(arr, path)


@functools.lru_cache(maxsize=32)
def _area_matrix(n_in: int, n_out: int):
    """Sparse (n_out, n_in) integer overlaps of source with output pixels; each row sums to n_in.

    Source pixel j spans ``[j * n_out, (j + 1) * n_out)``, output pixel i spans
    ``[i * n_in, (i + 1) * n_in)`` (integer units); the entries are their overlap lengths. Built
    from the merged boundaries (at most ``n_in + n_out`` pieces). Cached: treat as read-only.
    """
    cuts = np.union1d(np.arange(n_in + 1) * n_out, np.arange(n_out + 1) * n_in)
    lo, hi = cuts[:-1], cuts[1:]
    src, out = lo // n_out, lo // n_in
    m = sparse.coo_matrix(((hi - lo).astype(np.float64), (out, src)), shape=(n_out, n_in))
    return m.tocsr()


def area_resize(values: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Resize a ``(rows, cols)`` picture by exact area averaging (both shrinking and growing), float64.

    Each output pixel is the area-weighted mean of the source pixels it covers. With integer
    factors this is the block mean; otherwise the integer overlap weights are summed first and
    divided once, so integer input gives correctly rounded float64 means.

    Example::

        area_resize(np.arange(16.).reshape(4, 4), 2, 2)   # [[2.5, 4.5], [10.5, 12.5]]
    """
    a = np.asarray(values, dtype=np.float64)
    h, w = a.shape
    if (h, w) == (rows, cols):
        return a.copy()
    if h % rows == 0 and w % cols == 0:
        return a.reshape(rows, h // rows, cols, w // cols).sum(axis=(1, 3)) / float((h // rows) * (w // cols))
    wr, wc = _area_matrix(h, rows), _area_matrix(w, cols)
    tmp = np.asarray(wr @ a)                                     # (rows, w)
    total = np.asarray(wc @ np.ascontiguousarray(tmp.T)).T       # (rows, cols), weights sum to h * w
    return total / float(h * w)


def quantize(values: np.ndarray, top: float, bits: int = 8) -> np.ndarray:
    """``rint(clip(v * (2**bits - 1) / top))`` as uint8 (bits 8) or uint16 (bits 16), in float64.

    numpy's ``rint`` rounds halves to even.
    """
    white = float(2**bits - 1)
    q = np.rint(np.clip(np.asarray(values, dtype=np.float64) * white / float(top), 0.0, white))
    return q.astype(np.uint8 if bits == 8 else np.uint16)


def write_png(arr: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 or uint16 ``(rows, cols)`` array as a greyscale PNG, atomically.

    zlib level 3: about twice as fast as PIL's default 6 for some 15% more bytes (a cache is
    written once per image and read many times; decoding speed is the same)."""
    a = np.ascontiguousarray(arr)
    if a.dtype not in (np.uint8, np.uint16) or a.ndim != 2:
        raise ValueError(f"expected a 2D uint8/uint16 array, got {a.dtype} {a.shape}")
    return write_png_atomic(a, path, compress_level=3)


def write_cached(values: np.ndarray, top: float, spec: CacheSpec, path: str | os.PathLike) -> tuple[int, int]:
    """Resize a picture (values in ``[0, top]``) to ``spec`` and write it as PNG; returns ``(rows, cols)``."""
    rows, cols = spec.out_shape(*values.shape)
    write_png(quantize(area_resize(values, rows, cols), top, spec.bits), path)
    return rows, cols


def png_shape(path: str | os.PathLike) -> tuple[int, int]:
    """``(rows, cols)`` of a picture from its header (no decoding)."""
    try:
        with Image.open(path) as im:
            return int(im.height), int(im.width)
    except Exception as e:
        raise DataError(path, f"cannot read image header ({type(e).__name__}: {e})") from e


@dataclass(frozen=True)
class PictureJob:
    """One PNG/JPEG source to cache: ``source`` -> ``output`` (``output`` unused when not caching)."""

    case_id: str
    source: str
    output: str
    spec: CacheSpec


def cache_picture(job: PictureJob) -> dict[str, Any]:
    """Cache one PNG/JPEG (skipped when its output exists). Module-level: runs in worker processes.

    Returns:
        ``{"image": path used by the datalist, "src_shape": (rows, cols), "out_shape": (rows, cols),
        "skipped": bool}``.
    """
    if not job.spec.cache:
        values, _ = read_picture(job.source)  # decoded once: corrupt files are found
        return {"image": job.source, "src_shape": values.shape, "out_shape": values.shape, "skipped": False}
    if is_done(job.output):
        return {"image": job.output, "src_shape": png_shape(job.source), "out_shape": png_shape(job.output),
                "skipped": True}
    values, top = read_picture(job.source)
    out = write_cached(values, top, job.spec, job.output)
    return {"image": job.output, "src_shape": values.shape, "out_shape": out, "skipped": False}


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A binary mask picture (PNG/GIF, any palette) as bool ``(rows, cols)``.

    The picture is converted to grey; a pixel is inside when its grey value is at least half of
    the picture's largest value (so 0/1 and 0/255 masks both work; an all-black mask is empty).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(path, "mask file does not exist")
    try:
        with Image.open(p) as im:
            im.load()
            g = im if im.mode in ("L", "1", "I;16", "I") else im.convert("L")
            arr = np.asarray(g)
    except Exception as e:
        raise DataError(path, f"cannot read mask ({type(e).__name__}: {e})") from e
    arr = arr.astype(np.int64)
    top = max(int(arr.max()) if arr.size else 0, 1)
    return 2 * arr >= top


def resize_mask(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Resize a bool ``(rows, cols)`` mask by exact area fractions: inside when at least half is.

    Same weights as :func:`area_resize`, compared in integers (no rounding)."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    if (h, w) == (rows, cols):
        return m.copy()
    wr, wc = _area_matrix(h, rows), _area_matrix(w, cols)
    tmp = np.asarray(wr @ m.astype(np.float64))
    total = np.asarray(wc @ np.ascontiguousarray(tmp.T)).T      # integers, exactly
    return 2 * total >= h * w


def write_mask(mask: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a bool mask as a uint8 {0, 255} PNG, atomically."""
    return write_png(np.asarray(mask, dtype=bool).astype(np.uint8) * 255, path)


def centroid_col(mask: np.ndarray) -> float | None:
    """Mean column of the mask's pixels (None when empty)."""
    cols = np.nonzero(np.asarray(mask, dtype=bool))[1]
    return float(cols.mean()) if cols.size else None


# --------------------------------------------------------------------------------------------
# boxes
# --------------------------------------------------------------------------------------------


def scale_boxes(
    boxes: Sequence[Sequence[float]], src_shape: Sequence[int], out_shape: Sequence[int], digits: int = 3
) -> list[list[float]]:
    """Scale ``[x_min, y_min, x_max, y_max]`` boxes from a ``(rows, cols)`` image to another.

    Example::

        scale_boxes([[100, 50, 300, 250]], (1024, 1024), (512, 512))   # [[50.0, 25.0, 150.0, 125.0]]
    """
    sy = out_shape[0] / src_shape[0]
    sx = out_shape[1] / src_shape[1]
    return [[round(float(b[0]) * sx, digits), round(float(b[1]) * sy, digits),
             round(float(b[2]) * sx, digits), round(float(b[3]) * sy, digits)] for b in boxes]


# --------------------------------------------------------------------------------------------
# settings, CSVs, ids, splits
# --------------------------------------------------------------------------------------------


def check_settings(out_dir: str | os.PathLike, wanted: Mapping[str, Any]) -> None:
    """Record the settings the cached files are made with (``conversion.json``), or check them.

    Raises:
        DataError: the folder was converted with other settings (cached files would mix).
    """
    path = Path(out_dir) / SETTINGS_NAME
    wanted = json.loads(json.dumps(dict(wanted)))
    if path.exists():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(path, f"cannot read the conversion settings ({e}); delete the folder to start over") from e
        if recorded != wanted:
            diff = {k: (recorded.get(k), wanted.get(k)) for k in sorted(set(recorded) | set(wanted))
                    if recorded.get(k) != wanted.get(k)}
            raise DataError(path, f"this folder was converted with other settings (recorded, now): {diff}; "
                                  "use another --out or delete the folder")
        return
    write_json_atomic(wanted, path)


def read_csv(path: str | os.PathLike) -> tuple[list[str], list[list[str]]]:
    """Read a CSV (UTF-8, optional BOM) -> ``(header cells stripped, data rows)``.

    Raises:
        DataError: missing, unreadable or empty file.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "file not found")
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(p, f"cannot read the CSV ({type(e).__name__}: {e})") from e
    if not rows:
        raise DataError(p, "empty CSV (no header)")
    return [c.strip() for c in rows[0]], rows[1:]


def compact(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The entry without its ``None`` values (a missing age stays out of the JSON instead of ``null``,
    which MONAI's default collate cannot batch)."""
    return {k: v for k, v in entry.items() if v is not None}


def patient_split(
    entries: Sequence[dict[str, Any]], val_fraction: float, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Patient-wise ``(training, validation)`` split (``split_datalist`` with ``group_key="patient_id"``)."""
    if not entries or val_fraction <= 0:
        return [dict(e) for e in entries], []
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train, val = split_datalist(entries, float(val_fraction), seed=seed, group_key="patient_id")
    return train, val
