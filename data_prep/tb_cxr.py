"""Montgomery County and Shenzhen TB chest X-ray sets -> images, lung masks and TB labels.

Input (either set or both):

- ``--montgomery``: the ``MontgomerySet`` folder (or its parent)::

      CXR_png/MCUCXR_0001_0.png                  138 PA radiographs, 4020 x 4892 or 4892 x 4020
      ManualMask/leftMask/MCUCXR_0001_0.png      one lung per file, same size as the image
      ManualMask/rightMask/MCUCXR_0001_0.png
      ClinicalReadings/MCUCXR_0001_0.txt         "Patient's Sex: M", "Patient's Age: 067Y", reading

- ``--shenzhen``: the ``ChinaSet_AllFiles`` folder (or its parent)::

      CXR_png/CHNCXR_0001_0.png                  662 radiographs, about 3000 x 3000
      ClinicalReadings/CHNCXR_0001_0.txt         "male 45yrs" then the reading ("normal", "STB, ...")

  The NLM release has no masks. ``--shenzhen-masks`` takes the separately released manual lung
  masks (Stirenko et al. 2018, "shcxr-lung-mask", 566 images; also in the "Chest X-ray Masks and
  Labels" collection): a folder of ``CHNCXR_0001_0_mask.png`` (or ``CHNCXR_0001_0.png``), both
  lungs in one mask at the image's size. Images without a mask get no ``label``.

The TB label is the file name's last digit (``_1`` = TB, ``_0`` = normal), the datasets'
definition. The clinical reading is parsed for sex, age and the reading text, and checked
against it: a reading that is just "normal" on a ``_1`` image, or anything else on a ``_0``
image, is reported (the file-name label is kept).

Lungs (``--lungs``): ``separate`` (default) writes ``left_lung`` / ``right_lung`` named by the
PATIENT's side, which on these PA images is the image's RIGHT / LEFT half. Montgomery's two mask
files are assigned by geometry (the mask whose centre lies further right on the image is
``left_lung``), so the dataset's folder naming does not matter; the report counts which
convention its ``leftMask`` followed (``montgomery_leftMask_image_right``: patient's side;
``montgomery_leftMask_image_left``: viewer's side). Shenzhen's one-piece masks are resized and
then split into the two lungs (:func:`data_prep.mhh_covid_lungs.split_lungs`: connected
components by side, touching lungs cut at the waist). ``merged`` writes one ``lungs`` mask.

Output (``--out``): ``images/<id>.png`` (the cache; ``--size``, ``--fit``, ``--bits``),
``masks/<id>_<structure>.png`` (uint8 {0, 255}, same size), ``datalist.json`` with
``structures`` and ``classes`` ``["tuberculosis"]``; entries ``image``, ``label``, ``labels``,
``case_id``, ``patient_id`` (one image per patient in both sets), ``source``
(montgomery/shenzhen), ``sex``, ``age``, ``reading``. There is no official split: training /
validation / test are patient-wise parts (``--val-fraction``, ``--test-fraction``, ``--seed``).

Problems (report.json): an unexpected file name, a repeated case id, a corrupt image or mask, a
mask of another size than its image, an empty lung mask, a reading that contradicts the label.

Example::

    medspan prepare tb-cxr --montgomery /data/MontgomerySet --shenzhen /data/ChinaSet_AllFiles \\
        --shenzhen-masks /data/shcxr-lung-mask/mask --out data/tb512 --size 512 --test-fraction 0.2
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

from medspan.data.datalist import split_datalist, write_datalist
from medspan.errors import DataError

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
    centroid_col,
    check_settings,
    compact,
    png_shape,
    read_mask,
    read_picture,
    resize_mask,
    spec_from_args,
    write_cached,
    write_mask,
)
from .mhh_covid_lungs import split_lungs

__all__ = [
    "Reading",
    "TbJob",
    "add_arguments",
    "convert",
    "convert_case",
    "find_montgomery",
    "find_shenzhen",
    "main",
    "parse_montgomery_reading",
    "parse_shenzhen_reading",
    "run",
]

NAME = "tb_cxr"
_ID = re.compile(r"^(MCUCXR|CHNCXR)_(\d{4})_([01])$")


# --------------------------------------------------------------------------------------------
# clinical readings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """A parsed clinical reading: ``sex`` ("M"/"F"/""), ``age`` in years (None), ``text``."""

    sex: str
    age: int | None
    text: str

    @property
    def normal(self) -> bool:
        return self.text.strip().strip(".").strip().lower() == "normal"


def _age(number: str, unit: str) -> int:
    return int(number) if unit.upper().startswith("Y") or not unit else 0


def parse_montgomery_reading(text: str) -> Reading:
    """Montgomery's reading: ``Patient's Sex: M`` / ``Patient's Age: 067Y`` lines, the rest is the reading.

    Example::

        parse_montgomery_reading("Patient's Sex: F\\nPatient's Age: 040Y\\nnormal\\n")   # Reading('F', 40, 'normal')
    """
    sex, age, rest = "", None, []
    for line in text.splitlines():
        s = line.strip()
        m_sex = re.match(r"patient'?s\s+sex\s*:\s*([MF])", s, re.IGNORECASE)
        m_age = re.match(r"patient'?s\s+age\s*:\s*(\d+)\s*([YMD]?)", s, re.IGNORECASE)
        if m_sex:
            sex = m_sex.group(1).upper()
        elif m_age:
            age = _age(m_age.group(1), m_age.group(2))
        elif s:
            rest.append(s)
    return Reading(sex, age, " ".join(rest))


def parse_shenzhen_reading(text: str) -> Reading:
    """Shenzhen's reading: a first line ``male 45yrs`` (``Female 35 yrs``, ``male 8month``), then the reading.

    Example::

        parse_shenzhen_reading("male 45yrs\\nSTB,ATB in left upper field\\n")   # Reading('M', 45, 'STB,ATB ...')
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    sex, age = "", None
    if lines:
        m = re.match(r"(female|male|f|m)\b[\s,]*(?:(\d+)\s*([a-z]*))?", lines[0], re.IGNORECASE)
        if m:
            sex = "F" if m.group(1).lower().startswith("f") else "M"
            if m.group(2):
                age = _age(m.group(2), m.group(3) or "")
            rest_first = lines[0][m.end():].strip(" ,;")
            lines = ([rest_first] if rest_first else []) + lines[1:]
    return Reading(sex, age, " ".join(lines))


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------


