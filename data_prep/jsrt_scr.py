"""JSRT radiographs + SCR masks -> images and per-structure label masks at a chosen size.

Input:

- ``--root``: the JSRT images, ``JPCLN001.IMG`` ... ``JPCLN154.IMG`` (154 with a nodule) and
  ``JPCNN001.IMG`` ... ``JPCNN093.IMG`` (93 without), directly in the folder or one level down
  (``All247images/``). Each file is raw pixel data with NO header: 2048 x 2048 pixels, 16 bits
  per pixel, big-endian, 12 bits used (0..4095), 0.175 mm pixels, exactly 8,388,608 bytes. The
  raw values are darker-is-higher (film density): air is high, bone low, so the picture is
  ``4095 - raw`` (higher = brighter, as every other source here).

  PNG exports of the same images, as public mirrors distribute them (``JPCLN001.png`` or
  ``JPCLN001.IMG.png``, 8- or 16-bit grey, any size, e.g. 2048 or 1024 pixels), are accepted too:
  they are read as displayed (bone white, :func:`medspan.data_prep.cxr_common.read_picture`),
  assumed to cover the whole 358.4 mm film (``spacing_mm`` as for ``.IMG``), and go through the
  same resizing, masks and datalist. A case with both an ``.IMG`` and a PNG uses the ``.IMG``
  (counted as ``png_ignored_for_img``).
- ``--scr`` (optional): the SCR database folder (``scr/``, ``scratch/`` or the folder holding
  ``fold1/`` and ``fold2/``)::

      scratch/fold1/masks/left lung/JPCLN001.gif       1024 x 1024 GIF, black / white
      scratch/fold1/masks/right lung/...  heart/...  left clavicle/...  right clavicle/...
      scratch/fold2/masks/...                          (the other half of the 247 images)

  or, as mirrors distribute them, without the fold folders: ``scr/masks/left lung/JPCLN001.gif``
  (or ``.png``; structure folders ``left lung`` or ``left_lung``; masks of any size). Without
  folds no SCR fold is known: there is no ``test`` section (everything is split into
  ``training`` / ``validation``) and the entries have no ``fold``.

  SCR names structures by the PATIENT's side: on these PA radiographs the patient's left lung
  (``left lung``) lies on the image's RIGHT half. Structure names here keep that meaning:
  ``left_lung``, ``right_lung``, ``heart``, ``left_clavicle``, ``right_clavicle``. Every case is
  checked: a ``left_lung`` (``left_clavicle``) mask whose centre lies left of the
  ``right_lung`` (``right_clavicle``) mask's centre is reported (and kept as given).

Output (``--out``)::

    images/JPCLN001.png              4095 - raw, resized (exact area means) to --size, 8/16-bit
    masks/JPCLN001_left_lung.png     uint8 {0, 255}, the SCR mask resampled to the image size
    datalist.json                    structures, classes ["nodule"], label = [mask per structure]
    priors/exemplar_<id>.npy, span_datalist.json      with --exemplar (see below)

Masks go from 1024 to the output size with exact area fractions (inside when >= half covered;
at 2048, ``--size 0``, each SCR pixel becomes a 2 x 2 block exactly). ``labels`` = [1] for
JPCLN (nodule) and [0] for JPCNN, from the file name. Sections: SCR's two folds are its
official protocol: ``--test-fold 2`` (default) puts fold 2 in ``test`` and splits fold 1 into
``training`` / ``validation`` (``--val-fraction``); ``--test-fold 1`` the reverse; ``none``
splits all. Without ``--scr`` there are no masks and no folds. Each image is its own patient.

``--exemplar JPCLN001`` (a plus for ``span_cxr``): that case's masks of ``--structures``,
softened (``--sigma``), become ``priors/exemplar_<id>.npy`` (float16, (S, x, y) MONAI order) and
``span_datalist.json`` holds training = the training and validation images, each with that
prior; validation = the labelled validation images except the exemplar; an ``exemplar`` record.

Problems (report.json; the rest is converted): a file of the wrong size or with values above
4095 (not big-endian 12-bit), an unreadable PNG, a missing or unreadable mask, a case whose masks
are in both folds, a left/right mix-up.

Example::

    medspan prepare jsrt-scr --root /data/JSRT/All247images --scr /data/scr --out data/jsrt512 \\
        --size 512 --exemplar JPCLN001 --structures left_lung right_lung heart
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medspan.atlas.statistics import save_prior, soften_masks
from medspan.data.datalist import write_datalist
from medspan.errors import DataError
from medspan.recipes.cxr import exemplar_masks

from .common import (
    Report,
    add_common_arguments,
    converter_main,
    is_done,
    run_converter,
    run_items,
)
from .cxr_common import (
    CacheSpec,
    add_cache_arguments,
    add_split_arguments,
    centroid_col,
    check_settings,
    patient_split,
    png_shape,
    read_mask,
    read_picture,
    resize_mask,
    spec_from_args,
    write_cached,
    write_mask,
)

__all__ = [
    "JSRT_SHAPE",
    "SCR_FOLDERS",
    "STRUCTURES",
    "JsrtJob",
    "add_arguments",
    "convert",
    "convert_case",
    "find_images",
    "find_scr_masks",
    "jsrt_picture",
    "main",
    "read_jsrt_img",
    "read_jsrt_picture",
    "run",
]

STRUCTURES: tuple[str, ...] = ("left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle")
#: SCR's folder name of each structure
SCR_FOLDERS = {s: s.replace("_", " ") for s in STRUCTURES}
JSRT_SHAPE = (2048, 2048)
JSRT_PIXEL_MM = 0.175
WHITE_12BIT = 4095
NAME = "jsrt_scr"
_ID = re.compile(r"^JPC[LN]N\d{3}$", re.IGNORECASE)
#: an image file name: ``JPCLN001.IMG``, ``JPCLN001.png`` or ``JPCLN001.IMG.png`` (any case)
_IMAGE_NAME = re.compile(r"^(JPC[LN]N\d{3})(?:\.img)?\.(img|png)$", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def read_jsrt_img(path: str | os.PathLike) -> np.ndarray:
    """Decode a JSRT ``.IMG``: raw big-endian 16-bit, 2048 x 2048, no header -> uint16 (rows, cols).

    The values are returned exactly as stored (0..4095, darker-is-higher).

    Raises:
        DataError: missing file, a size other than 8,388,608 bytes, or values above 4095
            (the file is not big-endian 12-bit data, e.g. byte-swapped).

    Example::

        raw = read_jsrt_img("All247images/JPCLN001.IMG")   # uint16 (2048, 2048), max <= 4095
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(path, f"cannot read file ({e})") from e
    expected = JSRT_SHAPE[0] * JSRT_SHAPE[1] * 2
    if len(data) != expected:
        raise DataError(path, f"{len(data)} bytes; a JSRT image is {expected} (2048 x 2048 x 16 bit, no header)")
    raw = np.frombuffer(data, dtype=">u2").reshape(JSRT_SHAPE).astype(np.uint16)
    top = int(raw.max())
    if top > WHITE_12BIT:
        raise DataError(path, f"value {top} exceeds 12 bits: not big-endian 12-bit JSRT data (byte-swapped?)")
    return raw


