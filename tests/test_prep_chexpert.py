"""Tests of medspan.data_prep.chexpert on a tiny fixture in CheXpert-v1.0-small's exact layout.

train.csv / valid.csv have the real header (Path, Sex, Age, Frontal/Lateral, AP/PA, the 14
observations) and real value spellings (1.0, 0.0, -1.0, blank); Path starts with the dataset
folder's name, images are JPEGs under train/patientNNNNN/studyN/viewN_frontal.jpg.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medspan.data_prep import chexpert as cx
from medspan.data_prep.cxr_common import CacheSpec
from medspan.data.datalist import load_datalist

HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
          "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
          "Fracture,Support Devices")
# observation order: NoF EnlC Card LOp LLe Edem Cons Pneu Atel Ptx PlEf PlOt Frac SupD
V1 = ["", "", "-1.0", "1.0", "", "0.0", "-1.0", "", "1.0", "0.0", "-1.0", "", "", "1.0"]
V2 = ["1.0", "", "", "", "", "", "", "", "", "0.0", "", "", "", ""]
V3 = ["", "", "1.0", "", "", "-1.0", "", "-1.0", "", "", "1.0", "", "", ""]


def test_value_policies_exact():
    assert cx.map_value(1, "zeros") == (1, 1) and cx.map_value(0, "ones") == (0, 1)
    assert [cx.map_value(-1, p) for p in cx.POLICIES] == [(1, 1), (0, 1), (0, 0)]
    assert cx.map_value(None, "ones") == (0, 1) and cx.map_value(None, "ones", blank="ignore") == (0, 0)
    vals = tuple({"": None, "1.0": 1, "0.0": 0, "-1.0": -1}[v] for v in V1)
    labels, mask = cx.label_vector(vals, cx.OBSERVATIONS, "ones", "ignore")
    # Cardiomegaly (-1, competition) -> 1; Consolidation (-1, comp.) -> 1; Pleural Effusion (-1, comp.) -> 1
    assert labels == [0, 0, 1, 1, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1]
    assert mask == [1] * 14
    labels, mask = cx.label_vector(vals, cx.COMPETITION, "zeros", per_class={"Consolidation": "ignore"})
    # Atelectasis 1, Cardiomegaly -1 -> 0, Consolidation -1 -> ignored, Edema 0, Pleural Effusion -1 -> 0
    assert (labels, mask) == ([1, 0, 0, 0, 0], [1, 1, 0, 1, 1])
    with pytest.raises(ValueError):
        cx.map_value(2, "ones")


# ------------------------------------------------------------------------------- fixture

TRAIN = [  # (patient, study, view file, Frontal/Lateral, AP/PA, values)
    ("patient00001", "study1", "view1_frontal", "Frontal", "AP", V1),
    ("patient00001", "study1", "view2_lateral", "Lateral", "", V1),
    ("patient00002", "study1", "view1_frontal", "Frontal", "PA", V2),
    ("patient00002", "study2", "view1_frontal", "Frontal", "PA", V3),
    ("patient00003", "study1", "view1_frontal", "Frontal", "AP", V2),
    ("patient00004", "study1", "view1_frontal", "Frontal", "AP", V3),
]
VALID = [("patient64541", "study1", "view1_frontal", "Frontal", "AP", ["0.0"] * 13 + ["1.0"])]


def _pic(seed: int, shape=(20, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def _write(folder: Path, split: str, rows, start_seed: int = 0) -> list[str]:
    lines = [HEADER]
    for k, (pat, study, view, fl, appa, vals) in enumerate(rows):
        rel = f"{folder.name}/{split}/{pat}/{study}/{view}.jpg"
        img = folder.parent / rel
        img.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pic(start_seed + k)).save(img, quality=95)
        lines.append(",".join([rel, "Female" if k % 2 else "Male", str(60 + k), fl, appa] + list(vals)))
    (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return lines


def make_chexpert(parent: Path) -> Path:
    folder = parent / "CheXpert-v1.0-small"
    folder.mkdir(parents=True)
    _write(folder, "train", TRAIN)
    _write(folder, "valid", VALID, start_seed=100)
    return folder


def _all(doc: dict) -> dict[str, dict]:
    return {e["case_id"]: e for s in ("training", "validation", "test") for e in doc.get(s, [])}


def test_convert_fixture_policies_views_sections(tmp_path):
    folder = make_chexpert(tmp_path / "data")
    path, report = cx.convert(tmp_path / "data", tmp_path / "out", CacheSpec(size=8, fit="longest"),
                              uncertain="ones", uncertain_other="ignore", val_fraction=0.3, progress=False)
    assert report.problems == []
    doc = json.loads(path.read_text())
    assert doc["classes"] == list(cx.OBSERVATIONS)
    ent = _all(doc)
    assert sorted(ent) == ["patient00001_study1_view1_frontal", "patient00002_study1_view1_frontal",
                           "patient00002_study2_view1_frontal", "patient00003_study1_view1_frontal",
                           "patient00004_study1_view1_frontal", "patient64541_study1_view1_frontal"]  # no lateral
    assert [e["case_id"] for e in doc["test"]] == ["patient64541_study1_view1_frontal"]
    tr, va = doc["training"], doc["validation"]
    assert va and not {e["patient_id"] for e in tr} & {e["patient_id"] for e in va}
    e1 = ent["patient00001_study1_view1_frontal"]
    # uncertain: competition (Cardiomegaly, Consolidation, Pleural Effusion) -> 1; Support Devices 1
    assert e1["labels"] == [0, 0, 1, 1, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1]
    assert e1["label_mask"] == [1] * 14
    e3 = ent["patient00002_study2_view1_frontal"]  # V3: Edema -1 (competition) -> 1, Pneumonia -1 (other) -> ignored
    assert e3["labels"] == [0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0]
    assert e3["label_mask"] == [1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1]
    assert (e1["patient_id"], e1["study"], e1["view"], e1["projection"], e1["sex"], e1["age"]) == \
        ("patient00001", "study1", "Frontal", "AP", "Male", 60)
    # cache: rows 20, cols 16, longest side -> 8: (8, 6); area means of the decoded JPEG
    src = np.asarray(Image.open(folder.parent / "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"))
    from medspan.data_prep.cxr_common import area_resize

    got = np.asarray(Image.open(tmp_path / "out" / "images" / "patient00001_study1_view1_frontal.png"))
    assert got.shape == (8, 6)
    assert np.array_equal(got, np.rint(area_resize(src.astype(np.float64), 8, 6)).astype(np.uint8))
    assert len(load_datalist(path, "validation", require=("image", "labels", "label_mask"))) == len(va)


def test_competition_classes_lateral_test_csv(tmp_path):
    folder = make_chexpert(tmp_path)
    test_lines = [HEADER, "test/patient64741/study1/view1_lateral.jpg,Male,50,Lateral,," + ",".join(["0.0"] * 7 + ["1.0"] + ["0.0"] * 6)]
    (folder / "test" / "patient64741" / "study1").mkdir(parents=True)
    Image.fromarray(_pic(7)).save(folder / "test/patient64741/study1/view1_lateral.jpg")
    (folder / "test_labels.csv").write_text("\n".join(test_lines) + "\n")
    path, report = cx.convert(folder, tmp_path / "out", CacheSpec(size=4), views="lateral", classes="competition",
                              uncertain="zeros", test_csv=folder / "test_labels.csv", progress=False)
    assert report.problems == []
    doc = json.loads(path.read_text())
    assert doc["classes"] == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    assert [e["case_id"] for e in doc["training"]] == ["patient00001_study1_view2_lateral"]
    assert doc["training"][0]["labels"] == [1, 0, 0, 0, 0]  # Atelectasis 1; -1s -> 0
    assert "label_mask" not in doc["training"][0]
    assert doc["validation"] == [] and [e["case_id"] for e in doc["test"]] == ["patient64741_study1_view1_lateral"]
    assert doc["test"][0]["labels"] == [0, 0, 0, 0, 0]  # the 1.0 there is Pneumonia, not a competition finding


def test_bad_rows_reported_strict_and_rerun(tmp_path):
    folder = make_chexpert(tmp_path)
    lines = (folder / "train.csv").read_text().splitlines()
    lines.append(lines[3])                                                           # duplicate Path
    lines.append(lines[1].replace("patient00001", "patient00009"))                   # image missing
    lines.append(lines[5].replace("patient00003", "patient00010").replace(",1.0,", ",2.0,", 1))  # bad value
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    (folder / "train/patient00004/study1/view1_frontal.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    out = tmp_path / "out"
    args = ["--root", str(folder), "--out", str(out), "--size", "4", "--quiet", "--views", "all"]
    assert cx.main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    reasons = {p["item"]: p["reason"] for p in rep["problems"]}
    assert len(reasons) == 4, reasons
    assert "duplicate image" in reasons["train.csv row 7"] and "first in row 3" in reasons["train.csv row 7"]
    assert "image not found" in reasons["CheXpert-v1.0-small/train/patient00009/study1/view1_frontal.jpg"]
    assert "'2.0'" in reasons["train.csv row 9"]
    assert any("cannot read image" in r for i, r in reasons.items() if "patient00004" in i)
    ent = _all(json.loads((out / "datalist.json").read_text()))
    assert len(ent) == 6 and "patient00004_study1_view1_frontal" not in ent
    files = sorted((out / "images").glob("*.png"))
    before = {p: p.stat().st_mtime_ns for p in files}
    assert cx.main(args + ["--strict"]) == 1
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert json.loads((out / "report.json").read_text())["counts"]["skipped_existing"] == 6
    assert cx.main(["--root", str(tmp_path / "nothing"), "--out", str(out)]) == 2
