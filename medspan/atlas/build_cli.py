"""``medspan build-priors``: register one labeled exemplar onto every image and write per-image priors.

The exemplar is an image with one mask per structure (``--masks``), or a label map with names
(``--label-map`` + ``--names``), or a labeled case of the datalist (``--exemplar-case``). The images
come from a datalist (``--datalist``; its entries get a ``prior`` key in ``OUT/datalist.json``) or a
folder (``--images``). When the datalist carries ground truth (``label``), the Dice report of
:mod:`medspan.atlas.report` is printed at the end (registered vs affine-only vs population
priors); ``--no-report`` skips it.

Examples::

    medspan build-priors --datalist data/mhh_lungs/span_datalist.json --exemplar-case a8ac1969 \\
        --out runs/mhh_priors --workers 2
    medspan build-priors --exemplar ex.png --masks ex_left.png ex_right.png \\
        --structures left_lung right_lung --images scans/ --out priors/ --method bspline
    medspan build-priors --exemplar ct0.nii.gz --label-map ct0_labels.nii.gz --names 1:left_lung,2:right_lung \\
        --datalist ct.json --out ct_priors --sigma 2 --exemplar-window -200 300
"""

from __future__ import annotations

import argparse
import sys

from medspan.atlas.build import (
    build_priors,
    exemplar_from_datalist,
    load_exemplar,
    registration_settings,
)
from medspan.atlas.report import format_report, priors_report
from medspan.data.readers import read_image
from medspan.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``medspan build-priors``."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--datalist", help="datalist JSON whose images get priors (entries keep their keys)")
    src.add_argument("--images", help="folder of images (PNG/JPEG, NIfTI, NRRD/MHA, DICOM files or series folders)")
    parser.add_argument("--out", required=True, help="output folder (re-runs resume; see medspan.atlas.build)")
    parser.add_argument("--exemplar", help="the exemplar image (with --masks or --label-map)")
    parser.add_argument("--masks", nargs="+", help="the exemplar's masks, one file per structure")
    parser.add_argument("--structures", nargs="+", help="structure names (order of --masks; or a subset of the datalist's)")
    parser.add_argument("--label-map", help="the exemplar's label map (instead of --masks)")
    parser.add_argument("--names", help="label values to names for --label-map, e.g. 1:left_lung,2:right_lung")
    parser.add_argument("--exemplar-case", help="use this labeled case (case_id or training index) of --datalist as the exemplar")
    parser.add_argument("--method", default="default", choices=["default", "demons_cc", "demons", "bspline", "affine"],
                        help="deformable stage after the affine (default: demons_cc in 2D, demons in 3D)")
    parser.add_argument("--metric", choices=["correlation", "mattes"], default=None,
                        help="affine similarity (default: correlation in 2D, Mattes MI in 3D)")
    parser.add_argument("--exemplar-window", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="clip the exemplar's intensities before registering, e.g. -200 300 (HU) for a CT "
                             "exemplar registered onto 8-bit windowed volumes")
    parser.add_argument("--image-window", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="clip every image's intensities before registering")
    parser.add_argument("--sigma", type=float, default=4.0, help="Gaussian softening of the warped masks in voxels (default 4)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--sections", nargs="+", help="datalist sections to process (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="recompute when OUT holds priors made with other settings")
    parser.add_argument("--keep-failed", action="store_true",
                        help="do not retry images whose earlier record is 'failed' (default: retry them)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-report", action="store_true", help="do not print the quality / Dice report")


def run(args: argparse.Namespace) -> int:
    """Build the priors, print a summary (and the report). Exit code 0, or 2 on an input problem."""
    try:
        if args.exemplar_case is not None:
            if not args.datalist:
                raise DataError("--exemplar-case", "needs --datalist (the case is looked up there)")
            ex = exemplar_from_datalist(args.datalist, args.exemplar_case, args.structures)
        elif args.exemplar:
            if not args.masks and not args.label_map:
                raise DataError(args.exemplar, "give the exemplar's --masks or --label-map")
            ex = load_exemplar(args.exemplar, args.masks, label_map=args.label_map, names=args.names,
                               structures=args.structures)
        else:
            raise DataError("build-priors", "give --exemplar (with --masks or --label-map) or --exemplar-case")

        dim = read_image(ex.image)[0].ndim
        overrides: dict = {"metric": args.metric} if args.metric else {}
        if args.exemplar_window:
            overrides["moving_window"] = tuple(args.exemplar_window)
        if args.image_window:
            overrides["fixed_window"] = tuple(args.image_window)
        settings = registration_settings(args.method, dim, **overrides)
        res = build_priors(ex, args.datalist or args.images, args.out, sigma=args.sigma, workers=args.workers,
                           sections=args.sections, settings=settings, overwrite=args.overwrite,
                           keep_failed=args.keep_failed, progress=not args.no_progress)
    except (DataError, ValueError) as exc:
        print(f"build-priors: error: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in res.counts.items() if v)
    print(f"priors: {len(res.records)} images ({counts}); registered now: {len(res.registered_now)}; "
          f"{res.seconds:.1f} s")
    for r in res.flagged:
        why = r.get("error") or "; ".join((r.get("reasons") or [])[-2:])
        print(f"  flagged {r['case_id']}: {r['status']}: {why}")
    print(f"datalist: {res.datalist}")
    print(f"quality:  {res.quality}")
    if not args.no_report:
        try:
            summary = priors_report(res.out_dir)
        except (DataError, ValueError) as exc:
            print(f"build-priors: report: {exc}", file=sys.stderr)
            return 2
        print(format_report(summary))
    return 0
