"""Atlas priors: one expert-labeled scan, registered onto every other scan, gives per-image priors.

A clinician labels ONE scan (the exemplar: an image and one mask per structure). :func:`build_priors`
registers the exemplar onto every image of a datalist (or folder) with
:func:`medspan.atlas.registration.register` (affine, then B-spline or diffeomorphic demons), warps
its masks and stores, per image:

* ``priors/<case>.npy``: the soft prior, float16 ``(S, *spatial)`` channel first, same grid and MONAI
  axis order as the image (what ``LoadImaged(reader="NumpyReader")`` + ``PriorToImaged`` expect):
  the linearly warped masks, Gaussian-softened by ``sigma`` voxels (peak 1 per channel);
* ``masks/<case>.npz``: the warped masks as bool ``(S, *spatial)``: ``registered`` (nearest
  neighbour, the final transform) and ``affine`` (the affine stage alone), for evaluation;
* ``quality/<case>.json``: the quality record (status, metric values, iterations, Jacobian
  determinant min/max and folded fraction, retries and their reasons, seconds; or the error).

and for the whole set ``population_prior.npy`` (the mean of the warped exemplar masks in the common
frame, see :mod:`medspan.atlas.statistics`), ``quality.json`` (all records), ``atlas.json``
(settings and counts) and ``datalist.json`` (the input datalist with a ``prior`` key added).

Status of a record:

==========================  =================================================================
``exemplar``                the exemplar itself: its own masks
``ok``                      registered, every check passed
``retried``                 a stage was rejected once, the safer retry passed (flagged)
``fallback_affine``         the deformable stage was rejected twice: the affine result (flagged)
``fallback_population``     no plausible affine: the population prior (flagged)
``failed``                  the image could not be read/used: no prior, the entry is left out
                            of the output datalist; ``error`` names the file and the problem
==========================  =================================================================

Runs are resumable and parallel: a record is written last, atomically, after its prior and masks,
so a killed run leaves either a complete case or none (stray temporary files are removed on the
next run), and a re-run registers only the images without a record, and again those whose record
says ``failed`` (a fixed file is registered; ``keep_failed=True`` / ``--keep-failed`` keeps them). The settings are kept in
``atlas.json``; re-using a folder with other settings raises :class:`~medspan.errors.DataError`
unless ``overwrite=True``. Registration is deterministic (fixed sampling seeds, one SimpleITK
thread per worker), so the number of workers does not change the result.

Example::

    ex = load_exemplar("images/cxr_0000.png", masks=["masks/cxr_0000_left_lung.png",
                       "masks/cxr_0000_right_lung.png"], structures=["left_lung", "right_lung"])
    res = build_priors(ex, "dataset.json", "priors_out", method="demons", sigma=4.0, workers=2)
    res.datalist, res.counts        # priors_out/datalist.json, {'ok': 190, 'retried': 2, ...}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medspan.atlas.registration import (
    RegistrationSettings,
    register,
    to_sitk,
    warp_masks,
)
from medspan.atlas.statistics import (
    mean_prior,
    population_prior,
    read_masks,
    resize_prior,
    save_prior,
    soften_masks,
)
from medspan.data.datalist import (
    datalist_sections,
    load_datalist,
    read_datalist_json,
    resolve_paths,
    write_datalist,
)
from medspan.data.readers import (
    IMAGE_SUFFIXES,
    image_stem,
    non_finite_problem,
    read_image,
)
from medspan.errors import DataError
from medspan.io import (
    atomic_write,
    remove_stale_temporaries,
    worker_pool,
    write_json_atomic,
)

__all__ = [
    "FLAGGED",
    "STATUSES",
    "AtlasResult",
    "Exemplar",
    "align_labels",
    "build_priors",
    "collect_images",
    "dice",
    "exemplar_from_datalist",
    "load_exemplar",
    "registration_settings",
]

STATUSES: tuple[str, ...] = ("exemplar", "ok", "retried", "fallback_affine", "fallback_population", "failed")
#: statuses that are not a clean registration (reported and counted as flagged)
FLAGGED: tuple[str, ...] = ("retried", "fallback_affine", "fallback_population", "failed")
_VERSION = 1


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------


def registration_settings(method: str = "default", dim: int = 2, **overrides: Any):
    """The registration settings build-priors uses for ``method`` in ``dim`` dimensions.

    ``"default"`` is ``"demons_cc"`` in 2D (diffeomorphic demons after the affine, then the
    local-correlation refinement: on the real MHH radiographs it lifts the lung Dice of the warped
    exemplar from 0.922 to 0.931, see ``bundles/span_cxr/README.md``) and ``"demons"`` in 3D (the
    most accurate of the CT methods within the bundles' budget; ``benchmarks/README.md``). 2D:
    correlation affine, registration grid of at most 128 px. 3D: Mattes mutual information affine
    (robust to HU vs 8-bit volumes), grid of at
    most 64 voxels per side; the 3D B-spline runs on one coarse level only (ITK's B-spline metric
    is slow in 3D). ``overrides`` replace any
    :class:`~medspan.atlas.registration.RegistrationSettings` field.

    Example::

        registration_settings("bspline", 3, bspline_mesh=6)
    """
    if method == "default":
        method = "demons_cc" if dim == 2 else "demons"
    if dim == 2:
        # demons_cc: a smoother demons field (sigma 6 instead of 5), the correlation step adds the detail
        base = RegistrationSettings(method=method, demons_sigma=6.0 if method == "demons_cc" else 5.0)
    elif dim == 3:
        base = RegistrationSettings(
            method=method, metric="mattes", max_size=64, init="geometry", sampling=0.1,
            demons_shrink=(2, 1), demons_iterations=(40, 20), demons_sigma=1.5, bspline_shrink=(2,),
        )
    else:
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    return replace(base, **overrides) if overrides else base


# ----------------------------------------------------------------------------------------------
# the exemplar
# ----------------------------------------------------------------------------------------------


@dataclass
class Exemplar:
    """The expert-labeled scan.

    Attributes:
        image: path of the image (any format :func:`medspan.data.readers.read_image` reads).
        structures: structure names, in channel order.
        masks: bool (S, *spatial) in MONAI order, on the image's grid.
        case_id: name used in reports.
    """

    image: str
    structures: tuple[str, ...]
    masks: np.ndarray
    case_id: str = "exemplar"

    def fingerprint(self) -> str:
        """A hash of the masks and structures (changes when the labeling changes)."""
        h = hashlib.sha1()
        h.update(json.dumps(list(self.structures)).encode())
        h.update(str(self.masks.shape).encode())
        h.update(np.packbits(np.asarray(self.masks, dtype=bool)).tobytes())
        return h.hexdigest()[:16]


def _parse_names(names: Mapping[int, str] | Sequence[str] | str | None) -> dict[int, str]:
    """``{1: 'left_lung', 2: 'right_lung'}`` from a mapping, a list (value i+1 -> names[i]) or
    ``"1:left_lung,2:right_lung"``."""
    if names is None:
        return {}
    if isinstance(names, str):
        out = {}
        for part in names.split(","):
            part = part.strip()
            if not part:
                continue
            if ":" not in part:
                raise ValueError(f"label names must look like '1:left_lung,2:right_lung', got {names!r}")
            k, v = part.split(":", 1)
            out[int(k)] = v.strip()
        return out
    if isinstance(names, Mapping):
        return {int(k): str(v) for k, v in names.items()}
    return {i + 1: str(v) for i, v in enumerate(names)}


def load_exemplar(
    image: str | os.PathLike,
    masks: Sequence[str | os.PathLike] | None = None,
    *,
    label_map: str | os.PathLike | None = None,
    names: Mapping[int, str] | Sequence[str] | str | None = None,
    structures: Sequence[str] | None = None,
    case_id: str | None = None,
) -> Exemplar:
    """Read the exemplar: an image and either one mask file per structure or a label map with names.

    Args:
        image: the exemplar image.
        masks: one mask file per structure (value > 0 inside), in the order of ``structures``.
        label_map: alternatively an integer label map; ``names`` maps label values to structures
            (``{1: "left_lung"}``, ``["left_lung", ...]`` for values 1.., or ``"1:left_lung,..."``).
        structures: structure names (default with ``masks``: the mask files' stems; with a label map:
            the names in value order).
        case_id: name in reports (default: the image stem).

    Raises:
        DataError: an unreadable file, masks whose grid differs from the image, a label value
            without voxels, or a count mismatch between masks and structures.
    """
    image = str(Path(image).resolve())
    arr, _ = read_image(image)
    if (masks is None) == (label_map is None):
        raise DataError(image, "give the exemplar's masks either as one file per structure or as a label map")
    if masks is not None:
        masks = [str(Path(m).resolve()) for m in masks]
        stack = read_masks(masks)
        names_ = list(structures) if structures is not None else [image_stem(m) for m in masks]
        if len(names_) != len(masks):
            raise DataError(image, f"{len(masks)} mask files but {len(names_)} structure names {names_}")
        where = masks[0]
    else:
        lab, _ = read_image(label_map)
        lab = np.rint(np.asarray(lab)).astype(np.int64)
        mapping = _parse_names(names)
        if not mapping:
            values = [int(v) for v in np.unique(lab) if v != 0]
            mapping = {v: f"label_{v}" for v in values}
        if structures is not None:
            inv = {v: k for k, v in mapping.items()}
            missing = [s for s in structures if s not in inv]
            if missing:
                raise DataError(label_map, f"structures {missing} have no label value in {mapping}")
            mapping = {inv[s]: s for s in structures}
        stack = np.stack([lab == v for v in mapping])
        names_ = list(mapping.values())
        empty = [f"{n} (value {v})" for v, n in mapping.items() if not np.any(lab == v)]
        if empty:
            raise DataError(label_map, f"label values without voxels: {', '.join(empty)}")
        where = str(label_map)
    if stack.shape[1:] != arr.shape[: stack.ndim - 1] or arr.ndim not in (2, 3):
        raise DataError(where, f"mask grid {stack.shape[1:]} differs from the exemplar image {image} {arr.shape}")
    if len(set(names_)) != len(names_):
        raise DataError(where, f"structure names repeat: {names_}")
    return Exemplar(image=image, structures=tuple(names_), masks=stack.astype(bool),
                    case_id=case_id or image_stem(image))


def exemplar_from_datalist(
    datalist: str | os.PathLike, case: str | int, structures: Sequence[str] | None = None
) -> Exemplar:
    """The exemplar from a labeled datalist entry: ``case`` is a ``case_id`` or a ``training`` index.

    The entry's ``label`` must be a list of one mask per structure in the order of the datalist's
    ``structures`` (or a dict ``{structure: path}``); ``structures`` picks a subset (default: all).
    Entries of every section are searched for the case id.
    """
    path = Path(datalist)
    doc = read_datalist_json(path)
    known = doc.get("structures")
    candidates: list[dict[str, Any]] = []
    for section in datalist_sections(doc):
        if not doc.get(section):
            continue
        entries = load_datalist(path, section, require=("image",), check_files=False)
        by_id = [e for e in entries if str(e.get("case_id")) == str(case)]
        if not by_id and section == "training" and str(case).isdigit() and int(case) < len(entries):
            by_id = [entries[int(case)]]
        candidates += by_id
    top = doc.get("exemplar")  # e.g. data_prep.mhh_covid_lungs records its exemplar with labels
    if isinstance(top, Mapping) and str(top.get("case_id")) == str(case) and "image" in top:
        rec = resolve_paths(top, path.resolve().parent)
        candidates.append({k: rec[k] for k in ("case_id", "image", "label") if k in rec})
    if not candidates:
        raise DataError(path, f"no entry with case_id {case!r} (nor training index) in the datalist")
    found = next((e for e in candidates if e.get("label") is not None), candidates[0])
    label = found.get("label")
    if isinstance(label, Mapping):
        names = list(label)
        files = [label[n] for n in names]
    elif isinstance(label, list) and all(isinstance(x, str) for x in label):
        if not isinstance(known, list) or len(known) != len(label):
            raise DataError(path, f"case {case}: 'label' has {len(label)} masks but the datalist's 'structures' is {known}")
        names, files = list(known), list(label)
    else:
        raise DataError(path, f"case {case}: needs 'label' as one mask per structure to be an exemplar")
    if structures is not None:
        missing = [s for s in structures if s not in names]
        if missing:
            raise DataError(path, f"case {case}: structures {missing} are not labeled (has {names})")
        files = [files[names.index(s)] for s in structures]
        names = list(structures)
    return load_exemplar(found["image"], files, structures=names, case_id=str(found.get("case_id", case)))


# ----------------------------------------------------------------------------------------------
# the images
# ----------------------------------------------------------------------------------------------


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "case"


def _folder_images(folder: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES):
            out.append({"image": str(p.resolve()), "case_id": image_stem(p)})
        elif p.is_dir() and any(q.suffix.lower() == ".dcm" for q in p.iterdir()):
            out.append({"image": str(p.resolve()), "case_id": p.name})
    if not out:
        raise DataError(folder, "no images found in the folder")
    return out


def collect_images(
    source: str | os.PathLike | Sequence[Mapping[str, Any]], sections: Sequence[str] | None = None
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """The images to process, from a datalist JSON, a folder of images or a list of entries.

    Returns:
        ``(jobs, sections, meta)``: ``jobs`` one dict per unique image (absolute ``image``, unique
        file-safe ``case_id``); ``sections`` the entries (absolute paths) of the chosen sections
        (a folder or list becomes ``{"training": [...]}``); ``meta`` the datalist's other top-level
        keys.
    """
    meta: dict[str, Any] = {}
    if isinstance(source, (str, os.PathLike)):
        src = Path(source)
        if src.is_dir():
            secs = {"training": _folder_images(src)}
        else:
            doc = read_datalist_json(src)
            present = datalist_sections(doc)
            chosen = list(sections) if sections else [k for k in present if doc.get(k)]
            unknown = [s for s in chosen if s not in present]
            if unknown:
                raise DataError(src, f"sections {unknown} not in the datalist (has {present})")
            secs = {s: load_datalist(src, s, require=("image",), check_files=False) for s in chosen}
            meta = {k: v for k, v in doc.items() if k not in present}
            if isinstance(meta.get("exemplar"), Mapping):  # a labeled-exemplar record: make its paths absolute
                meta["exemplar"] = resolve_paths(meta["exemplar"], src.resolve().parent)
    else:
        secs = {"training": [dict(e) for e in source]}
        for i, e in enumerate(secs["training"]):
            if "image" not in e:
                raise DataError(f"entry {i}", "missing 'image'")
            e["image"] = str(Path(e["image"]).resolve())
    jobs: list[dict[str, Any]] = []
    by_image: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for entries in secs.values():
        for e in entries:
            img = e["image"]
            if isinstance(img, list):
                img = img[0]
            img = os.path.normpath(str(img))
            if img in by_image:
                continue
            cid = _safe_id(e.get("case_id") or image_stem(img))
            base, k = cid, 1
            while cid in used:
                k += 1
                cid = f"{base}_{k}"
            used.add(cid)
            job = {"image": img, "case_id": cid}
            by_image[img] = job
            jobs.append(job)
    return jobs, secs, meta


# ----------------------------------------------------------------------------------------------
# one image
# ----------------------------------------------------------------------------------------------


def _paths(out_dir: Path, case_id: str) -> dict[str, Path]:
    return {
        "prior": out_dir / "priors" / f"{case_id}.npy",
        "masks": out_dir / "masks" / f"{case_id}.npz",
        "record": out_dir / "quality" / f"{case_id}.json",
    }


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, **arrays))


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normpath(a) == os.path.normpath(b)


def _read_job(job: dict[str, Any], dim: int) -> dict[str, Any]:
    """Read one image (in the main process, so workers never import the readers / MONAI).

    Returns ``job`` with ``array`` (float32, MONAI order) and ``affine``. Raises DataError for an
    unreadable image, a dimension mismatch with the exemplar, non-finite or constant values.
    """
    arr, meta = read_image(job["image"])
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != dim:
        raise DataError(job["image"], f"image has {arr.ndim} spatial dims {arr.shape}, the exemplar has {dim}")
    problem = non_finite_problem(arr)
    if problem is not None:
        raise DataError(job["image"], problem)
    if float(arr.max()) <= float(arr.min()):
        raise DataError(job["image"], f"image is constant ({float(arr.min()):g}); nothing to register")
    return dict(job, array=arr, affine=np.asarray(meta.get("affine")))


def _failed(job: dict[str, Any], error: str, out_dir: str) -> dict[str, Any]:
    record = {"case_id": job["case_id"], "image": job["image"], "prior": None, "masks": None, "status": "failed",
              "error": error}
    write_json_atomic(record, _paths(Path(out_dir), job["case_id"])["record"])
    return record


def _register_one(job: dict[str, Any], ex: dict[str, Any], settings: Any, sigma: float, out_dir: str) -> dict[str, Any]:
    """Worker: register the exemplar onto one read image, write prior + masks + record; return the record."""
    t0 = time.perf_counter()
    paths = _paths(Path(out_dir), job["case_id"])
    arr = job["array"]
    record: dict[str, Any] = {"case_id": job["case_id"], "image": job["image"], "prior": None, "masks": None,
                              "status": "failed", "error": None, "shape": list(arr.shape)}
    try:
        masks = ex["masks"]
        if _same_file(job["image"], ex["image"]) and masks.shape[1:] == arr.shape:
            soft, hard, aff = masks.astype(np.float32), masks, masks
            record.update(status="exemplar", method="none", metrics={}, iterations={}, jacobian={}, reasons=[])
        else:
            fixed = to_sitk(arr, job["affine"])
            moving = to_sitk(ex["array"], ex["affine"])
            res = register(fixed, moving, settings)
            record.update(res.to_record())
            if res.status == "failed":
                record["status"] = "fallback_population"
                record["seconds_total"] = round(time.perf_counter() - t0, 4)
                write_json_atomic(record, paths["record"])
                return record
            soft = warp_masks(masks, moving, res.transform, fixed, "linear")
            hard = warp_masks(masks, moving, res.transform, fixed, "nearest")
            aff = warp_masks(masks, moving, res.affine, fixed, "nearest")
        save_prior(soften_masks(soft, sigma=sigma), paths["prior"])
        _save_npz(paths["masks"], registered=hard.astype(bool), affine=aff.astype(bool))
        record["prior"], record["masks"] = str(paths["prior"]), str(paths["masks"])
        record["voxels"] = [int(v) for v in hard.reshape(hard.shape[0], -1).sum(axis=1)]
    except Exception as e:  # noqa: BLE001 - any failure on one image must not stop the others
        record.update(status="failed", error=str(e) if isinstance(e, DataError) else f"{job['image']}: {type(e).__name__}: {e}")
    record["seconds_total"] = round(time.perf_counter() - t0, 4)
    write_json_atomic(record, paths["record"])
    return record


# ----------------------------------------------------------------------------------------------
# the whole set
# ----------------------------------------------------------------------------------------------


@dataclass
class AtlasResult:
    """What :func:`build_priors` produced.

    Attributes:
        out_dir: the output folder.
        datalist: the datalist with ``prior`` keys (``out_dir/datalist.json``).
        quality: all quality records (``out_dir/quality.json``).
        population_prior: ``out_dir/population_prior.npy`` (common frame = the exemplar's grid).
        records: the records, in input order.
        counts: number of images per status.
        registered_now: case ids registered by this call (the others were already done).
        seconds: wall time of this call.
    """

    out_dir: Path
    datalist: Path
    quality: Path
    population_prior: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    registered_now: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def flagged(self) -> list[dict[str, Any]]:
        """Records whose status is not a clean registration."""
        return [r for r in self.records if r["status"] in FLAGGED]


def _check_settings(out_dir: Path, wanted: dict[str, Any], overwrite: bool) -> None:
    path = out_dir / "atlas.json"
    if path.exists():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8")).get("settings")
        except (OSError, json.JSONDecodeError):
            recorded = None
        if recorded != json.loads(json.dumps(wanted)):
            if not overwrite:
                diff = sorted(k for k in set(wanted) | set(recorded or {}) if (recorded or {}).get(k) != json.loads(json.dumps(wanted)).get(k))
                raise DataError(path, f"this folder holds priors built with other settings (differ: {diff}); "
                                      "use another output folder or overwrite=True (--overwrite)")
            for sub in ("priors", "masks", "quality"):
                folder = out_dir / sub
                if folder.is_dir():
                    for p in folder.iterdir():
                        if p.is_file():
                            p.unlink()
    write_json_atomic({"settings": wanted}, path)


def _load_record(path: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and rec.get("status") in STATUSES else None


def _complete(rec: dict[str, Any] | None, keep_failed: bool = False) -> bool:
    """A record that a re-run keeps: a ``failed`` one only with ``keep_failed`` (the file may be fixed)."""
    if rec is None:
        return False
    if rec["status"] == "failed":
        return keep_failed
    if rec["status"] == "fallback_population":
        return True
    return all(rec.get(k) and Path(rec[k]).is_file() for k in ("prior", "masks"))


def _run_jobs(
    todo: list[dict[str, Any]], ex: dict[str, Any], settings: Any, sigma: float, out_dir: Path, workers: int,
    progress: bool, on_record: Callable[[dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    """Register ``todo``: images are read here, one at a time, and registered here (``workers <= 1``) or
    in ``workers`` spawned processes with at most ``2 * workers`` images in flight."""
    bar = None
    if progress and todo:
        bar = tqdm(total=len(todo), desc="build-priors", unit="image")
    # Ctrl-C: SimpleITK calls our Python iteration callback from C++ and swallows any exception raised
    # there (a KeyboardInterrupt included: it printed a traceback and the run went on). So the signal
    # only sets a flag, checked after each image; the run then stops with KeyboardInterrupt.
    interrupted: list[bool] = []
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(True))

    def check_interrupt() -> None:
        if interrupted:
            raise KeyboardInterrupt
    done: list[dict[str, Any]] = []
    dim = ex["masks"].ndim - 1

    def finish(rec: dict[str, Any]) -> None:
        check_interrupt()
        done.append(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{rec['case_id']}: {rec['status']}")
        if on_record is not None:
            on_record(rec)

    def read(job: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return _read_job(job, dim)
        except Exception as e:  # noqa: BLE001 - the image's failure is recorded, the others go on
            finish(_failed(job, str(e) if isinstance(e, DataError) else f"{job['image']}: {type(e).__name__}: {e}",
                           str(out_dir)))
            return None

    try:
        if workers <= 1 or len(todo) <= 1:
            for job in todo:
                check_interrupt()
                ready = read(job)
                if ready is not None:
                    finish(_register_one(ready, ex, settings, sigma, str(out_dir)))
        else:
            # spawned workers that die with this process: a killed run leaves no orphan writing priors
            pool = worker_pool(min(workers, len(todo)), start_method="spawn")
            try:
                pending: set = set()
                for job in todo:
                    check_interrupt()
                    ready = read(job)
                    if ready is None:
                        continue
                    pending.add(pool.submit(_register_one, ready, ex, settings, sigma, str(out_dir)))
                    while len(pending) >= 2 * workers:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            finish(fut.result())
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        finish(fut.result())
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        if bar is not None:
            bar.close()
    check_interrupt()
    return done


def align_labels(entry: dict[str, Any], known: Sequence[str] | None, structures: Sequence[str]) -> dict[str, Any]:
    """Keep ``label`` aligned with ``structures``: subset / reorder a per-structure label list or dict
    written for the datalist's ``known`` structures; drop it when it cannot be aligned. Edits ``entry``."""
    label = entry.get("label")
    if label is None or list(known or []) == list(structures):
        return entry
    if isinstance(label, Mapping) and all(s in label for s in structures):
        entry["label"] = [label[s] for s in structures]
    elif isinstance(label, list) and known and len(label) == len(known) and all(s in known for s in structures):
        entry["label"] = [label[list(known).index(s)] for s in structures]
    else:
        entry.pop("label")
    return entry


def build_priors(
    exemplar: Exemplar | str | os.PathLike,
    datalist: str | os.PathLike | Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    method: str = "default",
    sigma: float = 4.0,
    workers: int = 1,
    *,
    masks: Sequence[str | os.PathLike] | None = None,
    structures: Sequence[str] | None = None,
    sections: Sequence[str] | None = None,
    settings: Any = None,
    overwrite: bool = False,
    keep_failed: bool = False,
    progress: bool = True,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> AtlasResult:
    """Register the exemplar onto every image and write per-image soft priors (see the module doc).

    Args:
        exemplar: an :class:`Exemplar`, or the exemplar image path (then ``masks`` and ``structures``).
        datalist: a datalist JSON, a folder of images, or a list of entries with ``image``.
        out_dir: output folder (created; re-runs resume).
        method: ``"default"`` (demons), ``"demons"``, ``"bspline"`` or ``"affine"``.
        sigma: Gaussian softening of the warped masks, in voxels of each image.
        workers: processes (each runs one SimpleITK thread).
        masks, structures: the exemplar's mask files and names when ``exemplar`` is a path.
        sections: datalist sections to process and give priors (default: all).
        settings: a full :class:`~medspan.atlas.registration.RegistrationSettings` (overrides ``method``).
        overwrite: recompute everything when the folder holds priors made with other settings.
        keep_failed: keep the ``failed`` records of an earlier run as they are; by default a re-run
            tries those images again (the file may have been fixed or replaced since).
        progress: show a progress bar.
        on_record: called in the main process with each new record as it completes.

    Returns:
        :class:`AtlasResult`.

    Raises:
        DataError: unreadable exemplar or datalist, an output folder built with other settings.
        Problems with single images never raise: they are records with status ``failed``.
    """
    t0 = time.perf_counter()
    if not isinstance(exemplar, Exemplar):
        if masks is None:
            raise DataError(exemplar, "an exemplar image needs its masks (one file per structure)")
        exemplar = load_exemplar(exemplar, masks, structures=structures)
    ex_arr, ex_meta = read_image(exemplar.image)
    ex_arr = np.asarray(ex_arr, dtype=np.float32)
    dim = ex_arr.ndim
    if settings is None:
        settings = registration_settings(method, dim)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs, secs, meta = collect_images(datalist, sections)
    wanted = {
        "version": _VERSION,
        "exemplar": exemplar.image,
        "exemplar_masks": exemplar.fingerprint(),
        "structures": list(exemplar.structures),
        "sigma": float(sigma),
        "registration": settings.to_dict(),
    }
    _check_settings(out, wanted, overwrite)
    remove_stale_temporaries(*(out / sub for sub in ("priors", "masks", "quality")), min_age_s=0.0)

    records: dict[str, dict[str, Any]] = {}
    todo = []
    for job in jobs:
        rec = _load_record(_paths(out, job["case_id"])["record"])
        if _complete(rec, keep_failed) and rec.get("image") == job["image"]:
            records[job["case_id"]] = rec
        else:
            todo.append(job)
    ex_payload = {"image": exemplar.image, "array": ex_arr, "affine": np.asarray(ex_meta.get("affine")),
                  "masks": np.asarray(exemplar.masks, dtype=bool)}
    new = _run_jobs(todo, ex_payload, settings, float(sigma), out, int(workers), progress, on_record)
    for rec in new:
        records[rec["case_id"]] = rec
    ordered = [records[j["case_id"]] for j in jobs]

    # population prior: mean of the warped exemplar masks in the common frame (the exemplar's grid)
    frame = ex_arr.shape
    usable = [r for r in ordered if r["status"] in ("exemplar", "ok", "retried", "fallback_affine") and r.get("masks")]
    stacks = (np.load(r["masks"])["registered"] for r in usable)  # one at a time (3D sets are large)
    pop = population_prior(stacks, frame) if usable else exemplar.masks.astype(np.float32)
    pop_path = out / "population_prior.npy"
    save_prior(mean_prior([pop], sigma=sigma), pop_path)
    for r in ordered:
        if r["status"] == "fallback_population":
            p = _paths(out, r["case_id"])["prior"]
            save_prior(mean_prior([resize_prior(pop, r["shape"])], sigma=sigma), p)
            r["prior"] = str(p)
            r["population_images"] = len(usable)
            write_json_atomic(r, _paths(out, r["case_id"])["record"])

    counts = {s: sum(r["status"] == s for r in ordered) for s in STATUSES}
    quality_path = write_json_atomic(ordered, out / "quality.json")

    # datalist with priors
    prior_of = {r["image"]: r["prior"] for r in ordered if r.get("prior")}
    known = meta.get("structures")
    out_secs: dict[str, list[dict[str, Any]]] = {}
    dropped = []
    for name, entries in secs.items():
        kept = []
        for e in entries:
            img = e["image"][0] if isinstance(e["image"], list) else e["image"]
            p = prior_of.get(os.path.normpath(str(img)))
            if p is None:
                dropped.append({"section": name, "image": str(img), "case_id": e.get("case_id")})
                continue
            kept.append(align_labels(dict(e, prior=p), known, exemplar.structures))
        out_secs[name] = kept
    doc_meta = {k: v for k, v in meta.items() if k not in ("structures", "priors")}
    doc_meta["structures"] = list(exemplar.structures)
    doc_meta["priors"] = {
        "exemplar": exemplar.case_id, "exemplar_image": exemplar.image, "method": settings.method,
        "sigma": float(sigma), "quality": "quality.json", "population_prior": "population_prior.npy",
        "excluded": dropped,
    }
    dl_path = write_datalist(out / "datalist.json", out_secs, **doc_meta)
    write_json_atomic({"settings": wanted, "counts": counts, "images": len(ordered),
                       "flagged": [r["case_id"] for r in ordered if r["status"] in FLAGGED]}, out / "atlas.json")
    return AtlasResult(
        out_dir=out, datalist=dl_path, quality=quality_path, population_prior=pop_path, records=ordered,
        counts=counts, registered_now=[r["case_id"] for r in new], seconds=time.perf_counter() - t0,
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two bool masks of the same shape; 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s
