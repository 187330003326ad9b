"""Medical Segmentation Decathlon Task06 Lung (NIfTI) -> MONAI datalist (+ optional resampled cache).

Input (``--root``), the folder as unpacked from ``Task06_Lung.tar``::

    Task06_Lung/dataset.json        {"name": "Lung", "labels": {"0": "background", "1": "cancer"},
                                     "training": [{"image": "./imagesTr/lung_001.nii.gz",
                                                   "label": "./labelsTr/lung_001.nii.gz"}, ...],
                                     "test": ["./imagesTs/lung_002.nii.gz", ...], ...}
    Task06_Lung/imagesTr/lung_001.nii.gz   CT in HU
    Task06_Lung/labelsTr/lung_001.nii.gz   0 background, 1 tumour
    Task06_Lung/imagesTs/lung_002.nii.gz

The tarball's macOS side files (``._lung_001.nii.gz``) and other hidden files are ignored. Without
``dataset.json`` the folders are listed instead (``imagesTr/X`` paired with ``labelsTr/X``).

Checks per case (problems go to the report, the case is left out, the rest is converted): the
listed files exist, their NIfTI headers read, image and label have the same shape and affine
(within 1e-3 mm), the case id (file name without ``.nii.gz``) is not listed twice; ``--verify``
decodes every volume (a truncated gzip stream is found). With
``--spacing``, every volume is also fully read (a corrupt gzip stream is found) and resampled
(:func:`data_prep.ct_common.resample_to_spacing`; images trilinear, rounded to int16 HU; labels
nearest neighbour, uint8) into ``cache/<spacing tag>/imagesTr|labelsTr|imagesTs/``; the datalist
then points at the cache. Resampled files are written atomically; a re-run skips existing ones.

Output (``--out``)::

    datalist.json        structures ["cancer"] (from dataset.json labels); training / validation
                         (``--val-fraction`` of the labelled cases, seeded) / test (imagesTs);
                         entries {"image", "label", "case_id"} with paths relative to the datalist
    cache/...            only with --spacing
    report.json / .txt

Example::

    python -m data_prep.msd_lung --root /data/Task06_Lung --out data/msd_lung --spacing 1.5 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medspan.data.datalist import split_datalist
from medspan.data.readers import read_nifti
from medspan.errors import DataError

from .common import (
    Report,
    add_common_arguments,
    converter_main,
    is_done,
    run_converter,
    run_items,
)
from .ct_common import resample_file, write_datalist_if_changed

__all__ = ["list_cases", "check_case", "convert", "add_arguments", "run", "main"]


def _case_id(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _visible_nifti(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.endswith((".nii.gz", ".nii"))
    )


def list_cases(root: str | os.PathLike, report: Report) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict]:
    """The labelled and test cases of a Task06 folder: ``(training, test, dataset_json)``.

    Each case is ``{"case_id", "image", "label"?}`` with absolute paths. Duplicated case ids are
    reported and only the first is kept; paths in ``dataset.json`` that do not exist are kept here
    (:func:`check_case` reports them).

    Example::

        train, test, meta = list_cases("Task06_Lung", report)
        train[0]   # {'case_id': 'lung_001', 'image': '.../imagesTr/lung_001.nii.gz', 'label': '...'}
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "Task06_Lung folder not found")
    meta_path = root / "dataset.json"
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(meta_path, f"not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise DataError(meta_path, "expected a JSON object")
        raw_train = meta.get("training", [])
        raw_test = meta.get("test", [])
        train = []
        for i, e in enumerate(raw_train):
            if not isinstance(e, dict) or "image" not in e:
                report.problem(f"{meta_path}: training[{i}]", f"entry without an image: {e!r:.80}")
                continue
            case = {"case_id": _case_id(e["image"]), "image": str((root / e["image"]).resolve())}
            if e.get("label"):
                case["label"] = str((root / e["label"]).resolve())
            train.append(case)
        test = []
        for i, e in enumerate(raw_test):
            image = e.get("image") if isinstance(e, dict) else e
            if not isinstance(image, str):
                report.problem(f"{meta_path}: test[{i}]", f"entry without an image: {e!r:.80}")
                continue
            test.append({"case_id": _case_id(image), "image": str((root / image).resolve())})
        listed = {Path(c["image"]).name for c in train + test}
        unlisted = [
            p for p in _visible_nifti(root / "imagesTr") + _visible_nifti(root / "imagesTs") if p.name not in listed
        ]
        if unlisted:
            report.count("unlisted_images", len(unlisted))
    else:
        report.count("no_dataset_json")
        train = [
            {
                "case_id": _case_id(p.name),
                "image": str(p.resolve()),
                "label": str((root / "labelsTr" / p.name).resolve()),
            }
            for p in _visible_nifti(root / "imagesTr")
        ]
        test = [{"case_id": _case_id(p.name), "image": str(p.resolve())} for p in _visible_nifti(root / "imagesTs")]
        if not train and not test:
            raise DataError(root, "no dataset.json and no imagesTr/ or imagesTs/ NIfTI files")

    seen: dict[str, str] = {}
    out_lists = []
    for section, cases in (("training", train), ("test", test)):
        kept = []
        for c in cases:
            if c["case_id"] in seen:
                report.problem(
                    c["image"],
                    f"duplicate case id {c['case_id']} ({section}): also {seen[c['case_id']]}; the first is used",
                )
                continue
            seen[c["case_id"]] = c["image"]
            kept.append(c)
        out_lists.append(kept)
    return out_lists[0], out_lists[1], meta


def _header(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    if not Path(path).is_file():
        raise DataError(path, "file listed but missing")
    try:
        img = nib.load(path)
        return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, ValueError...
        raise DataError(path, f"cannot read the NIfTI header ({type(e).__name__}: {e})") from e


def check_case(case: dict[str, Any]) -> dict[str, Any]:
    """Check one case's files (header-level); returns the case with ``shape``. Raises DataError."""
    shape, affine = _header(case["image"])
    if len(shape) != 3:
        raise DataError(case["image"], f"expected a 3D volume, got shape {shape}")
    if "label" in case:
        lshape, laffine = _header(case["label"])
        if lshape[:3] != shape:
            raise DataError(case["label"], f"label shape {lshape} differs from image shape {shape}")
        if not np.allclose(laffine, affine, atol=1e-3):
            raise DataError(case["label"], "label affine differs from the image's")
    return dict(case, shape=list(shape))


def _spacing_tag(spacing: Sequence[float]) -> str:
    return "x".join(f"{s:g}" for s in spacing)


def _cache_case(job: dict[str, Any]) -> dict[str, Any]:
    """Check, then resample one case into the cache (skips existing files). Module-level for workers."""
    case = check_case(job["case"])
    out, spacing = Path(job["cache"]), job["spacing"]
    folder = "imagesTs" if job["section"] == "test" else "imagesTr"
    result = dict(case, skipped=True)
    dst = out / folder / Path(case["image"]).name
    if not is_done(dst):
        resample_file(case["image"], dst, spacing)
        result["skipped"] = False
    result["image"] = str(dst)
    if "label" in case:
        ldst = out / "labelsTr" / Path(case["label"]).name
        if not is_done(ldst):
            resample_file(case["label"], ldst, spacing, label=True)
            result["skipped"] = False
        result["label"] = str(ldst)
    return result


def _check_job(job: dict[str, Any]) -> dict[str, Any]:
    case = check_case(job["case"])
    if job.get("verify"):
        for key in ("image", "label"):
            if key in case:
                read_nifti(case[key])  # decodes the whole file: a truncated gzip stream raises DataError
    return dict(case, skipped=False)


def convert(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    spacing: Sequence[float] | float | None = None,
    verify: bool = False,
    val_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    report: Report | None = None,
) -> Report:
    """Convert a Task06_Lung folder (see the module doc); returns the report.

    Example::

        report = convert("Task06_Lung", "data/msd_lung", spacing=1.5)
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = report or Report("msd_lung", out)
    train, test, meta = list_cases(root, report)
    if spacing is not None:
        sp = [float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))]
        cache = out / "cache" / _spacing_tag(sp)
        fn = _cache_case
    else:
        sp, cache, fn = None, None, _check_job
    jobs = [{"case": c, "section": "training", "cache": str(cache), "spacing": sp, "verify": verify} for c in train]
    jobs += [{"case": c, "section": "test", "cache": str(cache), "spacing": sp, "verify": verify} for c in test]
    results = run_items(
        fn, jobs, workers=workers, report=report, key=lambda j: j["case"]["image"], desc="msd-lung", progress=progress
    )
    done_train, done_test = [], []
    for job, res in zip(jobs, results):
        if res is None:
            continue
        report.count("cases")
        if spacing is not None:
            report.count("skipped_existing" if res["skipped"] else "resampled")
        entry = {"image": res["image"], "case_id": res["case_id"]}
        if "label" in res:
            entry["label"] = res["label"]
        (done_test if job["section"] == "test" else done_train).append(entry)
    labelled = [e for e in done_train if "label" in e]
    train_part, val_part = split_datalist(labelled, val_fraction, seed=seed) if labelled else ([], [])
    labels = meta.get("labels", {"0": "background", "1": "cancer"})
    structures = [str(v) for k, v in sorted(labels.items(), key=lambda kv: int(kv[0])) if str(k) != "0"]
    extra: dict[str, Any] = {"spacing": sp} if sp else {}
    write_datalist_if_changed(
        out / "datalist.json",
        {"training": train_part, "validation": val_part, "test": done_test},
        name=f"MSD {meta.get('name', 'Lung')} (Task06)",
        modality="CT",
        structures=structures,
        description="label: 0 background, 1 " + ", ".join(structures) + " (data_prep.msd_lung)",
        **extra,
    )
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``medspan prepare msd-lung`` / ``python -m data_prep.msd_lung``."""
    parser.add_argument("--root", required=True, help="the Task06_Lung folder")
    parser.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        default=None,
        help="resample into a cache at this spacing (mm; one value or three)",
    )
    parser.add_argument(
        "--verify", action="store_true", help="decode every volume (finds corrupt gzip streams; implied by --spacing)"
    )
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation fraction (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Convert and write the report; 1 only with ``--strict`` and problems, 2 on fatal errors."""
    spacing = args.spacing
    if spacing is not None and len(spacing) not in (1, 3):
        print("msd_lung: error: --spacing takes one or three values", file=sys.stderr)
        return 2
    return run_converter("msd_lung", lambda: convert(
        args.root,
        args.out,
        spacing=spacing,
        verify=args.verify,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
    ), args.strict)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data_prep.msd_lung --root Task06_Lung --out D [--spacing 1.5] [--workers N]``."""
    return converter_main("data_prep.msd_lung", __doc__, add_arguments, run, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
