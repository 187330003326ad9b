"""The embedded default data of the ``smartformer_ct`` bundle: synthetic chest CTs with registered 3D priors.

:func:`prepare_synthetic_ct` makes (once; later calls reuse it) a set of phantom chest CTs
(:func:`medspan.data.synthetic.write_ct_dataset`, NIfTI in HU) with organ and nodule masks, takes ONE
training case as the expert-labeled exemplar, makes a soft prior per training volume from its masks
and writes a datalist whose training entries carry ``image`` and ``prior``
and whose validation entries carry ``image`` and ``label`` (one mask file per structure, in the order
of ``structures``; ``nodules`` is the nodule label map, any value > 0.5 is a nodule).

Priors (``prior``): by default the exemplar is registered onto every training volume
(:func:`medspan.recipes.cxr.registered_priors`, the atlas builder of ``medspan build-priors``:
affine + 3D demons, checked, cached), so every volume gets its own warped, softened exemplar masks.
``"exemplar"`` uses the exemplar's softened masks as one fixed prior for every volume (valid only
because the phantoms share one grid); ``"none"`` writes no prior (for runs without the prior loss).
:func:`exemplar_prior` turns masks into the fixed prior.

:func:`check_ct_datalist` refuses a datalist whose top-level ``modality`` says it is not CT.

What the ``smartformer_ct`` bundle calls: :func:`pretraining_datalist` (the user's CT datalist, or
the synthetic set made from ``hparams::data``), :func:`pretraining_entries` (its training entries,
without ``prior`` when no prior loss is on), :func:`image_keys` / :func:`view_keys` (the keys the
transforms move: the image, and the prior when it is used).

Example::

    path = prepare_synthetic_ct("bundles/smartformer_ct/runs/data/synthetic_ct")
    load_datalist(path, "training", require=("image", "prior"))
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medspan.atlas.statistics import save_prior, soften_masks
from medspan.data.datalist import load_datalist, write_datalist
from medspan.data.synthetic import CT_STRUCTURES, write_ct_dataset
from medspan.errors import DataError
from medspan.recipes.cxr import data_settings, training_priors

__all__ = [
    "CT_VALIDATION_STRUCTURES",
    "check_ct_datalist",
    "exemplar_prior",
    "image_keys",
    "load_masks",
    "prepare_synthetic_ct",
    "pretraining_datalist",
    "pretraining_entries",
    "view_keys",
]

CT_VALIDATION_STRUCTURES: tuple[str, ...] = ("left_lung", "right_lung", "heart", "nodules")
"""Structures scored by the attention validation of the default set (``nodules``: the nodule label map)."""


def load_masks(paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """Load NIfTI masks as one bool array (S, x, y, z) in the files' array order (MONAI's, no reorientation)."""
    import nibabel as nib

    out = []
    for p in paths:
        try:
            out.append(np.asarray(nib.load(str(p)).dataobj) > 0.5)
        except Exception as e:  # nibabel raises several types
            raise DataError(p, f"cannot read mask: {e}") from e
    shapes = {m.shape for m in out}
    if len(shapes) > 1:
        raise DataError(paths[0], f"masks have different shapes {sorted(shapes)}")
    return np.stack(out)


def exemplar_prior(mask_paths: Sequence[str | os.PathLike], sigma: float = 1.0) -> np.ndarray:
    """Soft prior (S, x, y, z) float32 in [0, 1] from ONE exemplar's masks (Gaussian sigma in voxels, peak 1)."""
    return soften_masks(load_masks(mask_paths), sigma=sigma)


