"""Tests of data_prep.nih_cxr14_subset: the 1000 NIH thumbnails -> cxr_cls + pretraining datalists.

A tiny tree in the subset's exact layout (labels.csv with its columns, ``thumbs64/<split>/<class>/``
RGB PNGs) checks the conversion against hand-computed sections, labels, pixels and counts. The
real-data tests read ``../shared/data/real/nih_cxr14_subset`` and skip when it is absent. The last
tiny test runs the documented command sequence (NIH subset, MHH lungs, build-priors with the MHH
exemplar onto the NIH training images) end to end on small pictures.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from medspan.data_prep import nih_cxr14_subset as sub
from medspan.data_prep.common import Report
from medspan.data_prep.cxr_common import CacheSpec
from medspan.data_prep.mhh_covid_lungs import convert as convert_mhh
from medspan.data_prep.nih_cxr14 import CLASSES
from PIL import Image

from medspan.atlas.build import build_priors
from medspan.cli import main as cli_main
from medspan.data.datalist import load_datalist
from medspan.errors import DataError

REAL = Path(__file__).resolve().parents[2] / "shared/data/real" / "nih_cxr14_subset"
REAL_MHH = Path(__file__).resolve().parents[2] / "shared/data/real" / "mhh_covid_cxr_v7_lungs"
needs_real = pytest.mark.skipif(not (REAL / "labels.csv").is_file(), reason=f"{REAL} not present")
needs_both = pytest.mark.skipif(not ((REAL / "labels.csv").is_file() and (REAL_MHH / "manifest.csv").is_file()),
                                reason="../shared/data/real not present")

HEADER = ["path", "image_index", "subset", "split", "folder_class", "finding_labels", "follow_up", "patient_id",
          "patient_age", "patient_sex", "view"]


def vec(*names: str) -> list[int]:
    return [int(c in names) for c in CLASSES]


# ------------------------------------------------------------------------------- pure parts


def test_assign_patient_splits_majority_and_ties():
    pairs = [("1", "train"), ("1", "train"), ("1", "test"),      # majority train
             ("2", "valid"), ("2", "test"),                       # tie valid/test -> test
             ("3", "train"), ("3", "valid"),                      # tie train/valid -> valid
             ("4", "train"), ("4", "valid"), ("4", "test"),       # three-way tie -> test
             ("5", "valid"), ("5", "valid")]                      # one split: no move
    split_of, moves = sub.assign_patient_splits(pairs)
    assert split_of == {"1": "train", "2": "test", "3": "valid", "4": "test", "5": "valid"}
    assert moves == [
        {"patient_id": "1", "images": {"test": 1, "train": 2}, "to": "train", "moved": 1},
        {"patient_id": "2", "images": {"test": 1, "valid": 1}, "to": "test", "moved": 1},
        {"patient_id": "3", "images": {"valid": 1, "train": 1}, "to": "valid", "moved": 1},
        {"patient_id": "4", "images": {"test": 1, "valid": 1, "train": 1}, "to": "test", "moved": 2},
    ]
    with pytest.raises(ValueError, match="unknown split 'dev' of patient '9'"):
        sub.assign_patient_splits([("9", "dev")])


def test_class_positives_counts():
    got = sub.class_positives({"training": [{"labels": [1, 0, 1]}, {"labels": [1, 1, 0]}], "test": []}, ["a", "b", "c"])
    assert got == {"training": {"images": 2, "a": 2, "b": 1, "c": 1}, "test": {"images": 0, "a": 0, "b": 0, "c": 0}}


# ------------------------------------------------------------------------------- a tiny tree


def _picture(k: int, size: int = 8) -> np.ndarray:
    return ((np.arange(size * size).reshape(size, size) * (k + 3)) % 256).astype(np.uint8)


# (image index, split, folder class, findings, patient)
ROWS = [
    ("00000001_000.png", "train", "1_abnormal", "Cardiomegaly", "1"),
    ("00000001_001.png", "train", "1_abnormal", "Cardiomegaly|Effusion", "1"),
    ("00000001_002.png", "test", "0_normal", "No Finding", "1"),          # patient 1: 2 train, 1 test -> train
    ("00000002_000.png", "valid", "1_abnormal", "Hernia", "2"),
    ("00000002_001.png", "test", "0_normal", "Pneumonia", "2"),           # tie -> test; folder disagrees
    ("00000003_000.png", "test", "0_normal", "No Finding", "3"),
    ("00000004_000.png", "train", "0_normal", "No Finding", "4"),
]


def _write_labels(root: Path, rows: list[list[str]]) -> None:
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)


def make_subset(root: Path, rows=ROWS, size: int = 8) -> Path:
    csv_rows = [["fullres/00000009_000.png", "00000009_000.png", "fullres", "fullres", "", "Mass", "0", "9", "50",
                 "M", "PA"]]
    for k, (name, split, cls, findings, patient) in enumerate(rows):
        rel = f"thumbs64/{split}/{cls}/{name}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pic = _picture(k, size)
        Image.fromarray(np.dstack([pic, pic, pic])).save(root / rel)  # RGB, grey replicated (as the real files)
        csv_rows.append([rel, name, "thumbs64", split, cls, findings, str(k), patient, str(40 + k), "F", "PA"])
    _write_labels(root, csv_rows)
    return root


def test_convert_tiny_tree_exact(tmp_path):
    root = make_subset(tmp_path / "src")
    path, report = sub.convert(root, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert report.problems == []
    doc = json.loads(path.read_text())
    assert doc["classes"] == list(CLASSES)
    ids = {s: [e["case_id"] for e in doc[s]] for s in ("training", "validation", "test")}
    assert ids == {"training": ["00000001_000", "00000001_001", "00000001_002", "00000004_000"],
                   "validation": [],
                   "test": ["00000002_000", "00000002_001", "00000003_000"]}
    by_id = {e["case_id"]: e for s in ids for e in doc[s]}
    assert by_id["00000001_001"]["labels"] == vec("Cardiomegaly", "Effusion")
    assert by_id["00000001_002"]["labels"] == vec("No Finding")
    assert by_id["00000001_002"]["source_split"] == "test"
    assert by_id["00000002_001"] == {
        "image": "images/00000002_001.png", "case_id": "00000002_001", "image_index": "00000002_001.png",
        "patient_id": "2", "labels": vec("Pneumonia"), "findings": "Pneumonia", "folder_class": "0_normal",
        "source_split": "test", "follow_up": 4, "age": 44, "sex": "F", "view": "PA"}
    # grey PNGs, the first channel exactly, at the source size (64 for the real files, 8 here)
    for k, (name, *_r) in enumerate(ROWS):
        im = Image.open(out / "images" / name)
        assert im.mode == "L" and np.array_equal(np.asarray(im), _picture(k)), name
    assert dict(report.counts) == {
        "other_subset": 1, "images_written": 7, "images": 7, "patients": 4, "patients_in_several_splits": 2,
        "images_moved": 2, "folder_class_disagrees": 1, "training": 4, "validation": 0, "test": 3}
    assert not (out / "report.json").exists()  # convert() fills the report; the CLI's finish() writes it
    zero = {c: 0 for c in CLASSES}
    assert report.extra["positives"] == {
        "training": {"images": 4, **zero, "Cardiomegaly": 2, "Effusion": 1, "No Finding": 2},
        "validation": {"images": 0, **zero},
        "test": {"images": 3, **zero, "Hernia": 1, "Pneumonia": 1, "No Finding": 1},
    }
    assert report.extra["classes_with_min_positives"] == {"training": [], "validation": [], "test": []}
    assert report.extra["folder_class_disagrees"] == ["00000002_001.png"]
    assert [m["patient_id"] for m in report.extra["patient_moves"]] == ["1", "2"]
    pre = json.loads((out / "pretrain_datalist.json").read_text())
    assert pre["training"] == [{"image": f"images/{c}.png", "case_id": c, "patient_id": p}
                               for c, p in zip(ids["training"], ["1", "1", "1", "4"])]
    assert "validation" not in pre and "test" not in pre
    assert len(load_datalist(path, "test", require=("image", "labels"))) == 3
    # a re-run writes no image again; another cache size in the same folder is refused
    _, again = sub.convert(root, out, progress=False)
    assert again.counts["skipped_existing"] == 7 and "images_written" not in again.counts
    with pytest.raises(DataError, match="conversion.json: this folder was converted with other settings"):
        sub.convert(root, out, CacheSpec(size=4), progress=False)


def test_report_files_hold_positives_and_moves(tmp_path):
    rep = sub.SubsetReport("nih_cxr14_subset", tmp_path)
    rep.count("images", 2)
    rep.extra = {"positives": {"test": {"images": 2, "Effusion": 1}},
                 "patient_moves": [{"patient_id": "7", "images": {"test": 1, "train": 1}, "to": "test", "moved": 1}]}
    doc = json.loads(rep.write().read_text())
    assert doc["counts"] == {"images": 2} and doc["positives"] == {"test": {"images": 2, "Effusion": 1}}
    assert doc["patient_moves"][0]["to"] == "test"
    assert (tmp_path / "report.txt").read_text().splitlines()[-2:] == [
        "positives in test (2 images): Effusion 1",
        "patient 7: images per CSV split {'test': 1, 'train': 1} -> all in test"]


def test_bad_rows_and_missing_image_reported(tmp_path):
    root = make_subset(tmp_path / "src")
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    rows.append(rows[2])                                     # duplicate image index
    rows.append(["thumbs64/x/0_normal/a.png", "a.png", "thumbs64", "dev", "", "No Finding", "0", "5", "1", "F", "PA"])
    rows.append(["thumbs64/test/0_normal/b.png", "b.png", "thumbs64", "test", "", "Pleural Thickening", "0", "5", "1",
                 "F", "PA"])
    rows.append(["thumbs64/test/0_normal/c.png", "c.png", "thumbs64", "test", "", "No Finding", "0", "", "1", "F", "PA"])
    _write_labels(root, rows[1:])
    (root / "thumbs64/test/0_normal/00000003_000.png").unlink()
    report = Report("t", tmp_path)
    read = sub.read_labels(root / "labels.csv", report)
    assert [r.image_index for r in read] == [r[0] for r in ROWS]
    assert [p for _, p in report.problems] == [
        "duplicate image_index 00000001_000.png (first in row 2); row skipped",
        "a.png: unknown split 'dev' (expected one of ['train', 'valid', 'test'])",
        "b.png: unknown finding(s) ['Pleural Thickening'] in 'Pleural Thickening' (known: " + ", ".join(CLASSES) + ")",
        "c.png: empty patient_id"]
    assert [i for i, _ in report.problems] == ["labels.csv row 9", "labels.csv row 10", "labels.csv row 11",
                                               "labels.csv row 12"]
    path, rep = sub.convert(root, tmp_path / "out", progress=False)
    assert len(rep.problems) == 5
    assert rep.problems[-1][0].endswith("00000003_000.png") and "file does not exist" in rep.problems[-1][1]
    assert [e["case_id"] for e in json.loads(path.read_text())["test"]] == ["00000002_000", "00000002_001"]
    with pytest.raises(DataError, match=r"labels\.csv: labels\.csv not found"):
        sub.convert(tmp_path / "nowhere", tmp_path / "o2")
    (root / "labels.csv").write_text("path,image_index,split\nx,y,train\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['subset', 'finding_labels', 'patient_id'\]"):
        sub.read_labels(root / "labels.csv")


def test_cli_prepare_subcommand_and_exit_codes(tmp_path, capsys):
    root = make_subset(tmp_path / "src")
    out = tmp_path / "out"
    assert cli_main(["prepare", "nih-cxr14-subset", "--root", str(root), "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert f"datalist: {out.resolve() / 'datalist.json'}" in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["positives"]["training"]["Cardiomegaly"] == 2 and rep["counts"]["images_moved"] == 2
    (root / "thumbs64/test/0_normal/00000003_000.png").unlink()
    assert cli_main(["prepare", "nih-cxr14-subset", "--root", str(root), "--out", str(tmp_path / "o2"), "--quiet",
                     "--strict"]) == 1
    assert cli_main(["prepare", "nih-cxr14-subset", "--root", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "labels.csv not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the command sequence, tiny


def _lung_picture(size: int) -> tuple[np.ndarray, np.ndarray]:
    """A bright body with two dark lung fields: (picture uint8, lung mask uint8 {0, 255}) of size x size."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    pic = 150 + 60 * yy + 20 * xx
    lung = np.zeros((size, size), bool)
    lung[int(0.2 * size):int(0.8 * size), int(0.12 * size):int(0.42 * size)] = True
    lung[int(0.2 * size):int(0.85 * size), int(0.58 * size):int(0.88 * size)] = True
    pic[lung] = 50 + 30 * yy[lung]
    return pic.astype(np.uint8), lung.astype(np.uint8) * 255


