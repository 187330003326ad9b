"""Tests of data_prep.nih_cxr14 on a tiny fixture in NIH's exact layout and on the real subset.

The fixture has the real file names and CSV headers (the bracketed columns that span two cells,
the BBox header with its three empty cells, the Kaggle ``images_00N/images/`` folders).
The real-data test rebuilds NIH's layout from ``../shared/data/real/nih_cxr14_subset`` (its
labels.csv holds the Data_Entry_2017_v2020 rows of those images) and checks the parsed labels of
a few rows against vectors written out by hand.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medspan.data_prep import nih_cxr14 as nih
from medspan.data_prep.cxr_common import CacheSpec
from medspan.data.datalist import load_datalist

REAL = Path(__file__).resolve().parents[2] / "shared/data/real" / "nih_cxr14_subset"
needs_real = pytest.mark.skipif(not (REAL / "labels.csv").is_file(), reason=f"{REAL} not present")

V2020_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
#  A  C  E  I  M  N  Pn Px Co Ed Em F  PT H  NoF
Z = [0] * 15


def vec(*names: str) -> list[int]:
    return [int(c in names) for c in nih.CLASSES]


# ------------------------------------------------------------------------------- parsing


def test_parse_findings_multi_hot_and_errors():
    assert list(nih.parse_findings("Cardiomegaly|Emphysema")) == [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert list(nih.parse_findings("No Finding")) == [0] * 14 + [1]
    assert list(nih.parse_findings("Pleural_Thickening|Hernia")) == [0] * 12 + [1, 1, 0]
    for bad in ("Pleural Thickening", "Effusion|", "No Finding|Mass", ""):
        with pytest.raises(ValueError):
            nih.parse_findings(bad)
    assert [nih.parse_age(a) for a in ("58", "058Y", "006M", "x", "")] == [58, 58, 0, None, None]


def test_read_data_entry_both_header_styles(tmp_path):
    rows_2017 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                 "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
                 "00000001_000.png,Cardiomegaly,0,1,058Y,M,PA,2682,2749,0.143,0.143,\n")
    (tmp_path / "a.csv").write_text(rows_2017)
    (tmp_path / "b.csv").write_text(V2020_HEADER + "\n00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.139\n")
    for name, age, spacing in (("a.csv", 58, (0.143, 0.143)), ("b.csv", 57, (0.143, 0.139))):
        (r,) = nih.read_data_entry(tmp_path / name)
        assert (r.image_index, r.patient_id, r.age, r.sex, r.view) == ("00000001_000.png", "1", age, "M", "PA")
        assert r.original_size == (2682, 2749) and r.spacing == spacing and r.labels == tuple(vec("Cardiomegaly"))


# ------------------------------------------------------------------------------- a fixture in NIH's layout

# (image index, finding labels, patient id, view); images 16 x 16
ROWS = [
    ("00000001_000.png", "Cardiomegaly", "1", "PA"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", "1", "PA"),
    ("00000002_000.png", "No Finding", "2", "AP"),
    ("00000003_000.png", "Hernia", "3", "PA"),
    ("00000003_001.png", "Hernia|Infiltration", "3", "PA"),
    ("00000004_000.png", "Effusion|Mass|Nodule", "4", "PA"),
    ("00000005_000.png", "No Finding", "5", "PA"),
    ("00000006_000.png", "Atelectasis", "6", "AP"),
]
TEST = ["00000004_000.png", "00000006_000.png"]


def _picture(i: int) -> np.ndarray:
    return ((np.arange(256).reshape(16, 16) * (i + 1)) % 256).astype(np.uint8)


def _write_entry_csv(path: Path, rows: list[tuple[str, str, str, str]]) -> None:
    lines = [V2020_HEADER] + [f"{n},{f},0,{p},{40 + k},F,{v},1024,1024,0.143,0.143" for k, (n, f, p, v) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")


def make_nih(root: Path) -> Path:
    root.mkdir(parents=True)
    _write_entry_csv(root / "Data_Entry_2017_v2020.csv", ROWS)
    for k, (name, *_rest) in enumerate(ROWS):
        folder = root / ("images_001" if k < 4 else "images_002") / "images"
        folder.mkdir(parents=True, exist_ok=True)
        pic = _picture(k)
        if k == 3:  # an RGBA file, grey replicated, as a few NIH images are
            Image.fromarray(np.dstack([pic, pic, pic, np.full_like(pic, 255)])).save(folder / name)
        else:
            Image.fromarray(pic).save(folder / name)
    (root / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00000001_000.png,Cardiomegaly,2.0,4.0,8.0,6.0,,,\n"
        "00000003_001.png,Infiltrate,0.5,1.5,3.0,2.0,,,\n"
        "00000003_001.png,Hernia,4,4,4,4,,,\n"
    )
    (root / "train_val_list.txt").write_text("\n".join(n for n, *_ in ROWS if n not in TEST) + "\n")
    (root / "test_list.txt").write_text("\n".join(TEST) + "\n")
    return root


def test_convert_fixture_exact(tmp_path):
    root = make_nih(tmp_path / "NIH")
    path, report = nih.convert(root, tmp_path / "out", CacheSpec(size=8), val_fraction=0.25, workers=2, progress=False)
    assert report.problems == []
    doc = json.loads(path.read_text())
    assert doc["classes"] == list(nih.CLASSES)
    assert sorted(e["image_index"] for e in doc["test"]) == TEST
    train, val = doc["training"], doc["validation"]
    assert len(train) + len(val) == 6 and val
    assert not {e["patient_id"] for e in train} & {e["patient_id"] for e in val}  # patient-wise
    by_id = {e["case_id"]: e for s in ("training", "validation", "test") for e in doc[s]}
    assert by_id["00000001_001"]["labels"] == vec("Cardiomegaly", "Emphysema")
    assert by_id["00000002_000"]["labels"] == vec("No Finding")
    assert by_id["00000004_000"]["labels"] == [0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert (by_id["00000002_000"]["view"], by_id["00000002_000"]["age"], by_id["00000002_000"]["patient_id"]) == ("AP", 42, "2")
    # boxes: x, y, w, h in 16-px pixels -> corners, halved for the 8-px cache; Infiltrate -> Infiltration
    assert by_id["00000001_000"]["boxes"] == [[1.0, 2.0, 5.0, 5.0]]
    assert by_id["00000001_000"]["box_labels"] == ["Cardiomegaly"]
    assert by_id["00000003_001"]["boxes"] == [[0.25, 0.75, 1.75, 1.75], [2.0, 2.0, 4.0, 4.0]]
    assert by_id["00000003_001"]["box_labels"] == ["Infiltration", "Hernia"]
    assert "boxes" not in by_id["00000002_000"]
    # the cache: 2 x 2 block means, rounded (the RGBA file as its grey channel)
    for k, (name, *_r) in enumerate(ROWS):
        got = np.asarray(Image.open(tmp_path / "out" / "images" / name))
        expected = np.rint(_picture(k).astype(np.float64).reshape(8, 2, 8, 2).mean(axis=(1, 3))).astype(np.uint8)
        assert got.dtype == np.uint8 and np.array_equal(got, expected), name
    # the datalist loads with MONAI-style validation
    assert len(load_datalist(path, "test", require=("image", "labels"))) == 2


def test_bad_input_reported_rest_converted_strict_and_rerun(tmp_path):
    root = make_nih(tmp_path / "NIH")
    rows = ROWS + [
        ("00000001_000.png", "Mass", "1", "PA"),          # duplicate Image Index
        ("00000007_000.png", "Effusion", "7", "PA"),      # image missing
        ("00000008_000.png", "Pneumonitis", "8", "PA"),   # unknown finding
    ]
    _write_entry_csv(root / "Data_Entry_2017_v2020.csv", rows)
    (root / "images_002" / "images" / "00000005_000.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # corrupt
    out = tmp_path / "out"
    args = ["--root", str(root), "--out", str(out), "--size", "8", "--quiet"]
    assert nih.main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    reasons = {p["item"]: p["reason"] for p in rep["problems"]}
    assert len(reasons) == 4
    assert "duplicate Image Index 00000001_000.png (first in row 1)" in reasons["Data_Entry_2017_v2020.csv row 9"]
    assert "image file not found" in reasons["00000007_000.png"]
    assert "Pneumonitis" in reasons["Data_Entry_2017_v2020.csv row 11"]
    corrupt = [r for i, r in reasons.items() if i.endswith("00000005_000.png")]
    assert corrupt and "cannot read image" in corrupt[0]
    doc = json.loads((out / "datalist.json").read_text())
    ids = sorted(e["case_id"] for s in ("training", "validation", "test") for e in doc.get(s, []))
    assert ids == sorted(Path(n).stem for n, *_ in ROWS if n != "00000005_000.png")
    assert rep["counts"]["images_written"] == 7
    # the first row of the duplicate wins
    assert next(e for s in ("training", "validation", "test") for e in doc.get(s, [])
                if e["case_id"] == "00000001_000")["labels"] == vec("Cardiomegaly")

    cached = sorted((out / "images").glob("*.png"))
    before = {p: p.stat().st_mtime_ns for p in cached}
    assert nih.main(args + ["--strict"]) == 1  # same problems, now strict
    assert {p: p.stat().st_mtime_ns for p in cached} == before  # nothing rewritten
    assert json.loads((out / "report.json").read_text())["counts"]["skipped_existing"] == 7
    assert not list((out / "images").glob(".*"))  # no temporary files left


def test_views_no_boxes_other_settings_refused(tmp_path, capsys):
    from medspan.data_prep.cli import (
        CONVERTERS,  # `medspan prepare nih-cxr14` (run end to end in test_prep_vindr.py)
    )

    assert CONVERTERS["nih-cxr14"][0] == ".nih_cxr14"
    root = make_nih(tmp_path / "NIH")
    out = tmp_path / "out"
    assert nih.main(["--root", str(root), "--out", str(out), "--size", "4", "--quiet", "--no-boxes",
                     "--views", "AP"]) == 0
    doc = json.loads((out / "datalist.json").read_text())
    entries = [e for s in ("training", "validation", "test") for e in doc.get(s, [])]
    assert sorted(e["case_id"] for e in entries) == ["00000002_000", "00000006_000"]
    assert all("boxes" not in e for e in entries)
    assert np.asarray(Image.open(out / "images" / "00000002_000.png")).shape == (4, 4)
    assert nih.main(["--root", str(root), "--out", str(out), "--size", "8", "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_no_cache_points_at_sources(tmp_path):
    root = make_nih(tmp_path / "NIH")
    path, report = nih.convert(root, tmp_path / "out", CacheSpec(cache=False), val_fraction=0, progress=False)
    assert report.problems == [] and not (tmp_path / "out" / "images").exists()
    train = load_datalist(path, "training")
    e = next(x for x in train if x["case_id"] == "00000001_000")
    assert Path(e["image"]) == (root / "images_001" / "images" / "00000001_000.png").resolve()
    assert e["boxes"] == [[2.0, 4.0, 10.0, 10.0]]  # source pixels


# ------------------------------------------------------------------------------- the real subset


@needs_real
@pytest.mark.real_data
def test_real_subset_labels_parsed_exactly(tmp_path):
    with open(REAL / "labels.csv", newline="") as f:
        lab = [r for r in csv.DictReader(f) if r["subset"] == "thumbs64"]
    assert len(lab) == 1000
    root = tmp_path / "NIH"
    (root / "images").mkdir(parents=True)
    lines = [V2020_HEADER]
    for r in lab:
        lines.append(f"{r['image_index']},{r['finding_labels']},{r['follow_up']},{r['patient_id']},{r['patient_age']},"
                     f"{r['patient_sex']},{r['view']},1024,1024,0.143,0.143")
        os.symlink(REAL / r["path"], root / "images" / r["image_index"])
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    (root / "test_list.txt").write_text("\n".join(r["image_index"] for r in lab if r["split"] == "test") + "\n")
    (root / "train_val_list.txt").write_text("\n".join(r["image_index"] for r in lab if r["split"] != "test") + "\n")

    path, report = nih.convert(root, tmp_path / "out", CacheSpec(size=32), progress=False)
    assert report.problems == []
    doc = json.loads(path.read_text())
    assert len(doc["test"]) == 200 and len(doc["training"]) + len(doc["validation"]) == 800
    assert not {e["patient_id"] for e in doc["training"]} & {e["patient_id"] for e in doc["validation"]}
    by_id = {e["image_index"]: e for s in ("training", "validation", "test") for e in doc[s]}
    # hand-written from the CSV text:  A  C  E  I  M  N Pn Px Co Ed Em  F PT  H NoF
    expected = {
        "00000176_002.png": [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],  # Atelectasis|Cardiomegaly|Fibrosis
        "00000181_011.png": [1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],  # Atelectasis|Infiltration|Pleural_Thickening
        "00000181_013.png": [0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],  # Consolidation|Infiltration|Mass
        "00000180_000.png": [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],  # Effusion|Pleural_Thickening
        "00000003_003.png": [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],  # Hernia|Infiltration
        "00000001_001.png": [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],  # Cardiomegaly|Emphysema
        "00000231_013.png": [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],  # No Finding
    }
    for name, v in expected.items():
        assert by_id[name]["labels"] == v, name
    assert (by_id["00000003_003.png"]["patient_id"], by_id["00000003_003.png"]["age"], by_id["00000003_003.png"]["sex"]) \
        == ("3", 76, "F")
    assert by_id["00000176_002.png"] in doc["test"] and by_id["00000001_001.png"] not in doc["test"]
    # the RGB thumbnails (grey replicated) become their grey channel, 2 x 2 block means
    src = np.asarray(Image.open(REAL / "thumbs64/test/1_abnormal/00000176_002.png"))[..., 0].astype(np.float64)
    got = np.asarray(Image.open(tmp_path / "out" / "images" / "00000176_002.png"))
    assert np.array_equal(got, np.rint(src.reshape(32, 2, 32, 2).mean(axis=(1, 3))).astype(np.uint8))
    # 14 findings + No Finding: exactly one of "some finding" / "No Finding" per image
    assert all((sum(e["labels"][:14]) > 0) != (e["labels"][14] == 1) for e in by_id.values())
