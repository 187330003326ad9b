"""data_prep.folder: a mixed folder of DICOM / PNG / NIfTI -> unlabeled datalists, with DICOM checks.

The tree holds compressed CT series (JPEG 2000, JPEG-LS with RescaleSlope 2), a series with a
missing slice and one with mixed orientations, a folder mixing two series with a localizer, a
derived series, an RTSTRUCT and an SR, 2D radiographs, PNG, NIfTI and broken files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless

from medspan.data_prep.ct_common import write_ct_series
from medspan.io import write_nifti_atomic
from medspan.data_prep.folder import convert, main
from medspan.data.datalist import load_datalist
from medspan.data.readers import read_dicom_series

P = "1.2.826.0.1.3680043.8.498.55"


def hu(shape=(32, 32, 4), step: int = 1) -> np.ndarray:
    x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return (-1000.0 + step * (x + 3 * y + 40 * z)).astype(np.float64)


def non_image(path: Path, sop_class: str, modality: str, uid: str) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, uid, modality
    ds.SeriesInstanceUID, ds.PatientID = uid + ".0", "PAT-0001"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def radiograph(path: Path, uid: str, pixels: np.ndarray) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", uid
    ds.Modality, ds.PatientID, ds.SeriesInstanceUID = "CR", "PAT-0002", uid + ".0"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder") / "data"
    write_ct_series(
        root / "ct_j2k", hu(), (0.7, 0.7, 2.5), (-10, -10, -50), uid_prefix=P + ".1", transfer_syntax=JPEG2000Lossless
    )
    write_ct_series(
        root / "ct_jls",
        hu(step=2),
        (0.8, 0.9, 3.0),
        (0, 0, 0),
        uid_prefix=P + ".2",
        transfer_syntax=JPEGLSLossless,
        slope=2.0,
        intercept=-1024.0,
    )
    write_ct_series(root / "ct_missing", hu((8, 8, 5)), (1, 1, 2), (0, 0, 0), uid_prefix=P + ".3", skip=(2,))
    write_ct_series(root / "ct_mixed", hu((8, 8, 4)), (1, 1, 2), (0, 0, 0), uid_prefix=P + ".4")
    f = root / "ct_mixed" / "0003.dcm"
    ds = pydicom.dcmread(f)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal slice in an axial series
    ds.save_as(f)
    mixed = root / "study" / "all_in_one"
    write_ct_series(
        mixed, hu((8, 8, 3)), (1, 1, 2), (0, 0, 0), uid_prefix=P + ".5", series_number=1, file_names="a{k}.dcm"
    )
    write_ct_series(
        mixed, hu((8, 8, 2), 2), (1, 1, 5), (0, 0, 0), uid_prefix=P + ".5", series_number=2, file_names="b{k}.dcm"
    )
    write_ct_series(
        mixed,
        hu((8, 8, 2)),
        (1, 1, 2),
        (0, 0, 0),
        uid_prefix=P + ".5",
        series_number=3,
        file_names="c{k}.dcm",
        image_type=("DERIVED", "SECONDARY", "AXIAL"),
    )
    write_ct_series(
        mixed,
        hu((8, 8, 1)),
        (1, 1, 2),
        (0, 0, 0),
        uid_prefix=P + ".5",
        series_number=4,
        file_names="scout{k}.dcm",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    non_image(mixed / "rt.dcm", "1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT", P + ".6.1")
    non_image(mixed / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.22", "SR", P + ".6.2")
    cr = np.arange(12 * 16).reshape(12, 16) % 4000
    radiograph(root / "cxr" / "cr1.dcm", P + ".7.1", cr)
    shutil.copy(root / "cxr" / "cr1.dcm", root / "cxr" / "cr1_copy.dcm")  # duplicate SOPInstanceUID
    radiograph(root / "cxr" / "cr_broken.dcm", P + ".7.2", cr)
    broken = root / "cxr" / "cr_broken.dcm"
    broken.write_bytes(broken.read_bytes()[:-100])  # pixel data cut short
    Image.fromarray(np.arange(6 * 10, dtype=np.uint8).reshape(6, 10)).save(root / "cxr" / "p.png")
    (root / "cxr" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "cxr" / "notes.txt").write_text("hello")
    (root / "cxr" / "gone.dcm").symlink_to(root / "cxr" / "moved_away.dcm")  # a broken link
    (root / "cxr" / ".DS_Store").write_bytes(b"\x00\x01")
    write_nifti_atomic(hu((5, 6, 7)), root / "vol" / "v.nii.gz", np.diag([2.0, 2.0, 2.0, 1.0]), dtype="int16")
    return root


@pytest.fixture(scope="module")
def result(tree, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("out")
    report = convert(tree, out, progress=False)
    return {"out": out, "report": report}


def _by_source(out: Path, ndim: int) -> dict[str, dict]:
    doc = json.loads((out / f"datalist_{ndim}d.json").read_text())
    return {e["case_id"]: e for e in doc["training"]}


def test_compressed_series_decode_to_exact_hu_with_the_series_affine(tree, result) -> None:
    out = result["out"]
    entries = load_datalist(out / "datalist_3d.json", "training")
    by_uid = {e.get("series_instance_uid"): e for e in entries}
    for prefix, step, folder in ((P + ".1", 1, "ct_j2k"), (P + ".2", 2, "ct_jls")):
        e = by_uid[f"{prefix}.2.1"]
        assert e["image"].endswith(".nii.gz") and e["ndim"] == 3 and e["case_id"].startswith("PAT-0001_")
        img = nib.load(e["image"])
        assert np.array_equal(np.asarray(img.dataobj), hu(step=step))  # RescaleSlope 2 applied exactly
        assert img.get_data_dtype() == np.int16
        assert np.allclose(img.affine, read_dicom_series(tree / folder)[1]["affine"])
    assert pydicom.dcmread(tree / "ct_j2k" / "0000.dcm").file_meta.TransferSyntaxUID == JPEG2000Lossless


def test_series_problems_reported_per_series_and_the_rest_converted(tree, result) -> None:
    problems = dict(result["report"].problems)
    missing = problems[f"series {P}.3.2.1 ({tree / 'ct_missing'})"]
    assert "inconsistent slice gaps" in missing and "missing or extra slice" in missing and "0001.dcm" in missing
    mixed = problems[f"series {P}.4.2.1 ({tree / 'ct_mixed'})"]
    assert mixed.startswith(f"{tree / 'ct_mixed'}: mixed orientation in one series")
    assert (
        "truncated DICOM file: 284 bytes of pixel data, expected 384" in problems[str(tree / "cxr" / "cr_broken.dcm")]
    )
    assert "cannot read image" in problems[str(tree / "cxr" / "bad.png")]
    assert problems[str(tree / "cxr" / "cr1_copy.dcm")].startswith(f"duplicate SOPInstanceUID {P}.7.1")
    assert problems[str(tree / "cxr" / "gone.dcm")].endswith("file does not exist (broken link?)")
    assert len(problems) == 6
    counts = result["report"].counts
    assert counts["series_3d"] == 5  # j2k, jls, the two series of the mixed folder and the derived one
    assert (counts["non_image_objects"], counts["non_image_RTSTRUCT"], counts["non_image_SR"]) == (2, 1, 1)
    assert counts["localizers"] == 1 and counts["other_files"] == 1 and "derived_images" not in counts
    assert counts["images_2d"] == 2 and counts["volumes_3d"] == 1


def test_2d_entries_and_nifti_volume(tree, result) -> None:
    out = result["out"]
    two = _by_source(out, 2)
    assert sorted(two) == ["cxr__cr1", "cxr__p"]
    loaded = {e["case_id"]: e for e in load_datalist(out / "datalist_2d.json", "training")}
    assert Path(loaded["cxr__cr1"]["image"]) == tree / "cxr" / "cr1.dcm"
    assert Path(loaded["cxr__p"]["image"]) == tree / "cxr" / "p.png"
    assert (two["cxr__cr1"]["modality"], two["cxr__cr1"]["source"]) == ("CR", "dicom2d")
    assert two["cxr__p"]["source"] == "file2d"
    three = _by_source(out, 3)
    assert three["vol__v"]["source"] == "volume" and three["vol__v"]["ndim"] == 3
    everything = json.loads((out / "datalist.json").read_text())["training"]
    assert len(everything) == len(two) + len(three) == 8


def test_skip_derived_and_series_as_folder(tree, tmp_path: Path) -> None:
    out = tmp_path / "o"
    report = convert(tree, out, skip_derived=True, series_output="folder", verify=False, progress=False)
    assert report.counts["derived_images"] == 2 and report.counts["series_3d"] == 4
    assert report.counts["series_as_nifti_mixed_folder"] == 2  # the folder holds other series
    entries = {
        e["series_instance_uid"]: e
        for e in load_datalist(out / "datalist_3d.json", "training")
        if "series_instance_uid" in e
    }
    assert Path(entries[f"{P}.1.2.1"]["image"]) == tree / "ct_j2k"  # the folder itself
    assert entries[f"{P}.5.2.1"]["image"].endswith(".nii.gz")
    # without --verify, broken 2D files are not decoded: only the duplicate and the series are reported
    assert {i for i, _ in report.problems} == {
        f"series {P}.3.2.1 ({tree / 'ct_missing'})",
        f"series {P}.4.2.1 ({tree / 'ct_mixed'})",
        str(tree / "cxr" / "cr1_copy.dcm"),
        str(tree / "cxr" / "gone.dcm"),
    }


def test_rerun_changes_nothing_and_strict_exit(tree, tmp_path: Path) -> None:
    out = tmp_path / "o"
    args = ["--root", str(tree), "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert not [p for p in out.rglob(".*")]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith("report.")}
    assert main(args + ["--strict"]) == 1
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith("report.")}
    assert after == before
    assert json.loads((out / "report.json").read_text())["counts"]["skipped_existing"] == 5


def test_out_inside_root_is_not_scanned(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write_ct_series(root / "s", hu((8, 8, 2)), (1, 1, 1), (0, 0, 0), uid_prefix=P + ".9")
    report = convert(root, root / "prepared", progress=False)
    again = convert(root, root / "prepared", progress=False)
    assert report.counts["series_3d"] == again.counts["series_3d"] == 1
    assert "volumes_3d" not in again.counts  # the NIfTI it wrote was not picked up as input
