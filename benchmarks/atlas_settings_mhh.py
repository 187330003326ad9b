"""Lung Dice of the warped exemplar masks on the real MHH radiographs, for registration settings side by side.

What is scored is the production registration (:func:`medspan.atlas.registration.register` with
:func:`medspan.atlas.build.registration_settings`, the settings ``medspan build-priors`` uses), one
exemplar registered onto every other labeled image of the MHH set, its masks warped with nearest
neighbour and compared with each image's own left / right lung masks. Each settings variant is a
JSON object of :class:`~medspan.atlas.registration.RegistrationSettings` overrides, plus
``"method"`` (default ``"default"``) and ``"mask_dilate"`` (a moving mask: the exemplar's lungs
dilated by this many pixels). This is how the 2D default method (``demons_cc``) and its settings
were chosen; the table in ``bundles/span_cxr/README.md`` quotes its output.

Needs the converted set (``python -m data_prep.mhh_covid_lungs --out bundles/span_cxr/runs/data/mhh_lungs
--size 256``, from ``../shared/data/real``).

Usage::

    python benchmarks/atlas_settings_mhh.py                                   # the default settings
    python benchmarks/atlas_settings_mhh.py --variants '[{"method": "demons"}, {"cc_radius": 4}]'
    python benchmarks/atlas_settings_mhh.py --exemplar 80b5f00f --workers 2 --per-image

Prints, per variant: left / right lung Dice mean / min, the mean over both lungs, the affine-only
mean, the images whose registration was flagged, the median seconds per registration and the
smallest Jacobian determinant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATALIST = REPO / "bundles/span_cxr/runs/data/mhh_lungs/span_datalist.json"
LUNGS = ["left_lung", "right_lung"]


def load_cases(datalist: Path, exemplar: str) -> tuple[dict[str, Any], list[tuple[str, list[str]]]]:
    """The exemplar (array, affine, masks) and the other labeled images with their lung mask files."""
    from medspan.atlas.build import _read_job, exemplar_from_datalist

    ex = exemplar_from_datalist(datalist, exemplar, LUNGS)
    job = _read_job({"image": ex.image, "case_id": ex.case_id}, 2)
    doc = json.loads(datalist.read_text())
    base = datalist.parent
    items = [
        (str(base / e["image"]), [str(base / p) for p in e["label"]])
        for e in doc["validation"]
        if e.get("case_id") != exemplar
    ]
    return {"array": job["array"], "affine": job["affine"], "masks": ex.masks}, items


def score_one(args: tuple[dict[str, Any], str, list[str], dict[str, Any]]) -> dict[str, Any]:
    """Register the exemplar onto one image with a variant; Dice of the registered and affine-only masks."""
    from medspan.data.readers import read_image
    from medspan.atlas.build import _read_job, dice, registration_settings
    from medspan.atlas.registration import register, to_sitk, warp_masks

    ex, image, labels, variant = args
    variant = dict(variant)
    method = variant.pop("method", "default")
    dilate = variant.pop("mask_dilate", None)
    settings = registration_settings(method, 2, **{k: tuple(v) if isinstance(v, list) else v for k, v in variant.items()})
    job = _read_job({"image": image, "case_id": Path(image).stem}, 2)
    truth = [np.asarray(read_image(p)[0]).squeeze() > 0.5 for p in labels]
    fixed, moving = to_sitk(job["array"], job["affine"]), to_sitk(ex["array"], ex["affine"])
    moving_mask = None
    if dilate is not None:
        from scipy import ndimage

        union = ex["masks"].any(0)
        union = ndimage.binary_dilation(union, iterations=int(dilate)) if dilate > 0 else union
        moving_mask = to_sitk(union.astype(np.float32), ex["affine"])
    t0 = time.perf_counter()
    res = register(fixed, moving, settings, moving_mask=moving_mask)
    seconds = time.perf_counter() - t0
    warped = warp_masks(ex["masks"], moving, res.transform, fixed, "nearest")
    affine = warp_masks(ex["masks"], moving, res.affine, fixed, "nearest") if res.affine is not None else warped
    return {
        "case": Path(image).stem, "status": res.status, "seconds": seconds, "jacobian_min": res.jacobian.get("min"),
        "dice": [dice(w, t) for w, t in zip(warped, truth)], "dice_affine": [dice(a, t) for a, t in zip(affine, truth)],
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datalist", type=Path, default=DEFAULT_DATALIST, help="the data_prep.mhh_covid_lungs datalist")
    p.add_argument("--exemplar", default="a8ac1969", help="case id of the exemplar (default: the converter's)")
    p.add_argument("--variants", default="[{}]", help="JSON list of settings overrides (default: [{}], the default)")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--per-image", action="store_true", help="also list every image, worst first")
    args = p.parse_args(argv)
    if not args.datalist.is_file():
        print(f"{args.datalist}: not found; run python -m data_prep.mhh_covid_lungs first (see the docstring)",
              file=sys.stderr)
        return 2
    ex, items = load_cases(args.datalist, args.exemplar)
    with ProcessPoolExecutor(max(1, args.workers)) as pool:
        for variant in json.loads(args.variants):
            out = list(pool.map(score_one, [(ex, image, labels, variant) for image, labels in items]))
            d = np.array([o["dice"] for o in out])
            flags = [f"{o['case']}:{o['status']}" for o in out if o["status"] != "ok"]
            jac = min((o["jacobian_min"] for o in out if o["jacobian_min"] is not None), default=float("nan"))
            print(f"{json.dumps(variant)}: left {d[:, 0].mean():.4f} / {d[:, 0].min():.3f}, right {d[:, 1].mean():.4f} / "
                  f"{d[:, 1].min():.3f}, mean over lungs {d.mean():.4f} (per image min {d.mean(1).min():.3f}) | "
                  f"affine only {np.mean([o['dice_affine'] for o in out]):.4f} | flagged {flags or 'none'} | "
                  f"{np.median([o['seconds'] for o in out]):.2f} s/reg | Jacobian min {jac:.2f}", flush=True)
            if args.per_image:
                for o in sorted(out, key=lambda o: min(o["dice"])):
                    print(f"   {o['case']}  {o['dice'][0]:.3f} {o['dice'][1]:.3f}  (affine {o['dice_affine'][0]:.3f} "
                          f"{o['dice_affine'][1]:.3f})  {o['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
