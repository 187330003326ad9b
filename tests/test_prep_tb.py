"""Tests of medspan.data_prep.tb_cxr on tiny fixtures in the Montgomery and Shenzhen layouts.

Montgomery: ``MontgomerySet/CXR_png/MCUCXR_0001_0.png``, ``ManualMask/{leftMask,rightMask}/``,
``ClinicalReadings/MCUCXR_0001_0.txt`` ("Patient's Sex: M" / "Patient's Age: 067Y" / reading).
Shenzhen: ``ChinaSet_AllFiles/CXR_png/CHNCXR_0001_0.png``, ``ClinicalReadings/`` ("male 45yrs" /
reading) and the separately released one-piece masks ``CHNCXR_0001_0_mask.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from medspan.data_prep import tb_cxr as tb
from medspan.data_prep.cxr_common import CacheSpec

H, W = 32, 24  # rows, cols of the fixture images (real: 4892 x 4020 and ~3000 x 3000)


def _pic(seed: int, bits: int = 8) -> np.ndarray:
    top = 2**bits - 1
    a = np.random.default_rng(seed).integers(0, top + 1, (H, W))
    return a.astype(np.uint8 if bits == 8 else np.uint16)


def _lung_halves() -> tuple[np.ndarray, np.ndarray]:
    """(mask on the image left, mask on the image right), 32 x 24."""
    img_left = np.zeros((H, W), bool)
    img_left[4:28, 2:10] = True
    img_right = np.zeros((H, W), bool)
    img_right[4:28, 14:22] = True
    return img_left, img_right


def _save_mask(m: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m.astype(np.uint8) * 255).save(path)


def make_montgomery(base: Path) -> Path:
    mc = base / "MontgomerySet"
    readings = {"MCUCXR_0001_0": "Patient's Sex: F\nPatient's Age: 040Y\nnormal\n",
                "MCUCXR_0002_1": "Patient's Sex: M\nPatient's Age: 067Y\nright upper lobe cavitary lesion\n",
                "MCUCXR_0003_0": "Patient's Sex: M\nPatient's Age: 051Y\nnormal\n"}
    img_left, img_right = _lung_halves()
    for k, cid in enumerate(readings):
        (mc / "CXR_png").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pic(k, bits=16 if k == 1 else 8) >> (4 if k == 1 else 0)).save(mc / "CXR_png" / f"{cid}.png")
        # leftMask = the patient's left lung = image right ... except case 3, named by the viewer's side
        left, right = (img_left, img_right) if cid == "MCUCXR_0003_0" else (img_right, img_left)
        _save_mask(left, mc / "ManualMask/leftMask" / f"{cid}.png")
        _save_mask(right, mc / "ManualMask/rightMask" / f"{cid}.png")
        (mc / "ClinicalReadings").mkdir(exist_ok=True)
        (mc / "ClinicalReadings" / f"{cid}.txt").write_text(readings[cid])
    return mc


def make_shenzhen(base: Path) -> tuple[Path, Path]:
    sz = base / "ChinaSet_AllFiles"
    masks = base / "shcxr-lung-mask" / "mask"
    readings = {"CHNCXR_0001_0": "male 45yrs\nnormal\n", "CHNCXR_0002_1": "Female 35 yrs\nnormal\n",
                "CHNCXR_0003_1": "male 8month\nSTB,ATB in left upper field\n"}
    img_left, img_right = _lung_halves()
    for k, cid in enumerate(readings):
        (sz / "CXR_png").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pic(10 + k)).save(sz / "CXR_png" / f"{cid}.png")
        (sz / "ClinicalReadings").mkdir(exist_ok=True)
        (sz / "ClinicalReadings" / f"{cid}.txt").write_text(readings[cid])
        if cid != "CHNCXR_0003_1":  # that one has no released mask
            _save_mask(img_left | img_right, masks / f"{cid}_mask.png")
    return sz, masks


def test_reading_parsers():
    r = tb.parse_montgomery_reading("Patient's Sex: M\nPatient's Age: 067Y\nbilateral upper lobe\nscarring\n")
    assert (r.sex, r.age, r.text, r.normal) == ("M", 67, "bilateral upper lobe scarring", False)
    assert tb.parse_montgomery_reading("Patient's Sex: F\r\nPatient's Age: 040Y\r\nnormal\r\n").normal
    assert tb.parse_shenzhen_reading("male 45yrs\nnormal\n") == tb.Reading("M", 45, "normal")
    assert tb.parse_shenzhen_reading("Female 35 yrs\nSTB,ATB in left upper field\n") == \
        tb.Reading("F", 35, "STB,ATB in left upper field")
    assert tb.parse_shenzhen_reading("male 8month\nnormal") == tb.Reading("M", 0, "normal")


def test_convert_both_sets_separate_lungs(tmp_path):
    make_montgomery(tmp_path / "raw")
    sz, masks = make_shenzhen(tmp_path / "raw")
    path, report = tb.convert(tmp_path / "out", CacheSpec(size=0), montgomery=tmp_path / "raw", shenzhen=sz,
                              shenzhen_masks=masks, val_fraction=0.34, test_fraction=0.34, workers=2, progress=False)
    # the one contradiction: CHNCXR_0002_1 is TB by its name, "normal" by its reading
    assert [(i, "TB=1" in r) for i, r in report.problems] == [("CHNCXR_0002_1", True)]
    assert report.counts["montgomery_leftMask_image_right"] == 2 and report.counts["montgomery_leftMask_image_left"] == 1
    assert report.counts["shenzhen_no_mask"] == 1
    doc = json.loads(path.read_text())
    assert doc["structures"] == ["left_lung", "right_lung"] and doc["classes"] == ["tuberculosis"]
    ent = {e["case_id"]: e for s in ("training", "validation", "test") for e in doc[s]}
    assert len(ent) == 6 and all(doc[s] for s in ("training", "validation", "test"))
    assert ent["MCUCXR_0002_1"]["labels"] == [1] and ent["MCUCXR_0001_0"]["labels"] == [0]
    assert (ent["MCUCXR_0002_1"]["sex"], ent["MCUCXR_0002_1"]["age"], ent["MCUCXR_0002_1"]["source"]) == ("M", 67, "montgomery")
    assert (ent["CHNCXR_0003_1"]["sex"], ent["CHNCXR_0003_1"]["age"]) == ("M", 0) and "label" not in ent["CHNCXR_0003_1"]
    img_left, img_right = _lung_halves()
    out = tmp_path / "out"
    for cid in ("MCUCXR_0001_0", "MCUCXR_0003_0", "CHNCXR_0001_0"):  # every one: left_lung on the image right
        assert ent[cid]["label"] == [f"masks/{cid}_left_lung.png", f"masks/{cid}_right_lung.png"]
        assert np.array_equal(np.asarray(Image.open(out / ent[cid]["label"][0])) > 0, img_right), cid
        assert np.array_equal(np.asarray(Image.open(out / ent[cid]["label"][1])) > 0, img_left), cid
    # source size, 8 bits: 8-bit images copied exactly; the 12-bit-in-16-bit PNG scaled by 255 / 4095
    assert np.array_equal(np.asarray(Image.open(out / "images/MCUCXR_0001_0.png")), _pic(0))
    twelve = (_pic(1, bits=16) >> 4).astype(np.float64)
    assert twelve.max() > 2047  # the fixture uses 12 bits
    assert np.array_equal(np.asarray(Image.open(out / "images/MCUCXR_0002_1.png")),
                          np.rint(twelve * 255.0 / 4095.0).astype(np.uint8))


def test_merged_resized_and_bad_input(tmp_path):
    mc = make_montgomery(tmp_path / "raw")
    Image.fromarray(_pic(5)).save(mc / "CXR_png" / "MCUCXR_0004_1.png")                  # its masks: wrong size
    _save_mask(np.ones((10, 10), bool), mc / "ManualMask/leftMask/MCUCXR_0004_1.png")
    _save_mask(np.ones((10, 10), bool), mc / "ManualMask/rightMask/MCUCXR_0004_1.png")
    (mc / "CXR_png" / "MCUCXR_0005_0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")     # corrupt image
    Image.fromarray(_pic(6)).save(mc / "CXR_png" / "MCUCXR_0001_0.PNG")                  # duplicate case id
    Image.fromarray(_pic(7)).save(mc / "CXR_png" / "scan.png")                           # unexpected name
    for side in ("leftMask", "rightMask"):                                               # masks, image missing
        _save_mask(_lung_halves()[0], mc / "ManualMask" / side / "MCUCXR_0009_1.png")
    out = tmp_path / "out"
    args = ["--montgomery", str(mc), "--out", str(out), "--size", "8", "--lungs", "merged", "--quiet"]
    assert tb.main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    reasons = {Path(p["item"]).name: p["reason"] for p in rep["problems"]}
    assert set(reasons) == {"MCUCXR_0004_1.png", "MCUCXR_0005_0.png", "MCUCXR_0001_0.PNG", "scan.png",
                            "MCUCXR_0009_1"}, reasons
    assert "masks without an image" in reasons["MCUCXR_0009_1"]
    assert "mask is 10 x 10 but its image" in reasons["MCUCXR_0004_1.png"]
    assert "cannot read image" in reasons["MCUCXR_0005_0.png"]
    assert "repeats" in reasons["MCUCXR_0001_0.PNG"] and "unexpected file name" in reasons["scan.png"]
    doc = json.loads((out / "datalist.json").read_text())
    ent = {e["case_id"]: e for s in ("training", "validation", "test") for e in doc[s]}
    assert sorted(ent) == ["MCUCXR_0001_0", "MCUCXR_0002_1", "MCUCXR_0003_0"] and doc["structures"] == ["lungs"]
    assert not (out / "images/MCUCXR_0004_1.png").exists()  # nothing half-written for a failed case
    assert np.array_equal(np.asarray(Image.open(out / "images/MCUCXR_0001_0.png")),  # the .png, not the .PNG
                          np.rint(_pic(0).astype(np.float64).reshape(8, 4, 8, 3).mean(axis=(1, 3))).astype(np.uint8))
    # 32 x 24 -> 8 x 8 (square): 4 x 3 blocks, inside when at least half covered
    img_left, img_right = _lung_halves()
    lungs = np.asarray(Image.open(out / "masks/MCUCXR_0001_0_lungs.png")) > 0
    assert np.array_equal(lungs, (img_left | img_right).reshape(8, 4, 8, 3).mean(axis=(1, 3)) >= 0.5)
    files = sorted(out.glob("*/*.png"))
    before = {p: p.stat().st_mtime_ns for p in files}
    assert tb.main(args + ["--strict"]) == 1
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert json.loads((out / "report.json").read_text())["counts"]["skipped_existing"] == 3
    assert tb.main(args[:-3] + ["--lungs", "separate"]) == 2  # other settings in the same folder
