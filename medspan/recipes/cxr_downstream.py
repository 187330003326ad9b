"""The embedded default data of the downstream CXR bundles: labeled phantoms with findings.

:func:`prepare_downstream_cxr` makes (once; later calls reuse it) a set of phantom chest X-rays
(:func:`medspan.data.synthetic.synth_cxr`, written by
:func:`medspan.data.synthetic.write_cxr_dataset`) and a datalist with patient-wise ``training``,
``validation`` and ``test`` sections whose entries carry both tasks' labels:

* ``label``: one organ mask path per structure (order of the top-level ``structures``), for
  ``cxr_seg``;
* ``labels``: multi-hot over the top-level ``classes`` = :data:`~medspan.data.synthetic.cxr.CXR_FINDINGS`
  + ``["no_finding"]`` (``no_finding`` is 1 exactly when no finding is present), for ``cxr_cls``
  (the convention of ``data_prep/nih_cxr14.py``);
* ``patient_id`` (one patient per phantom: its case id) and ``case_id``.

The findings depend on the anatomy (a nodule inside a lung, an effusion in a costophrenic angle,
a pneumothorax along the apex and lateral edge of a lung, an enlarged heart), so the default is a
task a pretrained encoder can help with. :func:`downstream_datalist` is what the bundles call: the
user's datalist when one is given, else this set.

Example::

    from medspan.recipes.cxr_downstream import prepare_downstream_cxr
    path = prepare_downstream_cxr("runs/data/downstream_cxr", n_cases=24, n_val=4, n_test=8, size=64)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medspan.data.datalist import write_datalist
from medspan.data.splits import check_patient_disjoint, patient_split
from medspan.data.synthetic import write_cxr_dataset
from medspan.data.synthetic.cxr import CXR_FINDINGS, CXR_GENERATOR_VERSION
from medspan.errors import DataError
from medspan.recipes.cxr import given_or_synthetic

__all__ = ["DOWNSTREAM_CLASSES", "downstream_datalist", "findings_multi_hot", "prepare_downstream_cxr"]

DOWNSTREAM_CLASSES: tuple[str, ...] = (*CXR_FINDINGS, "no_finding")
"""Top-level ``classes`` of the synthetic downstream datalist (``labels`` is multi-hot over them)."""


def findings_multi_hot(findings: Mapping[str, bool]) -> list[int]:
    """``labels`` of a phantom: one 0/1 per :data:`DOWNSTREAM_CLASSES`; ``no_finding`` = 1 iff none.

    Example::

        >>> findings_multi_hot({"cardiomegaly": False, "nodule": True, "effusion": False, "pneumothorax": False})
        [0, 1, 0, 0, 0]
    """
    hot = [int(bool(findings.get(name, False))) for name in CXR_FINDINGS]
    return [*hot, int(not any(hot))]


def prepare_downstream_cxr(
    data_dir: str | os.PathLike,
    n_cases: int = 600,
    n_val: int = 100,
    n_test: int = 200,
    size: int = 128,
    seed: int = 1,
    structures: Sequence[str] = ("left_lung", "right_lung", "heart"),
    workers: int = 1,
) -> str:
    """Generate (or reuse) the labeled phantom set and its downstream datalist; return its path.

    The set lives in ``data_dir/downstream_v<generator version>_n<n_cases>_s<size>_seed<seed>/``
    (so a set of an older phantom generator is never reused); an interrupted generation resumes.
    Sections are patient-wise (:func:`medspan.data.splits.patient_split`, fixed by ``seed``):
    ``n_cases - n_val - n_test`` training, ``n_val`` validation, ``n_test`` test cases.

    Args:
        data_dir: folder of the synthetic sets.
        n_cases: phantoms in all.
        n_val: validation cases.
        n_test: test cases.
        size: image side in pixels.
        seed: generator and split seed (case i depends only on (seed, i)).
        structures: organ masks in ``label``, in this order (of
            :data:`~medspan.data.synthetic.cxr.CXR_STRUCTURES`).
        workers: generator processes.

    Returns:
        the datalist path (``downstream_datalist_<structures>_v<n_val>_t<n_test>.json``; paths are
        stored relative to it, :func:`medspan.data.datalist.load_datalist` resolves them). Top-level
        keys: ``name``, ``description``, ``structures``, ``classes``, ``training``, ``validation``,
        ``test``; an entry: ``{"image", "label": [mask per structure], "labels": [multi-hot over
        classes], "patient_id", "case_id"}``.

    Raises:
        ValueError: ``n_val`` / ``n_test`` negative or leaving no training case.
        DataError: a structure the phantoms do not have, or a set folder made with other settings.
    """
    if n_val < 0 or n_test < 0 or n_cases - n_val - n_test < 1:
        raise ValueError(f"need n_val, n_test >= 0 and at least one training case; got n_cases={n_cases}, "
                         f"n_val={n_val}, n_test={n_test}")
    data_dir = Path(data_dir)
    tag = f"downstream_v{CXR_GENERATOR_VERSION}_n{n_cases}_s{size}_seed{seed}"
    set_dir = data_dir / tag
    base = set_dir / "dataset.json"
    if not base.exists():
        write_cxr_dataset(set_dir, n=n_cases, size=size, seed=seed, fmt="png", val_fraction=0.0, workers=workers)
    meta = json.loads(base.read_text())
    known = list(meta["structures"])
    missing = [s for s in structures if s not in known]
    if missing:
        raise DataError(base, f"structures {missing} are not in the set (has {known})")
    idx = [known.index(s) for s in structures]
    cases = [*meta["training"], *meta["validation"], *meta["test"]]
    if len(cases) != n_cases or any("findings" not in e for e in cases):
        raise DataError(base, f"expected {n_cases} cases with findings, found {len(cases)}; delete the folder to rebuild it")

    def _abs(p: str) -> str:
        return str((set_dir / p).resolve())

    entries = [
        {
            "image": _abs(e["image"]),
            "label": [_abs(e["label"][i]) for i in idx],
            "labels": findings_multi_hot(e["findings"]),
            "patient_id": e.get("patient_id", e["case_id"]),
            "case_id": e["case_id"],
        }
        for e in cases
    ]
    out = set_dir / f"downstream_datalist_{'-'.join(structures)}_v{n_val}_t{n_test}.json"
    if not out.exists():
        n_train = n_cases - n_val - n_test
        sections = patient_split(
            entries, {"training": n_train / n_cases, "validation": n_val / n_cases, "test": n_test / n_cases}, seed=seed
        )
        check_patient_disjoint(sections, where=out)
        write_datalist(
            out,
            sections,
            name=f"synthetic downstream CXR {tag}",
            description=(
                "phantom PA chest radiographs (medspan.data.synthetic.synth_cxr) with organ masks (label, one per "
                "structure) and findings (labels, multi-hot over classes; no_finding = 1 exactly when no finding); "
                f"patient-wise sections fixed by seed {seed}"
            ),
            structures=list(structures),
            classes=list(DOWNSTREAM_CLASSES),
        )
    return str(out)


def downstream_datalist(
    datalist: str | os.PathLike | None,
    data_dir: str | os.PathLike,
    *,
    seed: int = 1,
    structures: Sequence[str] = ("left_lung", "right_lung", "heart"),
    settings: Mapping[str, Any] | None = None,
) -> str:
    """The datalist a downstream run (``cxr_seg`` / ``cxr_cls``) uses: ``datalist`` when given, else the synthetic set.

    Args:
        datalist: the user's datalist (``--datalist``); None or empty: :func:`prepare_downstream_cxr`.
        data_dir: folder of the synthetic sets (the bundle's ``dataset_dir``).
        seed: generator and split seed.
        structures: organ masks in ``label``.
        settings: the bundle's ``hparams::data``: keyword arguments of :func:`prepare_downstream_cxr`
            (``n_cases``, ``n_val``, ``n_test``, ``size``, ``workers``).

    Raises:
        DataError: ``datalist`` does not exist.
        ValueError: an unknown data setting.

    Example::

        downstream_datalist(None, "runs/data/downstream_cxr", settings={"n_cases": 24, "n_val": 4, "n_test": 8, "size": 64})
    """
    return given_or_synthetic(datalist, prepare_downstream_cxr, data_dir, seed=seed, structures=structures,
                              settings=settings)
