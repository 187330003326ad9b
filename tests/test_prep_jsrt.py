"""Tests of medspan.data_prep.jsrt_scr on fixtures in the exact JSRT + SCR formats.

JSRT ``.IMG``: 2048 x 2048, 16-bit big-endian, 12 bits used, no header (8,388,608 bytes). SCR:
``scratch/fold{1,2}/masks/<left lung|right lung|heart|left clavicle|right clavicle>/<id>.gif``,
1024 x 1024 black/white GIFs; "left lung" is the patient's left, on the image right.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from medspan.data_prep import jsrt_scr as js
from medspan.data_prep.cxr_common import CacheSpec
from PIL import Image

from medspan.data.datalist import load_datalist
from medspan.errors import DataError

# fold of each fixture case (SCR: fold 1 and fold 2)
CASES = {"JPCLN001": 1, "JPCNN001": 1, "JPCNN002": 1, "JPCLN002": 2}


def raw_pattern(seed: int) -> np.ndarray:
    """12-bit values 0..4095 that use the high byte and the low byte."""
    r, c = np.mgrid[0:2048, 0:2048]
    return ((r * 7 + c * 13 + seed * 101) % 4096).astype(np.uint16)


def write_img(path: Path, raw: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw.astype(">u2").tobytes())


def scr_masks(swap: bool = False) -> dict[str, np.ndarray]:
    """1024 x 1024 masks: patient's left lung on the image RIGHT, heart centre-right, clavicles on top."""
    m = {s: np.zeros((1024, 1024), bool) for s in js.STRUCTURES}
    m["right_lung"][200:800, 100:420] = True
    m["left_lung"][200:800, 600:920] = True
    m["heart"][500:800, 420:700] = True
    m["right_clavicle"][100:140, 150:480] = True
    m["left_clavicle"][100:140, 560:880] = True
    if swap:
        m["left_lung"], m["right_lung"] = m["right_lung"], m["left_lung"]
    return m


def make_jsrt(base: Path, cases=CASES, swap: tuple[str, ...] = ()) -> tuple[Path, Path]:
    images = base / "JSRT" / "All247images"
    for k, cid in enumerate(cases):
        write_img(images / f"{cid}.IMG", raw_pattern(k))
    for cid, fold in cases.items():
        for s, m in scr_masks(cid in swap).items():
            d = base / "scr" / "scratch" / f"fold{fold}" / "masks" / js.SCR_FOLDERS[s]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m.astype(np.uint8) * 255).save(d / f"{cid}.gif")
    return base / "JSRT", base / "scr"


# ------------------------------------------------------------------------------- raw decoding


def test_read_jsrt_img_bit_exact_and_format_errors(tmp_path):
    raw = raw_pattern(3)
    write_img(tmp_path / "JPCLN003.IMG", raw)
    got = js.read_jsrt_img(tmp_path / "JPCLN003.IMG")
    assert got.dtype == np.uint16 and got.shape == (2048, 2048) and np.array_equal(got, raw)
    # first pixels by hand: big-endian bytes of 303, 316 (seed 3 -> 303; +13 per column)
    assert (tmp_path / "JPCLN003.IMG").read_bytes()[:4] == bytes([0x01, 0x2F, 0x01, 0x3C])
    assert got[0, 0] == 303 and got[0, 1] == 316 and got[1, 0] == 310
    (tmp_path / "little.IMG").write_bytes(raw.astype("<u2").tobytes())
    with pytest.raises(DataError, match="exceeds 12 bits"):
        js.read_jsrt_img(tmp_path / "little.IMG")
    (tmp_path / "short.IMG").write_bytes(raw.astype(">u2").tobytes()[:-2])
    with pytest.raises(DataError, match="8388606 bytes"):
        js.read_jsrt_img(tmp_path / "short.IMG")


def test_full_size_16bit_cache_is_exact(tmp_path):
    images, scr = make_jsrt(tmp_path, {"JPCLN001": 1})
    path, report = js.convert(images, tmp_path / "out", CacheSpec(size=0, bits=16), scr=scr, test_fold=None,
                              val_fraction=0, progress=False)
    assert report.problems == []
    got = np.asarray(Image.open(tmp_path / "out/images/JPCLN001.png"))
    assert got.dtype == np.uint16 and got.shape == (2048, 2048)
    expected = np.rint((4095.0 - raw_pattern(0)) * 65535.0 / 4095.0).astype(np.uint16)
    assert np.array_equal(got, expected)  # inverted: raw 0 (dark film) -> white 65535
    # 1024 -> 2048: every SCR pixel becomes a 2 x 2 block, exactly
    for s, m in scr_masks().items():
        mask = np.asarray(Image.open(tmp_path / f"out/masks/JPCLN001_{s}.png"))
        assert np.array_equal(mask, np.kron(m, np.ones((2, 2), bool)).astype(np.uint8) * 255), s
    e = json.loads(path.read_text())["training"][0]
    assert e["spacing_mm"] == [0.175, 0.175] and e["labels"] == [1]


