"""MONAI datalist JSON: load with validation, check, write atomically, split.

A datalist is the MONAI/Decathlon JSON layout with a few optional medspan keys::

    {
      "name": "synth_cxr",
      "structures": ["left_lung", "right_lung", "heart"],     # optional
      "classes": ["nodule", "effusion"],                       # optional (multi-label)
      "training": [
        {"case_id": "cxr_0000", "image": "images/cxr_0000.png",
         "label": ["masks/cxr_0000_left_lung.png", "masks/cxr_0000_right_lung.png",
                   "masks/cxr_0000_heart.png"],
         "prior": "priors/cxr_0000.nii.gz",
         "labels": [0, 1]},
        ...
      ],
      "validation": [...],
      "test": [...]
    }

Entry keys:

- ``image``: a path, or a list of paths (loaded as channels by ``LoadImaged``). May be a folder
  (a DICOM series).
- ``label`` (optional): a path, a list of per-structure paths (its length must equal
  ``len(structures)`` when ``structures`` is given), a dict ``{structure: path}`` (its keys must
  be exactly ``structures`` when given), or a class index / list of numbers (classification).
- ``prior`` (optional): a path, or a list of per-structure paths (length ``len(structures)``).
- ``labels`` (optional): a multi-hot list of numbers aligned with ``classes``; class labels may
  also be given as one key per class name (``{"nodule": 1, "effusion": 0}``), which must be numbers.
- ``case_id`` (optional): a string (or int), unique over the whole datalist.

Relative paths are relative to the datalist file's folder (or ``base_dir``); absolute paths are
kept. A section given as a list of strings (the Decathlon ``test`` layout) reads as
``[{"image": s}, ...]``.

Error policy: :func:`validate_datalist` collects every problem of every section and returns
them as strings (``"<file>: training[3] (case cxr_0003): <problem>"``); :func:`load_datalist`
collects the problems of the section it loads and raises ONE :class:`~medspan.errors.DataError`
carrying all of them (a single problem is raised as is, several are listed one per line).

Example::

    from medspan.data.datalist import load_datalist
    train = load_datalist("data/synth_cxr/dataset.json", "training", require=("image", "label"))
    train[0]["image"]          # '/abs/path/data/synth_cxr/images/cxr_0000.png'
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image

from medspan.errors import DataError
from medspan.io import write_text_atomic

#: entry keys whose values are file paths (resolved against the datalist folder)
PATH_KEYS: tuple[str, ...] = ("image", "label", "prior")
#: the sections medspan knows; any other top-level list also counts as a section
KNOWN_SECTIONS: tuple[str, ...] = ("training", "validation", "test")
#: top-level keys that hold lists but are metadata, not sections
META_LIST_KEYS: tuple[str, ...] = ("structures", "classes")
#: image suffixes read by PIL for the cheap shape check
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_NIFTI_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr")
_ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
_MAX_LISTED = 50
#: section names users write for a known section; reported as "rename it ..."
MISNAMED_SECTIONS: dict[str, str] = {
    "train": "training", "training_set": "training", "trainset": "training",
    "val": "validation", "valid": "validation", "validate": "validation", "validation_set": "validation",
    "testing": "test", "tests": "test", "test_set": "test",
}
#: entry keys users write for a key medspan reads; reported as "rename it ..." (when the right key is absent)
MISNAMED_KEYS: dict[str, str] = {
    "priors": "prior", "prior_path": "prior", "images": "image", "image_path": "image", "img": "image",
    "mask": "label", "masks": "label", "label_path": "label", "seg": "label", "segmentation": "label",
}


# --------------------------------------------------------------------------------------------
# reading the JSON
# --------------------------------------------------------------------------------------------


def read_datalist_json(path: str | os.PathLike) -> dict[str, Any]:
    """The datalist JSON as it is (paths not resolved); a missing file, bad JSON or a non-object raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "datalist file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read the datalist ({e})") from None
    if not isinstance(data, dict):
        raise DataError(path, f"a datalist must be a JSON object, got {type(data).__name__}")
    return data


