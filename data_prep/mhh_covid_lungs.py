"""Hannover (MHH) COVID-19 chest X-rays with V7 lung masks -> a ``span_cxr`` datalist.

Input: the folder ``mhh_covid_cxr_v7_lungs`` (see its README): ``manifest.csv`` with the
columns ``image`` and ``mask`` (paths relative to the folder) and ``mhh_image_id``; 8-bit
greyscale JPEGs (2000 x 2000) and uint8 lung masks of the same size (255 lung, 0 background,
127 "ignore" = a device lying over the lung).

Output (``out_dir``)::

    images/<id>.png                 uint8 greyscale, size x size (PIL Lanczos downsampling)
    masks/<id>_left_lung.png        uint8 {0, 255}, size x size, picture (rows, cols) order
    masks/<id>_right_lung.png
    priors/exemplar_<id>.npy        float16 (2, size, size): the exemplar's softened masks,
                                    channels (left_lung, right_lung), MONAI (x, y) order
    conversion.json                 the settings the files were made with (size, ignore rule, sigma)
    span_datalist.json              structures ["left_lung", "right_lung"]; training = all cases
                                    (each with the exemplar prior); validation = the other cases
                                    with labels [left_lung mask, right_lung mask]; an "exemplar"
                                    record whose paths are relative to the datalist folder
    seg_datalist.json               only with ``seg_train=N`` (``--seg-train N``): the cxr_seg
                                    datalist: training = N labeled cases, the exemplar + N - 1
                                    others drawn by ``seed``; test = all the other cases; NO
                                    validation section (see "Segmentation datalist" below)

Rules:

- Lung mask: pixels equal to 255 (and 127 when ``ignore_as_lung``) are lung. The mask is resized
  by exact area averaging (each output pixel's lung fraction, computed in integers) and an output
  pixel is lung when that fraction is >= 0.5 (ties count as lung). See :func:`resize_mask`.
- Left/right: the radiographs are frontal views shown in the usual orientation, so the patient's
  RIGHT lung lies on the image's LEFT half. ``right_lung`` = the lung on the image left,
  ``left_lung`` = the lung on the image right. The resized lung mask is split into 4-connected
  components and each goes to the side of its centroid column (< image centre column
  ``(size - 1) / 2``: image left, otherwise image right). When the lungs touch (after resizing
  they can merge into one component) no "big" component (>= 10% of the lung area) is left on
  one side; the largest component is then cut at the midline column between the two lungs: the
  column with the fewest lung pixels in the middle half of the component's column range (ties:
  the column nearest the middle of that range); its columns left of the cut are ``right_lung``,
  the others ``left_lung``. A component without such a waist (its narrowest middle column holds
  at least half of the smaller side's widest column) is taken as one lung and not cut.
  ``left_lung | right_lung`` is exactly the resized lung mask; the two never overlap.
- Segmentation datalist (``seg_train=N``): the label budget is N images, and the exemplar (whose
  masks already made the priors) is one of them; the other N - 1 are drawn by :func:`seg_split`
  with ``seed`` from the other patients. Entries: ``image``, ``label`` = [left_lung mask,
  right_lung mask] (``hparams::structures`` order), ``case_id``, ``patient_id`` (the manifest's
  ``mhh_patient_id``; the image id when that column is absent: the set has one radiograph per
  patient). Whole patients go to one side. There is no validation section: with 5 labels none is
  held out for model selection, so cxr_seg trains its whole budget and scores the final weights
  on the test section (the other 30 cases).
- Writes are atomic (temporary file + rename) and a re-run skips every file already there, so
  an interrupted conversion resumes. ``conversion.json`` records size and ignore rule: re-using
  an output folder with other values raises :class:`~medspan.errors.DataError`. A prior whose
  recorded ``mask_sigma`` differs is recomputed; the datalist is rewritten only if its content
  changes.

Example::

    from .mhh_covid_lungs import convert
    datalist = convert("../shared/data/real/mhh_covid_cxr_v7_lungs", "data/mhh_lungs", size=256)

    # command line, from the repository root:
    python -m data_prep.mhh_covid_lungs --out data/mhh_lungs --size 256 --exemplar 0
    python -m data_prep.mhh_covid_lungs --out data/mhh_lungs --size 256 --seg-train 5 --seed 0

Then pretrain (the command printed by the CLI)::

    python -m monai.bundle run --config_file bundles/span_cxr/train.json \\
        --datalist data/mhh_lungs/span_datalist.json --run_name span_cxr_mhh \\
        --hparams::structures "['left_lung','right_lung']" \\
        --hparams::head_structures "{'0':'left_lung','1':'right_lung'}"
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage, sparse

from medspan.atlas.statistics import save_prior, soften_masks
from medspan.data.datalist import format_datalist, write_datalist
from medspan.errors import DataError
from medspan.io import worker_pool, write_json_atomic, write_png_atomic
from medspan.recipes.cxr import exemplar_masks

from .common import converter_main

__all__ = [
    "STRUCTURES",
    "Case",
    "add_arguments",
    "bundle_command",
    "convert",
    "convert_case",
    "default_root",
    "load_lung_mask",
    "main",
    "read_manifest",
    "resize_mask",
    "run",
    "seg_split",
    "split_lungs",
]

#: structures in channel / label order (the synthetic default's first two, same names)
STRUCTURES: tuple[str, ...] = ("left_lung", "right_lung")
DATASET_DIR = "mhh_covid_cxr_v7_lungs"
DATALIST_NAME = "span_datalist.json"
SEG_DATALIST_NAME = "seg_datalist.json"
SETTINGS_NAME = "conversion.json"
MASK_LUNG, MASK_IGNORE = 255, 127
#: a component is "big" when it holds at least this fraction of the lung area
BIG_COMPONENT_FRACTION = 0.1


def default_root() -> Path:
    """``<repo>/../shared/data/real/mhh_covid_cxr_v7_lungs`` (where CI clones the shared data)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / DATASET_DIR


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One manifest row: ``case_id`` (MHH image id), absolute ``image`` and ``mask`` paths, ``row``
    (1-based data row number in manifest.csv, header not counted), ``patient_id`` (the
    ``mhh_patient_id`` column, else the case id)."""

    case_id: str
    image: Path
    mask: Path
    row: int
    patient_id: str = ""


def read_manifest(root: str | os.PathLike) -> list[Case]:
    """Read ``<root>/manifest.csv`` (csv module) and check that every listed file exists.

    The case id is the ``mhh_image_id`` column, or the image file's stem when that column is
    absent or empty; the patient id is the ``mhh_patient_id`` column, or the case id.

    Raises:
        DataError: no manifest, missing ``image``/``mask`` columns, an empty or unsafe id, a
            duplicated id, or a listed file that does not exist (the message names the file
            and the manifest row).

    Example::

        cases = read_manifest("../shared/data/real/mhh_covid_cxr_v7_lungs")
        cases[0].case_id, cases[0].image.name     # ('a8ac1969', 'a8ac1969.jpg')
    """
    root = Path(root)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise DataError(manifest, "manifest not found (is --root the mhh_covid_cxr_v7_lungs folder?)")
    try:
        with open(manifest, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(manifest, f"cannot read the manifest ({e})") from e
    missing_cols = [c for c in ("image", "mask") if c not in fields]
    if missing_cols:
        raise DataError(manifest, f"missing column(s) {missing_cols} (columns present: {fields})")
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for i, r in enumerate(rows, start=1):
        where = f"{manifest} row {i}"
        image_rel, mask_rel = (r.get("image") or "").strip(), (r.get("mask") or "").strip()
        if not image_rel or not mask_rel:
            raise DataError(where, "empty 'image' or 'mask' value")
        case_id = (r.get("mhh_image_id") or "").strip() or Path(image_rel).stem
        if not case_id or "/" in case_id or "\\" in case_id or case_id.startswith("."):
            raise DataError(where, f"unusable case id {case_id!r}")
        if case_id in seen:
            raise DataError(where, f"case id {case_id!r} repeats row {seen[case_id]}")
        seen[case_id] = i
        image, mask = root / image_rel, root / mask_rel
        for kind, p in (("image", image), ("mask", mask)):
            if not p.is_file():
                raise DataError(p, f"{kind} file listed in {manifest.name} row {i} (case {case_id}) does not exist")
        patient_id = (r.get("mhh_patient_id") or "").strip() or case_id
        cases.append(Case(case_id, image.resolve(), mask.resolve(), i, patient_id))
    if not cases:
        raise DataError(manifest, "the manifest lists no cases")
    return cases


# --------------------------------------------------------------------------------------------
# reading and resizing
# --------------------------------------------------------------------------------------------


def _load_gray(path: Path) -> Image.Image:
    """Decode an image as an 8-bit greyscale PIL image ("L"); any decode problem is a DataError."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                raise DataError(path, f"expected an 8-bit greyscale image, got PIL mode {im.mode}")
            return im.copy() if im.mode == "L" else im.convert("L")
    except DataError:
        raise
    except Exception as e:
        raise DataError(path, f"cannot read image ({type(e).__name__}: {e})") from e