def test_convert_folds_structures_sides_and_rerun(tmp_path):
    images, scr = make_jsrt(tmp_path, swap=("JPCNN002",))
    out = tmp_path / "out"
    args = ["--root", str(images), "--scr", str(scr), "--out", str(out), "--size", "64", "--val-fraction", "0.34",
            "--quiet", "--workers", "2"]
    assert js.main(args) == 0
    doc = json.loads((out / "datalist.json").read_text())
    assert doc["structures"] == list(js.STRUCTURES) and doc["classes"] == ["nodule"]
    assert [e["case_id"] for e in doc["test"]] == ["JPCLN002"]  # fold 2
    assert sorted(e["case_id"] for e in doc["training"] + doc["validation"]) == ["JPCLN001", "JPCNN001", "JPCNN002"]
    assert len(doc["validation"]) == 1
    ent = {e["case_id"]: e for s in ("training", "validation", "test") for e in doc[s]}
    assert ent["JPCLN001"]["labels"] == [1] and ent["JPCNN001"]["labels"] == [0] and ent["JPCLN002"]["fold"] == 2
    assert ent["JPCLN001"]["label"] == [f"masks/JPCLN001_{s}.png" for s in js.STRUCTURES]
    assert ent["JPCLN001"]["spacing_mm"] == [5.6, 5.6]
    # image: 32 x 32 block means of 4095 - raw, 8 bits
    img = np.asarray(Image.open(out / "images/JPCLN001.png"))
    mean = (4095.0 - raw_pattern(0)).reshape(64, 32, 64, 32).mean(axis=(1, 3))
    assert np.array_equal(img, np.rint(mean * 255.0 / 4095.0).astype(np.uint8))
    # masks: 16 x 16 blocks, inside when >= half covered
    for s, m in scr_masks().items():
        got = np.asarray(Image.open(out / f"masks/JPCLN001_{s}.png")) > 0
        assert np.array_equal(got, m.reshape(64, 16, 64, 16).mean(axis=(1, 3)) >= 0.5), s
    left = np.asarray(Image.open(out / "masks/JPCLN001_left_lung.png")) > 0
    assert np.nonzero(left)[1].mean() > 32  # the patient's left lung lies on the image right
    rep = json.loads((out / "report.json").read_text())
    assert [(p["item"], "left_lung mask lies left of right_lung" in p["reason"]) for p in rep["problems"]] == \
        [("JPCNN002", True)]
    # re-run: nothing rewritten, the same left/right problem found again; strict -> 1
    files = sorted(out.glob("*/*.png"))
    before = {p: p.stat().st_mtime_ns for p in files}
    assert js.main(args + ["--strict"]) == 1
    assert {p: p.stat().st_mtime_ns for p in files} == before
    rep = json.loads((out / "report.json").read_text())
    assert rep["counts"]["skipped_existing"] == 4 and len(rep["problems"]) == 1


