"""``medspan synth``: write a synthetic chest X-ray or chest CT set with masks and a MONAI datalist.

Examples::

    medspan synth cxr --out data/synth_cxr --n 200 --size 256 --seed 0 --format png --workers 2
    medspan synth ct --out data/synth_ct --n 10 --shape 96 96 96 --format nifti

A re-run with the same settings skips the cases already written; the command prints the path of
the datalist (``dataset.json``).
"""

from __future__ import annotations

import argparse
import time

from medspan.data.synthetic.writers import write_ct_dataset, write_cxr_dataset
from medspan.errors import MedspanError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``cxr`` and ``ct`` sub-commands and their options to ``parser``."""
    sub = parser.add_subparsers(dest="kind", metavar="{cxr,ct}", required=True)

    def common(p: argparse.ArgumentParser, n_default: int) -> None:
        p.add_argument("--out", required=True, help="output folder (created if missing)")
        p.add_argument("--n", type=int, default=n_default, help=f"number of cases (default {n_default})")
        p.add_argument("--seed", type=int, default=0, help="dataset seed; case i uses a seed derived from (seed, i)")
        p.add_argument("--val-fraction", type=float, default=0.2, help="share of cases in the validation split")
        p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
        p.add_argument("--overwrite", action="store_true", help="regenerate every case, even with other settings")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    cxr = sub.add_parser("cxr", help="phantom PA chest radiographs (2D)")
    common(cxr, 200)
    cxr.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    cxr.add_argument("--format", choices=("png", "dicom"), default="png", help="image file format (default png)")
    cxr.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="PNG bit depth (default 8)")

    ct = sub.add_parser("ct", help="phantom chest CTs in HU (3D) with nodules")
    common(ct, 10)
    ct.add_argument(
        "--shape", type=int, nargs=3, default=(96, 96, 96), metavar=("NZ", "NY", "NX"),
        help="volume size in voxels as slices, rows, columns (default 96 96 96)",
    )
    ct.add_argument(
        "--spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
        help="voxel size in mm along x, y, z (default: a 384 x 384 x 336 mm field of view)",
    )
    ct.add_argument("--nodules", type=int, default=None, help="nodules per case (default: 1-3 at random)")
    ct.add_argument("--format", choices=("nifti", "dicom"), default="nifti", help="image format (default nifti)")


def run(args: argparse.Namespace) -> int:
    """Write the dataset described by ``args``; print the datalist path. Returns the exit code."""
    start = time.perf_counter()
    try:
        if args.kind == "cxr":
            path = write_cxr_dataset(
                args.out, args.n, size=args.size, seed=args.seed, fmt=args.format, val_fraction=args.val_fraction,
                workers=args.workers, bit_depth=args.bit_depth, overwrite=args.overwrite, progress=not args.quiet,
            )
        else:
            path = write_ct_dataset(
                args.out, args.n, shape=tuple(args.shape), seed=args.seed, fmt=args.format, spacing=args.spacing,
                nodules=args.nodules, val_fraction=args.val_fraction, workers=args.workers, overwrite=args.overwrite,
                progress=not args.quiet,
            )
    except (MedspanError, ValueError) as exc:
        print(f"medspan synth: error: {exc}")
        return 2
    print(f"wrote {args.n} synthetic {args.kind.upper()} cases in {time.perf_counter() - start:.1f} s")
    print(f"datalist: {path}")
    return 0
