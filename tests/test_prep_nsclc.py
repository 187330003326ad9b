"""data_prep.nsclc_radiomics: CT series + RTSTRUCT / SEG (written here with pydicom) -> exact masks.

Contours have vertices on pixel-centre half-way points, so the filled pixels are known exactly
(pixel centres strictly inside the polygon).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as Seq
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from medspan.data_prep.ct_common import write_ct_series
from medspan.data_prep.nsclc_radiomics import convert, main, norm_name
from medspan.data.datalist import load_datalist
from medspan.data.readers import read_dicom_series

NX, NY, NZ = 24, 20, 5
SX, SY, SZ = 0.5, 0.5, 2.0
ORIGIN = (-6.0, -5.0, 10.0)  # LPS of pixel (0, 0) of slice 0; slice k at z = 10 + 2k


def hu_volume() -> np.ndarray:
    x, y, z = np.meshgrid(np.arange(NX), np.arange(NY), np.arange(NZ), indexing="ij")
    return (-900.0 + 2 * x + 20 * y + 150 * z).astype(np.float64)


def lps(cols, rows, k) -> list[float]:
    """ContourData for pixel (column, row) points on slice k (IOP [1,0,0,0,1,0])."""
    out = []
    for c, r in zip(cols, rows):
        out += [ORIGIN[0] + c * SX, ORIGIN[1] + r * SY, ORIGIN[2] + k * SZ]
    return out


def box(c0, r0, c1, r1, k) -> list[float]:
    return lps([c0, c1, c1, c0], [r0, r0, r1, r1], k)


def base(sop_class: str, modality: str, uid: str, patient: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = f"{uid}.1"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, f"{uid}.1"
    ds.Modality, ds.PatientID = modality, patient
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{uid}.9", uid
    return ds


def write_rtstruct(
    path: Path,
    ct: list[dict],
    patient: str,
    rois: dict[str, list[tuple[list[float], int | None]]],
    ref_series: str | None = None,
    frame: str = "1.2.3.4.4",
) -> None:
    """rois: name -> [(ContourData, referenced slice k or None)]."""
    ds = base("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT", f"5.6.7.{abs(hash(str(path))) % 10**8}", patient)
    ref_se = Dataset()
    ref_se.SeriesInstanceUID = ref_series or ct[0]["series_instance_uid"]
    ref_st = Dataset()
    ref_st.RTReferencedSeriesSequence = Seq([ref_se])
    fr = Dataset()
    fr.FrameOfReferenceUID = frame
    fr.RTReferencedStudySequence = Seq([ref_st])
    ds.ReferencedFrameOfReferenceSequence = Seq([fr])
    ssroi, roic = [], []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        s = Dataset()
        s.ROINumber, s.ROIName, s.ReferencedFrameOfReferenceUID = number, name, frame
        ssroi.append(s)
        items = []
        for data, k in contours:
            c = Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(data) // 3
            c.ContourData = [f"{v:.4f}" for v in data]
            if k is not None:
                img = Dataset()
                img.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
                img.ReferencedSOPInstanceUID = ct[k]["sop_instance_uid"]
                c.ContourImageSequence = Seq([img])
            items.append(c)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ContourSequence = Seq(items)
        roic.append(rc)
    ds.StructureSetROISequence = Seq(ssroi)
    ds.ROIContourSequence = Seq(roic)
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def write_seg(path: Path, ct: list[dict], patient: str, frames: list[tuple[int, int, np.ndarray, bool]]) -> None:
    """frames: (segment number, slice k, mask (x, y) bool, reference by SOP UID?)."""
    from pydicom.pixels import pack_bits

    ds = base("1.2.840.10008.5.1.4.1.1.66.4", "SEG", "8.8.8.1", patient)
    ds.FrameOfReferenceUID = "1.2.3.4.4"
    ref = Dataset()
    ref.SeriesInstanceUID = ct[0]["series_instance_uid"]
    ds.ReferencedSeriesSequence = Seq([ref])
    segs = []
    for n, label in ((1, "GTV-1"), (2, "Heart")):
        s = Dataset()
        s.SegmentNumber, s.SegmentLabel = n, label
        segs.append(s)
    ds.SegmentSequence = Seq(segs)
    ds.SegmentationType = "BINARY"
    ds.Rows, ds.Columns, ds.NumberOfFrames = NY, NX, len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    per_frame = []
    for n, k, _, by_sop in frames:
        fg = Dataset()
        ident = Dataset()
        ident.ReferencedSegmentNumber = n
        fg.SegmentIdentificationSequence = Seq([ident])
        pos = Dataset()
        pos.ImagePositionPatient = [f"{v:.4f}" for v in ct[k]["position"]]
        fg.PlanePositionSequence = Seq([pos])
        if by_sop:
            src = Dataset()
            src.ReferencedSOPInstanceUID = ct[k]["sop_instance_uid"]
            der = Dataset()
            der.SourceImageSequence = Seq([src])
            fg.DerivationImageSequence = Seq([der])
        per_frame.append(fg)
    ds.PerFrameFunctionalGroupsSequence = Seq(per_frame)
    stack = np.stack([m.T for _, _, m, _ in frames]).astype(np.uint8)  # (frames, rows, cols)
    ds.PixelData = pack_bits(stack)
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def pix(c0, r0, c1, r1) -> np.ndarray:
    m = np.zeros((NX, NY), bool)
    m[c0 : c1 + 1, r0 : r1 + 1] = True
    return m


def make_patient_rt(root: Path, patient: str = "LUNG1-001", prefix: str = "1.2.826.0.1.3680043.8.498.91") -> dict:
    study = root / patient / "01-01-2000-StudyID-12345"
    ct = write_ct_series(
        study / "0.000000-NA-82046",
        hu_volume(),
        (SX, SY, SZ),
        ORIGIN,
        uid_prefix=prefix,
        patient_id=patient,
        file_names="1-{k:03d}.dcm",
    )
    rois = {
        "GTV-1": [
            (box(2.5, 3.5, 6.5, 7.5, 1), 1),  # cols 3..6, rows 4..7 on slice 1 (by SOP UID)
            (box(2.5, 3.5, 6.5, 7.5, 2), None),  # slice 2 by z ...
            (box(3.5, 4.5, 4.5, 5.5, 2), None),
        ],  # ... with a hole at col 4, row 5 (XOR)
        "Lung-Left": [(box(10.5, 1.5, 15.5, 3.5, 3), 3)],  # cols 11..15, rows 2..3
        "Heart": [(box(1.5, 1.5, 3.5, 3.5, 50), None)],  # z = 110: on no slice
    }
    rt = study / "1.000000-NA-14566" / "1-1.dcm"
    write_rtstruct(rt, ct, patient, rois)
    return {"ct": ct, "rt": rt, "series_dir": ct[0]["path"].parent}


def expected_rt() -> dict[str, np.ndarray]:
    gtv = np.zeros((NX, NY, NZ), np.uint8)
    gtv[..., 1] = pix(3, 4, 6, 7)
    gtv[..., 2] = pix(3, 4, 6, 7) & ~pix(4, 5, 4, 5)
    lung = np.zeros_like(gtv)
    lung[..., 3] = pix(11, 2, 15, 3)
    return {"GTV-1": gtv, "Lung-Left": lung, "Heart": np.zeros_like(gtv)}


# ------------------------------------------------------------------------------------- tests


def test_norm_name() -> None:
    assert norm_name("Lung-Left") == norm_name("lung_left") == norm_name("LUNG LEFT") == "lungleft"


def test_rtstruct_masks_exact_aligned_and_problem_for_off_series_contour(tmp_path: Path) -> None:
    case = make_patient_rt(tmp_path / "NSCLC-Radiomics")
    out = tmp_path / "out"
    report = convert(tmp_path / "NSCLC-Radiomics", out, val_fraction=0.0, progress=False)
    hu, meta = read_dicom_series(case["series_dir"])
    img = nib.load(out / "images" / "LUNG1-001.nii.gz")
    assert np.array_equal(np.asarray(img.dataobj), hu_volume()) and np.allclose(img.affine, meta["affine"])
    for name, exp in expected_rt().items():
        m = nib.load(out / "masks" / "LUNG1-001" / f"{name}.nii.gz")
        assert m.get_data_dtype() == np.uint8 and np.allclose(m.affine, meta["affine"])
        assert np.array_equal(np.asarray(m.dataobj), exp), name
    assert report.problems == [
        ("LUNG1-001", f"{case['rt']}: structure 'Heart': 1 contour(s)/frame(s) fall on no CT slice")
    ]
    (e,) = load_datalist(out / "datalist.json", "training", require=("image", "label"), check_shapes=True)
    assert sorted(e["label"]) == ["GTV-1", "Heart", "Lung-Left"] and e["patient_id"] == "LUNG1-001"


def test_seg_frames_by_sop_or_position_on_a_jpegls_series(tmp_path: Path) -> None:
    root = tmp_path / "NSCLC-Radiomics"
    study = root / "LUNG1-002" / "study"
    ct = write_ct_series(
        study / "ct",
        hu_volume(),
        (SX, SY, SZ),
        ORIGIN,
        uid_prefix="1.2.826.0.1.3680043.8.498.92",
        patient_id="LUNG1-002",
        transfer_syntax=JPEGLSLossless,
    )
    assert pydicom.dcmread(ct[0]["path"]).file_meta.TransferSyntaxUID == JPEGLSLossless
    a, b, c = pix(1, 1, 4, 2), pix(5, 5, 9, 12), pix(20, 0, 23, 19)
    write_seg(study / "seg" / "1-1.dcm", ct, "LUNG1-002", [(1, 0, a, True), (1, 1, b, False), (2, 4, c, True)])
    out = tmp_path / "out"
    report = convert(root, out, structures=["gtv 1", "HEART"], val_fraction=0.0, progress=False)
    assert not report.problems
    assert np.array_equal(np.asarray(nib.load(out / "images" / "LUNG1-002.nii.gz").dataobj), hu_volume())  # decoded
    gtv = np.asarray(nib.load(out / "masks" / "LUNG1-002" / "GTV-1.nii.gz").dataobj)
    heart = np.asarray(nib.load(out / "masks" / "LUNG1-002" / "Heart.nii.gz").dataobj)
    exp_gtv = np.zeros((NX, NY, NZ), np.uint8)
    exp_gtv[..., 0], exp_gtv[..., 1] = a, b
    exp_heart = np.zeros_like(exp_gtv)
    exp_heart[..., 4] = c
    assert np.array_equal(gtv, exp_gtv) and np.array_equal(heart, exp_heart)
    doc = json.loads((out / "datalist.json").read_text())
    assert doc["structures"] == ["gtv 1", "HEART"]
    assert doc["training"][0]["label"] == ["masks/LUNG1-002/GTV-1.nii.gz", "masks/LUNG1-002/Heart.nii.gz"]


def test_bad_input_reported_rest_converted_rerun_and_strict(tmp_path: Path) -> None:
    root = tmp_path / "NSCLC-Radiomics"
    good = make_patient_rt(root)
    # an RTSTRUCT whose CT series is not there
    write_rtstruct(
        root / "LUNG1-003" / "s" / "rt" / "1-1.dcm",
        good["ct"],
        "LUNG1-003",
        {"GTV-1": [(box(2.5, 3.5, 6.5, 7.5, 1), None)]},
        ref_series="1.2.3.404",
        frame="1.2.3.405",
    )
    # a corrupt (truncated) second RTSTRUCT for the first patient's CT
    bad = root / "LUNG1-004" / "s" / "rt" / "1-1.dcm"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(good["rt"].read_bytes()[:-20])
    # the same CT series copied under another patient folder
    shutil.copytree(good["series_dir"], root / "LUNG1-005" / "s" / "ct")
    # a case missing a requested structure
    pat6 = root / "LUNG1-006" / "s"
    ct6 = write_ct_series(
        pat6 / "ct",
        hu_volume(),
        (SX, SY, SZ),
        ORIGIN,
        uid_prefix="1.2.826.0.1.3680043.8.498.96",
        patient_id="LUNG1-006",
    )
    write_rtstruct(pat6 / "rt" / "1-1.dcm", ct6, "LUNG1-006", {"Lung-Left": [(box(10.5, 1.5, 15.5, 3.5, 3), 3)]})

    out = tmp_path / "out"
    args = ["--root", str(root), "--out", str(out), "--structures", "GTV-1", "--val-fraction", "0", "--quiet"]
    assert main(args) == 0
    problems = json.loads((out / "report.json").read_text())["problems"]
    reasons = {p["item"]: p["reason"] for p in problems if p["item"] != "LUNG1-001"}
    assert (
        "refers to CT series 1.2.3.404, which is not under" in reasons[str(root / "LUNG1-003" / "s" / "rt" / "1-1.dcm")]
    )
    assert reasons[str(root / "LUNG1-005" / "s" / "ct")].startswith("duplicate CT series")
    assert "structure(s) ['GTV-1'] not found; it has ['Lung-Left']" in reasons["LUNG1-006"]
    case1 = [p["reason"] for p in problems if p["item"] == "LUNG1-001"]
    (broken,) = [r for r in case1 if r.startswith(f"{bad}: ")]  # the broken RTSTRUCT; its CT is still converted
    assert "truncated file?" in broken
    assert any(r.startswith(f"{good['rt']}: structure 'Heart'") for r in case1)
    assert len(problems) == 5
    assert [e["case_id"] for e in load_datalist(out / "datalist.json", "training")] == ["LUNG1-001"]
    assert (out / "masks" / "LUNG1-006" / "Lung-Left.nii.gz").is_file()  # converted, only left out of the datalist
    assert not [p for p in out.rglob(".*")]

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith("report.")}
    assert main(args + ["--strict"]) == 1
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith("report.")}
    assert after == before
    assert json.loads((out / "report.json").read_text())["counts"]["skipped_existing"] == 2


def test_structure_set_matched_by_frame_of_reference(tmp_path: Path) -> None:
    root = tmp_path / "r"
    ct = write_ct_series(
        root / "P" / "ct", hu_volume(), (SX, SY, SZ), ORIGIN, uid_prefix="1.2.826.0.1.3680043.8.498.97", patient_id="P"
    )
    write_rtstruct(
        root / "P" / "rt" / "1.dcm",
        ct,
        "P",
        {"GTV-1": [(box(2.5, 3.5, 6.5, 7.5, 1), 1)]},
        ref_series="1.2.3.999",
        frame="1.2.826.0.1.3680043.8.498.97.4",
    )
    report = convert(root, tmp_path / "out", val_fraction=0.0, progress=False)
    assert not report.problems and report.counts["cases"] == 1