def load_lung_mask(path: str | os.PathLike, ignore_as_lung: bool = True) -> np.ndarray:
    """Read a V7 lung mask as bool (H, W) in picture (rows, cols) order.

    255 is lung; 127 ("ignore") is lung when ``ignore_as_lung`` else background; 0 background.

    Raises:
        DataError: unreadable file, not a single-channel image, or values other than 0/127/255.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except Exception as e:
        raise DataError(path, f"cannot read mask ({type(e).__name__}: {e})") from e
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise DataError(path, f"expected a single-channel uint8 mask, got shape {arr.shape} dtype {arr.dtype}")
    counts = np.bincount(arr.ravel(), minlength=256)
    bad = [int(v) for v in np.flatnonzero(counts) if v not in (0, MASK_IGNORE, MASK_LUNG)]
    if bad:
        raise DataError(path, f"unexpected mask values {bad[:10]} (expected 0, 127, 255)")
    lung = arr == MASK_LUNG
    if ignore_as_lung:
        lung |= arr == MASK_IGNORE
    return lung


def _area_weights(n_in: int, n_out: int):
    """Sparse (n_out, n_in) int64 overlap lengths of source pixels with output pixels.

    In units of ``1 / n_out`` source pixels: source pixel j spans ``[j*n_out, (j+1)*n_out)``,
    output pixel i spans ``[i*n_in, (i+1)*n_in)``; every row sums to ``n_in``.
    """
    i = np.arange(n_out)[:, None]
    j = np.arange(n_in)[None, :]
    overlap = np.minimum((i + 1) * n_in, (j + 1) * n_out) - np.maximum(i * n_in, j * n_out)
    return sparse.csr_matrix(np.clip(overlap, 0, None).astype(np.int64))


def resize_mask(mask: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Resize a bool (H, W) mask by exact area averaging, then keep pixels with fraction >= 0.5.

    The lung fraction of each output pixel is computed in integer arithmetic (no rounding), so
    the result is exactly reproducible. Works for any H, W and output size (down or up).

    Args:
        mask: bool (H, W).
        size: output (rows, cols), or one int for a square output.

    Returns:
        bool (rows, cols).

    Example::

        m = np.zeros((4, 4), bool); m[0, 0] = m[0, 1] = True   # top-left 2x2 block is half lung
        resize_mask(m, 2)            # [[True, False], [False, False]]
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2D (H, W), got shape {m.shape}")
    rows, cols = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    h, w = m.shape
    wr, wc = _area_weights(h, rows), _area_weights(w, cols)
    tmp = wr @ m.astype(np.int64)  # (rows, W)
    counts = np.asarray((wc @ np.asarray(tmp).T).T)  # (rows, cols), in units of 1/(rows*cols) px
    return 2 * counts >= h * w


# --------------------------------------------------------------------------------------------
# left / right split
# --------------------------------------------------------------------------------------------


def _cut_column(component: np.ndarray) -> int | None:
    """The midline column of a component holding both lungs, or None when it has no waist."""
    profile = component.sum(axis=0)
    cols = np.flatnonzero(profile)
    c0, c1 = int(cols[0]), int(cols[-1])
    width = c1 - c0 + 1
    lo, hi = c0 + width // 4, c1 - width // 4
    if hi <= lo:
        return None
    window = np.arange(lo, hi + 1)
    middle = (c0 + c1) / 2.0
    least = profile[window].min()
    candidates = window[profile[window] == least]
    cut = int(candidates[np.argmin(np.abs(candidates - middle))])
    left_peak, right_peak = profile[c0:cut].max(initial=0), profile[cut + 1 : c1 + 1].max(initial=0)
    if 2 * least >= min(left_peak, right_peak):
        return None
    return cut


def split_lungs(lung: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a bool (H, W) lung mask (picture order) into ``(left_lung, right_lung)``.

    ``right_lung`` (the patient's right) is on the image LEFT; see the module docstring for the
    component and touching-lung rules. The two outputs are disjoint and their union is ``lung``.

    Example::

        lung = np.zeros((8, 8), bool); lung[2:6, 1:3] = True; lung[2:6, 5:7] = True
        left, right = split_lungs(lung)
        right[:, :4].sum(), left[:, 4:].sum()     # (8, 8)
    """
    lung = np.asarray(lung, dtype=bool)
    h, w = lung.shape
    image_left = np.zeros_like(lung)
    image_right = np.zeros_like(lung)
    labels, n = ndimage.label(lung)
    if n == 0:
        return image_right, image_left
    flat = labels.ravel()
    areas = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
    col_sum = np.bincount(flat, weights=np.tile(np.arange(w, dtype=np.float64), h), minlength=n + 1)[1:]
    on_left = col_sum / areas < (w - 1) / 2.0
    big = areas >= BIG_COMPONENT_FRACTION * areas.sum()

    merged = -1
    if not (np.any(big & on_left) and np.any(big & ~on_left)):
        largest = int(np.argmax(areas))
        cut = _cut_column(labels == largest + 1)
        if cut is not None:
            merged = largest
            component = labels == largest + 1
            column = np.arange(w)[None, :]
            image_left |= component & (column < cut)
            image_right |= component & (column >= cut)
    for k in range(n):
        if k == merged:
            continue
        target = image_left if on_left[k] else image_right
        target |= labels == k + 1
    # image right = patient's left lung; image left = patient's right lung
    return image_right, image_left


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _case_paths(out_dir: Path, case_id: str) -> dict[str, Path]:
    paths = {"image": out_dir / "images" / f"{case_id}.png"}
    for s in STRUCTURES:
        paths[s] = out_dir / "masks" / f"{case_id}_{s}.png"
    return paths


