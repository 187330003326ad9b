"""The whole-thorax LIDC volume of the vtk.js sample data (``LIDC2.vti``) -> NIfTI + a datalist.

Input: the folder ``lidc_thorax_vtkjs`` (see its README): ``LIDC2.vti/index.json`` (vtk.js image
metadata: extent, spacing, origin, one uint8 array) and ``LIDC2.vti/data/<id>.gz`` (the gzip of the
raw array, x fastest, i.e. C order ``(z, y, x)``). The values are 8-bit windowed CT (lung and air
both 0), not HU; there are no labels.

Orientation (read off the volume, the metadata has none): array ``x`` runs towards the patient's
LEFT, ``y`` towards ANTERIOR (the spine is at ``y = 0``) and ``z`` towards INFERIOR (the lung apices
are at ``z = 0``, the liver at the end). The NIfTI therefore gets the RAS affine
``diag(-sx, +sy, -sz)`` (a proper rotation, no mirror), with the volume centred on the origin,
so medspan's readers give the usual ``(x, y, z)`` array and a registration from a synthetic chest CT
(LPS axes) starts with the anatomy the right way round.

Output (``out_dir``)::

    lidc2.nii.gz      uint8 (x, y, z), RAS affine as above (qform = sform, code 1)
    datalist.json     {"training": [{"image": "lidc2.nii.gz", "case_id": "LIDC2"}]}

``shrink`` > 1 bin-averages the volume first (e.g. 2 -> 128 x 128 x 66 voxels at twice the spacing).

Example::

    python -m data_prep.lidc_thorax_vtkjs --out runs/data/lidc2 [--shrink 2]
    medspan build-priors --exemplar ct_0000.nii.gz --masks ct_0000_left_lung.nii.gz ... \\
        --datalist runs/data/lidc2/datalist.json --out runs/lidc2_priors --sigma 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medspan.data.datalist import write_datalist
from medspan.errors import DataError
from medspan.io import write_nifti_atomic

__all__ = ["convert", "default_root", "main", "ras_affine", "read_vti"]

DATASET_DIR = "lidc_thorax_vtkjs"


def default_root() -> Path:
    """``<repo>/../shared/data/real/lidc_thorax_vtkjs``."""
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / DATASET_DIR


def read_vti(vti_dir: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a vtk.js ``*.vti`` folder holding one uint8 point-data array.

    Returns:
        ``(volume, spacing)``: uint8 ``(x, y, z)`` (MONAI order) and ``(sx, sy, sz)`` in mm.

    Raises:
        DataError: missing/corrupt metadata or data, an unsupported data type, or a size mismatch.
    """
    vti = Path(vti_dir)
    index = vti / "index.json"
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
        arr = meta["pointData"]["arrays"][0]["data"]
        extent = [int(v) for v in meta["extent"]]
        spacing = tuple(float(v) for v in meta["spacing"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise DataError(index, f"cannot read the vtk.js image metadata ({type(e).__name__}: {e})") from None
    if arr.get("dataType") != "Uint8Array" or int(arr.get("numberOfComponents", 1)) != 1:
        raise DataError(index, f"expected one uint8 component, got {arr.get('dataType')} x {arr.get('numberOfComponents')}")
    nx, ny, nz = extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1
    data_file = vti / arr["ref"]["basepath"] / f"{arr['ref']['id']}.gz"
    try:
        raw = gzip.decompress(data_file.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(data_file, f"cannot decompress the volume ({type(e).__name__}: {e})") from None
    if len(raw) != nx * ny * nz:
        raise DataError(data_file, f"{len(raw)} bytes, expected {nx} x {ny} x {nz} = {nx * ny * nz}")
    vol = np.frombuffer(raw, np.uint8).reshape(nz, ny, nx).transpose(2, 1, 0)
    return np.ascontiguousarray(vol), spacing


def ras_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS affine of the LIDC2 array (x -> left, y -> anterior, z -> inferior), centred on the origin."""
    direction = np.diag([-1.0, 1.0, -1.0])
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing, dtype=float)
    centre = (np.asarray(shape, dtype=float) - 1) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def _shrink(vol: np.ndarray, spacing: Sequence[float], factor: int) -> tuple[np.ndarray, tuple[float, ...]]:
    if factor <= 1:
        return vol, tuple(spacing)
    shape = [n // factor for n in vol.shape]
    v = vol[: shape[0] * factor, : shape[1] * factor, : shape[2] * factor].astype(np.float32)
    v = v.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5))
    return np.rint(v).astype(np.uint8), tuple(float(s) * factor for s in spacing)


def convert(root: str | os.PathLike | None, out_dir: str | os.PathLike, shrink: int = 1) -> Path:
    """Write ``lidc2.nii.gz`` and ``datalist.json`` into ``out_dir``; return the datalist path."""
    root = Path(root) if root is not None else default_root()
    vol, spacing = read_vti(root / "LIDC2.vti")
    vol, spacing = _shrink(vol, spacing, int(shrink))
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    nifti = write_nifti_atomic(vol, out / "lidc2.nii.gz", ras_affine(vol.shape, spacing), dtype=vol.dtype)
    return write_datalist(
        out / "datalist.json", {"training": [{"image": str(nifti), "case_id": "LIDC2"}]},
        name="LIDC2 whole-thorax CT (vtk.js sample, 8-bit)",
        description=f"converted by data_prep.lidc_thorax_vtkjs from {DATASET_DIR} (shrink {shrink}); no labels",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data_prep.lidc_thorax_vtkjs --out DIR [--root R] [--shrink N]``."""
    parser = argparse.ArgumentParser(prog="python -m data_prep.lidc_thorax_vtkjs", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help=f"the {DATASET_DIR} folder (default: <repo>/../shared/data/real/{DATASET_DIR})")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--shrink", type=int, default=1, help="bin-average by this factor per axis (default 1)")
    args = parser.parse_args(argv)
    try:
        path = convert(args.root, args.out, args.shrink)
    except DataError as exc:
        print(f"lidc_thorax_vtkjs: error: {exc}", file=sys.stderr)
        return 2
    print(f"datalist: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