def jsrt_picture(raw: np.ndarray) -> tuple[np.ndarray, float]:
    """``(4095 - raw as float64, 4095)``: the picture with higher = brighter (see cxr_common)."""
    return float(WHITE_12BIT) - np.asarray(raw, dtype=np.float64), float(WHITE_12BIT)


def find_images(root: str | os.PathLike, report: Report | None = None) -> dict[str, Path]:
    """``{case id (JPCLN001): path}`` of the ``.IMG`` (or PNG export) files in ``root`` or one level below.

    A case's ``.IMG`` is preferred to its PNG export (the PNG is counted as ``png_ignored_for_img``);
    a case id found twice in the same format keeps its first file (``root`` before subfolders)
    and the other is reported.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "JSRT image folder not found")
    by_kind: dict[str, dict[str, Path]] = {"img": {}, "png": {}}
    for p in sorted(root.glob("*")) + sorted(root.glob("*/*")):
        m = _IMAGE_NAME.match(p.name)
        if not (m and p.is_file()):
            continue
        cid, kind = m.group(1).upper(), m.group(2).lower()
        found = by_kind[kind]
        if cid in found:
            if report is not None:
                report.problem(p, f"case {cid} repeats {found[cid]}; skipped")
            continue
        found[cid] = p
    found = dict(by_kind["img"])
    for cid, p in by_kind["png"].items():
        if cid in found:
            if report is not None:
                report.count("png_ignored_for_img")
        else:
            found[cid] = p
    if not found:
        raise DataError(root, "no JPCLNnnn / JPCNNnnn images (.IMG or .png) here or one level down")
    return dict(sorted(found.items()))


def read_jsrt_picture(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """A JSRT image as ``(values float64 (rows, cols), top)``, higher = brighter.

    ``.IMG``: :func:`jsrt_picture` of :func:`read_jsrt_img` (``4095 - raw``, 4095); a PNG export:
    :func:`medspan.data_prep.cxr_common.read_picture` (as displayed; e.g. ``v``, 255 for 8 bits).

    Raises:
        DataError: the file cannot be read or is not valid JSRT data.
    """
    if Path(path).suffix.lower() == ".img":
        return jsrt_picture(read_jsrt_img(path))
    return read_picture(path)


_BASES = ("", "scratch", "scr/scratch", "scr")


def _structure_dir(masks_dir: Path, structure: str) -> Path | None:
    """The folder of ``structure``'s masks: SCR's ``left lung`` or ``left_lung``."""
    for name in (SCR_FOLDERS[structure], structure):
        if (masks_dir / name).is_dir():
            return masks_dir / name
    return None


def _has_structures(masks_dir: Path) -> bool:
    return masks_dir.is_dir() and any(_structure_dir(masks_dir, s) is not None for s in STRUCTURES)


def _fold_dirs(scr: Path) -> list[tuple[int, Path]]:
    """``[(fold number, masks folder)]``: SCR's ``fold*/masks/`` folders, or one flat ``masks/`` (fold 0)."""
    for base in (scr / b if b else scr for b in _BASES):
        folds = sorted(d for d in base.glob("fold*") if (d / "masks").is_dir())
        if folds:
            out = []
            for d in folds:
                m = re.search(r"(\d+)$", d.name)
                out.append((int(m.group(1)) if m else 0, d / "masks"))
            return out
    for base in (scr / b if b else scr for b in _BASES):
        if _has_structures(base / "masks"):
            return [(0, base / "masks")]
    if _has_structures(scr):
        return [(0, scr)]
    raise DataError(scr, "no SCR masks here (expected scratch/fold1/masks/left lung/... or masks/left lung/...)")