def convert_case(
    case: Case, out_dir: str | os.PathLike, size: int = 256, ignore_as_lung: bool = True
) -> dict[str, Path]:
    """Write one case's resized image and left/right lung masks (skipping files already there).

    Returns:
        ``{"image": png, "left_lung": png, "right_lung": png}`` (absolute paths).

    Raises:
        DataError: unreadable image or mask, or image and mask of different sizes.
    """
    out = _case_paths(Path(out_dir).resolve(), case.case_id)
    need_image = not out["image"].exists()
    need_masks = not all(out[s].exists() for s in STRUCTURES)
    if not (need_image or need_masks):
        return out
    if need_image:
        im = _load_gray(case.image)
        image_size = im.size
        write_png_atomic(im.resize((size, size), Image.Resampling.LANCZOS), out["image"])
    else:
        try:
            with Image.open(case.image) as header:
                image_size = header.size
        except Exception as e:
            raise DataError(case.image, f"cannot read image ({type(e).__name__}: {e})") from e
    if need_masks:
        lung = load_lung_mask(case.mask, ignore_as_lung)
        if (lung.shape[1], lung.shape[0]) != tuple(image_size):
            raise DataError(
                case.mask, f"mask is {lung.shape[1]}x{lung.shape[0]} but its image {case.image} is "
                f"{image_size[0]}x{image_size[1]} (width x height)"
            )
        left, right = split_lungs(resize_mask(lung, size))
        for name, m in (("left_lung", left), ("right_lung", right)):
            write_png_atomic(m.astype(np.uint8) * 255, out[name])
    return out