def test_bad_files_reported_and_exemplar(tmp_path):
    images, scr = make_jsrt(tmp_path)
    (images / "All247images" / "JPCNN004.IMG").write_bytes(b"\x00" * 100)              # corrupt (wrong size)
    (scr / "scratch/fold1/masks/heart/JPCNN002.gif").unlink()                           # a mask missing
    write_img(images / "All247images" / "JPCNN003.IMG", raw_pattern(9))                 # image without masks
    write_img(images / "JPCLN002.IMG", raw_pattern(8))                                   # duplicate case id
    for s in js.STRUCTURES:                                                              # masks in both folds
        d = scr / "scratch/fold2/masks" / js.SCR_FOLDERS[s]
        (d / "JPCNN001.gif").write_bytes((scr / "scratch/fold1/masks" / js.SCR_FOLDERS[s] / "JPCNN001.gif").read_bytes())
        (d / "JPCLN099.gif").write_bytes((d / "JPCLN002.gif").read_bytes())             # masks, image missing
        d1 = scr / "scratch/fold1/masks" / js.SCR_FOLDERS[s]
        (d1 / "JPCNN004.gif").write_bytes((d1 / "JPCNN001.gif").read_bytes())            # the corrupt one's
    out = tmp_path / "out"
    path, report = js.convert(images, out, CacheSpec(size=32), scr=scr, test_fold=2, val_fraction=0.5,
                              structures=("left_lung", "right_lung", "heart"), exemplar="jpcln001", sigma=2.0,
                              progress=False)
    reasons = dict(report.problems)
    assert set(reasons) == {str(images / "All247images/JPCLN002.IMG"), str(images / "All247images/JPCNN002.IMG"),
                            "JPCNN001", "JPCLN099", "JPCNN003", str(images / "All247images/JPCNN004.IMG")}, reasons
    assert "a JSRT image is 8388608" in reasons[str(images / "All247images/JPCNN004.IMG")]
    assert "repeats" in reasons[str(images / "All247images/JPCLN002.IMG")]  # the top-level file is used
    assert "masks in fold 1 and fold 2" in reasons["JPCNN001"]
    assert "SCR masks without a JSRT image" in reasons["JPCLN099"]
    assert "SCR masks missing for ['heart']" in reasons[str(images / "All247images/JPCNN002.IMG")]
    assert "no SCR masks" in reasons["JPCNN003"]
    doc = json.loads(path.read_text())
    assert doc["structures"] == ["left_lung", "right_lung", "heart"]
    assert sorted(e["case_id"] for s in ("training", "validation", "test") for e in doc[s]) == ["JPCLN001", "JPCLN002"]
    assert not (out / "masks/JPCLN001_left_clavicle.png").exists()
    # the exemplar prior: the exemplar's masks softened, (S, x, y) MONAI order
    from medspan.atlas.statistics import soften_masks
    from medspan.recipes.cxr import exemplar_masks

    span = json.loads((out / "span_datalist.json").read_text())
    assert span["structures"] == ["left_lung", "right_lung", "heart"]
    assert span["exemplar"]["prior"] == "priors/exemplar_JPCLN001.npy" and span["exemplar"]["mask_sigma"] == 2.0
    prior = np.load(out / span["exemplar"]["prior"]).astype(np.float32)
    expected = soften_masks(exemplar_masks([out / p for p in span["exemplar"]["label"]]), sigma=2.0)
    assert prior.shape == (3, 32, 32) and np.allclose(prior, expected.astype(np.float16).astype(np.float32))
    assert np.argmax(prior[0].sum(axis=1)) > 16  # left lung: large x (image right)
    train_ids = sorted(e["case_id"] for e in span["training"])
    assert train_ids == sorted(e["case_id"] for e in doc["training"] + doc["validation"])
    assert all(e["prior"] == "priors/exemplar_JPCLN001.npy" for e in span["training"])
    assert all(e["case_id"] != "JPCLN001" for e in span["validation"])
    # both datalists pass medspan's validation (files exist, masks have their image's shape)
    assert len(load_datalist(path, "test", require=("image", "label"), check_shapes=True)) == 1
    assert len(load_datalist(out / "span_datalist.json", "training", require=("image", "prior"))) == len(train_ids)


# ------------------------------------------------------------------- PNG exports (public mirrors)


def block_picture(seed: int) -> np.ndarray:
    """An 8-bit 2048 x 2048 picture constant on 32 x 32 blocks, values multiples of 17 (= k * 255 / 15)."""
    r, c = np.mgrid[0:64, 0:64]
    blocks = ((r * 3 + c * 5 + seed) % 16 * 17).astype(np.uint8)
    return np.kron(blocks, np.ones((32, 32), np.uint8))