def _locate(folder: str | os.PathLike, child: str, what: str) -> Path:
    folder = Path(folder)
    for cand in (folder, folder / child):
        if (cand / "CXR_png").is_dir():
            return cand
    raise DataError(folder, f"no CXR_png/ here or in {child}/ (is this the {what} folder?)")


def find_montgomery(folder: str | os.PathLike) -> Path:
    """The ``MontgomerySet`` folder (``folder`` or ``folder/MontgomerySet``)."""
    return _locate(folder, "MontgomerySet", "MontgomerySet")


def find_shenzhen(folder: str | os.PathLike) -> Path:
    """The Shenzhen folder holding ``CXR_png/`` (``folder`` or ``folder/ChinaSet_AllFiles``)."""
    return _locate(folder, "ChinaSet_AllFiles", "ChinaSet_AllFiles")


def _index_masks(folder: Path | None) -> dict[str, Path]:
    """``{case id: mask}`` for ``<id>_mask.png`` / ``<id>.png`` files."""
    if folder is None:
        return {}
    if not Path(folder).is_dir():
        raise DataError(folder, "mask folder not found")
    out: dict[str, Path] = {}
    for p in sorted(Path(folder).iterdir()):
        stem = p.stem.removesuffix("_mask")
        if p.suffix.lower() == ".png" and _ID.match(stem):
            out.setdefault(stem, p)
    return out


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TbJob:
    """One image: its masks as ``(kind, path)`` pairs (``leftMask``/``rightMask`` or ``lungs``)."""

    case_id: str
    image: str
    masks: tuple[tuple[str, str], ...]
    lungs: str
    out_dir: str
    spec: CacheSpec


def _structures(lungs: str) -> tuple[str, ...]:
    return ("left_lung", "right_lung") if lungs == "separate" else ("lungs",)


def _outputs(job: TbJob) -> dict[str, Path]:
    out = Path(job.out_dir)
    paths = {"image": out / "images" / f"{job.case_id}.png"}
    if job.masks:
        paths.update({s: out / "masks" / f"{job.case_id}_{s}.png" for s in _structures(job.lungs)})
    return paths


def _check_size(mask: np.ndarray, shape: tuple[int, int], path: str, image: str) -> None:
    if mask.shape != shape:
        raise DataError(path, f"mask is {mask.shape[1]} x {mask.shape[0]} but its image {image} is "
                              f"{shape[1]} x {shape[0]} (width x height)")