def datalist_sections(data: Mapping[str, Any]) -> list[str]:
    """Names of the sections of a parsed datalist: the known sections, and other top-level lists of
    entries (objects or paths); metadata lists (``structures``, ``classes``, numbers such as ``spacing``)
    are not sections.

    Example::

        datalist_sections({"name": "x", "structures": ["a"], "training": [], "test": []})
        # ['training', 'test']
    """
    return [
        k
        for k, v in data.items()
        if isinstance(v, list)
        and k not in META_LIST_KEYS
        and (k in KNOWN_SECTIONS or all(isinstance(e, (Mapping, str)) for e in v))
    ]


def misnamed_section(name: str) -> str | None:
    """The known section a section name most likely means (``"train"`` -> ``"training"``), or None.

    Known names themselves give None; so do names not close to any known one (a custom section).
    """
    if name in KNOWN_SECTIONS:
        return None
    if name.lower() in MISNAMED_SECTIONS:
        return MISNAMED_SECTIONS[name.lower()]
    close = difflib.get_close_matches(name.lower(), KNOWN_SECTIONS, n=1, cutoff=0.8)
    return close[0] if close else None


def misnamed_section_problem(name: str, known: str) -> str:
    """The one message for a misnamed section (the CLI and the bundles both print it)."""
    return f"section '{name}' is not a section medspan reads: rename it '{known}'"


def _entry_where(file: Path, section: str, index: int, entry: Any) -> str:
    where = f"{file}: {section}[{index}]"
    if isinstance(entry, Mapping) and isinstance(entry.get("case_id"), (str, int)):
        where += f" (case {entry['case_id']})"
    return where


def _is_path(v: Any) -> bool:
    return isinstance(v, (str, os.PathLike)) and str(v) != ""


def _looks_like_paths(v: Any) -> bool:
    return _is_path(v) or (isinstance(v, list) and len(v) > 0 and all(_is_path(e) for e in v)) or (
        isinstance(v, Mapping) and len(v) > 0 and all(_is_path(e) for e in v.values())
    )


def misnamed_key_problem(key: str, right: str) -> str:
    """The one message for a misnamed entry key (``priors`` for ``prior``); the CLI and the bundles print it."""
    return f"key '{key}' is not a key medspan reads: rename it '{right}'"


def _is_number(v: Any) -> bool:
    return isinstance(v, (bool, int, float)) and (not isinstance(v, float) or math.isfinite(v))


def _resolve(base: Path, p: str | os.PathLike) -> str:
    q = Path(os.path.expanduser(str(p)))
    return os.path.normpath(q if q.is_absolute() else base / q)


def _iter_paths(key: str, value: Any) -> Iterable[tuple[str, str]]:
    """(label for messages, path) for every path in an entry value of a path key."""
    if _is_path(value):
        yield f"'{key}'", str(value)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if _is_path(v):
                yield f"'{key}'[{i}]", str(v)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            if _is_path(v):
                yield f"'{key}'['{k}']", str(v)


# --------------------------------------------------------------------------------------------
# cheap spatial shapes
# --------------------------------------------------------------------------------------------


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _dicom_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    dcm = [p for p in files if p.suffix.lower() == ".dcm"]
    return dcm or [p for p in files if p.suffix.lower() not in (".xml", ".json", ".txt", ".csv", ".md")]


def _dicom_shape(path: Path) -> tuple[int, ...]:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns", "NumberOfFrames"])
    if "Rows" not in ds or "Columns" not in ds:
        raise ValueError("no Rows/Columns in the DICOM header")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    shape = (int(ds.Columns), int(ds.Rows))  # MONAI order (x, y) = (columns, rows)
    return shape + (frames,) if frames > 1 else shape


