"""Tests of medspan.data_prep.vindr_cxr on DICOMs written with pydicom in the VinDr-CXR release layout.

``train/<image_id>.dicom``, ``test/<image_id>.dicom``, ``annotations/image_labels_{train,test}.csv``
(image_id, rad_ID, the 28 labels), ``annotations/annotations_{train,test}.csv`` (image_id, rad_id,
class_name, x_min, y_min, x_max, y_max). The DICOMs cover MONOCHROME1, a VOI window, JPEG-LS and
JPEG 2000 lossless and a VOI LUT Sequence; the cache must hold exactly the values the DICOM rules give.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    generate_uid,
)

from medspan.data_prep import vindr_cxr as vd
from medspan.data_prep.cxr_common import CacheSpec
from medspan.cli import main as medspan_main

CLASSES = [
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor", "Pneumonia", "Tuberculosis",
    "Other disease", "No finding",
]
ROWS, COLS = 48, 40
DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def pixels(seed: int, bits: int) -> np.ndarray:
    a = np.random.default_rng(seed).integers(0, 2**bits, (ROWS, COLS))
    a[0, 0], a[-1, -1] = 0, 2**bits - 1
    return a.astype(np.uint16 if bits > 8 else np.uint8)


# a VOI LUT Sequence: 8 entries from input 100, 8-bit output; inputs below 100 -> first, above 107 -> last entry
LUT_DATA = [0, 36, 73, 109, 146, 182, 219, 255]
LUT_PIXELS = (96 + np.arange(ROWS * COLS) % 16).reshape(ROWS, COLS).astype(np.uint16)  # 96..111


def write_dicom(path: Path, px: np.ndarray, *, bits: int, photometric: str, window=None, syntax=None,
                voi_lut: bool = False) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = DX, meta.MediaStorageSOPInstanceUID, "DX"
    ds.set_pixel_data(px, photometric_interpretation=photometric, bits_stored=bits)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = str(window[0]), str(window[1])
    if voi_lut:
        from pydicom.dataset import Dataset

        item = Dataset()
        item.add_new(0x00283002, "US", [len(LUT_DATA), 100, 8])  # LUT Descriptor
        item.add_new(0x00283006, "US", LUT_DATA)                  # LUT Data
        ds.VOILUTSequence = [item]
    if syntax is not None:
        ds.compress(syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def linear_window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 LINEAR to [0, 1], written out independently of the reader."""
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)


# image id -> (seed, bits, photometric, window, transfer syntax, expected [0, 1] picture as float32)
def cases() -> dict[str, tuple]:
    a, b, c, d = pixels(1, 12), pixels(2, 12), pixels(3, 16), pixels(4, 12)
    return {
        "0a1": (a, 12, "MONOCHROME1", None, None, 1.0 - a / 4095.0),                       # full range, inverted
        "0b2": (b, 12, "MONOCHROME2", (2048, 1024), None, linear_window(b.astype(float), 2048, 1024)),
        "0c3": (c, 16, "MONOCHROME1", (30000, 20000), JPEGLSLossless, 1.0 - linear_window(c.astype(float), 30000, 20000)),
        "0d4": (d, 12, "MONOCHROME2", None, JPEG2000Lossless, d / 4095.0),
    }


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(str(c) for c in r) for r in [header] + rows) + "\n")


def onehot(*names: str) -> list[int]:
    return [int(c in names) for c in CLASSES]


def make_vindr(root: Path) -> Path:
    for image_id, (px, bits, phot, win, syntax, _e) in cases().items():
        write_dicom(root / "train" / f"{image_id}.dicom", px, bits=bits, photometric=phot, window=win, syntax=syntax)
    write_dicom(root / "test" / "1t1.dicom", pixels(5, 8), bits=8, photometric="MONOCHROME2")
    write_dicom(root / "test" / "1g7.dicom", LUT_PIXELS, bits=12, photometric="MONOCHROME2", voi_lut=True)
    labels = []
    for image_id in cases():
        labels += [[image_id, "R8"] + onehot("No finding"), [image_id, "R9"] + onehot("No finding"),
                   [image_id, "R10"] + onehot("No finding")]
    labels[0:3] = [["0a1", "R8"] + onehot("Cardiomegaly", "Aortic enlargement"),
                   ["0a1", "R9"] + onehot("Cardiomegaly"),
                   ["0a1", "R10"] + onehot("Pleural effusion")]
    write_csv(root / "annotations/image_labels_train.csv", ["image_id", "rad_ID"] + CLASSES, labels)
    write_csv(root / "annotations/image_labels_test.csv", ["image_id"] + CLASSES,
              [["1t1"] + onehot("Nodule/Mass"), ["1g7"] + onehot("No finding")])
    write_csv(root / "annotations/annotations_train.csv",
              ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"],
              [["0a1", "R8", "Cardiomegaly", 10.0, 20.0, 30.0, 40.0],
               ["0a1", "R8", "Aortic enlargement", 16, 4, 24, 12],
               ["0a1", "R9", "Cardiomegaly", 12, 22, 28, 44],
               ["0a1", "R10", "Pleural effusion", 0, 30, 8, 48],
               ["0b2", "R8", "No finding", "", "", "", ""]])
    write_csv(root / "annotations/annotations_test.csv",
              ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"],
              [["1t1", "Nodule/Mass", 4, 8, 12, 16]])
    return root


