"""The embedded default data of the pretraining bundles: a synthetic anatomy set with priors.

:func:`prepare_synthetic_cxr` makes (once; later calls reuse it) a set of phantom chest X-rays
with their organ masks, takes ONE training case as the expert-labeled exemplar, turns its masks
into a soft prior, and writes a datalist whose training entries carry ``prior`` and whose
validation entries carry ``label`` (one mask per structure, in the order of ``structures``).

Prior used here: the exemplar's masks, Gaussian-softened, as one fixed prior for every image
(the "single expert-labeled sample" prior). Per-image priors by registering the exemplar onto each
image come from :mod:`medspan.priors.atlas` when that is available; the datalist format is the same.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from medspan.errors import DataError

__all__ = ["prepare_synthetic_cxr", "exemplar_masks"]


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
) -> str:
    """Generate (or reuse) the synthetic CXR set and its exemplar prior; return the datalist path.

    Args:
        data_dir: folder of the set (``dataset.json``, ``images/``, ``masks/``, ``priors/``).
        n_cases: number of cases in all; ``n_val`` of them, spread evenly, form the validation section.
        n_val: labeled validation cases (attention-segmentation AP is measured on them).
        size: image size in pixels.
        seed: generator seed (case i depends only on (seed, i)).
        structures: structures that get prior channels and validation labels, in channel order.
        exemplar: index of the training case whose masks make the prior.
        mask_sigma: Gaussian softening of the exemplar masks, in pixels.
        workers: generator processes.

    Returns:
        path of ``span_datalist.json`` (absolute paths are resolved by
        :func:`medspan.data.datalist.load_datalist`).
    """
    from medspan.data.datalist import write_datalist
    from medspan.data.synthetic import write_cxr_dataset
    from medspan.priors.statistics import save_prior, soften_masks

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

    training = [
        {"image": _abs(e["image"]), "prior": str(prior_path.resolve()), "case_id": e["case_id"]} for e in train
    ]
    validation = [
        {"image": _abs(e["image"]), "label": [_abs(e["label"][i]) for i in idx], "case_id": e["case_id"]}
        for e in val
    ]
    out = set_dir / f"span_datalist_{'-'.join(structures)}_ex{exemplar}.json"
    if not out.exists():
        write_datalist(
            out,
            {"training": training, "validation": validation},
            name=f"synthetic CXR {tag} with exemplar prior",
            structures=list(structures),
            exemplar={"case_id": ex["case_id"], "image": _abs(ex["image"]), "prior": str(prior_path.resolve())},
        )
    return str(out)
