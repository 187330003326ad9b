"""Tests of the synthetic anatomy set: phantom CXRs / CTs, their writers, CLI and overview."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from medspan.cli import main
from medspan.data.synthetic import (
    CT_STRUCTURES,
    CXR_STRUCTURES,
    case_seed,
    ct_geometry,
    nodule_malignancy,
    synth_ct,
    synth_cxr,
    write_ct_dataset,
    write_cxr_dataset,
)
from medspan.errors import DataError

CT_SHAPE = (48, 48, 48)


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.array(np.nonzero(mask)).mean(axis=1)


# --------------------------------------------------------------------------------------------- CXR


def test_cxr_same_seed_bit_identical_and_seeds_differ() -> None:
    a, b, c = synth_cxr(3, 96), synth_cxr(3, 96), synth_cxr(4, 96)
    assert a["image"].dtype == np.float32 and a["image"].shape == (96, 96)
    assert a["image"].tobytes() == b["image"].tobytes()
    for name in (*CXR_STRUCTURES, "body"):
        assert np.array_equal(a["masks"][name], b["masks"][name])
    assert not np.array_equal(a["image"], c["image"])
    assert not np.array_equal(a["masks"]["left_lung"], c["masks"]["left_lung"])


@pytest.mark.parametrize("seed", range(8))
def test_cxr_anatomy(seed: int) -> None:
    size = 128
    case = synth_cxr(seed, size)
    img, m = case["image"], case["masks"]
    assert case["structures"] == CXR_STRUCTURES == ("left_lung", "right_lung", "heart", "spine", "ribs", "clavicles")
    assert set(m) == {*CXR_STRUCTURES, "body"}
    assert 0.0 <= img.min() and img.max() <= 1.0
    for name, mask in m.items():
        assert mask.dtype == bool and mask.shape == (size, size)
        assert mask.any(), name
        assert not (mask & ~m["body"]).any(), f"{name} outside the body"
    # SCR convention: lungs and heart pairwise disjoint
    assert not (m["left_lung"] & m["right_lung"]).any()
    assert not (m["left_lung"] & m["heart"]).any()
    assert not (m["right_lung"] & m["heart"]).any()
    # PA view: patient's left lung on the image right, right lung on the image left
    cols = np.arange(size)[None, :]
    assert (np.broadcast_to(cols, m["left_lung"].shape)[m["left_lung"]] >= size / 2).mean() > 0.9
    assert (np.broadcast_to(cols, m["right_lung"].shape)[m["right_lung"]] < size / 2).mean() > 0.9
    heart, left, right, spine = (_centroid(m[k]) for k in ("heart", "left_lung", "right_lung", "spine"))
    # heart: between the lungs, shifted to the patient's left of the spine, lower than the lung centres
    assert right[1] < heart[1] < left[1]
    assert heart[1] > spine[1]
    assert heart[0] > left[0] and heart[0] > right[0]
    # intensities: outside air darkest, lungs darker than heart and spine (bright = dense)
    lungs = m["left_lung"] | m["right_lung"]
    air = img[~m["body"]].mean()
    assert air < img[lungs].mean() < img[m["heart"]].mean()
    assert img[lungs].mean() < img[m["spine"] & ~lungs].mean()


def test_cxr_shapes_vary_between_cases() -> None:
    cases = [synth_cxr(s, 96)["masks"] for s in range(6)]
    for i in range(6):
        for j in range(i + 1, 6):
            a, b = cases[i]["left_lung"], cases[j]["left_lung"]
            assert (a & b).sum() / (a | b).sum() < 0.97  # no two cases share the lung shape
    heart_area = np.array([c["heart"].sum() for c in cases])
    assert heart_area.std() / heart_area.mean() > 0.05


# ---------------------------------------------------------------------------------------------- CT


def test_ct_same_seed_bit_identical_and_seeds_differ() -> None:
    a, b, c = synth_ct(1, CT_SHAPE), synth_ct(1, CT_SHAPE), synth_ct(2, CT_SHAPE)
    assert a["image"].tobytes() == b["image"].tobytes()
    assert np.array_equal(a["nodules"], b["nodules"]) and a["nodule_records"] == b["nodule_records"]
    for name in a["masks"]:
        assert np.array_equal(a["masks"][name], b["masks"][name])
    assert not np.array_equal(a["image"], c["image"])


@pytest.mark.parametrize("seed", range(3))
def test_ct_anatomy_and_hu(seed: int) -> None:
    case = synth_ct(seed, CT_SHAPE, nodules=3)
    img, m = case["image"], case["masks"]
    assert img.dtype == np.float32 and img.shape == CT_SHAPE
    assert np.array_equal(img, np.rint(img)) and img.min() >= -1024 and img.max() <= 3071
    for name in ("body", *CT_STRUCTURES):
        assert m[name].shape == CT_SHAPE and m[name].any(), name
    body = m["body"]
    lungs = m["left_lung"] | m["right_lung"]
    for name in CT_STRUCTURES:
        assert not (m[name] & ~body).any(), f"{name} outside the body"
    assert not (m["left_lung"] & m["right_lung"]).any()
    assert not (lungs & m["heart"]).any()
    assert not (lungs & m["airways"]).any()
    assert not (m["vessels"] & ~lungs).any()
    # (z, y, x) with x -> patient left, y -> posterior, z -> head
    left, right, heart, airways = (_centroid(m[k]) for k in ("left_lung", "right_lung", "heart", "airways"))
    assert left[2] > CT_SHAPE[2] / 2 > right[2]
    assert heart[2] > (left[2] + right[2]) / 2  # heart towards the patient's left
    assert heart[1] < _centroid(lungs)[1]  # anterior
    assert airways[0] > heart[0]  # trachea above the heart
    # HU ranges
    assert -900 < np.median(img[lungs]) < -780
    assert 25 < np.median(img[m["heart"]]) < 65
    assert np.median(img[~body]) < -950
    assert np.median(img[m["spine"]]) > 300
    assert np.median(img[m["airways"]]) < -900


@pytest.mark.parametrize("seed", range(3))
def test_ct_nodules_inside_lungs_with_records(seed: int) -> None:
    case = synth_ct(seed, CT_SHAPE, nodules=3)
    labels, recs = case["nodules"], case["nodule_records"]
    lungs = case["masks"]["left_lung"] | case["masks"]["right_lung"]
    assert [r["label"] for r in recs] == [1, 2, 3]
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert not ((labels > 0) & ~lungs).any()
    geo = ct_geometry(CT_SHAPE, case["spacing"])
    for r in recs:
        z, y, x = r["centre_index_zyx"]
        assert labels[z, y, x] == r["label"]
        assert r["centre_voxel_xyz"] == [x, y, z]
        assert r["centre_mm_lps"] == pytest.approx([geo["x"][x], geo["y"][y], geo["z"][z]], abs=0.01)
        assert r["centre_mm_ras"] == pytest.approx((geo["affine"] @ [x, y, z, 1])[:3].tolist(), abs=0.01)
        assert 1 <= r["malignancy"] <= 5
        assert r["malignancy"] == nodule_malignancy(r["diameter_mm"], r["spiculation"], r["lobulation"], r["calcified"])
        assert 3.0 <= r["diameter_mm"] <= 30.0
        assert r["side"] == ("left" if case["masks"]["left_lung"][z, y, x] else "right")
    assert synth_ct(seed, (32, 32, 32), nodules=0)["nodule_records"] == []


def test_nodule_malignancy_rule() -> None:
    assert nodule_malignancy(5.0, 0.0, 0.0, False) == 1
    assert nodule_malignancy(14.0, 0.5, 0.5, False) == 3  # 1 + 1.1 + 0.7 + 0.4 = 3.2
    assert nodule_malignancy(28.0, 0.9, 0.8, False) == 5
    assert nodule_malignancy(28.0, 0.9, 0.8, True) == 1
    ratings = [nodule_malignancy(d, 0.3, 0.3, False) for d in range(3, 31)]
    assert ratings == sorted(ratings) and ratings[0] == 2 and ratings[-1] == 4  # 1.66 -> 2, 4.41 -> 4


def test_ct_geometry_affine() -> None:
    g = ct_geometry((10, 20, 30), (1.0, 2.0, 3.0))
    assert g["x"][0] == -14.5 and g["y"][0] == -19.0 and g["z"][0] == -13.5 - 10.0
    expected = np.array([[-1.0, 0, 0, 14.5], [0, -2.0, 0, 19.0], [0, 0, 3.0, -23.5], [0, 0, 0, 1]])
    assert np.array_equal(g["affine"], expected)
    assert nib.aff2axcodes(g["affine"]) == ("L", "P", "S")


def test_case_seed_depends_on_seed_and_index_only() -> None:
    assert case_seed(0, 5) == case_seed(0, 5)
    assert len({case_seed(0, i) for i in range(50)} | {case_seed(1, i) for i in range(50)}) == 100


# ------------------------------------------------------------------------------------------ writers


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_cxr_png16_round_trip_datalist_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "cxr"
    dl_path = write_cxr_dataset(out, 3, size=64, seed=7, fmt="png", val_fraction=0.34, bit_depth=16)
    assert dl_path == out / "dataset.json"
    dl = json.loads(dl_path.read_text())
    assert dl["modality"] == "CXR" and dl["structures"] == list(CXR_STRUCTURES)
    assert dl["spacing"] == [400 / 64, 400 / 64] and dl["test"] == []
    assert [e["case_id"] for e in dl["training"]] == ["cxr_0000", "cxr_0001"]
    assert [e["case_id"] for e in dl["validation"]] == ["cxr_0002"]  # floor(3 * 0.34) > floor(2 * 0.34)
    for i, entry in enumerate(dl["training"] + dl["validation"]):
        cid = f"cxr_{i:04d}"
        assert entry["image"] == f"images/{cid}.png"
        assert entry["label"] == [f"masks/{cid}_{s}.png" for s in CXR_STRUCTURES]
        case = synth_cxr(case_seed(7, i), 64)
        png = np.asarray(Image.open(out / entry["image"]))
        assert png.dtype == np.uint16 and np.array_equal(png, np.rint(case["image"] * 65535).astype(np.uint16))
        for s, rel in zip(CXR_STRUCTURES, entry["label"]):
            mask = np.asarray(Image.open(out / rel))
            assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
            assert np.array_equal(mask == 255, case["masks"][s])
        assert np.array_equal(np.asarray(Image.open(out / entry["body"])) == 255, case["masks"]["body"])
    # a re-run skips complete cases: nothing is rewritten but the bookkeeping files
    before = _mtimes(out)
    write_cxr_dataset(out, 3, size=64, seed=7, fmt="png", val_fraction=0.34, bit_depth=16)
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if k.startswith(("images", "masks"))} == {
        k: v for k, v in before.items() if k.startswith(("images", "masks"))
    }
    assert json.loads(dl_path.read_text()) == dl
    # an incomplete case is regenerated, identically; more cases leave the first ones untouched
    (out / "masks/cxr_0001_heart.png").unlink()
    write_cxr_dataset(out, 4, size=64, seed=7, fmt="png", val_fraction=0.34, bit_depth=16)
    again = _mtimes(out)
    assert again["images/cxr_0000.png"] == before["images/cxr_0000.png"]
    assert again["images/cxr_0001.png"] != before["images/cxr_0001.png"]
    assert "images/cxr_0003.png" in again
    assert np.array_equal(np.asarray(Image.open(out / "masks/cxr_0001_heart.png")) == 255, synth_cxr(case_seed(7, 1), 64)["masks"]["heart"])
    assert not list(out.rglob(".tmp-*"))
    with pytest.raises(DataError, match="other settings"):
        write_cxr_dataset(out, 3, size=96, seed=7)


def test_write_cxr_png8_and_dicom(tmp_path: Path) -> None:
    dl = json.loads(write_cxr_dataset(tmp_path / "p8", 1, size=64, seed=1, val_fraction=0.0).read_text())
    case = synth_cxr(case_seed(1, 0), 64)
    png = np.asarray(Image.open(tmp_path / "p8" / dl["training"][0]["image"]))
    assert png.dtype == np.uint8 and np.array_equal(png, np.rint(case["image"] * 255).astype(np.uint8))

    out = tmp_path / "dcm"
    dl = json.loads(write_cxr_dataset(out, 2, size=64, seed=1, fmt="dicom", val_fraction=0.0).read_text())
    uids = set()
    for i, entry in enumerate(dl["training"]):
        assert entry["image"] == f"images/cxr_{i:04d}.dcm"
        ds = pydicom.dcmread(out / entry["image"])
        assert (out / entry["image"]).read_bytes()[128:132] == b"DICM"
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.Modality == "DX"
        assert [float(v) for v in ds.PixelSpacing] == [400 / 64, 400 / 64]
        expected = np.rint(synth_cxr(case_seed(1, i), 64)["image"] * 65535).astype(np.uint16)
        assert np.array_equal(ds.pixel_array, expected)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        uids |= {ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID}
    assert len(uids) == 6 and all(pydicom.uid.UID(u).is_valid for u in uids)


def test_write_ct_nifti_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "ct"
    dl = json.loads(write_ct_dataset(out, 1, shape=CT_SHAPE, seed=3, nodules=2, val_fraction=0.0).read_text())
    assert dl["modality"] == "CT" and dl["structures"] == list(CT_STRUCTURES)
    assert dl["spacing"] == [8.0, 8.0, 7.0] and dl["shape"] == [48, 48, 48]
    (entry,) = dl["training"]
    assert entry["image"] == "images/ct_0000.nii.gz"
    assert entry["label"] == [f"masks/ct_0000_{s}.nii.gz" for s in CT_STRUCTURES]
    case = synth_ct(case_seed(3, 0), CT_SHAPE, nodules=2)
    assert entry["nodules"] == json.loads(json.dumps(case["nodule_records"]))
    nii = nib.load(out / entry["image"])
    assert nii.get_data_dtype() == np.int16
    assert np.array_equal(np.asarray(nii.dataobj), case["image"].transpose(2, 1, 0))
    assert np.allclose(nii.affine, case["affine"]) and nib.aff2axcodes(nii.affine) == ("L", "P", "S")
    assert nii.header.get_zooms() == (8.0, 8.0, 7.0)
    for s, rel in zip(CT_STRUCTURES, entry["label"]):
        m = nib.load(out / rel)
        assert np.array_equal(np.asarray(m.dataobj), case["masks"][s].transpose(2, 1, 0).astype(np.uint8))
        assert np.allclose(m.affine, nii.affine)
    lab = np.asarray(nib.load(out / entry["nodule_label"]).dataobj)
    assert np.array_equal(lab, case["nodules"].transpose(2, 1, 0))
    before = _mtimes(out)
    again = json.loads(write_ct_dataset(out, 1, shape=CT_SHAPE, seed=3, nodules=2, val_fraction=0.0).read_text())
    assert again == dl
    assert {k: v for k, v in _mtimes(out).items() if k.startswith("masks")} == {
        k: v for k, v in before.items() if k.startswith("masks")
    }


def test_write_ct_dicom_series(tmp_path: Path) -> None:
    import SimpleITK as sitk

    out = tmp_path / "ctd"
    shape = (24, 32, 40)
    dl = json.loads(write_ct_dataset(out, 1, shape=shape, seed=0, fmt="dicom", val_fraction=0.0).read_text())
    entry = dl["training"][0]
    case = synth_ct(case_seed(0, 0), shape)
    folder = out / entry["image"]
    assert entry["image"] == "images/ct_0000" and folder.is_dir()
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 24
    slices = sorted((pydicom.dcmread(f) for f in files), key=lambda d: int(d.InstanceNumber))
    vol = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices])
    assert np.array_equal(vol, case["image"])
    geo = ct_geometry(shape, case["spacing"])
    sx, sy, sz = case["spacing"]
    for k, d in enumerate(slices):
        assert [float(v) for v in d.ImagePositionPatient] == pytest.approx([geo["x"][0], geo["y"][0], geo["z"][k]], abs=1e-3)
        assert [float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in d.PixelSpacing] == pytest.approx([sy, sx])
    assert len({d.SeriesInstanceUID for d in slices}) == 1 and len({d.SOPInstanceUID for d in slices}) == 24
    # ITK sees the series and the NIfTI masks on the same grid
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    series = reader.Execute()
    mask = sitk.ReadImage(str(out / entry["label"][0]))
    assert np.allclose(series.GetOrigin(), mask.GetOrigin()) and np.allclose(series.GetSpacing(), mask.GetSpacing())
    assert np.allclose(series.GetDirection(), mask.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(series), case["image"])
    # an incomplete case is regenerated in place, the series folder included
    (out / entry["label"][2]).unlink()
    write_ct_dataset(out, 1, shape=shape, seed=0, fmt="dicom", val_fraction=0.0)
    assert len(list(folder.glob("*.dcm"))) == 24 and (out / entry["label"][2]).exists()
    assert pydicom.dcmread(folder / files[0].name).SOPInstanceUID == slices[0].SOPInstanceUID
    assert not list(out.rglob(".tmp-*"))


# ------------------------------------------------------------------------------------ CLI, overview


def test_cli_synth_and_overview(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli_cxr"
    assert main(["synth", "cxr", "--out", str(out), "--n", "2", "--size", "64", "--quiet"]) == 0
    assert f"datalist: {out / 'dataset.json'}" in capsys.readouterr().out
    dl = json.loads((out / "dataset.json").read_text())
    assert len(dl["training"]) + len(dl["validation"]) == 2
    png = tmp_path / "ov.png"
    args = ["overview", "--out", str(png), "--n-cxr", "2", "--n-ct", "1", "--shape", "32", "32", "32", "--tile", "96"]
    assert main(args) == 0
    img = Image.open(png)
    assert img.mode == "RGB" and img.size == (4 * 96, 56 + 3 * 96)
