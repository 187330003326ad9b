"""medspan.data_prep.msd_lung (MSD Task06 Lung -> datalist + resampled cache) and the resampling of ct_common.

The fixture is a tiny ``Task06_Lung`` folder in the Decathlon layout (``dataset.json``,
``imagesTr/lung_XXX.nii.gz``, ``labelsTr/...``, ``imagesTs/...``, the tarball's ``._`` side files).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medspan.data_prep.ct_common import crop_grid, resample_to_spacing, sample_on_grid
from medspan.io import write_nifti_atomic
from medspan.data_prep.msd_lung import convert, main
from medspan.data.datalist import load_datalist

AFFINE = np.array([[-1.0, 0, 0, 30.0], [0, -1.0, 0, 40.0], [0, 0, 1.0, -50.0], [0, 0, 0, 1]])


def linear_volume(shape=(6, 6, 6), offset: float = 0.0) -> np.ndarray:
    x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return (-1000.0 + x + 10 * y + 100 * z + offset).astype(np.float64)


def label_volume(shape=(6, 6, 6)) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[1:5, 1:3, 4] = 1
    return lab


def make_task(root: Path, n_train: int = 5, n_test: int = 2) -> Path:
    task = root / "Task06_Lung"
    train, test = [], []
    for i in range(1, n_train + n_test + 1):
        name = f"lung_{i:03d}.nii.gz"
        if i <= n_train:
            write_nifti_atomic(linear_volume(offset=i), task / "imagesTr" / name, AFFINE, dtype="int16")
            write_nifti_atomic(label_volume(), task / "labelsTr" / name, AFFINE, dtype="uint8")
            (task / "imagesTr" / f"._{name}").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
            train.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            write_nifti_atomic(linear_volume(offset=i), task / "imagesTs" / name, AFFINE, dtype="int16")
            test.append(f"./imagesTs/{name}")
    meta = {
        "name": "Lung",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "cancer"},
        "numTraining": n_train,
        "numTest": n_test,
        "training": train,
        "test": test,
    }
    (task / "dataset.json").write_text(json.dumps(meta, indent=1))
    return task


# ------------------------------------------------------------------------------- resampling


def test_resample_keeps_the_field_of_view_and_is_exact_on_linear_data() -> None:
    vol = linear_volume((6, 6, 6))
    out, aff = resample_to_spacing(vol, AFFINE, 3.0, order=1)
    assert out.shape == (2, 2, 2)
    assert np.array_equal(out, vol[1::3, 1::3, 1::3])  # new voxel j sits at old index 3j + 1
    assert np.allclose(aff[:3, :3], AFFINE[:3, :3] * 3)
    assert np.allclose(aff @ [0, 0, 0, 1], AFFINE @ [1, 1, 1, 1])
    # outer corners kept: corner of old voxel -0.5 == corner of new voxel -0.5
    assert np.allclose(aff @ [-0.5, -0.5, -0.5, 1], AFFINE @ [-0.5, -0.5, -0.5, 1])
    half, aff2 = resample_to_spacing(vol[:4, :4, :4], AFFINE, 2.0, order=1)  # new j at old 2j + 0.5
    x, y, z = np.meshgrid(*(np.arange(2) * 2 + 0.5,) * 3, indexing="ij")
    assert np.allclose(half, -1000 + x + 10 * y + 100 * z)
    lab, _ = resample_to_spacing(label_volume(), AFFINE, 3.0, order=0)
    assert np.array_equal(lab, label_volume()[1::3, 1::3, 1::3])


def test_resample_anisotropic_shape_rounding() -> None:
    aff = np.diag([0.7, 0.7, 2.5, 1.0])
    out, new = resample_to_spacing(np.zeros((10, 10, 4), np.float32), aff, (1.5, 1.5, 1.5))
    assert out.shape == (5, 5, 7)  # round(10 * 0.7 / 1.5) = 5, round(4 * 2.5 / 1.5) = 7
    assert np.allclose(np.diag(new)[:3], 1.5)


def test_crop_grid_centre_and_sampling_out_of_bounds() -> None:
    caff, shape = crop_grid([25.0, 35.0, -45.0], AFFINE, 4, 1.0)
    assert shape == (4, 4, 4)
    assert np.allclose(caff @ [1.5, 1.5, 1.5, 1], [25.0, 35.0, -45.0, 1])
    vol = linear_volume()
    crop = sample_on_grid(vol, AFFINE, caff, shape, order=1, cval=-1024)
    # world (25, 35, -45) is voxel (5, 5, 5) of the volume; crop voxel (1.5, 1.5, 1.5) -> volume 5 +- 1.5
    assert crop[0, 0, 0] == vol[3, 3, 3] + 0.5 * (1 + 10 + 100)
    assert crop[3, 3, 3] == -1024  # voxel 6.5: outside


# ------------------------------------------------------------------------------- converter


def test_datalist_points_at_the_original_files(tmp_path: Path) -> None:
    task = make_task(tmp_path)
    out = tmp_path / "out"
    report = convert(task, out, val_fraction=0.2, progress=False)
    assert not report.problems and report.counts["cases"] == 7
    doc = json.loads((out / "datalist.json").read_text())
    assert doc["structures"] == ["cancer"] and doc["modality"] == "CT"
    assert len(doc["training"]) == 4 and len(doc["validation"]) == 1
    ids = sorted(e["case_id"] for e in doc["training"] + doc["validation"])
    assert ids == [f"lung_{i:03d}" for i in range(1, 6)]
    assert doc["test"] == [
        {"image": "../Task06_Lung/imagesTs/lung_006.nii.gz", "case_id": "lung_006"},
        {"image": "../Task06_Lung/imagesTs/lung_007.nii.gz", "case_id": "lung_007"},
    ]
    e = load_datalist(out / "datalist.json", "training", require=("image", "label"), check_shapes=True)[0]
    assert Path(e["image"]).resolve() == (task / "imagesTr" / f"{e['case_id']}.nii.gz").resolve()


def test_resampled_cache_values_affine_and_rerun(tmp_path: Path) -> None:
    task = make_task(tmp_path, n_train=2, n_test=1)
    out = tmp_path / "out"
    assert main(["--root", str(task), "--out", str(out), "--spacing", "3", "--val-fraction", "0", "--quiet"]) == 0
    entries = load_datalist(out / "datalist.json", "training", require=("image", "label"))
    assert [e["case_id"] for e in entries] == ["lung_001", "lung_002"]
    img = nib.load(entries[0]["image"])
    assert Path(entries[0]["image"]).parent == out / "cache" / "3x3x3" / "imagesTr"
    assert img.get_data_dtype() == np.int16
    assert np.array_equal(np.asarray(img.dataobj), linear_volume(offset=1)[1::3, 1::3, 1::3])
    assert np.allclose(img.affine @ [0, 0, 0, 1], AFFINE @ [1, 1, 1, 1])
    lab = nib.load(entries[0]["label"])
    assert lab.get_data_dtype() == np.uint8 and np.array_equal(
        np.asarray(lab.dataobj), label_volume()[1::3, 1::3, 1::3]
    )
    assert json.loads((out / "datalist.json").read_text())["spacing"] == [3.0, 3.0, 3.0]

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith("report.")}
    assert main(["--root", str(task), "--out", str(out), "--spacing", "3", "--val-fraction", "0", "--quiet"]) == 0
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith("report.")}
    assert after == before
    assert json.loads((out / "report.json").read_text())["counts"]["skipped_existing"] == 3


def test_bad_input_reported_rest_converted_strict_exit(tmp_path: Path) -> None:
    task = make_task(tmp_path, n_train=4, n_test=1)
    meta = json.loads((task / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/lung_009.nii.gz", "label": "./labelsTr/lung_009.nii.gz"})  # missing
    meta["training"].append(dict(meta["training"][0]))  # duplicate id
    meta["training"][3]["label"] = "./labelsTr/lung_004_cut.nii.gz"  # label of another shape, written below
    (task / "dataset.json").write_text(json.dumps(meta))
    (task / "imagesTr" / "lung_002.nii.gz").write_bytes(b"not a nifti at all" * 30)  # corrupt
    write_nifti_atomic(np.zeros((6, 6, 5)), task / "labelsTr" / "lung_004_cut.nii.gz", AFFINE, dtype="uint8")
    out = tmp_path / "out"
    args = ["--root", str(task), "--out", str(out), "--spacing", "3", "--val-fraction", "0", "--quiet"]
    assert main(args) == 0
    problems = {p["item"]: p["reason"] for p in json.loads((out / "report.json").read_text())["problems"]}
    tr = (task / "imagesTr").resolve()
    assert set(problems) == {
        str(tr / "lung_009.nii.gz"),
        str(tr / "lung_001.nii.gz"),
        str(tr / "lung_002.nii.gz"),
        str(tr / "lung_004.nii.gz"),
    }
    assert "file listed but missing" in problems[str(tr / "lung_009.nii.gz")]
    assert "duplicate case id lung_001" in problems[str(tr / "lung_001.nii.gz")]
    assert "cannot read the NIfTI header" in problems[str(tr / "lung_002.nii.gz")]
    assert "label shape (6, 6, 5) differs from image shape (6, 6, 6)" in problems[str(tr / "lung_004.nii.gz")]
    doc = json.loads((out / "datalist.json").read_text())
    assert [e["case_id"] for e in doc["training"]] == ["lung_001", "lung_003"]
    assert [e["case_id"] for e in doc["test"]] == ["lung_005"]
    assert main(args + ["--strict"]) == 1
    assert not [p for p in out.rglob(".*")]


def test_without_dataset_json_the_folders_are_paired(tmp_path: Path) -> None:
    task = make_task(tmp_path, n_train=2, n_test=1)
    (task / "dataset.json").unlink()
    out = tmp_path / "out"
    report = convert(task, out, val_fraction=0.0, progress=False)
    assert report.counts["no_dataset_json"] == 1 and not report.problems
    doc = json.loads((out / "datalist.json").read_text())
    assert [(e["case_id"], e["label"]) for e in doc["training"]] == [
        ("lung_001", "../Task06_Lung/labelsTr/lung_001.nii.gz"),
        ("lung_002", "../Task06_Lung/labelsTr/lung_002.nii.gz"),
    ]
    assert [e["case_id"] for e in doc["test"]] == ["lung_003"]


def test_verify_decodes_and_finds_a_truncated_gzip(tmp_path: Path) -> None:
    task = make_task(tmp_path, n_train=2, n_test=0)
    p = task / "imagesTr" / "lung_002.nii.gz"
    noise = np.random.default_rng(0).integers(-1000, 1000, (6, 6, 600))  # compresses badly: a long data stream
    write_nifti_atomic(noise, p, AFFINE, dtype="int16")
    write_nifti_atomic(np.zeros((6, 6, 600)), task / "labelsTr" / "lung_002.nii.gz", AFFINE, dtype="uint8")
    p.write_bytes(p.read_bytes()[:-2000])  # header fine, data stream cut
    assert not convert(task, tmp_path / "a", progress=False).problems  # header-only check passes
    report = convert(task, tmp_path / "b", verify=True, progress=False)
    assert [i for i, _ in report.problems] == [str(p.resolve())]


@pytest.mark.parametrize("spacing", [["1", "2"]])
def test_spacing_needs_one_or_three_values(tmp_path: Path, spacing) -> None:
    task = make_task(tmp_path, n_train=1, n_test=0)
    assert main(["--root", str(task), "--out", str(tmp_path / "o"), "--spacing", *spacing]) == 2