def find_scr_masks(scr: str | os.PathLike, report: Report | None = None) -> dict[str, tuple[int, dict[str, Path]]]:
    """``{case id: (fold number, {structure: mask path})}`` from the SCR folder (``.gif`` or ``.png``).

    Fold 0: the masks are not in fold folders (fold unknown). A case found in two folds is
    reported and dropped.
    """
    out: dict[str, tuple[int, dict[str, Path]]] = {}
    dropped: set[str] = set()
    for fold, masks_dir in _fold_dirs(Path(scr)):
        here: dict[str, dict[str, Path]] = {}
        for s in SCR_FOLDERS:
            d = _structure_dir(masks_dir, s)
            if d is None:
                continue
            for p in sorted(d.iterdir()):
                if p.suffix.lower() in (".gif", ".png") and _ID.match(p.stem):  # .gif before .png when both
                    here.setdefault(p.stem.upper(), {}).setdefault(s, p)
        for cid, masks in here.items():
            if cid in out:
                if report is not None:
                    report.problem(cid, f"masks in fold {out[cid][0]} and fold {fold}; case dropped")
                dropped.add(cid)
                continue
            out[cid] = (fold, masks)
    for cid in dropped:
        out.pop(cid, None)
    return out


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JsrtJob:
    """One case: the ``.IMG`` (or PNG export), its SCR masks (may be empty) and where the outputs go."""

    case_id: str
    image: str
    masks: tuple[tuple[str, str], ...]  # (structure, mask path)
    out_dir: str
    spec: CacheSpec
    structures: tuple[str, ...]