def check_ct_datalist(path: str | os.PathLike) -> str:
    """Return ``path`` unchanged if its top-level ``modality`` is absent or ``CT``; DataError otherwise."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(path, f"cannot read datalist: {e}") from e
    modality = doc.get("modality") if isinstance(doc, dict) else None
    if modality is not None and str(modality).strip().upper() != "CT":
        raise DataError(path, f"datalist modality is {modality!r}; smartformer_ct pretrains on CT only")
    return str(path)


def prepare_synthetic_ct(
    data_dir: str | os.PathLike,
    n_cases: int = 40,
    n_val: int = 8,
    shape: Sequence[int] = (72, 80, 80),
    spacing: Sequence[float] = (5.0, 5.0, 5.0),
    seed: int = 0,
    structures: Sequence[str] = CT_VALIDATION_STRUCTURES,
    prior_structures: Sequence[str] = ("left_lung", "right_lung", "heart"),
    exemplar: int = 0,
    mask_sigma: float = 1.0,
    workers: int = 1,
    prior: str = "registered",
    prior_method: str = "default",
    prior_workers: int = 2,
) -> str:
    """Generate (or reuse) the synthetic CT set and its priors; return the datalist path.

    Args:
        data_dir: folder of the sets; each parameter set gets its own sub-folder.
        n_cases: number of phantoms; ``n_val`` of them, spread evenly, are the validation section.
        n_val: labeled validation cases (attention AP is measured on them).
        shape: phantom array shape ``(nz, ny, nx)`` (:func:`~medspan.data.synthetic.synth_ct` order).
        spacing: ``(sx, sy, sz)`` mm; the field of view is ``shape[::-1] * spacing``.
        seed: generator seed (case i depends only on (seed, i)).
        structures: validation label channels: names of ``CT_STRUCTURES`` or ``"nodules"``.
        prior_structures: prior channels (organs of the exemplar).
        exemplar: index of the training case whose masks make the prior.
        mask_sigma: Gaussian softening of the exemplar masks, in voxels.
        workers: generator processes.
        prior: ``"registered"`` (the exemplar registered onto every training volume,
            :func:`medspan.recipes.cxr.registered_priors`: affine + 3D demons, cached),
            ``"exemplar"`` (the exemplar's softened masks as one fixed prior for every volume: the
            phantoms share one grid) or ``"none"`` (training entries without ``prior``; for runs
            that do not use a prior, so nothing is registered).
        prior_method: registration method for ``"registered"`` (see ``medspan build-priors``).
        prior_workers: registration processes.

    Returns:
        path of the datalist JSON (modality CT).
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    known = (*CT_STRUCTURES, "nodules")
    for name in (*structures, *prior_structures):
        if name not in known:
            raise DataError("<structures>", f"unknown structure {name!r}; the synthetic CT set has {list(known)}")
    if "nodules" in prior_structures:
        raise DataError("<prior_structures>", "nodules vary per scan and cannot come from one exemplar")
    tag = f"n{n_cases}_v{n_val}_{'x'.join(map(str, shape))}_sp{'x'.join(f'{s:g}' for s in spacing)}_seed{seed}"
    set_dir = Path(data_dir) / tag
    base = set_dir / "dataset.json"
    if not base.exists():
        write_ct_dataset(
            set_dir,
            n=n_cases,
            shape=shape,
            seed=seed,
            fmt="nifti",
            spacing=spacing,
            val_fraction=n_val / n_cases,
            workers=workers,
        )
    meta = json.loads(base.read_text())

    def _abs(p: str) -> str:
        return str((set_dir / p).resolve())

    def _label(entry: dict, name: str) -> str:
        return _abs(entry["nodule_label"] if name == "nodules" else entry["label"][CT_STRUCTURES.index(name)])

    train, val = meta["training"], meta["validation"]
    if not 0 <= exemplar < len(train):
        raise DataError(base, f"exemplar index {exemplar} out of range (0..{len(train) - 1})")
    ex = train[exemplar]
    prior_path = set_dir / "priors" / f"exemplar_{ex['case_id']}_sigma{mask_sigma:g}_{'-'.join(prior_structures)}.npy"
    if not prior_path.exists():
        save_prior(exemplar_prior([_label(ex, s) for s in prior_structures], sigma=mask_sigma), prior_path)

    images = [_abs(e["image"]) for e in train]
    atlas_dir = set_dir / f"atlas_{prior_method}_ex{exemplar}_sigma{mask_sigma:g}_{'-'.join(prior_structures)}"
    priors, suffix, what = training_priors(
        prior, images, _abs(ex["image"]), [_label(ex, s) for s in prior_structures], prior_structures, prior_path,
        atlas_dir, exemplar_case=ex["case_id"], method=prior_method, sigma=mask_sigma, workers=prior_workers,
    )
    training = [
        {"image": img, "case_id": e["case_id"], **({"prior": priors[img]} if img in priors else {})}
        for img, e in zip(images, train)
        if prior == "none" or img in priors
    ]
    validation = [
        {"image": _abs(e["image"]), "label": [_label(e, s) for s in structures], "case_id": e["case_id"]} for e in val
    ]
    out = set_dir / f"smart_datalist_{'-'.join(structures)}_ex{exemplar}{suffix}.json"
    if not out.exists():
        write_datalist(
            out,
            {"training": training, "validation": validation},
            name=f"synthetic chest CT {tag} with {what}",
            modality="CT",
            structures=list(structures),
            prior_structures=list(prior_structures),
            exemplar={"case_id": ex["case_id"], "image": _abs(ex["image"]), "prior": str(prior_path.resolve())},
        )
    return str(out)