def spatial_shape(path: str | os.PathLike) -> tuple[int, ...] | None:
    """Spatial shape of an image file from its header only, in MONAI axis order.

    PNG/JPEG/TIFF: ``(width, height)`` = (x, y) via PIL (no pixel decoding); NIfTI: the header's
    data shape via nibabel (trailing dims are channels/time); MHA/NRRD: SimpleITK's size; DICOM:
    ``(Columns, Rows[, NumberOfFrames])`` via pydicom with ``stop_before_pixels``; a folder
    (DICOM series): ``(Columns, Rows, number of slice files)``. Unknown formats give ``None``.

    Raises:
        ValueError / OSError: the header cannot be read.

    Example::

        spatial_shape("images/cxr_0000.png")   # (256, 256)
    """
    p = Path(path)
    if p.is_dir():
        files = _dicom_files(p)
        if not files:
            raise ValueError("the folder holds no image files")
        return _dicom_shape(files[0])[:2] + (len(files),)
    suf = _suffix(p)
    if suf in _PIL_SUFFIXES:
        with Image.open(p) as im:
            return tuple(int(s) for s in im.size)
    if suf in _NIFTI_SUFFIXES:
        return tuple(int(s) for s in nib.load(str(p)).header.get_data_shape())
    if suf in _ITK_SUFFIXES:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        reader.ReadImageInformation()
        return tuple(int(s) for s in reader.GetSize())
    if suf in (".dcm", ".dicom", ""):
        return _dicom_shape(p)
    return None


