"""``medspan info PATH``: read one image with :func:`medspan.data.readers.read_image` and describe it.

Prints the reader used, the array shape (MONAI order) and dtype, the spacing, the value range
(of the finite voxels), the number of NaN and infinite voxels, and for DICOM the photometric interpretation and modality.

Example::

    $ medspan info LIDC-IDRI-0001/ct
    path:        LIDC-IDRI-0001/ct
    reader:      pydicom-series (16 slices, 0 other files ignored)
    shape:       (512, 512, 16)  (MONAI order x, y, z)
    dtype:       float32 (stored as int16)
    spacing:     0.7031 x 0.7031 x 2.5 mm (PixelSpacing)
    range:       -2048 .. 3071 (mean -860.928)
    non-finite:  0 NaN, 0 infinite voxels
    dicom:       CT, MONOCHROME2
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from medspan.data.readers import non_finite_counts, read_image
from medspan.errors import DataError

_AXES = {1: "x", 2: "x, y", 3: "x, y, z"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``PATH``, ``--voi-lut`` and ``--window C W``."""
    parser.add_argument("path", help="a DICOM file, a folder of one DICOM series, PNG/JPEG, NIfTI, NRRD or MHA")
    parser.add_argument("--voi-lut", action="store_true", help="apply the DICOM file's VOI LUT / window (-> [0, 1])")
    parser.add_argument(
        "--window", nargs=2, type=float, metavar=("C", "W"), help="apply a window centre C, width W (-> [0, 1])"
    )
    parser.add_argument("--keep-rgb", action="store_true", help="keep colour channels instead of converting to grey")


def describe(array: np.ndarray, meta: dict) -> list[str]:
    """The lines printed by ``medspan info`` for an ``(array, meta)`` pair from ``read_image``."""
    rank = len(meta["spatial_shape"])
    reader = str(meta.get("reader", "?"))
    if "n_slices" in meta:
        reader += f" ({meta['n_slices']} slices, {meta['n_ignored_files']} other files ignored)"
    channels = "" if array.ndim == rank else ", channels last"
    dtype = str(array.dtype)
    if meta.get("original_dtype") and meta["original_dtype"] != dtype:
        dtype += f" (stored as {meta['original_dtype']})"
    spacing = " x ".join(f"{float(s):.4g}" for s in meta["spacing"])
    source = meta.get("spacing_source")
    unit = " (unknown: default 1.0)" if source == "default" else (f" mm ({source})" if source else " mm")
    finite = array[np.isfinite(array)] if array.dtype.kind == "f" else array
    if finite.size:
        value_range = f"{finite.min():.6g} .. {finite.max():.6g} (mean {finite.mean(dtype=np.float64):.6g})"
    else:
        value_range = "no finite values"
    nan, inf = non_finite_counts(array)
    if nan or inf:
        value_range += " over the finite voxels"
    lines = [
        f"path:        {meta.get('filename_or_obj', '?')}",
        f"reader:      {reader}",
        f"shape:       {tuple(array.shape)}  (MONAI order {_AXES.get(rank, '?')}{channels})",
        f"dtype:       {dtype}",
        f"spacing:     {spacing}{unit}",
        f"range:       {value_range}",
        f"non-finite:  {nan} NaN, {inf} infinite voxels"
        + (f" of {array.size}: fix or drop this image (training on it gives NaN losses)" if nan or inf else ""),
    ]
    if "photometric_interpretation" in meta:
        lines.append(f"dicom:       {meta.get('modality') or '?'}, {meta['photometric_interpretation'] or '?'}")
        voi = meta.get("voi", "none")
        if voi != "none":
            lines.append(f"voi:         {voi} (values mapped to [0, 1])")
    if meta.get("rgb_to_gray"):
        lines.append("colour:      converted to grey (BT.601 luma)")
    if "mode" in meta:
        lines.append(f"image:       {meta.get('format') or '?'} mode {meta['mode']}")
    return lines


def run(args: argparse.Namespace) -> int:
    """Read ``args.path`` and print its description; return 1 (with the reason) on a data error."""
    try:
        array, meta = read_image(
            args.path, apply_voi_lut=args.voi_lut, window=args.window, rgb_to_gray=not args.keep_rgb
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(describe(array, meta)))
    return 0