_CT_SETTING_NAMES = {"shape_zyx": "shape", "spacing_xyz": "spacing"}
"""``hparams::data`` keys of the bundle whose :func:`prepare_synthetic_ct` argument has another name."""


def pretraining_datalist(
    datalist: str | os.PathLike | None,
    data_dir: str | os.PathLike,
    *,
    seed: int = 0,
    structures: Sequence[str] = CT_VALIDATION_STRUCTURES,
    prior_structures: Sequence[str] = ("left_lung", "right_lung", "heart"),
    settings: Mapping[str, Any] | None = None,
    use_prior: bool = True,
) -> str:
    """The datalist a ``smartformer_ct`` run trains on: ``datalist`` (checked to be CT) or the synthetic default.

    Args:
        datalist: the user's datalist (``--datalist``); None: the embedded synthetic set.
        data_dir: folder of the synthetic sets (the bundle's ``dataset_dir``).
        seed: generator seed (``hparams::seed``).
        structures: validation label channels (``hparams::structures``).
        prior_structures: prior channels (``hparams::prior_structures``).
        settings: ``hparams::data``: :func:`prepare_synthetic_ct`'s keyword arguments, with
            ``shape_zyx`` for ``shape`` and ``spacing_xyz`` for ``spacing``.
        use_prior: False (no prior loss): the synthetic set gets no priors (``prior="none"``), so
            nothing is registered.

    Raises:
        DataError: ``datalist`` does not exist or is not CT.
        ValueError: an unknown data setting.
    """
    if datalist:
        if not Path(datalist).is_file():
            raise DataError(datalist, "datalist does not exist")
        return check_ct_datalist(datalist)
    kwargs = data_settings(
        settings, prepare_synthetic_ct, exclude=("data_dir", "seed", "structures", "prior_structures"),
        rename=_CT_SETTING_NAMES,
    )
    if not use_prior:
        kwargs["prior"] = "none"
    return prepare_synthetic_ct(data_dir, seed=seed, structures=structures, prior_structures=prior_structures, **kwargs)


def pretraining_entries(datalist: str | os.PathLike, use_prior: bool = True) -> list[dict[str, Any]]:
    """The training entries of ``datalist`` (validated); without their ``prior`` key when no prior is used.

    Raises:
        DataError: problems of the section (:func:`medspan.data.datalist.load_datalist`).
    """
    entries = load_datalist(datalist, "training", require=("image", "prior") if use_prior else ("image",))
    if not use_prior:
        entries = [{k: v for k, v in e.items() if k != "prior"} for e in entries]
    return entries


def image_keys(use_prior: bool = True) -> list[str]:
    """Keys the training transforms load and move: ``["image", "prior"]``, or ``["image"]`` without a prior."""
    return ["image", "prior"] if use_prior else ["image"]


def view_keys(use_prior: bool = True) -> list[str]:
    """Output keys of the two-view crop, one per :func:`image_keys` entry: ``views`` (and ``view_priors``)."""
    return ["views", "view_priors"] if use_prior else ["views"]
