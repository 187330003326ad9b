"""Tests of data_prep.mhh_covid_lungs: the MHH COVID CXR lung set -> span_cxr datalist.

Unit tests use small synthetic stand-ins (known input -> known output); the tests marked
``real_data`` convert the real set at 64 x 64 and skip when ``../shared/data/real`` is absent.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from medspan.data_prep.mhh_covid_lungs import (
    STRUCTURES,
    Case,
    bundle_command,
    convert,
    load_lung_mask,
    main,
    read_manifest,
    resize_mask,
    seg_split,
    split_lungs,
)
from PIL import Image

from medspan.atlas.statistics import soften_masks
from medspan.data.datalist import load_datalist
from medspan.errors import DataError
from medspan.recipes.cxr import exemplar_masks

REAL_ROOT = Path(__file__).resolve().parents[2] / "shared/data/real" / "mhh_covid_cxr_v7_lungs"
needs_real = pytest.mark.skipif(not (REAL_ROOT / "manifest.csv").is_file(), reason=f"{REAL_ROOT} not present")


# ------------------------------------------------------------------------------- resize_mask


def test_resize_mask_block_counts_threshold_half():
    # 8x8 -> 4x4: block (0, k) holds k lung pixels of 4; lung when >= 2 of 4 (ties are lung)
    m = np.zeros((8, 8), bool)
    for k in range(4):
        cells = [(0, 0), (0, 1), (1, 0), (1, 1)][:k]
        for r, c in cells:
            m[r, 2 * k + c] = True
    m[6:8, 6:8] = True  # block (3, 3) full
    expected = np.zeros((4, 4), bool)
    expected[0, 2] = expected[0, 3] = expected[3, 3] = True
    assert np.array_equal(resize_mask(m, 4), expected)


def test_resize_mask_non_integer_ratio_exact_areas():
    # 3 -> 2: output row 0 covers source rows 0 and 1/2 of row 1 (weights 2:1 of 3)
    top = np.zeros((3, 3), bool)
    top[0] = True  # 2/3 of output row 0 -> lung; output row 1 -> none
    assert np.array_equal(resize_mask(top, 2), [[True, True], [False, False]])
    middle = np.zeros((3, 3), bool)
    middle[1] = True  # 1/3 of each output row -> background
    assert not resize_mask(middle, 2).any()
    bottom_two = np.zeros((3, 3), bool)
    bottom_two[1:] = True  # output row 0: 1/3, output row 1: all
    assert np.array_equal(resize_mask(bottom_two, 2), [[False, False], [True, True]])
    assert np.array_equal(resize_mask(np.ones((3, 5), bool), (2, 4)), np.ones((2, 4), bool))


def test_resize_mask_matches_block_mean_on_divisible_sizes():
    m = np.random.default_rng(0).random((40, 40)) < 0.5
    expected = m.reshape(8, 5, 8, 5).mean(axis=(1, 3)) >= 0.5
    assert np.array_equal(resize_mask(m, 8), expected)


# ------------------------------------------------------------------------------- split_lungs


def _blocks(h: int = 12, w: int = 20) -> tuple[np.ndarray, np.ndarray]:
    image_left = np.zeros((h, w), bool)
    image_left[2:11, 2:8] = True
    image_right = np.zeros((h, w), bool)
    image_right[2:11, 12:18] = True
    return image_left, image_right


def test_split_lungs_separate_components_and_stray_piece():
    image_left, image_right = _blocks()
    stray = np.zeros_like(image_left)
    stray[0, 16] = True  # a one-pixel piece on the image right belongs to the left lung
    left, right = split_lungs(image_left | image_right | stray)
    assert np.array_equal(right, image_left)  # patient's right lung = image left
    assert np.array_equal(left, image_right | stray)


def test_split_lungs_touching_lungs_cut_at_the_waist():
    image_left, image_right = _blocks()
    bridge = np.zeros_like(image_left)
    bridge[5, 8:12] = True  # lungs joined by a 1-pixel bridge over columns 8..11
    left, right = split_lungs(image_left | image_right | bridge)
    # fewest pixels in columns 8..11; the one nearest the middle (9.5) first: column 9
    exp_right = image_left.copy()
    exp_right[5, 8] = True
    exp_left = image_right.copy()
    exp_left[5, 9:12] = True
    assert np.array_equal(right, exp_right)
    assert np.array_equal(left, exp_left)


def test_split_lungs_single_lung_without_waist_is_not_cut():
    lung = np.zeros((12, 20), bool)
    lung[2:11, 1:9] = True
    left, right = split_lungs(lung)
    assert np.array_equal(right, lung) and not left.any()
    left, right = split_lungs(np.zeros((6, 6), bool))
    assert not left.any() and not right.any()


# ------------------------------------------------------------------------------- a small stand-in set


def _write_set(root: Path, n: int = 3, size: int = 40) -> Path:
    """n cases of 40x40: right lung (image left) rows 5..34 x cols 5..14, left lung cols 25..34,
    a 127 ("ignore") strip at rows 35..39 x cols 5..14. At 8x8 (5x5 cells): exact blocks."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for i in range(n):
        cid = f"c{i}"
        img = np.full((size, size), 40 + 50 * i, np.uint8)
        Image.fromarray(img).save(root / "images" / f"{cid}.jpg", quality=95)
        m = np.zeros((size, size), np.uint8)
        m[5:35, 5:15] = 255
        m[5:35, 25:35] = 255
        m[35:40, 5:15] = 127
        Image.fromarray(m).save(root / "masks" / f"{cid}.png")
        rows.append({"image": f"images/{cid}.jpg", "mask": f"masks/{cid}.png", "mhh_image_id": cid})
    _write_manifest(root / "manifest.csv", rows)
    return root


