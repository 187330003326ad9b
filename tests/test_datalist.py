"""Tests of medspan.data.datalist and the ``medspan check-datalist`` command."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medspan.cli import main as cli_main
from medspan.data.datalist import (
    load_datalist,
    spatial_shape,
    split_datalist,
    validate_datalist,
    write_datalist,
)
from medspan.errors import DataError

REAL = Path(__file__).resolve().parents[2] / "shared/data/real"
STRUCTURES = ["left_lung", "right_lung", "heart"]


# ------------------------------------------------------------------------------- helpers


def png(path: Path, width: int, height: int, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width), value, np.uint8)).save(path)
    return path


def nifti(path: Path, shape: tuple[int, ...]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(path))
    return path


def dicom(path: Path, rows: int, cols: int, frames: int = 1) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "CT", rows, cols
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.zeros((frames, rows, cols), np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def make_dataset(root: Path, n_train: int = 3, n_val: int = 2) -> Path:
    """A small 2D dataset: 40x30 PNG images, per-structure PNG masks, NIfTI priors (40, 30, 3)."""
    sections: dict[str, list] = {"training": [], "validation": []}
    for section, n, start in (("training", n_train, 0), ("validation", n_val, n_train)):
        for i in range(start, start + n):
            cid = f"cxr_{i:04d}"
            png(root / "images" / f"{cid}.png", 40, 30)
            for s in STRUCTURES:
                png(root / "masks" / f"{cid}_{s}.png", 40, 30)
            nifti(root / "priors" / f"{cid}.nii.gz", (40, 30, 3))
            sections[section].append(
                {
                    "case_id": cid,
                    "image": f"images/{cid}.png",
                    "label": [f"masks/{cid}_{s}.png" for s in STRUCTURES],
                    "prior": f"priors/{cid}.nii.gz",
                    "labels": [i % 2, 1 - i % 2],
                }
            )
    doc = {"name": "toy", "structures": STRUCTURES, "classes": ["nodule", "effusion"], **sections}
    path = root / "dataset.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def edit(path: Path, fn) -> Path:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))
    return path


# ------------------------------------------------------------------------------- loading


def test_load_resolves_relative_paths(tmp_path: Path) -> None:
    path = make_dataset(tmp_path)
    train = load_datalist(path, "training", require=("image", "label"), check_shapes=True)
    assert len(train) == 3
    e = train[1]
    assert e["case_id"] == "cxr_0001"
    assert e["image"] == str(tmp_path / "images" / "cxr_0001.png")
    assert e["label"] == [str(tmp_path / "masks" / f"cxr_0001_{s}.png") for s in STRUCTURES]
    assert e["prior"] == str(tmp_path / "priors" / "cxr_0001.nii.gz")
    assert e["labels"] == [1, 0]  # non-path keys are copied unchanged
    val = load_datalist(path, "validation")
    assert [v["case_id"] for v in val] == ["cxr_0003", "cxr_0004"]


def test_load_from_other_cwd_absolute_and_base_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    png(data / "a.png", 4, 4)
    other = png(tmp_path / "elsewhere" / "b.png", 4, 4)
    path = data / "list.json"
    path.write_text(json.dumps({"training": [{"image": "a.png"}, {"image": str(other)}], "test": ["a.png"]}))
    monkeypatch.chdir(tmp_path / "elsewhere")
    train = load_datalist(Path("../data/list.json"))
    assert train == [{"image": str(data / "a.png")}, {"image": str(other)}]
    # the Decathlon test layout: a list of image paths
    assert load_datalist(path, "test") == [{"image": str(data / "a.png")}]
    # base_dir overrides the datalist folder
    path.write_text(json.dumps({"training": [{"image": "b.png"}]}))
    assert load_datalist(path, base_dir=tmp_path / "elsewhere") == [{"image": str(other)}]


def test_label_dict_is_resolved(tmp_path: Path) -> None:
    path = make_dataset(tmp_path, n_train=1, n_val=0)
    edit(path, lambda d: d["training"][0].update(label={s: f"masks/cxr_0000_{s}.png" for s in STRUCTURES}))
    (e,) = load_datalist(path)
    assert e["label"] == {s: str(tmp_path / "masks" / f"cxr_0000_{s}.png") for s in STRUCTURES}


# ------------------------------------------------------------------------------- errors


def test_missing_file_names_entry_key_and_path(tmp_path: Path) -> None:
    path = make_dataset(tmp_path)
    missing = tmp_path / "masks" / "cxr_0001_heart.png"
    missing.unlink()
    with pytest.raises(DataError) as err:
        load_datalist(path, "training")
    msg = str(err.value)
    assert msg == f"{path}: training[1] (case cxr_0001): missing file for 'label'[2]: {missing}"
    assert err.value.where == f"{path}: training[1] (case cxr_0001)"


def test_empty_and_unknown_section(tmp_path: Path) -> None:
    path = make_dataset(tmp_path)
    edit(path, lambda d: d.update(validation=[]))
    with pytest.raises(DataError, match=r"dataset\.json: section 'validation' is empty$"):
        load_datalist(path, "validation")
    with pytest.raises(DataError) as err:
        load_datalist(path, "testing")
    assert str(err.value) == f"{path}: unknown section 'testing' (sections in the file: training, validation)"
    with pytest.raises(DataError, match="datalist file not found"):
        load_datalist(tmp_path / "nope.json")


def test_missing_required_key_and_wrong_types(tmp_path: Path) -> None:
    path = make_dataset(tmp_path)

    def change(d: dict) -> None:
        del d["training"][0]["label"]
        d["training"][1]["image"] = 5
        d["training"][2]["prior"] = {"a": 1}

    edit(path, change)
    problems = validate_datalist(path, require=("image", "label"))
    assert problems == [
        f"{path}: training[0] (case cxr_0000): missing required key 'label' "
        "(keys present: case_id, image, prior, labels)",
        f"{path}: training[1] (case cxr_0001): wrong type for 'image': expected a path or a non-empty list of "
        "paths, got int 5",
        f"{path}: training[2] (case cxr_0002): wrong type for 'prior': expected a path or a non-empty list of "
        "paths, got dict {'a': 1}",
    ]
    with pytest.raises(DataError) as err:
        load_datalist(path, require=("image", "label"))
    assert str(err.value).startswith(f"{path}: 3 problems in section 'training':\n  {path}: training[0]")


def test_structures_and_classes_lengths(tmp_path: Path) -> None:
    path = make_dataset(tmp_path)

    def change(d: dict) -> None:
        d["training"][0]["label"] = d["training"][0]["label"][:2]
        d["training"][1]["labels"] = [1, 0, 1]
        d["training"][2]["label"] = {"left_lung": "masks/cxr_0002_left_lung.png", "liver": "masks/x.png"}

    edit(path, change)
    problems = validate_datalist(path, sections=["training"], check_files=False)
    assert problems == [
        f"{path}: training[0] (case cxr_0000): 'label' lists 2 paths but the datalist has 3 structures "
        "(left_lung, right_lung, heart)",
        f"{path}: training[1] (case cxr_0001): 'labels' has 3 values but the datalist has 2 classes "
        "(nodule, effusion)",
        f"{path}: training[2] (case cxr_0002): 'label' dict keys do not match structures "
        "['left_lung', 'right_lung', 'heart']: missing ['right_lung', 'heart']; unknown ['liver']",
    ]


def test_named_class_keys_must_be_numbers(tmp_path: Path) -> None:
    path = make_dataset(tmp_path, n_train=2, n_val=0)
    edit(path, lambda d: (d["training"][0].update(nodule=1, effusion=0), d["training"][1].update(nodule="yes")))
    assert validate_datalist(path, sections=["training"]) == [
        f"{path}: training[1] (case cxr_0001): wrong type for class 'nodule': expected a number, got str 'yes'"
    ]


def test_duplicate_case_ids(tmp_path: Path) -> None:
    path = make_dataset(tmp_path)

    def change(d: dict) -> None:
        d["training"][2]["case_id"] = "cxr_0000"
        d["validation"][0]["case_id"] = "cxr_0001"

    edit(path, change)
    with pytest.raises(DataError) as err:
        load_datalist(path)
    assert str(err.value) == f"{path}: training[2] (case cxr_0000): duplicate case_id 'cxr_0000' (first at training[0])"
    assert validate_datalist(path) == [
        f"{path}: training[2] (case cxr_0000): duplicate case_id 'cxr_0000' (first at training[0])",
        f"{path}: validation[0] (case cxr_0001): case_id 'cxr_0001' is also in training[1]",
    ]


def test_shape_mismatch(tmp_path: Path) -> None:
    path = make_dataset(tmp_path)
    bad_mask = png(tmp_path / "masks" / "cxr_0002_heart.png", 40, 20)
    bad_prior = nifti(tmp_path / "priors" / "cxr_0001.nii.gz", (30, 40, 3))
    loaded = load_datalist(path)  # shapes are only checked on request: the mismatched files load
    assert [e["case_id"] for e in loaded] == ["cxr_0000", "cxr_0001", "cxr_0002"]
    assert Path(loaded[1]["prior"]) == bad_prior and Path(loaded[2]["label"][-1]) == bad_mask
    problems = validate_datalist(path, check_shapes=True)
    image1, image2 = tmp_path / "images" / "cxr_0001.png", tmp_path / "images" / "cxr_0002.png"
    assert problems == [
        f"{path}: training[1] (case cxr_0001): spatial shape mismatch: 'prior' {bad_prior} has shape (30, 40, 3), "
        f"'image' {image1} has (40, 30)",
        f"{path}: training[2] (case cxr_0002): spatial shape mismatch: 'label'[2] {bad_mask} has shape (40, 20), "
        f"'image' {image2} has (40, 30)",
    ]
    with pytest.raises(DataError, match="2 problems in section 'training'"):
        load_datalist(path, check_shapes=True)


def test_shape_check_2d_nifti_and_dicom(tmp_path: Path) -> None:
    nifti(tmp_path / "img.nii.gz", (40, 30, 1))  # a 2D image saved as (x, y, 1)
    dicom(tmp_path / "lab.dcm", rows=30, cols=40)
    nifti(tmp_path / "ct.nii.gz", (40, 30, 5))
    dicom(tmp_path / "ct_lab.dcm", rows=30, cols=40)  # 2D label for a 3D image: mismatch
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps(
            {
                "training": [
                    {"image": "img.nii.gz", "label": "lab.dcm"},
                    {"image": "ct.nii.gz", "label": "ct_lab.dcm"},
                ]
            }
        )
    )
    assert validate_datalist(path, check_shapes=True) == [
        f"{path}: training[1]: spatial shape mismatch: 'label' {tmp_path / 'ct_lab.dcm'} has shape (40, 30), "
        f"'image' {tmp_path / 'ct.nii.gz'} has (40, 30, 5)"
    ]


def test_spatial_shape_from_headers(tmp_path: Path) -> None:
    assert spatial_shape(png(tmp_path / "a.png", 40, 30)) == (40, 30)  # (x, y) = (width, height)
    assert spatial_shape(nifti(tmp_path / "a.nii.gz", (7, 8, 9))) == (7, 8, 9)
    assert spatial_shape(dicom(tmp_path / "a.dcm", rows=30, cols=40)) == (40, 30)
    assert spatial_shape(dicom(tmp_path / "mf.dcm", rows=3, cols=4, frames=5)) == (4, 3, 5)
    for k in range(6):
        dicom(tmp_path / "series" / f"{k:03d}.dcm", rows=30, cols=40)
    (tmp_path / "series" / "notes.txt").write_text("not an image")
    assert spatial_shape(tmp_path / "series") == (40, 30, 6)
    assert spatial_shape(tmp_path / "a.npy") is None


def test_bad_json_and_bad_metadata(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('{"training": [')
    assert validate_datalist(path)[0].startswith(f"{path}: not valid JSON (line 1")
    png(tmp_path / "a.png", 4, 4)
    path.write_text(json.dumps({"structures": ["a", "a"], "training": [{"image": "a.png"}, "a.png", 3]}))
    assert validate_datalist(path) == [
        f"{path}: 'structures' has duplicate names ['a']",
        f"{path}: training[2]: an entry must be an object (dict), got int: 3",
    ]


# ------------------------------------------------------------------------------- writing


def test_write_datalist_relative_atomic_roundtrip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    png(out / "images" / "a.png", 4, 4)
    png(out / "masks" / "a_heart.png", 4, 4)
    monkeypatch.chdir(tmp_path)
    entries = [
        {
            "case_id": "a",
            "image": out / "images" / "a.png",  # absolute Path
            "label": ["out/masks/a_heart.png"],  # relative to the cwd
            "labels": np.array([1, 0]),
        }
    ]
    written = write_datalist(out / "dataset.json", {"training": entries}, name="demo", structures=["heart"])
    assert written == out / "dataset.json"
    assert sorted(os.listdir(out)) == ["dataset.json", "images", "masks"]  # no temp file left
    doc = json.loads((out / "dataset.json").read_text())
    assert list(doc) == ["name", "structures", "training"]
    assert doc["training"] == [
        {"case_id": "a", "image": "images/a.png", "label": ["masks/a_heart.png"], "labels": [1, 0]}
    ]
    (e,) = load_datalist(out / "dataset.json", require=("image", "label"))
    assert e["image"] == str(out / "images" / "a.png") and e["label"] == [str(out / "masks" / "a_heart.png")]


def test_write_datalist_failure_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "dataset.json"
    write_datalist(path, {"training": [{"image": "/x/a.png"}]})
    before = path.read_text()
    with pytest.raises(TypeError):
        write_datalist(path, {"training": [{"image": "/x/a.png", "bad": object()}]})
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["dataset.json"]


# ------------------------------------------------------------------------------- splitting


def test_split_counts_and_determinism() -> None:
    entries = [{"case_id": f"c{i}"} for i in range(10)]
    train, val = split_datalist(entries, 0.2, seed=3)
    assert (len(train), len(val)) == (8, 2)
    assert sorted(e["case_id"] for e in train + val) == sorted(e["case_id"] for e in entries)
    assert split_datalist(entries, 0.2, seed=3) == [train, val]
    assert [len(p) for p in split_datalist(entries, (0.6, 0.2, 0.2), seed=0)] == [6, 2, 2]
    assert [len(p) for p in split_datalist(entries, n_val=3, seed=0)] == [7, 3]
    assert [len(p) for p in split_datalist(entries[:5], 0.1, seed=0)] == [4, 1]  # a non-zero part is never empty
    # within a part, the input order is kept
    idx = [int(e["case_id"][1:]) for e in train]
    assert idx == sorted(idx)


def test_split_keeps_patients_together() -> None:
    entries = [{"case_id": f"c{i}", "patient": f"p{i // 3}"} for i in range(30)]  # 10 patients x 3
    for seed in range(5):
        train, val = split_datalist(entries, 0.2, seed=seed, group_key="patient")
        assert (len(train), len(val)) == (24, 6)
        assert not {e["patient"] for e in train} & {e["patient"] for e in val}
    assert split_datalist(entries, 0.2, seed=1, group_key="patient") == split_datalist(
        entries, 0.2, seed=1, group_key="patient"
    )
    # two big groups: the validation part still gets one of them
    two = [{"patient": "a"}] * 5 + [{"patient": "b"}] * 5
    train, val = split_datalist(two, 0.2, seed=0, group_key="patient")
    assert (len(train), len(val)) == (5, 5)


# ------------------------------------------------------------------------------- CLI


def test_cli_ok_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_dataset(tmp_path)
    assert cli_main(["check-datalist", str(path), "--shapes"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: OK",
        "  name: toy",
        "  training: 3 entries (label 3, prior 3, labels 3)",
        "  validation: 2 entries (label 2, prior 2, labels 2)",
        "  structures (3): left_lung, right_lung, heart",
        "  classes (2): nodule, effusion",
    ]


def test_cli_problems_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_dataset(tmp_path)
    (tmp_path / "images" / "cxr_0004.png").unlink()
    png(tmp_path / "masks" / "cxr_0000_heart.png", 40, 20)
    assert cli_main(["check-datalist", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: validation[1] (case cxr_0004): missing file for 'image': {tmp_path / 'images' / 'cxr_0004.png'}",
        f"1 problem in {path}",
    ]
    assert cli_main(["check-datalist", str(path), "--shapes"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}: training[0] (case cxr_0000): spatial shape mismatch: 'label'[2]")
    assert out[-1] == f"2 problems in {path}"
    assert cli_main(["check-datalist", str(path), "--section", "training"]) == 0


# ------------------------------------------------------------------------------- real data


@pytest.mark.real_data
@pytest.mark.skipif(not (REAL / "mhh_covid_cxr_v7_lungs").is_dir(), reason="needs ../shared/data/real")
def test_real_mhh_datalist(tmp_path: Path) -> None:
    root = REAL / "mhh_covid_cxr_v7_lungs"
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:6]
    entries = [
        {"case_id": r["mhh_image_id"], "patient": r["mhh_patient_id"], "image": str(root / r["image"]),
         "label": str(root / r["mask"])}
        for r in rows
    ]
    train, val = split_datalist(entries, 0.34, seed=0, group_key="patient")
    path = write_datalist(tmp_path / "mhh.json", {"training": train, "validation": val}, name="mhh")
    assert validate_datalist(path, require=("image", "label"), check_shapes=True) == []
    loaded = load_datalist(path, "training")
    assert {e["image"] for e in loaded} == {e["image"] for e in train}
    assert spatial_shape(root / rows[0]["image"]) == (2000, 2000)
