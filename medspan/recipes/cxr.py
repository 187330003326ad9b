"""The embedded default data of the pretraining bundles: a synthetic anatomy set with priors.

:func:`prepare_synthetic_cxr` (``span_cxr``) makes (once; later calls reuse it) a set of phantom
chest X-rays with their organ masks, takes ONE training case as the expert-labeled exemplar, and
writes a datalist whose training entries carry ``prior`` and whose validation entries carry
``label`` (one mask per structure, in the order of ``structures``). :func:`registered_priors` is the
step that turns the exemplar into per-image priors; it works for 2D and 3D sets alike (the CT
default, :mod:`medspan.recipes.ct`, can call it the same way).

Priors (``prior=``):

* ``"registered"`` (default): the exemplar is registered onto every training image
  (:func:`medspan.atlas.build.build_priors`: affine, then diffeomorphic demons by default) and its
  warped masks, Gaussian-softened, are that image's prior. Results are cached in the set folder
  (``atlas_*``); a re-run registers nothing, an interrupted run resumes.
* ``"exemplar"``: the exemplar's softened masks as one fixed prior for every image (no registration).

:func:`pretraining_datalist` is what the ``span_cxr`` bundle calls: the user's datalist when one is
given, else the synthetic set made from the bundle's ``hparams::data`` settings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medspan.atlas.build import build_priors, load_exemplar
from medspan.atlas.statistics import save_prior, soften_masks
from medspan.data.datalist import write_datalist
from medspan.data.synthetic import write_cxr_dataset
from medspan.errors import DataError

__all__ = [
    "data_settings",
    "exemplar_masks",
    "given_or_synthetic",
    "prepare_synthetic_cxr",
    "pretraining_datalist",
    "registered_priors",
    "training_priors",
]


def exemplar_masks(mask_paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """Load per-structure mask PNGs as a bool array (S, x, y) in MONAI axis order (transposed picture)."""
    out = []
    for p in mask_paths:
        try:
            arr = np.asarray(Image.open(p))
        except Exception as e:  # PIL raises several types
            raise DataError(p, f"cannot read mask: {e}") from e
        if arr.ndim == 3:
            arr = arr[..., 0]
        out.append(arr.T > 0)
    return np.stack(out)


def prepare_synthetic_cxr(
    data_dir: str | os.PathLike,
    n_cases: int = 216,
    n_val: int = 24,
    size: int = 256,
    seed: int = 0,
    structures: Sequence[str] = ("left_lung", "right_lung", "heart"),
    exemplar: int = 0,
    mask_sigma: float = 4.0,
    workers: int = 1,
    prior: str = "registered",
    prior_method: str = "default",
    prior_workers: int = 2,
) -> str:
    """Generate (or reuse) the synthetic CXR set and its exemplar priors; return the datalist path.

    Args:
        data_dir: folder of the set (``dataset.json``, ``images/``, ``masks/``, ``priors/``).
        n_cases: number of cases in all; ``n_val`` of them, spread evenly, form the validation section.
        n_val: labeled validation cases (attention-segmentation AP is measured on them).
        size: image size in pixels.
        seed: generator seed (case i depends only on (seed, i)).
        structures: structures that get prior channels and validation labels, in channel order.
        exemplar: index of the training case whose masks make the prior.
        mask_sigma: Gaussian softening of the (warped) exemplar masks, in pixels.
        workers: generator processes.
        prior: ``"registered"`` (the exemplar registered onto every training image) or ``"exemplar"``
            (its softened masks as one fixed prior for all).
        prior_method: registration method for ``"registered"`` (``"default"`` = demons, ``"bspline"``,
            ``"affine"``).
        prior_workers: registration processes.

    Returns:
        path of ``span_datalist.json`` (absolute paths are resolved by
        :func:`medspan.data.datalist.load_datalist`).
    """
    data_dir = Path(data_dir)
    tag = f"n{n_cases}_v{n_val}_s{size}_seed{seed}"
    set_dir = data_dir / tag
    base = set_dir / "dataset.json"
    if not base.exists():
        write_cxr_dataset(set_dir, n=n_cases, size=size, seed=seed, fmt="png", val_fraction=n_val / n_cases, workers=workers)
    meta = json.loads(base.read_text())
    known = list(meta["structures"])
    missing = [s for s in structures if s not in known]
    if missing:
        raise DataError(base, f"structures {missing} are not in the set (has {known})")
    idx = [known.index(s) for s in structures]

    def _abs(p: str) -> str:
        return str((set_dir / p).resolve())

    train, val = meta["training"], meta["validation"]
    if not 0 <= exemplar < len(train):
        raise DataError(base, f"exemplar index {exemplar} out of range (0..{len(train) - 1})")
    ex = train[exemplar]
    prior_name = f"exemplar_{ex['case_id']}_sigma{mask_sigma:g}_{'-'.join(structures)}.npy"
    prior_path = set_dir / "priors" / prior_name
    if not prior_path.exists():
        masks = exemplar_masks([_abs(ex["label"][i]) for i in idx])
        save_prior(soften_masks(masks, sigma=mask_sigma), prior_path)

    images = [_abs(e["image"]) for e in train]
    if prior not in ("registered", "exemplar"):
        raise ValueError(f"prior must be 'registered' or 'exemplar', got {prior!r}")
    atlas_dir = set_dir / f"atlas_{prior_method}_ex{exemplar}_sigma{mask_sigma:g}_{'-'.join(structures)}"
    priors, suffix, what = training_priors(
        prior, images, _abs(ex["image"]), [_abs(ex["label"][i]) for i in idx], structures, prior_path, atlas_dir,
        exemplar_case=ex["case_id"], method=prior_method, sigma=mask_sigma, workers=prior_workers,
    )

    training = [
        {"image": img, "prior": priors[img], "case_id": e["case_id"]} for img, e in zip(images, train) if img in priors
    ]
    validation = [
        {"image": _abs(e["image"]), "label": [_abs(e["label"][i]) for i in idx], "case_id": e["case_id"]}
        for e in val
    ]
    out = set_dir / f"span_datalist_{'-'.join(structures)}_ex{exemplar}{suffix}.json"
    if not out.exists():
        write_datalist(
            out,
            {"training": training, "validation": validation},
            name=f"synthetic CXR {tag} with {what}",
            structures=list(structures),
            exemplar={"case_id": ex["case_id"], "image": _abs(ex["image"]), "prior": str(prior_path.resolve())},
        )
    return str(out)


def pretraining_datalist(
    datalist: str | os.PathLike | None,
    data_dir: str | os.PathLike,
    *,
    seed: int = 0,
    structures: Sequence[str] = ("left_lung", "right_lung", "heart"),
    settings: Mapping[str, Any] | None = None,
) -> str:
    """The datalist a ``span_cxr`` run trains on: ``datalist`` when given, else the synthetic default.

    Args:
        datalist: the user's datalist (``--datalist``); None: the embedded synthetic set.
        data_dir: folder of the synthetic sets (the bundle's ``dataset_dir``).
        seed: generator seed (``hparams::seed``).
        structures: prior channels and validation labels (``hparams::structures``).
        settings: the data settings (``hparams::data``): keyword arguments of
            :func:`prepare_synthetic_cxr` (``n_cases``, ``n_val``, ``size``, ``exemplar``,
            ``mask_sigma``, ``prior``, ``prior_method``, ``prior_workers``, ``workers``).

    Raises:
        DataError: ``datalist`` does not exist.
        ValueError: an unknown data setting.

    Example::

        pretraining_datalist(None, "runs/data/synthetic_cxr", settings={"n_cases": 20, "n_val": 4, "size": 64})
    """
    return given_or_synthetic(datalist, prepare_synthetic_cxr, data_dir, seed=seed, structures=structures,
                              settings=settings)


def given_or_synthetic(
    datalist: str | os.PathLike | None,
    make: Any,
    data_dir: str | os.PathLike,
    *,
    seed: int,
    structures: Sequence[str],
    settings: Mapping[str, Any] | None = None,
) -> str:
    """``datalist`` when given (it must exist), else ``make(data_dir, seed=, structures=, **settings)``.

    ``make`` is a set generator (:func:`prepare_synthetic_cxr`, ``prepare_downstream_cxr``); ``settings``
    are checked against its arguments by :func:`data_settings`.

    Raises:
        DataError: ``datalist`` does not exist.
        ValueError: an unknown data setting.
    """
    if datalist:
        if not Path(datalist).is_file():
            raise DataError(datalist, "datalist does not exist")
        return str(datalist)
    kwargs = data_settings(settings, make, exclude=("data_dir", "seed", "structures"))
    return make(data_dir, seed=seed, structures=structures, **kwargs)


def data_settings(
    settings: Mapping[str, Any] | None,
    fn: Any,
    exclude: Sequence[str] = (),
    rename: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A bundle's ``hparams::data`` as keyword arguments of the set generator ``fn``.

    Keys are renamed by ``rename`` (bundle name -> argument name); ``exclude`` lists arguments the
    caller passes itself.

    Raises:
        ValueError: a key that is not an argument of ``fn``, named as the bundle spells it.
    """
    import inspect

    rename = dict(rename or {})
    back = {v: k for k, v in rename.items()}
    known = [p for p in inspect.signature(fn).parameters if p not in exclude]
    out = {rename.get(k, k): v for k, v in dict(settings or {}).items()}
    unknown = sorted(set(out) - set(known))
    if unknown:
        raise ValueError(
            f"hparams::data: unknown setting(s) {[back.get(k, k) for k in unknown]}; "
            f"known: {sorted(back.get(k, k) for k in known)}"
        )
    return out


def training_priors(
    prior: str,
    images: Sequence[str],
    exemplar_image: str,
    mask_paths: Sequence[str],
    structures: Sequence[str],
    fixed_prior: Path,
    atlas_dir: Path,
    exemplar_case: str = "exemplar",
    method: str = "default",
    sigma: float = 4.0,
    workers: int = 2,
) -> tuple[dict[str, str], str, str]:
    """Priors of a synthetic set's training ``images`` for a ``prior`` mode (shared by the CXR and CT sets).

    ``"registered"``: the exemplar (``exemplar_image`` with one mask file per structure) registered
    onto every image by :func:`registered_priors`, cached in ``atlas_dir`` (``exemplar_case`` names
    it in the description); ``"exemplar"``: the one
    ``fixed_prior`` file for every image; ``"none"``: no priors.

    Returns:
        ``({image: prior path}, datalist-name suffix, description)``.
    """
    if prior == "registered":
        priors = registered_priors(exemplar_image, mask_paths, structures, images, atlas_dir,
                                   method=method, sigma=sigma, workers=workers)
        return priors, f"_reg-{method}", f"priors registered from exemplar {exemplar_case}"
    if prior == "exemplar":
        return {img: str(fixed_prior.resolve()) for img in images}, "", "exemplar prior"
    if prior == "none":
        return {}, "_noprior", "no prior"
    raise ValueError(f"prior must be 'registered', 'exemplar' or 'none', got {prior!r}")


def registered_priors(
    exemplar_image: str,
    mask_paths: Sequence[str],
    structures: Sequence[str],
    images: Sequence[str],
    out_dir: str | os.PathLike,
    method: str = "default",
    sigma: float = 4.0,
    workers: int = 2,
) -> dict[str, str]:
    """Register the exemplar onto ``images`` (cached in ``out_dir``); return ``{image: prior path}``.

    ``mask_paths`` holds one exemplar mask file per structure (order of ``structures``); works for 2D
    and 3D images (:func:`medspan.atlas.build.registration_settings` picks the settings by
    dimension). Images whose registration failed outright (unreadable) are left out; flagged ones
    (retried, affine or population fallback) keep their fallback prior. A folder made with other
    registration settings (e.g. by an older medspan) is recomputed. One summary line is printed when
    anything was registered. Fewer than ``16 * workers`` images are registered in this process.

    Example::

        priors = registered_priors("ct_0000.nii.gz", ["ct_0000_left_lung.nii.gz", "ct_0000_right_lung.nii.gz"],
                                   ["left_lung", "right_lung"], images, "data/atlas", sigma=2.0)
    """
    ex = load_exemplar(exemplar_image, list(mask_paths), structures=list(structures))
    # worker processes cost a second or two to start: not worth it for a handful of images
    n_proc = workers if len(images) >= 16 * max(1, workers) else 1
    res = build_priors(ex, [{"image": img} for img in images], out_dir, method=method, sigma=sigma,
                       workers=n_proc, progress=False, overwrite=True)
    if res.registered_now:
        counts = ", ".join(f"{k} {v}" for k, v in res.counts.items() if v)
        print(f"[medspan] registered the exemplar onto {len(res.registered_now)} images in {res.seconds:.0f} s "
              f"({counts}); priors in {res.out_dir}")
    return {os.path.normpath(r["image"]): r["prior"] for r in res.records if r.get("prior")}