def _lung_masks(job: TbJob, shape: tuple[int, int], out_shape: tuple[int, int]) -> tuple[dict[str, np.ndarray], dict]:
    """The output masks (bool, ``out_shape``) and report counts."""
    counts: dict[str, int] = {}
    src = {}
    for kind, path in job.masks:
        m = read_mask(path)
        _check_size(m, shape, path, job.image)
        if not m.any():
            raise DataError(path, "empty lung mask")
        src[kind] = m
    if "lungs" in src:  # one-piece mask (Shenzhen)
        lungs = resize_mask(src["lungs"], *out_shape)
        if job.lungs == "merged":
            return {"lungs": lungs}, counts
        left, right = split_lungs(lungs)
        if not left.any() or not right.any():
            raise DataError(dict(job.masks)["lungs"], "the lung mask could not be split into a left and a right lung")
        return {"left_lung": left, "right_lung": right}, counts
    a, b = src["leftMask"], src["rightMask"]
    if job.lungs == "merged":
        return {"lungs": resize_mask(a | b, *out_shape)}, counts
    a_right = centroid_col(a) > centroid_col(b)  # leftMask lies further right on the image
    counts["montgomery_leftMask_image_right" if a_right else "montgomery_leftMask_image_left"] = 1
    left, right = (a, b) if a_right else (b, a)
    return {"left_lung": resize_mask(left, *out_shape), "right_lung": resize_mask(right, *out_shape)}, counts


def convert_case(job: TbJob) -> dict[str, Any]:
    """Write one image and its lung masks (skipping files already there). Module-level for workers."""
    paths = _outputs(job)
    if is_done(*paths.values()):
        return {"paths": {k: str(v) for k, v in paths.items()}, "skipped": True, "counts": {}}
    values, top = read_picture(job.image)
    out_shape = job.spec.out_shape(*values.shape)
    masks, counts = _lung_masks(job, values.shape, out_shape) if job.masks else ({}, {})
    write_cached(values, top, job.spec, paths["image"])
    for s, m in masks.items():
        write_mask(m, paths[s])
    return {"paths": {k: str(v) for k, v in paths.items()}, "skipped": False, "counts": counts,
            "shape": png_shape(paths["image"])}


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------


def _collect(folder: Path, source: str, masks: dict[str, tuple[tuple[str, str], ...]], parse, report: Report,
             seen: dict[str, str]) -> list[tuple[str, Path, tuple, Reading | None, int]]:
    """(case id, image, masks, reading, label) for every image of one set."""
    out = []
    for p in sorted((folder / "CXR_png").iterdir(), key=lambda q: (q.stem, q.suffix != ".png", q.name)):
        if p.suffix.lower() != ".png":
            continue
        m = _ID.match(p.stem)
        if not m:
            if not p.name.startswith("."):
                report.problem(p, "unexpected file name (expected MCUCXR_nnnn_L.png / CHNCXR_nnnn_L.png)")
            continue
        cid = p.stem
        if cid in seen:
            report.problem(p, f"case id {cid} repeats {seen[cid]}; skipped")
            continue
        seen[cid] = str(p)
        text = _read_text(folder / "ClinicalReadings" / f"{cid}.txt")
        reading = parse(text) if text is not None else None
        if reading is None:
            report.count(f"{source}_no_reading")
        out.append((cid, p, masks.get(cid, ()), reading, int(m.group(3))))
    return out


