"""``medspan priors-report``: quality and Dice report of a ``build-priors`` folder.

Prints the status counts, the Jacobian check, the time per registration and, where the datalist
has ground truth, Dice per structure (mean / median / min) of the registered exemplar masks, the
affine-only masks, the population prior and the leave-one-out ground-truth mean; writes
``report.json``, ``report.md`` and ``overlay_worst_best.png`` (see :mod:`medspan.atlas.report`).

Example::

    medspan priors-report runs/mhh_priors
    medspan priors-report runs/ct_priors --datalist data/ct/dataset.json --out runs/ct_report --cases 2
"""

from __future__ import annotations

import argparse
import sys

from medspan.atlas.report import format_report, priors_report
from medspan.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``medspan priors-report``."""
    parser.add_argument("priors_dir", help="a folder written by `medspan build-priors`")
    parser.add_argument("--datalist", help="datalist with the ground truth (default: the folder's datalist.json)")
    parser.add_argument("--out", help="report folder (default: PRIORS_DIR/report)")
    parser.add_argument("--cases", type=int, default=3, help="worst and best cases in the overlay (default 3 each)")


def run(args: argparse.Namespace) -> int:
    """Write and print the report. Exit code 0, or 2 when the folder or datalist cannot be used."""
    try:
        summary = priors_report(args.priors_dir, datalist=args.datalist, report_dir=args.out, n_cases=args.cases)
    except (DataError, ValueError) as exc:
        print(f"priors-report: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(summary))
    return 0