def npy_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The array shape stored in a ``.npy`` file, from its header only (no data read).

    A prior file is ``(n_structures, *spatial)`` channel first (see :mod:`medspan.atlas.statistics`).

    Raises:
        ValueError / OSError: not a readable ``.npy`` file.
    """
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, _ = np.lib.format.read_array_header_2_0(f)
    return tuple(int(s) for s in shape)


def prior_shape_problem(
    image_shape: Sequence[int],
    prior_shape: Sequence[int],
    n_structures: int | None = None,
    aspect_tol: float = 0.02,
) -> str | None:
    """What is wrong with a channel-first prior of ``prior_shape`` for an image of ``image_shape``, or None.

    The one rule, used by ``medspan check-datalist --shapes`` (from file headers) and by
    :class:`medspan.data.prior_transforms.PriorToImaged` (on the loaded arrays) in the bundles, so both
    print the same message. A prior ``(S, *spatial')`` fits an image of spatial shape ``spatial`` when
    it has as many spatial dims, ``S == n_structures`` (when given), and ``spatial'`` is ``spatial``
    or a grid with the same aspect ratio (within ``aspect_tol``, relative): it covers the same field
    of view and is resampled onto the image.

    Args:
        image_shape: the image's SPATIAL shape, e.g. ``(256, 256)`` or ``(96, 96, 64)``.
        prior_shape: the prior's full shape ``(S, *spatial')``.
        n_structures: expected number of prior channels (None: any).
        aspect_tol: relative tolerance on each aspect ratio.

    Example::

        prior_shape_problem((64, 64, 48), (3, 64, 64))
        # 'prior must be channel-first (structures, *spatial) with 3 spatial dims like its image (64, 64, 48), got shape (3, 64, 64)'
    """
    ishape, full = tuple(int(v) for v in image_shape), tuple(int(v) for v in prior_shape)
    if len(full) != len(ishape) + 1:
        return (
            f"prior must be channel-first (structures, *spatial) with {len(ishape)} spatial dims like its image "
            f"{ishape}, got shape {full}"
        )
    if n_structures is not None and full[0] != n_structures:
        return f"prior has {full[0]} channels, expected {n_structures} structures"
    pshape = full[1:]
    if pshape != ishape:
        ri = [v / ishape[0] for v in ishape[1:]]
        rp = [v / pshape[0] for v in pshape[1:]]
        if any(abs(a - b) > aspect_tol * a for a, b in zip(ri, rp)):
            return (
                f"prior spatial shape {pshape} does not cover the image's field of view {ishape} "
                "(different aspect ratio)"
            )
    return None


def _squeeze_trailing(shape: tuple[int, ...]) -> tuple[int, ...]:
    s = list(shape)
    while len(s) > 2 and s[-1] == 1:
        s.pop()
    return tuple(s)


def _shape_problems(
    entry: Mapping[str, Any], path_keys: Sequence[str], n_structures: int | None = None
) -> list[str]:
    """Compare the header shapes of every path of ``entry`` with the (first) image's.

    The reference is the first image path, trailing singleton dims dropped (a 2D NIfTI saved as
    ``(x, y, 1)`` is 2D). Another file matches when its shape starts with the reference shape
    (extra trailing dims are channels, e.g. a prior ``(x, y, n_structures)``). A ``.npy`` prior
    (channel first, what ``build-priors`` writes and the bundles load) is checked by
    :func:`prior_shape_problem`, the rule the bundles apply when they load it.
    """
    problems: list[str] = []
    shapes: list[tuple[str, str, tuple[int, ...]]] = []
    npy_priors: list[tuple[str, str, tuple[int, ...]]] = []
    for key in path_keys:
        if key not in entry:
            continue
        for label, p in _iter_paths(key, entry[key]):
            if not os.path.exists(p):
                continue  # reported as a missing file
            try:
                if key == "prior" and _suffix(Path(p)) == ".npy":
                    npy_priors.append((label, p, npy_shape(p)))
                    continue
                shape = spatial_shape(p)
            except Exception as e:  # noqa: BLE001 - any reader failure is a data problem
                problems.append(f"cannot read the header of {label} {p} ({type(e).__name__}: {e})")
                continue
            if shape is not None:
                shapes.append((label, p, shape))
    if not shapes:
        return problems
    ref_label, ref_path, ref_shape = shapes[0]
    ref = _squeeze_trailing(ref_shape)
    if ref_label.startswith("'image'"):
        for label, p, shape in npy_priors:
            problem = prior_shape_problem(ref, shape, n_structures)
            if problem is not None:
                problems.append(f"{label} {p}: {problem}")
    for label, p, shape in shapes[1:]:
        if tuple(shape[: len(ref)]) != ref:
            problems.append(
                f"spatial shape mismatch: {label} {p} has shape {tuple(shape)}, "
                f"{ref_label} {ref_path} has {tuple(ref_shape)}"
            )
    return problems


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _entry_problems(
    entry: Any,
    meta: Mapping[str, Any],
    base: Path,
    require: Sequence[str],
    path_keys: Sequence[str],
    check_files: bool,
    check_shapes: bool,
) -> list[str]:
    """Problems of one (raw, unresolved) entry, each a sentence without the 'where' prefix."""
    if not isinstance(entry, Mapping):
        return [f"an entry must be an object (dict), got {type(entry).__name__}: {entry!r:.80}"]
    problems: list[str] = []
    structures = meta.get("structures")
    classes = meta.get("classes")
    n_struct = len(structures) if isinstance(structures, list) else None

    for key in require:
        if key not in entry:
            problems.append(f"missing required key '{key}' (keys present: {', '.join(map(str, entry)) or 'none'})")
    for key, right in MISNAMED_KEYS.items():
        if key in entry and right not in entry and right in path_keys and _looks_like_paths(entry[key]):
            problems.append(misnamed_key_problem(key, right))

    # types of the path keys
    type_ok: dict[str, bool] = {}
    for key in path_keys:
        if key not in entry:
            continue
        v = entry[key]
        ok = True
        if key == "image":
            ok = _is_path(v) or (isinstance(v, list) and len(v) > 0 and all(_is_path(e) for e in v))
            expect = "a path or a non-empty list of paths"
        elif key == "label":
            is_class = _is_number(v) or (isinstance(v, list) and len(v) > 0 and all(_is_number(e) for e in v))
            ok = (
                _is_path(v)
                or is_class
                or (isinstance(v, list) and len(v) > 0 and all(_is_path(e) for e in v))
                or (isinstance(v, Mapping) and len(v) > 0 and all(_is_path(e) for e in v.values()))
            )
            expect = "a path, a list of paths, a dict {structure: path} or class number(s)"
        else:
            ok = _is_path(v) or (isinstance(v, list) and len(v) > 0 and all(_is_path(e) for e in v))
            expect = "a path or a non-empty list of paths"
        type_ok[key] = ok
        if not ok:
            problems.append(f"wrong type for '{key}': expected {expect}, got {type(v).__name__} {v!r:.80}")

    # per-structure lists / dicts
    for key in ("label", "prior"):
        if not type_ok.get(key):
            continue
        v = entry[key]
        if n_struct is not None and isinstance(v, list) and all(_is_path(e) for e in v) and len(v) != n_struct:
            problems.append(
                f"'{key}' lists {len(v)} paths but the datalist has {n_struct} structures "
                f"({', '.join(map(str, structures))})"
            )
        if n_struct is not None and isinstance(v, Mapping):
            missing = [s for s in structures if s not in v]
            extra = [s for s in v if s not in structures]
            if missing or extra:
                parts = ([f"missing {missing}"] if missing else []) + ([f"unknown {extra}"] if extra else [])
                problems.append(f"'{key}' dict keys do not match structures {structures}: {'; '.join(parts)}")

    # class labels
    if "labels" in entry:
        v = entry["labels"]
        if not (isinstance(v, list) and all(_is_number(e) for e in v)):
            problems.append(f"wrong type for 'labels': expected a list of numbers, got {type(v).__name__} {v!r:.80}")
        elif isinstance(classes, list) and len(v) != len(classes):
            problems.append(
                f"'labels' has {len(v)} values but the datalist has {len(classes)} classes "
                f"({', '.join(map(str, classes))})"
            )
    if isinstance(classes, list):
        for c in classes:
            if isinstance(c, str) and c in entry and c not in PATH_KEYS and not _is_number(entry[c]):
                got = f"{type(entry[c]).__name__} {entry[c]!r:.40}"
                problems.append(f"wrong type for class '{c}': expected a number, got {got}")
    if "case_id" in entry and (not isinstance(entry["case_id"], (str, int)) or entry["case_id"] == ""):
        problems.append(f"wrong type for 'case_id': expected a non-empty string, got {entry['case_id']!r:.40}")

    resolved = {k: _resolve_value(base, entry[k]) for k in path_keys if k in entry and type_ok.get(k)}
    if check_files:
        for key, value in resolved.items():
            for label, p in _iter_paths(key, value):
                if not os.path.exists(p):
                    problems.append(f"missing file for {label}: {p}")
    if check_shapes:
        problems.extend(_shape_problems(resolved, list(resolved), n_struct))
    return problems


def _resolve_value(base: Path, value: Any) -> Any:
    if _is_path(value):
        return _resolve(base, value)
    if isinstance(value, list):
        return [_resolve(base, v) if _is_path(v) else v for v in value]
    if isinstance(value, Mapping):
        return {k: _resolve(base, v) if _is_path(v) else v for k, v in value.items()}
    return value


def resolve_paths(
    entry: Mapping[str, Any], base: str | os.PathLike, path_keys: Sequence[str] = PATH_KEYS
) -> dict[str, Any]:
    """A deep copy of ``entry`` whose relative paths under ``path_keys`` are resolved against ``base``
    (as :func:`load_datalist` resolves them: ``~`` expanded, absolute paths kept, normalised).

    Example::

        resolve_paths({"image": "images/a.png", "case_id": "a"}, "/data/cxr")   # image: /data/cxr/images/a.png
    """
    item = copy.deepcopy(dict(entry))
    for key in path_keys:
        if key in item:
            item[key] = _resolve_value(Path(base), item[key])
    return item


def _meta_problems(file: Path, data: Mapping[str, Any]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for key in META_LIST_KEYS:
        if key in data:
            v = data[key]
            if not (isinstance(v, list) and all(isinstance(s, str) and s for s in v)):
                problems.append((str(file), f"'{key}' must be a list of names, got {v!r:.80}"))
            elif len(set(v)) != len(v):
                dup = sorted({s for s in v if v.count(s) > 1})
                problems.append((str(file), f"'{key}' has duplicate names {dup}"))
    return problems


def _section_entries(data: Mapping[str, Any], section: str) -> list[Any]:
    entries = data[section]
    return [{"image": e} if isinstance(e, str) else e for e in entries]


def _section_problems(
    file: Path,
    data: Mapping[str, Any],
    section: str,
    base: Path,
    require: Sequence[str],
    path_keys: Sequence[str],
    check_files: bool,
    check_shapes: bool,
) -> list[tuple[str, str]]:
    """(where, problem) pairs of one section."""
    entries = _section_entries(data, section)
    if not entries:
        return [(str(file), f"section '{section}' is empty")]
    problems: list[tuple[str, str]] = []
    first_seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = _entry_where(file, section, i, entry)
        for p in _entry_problems(entry, data, base, require, path_keys, check_files, check_shapes):
            problems.append((where, p))
        if isinstance(entry, Mapping) and isinstance(entry.get("case_id"), (str, int)):
            cid = str(entry["case_id"])
            if cid in first_seen:
                problems.append((where, f"duplicate case_id '{cid}' (first at {section}[{first_seen[cid]}])"))
            else:
                first_seen[cid] = i
    return problems


def validate_datalist(
    path: str | os.PathLike,
    *,
    sections: Sequence[str] | None = None,
    require: Sequence[str] = ("image",),
    check_files: bool = True,
    check_shapes: bool = False,
    base_dir: str | os.PathLike | None = None,
    path_keys: Sequence[str] = PATH_KEYS,
) -> list[str]:
    """Every problem of a datalist, one string each (empty list: the datalist is fine).

    Checks the metadata (``structures`` / ``classes`` are lists of unique names), every entry of
    every section (or of ``sections``): required keys, key types, missing files, label/prior
    length vs ``structures``, ``labels`` length vs ``classes``, duplicate ``case_id`` within a
    section and across sections (a case in two sections leaks), an empty ``training`` section (other
    empty sections only when asked for), a misnamed section (``train`` for ``training``) or key
    (``priors`` for ``prior``), and with ``check_shapes`` the header shapes of image/label/prior (a
    ``.npy`` prior by :func:`prior_shape_problem`, the rule the bundles apply when they load it).
    :func:`load_datalist` (what the bundles call) reports the same problems with the same words.

    Example::

        for problem in validate_datalist("dataset.json", check_shapes=True):
            print(problem)   # 'dataset.json: training[3] (case cxr_0003): missing file for 'label': /d/m.png'
    """
    file = Path(path)
    try:
        data = read_datalist_json(file)
    except DataError as e:
        return [str(e)]
    base = Path(base_dir) if base_dir is not None else file.resolve().parent
    problems = _meta_problems(file, data)
    present = datalist_sections(data)
    wanted = list(sections) if sections is not None else present
    if not wanted:
        problems.append((str(file), f"no sections (expected one of {', '.join(KNOWN_SECTIONS)})"))
    seen_in: dict[str, str] = {}
    all_empty = bool(present) and not any(_section_entries(data, s) for s in present)
    if sections is None and all_empty:
        problems.append((str(file), f"every section is empty ({', '.join(present)})"))
    if sections is None:
        for name in present:
            known = misnamed_section(name)
            if known is not None and known not in present:
                problems.append((str(file), misnamed_section_problem(name, known)))
    for section in wanted:
        if section not in present:
            problems.append((str(file), _unknown_section(section, present)))
            continue
        if sections is None and not _section_entries(data, section) and (section != "training" or all_empty):
            continue  # an empty optional section (e.g. "test": []) is fine; an empty "training" is not
        problems += _section_problems(file, data, section, base, require, path_keys, check_files, check_shapes)
        for i, entry in enumerate(_section_entries(data, section)):
            if isinstance(entry, Mapping) and isinstance(entry.get("case_id"), (str, int)):
                cid = str(entry["case_id"])
                if cid in seen_in and not seen_in[cid].startswith(f"{section}["):
                    problems.append(
                        (_entry_where(file, section, i, entry), f"case_id '{cid}' is also in {seen_in[cid]}")
                    )
                seen_in.setdefault(cid, f"{section}[{i}]")
    return [f"{where}: {problem}" for where, problem in problems]


def _unknown_section(section: str, present: Sequence[str]) -> str:
    for name in present:
        if misnamed_section(name) == section:
            return misnamed_section_problem(name, section)
    have = ", ".join(present) if present else "none"
    return f"unknown section '{section}' (sections in the file: {have})"


def load_datalist(
    path: str | os.PathLike,
    section: str = "training",
    *,
    require: Sequence[str] = ("image",),
    check_files: bool = True,
    check_shapes: bool = False,
    base_dir: str | os.PathLike | None = None,
    path_keys: Sequence[str] = PATH_KEYS,
) -> list[dict[str, Any]]:
    """Load one section of a datalist with absolute paths, validating it first.

    Like :func:`monai.data.load_decathlon_datalist`, but every problem of the section is found
    and reported with the file, section, index and case id. Paths of ``path_keys`` (``image``,
    ``label``, ``prior``; strings, lists or dict values) are joined to ``base_dir`` (default: the
    datalist's folder) unless absolute, and normalised. Other keys are copied unchanged.

    Args:
        path: the datalist JSON.
        section: ``"training"``, ``"validation"``, ``"test"`` or any other list in the file.
        require: keys every entry must have.
        check_files: every path must exist (a file, or a folder for a DICOM series).
        check_shapes: compare image/label/prior header shapes (cheap: headers only).
        base_dir: folder relative paths are relative to.

    Returns:
        a new list of new dicts (the JSON is not modified).

    Raises:
        DataError: one error listing all problems of the section (see the module docstring).

    Example::

        load_datalist("dataset.json", "validation", require=("image", "label"), check_shapes=True)
    """
    file = Path(path)
    data = read_datalist_json(file)
    base = Path(base_dir) if base_dir is not None else file.resolve().parent
    present = datalist_sections(data)
    if section not in present:
        raise DataError(file, _unknown_section(section, present))
    problems = _meta_problems(file, data)
    problems += _section_problems(file, data, section, base, require, path_keys, check_files, check_shapes)
    if problems:
        _raise_problems(file, section, problems)
    return [resolve_paths(entry, base, path_keys) for entry in _section_entries(data, section)]


def _raise_problems(file: Path, section: str, problems: list[tuple[str, str]]) -> None:
    if len(problems) == 1:
        raise DataError(*problems[0])
    shown = [f"{w}: {p}" for w, p in problems[:_MAX_LISTED]]
    more = len(problems) - len(shown)
    text = "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")
    raise DataError(file, f"{len(problems)} problems in section '{section}':\n  {text}")


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _relativize(folder: Path, value: Any) -> Any:
    def rel(p: str | os.PathLike) -> str:
        a = Path(os.path.abspath(os.path.expanduser(str(p))))
        try:
            return Path(os.path.relpath(a, folder)).as_posix()
        except ValueError:  # another drive on Windows
            return a.as_posix()

    if _is_path(value):
        return rel(value)
    if isinstance(value, (list, tuple)):
        return [rel(v) if _is_path(v) else v for v in value]
    if isinstance(value, Mapping):
        return {k: rel(v) if _is_path(v) else v for k, v in value.items()}
    return value


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy arrays/scalars, torch tensors
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def format_datalist(
    path: str | os.PathLike,
    sections: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    path_keys: Sequence[str] = PATH_KEYS,
    **meta: Any,
) -> str:
    """The JSON text :func:`write_datalist` writes to ``path`` (paths relative to ``path``'s folder)."""
    folder = Path(os.path.abspath(Path(path).parent))
    doc: dict[str, Any] = dict(meta)
    for name, entries in sections.items():
        if name in doc:
            raise ValueError(f"section '{name}' collides with a metadata key")
        if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Iterable):
            raise TypeError(f"section '{name}' must be a list of entries, got {type(entries).__name__}")
        out_entries = []
        for e in entries:
            item = dict(e)
            for key in path_keys:
                if key in item:
                    item[key] = _relativize(folder, item[key])
            out_entries.append(item)
        doc[name] = out_entries
    return json.dumps(doc, indent=2, default=_json_default) + "\n"


def write_datalist(
    path: str | os.PathLike,
    sections: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    path_keys: Sequence[str] = PATH_KEYS,
    **meta: Any,
) -> Path:
    """Write a datalist JSON atomically, with paths relative to the file's folder.

    Paths of ``path_keys`` in the entries that are relative are taken relative to the current
    working directory (as the OS reads them), then rewritten relative to the datalist folder with
    ``/`` separators. ``meta`` (``name``, ``structures``, ``classes``, ``description``...) goes
    first in the file, then the sections in the given order. The text is written through
    :func:`medspan.io.write_text_atomic`, so readers never see a half-written datalist and no
    temporary file is left behind, even on error.

    Returns:
        the path written.

    Example::

        write_datalist("out/dataset.json", {"training": [{"image": "out/images/a.png"}]},
                       name="demo", structures=["left_lung"])
        # out/dataset.json: {"name": "demo", "structures": ["left_lung"],
        #                    "training": [{"image": "images/a.png"}]}
    """
    file = Path(path)
    write_text_atomic(format_datalist(file, sections, path_keys=path_keys, **meta), file)
    return file


# --------------------------------------------------------------------------------------------
# splitting
# --------------------------------------------------------------------------------------------


def _target_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Integer counts summing to n, close to n*fractions (largest remainder); a part with a
    positive fraction gets at least one item when n allows it."""
    raw = [n * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    return counts


def split_datalist(
    entries: Sequence[Mapping[str, Any]],
    fractions: float | Sequence[float] = 0.2,
    *,
    n_val: int | None = None,
    seed: int = 0,
    group_key: str | None = None,
) -> list[list[dict[str, Any]]]:
    """Split entries into parts deterministically, optionally keeping groups (patients) whole.

    Args:
        entries: datalist entries.
        fractions: a float ``f`` means ``(1 - f, f)`` (train, validation); a sequence such as
            ``(0.7, 0.15, 0.15)`` gives that many parts (normalised to sum 1).
        n_val: instead of fractions, put exactly ``n_val`` entries in the second of two parts
            (with ``group_key``: whole groups, as close to ``n_val`` as the groups allow).
        seed: the same seed and input order give the same split.
        group_key: entries sharing this key's value (e.g. ``"patient_id"``) land in the same
            part; entries without the key are their own group.

    Returns:
        a list of parts (lists of entry dicts, in input order within each part).

    Example::

        train, val = split_datalist(entries, 0.2, seed=0, group_key="patient_id")
    """
    if n_val is not None:
        if not 0 <= n_val <= len(entries):
            raise ValueError(f"n_val={n_val} must be within 0..{len(entries)}")
        fracs = [1.0 - n_val / max(len(entries), 1), n_val / max(len(entries), 1)]
    else:
        if isinstance(fractions, (int, float)):
            fracs = [1.0 - float(fractions), float(fractions)]
        else:
            fracs = [float(f) for f in fractions]
        if any(f < 0 for f in fracs) or sum(fracs) <= 0:
            raise ValueError(f"fractions must be non-negative with a positive sum, got {fractions}")
        total = sum(fracs)
        fracs = [f / total for f in fracs]

    groups: dict[Any, list[int]] = {}
    for i, e in enumerate(entries):
        g = ("__key__", str(e[group_key])) if group_key is not None and group_key in e else ("__entry__", i)
        groups.setdefault(g, []).append(i)
    units = list(groups.values())
    random.Random(seed).shuffle(units)

    n = len(entries)
    targets = [n - n_val, n_val] if n_val is not None else _target_counts(n, fracs)
    assigned: list[list[int]] = [[] for _ in fracs]
    if group_key is None:
        start = 0
        for k, t in enumerate(targets):
            for u in units[start : start + t]:
                assigned[k] += u
            start += t
    else:
        counts = [0] * len(fracs)
        for u in units:
            k = max(range(len(fracs)), key=lambda j: (targets[j] - counts[j], -j))
            assigned[k] += u
            counts[k] += len(u)
        # a part that should have entries but got none takes the smallest group of the part
        # holding most groups (when it has more than one)
        for k, f in enumerate(fracs):
            if f > 0 and not assigned[k]:
                part_groups = {j: [u for u in units if u[0] in assigned[j]] for j in range(len(fracs))}
                donor = max(part_groups, key=lambda j: len(part_groups[j]))
                if len(part_groups[donor]) > 1:
                    smallest = min(part_groups[donor], key=len)
                    assigned[donor] = [i for i in assigned[donor] if i not in smallest]
                    assigned[k] = list(smallest)
    return [[dict(entries[i]) for i in sorted(part)] for part in assigned]