@pytest.mark.timeout(120)
def test_nih_pretraining_priors_sequence_tiny(tmp_path, capsys):
    """prepare nih-cxr14-subset -> prepare mhh-covid-lungs -> build-priors (MHH exemplar onto NIH training)."""
    size = 32
    pic, lung = _lung_picture(64)
    mhh = tmp_path / "mhh"
    (mhh / "images").mkdir(parents=True)
    (mhh / "masks").mkdir()
    Image.fromarray(pic).save(mhh / "images" / "ex0.png")
    Image.fromarray(lung).save(mhh / "masks" / "ex0.png")
    (mhh / "manifest.csv").write_text("image,mask,mhh_image_id,mhh_patient_id\nimages/ex0.png,masks/ex0.png,ex0,p0\n")
    assert cli_main(["prepare", "mhh-covid-lungs", "--root", str(mhh), "--out", str(tmp_path / "mhh32"),
                     "--size", str(size)]) == 0
    ex_image = np.asarray(Image.open(tmp_path / "mhh32/images/ex0.png"))

    # NIH thumbnails: the exemplar's own picture (RGB), so the affine registration is the identity
    nih = tmp_path / "nih"
    rows = [["thumbs64/train/0_normal/00000001_000.png", "00000001_000.png", "thumbs64", "train", "0_normal",
             "No Finding", "0", "1", "40", "F", "PA"],
            ["thumbs64/train/1_abnormal/00000002_000.png", "00000002_000.png", "thumbs64", "train", "1_abnormal",
             "Mass", "0", "2", "41", "M", "PA"],
            ["thumbs64/test/0_normal/00000003_000.png", "00000003_000.png", "thumbs64", "test", "0_normal",
             "No Finding", "0", "3", "42", "M", "AP"]]
    for r in rows:
        (nih / r[0]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.dstack([ex_image] * 3)).save(nih / r[0])
    _write_labels(nih, rows)
    assert cli_main(["prepare", "nih-cxr14-subset", "--root", str(nih), "--out", str(tmp_path / "nih_out"),
                     "--quiet"]) == 0

    m = tmp_path / "mhh32/masks"
    assert cli_main(["build-priors", "--exemplar", str(tmp_path / "mhh32/images/ex0.png"),
                     "--masks", str(m / "ex0_left_lung.png"), str(m / "ex0_right_lung.png"),
                     "--structures", "left_lung", "right_lung",
                     "--datalist", str(tmp_path / "nih_out/pretrain_datalist.json"),
                     "--out", str(tmp_path / "priors"), "--method", "affine", "--sigma", "1",
                     "--no-progress", "--no-report"]) == 0
    capsys.readouterr()
    dl = tmp_path / "priors/datalist.json"
    doc = json.loads(dl.read_text())
    assert doc["structures"] == ["left_lung", "right_lung"]
    train = load_datalist(dl, "training", require=("image", "prior"))
    assert [e["case_id"] for e in train] == ["00000001_000", "00000002_000"]     # training images only
    assert "test" not in doc and "validation" not in doc
    ex_masks = np.stack([np.asarray(Image.open(m / f"ex0_{s}.png")).T > 0 for s in ("left_lung", "right_lung")])
    for e in train:
        prior = np.load(e["prior"])
        assert prior.shape == (2, size, size) and prior.dtype == np.float16
        warped = np.load(tmp_path / "priors/masks" / f"{e['case_id']}.npz")["registered"]  # (2, x, y)
        for k in range(2):
            inter = np.logical_and(warped[k], ex_masks[k]).sum()
            assert 2 * inter / (warped[k].sum() + ex_masks[k].sum()) > 0.95, (e["case_id"], k)
        # MONAI (x, y) order: the left lung's prior lies on the image right (x >= size / 2)
        p = prior.astype(np.float32)
        assert p[0, size // 2:].sum() > 4 * p[0, : size // 2].sum()


# ------------------------------------------------------------------------------- the real subset


@pytest.fixture(scope="module")
def real_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("nih_subset") / "out"
    path, report = sub.convert(REAL, out, workers=2, progress=False)
    return path, report, out.resolve()


@needs_real
@pytest.mark.real_data
def test_real_subset_sections_patient_wise(real_out):
    path, report, out = real_out
    assert report.problems == []
    doc = json.loads(path.read_text())
    sizes = {s: len(doc[s]) for s in ("training", "validation", "test")}
    assert sum(sizes.values()) == 1000 and len(list((out / "images").glob("*.png"))) == 1000
    patients = {s: {e["patient_id"] for e in doc[s]} for s in sizes}
    assert not (patients["training"] & patients["validation"] or patients["training"] & patients["test"]
                or patients["validation"] & patients["test"])
    moved = sum(e["source_split"] != {"training": "train", "validation": "valid", "test": "test"}[s]
                for s in sizes for e in doc[s])
    assert moved == report.counts["images_moved"] > 0
    assert report.counts["patients_in_several_splits"] == len(report.extra["patient_moves"]) > 0
    assert report.counts["other_subset"] == 2 and report.counts["folder_class_disagrees"] == 1
    # positives per section add up to the set's totals (README: Effusion 170, Infiltration 162, ...)
    pos = report.extra["positives"]
    assert sum(pos[s]["Effusion"] for s in sizes) == 170 and sum(pos[s]["Infiltration"] for s in sizes) == 162
    assert sum(pos[s]["Atelectasis"] for s in sizes) == 95 and sum(pos[s]["Cardiomegaly"] for s in sizes) == 83
    assert sum(pos[s]["No Finding"] for s in sizes) == 499  # 500 normal folders, one relabelled in 2020
    pre = load_datalist(out / "pretrain_datalist.json", "training", require=("image",))
    assert [e["case_id"] for e in pre] == [e["case_id"] for e in doc["training"]]


@needs_real
@pytest.mark.real_data
def test_real_subset_rows_and_pixels(real_out):
    path, _report, out = real_out
    doc = json.loads(path.read_text())
    by_id = {e["image_index"]: e for s in ("training", "validation", "test") for e in doc[s]}
    with open(REAL / "labels.csv", newline="") as f:
        rows = {r["image_index"]: r for r in csv.DictReader(f) if r["subset"] == "thumbs64"}
    for name, labels in (("00000165_001.png", vec("Pneumonia")), ("00000165_004.png", vec("Pleural_Thickening")),
                         ("00000231_013.png", vec("No Finding"))):
        assert by_id[name]["labels"] == labels and by_id[name]["findings"] == rows[name]["finding_labels"]
        src = np.asarray(Image.open(REAL / rows[name]["path"]).convert("RGB"))
        got = Image.open(out / "images" / name)
        assert got.mode == "L" and got.size == (64, 64)
        assert np.array_equal(np.asarray(got), src[..., 0])


@needs_both
@pytest.mark.real_data
@pytest.mark.timeout(180)
def test_real_mhh_exemplar_onto_nih_training_images(real_out, tmp_path):
    """The documented sequence on the first 3 NIH training images (the full 578 take minutes)."""
    _path, _report, out = real_out
    mhh = convert_mhh(REAL_MHH, tmp_path / "mhh64", size=64).parent
    ex = json.loads((mhh / "span_datalist.json").read_text())["exemplar"]
    entries = load_datalist(out / "pretrain_datalist.json", "training")[:3]
    res = build_priors(mhh / ex["image"], entries, tmp_path / "priors", masks=[mhh / p for p in ex["label"]],
                       structures=["left_lung", "right_lung"], sigma=1.0, progress=False)
    assert res.counts["failed"] == 0 and len(res.records) == 3
    for r in res.records:
        p = np.load(r["prior"]).astype(np.float32)
        assert p.shape == (2, 64, 64)
        # MONAI (x, y) order: left lung on the image right, right lung on the image left
        assert p[0, 32:].sum() > 2 * p[0, :32].sum() and p[1, :32].sum() > 2 * p[1, 32:].sum(), r["case_id"]