def _convert_case_safe(case: Case, out_dir: str, size: int, ignore_as_lung: bool) -> tuple[str, Any]:
    """Worker wrapper: DataError does not pickle with its two arguments, so send it as a tuple."""
    try:
        return "ok", convert_case(case, out_dir, size, ignore_as_lung)
    except DataError as e:
        return "error", (e.where, e.problem)


def _resolve_exemplar(cases: Sequence[Case], exemplar: str | int, manifest: Path) -> Case:
    ids = [c.case_id for c in cases]
    if isinstance(exemplar, str):
        if exemplar in ids:
            return cases[ids.index(exemplar)]
        if not exemplar.strip().lstrip("-").isdigit():
            raise DataError(manifest, f"exemplar {exemplar!r} is not a case id of the manifest (e.g. {ids[0]!r})")
        exemplar = int(exemplar)
    if isinstance(exemplar, bool) or not isinstance(exemplar, (int, np.integer)):
        raise DataError(manifest, f"exemplar must be a case id or an index, got {exemplar!r}")
    if not 0 <= int(exemplar) < len(cases):
        raise DataError(manifest, f"exemplar index {exemplar} out of range (0..{len(cases) - 1})")
    return cases[int(exemplar)]


def seg_split(cases: Sequence[Case], exemplar_id: str, n_train: int, seed: int = 0) -> tuple[list[Case], list[Case]]:
    """``(training, test)`` cases of the cxr_seg datalist: exactly ``n_train`` labeled images, patient-wise.

    Training holds every case of the exemplar's patient, then the other patients in the order
    ``random.Random(seed).shuffle`` gives their ids (first seen in manifest order), each patient
    taken whole while it fits (one with more images than the room left is passed over); test
    holds the rest. Both lists keep the manifest order.

    Raises:
        ValueError: ``n_train`` < 1 or not below the number of cases (nothing left to test on),
            an unknown exemplar, or no way to reach exactly ``n_train`` with whole patients.

    Example::

        train, test = seg_split(cases, "a8ac1969", 5, seed=0)
        len(train), len(test)      # (5, 30) on the 35 MHH cases
    """
    ids = [c.case_id for c in cases]
    if exemplar_id not in ids:
        raise ValueError(f"exemplar {exemplar_id!r} is not one of the cases")
    if not 1 <= int(n_train) < len(cases):
        raise ValueError(f"seg_train must be in 1..{len(cases) - 1} (the others are the test set), got {n_train}")
    by_patient: dict[str, list[str]] = {}
    for c in cases:
        by_patient.setdefault(c.patient_id or c.case_id, []).append(c.case_id)
    ex_patient = next(p for p, members in by_patient.items() if exemplar_id in members)
    chosen = set(by_patient[ex_patient])
    others = [p for p in by_patient if p != ex_patient]
    random.Random(int(seed)).shuffle(others)
    for p in others:
        if len(chosen) + len(by_patient[p]) <= n_train:
            chosen.update(by_patient[p])
    if len(chosen) != n_train:
        raise ValueError(f"cannot pick exactly {n_train} training images from whole patients (got {len(chosen)}; "
                         f"the exemplar's patient {ex_patient} has {len(by_patient[ex_patient])})")
    return [c for c in cases if c.case_id in chosen], [c for c in cases if c.case_id not in chosen]


