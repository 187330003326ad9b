"""Label-fraction subsets (nested, patient-wise, fixed by seed) and patient-wise splits."""

from __future__ import annotations

import itertools

import pytest

from medspan.data.splits import (
    check_patient_disjoint,
    label_fraction_subsets,
    patient_split,
)
from medspan.errors import DataError


def multi_image_entries() -> list[dict]:
    """10 patients p0..p9; patient i has (i % 3) + 1 images: 19 entries, patients interleaved."""
    out = []
    for k in range(3):
        for i in range(10):
            if k <= i % 3:
                out.append({"image": f"p{i}_{k}.png", "patient_id": f"p{i}"})
    return out


def images(entries: list[dict]) -> list[str]:
    return [e["image"] for e in entries]


def test_subsets_exact_nested_patient_wise_input_order() -> None:
    entries = multi_image_entries()
    assert len(entries) == 19
    sub = label_fraction_subsets(entries, (0.1, 0.3, 1.0), seed=0)
    assert list(sub) == [0.1, 0.3, 1.0]
    # random.Random(0) shuffles p0..p9 into p7 p8 p1 p5 p3 p4 p2 p0 p9 p6: 10% = 1 patient, 30% = 3
    assert images(sub[0.1]) == ["p7_0.png", "p7_1.png"]
    assert images(sub[0.3]) == ["p1_0.png", "p7_0.png", "p8_0.png", "p1_1.png", "p7_1.png", "p8_1.png", "p8_2.png"]
    assert sub[1.0] == entries and sub[1.0] is not entries  # everything, copies, in input order
    # nested and patient-wise: a patient in a subset brings all its images
    assert set(images(sub[0.1])) < set(images(sub[0.3])) < set(images(sub[1.0]))
    for s in sub.values():
        pats = {e["patient_id"] for e in s}
        assert images(s) == [e["image"] for e in entries if e["patient_id"] in pats]
    # fixed by the seed; another seed, another subset
    assert label_fraction_subsets(entries, (0.1, 0.3, 1.0), seed=0) == sub
    other = label_fraction_subsets(entries, (0.3,), seed=1)[0.3]
    assert sorted({e["patient_id"] for e in other}) == ["p6", "p8", "p9"]  # Random(1): p6 p8 p9 p7 ...


def test_subset_counts_are_ceil_of_fraction_times_patients() -> None:
    entries = [{"image": f"{i}.png", "patient_id": i} for i in range(30)]
    fr = (0.01, 0.1, 0.33, 0.5, 0.7, 1.0)
    sub = label_fraction_subsets(entries, fr, seed=3)
    # ceil(0.3)=1, 0.1*30 = 3 exactly (not ceil(3.0000000000000004) = 4), ceil(9.9)=10, 15, 21, 30
    assert [len(sub[f]) for f in fr] == [1, 3, 10, 15, 21, 30]
    for a, b in itertools.pairwise(fr):
        assert set(images(sub[a])) <= set(images(sub[b]))
    assert len(label_fraction_subsets(entries, (0.01,), seed=3, min_patients=5)[0.01]) == 5
    assert len(label_fraction_subsets(entries[:3], (0.01,), seed=3, min_patients=5)[0.01]) == 3  # capped at n


def test_entries_without_patient_key_are_their_own_patients() -> None:
    entries = [{"image": f"{i}.png"} for i in range(4)] + [{"image": "x.png", "patient_id": None}]
    sub = label_fraction_subsets(entries, (0.4, 1.0), seed=0)
    assert len(sub[0.4]) == 2 and len(sub[1.0]) == 5  # 5 patients, ceil(2.0) = 2
    assert label_fraction_subsets([], (0.5,), seed=0) == {0.5: []}


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_fraction_outside_unit_interval_raises(bad: float) -> None:
    with pytest.raises(ValueError, match=r"label fractions must be in \(0, 1\]"):
        label_fraction_subsets([{"image": "a.png"}], (0.1, bad))
    with pytest.raises(ValueError, match="min_patients"):
        label_fraction_subsets([{"image": "a.png"}], (0.1,), min_patients=-1)


def test_patient_split_exact_counts_and_whole_patients() -> None:
    single = [{"image": f"{i}.png", "patient_id": f"q{i}"} for i in range(20)]
    parts = patient_split(single, {"training": 0.7, "validation": 0.1, "test": 0.2}, seed=5)
    assert list(parts) == ["training", "validation", "test"]
    assert [len(p) for p in parts.values()] == [14, 2, 4]
    assert sorted(images([e for p in parts.values() for e in p])) == sorted(images(single))
    for p in parts.values():  # input order inside each section
        assert images(p) == [e["image"] for e in single if e in p]
    assert patient_split(single, {"training": 0.7, "validation": 0.1, "test": 0.2}, seed=5) == parts
    assert patient_split(single, {"training": 0.7, "validation": 0.1, "test": 0.2}, seed=6) != parts

    multi = multi_image_entries()
    parts = patient_split(multi, {"training": 0.6, "test": 0.4}, seed=0)
    check_patient_disjoint(parts)
    assert sorted(images(parts["training"] + parts["test"])) == sorted(images(multi))
    for p in parts.values():
        pats = {e["patient_id"] for e in p}
        assert images(p) == [e["image"] for e in multi if e["patient_id"] in pats]
    with pytest.raises(ValueError, match="at least one section"):
        patient_split(multi, {})


def test_check_patient_disjoint_names_patient_and_sections() -> None:
    train = [{"image": "a.png", "patient_id": "p1"}, {"image": "b.png", "patient_id": "p2"}, {"image": "c.png"}]
    val = [{"image": "d.png", "patient_id": "p3"}, {"image": "e.png"}]
    test = [{"image": "f.png", "patient_id": "p4"}, {"image": "g.png", "patient_id": "p2"}]
    check_patient_disjoint({"training": train, "validation": val})  # no key -> never shared
    with pytest.raises(DataError) as err:
        check_patient_disjoint({"training": train, "validation": val, "test": test}, where="dl.json")
    assert str(err.value) == (
        "dl.json: patient 'p2' is in both 'training' (training[1]) and 'test' (test[1]); "
        "sections must be patient-disjoint"
    )
    # ids compare as strings: 7 and "7" are the same patient
    with pytest.raises(DataError, match="patient '7' is in both 'a' \\(a\\[0\\]\\) and 'b' \\(b\\[0\\]\\)"):
        check_patient_disjoint({"a": [{"patient_id": 7}], "b": [{"patient_id": "7"}]})
    # two images of one patient in one section are fine
    check_patient_disjoint({"training": [{"patient_id": "p"}, {"patient_id": "p"}], "test": [{"patient_id": "q"}]})
