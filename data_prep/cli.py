"""``medspan prepare <name> ...``: one sub-command per dataset converter in ``data_prep/``.

Each converter module defines ``add_arguments(parser)`` and ``run(args) -> int`` and is also
runnable on its own as ``python -m data_prep.<module> ...``.
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help)
CONVERTERS: dict[str, tuple[str, str]] = {
    "mhh-covid-lungs": ("data_prep.mhh_covid_lungs", "MHH COVID-19 CXRs with V7 lung masks -> span_cxr datalist"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    for name, (module, help_text) in CONVERTERS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._module).run(args) or 0)