def _write_if_changed(path: Path, sections: dict[str, list[dict]], meta: dict[str, Any]) -> Path:
    """Write a datalist unless the file already holds exactly this text (a re-run leaves it untouched)."""
    text = format_datalist(path, sections, **meta)
    try:
        same = path.read_text(encoding="utf-8") == text
    except OSError:
        same = False
    return path if same else write_datalist(path, sections, **meta)


def _check_settings(out_dir: Path, size: int, ignore_as_lung: bool) -> dict[str, Any]:
    """Read or create ``conversion.json``; other size / ignore rule than recorded is a DataError."""
    path = out_dir / SETTINGS_NAME
    wanted = {"dataset": DATASET_DIR, "size": int(size), "ignore_as_lung": bool(ignore_as_lung)}
    if path.exists():
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(path, f"cannot read the conversion settings ({e}); delete the folder to start over") from e
        recorded = {k: settings.get(k) for k in wanted}
        if recorded != wanted:
            raise DataError(
                path, f"this folder was converted with {recorded}, not {wanted}; use another --out or delete it"
            )
        return settings
    settings = dict(wanted, priors={})
    write_json_atomic(settings, path)
    return settings


def _expected_doc(out_dir: Path, training: list[dict], validation: list[dict], meta: dict) -> dict:
    """The JSON :func:`write_datalist` writes for these entries (paths relative to out_dir)."""

    def rel(p: str) -> str:
        return Path(os.path.relpath(p, out_dir)).as_posix()

    def relentry(e: dict) -> dict:
        return {k: ([rel(x) for x in v] if isinstance(v, list) else rel(v)) if k in ("image", "label", "prior") else v
                for k, v in e.items()}

    return dict(meta, training=[relentry(e) for e in training], validation=[relentry(e) for e in validation])