def raw_of(picture: np.ndarray) -> np.ndarray:
    """The 12-bit raw JSRT values of the same pixels: 4095 - raw = picture * 4095 / 255 exactly (k * 273)."""
    return (4095 - (picture.astype(np.int64) // 17) * 273).astype(np.uint16)


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_png_exports_with_png_and_gif_masks_give_the_img_outputs(tmp_path):
    cases = {"JPCLN001": 1, "JPCNN001": 2}
    pics = {cid: block_picture(k) for k, cid in enumerate(cases)}
    # the raw .IMG tree with SCR's GIF masks in fold folders
    img_root, img_scr = make_jsrt(tmp_path / "raw", cases)
    for k, cid in enumerate(cases):
        write_img(img_root / "All247images" / f"{cid}.IMG", raw_of(pics[cid]))
    # the mirror: PNG exports (one at 2048, one at 1024 named .IMG.png), masks as PNG (one at image size) and GIF
    png_root, png_scr = tmp_path / "mirror/images", tmp_path / "mirror/scr"
    save_png(png_root / "JPCLN001.png", pics["JPCLN001"])
    save_png(png_root / "sub" / "JPCNN001.IMG.png", pics["JPCNN001"][::2, ::2])  # 16 x 16 blocks at 1024
    for cid, fold in cases.items():
        for s, m in scr_masks().items():
            d = png_scr / f"fold{fold}" / "masks" / js.SCR_FOLDERS[s]
            d.mkdir(parents=True, exist_ok=True)
            if s == "heart":
                save_png(d / f"{cid}.png", np.kron(m, np.ones((2, 2), bool)).astype(np.uint8) * 255)  # 2048 x 2048
            elif s == "left_lung":
                Image.fromarray(m.astype(np.uint8) * 255).save(d / f"{cid}.gif")
            else:
                save_png(d / f"{cid}.png", m.astype(np.uint8))  # 0/1 values
    kw = {"test_fold": 2, "val_fraction": 0.0, "progress": False}
    a_path, a_rep = js.convert(img_root, tmp_path / "out_img", CacheSpec(size=64), scr=img_scr, **kw)
    b_path, b_rep = js.convert(png_root, tmp_path / "out_png", CacheSpec(size=64), scr=png_scr, **kw)
    assert a_rep.problems == [] and b_rep.problems == []
    a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
    assert "(.IMG)" in a.pop("description") and "PNG exports" in b.pop("description")
    assert a == b  # same sections, entries (folds, labels, spacing_mm), structures, classes
    assert [e["case_id"] for e in b["test"]] == ["JPCNN001"] and b["test"][0]["spacing_mm"] == [5.6, 5.6]
    for e in b["training"] + b["test"]:
        for rel in [e["image"], *e["label"]]:
            got = np.asarray(Image.open(tmp_path / "out_png" / rel))
            assert np.array_equal(got, np.asarray(Image.open(tmp_path / "out_img" / rel))), rel
        img = np.asarray(Image.open(tmp_path / "out_png" / e["image"]))
        assert np.array_equal(img, pics[e["case_id"]][::32, ::32])  # block means of the blocks: exact
    for s, m in scr_masks().items():
        got = np.asarray(Image.open(tmp_path / f"out_png/masks/JPCLN001_{s}.png")) > 0
        assert np.array_equal(got, m.reshape(64, 16, 64, 16).mean(axis=(1, 3)) >= 0.5), s
    # an .IMG next to a PNG export of the same case wins (the PNG is counted, not a problem)
    save_png(img_root / "All247images" / "JPCLN001.png", np.zeros((64, 64), np.uint8))
    found_rep = js.Report("t", tmp_path)
    found = js.find_images(img_root, found_rep)
    assert found["JPCLN001"].suffix == ".IMG" and found_rep.counts["png_ignored_for_img"] == 1
    assert found_rep.problems == []


def test_flat_scr_mirror_layout_without_folds(tmp_path):
    root, scr = tmp_path / "images", tmp_path / "scr"
    cids = ["JPCLN001", "JPCLN002", "JPCNN001", "JPCNN002"]
    for k, cid in enumerate(cids):
        save_png(root / f"{cid}.png", block_picture(k)[::8, ::8])  # 256 x 256 exports
        for s, m in scr_masks().items():
            folder = s if s == "left_lung" else js.SCR_FOLDERS[s]  # "left_lung" or SCR's "right lung"
            save_png(scr / "masks" / folder / f"{cid}.png", m[::4, ::4].astype(np.uint8) * 255)
    assert {cid: fold for cid, (fold, _m) in js.find_scr_masks(scr).items()} == dict.fromkeys(cids, 0)
    path, report = js.convert(root, tmp_path / "out", CacheSpec(size=64), scr=scr, val_fraction=0.25,
                              structures=("left_lung", "right_lung", "heart"), progress=False)
    assert report.problems == []
    doc = json.loads(path.read_text())
    assert doc["test"] == [] and [len(doc["training"]), len(doc["validation"])] == [3, 1]
    entries = {e["case_id"]: e for e in doc["training"] + doc["validation"]}
    assert sorted(entries) == cids and all("fold" not in e for e in entries.values())
    assert entries["JPCLN002"]["labels"] == [1] and entries["JPCNN002"]["labels"] == [0]
    assert entries["JPCLN001"]["label"] == [f"masks/JPCLN001_{s}.png" for s in ("left_lung", "right_lung", "heart")]
    assert entries["JPCLN001"]["spacing_mm"] == [5.6, 5.6]
    img = np.asarray(Image.open(tmp_path / "out/images/JPCNN002.png"))
    assert np.array_equal(img, block_picture(3)[::32, ::32])  # 4 x 4 blocks of the export
    heart = np.asarray(Image.open(tmp_path / "out/masks/JPCLN001_heart.png")) > 0
    assert np.array_equal(heart, scr_masks()["heart"][::4, ::4].reshape(64, 4, 64, 4).mean(axis=(1, 3)) >= 0.5)
    assert len(load_datalist(path, "training", require=("image", "label"), check_shapes=True)) == 3
    with pytest.raises(DataError, match="no SCR masks here"):
        js.find_scr_masks(tmp_path / "images")