def _outputs(job: JsrtJob) -> dict[str, Path]:
    out = Path(job.out_dir)
    paths = {"image": out / "images" / f"{job.case_id}.png"}
    if job.masks:
        paths.update({s: out / "masks" / f"{job.case_id}_{s}.png" for s in job.structures})
    return paths


def _side_warnings(case_id: str, masks: dict[str, np.ndarray]) -> list[str]:
    notes = []
    for left, right in (("left_lung", "right_lung"), ("left_clavicle", "right_clavicle")):
        if left in masks and right in masks:
            cl, cr = centroid_col(masks[left]), centroid_col(masks[right])
            if cl is not None and cr is not None and cl < cr:
                notes.append(f"{left} mask lies left of {right} on the image (SCR: the patient's left is on "
                             f"the image right); kept as given")
    return notes


def convert_case(job: JsrtJob) -> dict[str, Any]:
    """Write one case's image and masks (skipping files already there). Module-level for workers.

    Returns:
        ``{"paths": {"image": ..., structure: ...}, "shape": (rows, cols), "skipped": bool,
        "notes": [left/right warnings]}``.
    """
    paths = _outputs(job)
    if is_done(*paths.values()):  # done before: the left/right check runs on the written masks
        written = {s: read_mask(paths[s]) for s in job.structures if job.masks}
        return {"paths": {k: str(v) for k, v in paths.items()}, "shape": png_shape(paths["image"]),
                "skipped": True, "notes": _side_warnings(job.case_id, written)}
    values, top = read_jsrt_picture(job.image)
    masks_src = {s: read_mask(p) for s, p in job.masks}
    for s, m in masks_src.items():
        if m.ndim != 2:
            raise DataError(dict(job.masks)[s], f"mask is not 2D ({m.shape})")
    missing = [s for s in job.structures if job.masks and s not in masks_src]
    if missing:
        raise DataError(job.image, f"SCR masks missing for {missing}")
    notes = _side_warnings(job.case_id, masks_src)
    rows, cols = write_cached(values, top, job.spec, paths["image"])
    for s in job.structures if job.masks else ():
        write_mask(resize_mask(masks_src[s], rows, cols), paths[s])
    return {"paths": {k: str(v) for k, v in paths.items()}, "shape": (rows, cols), "skipped": False, "notes": notes}


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------


