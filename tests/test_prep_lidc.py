"""data_prep.lidc_idri: LIDC reader XML + CT series -> reader masks, consensus, malignancy, crops.

A tiny case is built in the TCIA layout (``LIDC-IDRI-0001/<study>/<series>/*.dcm`` + XML in the
namespace http://www.nih.gov) with rectangular outlines whose masks are known exactly; the
``real_data`` test converts LIDC-IDRI-0001 of ``../shared/data/real/lidc_idri_ctc_slabs``.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medspan.data_prep.ct_common import write_ct_series
from medspan.data_prep.lidc_idri import consensus, convert, group_annotations, main, parse_lidc_xml, roi_pixels
from medspan.data.datalist import load_datalist
from medspan.data.readers import read_dicom_series

REAL = Path(__file__).resolve().parents[2] / "shared/data/real" / "lidc_idri_ctc_slabs"
needs_real = pytest.mark.skipif(not (REAL / "LIDC-IDRI-0001" / "69.xml").is_file(), reason=f"{REAL} not present")

NX, NY, NZ = 24, 20, 6
SPACING = (0.7, 0.8, 2.5)
ORIGIN = (-10.0, -20.0, -100.0)  # slice k at z = -100 + 2.5 k
PREFIX = "1.2.826.0.1.3680043.8.498.77"


def rect_outline(x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
    """The closed pixel chain around the rectangle [x0..x1] x [y0..y1] (as LIDC edge maps)."""
    top = [(x, y0) for x in range(x0, x1 + 1)]
    right = [(x1, y) for y in range(y0 + 1, y1 + 1)]
    bottom = [(x, y1) for x in range(x1 - 1, x0 - 1, -1)]
    left = [(x0, y) for y in range(y1 - 1, y0, -1)]
    return top + right + bottom + left


def rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((NX, NY), bool)
    m[x0 : x1 + 1, y0 : y1 + 1] = True
    return m


def roi_xml(z: float, sop: str, points, inclusion: bool = True) -> str:
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in points)
    return (
        f"<roi><imageZposition>{z:.6f} </imageZposition><imageSOP_UID>{sop}</imageSOP_UID>"
        f"<inclusion>{'TRUE' if inclusion else 'FALSE'}</inclusion>{edges}</roi>"
    )


def nodule_xml(nid: str, malignancy: int | None, rois: list[str]) -> str:
    chars = (
        ""
        if malignancy is None
        else (
            f"<characteristics><subtlety>5</subtlety><spiculation>2</spiculation><malignancy>{malignancy}</malignancy>"
            "</characteristics>"
        )
    )
    return f"<unblindedReadNodule><noduleID>{nid}</noduleID>{chars}{''.join(rois)}</unblindedReadNodule>"


def lidc_xml(series_uid: str, sessions: list[str]) -> str:
    body = "".join(
        f"<readingSession><annotationVersion>3.12</annotationVersion>"
        f"<servicingRadiologistID>{1000 + i}</servicingRadiologistID>{s}</readingSession>"
        for i, s in enumerate(sessions)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<LidcReadMessage uid="1.2.3" xmlns="http://www.nih.gov">'
        f"<ResponseHeader><Version>1.8.1</Version><SeriesInstanceUid>{series_uid}</SeriesInstanceUid>"
        f"<StudyInstanceUID>{PREFIX}.1</StudyInstanceUID></ResponseHeader>{body}</LidcReadMessage>"
    )


def hu_volume() -> np.ndarray:
    x, y, z = np.meshgrid(np.arange(NX), np.arange(NY), np.arange(NZ), indexing="ij")
    return (-1000.0 + x + 10 * y + 100 * z).astype(np.float64)


def make_case(root: Path, patient: str = "LIDC-IDRI-0001", prefix: str = PREFIX) -> dict:
    """One patient in the TCIA layout; returns the slice records and the series folder."""
    series_dir = root / patient / f"{prefix}.1" / f"{prefix}.2.1"
    slices = write_ct_series(series_dir, hu_volume(), SPACING, ORIGIN, uid_prefix=prefix, patient_id=patient)
    sop = {s["k"]: s["sop_instance_uid"] for s in slices}
    z = {k: -100.0 + 2.5 * k for k in range(NZ)}
    r1 = nodule_xml(
        "Nodule 001",
        5,
        [roi_xml(z[1], sop[1], rect_outline(5, 4, 9, 8)), roi_xml(z[2], sop[2], rect_outline(5, 4, 9, 8))],
    )
    r1 += "<nonNodule><nonNoduleID>x</nonNoduleID><imageZposition>-90</imageZposition></nonNodule>"
    r2 = nodule_xml(
        "IL057_1",
        4,
        [
            roi_xml(z[1], sop[1], rect_outline(6, 5, 10, 9)),
            roi_xml(z[2], "9.9.9", rect_outline(6, 5, 10, 9)),  # unknown SOP: matched by z
            roi_xml(z[2], "9.9.9", rect_outline(8, 6, 9, 7), inclusion=False),
        ],
    )
    r3 = nodule_xml("0", 3, [roi_xml(z[2], sop[2], rect_outline(4, 4, 8, 8))])
    r3 += nodule_xml("1", None, [roi_xml(z[4], sop[4], [(15, 15)])])  # a small (< 3 mm) nodule: one point
    r3 += nodule_xml(
        "2",
        2,
        [roi_xml(z[4], sop[4], rect_outline(15, 12, 18, 15)), roi_xml(-80.0, "8.8.8", rect_outline(15, 12, 16, 13))],
    )  # z not in the series
    xml = series_dir / "069.xml"
    xml.write_text(lidc_xml(f"{prefix}.2.1", [r1, r2, r3]))
    return {"series_dir": series_dir, "xml": xml, "slices": slices}


def expected_masks() -> dict[str, np.ndarray]:
    r1 = np.zeros((NX, NY, NZ), np.uint8)
    r2 = np.zeros_like(r1)
    r3 = np.zeros_like(r1)
    r1[..., 1][rect(5, 4, 9, 8)] = 1
    r1[..., 2][rect(5, 4, 9, 8)] = 1
    r2[..., 1][rect(6, 5, 10, 9)] = 1
    r2[..., 2][rect(6, 5, 10, 9) & ~rect(8, 6, 9, 7)] = 1
    r3[..., 2][rect(4, 4, 8, 8)] = 1
    nodule_a = (r1 > 0).astype(int) + (r2 > 0) + (r3 > 0)
    cons = np.where(nodule_a >= 2, 1, 0).astype(np.uint8)  # 3 readers: at least 2
    r3[..., 4][rect(15, 12, 18, 15)] = 2
    cons[..., 4][rect(15, 12, 18, 15)] = 2  # one reader: their mask
    return {"reader1": r1, "reader2": r2, "reader3": r3, "consensus": cons}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lidc")
    case = make_case(root / "LIDC-IDRI")
    out = root / "out"
    report = convert(root / "LIDC-IDRI", out, crop_size=6, crop_spacing=0, val_fraction=0.0, progress=False)
    return {"out": out, "report": report, **case}


# ------------------------------------------------------------------------------------- units


def test_roi_pixels_fill_plus_outline_and_point_marks() -> None:
    square = roi_pixels(np.array(rect_outline(1, 2, 3, 4)), rows=6, cols=5)
    expected = sorted(r * 5 + c for r in range(2, 5) for c in range(1, 4))
    assert square.tolist() == expected
    assert roi_pixels(np.array([[4, 1]]), rows=6, cols=5).tolist() == [1 * 5 + 4]  # a point mark = its pixel
    assert roi_pixels(np.array([[9, 9]]), rows=6, cols=5).size == 0  # outside the image: dropped


def test_group_annotations_links_overlap_or_close_centroids_of_different_readers() -> None:
    keys = [np.array([1, 2]), np.array([2, 3]), np.array([7]), np.array([50]), np.array([60])]
    cents = [[0, 0, 0], [30, 0, 0], [100, 0, 0], [103, 0, 0], [0, 200, 0]]
    readers = [1, 2, 3, 1, 2]
    groups = group_annotations(keys, cents, readers, max_distance=5.0)
    assert sorted(groups) == [[0, 1], [2, 3], [4]]
    # two annotations of the same reader are never linked directly, even when they overlap
    assert sorted(group_annotations([np.array([1]), np.array([1])], [[0, 0, 0], [0, 0, 0]], [1, 1], 5.0)) == [[0], [1]]


def test_consensus_is_at_least_half_of_the_readers() -> None:
    a, b, c, d = np.array([0, 1, 2]), np.array([0, 1]), np.array([0]), np.array([3])
    assert consensus([a, b, c, d]).tolist() == [0, 1]  # >= 2 of 4
    assert consensus([a, b, c]).tolist() == [0, 1]  # >= 2 of 3 (1.5 rounds up)
    assert consensus([a, d]).tolist() == [0, 1, 2, 3]  # 1 of 2: the union
    assert consensus([b], n_readers=3).tolist() == []


def test_parse_xml_readers_characteristics_rois(tmp_path: Path) -> None:
    xml = lidc_xml("1.2.3.4", [nodule_xml("N", 4, [roi_xml(-95.0, "5.6", [(1, 2), (3, 2), (3, 4)], False)])])
    p = tmp_path / "a.xml"
    p.write_text(xml)
    read = parse_lidc_xml(p)
    assert read.series_uid == "1.2.3.4" and read.readers == ["1000"]
    nod = read.nodules[0]
    assert (nod.reader, nod.nodule_id, nod.malignancy, nod.characteristics["spiculation"]) == (1, "N", 4, 2)
    roi = nod.rois[0]
    assert (roi.z, roi.sop_uid, roi.inclusion, roi.points.tolist()) == (-95.0, "5.6", False, [[1, 2], [3, 2], [3, 4]])


# ------------------------------------------------------------------------------- conversion


def test_outputs_have_the_series_affine_and_hu(converted) -> None:
    out = converted["out"]
    hu, meta = read_dicom_series(converted["series_dir"])
    img = nib.load(out / "images" / "LIDC-IDRI-0001.nii.gz")
    assert img.get_data_dtype() == np.int16
    assert np.array_equal(np.asarray(img.dataobj), hu_volume())
    assert np.allclose(img.affine, meta["affine"])
    # RAS: x and y flipped from LPS; z ascending from the first slice
    assert np.allclose(img.affine @ [0, 0, 0, 1], [10.0, 20.0, -100.0, 1])
    assert np.allclose(img.affine @ [1, 1, 1, 1], [10.0 - 0.7, 20.0 - 0.8, -97.5, 1])
    for name in ("consensus", "reader1"):
        m = nib.load(out / "masks" / f"LIDC-IDRI-0001_{name}.nii.gz")
        assert np.allclose(m.affine, meta["affine"]) and m.shape == (NX, NY, NZ)


def test_reader_masks_and_consensus_are_exact(converted) -> None:
    out = converted["out"]
    exp = expected_masks()
    for name, mask in exp.items():
        got = np.asarray(nib.load(out / "masks" / f"LIDC-IDRI-0001_{name}.nii.gz").dataobj)
        assert got.dtype == np.uint8
        assert np.array_equal(got, mask), name


def test_case_record_groups_votes_and_counts(converted) -> None:
    rec = json.loads((converted["out"] / "cases" / "LIDC-IDRI-0001.json").read_text())
    a, b = rec["nodules"]
    assert (a["number"], a["readers"], a["malignancy_votes"], a["malignancy_median"]) == (1, [1, 2, 3], [5, 4, 3], 4.0)
    assert (b["number"], b["readers"], b["malignancy_votes"], b["malignancy_median"]) == (2, [3], [2], 2.0)
    assert a["consensus_voxels"] == int((expected_masks()["consensus"] == 1).sum())
    assert a["consensus_slices_z"] == [-97.5, -95.0]
    assert rec["rois_outside_series"] == 1  # reader 3's roi at z = -80
    assert [s["nodule_id"] for s in rec["small_nodules"]] == ["1"] and rec["non_nodules"] == 1
    assert converted["report"].counts["small_nodules"] == 1 and not converted["report"].problems


def test_native_grid_crops_copy_the_voxels_and_cls_datalist(converted) -> None:
    out = converted["out"]
    entries = load_datalist(out / "datalist_nodule_cls.json", "training", require=("image", "label"))
    assert [(e["case_id"], e["label"], e["malignancy"]) for e in entries] == [
        ("LIDC-IDRI-0001_nodule1", 1, 4.0),
        ("LIDC-IDRI-0001_nodule2", 0, 2.0),
    ]
    raw = json.loads((out / "datalist_nodule_cls.json").read_text())  # mask paths: relative to the datalist
    cons = expected_masks()["consensus"]
    padded = np.pad(hu_volume(), 3, constant_values=-1024)
    mpadded = np.pad(cons, 3)
    for e, number in zip(entries, (1, 2)):
        centre = np.rint(np.argwhere(cons == number).mean(axis=0)).astype(int)
        lo = centre - 3 + 3  # crop starts 3 voxels before the centre; +3 for the padding
        img = nib.load(e["image"])
        assert img.shape == (6, 6, 6)
        assert np.array_equal(np.asarray(img.dataobj), padded[lo[0] : lo[0] + 6, lo[1] : lo[1] + 6, lo[2] : lo[2] + 6])
        mask = np.asarray(nib.load(out / raw["training"][number - 1]["mask"]).dataobj)
        assert np.array_equal(mask, mpadded[lo[0] : lo[0] + 6, lo[1] : lo[1] + 6, lo[2] : lo[2] + 6] == number)
        series_affine = nib.load(out / "images" / "LIDC-IDRI-0001.nii.gz").affine
        assert np.allclose(img.affine @ [3, 3, 3, 1], series_affine @ np.append(centre, 1))


def test_seg_datalist_lists_consensus_and_reader_labels(converted) -> None:
    doc = json.loads((converted["out"] / "datalist_seg.json").read_text())
    (e,) = doc["training"]
    assert e["label"] == "masks/LIDC-IDRI-0001_consensus.nii.gz"
    assert e["reader_labels"] == [f"masks/LIDC-IDRI-0001_reader{r}.nii.gz" for r in (1, 2, 3)]
    assert e["patient_id"] == "LIDC-IDRI-0001" and e["n_nodules"] == 2


def test_isotropic_crop_is_centred_on_the_consensus(tmp_path: Path, converted) -> None:
    out = tmp_path / "iso"
    convert(converted["series_dir"].parents[2], out, crop_size=8, crop_spacing=1.0, val_fraction=0.0, progress=False)
    rec = json.loads((out / "cases" / "LIDC-IDRI-0001.json").read_text())
    nod = rec["nodules"][0]
    img = nib.load(out / nod["crop"])
    assert img.shape == (8, 8, 8)
    assert np.allclose(np.sqrt((img.affine[:3, :3] ** 2).sum(0)), 1.0)
    assert np.allclose(img.affine @ [3.5, 3.5, 3.5, 1], nod["consensus_centroid_ras_mm"] + [1], atol=1e-3)
    mask = np.asarray(nib.load(out / nod["crop_mask"]).dataobj)
    assert mask[3:5, 3:5, 3:5].all() and mask.sum() == nod["crop_mask_voxels"] > 0


# -------------------------------------------------------------------------------- bad input


def test_bad_input_is_reported_the_rest_converted_and_rerun_skips(tmp_path: Path) -> None:
    root = tmp_path / "LIDC-IDRI"
    good = make_case(root)
    # a truncated slice in another patient's series
    bad = make_case(root, "LIDC-IDRI-0002", prefix=PREFIX + "2")
    victim = bad["slices"][3]["path"]
    victim.write_bytes(victim.read_bytes()[:-300])  # pixel data cut short
    # an XML whose series is not there
    (root / "LIDC-IDRI-0003").mkdir()
    (root / "LIDC-IDRI-0003" / "100.xml").write_text(lidc_xml("1.2.3.999", []))
    # a corrupt XML
    (root / "LIDC-IDRI-0004").mkdir()
    (root / "LIDC-IDRI-0004" / "101.xml").write_text('<LidcReadMessage xmlns="http://www.nih.gov"><ResponseHeader><Ver')
    # the same series copied twice
    shutil.copytree(good["series_dir"], root / "copy_of_0001" / "series")
    (root / "copy_of_0001" / "series" / "069.xml").unlink()

    out = tmp_path / "out"
    args = ["--root", str(root), "--out", str(out), "--crop-size", "4", "--val-fraction", "0", "--quiet"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    reasons = {p["item"]: p["reason"] for p in report["problems"]}
    assert len(reasons) == 4, reasons
    (trunc,) = [r for i, r in reasons.items() if i.startswith("LIDC-IDRI-0002")]
    assert str(victim) in trunc and "truncated" in trunc
    assert "refers to CT series 1.2.3.999, which is not under" in reasons[str(root / "LIDC-IDRI-0003" / "100.xml")]
    assert "cannot parse the reader XML" in reasons[str(root / "LIDC-IDRI-0004" / "101.xml")]
    assert reasons[str(root / "copy_of_0001" / "series")].startswith(f"duplicate series {PREFIX}.2.1")
    assert [e["case_id"] for e in load_datalist(out / "datalist_seg.json", "training")] == ["LIDC-IDRI-0001"]
    assert not [p for p in out.rglob(".*")]  # no temporary files left

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith("report.")}
    assert main(args + ["--strict"]) == 1
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith("report.")}
    assert after == before
    assert json.loads((out / "report.json").read_text())["counts"]["skipped_existing"] == 1


# -------------------------------------------------------------------------------- real data


def _xml_reader_z(xml: Path) -> dict[int, set[float]]:
    ns = {"n": "http://www.nih.gov"}
    out: dict[int, set[float]] = {}
    for r, s in enumerate(ET.parse(xml).getroot().findall("n:readingSession", ns), start=1):
        for nod in s.findall("n:unblindedReadNodule", ns):
            rois = nod.findall("n:roi", ns)
            if any(len(roi.findall("n:edgeMap", ns)) >= 3 for roi in rois):
                out.setdefault(r, set()).update(float(roi.findtext("n:imageZposition", namespaces=ns)) for roi in rois)
    return out


@pytest.mark.real_data
@needs_real
def test_real_lidc_0001_nodule_masks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = convert(REAL / "LIDC-IDRI-0001", out, crop_size=16, progress=False)
    assert not report.problems
    img = nib.load(out / "images" / "LIDC-IDRI-0001.nii.gz")
    z_of_k = np.array([(img.affine @ [0, 0, k, 1])[2] for k in range(img.shape[2])])
    assert np.allclose(z_of_k, np.arange(-132.5, -94.9, 2.5))  # ascending z, 2.5 mm
    readers = [
        np.asarray(nib.load(out / "masks" / f"LIDC-IDRI-0001_reader{r}.nii.gz").dataobj) > 0 for r in range(1, 5)
    ]
    cons = np.asarray(nib.load(out / "masks" / "LIDC-IDRI-0001_consensus.nii.gz").dataobj) > 0
    assert cons.sum() > 1000
    # each reader's mask lies exactly on the slices of their outlines in the XML
    xml_z = _xml_reader_z(REAL / "LIDC-IDRI-0001" / "69.xml")
    for r, m in enumerate(readers, start=1):
        assert set(np.round(z_of_k[m.any(axis=(0, 1))], 3)) == xml_z[r], r
    assert set(np.round(z_of_k[cons.any(axis=(0, 1))], 3)) <= set.union(*xml_z.values())
    # the four readers overlap, and the consensus holds their common part
    common = np.logical_and.reduce(readers)
    assert common.sum() > 1000 and (cons | ~common).all()
    rec = json.loads((out / "cases" / "LIDC-IDRI-0001.json").read_text())
    (nod,) = rec["nodules"]
    assert nod["n_readers"] == 4 and sorted(nod["malignancy_votes"]) == [4, 5, 5, 5] and nod["malignancy_median"] == 5.0
    # an edge point of reader 1's first outline is in reader 1's mask at its slice
    ns = {"n": "http://www.nih.gov"}
    roi = (
        ET.parse(REAL / "LIDC-IDRI-0001" / "69.xml").getroot().find("n:readingSession/n:unblindedReadNodule/n:roi", ns)
    )
    k = int(np.argmin(np.abs(z_of_k - float(roi.findtext("n:imageZposition", namespaces=ns)))))
    for e in roi.findall("n:edgeMap", ns):
        assert readers[0][int(e.findtext("n:xCoord", namespaces=ns)), int(e.findtext("n:yCoord", namespaces=ns)), k]