def _write_manifest(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _png(path: Path | str) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_convert_small_set_exact_masks_and_datalist(tmp_path):
    root = _write_set(tmp_path / "src")
    path = convert(root, tmp_path / "out", size=8, exemplar="c1", mask_sigma=1.0)
    out = tmp_path / "out"
    assert path == out.resolve() / "span_datalist.json"
    exp_right = np.zeros((8, 8), np.uint8)
    exp_right[1:8, 1:3] = 255  # rows 1..6 lung + row 7 from the 127 strip (ignore_as_lung)
    exp_left = np.zeros((8, 8), np.uint8)
    exp_left[1:7, 5:7] = 255
    for i in range(3):
        assert np.array_equal(_png(out / "masks" / f"c{i}_right_lung.png"), exp_right)
        assert np.array_equal(_png(out / "masks" / f"c{i}_left_lung.png"), exp_left)
        im = Image.open(out / "images" / f"c{i}.png")
        assert (im.mode, im.size) == ("L", (8, 8))
        assert abs(int(np.asarray(im).mean()) - (40 + 50 * i)) <= 2
    doc = json.loads(path.read_text())
    assert doc["structures"] == ["left_lung", "right_lung"]
    assert doc["exemplar"]["case_id"] == "c1"
    assert doc["exemplar"]["prior"] == "priors/exemplar_c1.npy"
    assert [e["case_id"] for e in doc["training"]] == ["c0", "c1", "c2"]
    assert all(e["prior"] == "priors/exemplar_c1.npy" for e in doc["training"])
    assert [e["case_id"] for e in doc["validation"]] == ["c0", "c2"]
    assert doc["validation"][0]["label"] == ["masks/c0_left_lung.png", "masks/c0_right_lung.png"]
    prior = np.load(out / "priors" / "exemplar_c1.npy")
    expected = soften_masks(np.stack([exp_left.T > 0, exp_right.T > 0]), sigma=1.0).astype(np.float16)
    assert prior.dtype == np.float16 and np.array_equal(prior, expected)


def test_convert_ignore_as_background_and_index_exemplar(tmp_path):
    root = _write_set(tmp_path / "src")
    path = convert(root, tmp_path / "out", size=8, exemplar="2", ignore_as_lung=False)
    exp_right = np.zeros((8, 8), np.uint8)
    exp_right[1:7, 1:3] = 255
    assert np.array_equal(_png(tmp_path / "out/masks/c0_right_lung.png"), exp_right)
    assert json.loads(path.read_text())["exemplar"]["case_id"] == "c2"


def test_convert_errors_name_the_file(tmp_path):
    root = _write_set(tmp_path / "src")
    (root / "images" / "c1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"c1\.jpg: cannot read image"):
        convert(root, tmp_path / "o1", size=8)

    root = _write_set(tmp_path / "src2")
    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(root / "masks" / "c2.png")
    with pytest.raises(DataError, match=r"c2\.png: unexpected mask values \[7\]"):
        convert(root, tmp_path / "o2", size=8)

    root = _write_set(tmp_path / "src3")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(root / "masks" / "c0.png")
    with pytest.raises(DataError, match=r"c0\.png: mask is 40x30 but its image"):
        convert(root, tmp_path / "o3", size=8)

    root = _write_set(tmp_path / "src4")
    os.remove(root / "masks" / "c2.png")
    with pytest.raises(DataError, match=r"masks/c2\.png: mask file listed in manifest\.csv row 3"):
        read_manifest(root)
    with pytest.raises(DataError, match=r"manifest\.csv: manifest not found"):
        convert(tmp_path / "nowhere", tmp_path / "o4")


def test_convert_bad_exemplar_and_settings_mismatch(tmp_path):
    root = _write_set(tmp_path / "src")
    with pytest.raises(DataError, match="exemplar 'zz' is not a case id"):
        convert(root, tmp_path / "out", size=8, exemplar="zz")
    with pytest.raises(DataError, match=r"exemplar index 3 out of range \(0\.\.2\)"):
        convert(root, tmp_path / "out", size=8, exemplar=3)
    convert(root, tmp_path / "out", size=8, mask_sigma=1.0)
    with pytest.raises(DataError, match="conversion.json: this folder was converted with"):
        convert(root, tmp_path / "out", size=4)
    before = np.load(tmp_path / "out/priors/exemplar_c0.npy")
    convert(root, tmp_path / "out", size=8, mask_sigma=2.0)  # another sigma: the prior is remade
    after = np.load(tmp_path / "out/priors/exemplar_c0.npy")
    assert not np.array_equal(before, after)
    settings = json.loads((tmp_path / "out/conversion.json").read_text())
    assert settings["priors"] == {"exemplar_c0.npy": {"mask_sigma": 2.0}}


def test_convert_with_workers_matches_serial_and_reports_errors(tmp_path):
    root = _write_set(tmp_path / "src")
    convert(root, tmp_path / "serial", size=8)
    convert(root, tmp_path / "pool", size=8, workers=2)
    for name in ("masks/c2_left_lung.png", "masks/c2_right_lung.png", "images/c2.png"):
        assert np.array_equal(_png(tmp_path / "serial" / name), _png(tmp_path / "pool" / name))
    assert (tmp_path / "serial/span_datalist.json").read_text() == (tmp_path / "pool/span_datalist.json").read_text()
    (root / "images" / "c2.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match=r"c2\.jpg: cannot read image"):
        convert(root, tmp_path / "pool2", size=8, workers=2)


def test_cli_prints_datalist_and_bundle_command(tmp_path, capsys):
    root = _write_set(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["--root", str(root), "--out", str(out), "--size", "8", "--exemplar", "c0", "--sigma", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    datalist = out.resolve() / "span_datalist.json"
    assert lines[0] == f"datalist: {datalist}"
    assert lines[2].strip() == (
        "python -m monai.bundle run --config_file bundles/span_cxr/train.json "
        f"--datalist {datalist} --run_name span_cxr_mhh "
        "--hparams::structures \"['left_lung','right_lung']\" "
        "--hparams::head_structures \"{'0':'left_lung','1':'right_lung'}\""
    )
    assert lines[2].strip() == bundle_command(datalist)
    assert main(["--root", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "manifest not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the cxr_seg datalist


def _cases(patients: list[str]) -> list[Case]:
    """One case per listed patient id, named c0, c1, ... (paths unused by seg_split)."""
    return [Case(f"c{i}", Path(f"c{i}.jpg"), Path(f"c{i}.png"), i + 1, p) for i, p in enumerate(patients)]


def test_seg_split_budget_exemplar_and_whole_patients():
    cases = _cases([f"p{i}" for i in range(10)])
    for seed in range(5):
        train, test = seg_split(cases, "c3", 4, seed)
        ids = [c.case_id for c in train]
        assert len(ids) == 4 and "c3" in ids
        assert sorted(ids + [c.case_id for c in test]) == sorted(c.case_id for c in cases)
        assert ids == sorted(ids, key=lambda k: int(k[1:]))  # manifest order kept
        assert seg_split(cases, "c3", 4, seed) == (train, test)  # fixed by the seed
    draws = {tuple(c.case_id for c in seg_split(cases, "c3", 4, seed)[0]) for seed in range(5)}
    assert len(draws) > 1  # the seed changes the draw
    # patients p0 and p1 hold two images each, p2 one: with budget 3 and the exemplar c0 (patient p0, 2 images)
    # only the one-image patient p2 fits, whatever the seed
    cases = _cases(["p0", "p0", "p1", "p1", "p2"])
    for seed in range(4):
        train, test = seg_split(cases, "c0", 3, seed)
        assert [c.case_id for c in train] == ["c0", "c1", "c4"] and [c.case_id for c in test] == ["c2", "c3"]
    with pytest.raises(ValueError, match="cannot pick exactly 1 training images from whole patients"):
        seg_split(cases, "c0", 1)
    with pytest.raises(ValueError, match=r"seg_train must be in 1\.\.4"):
        seg_split(cases, "c0", 5)
    with pytest.raises(ValueError, match="exemplar 'zz' is not one of the cases"):
        seg_split(cases, "zz", 2)


def test_convert_writes_seg_datalist_without_validation(tmp_path):
    root = _write_set(tmp_path / "src", n=4)
    path = convert(root, tmp_path / "out", size=8, exemplar="c2", seg_train=2, seed=1)
    seg = path.parent / "seg_datalist.json"
    doc = json.loads(seg.read_text())
    assert "validation" not in doc and doc["structures"] == ["left_lung", "right_lung"]
    assert (doc["seg_train"], doc["seed"], doc["exemplar"]["case_id"]) == (2, 1, "c2")
    train_ids = [e["case_id"] for e in doc["training"]]
    assert len(train_ids) == 2 and "c2" in train_ids
    assert sorted(train_ids + [e["case_id"] for e in doc["test"]]) == ["c0", "c1", "c2", "c3"]
    e = next(e for e in doc["training"] if e["case_id"] == "c2")
    # the small set has no mhh_patient_id column: the patient is the image id
    assert e == {"image": "images/c2.png", "label": ["masks/c2_left_lung.png", "masks/c2_right_lung.png"],
                 "case_id": "c2", "patient_id": "c2"}
    assert len(load_datalist(seg, "test", require=("image", "label"))) == 2
    # the same call again leaves the file alone; another seed or budget rewrites it
    before = seg.stat().st_mtime_ns
    convert(root, tmp_path / "out", size=8, exemplar="c2", seg_train=2, seed=1)
    assert seg.stat().st_mtime_ns == before
    convert(root, tmp_path / "out", size=8, exemplar="c2", seg_train=3, seed=1)
    assert len(json.loads(seg.read_text())["training"]) == 3
    with pytest.raises(ValueError, match=r"seg_train must be in 1\.\.3"):
        convert(root, tmp_path / "out", size=8, exemplar="c2", seg_train=4)
    # without seg_train no seg datalist is written
    convert(root, tmp_path / "plain", size=8)
    assert not (tmp_path / "plain" / "seg_datalist.json").exists()


def test_manifest_patient_id_column_and_cli_seg_train(tmp_path, capsys):
    root = _write_set(tmp_path / "src", n=3)
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r, pid in zip(rows, ["pa", "pb", ""]):
        r["mhh_patient_id"] = pid
    _write_manifest(root / "manifest.csv", rows)
    assert [c.patient_id for c in read_manifest(root)] == ["pa", "pb", "c2"]  # empty -> the image id
    out = tmp_path / "out"
    assert main(["--root", str(root), "--out", str(out), "--size", "8", "--seg-train", "2", "--seed", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"segmentation datalist (cxr_seg): {out.resolve()}/seg_datalist.json"
    doc = json.loads((out / "seg_datalist.json").read_text())
    assert {e["case_id"]: e["patient_id"] for e in doc["training"] + doc["test"]} == {"c0": "pa", "c1": "pb", "c2": "c2"}
    assert main(["--root", str(root), "--out", str(out), "--size", "8", "--seg-train", "3"]) == 2
    assert "seg_train must be in 1..2" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the real set


@pytest.fixture(scope="module")
def real64(tmp_path_factory):
    out = tmp_path_factory.mktemp("mhh") / "out"
    return convert(REAL_ROOT, out, size=64), out.resolve()


@needs_real
@pytest.mark.real_data
def test_real_images_and_masks(real64):
    _path, out = real64
    cases = read_manifest(REAL_ROOT)
    assert len(cases) == 35 and len(list((out / "images").glob("*.png"))) == 35
    for c in cases:
        im = Image.open(out / "images" / f"{c.case_id}.png")
        assert (im.mode, im.size) == ("L", (64, 64))
        left = _png(out / "masks" / f"{c.case_id}_left_lung.png")
        right = _png(out / "masks" / f"{c.case_id}_right_lung.png")
        for m in (left, right):
            assert m.dtype == np.uint8 and m.shape == (64, 64) and set(np.unique(m)) <= {0, 255}
        left, right = left > 0, right > 0
        assert not (left & right).any()
        # patient's left lung lies on the image right half (picture columns >= 32), and vice versa
        assert left[:, 32:].sum() > 0.8 * left.sum() > 0, c.case_id
        assert right[:, :32].sum() > 0.8 * right.sum() > 0, c.case_id
        assert np.array_equal(left | right, resize_mask(load_lung_mask(c.mask, True), 64)), c.case_id


@needs_real
@pytest.mark.real_data
def test_real_datalist_and_prior(real64):
    path, out = real64
    val = load_datalist(path, "validation", require=("image", "label"))
    assert len(val) == 34
    train = load_datalist(path, "training", require=("image", "prior"))
    assert len(train) == 35
    doc = json.loads(path.read_text())
    ex = doc["exemplar"]["case_id"]
    assert ex == read_manifest(REAL_ROOT)[0].case_id
    assert ex not in {e["case_id"] for e in val}
    assert doc["structures"] == list(STRUCTURES)
    prior = np.load(out / "priors" / f"exemplar_{ex}.npy")
    assert prior.shape == (2, 64, 64) and prior.dtype == np.float16
    masks = exemplar_masks([out / "masks" / f"{ex}_{s}.png" for s in STRUCTURES])
    assert np.array_equal(prior, soften_masks(masks, sigma=4.0).astype(np.float16))
    # MONAI (x, y) order: the left-lung channel's mass lies at x (= picture column) >= 32
    p = prior.astype(np.float32)
    assert p[0, 32:].sum() > 4 * p[0, :32].sum() and p[1, :32].sum() > 4 * p[1, 32:].sum()


@needs_real
@pytest.mark.real_data
def test_real_rerun_writes_nothing(real64):
    path, out = real64
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert convert(REAL_ROOT, out, size=64) == path
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert after == before


@needs_real
@pytest.mark.real_data
def test_real_missing_image_in_manifest(tmp_path):
    root = tmp_path / "copy"
    root.mkdir()
    for sub in ("images", "masks"):
        (root / sub).symlink_to(REAL_ROOT / sub, target_is_directory=True)
    with open(REAL_ROOT / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows[4]["image"] = "images/gone_missing.jpg"
    _write_manifest(root / "manifest.csv", rows)
    with pytest.raises(DataError, match=r"images/gone_missing\.jpg: image file listed in manifest\.csv row 5"):
        convert(root, tmp_path / "out", size=64)
    assert not (tmp_path / "out").exists()


@needs_real
@pytest.mark.real_data
def test_real_seg_datalist_5_train_30_test(real64):
    _path, out = real64
    convert(REAL_ROOT, out, size=64, seg_train=5, seed=0)  # the converted files are reused: only the datalist is new
    seg = out / "seg_datalist.json"
    train = load_datalist(seg, "training", require=("image", "label", "patient_id"))
    test = load_datalist(seg, "test", require=("image", "label", "patient_id"))
    assert (len(train), len(test)) == (5, 30)
    ex = read_manifest(REAL_ROOT)[0]
    assert ex.case_id in {e["case_id"] for e in train}
    with open(REAL_ROOT / "manifest.csv", newline="") as f:
        patient_of = {r["mhh_image_id"]: r["mhh_patient_id"] for r in csv.DictReader(f)}
    assert all(e["patient_id"] == patient_of[e["case_id"]] for e in train + test)
    assert not {e["patient_id"] for e in train} & {e["patient_id"] for e in test}
    assert "validation" not in json.loads(seg.read_text())
    seg.unlink()  # leave the shared fixture folder as the other tests expect it