def _write_exemplar(out_dir: Path, exemplar: str, entries: list[dict], structures: Sequence[str],
                    training: list[dict], validation: list[dict], sigma: float, spec: CacheSpec) -> Path:
    by_id = {e["case_id"]: e for e in entries}
    if exemplar not in by_id or "label" not in by_id[exemplar]:
        raise DataError(exemplar, "exemplar is not a converted case with SCR masks")
    ex = by_id[exemplar]
    prior = out_dir / "priors" / f"exemplar_{exemplar}.npy"
    save_prior(soften_masks(exemplar_masks(ex["label"]), sigma=sigma), prior)
    span_train = [{"image": e["image"], "prior": str(prior), "case_id": e["case_id"]} for e in training + validation]
    span_val = [{"image": e["image"], "label": e["label"], "case_id": e["case_id"]}
                for e in validation if e["case_id"] != exemplar and "label" in e]
    record = {"case_id": exemplar, "image": os.path.relpath(ex["image"], out_dir),
              "label": [os.path.relpath(p, out_dir) for p in ex["label"]],
              "prior": os.path.relpath(prior, out_dir), "mask_sigma": float(sigma)}
    return write_datalist(
        out_dir / "span_datalist.json", {"training": span_train, "validation": span_val},
        name=f"JSRT + SCR, exemplar {exemplar} ({spec.describe()})",
        description=("Converted by data_prep.jsrt_scr: training = the training and validation images, each with "
                     f"the exemplar's softened masks (sigma {sigma}) as prior; validation = labelled validation "
                     "images; structures by the patient's side (left_lung on the image right)."),
        structures=list(structures), exemplar=record,
    )