def test_cxr_converters_registered():
    from medspan.data_prep.cli import CONVERTERS

    assert {k: CONVERTERS[k][0] for k in ("nih-cxr14", "chexpert", "jsrt-scr", "tb-cxr", "vindr-cxr")} == {
        "nih-cxr14": ".nih_cxr14", "chexpert": ".chexpert", "jsrt-scr": ".jsrt_scr",
        "tb-cxr": ".tb_cxr", "vindr-cxr": ".vindr_cxr"}


def test_combine_votes():
    rows = [("R1", [1, 0, 1]), ("R2", [1, 0, 0]), ("R3", [0, 0, 0])]
    assert vd.combine_votes(rows) == ([1, 0, 0], [2, 0, 1])
    assert vd.combine_votes(rows, "any")[0] == [1, 0, 1] and vd.combine_votes(rows, "all")[0] == [0, 0, 0]
    assert vd.combine_votes([("consensus", [0, 1])])[0] == [0, 1]


def test_dicom_cache_exact_values_labels_boxes(tmp_path):
    root = make_vindr(tmp_path / "vindr-cxr" / "1.0.0")
    assert pydicom.dcmread(root / "train/0c3.dicom").file_meta.TransferSyntaxUID == JPEGLSLossless
    assert pydicom.dcmread(root / "train/0d4.dicom").file_meta.TransferSyntaxUID == JPEG2000Lossless
    out = tmp_path / "out16"
    path, report = vd.convert(root, out, CacheSpec(size=0, bits=16), val_fraction=0.25, workers=2, progress=False)
    assert report.problems == []
    for image_id, (*_x, expected) in cases().items():
        got = np.asarray(Image.open(out / "images" / f"{image_id}.png"))
        # the reader hands float32 values; the cache is rint(v * 65535) of those
        want = np.rint(np.asarray(expected, np.float32).astype(np.float64) * 65535).astype(np.uint16)
        assert got.dtype == np.uint16 and got.shape == (ROWS, COLS) and np.array_equal(got, want), image_id
    a = cases()["0a1"][0]
    got = np.asarray(Image.open(out / "images/0a1.png"))
    assert got[0, 0] == 65535 and got[-1, -1] == 0  # MONOCHROME1: stored 0 is white
    doc = json.loads(path.read_text())
    assert doc["classes"] == CLASSES
    ent = {e["case_id"]: e for s in ("training", "validation", "test") for e in doc[s]}
    assert [e["case_id"] for e in doc["test"]] == ["1g7", "1t1"] and len(doc["validation"]) == 1
    e = ent["0a1"]
    assert e["labels"] == onehot("Cardiomegaly") and e["n_readers"] == 3  # 2 of 3 readers; the others 1 of 3
    assert e["label_votes"][CLASSES.index("Aortic enlargement")] == 1 and e["label_votes"][3] == 2
    assert e["boxes"] == [[10.0, 20.0, 30.0, 40.0], [16.0, 4.0, 24.0, 12.0], [12.0, 22.0, 28.0, 44.0], [0.0, 30.0, 8.0, 48.0]]
    assert e["box_labels"] == ["Cardiomegaly", "Aortic enlargement", "Cardiomegaly", "Pleural effusion"]
    assert e["box_readers"] == ["R8", "R8", "R9", "R10"]
    assert "boxes" not in ent["0b2"] and ent["0b2"]["labels"] == onehot("No finding")
    assert ent["1t1"]["labels"] == onehot("Nodule/Mass") and ent["1t1"]["box_readers"] == [""]
    # 8-bit MONOCHROME2 test image: full range /255 -> 16 bits is v * 257
    assert np.array_equal(np.asarray(Image.open(out / "images/1t1.png")), pixels(5, 8).astype(np.uint16) * 257)
    # the VOI LUT Sequence, by hand: 96..99 -> 0, 100..107 -> LUT_DATA, 108..111 -> 255; then / 255 * 65535
    by_value = {v: (0 if v < 100 else 255 if v > 107 else LUT_DATA[v - 100]) * 257 for v in range(96, 112)}
    want = np.vectorize(by_value.get)(LUT_PIXELS).astype(np.uint16)
    assert np.array_equal(np.asarray(Image.open(out / "images/1g7.png")), want)
    # halved, 8-bit, min-max intensity: block means of (v - min) / (max - min); boxes halved
    out2 = tmp_path / "out8"
    path2, _ = vd.convert(root, out2, CacheSpec(size=24, fit="longest"), intensity="minmax", progress=False)
    got = np.asarray(Image.open(out2 / "images/0a1.png"))
    inv = (4095.0 - a).astype(np.float32).astype(np.float64)  # MONOCHROME1 inverted over 0..4095, min 0, max 4095
    assert got.shape == (24, 20)
    assert np.array_equal(got, np.rint(inv.reshape(24, 2, 20, 2).mean(axis=(1, 3)) * 255 / 4095).astype(np.uint8))
    ent2 = {e["case_id"]: e for s in ("training", "validation", "test") for e in json.loads(path2.read_text())[s]}
    assert ent2["0a1"]["boxes"][0] == [5.0, 10.0, 15.0, 20.0]
    # an explicit window replaces the file's
    out3 = tmp_path / "outw"
    vd.convert(root, out3, CacheSpec(size=0), window=(1000, 2001), progress=False)
    b = cases()["0b2"][0].astype(np.float64)
    assert np.array_equal(np.asarray(Image.open(out3 / "images/0b2.png")),
                          np.rint(linear_window(b, 1000, 2001).astype(np.float32).astype(np.float64) * 255).astype(np.uint8))


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the corrupt file
def test_bad_input_reported_strict_rerun(tmp_path):
    root = make_vindr(tmp_path / "vindr")
    (root / "train" / "0e5.dicom").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")      # corrupt
    ann = root / "annotations" / "image_labels_train.csv"
    lines = ann.read_text().splitlines()
    lines += [",".join(["0e5", "R8"] + ["0"] * 28), ",".join(["0zz", "R8"] + ["0"] * 28),        # missing image
              lines[1]]                                                                          # repeated row
    ann.write_text("\n".join(lines) + "\n")
    write_dicom(root / "train" / "0f6.dicom", pixels(6, 8), bits=8, photometric="MONOCHROME2")   # no labels
    write_dicom(root / "test" / "0d4.dicom", pixels(7, 8), bits=8, photometric="MONOCHROME2")    # id in both
    (root / "annotations" / "image_labels_test.csv").write_text(
        (root / "annotations" / "image_labels_test.csv").read_text() + ",".join(["0d4"] + ["0"] * 28) + "\n")
    out = tmp_path / "out"
    args = ["--root", str(root), "--out", str(out), "--size", "24", "--quiet"]
    assert medspan_main(["prepare", "vindr-cxr"] + args) == 0  # through the `medspan prepare` dispatcher
    rep = json.loads((out / "report.json").read_text())
    reasons = {Path(p["item"]).name if "/" in p["item"] else p["item"]: p["reason"] for p in rep["problems"]}
    assert set(reasons) == {"0e5.dicom", "image_labels_train.csv: 0zz", "image_labels_train.csv row 15",
                            "0f6.dicom", "0d4.dicom"}, reasons
    assert "DICOM" in reasons["0e5.dicom"] or "corrupt" in reasons["0e5.dicom"]
    assert "not found" in reasons["image_labels_train.csv: 0zz"]
    assert "repeated labels of image 0a1 by R8" in reasons["image_labels_train.csv row 15"]
    assert "no rows in image_labels_train.csv" in reasons["0f6.dicom"]
    assert "also in train/" in reasons["0d4.dicom"]
    doc = json.loads((out / "datalist.json").read_text())
    assert sorted(e["case_id"] for s in ("training", "validation", "test") for e in doc[s]) == \
        ["0a1", "0b2", "0c3", "0d4", "1g7", "1t1"]
    files = sorted((out / "images").glob("*.png"))
    before = {p: p.stat().st_mtime_ns for p in files}
    assert vd.main(args + ["--strict"]) == 1
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert json.loads((out / "report.json").read_text())["counts"]["skipped_existing"] == 6
    assert vd.main(args + ["--intensity", "minmax"]) == 2  # other settings, same folder


@pytest.mark.parametrize("missing", ["annotations/image_labels_train.csv"])
def test_missing_labels_file_is_an_error(tmp_path, missing, capsys):
    root = make_vindr(tmp_path / "vindr")
    (root / missing).unlink()
    assert vd.main(["--root", str(root), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "image_labels_train.csv" in capsys.readouterr().err
