"""``medspan prepare <name> ...``: one sub-command per dataset converter in ``data_prep/``.

Each converter module defines ``add_arguments(parser)`` and ``run(args) -> int`` and is also
runnable on its own as ``python -m data_prep.<module> ...`` from the repository root. Installed, the
package is ``medspan.data_prep`` (a generic top-level ``data_prep`` would collide in site-packages).
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help)
CONVERTERS: dict[str, tuple[str, str]] = {
    "mhh-covid-lungs": (".mhh_covid_lungs", "MHH COVID-19 CXRs with V7 lung masks -> span_cxr datalist"),
    "nih-cxr14": (".nih_cxr14", "NIH ChestX-ray14 -> 14 findings + No Finding, official split, boxes"),
    "nih-cxr14-subset": (".nih_cxr14_subset", "the 1000 NIH 64 px thumbnails -> cxr_cls datalist (patient-wise) + pretraining list"),
    "chexpert": (".chexpert", "CheXpert train/valid CSVs -> 14 observations, uncertainty policy, views"),
    "jsrt-scr": (".jsrt_scr", "JSRT raw 12-bit images + SCR masks -> lungs, heart, clavicles (+ exemplar)"),
    "tb-cxr": (".tb_cxr", "Montgomery + Shenzhen TB sets -> lung masks (separate/merged), TB labels"),
    "vindr-cxr": (".vindr_cxr", "VinDr-CXR DICOM + reader labels and boxes -> datalist with PNG cache"),
    "lidc-idri": (".lidc_idri", "LIDC-IDRI CT + reader XML -> nodule masks, consensus, malignancy crops"),
    "msd-lung": (".msd_lung", "MSD Task06 Lung NIfTI -> datalist (+ resampled cache)"),
    "nsclc-radiomics": (".nsclc_radiomics", "NSCLC-Radiomics CT + RTSTRUCT/SEG -> per-structure masks"),
    "folder": (".folder", "any folder of DICOM/PNG/NIfTI -> unlabeled pretraining datalist"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    for name, (module, help_text) in CONVERTERS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module, __package__).add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._module, __package__).run(args) or 0)