def convert(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: CacheSpec | None = None,
    *,
    scr: str | os.PathLike | None = None,
    structures: Sequence[str] = STRUCTURES,
    test_fold: int | None = 2,
    val_fraction: float = 0.1,
    seed: int = 0,
    exemplar: str | None = None,
    sigma: float = 4.0,
    workers: int = 1,
    progress: bool = True,
) -> tuple[Path, Report]:
    """Convert JSRT (+ SCR) into ``out_dir``; returns ``(datalist path, report)``.

    Raises:
        DataError: no JSRT images, no SCR folds, an unknown structure or exemplar, or an
            ``out_dir`` made with other settings.

    Example::

        path, report = convert("/data/JSRT", "data/jsrt256", CacheSpec(256), scr="/data/scr")
    """
    spec = spec or CacheSpec(size=512)
    if not spec.cache:
        raise ValueError("JSRT images are raw files: they are always cached (no --no-cache)")
    structures = tuple(structures)
    unknown = [s for s in structures if s not in STRUCTURES]
    if unknown or not structures:
        raise ValueError(f"unknown structure(s) {unknown}; choose from {STRUCTURES}")
    out_dir = Path(out_dir).resolve()
    report = Report(NAME, out_dir)
    images = find_images(root, report)
    out_dir.mkdir(parents=True, exist_ok=True)
    masks = find_scr_masks(scr, report) if scr is not None else {}
    check_settings(out_dir, {"converter": NAME, **spec.as_dict()})
    for cid in sorted(set(masks) - set(images)):
        report.problem(cid, "SCR masks without a JSRT image")
    if exemplar is not None and exemplar.upper() not in images:
        raise DataError(exemplar, f"exemplar is not a JSRT case id (e.g. {next(iter(images))})")

    cases = sorted(images)
    reported = {item for item, _ in report.problems}  # e.g. masks in both folds: not reported twice
    jobs = []
    for cid in cases:
        fold_masks = masks.get(cid, (0, {}))[1]
        if scr is not None and not fold_masks:
            if cid not in reported:
                report.problem(cid, "no SCR masks for this image")
            continue
        jobs.append(JsrtJob(cid, str(images[cid]), tuple(sorted((s, str(p)) for s, p in fold_masks.items())),
                            str(out_dir), spec, structures))
    results = run_items(convert_case, jobs, workers=workers, report=report, key=lambda j: j.image,
                        desc=NAME, progress=progress)
    entries: list[dict[str, Any]] = []
    for job, res in zip(jobs, results):
        if res is None:
            continue
        report.count("skipped_existing" if res["skipped"] else "images_written")
        for note in res["notes"]:
            report.problem(job.case_id, note)
        rows, cols = res["shape"]
        e: dict[str, Any] = {"image": res["paths"]["image"], "case_id": job.case_id, "patient_id": job.case_id,
                             "labels": [int(job.case_id.upper().startswith("JPCLN"))],
                             "spacing_mm": [round(JSRT_PIXEL_MM * JSRT_SHAPE[1] / cols, 6),
                                            round(JSRT_PIXEL_MM * JSRT_SHAPE[0] / rows, 6)]}
        if job.masks:
            e["label"] = [res["paths"][s] for s in structures]
            if masks[job.case_id][0]:  # 0: masks without fold folders, fold unknown
                e["fold"] = masks[job.case_id][0]
        entries.append(e)
    report.count("images", len(entries))

    if masks and test_fold is not None:
        test = [e for e in entries if e.get("fold") == test_fold]
        rest = [e for e in entries if e.get("fold") != test_fold]
    else:
        test, rest = [], entries
    training, validation = patient_split(rest, val_fraction, seed)
    if masks and test_fold is not None and not test:
        print(f"[{NAME}] no case of SCR fold {test_fold} (masks without fold folders?): no test section")
    kinds = {Path(j.image).suffix.lower() for j, r in zip(jobs, results) if r is not None}
    source = " and ".join(
        [text for ext, text in ((".img", "images = 4095 - raw 12-bit values (.IMG)"),
                                (".png", "images = the PNG exports as displayed")) if ext in kinds]
    ) or "no images"
    meta: dict[str, Any] = {"classes": ["nodule"]}
    if masks:
        meta["structures"] = list(structures)
    datalist = write_datalist(
        out_dir / "datalist.json", {"training": training, "validation": validation, "test": test},
        name=f"JSRT{' + SCR' if masks else ''} ({spec.describe()})",
        description=(f"Converted by data_prep.jsrt_scr: {source}; labels = [nodule] from the "
                     "file name (JPCLN = 1, JPCNN = 0); label = one mask per structure, by the PATIENT's side "
                     "(left_lung lies on the image right); "
                     + (f"test = SCR fold {test_fold}; " if masks and test_fold is not None else "")
                     + f"validation = fraction {val_fraction} (seed {seed}) of the rest; spacing_mm = (x, y) of the cache."),
        **meta,
    )
    for k, v in (("training", training), ("validation", validation), ("test", test)):
        report.count(k, len(v))
    if exemplar is not None:
        span = _write_exemplar(out_dir, exemplar.upper(), entries, structures, training, validation, sigma, spec)
        report.count("span_datalist")
        print(f"span datalist: {span}")
    return datalist, report


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``medspan prepare jsrt-scr``."""
    parser.add_argument("--root", required=True,
                        help="folder of the JSRT .IMG files (e.g. All247images) or of their PNG exports (JPCLN001.png)")
    parser.add_argument("--scr", default=None, help="SCR folder (scr/, scratch/ or the one holding fold1/ fold2/)")
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES), choices=STRUCTURES, metavar="NAME",
                        help=f"structures to write, in this order (default: {' '.join(STRUCTURES)})")
    parser.add_argument("--test-fold", default="2", choices=("1", "2", "none"),
                        help="SCR fold used as the test section (default 2)")
    parser.add_argument("--exemplar", default=None, help="case id whose masks become the span_cxr prior (e.g. JPCLN001)")
    parser.add_argument("--sigma", type=float, default=4.0, help="Gaussian softening of the exemplar masks (default 4)")
    add_cache_arguments(parser, default_size=512, no_cache=False)
    add_split_arguments(parser)
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Convert; print the datalist path. Exit status: 0, 1 (--strict and problems), 2 (cannot start)."""
    return run_converter(NAME, lambda: convert(
        args.root, args.out, spec_from_args(args), scr=args.scr, structures=args.structures,
        test_fold=None if args.test_fold == "none" else int(args.test_fold), val_fraction=args.val_fraction,
        seed=args.seed, exemplar=args.exemplar, sigma=args.sigma, workers=args.workers, progress=not args.quiet),
        args.strict)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data_prep.jsrt_scr --root R [--scr S] --out DIR [--size 512] [--exemplar JPCLN001]``."""
    return converter_main("data_prep.jsrt_scr", __doc__, add_arguments, run, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