def convert(
    root: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    size: int = 256,
    exemplar: str | int = 0,
    mask_sigma: float = 4.0,
    ignore_as_lung: bool = True,
    workers: int = 1,
    seg_train: int | None = None,
    seed: int = 0,
) -> Path:
    """Convert the MHH COVID CXR lung set into a ``span_cxr`` datalist; return its path.

    Args:
        root: the ``mhh_covid_cxr_v7_lungs`` folder (None: :func:`default_root`).
        out_dir: output folder (created; re-runs resume and skip finished files).
        size: output image and mask size (square; the 2000 x 2000 originals are square).
        exemplar: the expert-labeled case whose softened masks become every image's prior: a
            case id (``mhh_image_id``), or an index in manifest order (a digit string that is not
            a case id is read as an index).
        mask_sigma: Gaussian softening of the exemplar masks, in output pixels.
        ignore_as_lung: count the 127 ("ignore", devices over the lung) pixels as lung.
        workers: processes converting cases in parallel.
        seg_train: also write ``<out_dir>/seg_datalist.json`` for cxr_seg with this many labeled
            training images (the exemplar + ``seg_train - 1`` drawn by ``seed``), the other cases
            as test and no validation section (None: not written). See :func:`seg_split`.
        seed: the draw of the segmentation training cases.

    Returns:
        absolute path of ``<out_dir>/span_datalist.json``.

    Raises:
        DataError: a missing or corrupt manifest, image or mask (the message names the file),
            a bad exemplar, or an output folder made with another size / ignore rule.
        ValueError: a size below 2, or a ``seg_train`` that :func:`seg_split` cannot honour.

    Example::

        path = convert(None, "data/mhh_lungs", size=256, exemplar="a8ac1969", seg_train=5)
        path.parent / "seg_datalist.json"       # the cxr_seg datalist (5 training, 30 test)
    """
    root = Path(root) if root is not None else default_root()
    if int(size) < 2:
        raise ValueError(f"size must be >= 2, got {size}")
    size = int(size)
    cases = read_manifest(root)
    ex = _resolve_exemplar(cases, exemplar, root / "manifest.csv")
    split = seg_split(cases, ex.case_id, int(seg_train), seed) if seg_train is not None else None
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = _check_settings(out_dir, size, ignore_as_lung)

    if workers > 1 and len(cases) > 1:
        with worker_pool(int(workers)) as pool:  # workers die with this process
            results = list(pool.map(_convert_case_safe, cases, [str(out_dir)] * len(cases),
                                    [size] * len(cases), [ignore_as_lung] * len(cases)))
        for status, value in results:
            if status == "error":
                raise DataError(*value)
        outputs = [value for _, value in results]
    else:
        outputs = [convert_case(c, out_dir, size, ignore_as_lung) for c in cases]
    by_id = {c.case_id: o for c, o in zip(cases, outputs)}

    ex_out = by_id[ex.case_id]
    prior_path = out_dir / "priors" / f"exemplar_{ex.case_id}.npy"
    recorded = settings.get("priors", {}).get(prior_path.name)
    if not prior_path.exists() or recorded != {"mask_sigma": float(mask_sigma)}:
        masks = exemplar_masks([ex_out[s] for s in STRUCTURES])  # (2, x, y) bool
        save_prior(soften_masks(masks, sigma=mask_sigma), prior_path)
        settings.setdefault("priors", {})[prior_path.name] = {"mask_sigma": float(mask_sigma)}
        write_json_atomic(settings, out_dir / SETTINGS_NAME)

    training = [
        {"image": str(by_id[c.case_id]["image"]), "prior": str(prior_path), "case_id": c.case_id} for c in cases
    ]
    validation = [
        {"image": str(by_id[c.case_id]["image"]), "label": [str(by_id[c.case_id][s]) for s in STRUCTURES],
         "case_id": c.case_id}
        for c in cases
        if c.case_id != ex.case_id
    ]
    exemplar_record = {
        "case_id": ex.case_id,
        "image": f"images/{ex.case_id}.png",
        "label": [f"masks/{ex.case_id}_{s}.png" for s in STRUCTURES],
        "prior": f"priors/{prior_path.name}",
        "mask_sigma": float(mask_sigma),
    }
    meta = {
        "name": f"MHH COVID-19 CXR with V7 lung masks, {size}x{size}, exemplar {ex.case_id}",
        "description": (
            f"Converted by data_prep.mhh_covid_lungs from {DATASET_DIR} (CC BY 3.0 MHH images, CC BY 4.0 V7 "
            f"masks): resized to {size}x{size}; lung = 255{' and 127' if ignore_as_lung else ''}; "
            "right_lung = image left, left_lung = image right; training = all cases with the exemplar prior, "
            "validation = the other cases with labels. Exemplar paths are relative to this file."
        ),
        "structures": list(STRUCTURES),
        "exemplar": exemplar_record,
    }
    datalist = out_dir / DATALIST_NAME
    expected = _expected_doc(out_dir, training, validation, meta)
    try:
        current = json.loads(datalist.read_text(encoding="utf-8")) if datalist.exists() else None
    except (OSError, json.JSONDecodeError):
        current = None
    if current != expected:
        write_datalist(datalist, {"training": training, "validation": validation}, **meta)
    if split is not None:
        def seg_entry(c: Case) -> dict[str, Any]:
            return {"image": str(by_id[c.case_id]["image"]),
                    "label": [str(by_id[c.case_id][s]) for s in STRUCTURES],
                    "case_id": c.case_id, "patient_id": c.patient_id or c.case_id}

        seg_meta = dict(
            meta,
            name=f"MHH COVID-19 CXR lungs, {size}x{size}: {len(split[0])} labeled training images, {len(split[1])} test",
            description=(
                f"Converted by data_prep.mhh_covid_lungs (cxr_seg): training = the exemplar {ex.case_id} + "
                f"{len(split[0]) - 1} cases drawn with seed {seed} (whole patients); test = the other cases; no "
                "validation section (no labels left for model selection: the final weights are scored). "
                "label = [left_lung, right_lung] masks; right_lung = image left."
            ),
            seg_train=len(split[0]),
            seed=int(seed),
        )
        _write_if_changed(out_dir / SEG_DATALIST_NAME,
                          {"training": [seg_entry(c) for c in split[0]], "test": [seg_entry(c) for c in split[1]]},
                          seg_meta)
    return datalist


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def bundle_command(datalist: str | os.PathLike, run_name: str = "span_cxr_mhh") -> str:
    """The ``monai.bundle`` command that pretrains ``span_cxr`` on ``datalist`` (two lung heads)."""
    return (
        "python -m monai.bundle run --config_file bundles/span_cxr/train.json "
        f"--datalist {datalist} --run_name {run_name} "
        "--hparams::structures \"['left_lung','right_lung']\" "
        "--hparams::head_structures \"{'0':'left_lung','1':'right_lung'}\""
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the converter's command line."""
    parser.add_argument(
        "--root", default=None, help=f"the {DATASET_DIR} folder (default: <repo>/../shared/data/real/{DATASET_DIR})"
    )
    parser.add_argument("--out", required=True, help="output folder (re-runs skip finished files)")
    parser.add_argument("--size", type=int, default=256, help="output size in pixels (default 256)")
    parser.add_argument("--exemplar", default="0", help="exemplar case id or index in manifest order (default 0)")
    parser.add_argument("--sigma", type=float, default=4.0, help="Gaussian softening of the exemplar masks (default 4)")
    parser.add_argument(
        "--ignore-as-background", action="store_true", help="treat 127 (ignore) mask pixels as background, not lung"
    )
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument(
        "--seg-train", type=int, default=None, metavar="N",
        help="also write seg_datalist.json for cxr_seg: N labeled training images (the exemplar + N-1 drawn by "
             "--seed), the other cases as test, no validation section (default: not written)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --seg-train draw (default 0)")


def run(args: argparse.Namespace) -> int:
    """Convert; print the datalist path and the bundle command. Returns the exit code."""
    try:
        path = convert(args.root, args.out, size=args.size, exemplar=args.exemplar, mask_sigma=args.sigma,
                       ignore_as_lung=not args.ignore_as_background, workers=args.workers,
                       seg_train=args.seg_train, seed=args.seed)
    except (DataError, ValueError) as exc:
        print(f"mhh_covid_lungs: error: {exc}", file=sys.stderr)
        return 2
    print(f"datalist: {path}")
    print("pretrain with:")
    print(f"  {bundle_command(path)}")
    if args.seg_train is not None:
        print(f"segmentation datalist (cxr_seg): {path.parent / SEG_DATALIST_NAME}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data_prep.mhh_covid_lungs --out DIR [--root R] [--size 256] [--exemplar 0] [--sigma 4] [--seg-train N]``."""
    return converter_main("data_prep.mhh_covid_lungs", __doc__, add_arguments, run, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