def convert(
    out_dir: str | os.PathLike,
    spec: CacheSpec | None = None,
    *,
    montgomery: str | os.PathLike | None = None,
    shenzhen: str | os.PathLike | None = None,
    shenzhen_masks: str | os.PathLike | None = None,
    lungs: str = "separate",
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> tuple[Path, Report]:
    """Convert Montgomery and/or Shenzhen into ``out_dir``; returns ``(datalist path, report)``.

    Raises:
        DataError: neither set given, a set folder without ``CXR_png/``, or ``out_dir`` made with
            other settings.

    Example::

        path, report = convert("data/tb", CacheSpec(256), montgomery="/data/MontgomerySet")
    """
    spec = spec or CacheSpec(size=512)
    if montgomery is None and shenzhen is None:
        raise ValueError("give --montgomery and/or --shenzhen")
    if lungs not in ("separate", "merged"):
        raise ValueError(f"lungs must be 'separate' or 'merged', got {lungs!r}")
    if not spec.cache:
        raise ValueError("tb-cxr always writes a cache (its masks are rewritten)")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(NAME, out_dir)
    check_settings(out_dir, {"converter": NAME, "lungs": lungs, **spec.as_dict()})

    cases: list[tuple[str, str, Path, tuple, Reading | None, int]] = []
    seen: dict[str, str] = {}
    if montgomery is not None:
        mc = find_montgomery(montgomery)
        left = _index_masks(mc / "ManualMask" / "leftMask") if (mc / "ManualMask" / "leftMask").is_dir() else {}
        right = _index_masks(mc / "ManualMask" / "rightMask") if (mc / "ManualMask" / "rightMask").is_dir() else {}
        pairs = {}
        for cid in sorted(set(left) | set(right)):
            if cid in left and cid in right:
                pairs[cid] = (("leftMask", str(left[cid])), ("rightMask", str(right[cid])))
            else:
                report.problem(cid, f"Montgomery mask only in {'leftMask' if cid in left else 'rightMask'}/")
        cases += [("montgomery", *c) for c in _collect(mc, "montgomery", pairs, parse_montgomery_reading, report, seen)]
        for cid in sorted(set(pairs) - set(seen)):
            report.problem(cid, "Montgomery masks without an image in CXR_png/")
    if shenzhen is not None:
        sz = find_shenzhen(shenzhen)
        sm = {cid: (("lungs", str(p)),) for cid, p in _index_masks(Path(shenzhen_masks) if shenzhen_masks else None).items()}
        cases += [("shenzhen", *c) for c in _collect(sz, "shenzhen", sm, parse_shenzhen_reading, report, seen)]
        for cid in sorted(c for c in set(sm) - set(seen) if c.startswith("CHNCXR")):
            report.problem(cid, "Shenzhen lung mask without an image in CXR_png/")

    jobs = [TbJob(cid, str(img), masks, lungs, str(out_dir), spec) for _s, cid, img, masks, _r, _l in cases]
    results = run_items(convert_case, jobs, workers=workers, report=report, key=lambda j: j.image,
                        desc=NAME, progress=progress)
    structures = list(_structures(lungs))
    entries: list[dict[str, Any]] = []
    for (source, cid, _img, masks, reading, label), res in zip(cases, results):
        if res is None:
            continue
        report.count("skipped_existing" if res["skipped"] else "images_written")
        for k, v in res["counts"].items():
            report.count(k, v)
        e: dict[str, Any] = {"image": res["paths"]["image"], "case_id": cid, "patient_id": cid, "source": source,
                             "labels": [label]}
        if masks:
            e["label"] = [res["paths"][s] for s in structures]
        else:
            report.count(f"{source}_no_mask")
        if reading is not None:
            e.update(sex=reading.sex, age=reading.age, reading=reading.text)
            if reading.normal != (label == 0):
                report.problem(cid, f"file name says TB={label} but the clinical reading is {reading.text!r} "
                                    "(the file-name label is kept)")
        entries.append(compact(e))
    report.count("images", len(entries))

    fractions = [1.0 - val_fraction - test_fraction, val_fraction, test_fraction]
    if min(fractions) < 0:
        raise ValueError(f"val_fraction + test_fraction must be <= 1, got {val_fraction} + {test_fraction}")
    parts = split_datalist(entries, fractions, seed=seed, group_key="patient_id") if entries else [[], [], []]
    sections = dict(zip(("training", "validation", "test"), parts))
    datalist = write_datalist(
        out_dir / "datalist.json", sections,
        name=f"Montgomery/Shenzhen TB CXR ({spec.describe()})",
        description=("Converted by data_prep.tb_cxr: labels = [tuberculosis] from the file name (_1 = TB); label = "
                     + ("left_lung, right_lung by the PATIENT's side (left_lung on the image right)" if lungs == "separate"
                        else "both lungs in one mask")
                     + f"; patient-wise split fractions {fractions} (seed {seed}); no official split exists."),
        structures=structures, classes=["tuberculosis"],
    )
    for k, v in sections.items():
        report.count(k, len(v))
    return datalist, report


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``medspan prepare tb-cxr``."""
    parser.add_argument("--montgomery", default=None, help="the MontgomerySet folder")
    parser.add_argument("--shenzhen", default=None, help="the Shenzhen folder holding CXR_png/ (ChinaSet_AllFiles)")
    parser.add_argument("--shenzhen-masks", default=None, help="folder of Shenzhen lung masks (CHNCXR_nnnn_L_mask.png)")
    parser.add_argument("--lungs", choices=("separate", "merged"), default="separate",
                        help="left_lung + right_lung masks, or one 'lungs' mask (default separate)")
    add_cache_arguments(parser, default_size=512, no_cache=False)
    parser.add_argument("--val-fraction", type=float, default=0.1, help="patient-wise validation fraction (default 0.1)")
    parser.add_argument("--test-fraction", type=float, default=0.0, help="patient-wise test fraction (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Convert; print the datalist path. Exit status: 0, 1 (--strict and problems), 2 (cannot start)."""
    return run_converter(NAME, lambda: convert(
        args.out, spec_from_args(args), montgomery=args.montgomery, shenzhen=args.shenzhen,
        shenzhen_masks=args.shenzhen_masks, lungs=args.lungs, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, seed=args.seed, workers=args.workers, progress=not args.quiet),
        args.strict)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data_prep.tb_cxr --montgomery M [--shenzhen S --shenzhen-masks K] --out DIR``."""
    return converter_main("data_prep.tb_cxr", __doc__, add_arguments, run, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
