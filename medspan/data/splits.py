"""Patient-wise splits and nested label-fraction subsets of datalist entries.

The downstream comparisons train on 1%, 10% and 100% of the training labels. The subsets here are

* **fixed by a seed**: the same entries, seed and fractions give the same subsets;
* **nested**: the distinct patients are shuffled ONCE, and fraction ``f`` takes the first
  ``max(min_patients, ceil(f * n_patients))`` of them, so 1% ⊂ 10% ⊂ 100%;
* **patient-wise**: all images of a patient are in a subset or none is.

A patient is the value of ``patient_key`` (compared as a string); an entry without that key is
its own patient. :func:`patient_split` makes training / validation / test sections whole patients
at a time, and :func:`check_patient_disjoint` refuses a datalist with a patient in two sections.

Example::

    from medspan.data.splits import label_fraction_subsets
    subsets = label_fraction_subsets(train, (0.01, 0.1, 1.0), seed=0)
    subsets[0.1]        # the entries of 10% of the training patients (at least one patient)
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Hashable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from medspan.data.datalist import split_datalist
from medspan.errors import DataError

__all__ = ["check_patient_disjoint", "label_fraction_subsets", "patient_of", "patient_split"]


def patient_of(entry: Mapping[str, Any], index: int, patient_key: str = "patient_id") -> Hashable:
    """The patient of ``entry`` (the ``index``-th of its list): ``("patient", str(value))``, or
    ``("entry", index)`` when the entry has no ``patient_key`` (its own patient)."""
    if patient_key in entry and entry[patient_key] is not None:
        return ("patient", str(entry[patient_key]))
    return ("entry", index)


def _patients(entries: Sequence[Mapping[str, Any]], patient_key: str) -> tuple[list[Hashable], list[Hashable]]:
    """``(patient of each entry, distinct patients in order of first appearance)``."""
    of = [patient_of(e, i, patient_key) for i, e in enumerate(entries)]
    return of, list(dict.fromkeys(of))


def label_fraction_subsets(
    entries: Sequence[Mapping[str, Any]],
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    seed: int = 0,
    patient_key: str = "patient_id",
    min_patients: int = 1,
) -> dict[float, list[dict[str, Any]]]:
    """Nested, patient-wise subsets of ``entries`` holding each fraction of the patients.

    The distinct patients (``patient_key``; an entry without it is its own patient) are shuffled
    once with ``random.Random(seed)``; fraction ``f`` keeps the entries of the first
    ``k(f) = min(n, max(min_patients, ceil(f * n)))`` patients of that order (``n`` patients).
    ``f * n`` is computed on the fraction as written in decimals (``Fraction(f).limit_denominator``),
    so 10% of 30 patients is 3, not 4 (``0.1 * 30`` is ``3.0000000000000004`` in floating point).
    Hence a smaller fraction's subset is contained in a larger one's, and ``1.0`` keeps everything.

    Args:
        entries: the training entries (dicts).
        fractions: each in ``(0, 1]``.
        seed: the shuffle's seed; another seed gives (in general) other subsets.
        patient_key: the entry key naming the patient.
        min_patients: the fewest patients in any subset (at least 1 keeps a 1% subset of a small
            set from being empty).

    Returns:
        ``{float(f): [entry copies]}`` in the order of ``fractions``; the entries of each subset
        in their input order.

    Raises:
        ValueError: a fraction outside ``(0, 1]`` or ``min_patients < 0``.

    Example::

        >>> e = [{"image": f"{i}.png", "patient_id": p} for i, p in enumerate("aabcd")]
        >>> sub = label_fraction_subsets(e, (0.25, 0.5, 1.0), seed=0)
        >>> [len({x["patient_id"] for x in sub[f]}) for f in (0.25, 0.5, 1.0)]
        [1, 2, 4]
    """
    bad = [f for f in fractions if not (isinstance(f, (int, float)) and 0.0 < float(f) <= 1.0)]
    if bad:
        raise ValueError(f"label fractions must be in (0, 1], got {bad}")
    if min_patients < 0:
        raise ValueError(f"min_patients must be >= 0, got {min_patients}")
    of, patients = _patients(entries, patient_key)
    order = list(patients)
    random.Random(seed).shuffle(order)
    n = len(order)
    out: dict[float, list[dict[str, Any]]] = {}
    for f in fractions:
        k = min(n, max(int(min_patients), math.ceil(Fraction(float(f)).limit_denominator(1_000_000) * n)))
        chosen = set(order[:k])
        out[float(f)] = [dict(e) for e, p in zip(entries, of) if p in chosen]
    return out


def patient_split(
    entries: Sequence[Mapping[str, Any]],
    fractions: Mapping[str, float],
    seed: int = 0,
    patient_key: str = "patient_id",
) -> dict[str, list[dict[str, Any]]]:
    """Split entries into named sections, whole patients at a time, fixed by ``seed``.

    Section sizes are counted in entries: ``fractions`` (normalised to sum 1) times the number of
    entries, rounded by largest remainder, and a section with a positive fraction gets at least
    one patient when there are enough (:func:`medspan.data.datalist.split_datalist` with
    ``group_key=patient_key``). With one image per patient the counts are exact.

    Args:
        entries: datalist entries (an entry without ``patient_key`` is its own patient).
        fractions: ``{section: fraction}``, e.g. ``{"training": 0.7, "validation": 0.1, "test": 0.2}``.
        seed: the same entries and seed give the same split.
        patient_key: the entry key naming the patient.

    Returns:
        ``{section: [entry copies]}`` in the order of ``fractions``, entries in input order.

    Raises:
        ValueError: no sections, or a negative fraction / a zero sum.

    Example::

        parts = patient_split(entries, {"training": 0.8, "test": 0.2}, seed=0)
    """
    if not fractions:
        raise ValueError("patient_split needs at least one section")
    names = list(fractions)
    parts = split_datalist(entries, [float(fractions[k]) for k in names], seed=seed, group_key=patient_key)
    return dict(zip(names, parts))


def check_patient_disjoint(
    sections: Mapping[str, Sequence[Mapping[str, Any]]],
    patient_key: str = "patient_id",
    where: str | os.PathLike = "datalist",
) -> None:
    """Raise when a patient has entries in two sections (entries without ``patient_key`` never clash).

    Raises:
        DataError: ``where: patient '<id>' is in both '<a>' (<a>[i]) and '<b>' (<b>[j])``, for the
            first such patient found (sections in order, entries in order).

    Example::

        check_patient_disjoint({"training": train, "test": test}, where="data/datalist.json")
    """
    seen: dict[str, tuple[str, int]] = {}
    for name, entries in sections.items():
        local: dict[str, int] = {}
        for i, e in enumerate(entries):
            if patient_key not in e or e[patient_key] is None:
                continue
            pid = str(e[patient_key])
            if pid in seen:
                other, j = seen[pid]
                raise DataError(
                    where, f"patient {pid!r} is in both '{other}' ({other}[{j}]) and '{name}' ({name}[{i}]); "
                    "sections must be patient-disjoint"
                )
            local.setdefault(pid, i)
        for pid, i in local.items():
            seen[pid] = (name, i)
