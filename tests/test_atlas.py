"""Tests of the atlas priors: build_priors, population priors, the report, the CLI and the defaults.

Small synthetic phantoms (64 px CXRs, 48^3 CTs) keep every test fast; the tests on the real MHH
radiographs and the real LIDC volume skip when ``../shared/data/real`` is absent.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medspan.data.datalist import load_datalist
from medspan.errors import DataError
from medspan.atlas.build import (
    build_priors,
    collect_images,
    exemplar_from_datalist,
    load_exemplar,
    registration_settings,
)
from medspan.atlas.report import format_report, priors_report
from medspan.atlas.statistics import (
    load_prior,
    population_prior,
    read_masks,
    resize_prior,
    soften_masks,
)

REPO = Path(__file__).resolve().parents[1]
REAL = Path(__file__).resolve().parents[2] / "shared/data/real"
STRUCT = ["left_lung", "right_lung", "heart"]
FAST = {"max_size": 64, "demons_iterations": (30, 15)}


@pytest.fixture(scope="module")
def cxr_set(tmp_path_factory) -> Path:
    """6 phantom CXRs at 64 px (5 training, 1 validation) with masks and dataset.json."""
    from medspan.data.synthetic import write_cxr_dataset

    return write_cxr_dataset(tmp_path_factory.mktemp("cxr"), n=6, size=64, seed=3, val_fraction=0.2)


def _settings(**kw):
    return registration_settings("demons", 2, **{**FAST, **kw})


# ---------------------------------------------------------------------------------- statistics


def test_resize_prior_and_population_prior_exact():
    a = np.zeros((1, 4, 4), np.float32)
    a[0, :2] = 1.0  # left half (x < 2)
    b = np.zeros((1, 8, 8), np.float32)  # another grid, empty
    pop = population_prior([a, b], (4, 4))
    np.testing.assert_allclose(pop[0, :2], 0.5)
    np.testing.assert_allclose(pop[0, 2:], 0.0)
    up = resize_prior(a, (8, 6))
    assert up.shape == (1, 8, 6) and up.dtype == np.float32
    np.testing.assert_allclose(up[0, :3], 1.0)  # x < 3 of 8 lies in the left half everywhere
    np.testing.assert_allclose(up[0, 5:], 0.0)
    with pytest.raises(ValueError, match="2 structures, the first had 1"):
        population_prior([a, np.zeros((2, 4, 4))], (4, 4))


def test_population_prior_of_mask_files(tmp_path):
    paths = []
    for k in range(2):
        m = np.zeros((6, 4), np.uint8)  # picture (rows, cols)
        m[: 3 + 3 * k, :] = 255
        p = tmp_path / f"m{k}.png"
        Image.fromarray(m).save(p)
        paths.append([str(p)])
    prior = population_prior((read_masks(p) for p in paths), (4, 6))  # MONAI (x, y) = (cols, rows)
    np.testing.assert_allclose(prior[0, :, :3], 1.0)
    np.testing.assert_allclose(prior[0, :, 3:], 0.5)


# ---------------------------------------------------------------------------------- exemplar


def test_exemplar_from_label_map_and_datalist(cxr_set, tmp_path):
    ex = exemplar_from_datalist(cxr_set, "cxr_0000", ["heart", "left_lung"])
    assert ex.structures == ("heart", "left_lung") and ex.masks.shape == (2, 64, 64) and ex.masks.any(axis=(1, 2)).all()
    lab = np.zeros((64, 64), np.uint8)  # picture order
    lab[ex.masks[0].T] = 5
    lab[ex.masks[1].T] = 2
    Image.fromarray(lab).save(tmp_path / "lab.png")
    ex2 = load_exemplar(ex.image, label_map=tmp_path / "lab.png", names="2:left_lung,5:heart", structures=["heart", "left_lung"])
    np.testing.assert_array_equal(ex2.masks, ex.masks)
    assert ex2.fingerprint() == ex.fingerprint()
    with pytest.raises(DataError, match="have no label value"):
        load_exemplar(ex.image, label_map=tmp_path / "lab.png", names="2:left_lung", structures=["heart"])
    with pytest.raises(DataError, match="no entry with case_id 'nope'"):
        exemplar_from_datalist(cxr_set, "nope")


def test_collect_images_dedupes_and_names(tmp_path, cxr_set):
    jobs, secs, meta = collect_images(cxr_set)
    doc = json.loads(Path(cxr_set).read_text())
    order = [e["case_id"] for e in doc["training"] + doc["validation"]]  # training, then validation
    assert [j["case_id"] for j in jobs] == order and sorted(order) == [f"cxr_{i:04d}" for i in range(6)]
    assert set(secs) == {"training", "validation"} and meta["structures"][0] == "left_lung"
    img = jobs[0]["image"]
    jobs2, _, _ = collect_images([{"image": img, "case_id": "a b"}, {"image": img}, {"image": jobs[1]["image"], "case_id": "a b"}])
    assert [j["case_id"] for j in jobs2] == ["a_b", "a_b_2"]


# ---------------------------------------------------------------------------------- build_priors


def test_build_priors_outputs_datalist_quality_and_report(cxr_set, tmp_path):
    ex = exemplar_from_datalist(cxr_set, "cxr_0000", STRUCT)
    out = tmp_path / "priors"
    res = build_priors(ex, cxr_set, out, sigma=2.0, settings=_settings(), progress=False)
    assert res.counts["exemplar"] == 1 and res.counts["failed"] == 0
    assert sum(res.counts.values()) == 6 and len(res.registered_now) == 6
    for r in res.records:
        prior = np.load(r["prior"])
        assert prior.dtype == np.float16 and prior.shape == (3, 64, 64)
        if r["status"] != "exemplar":
            assert r["jacobian"]["min"] > 0 and r["iterations"]["affine"] > 0
            assert set(r["metrics"]) >= {"metric_initial", "metric_affine", "metric_final", "ncc_final"}
    # the exemplar's prior is its own masks, softened
    ex_rec = next(r for r in res.records if r["status"] == "exemplar")
    np.testing.assert_array_equal(np.load(ex_rec["prior"]), soften_masks(ex.masks, 2.0).astype(np.float16))
    # datalist: every entry of both sections has a prior; labels kept, aligned with the structures
    for section in ("training", "validation"):
        entries = load_datalist(res.datalist, section, require=("image", "prior"), check_shapes=True)
        assert len(entries) == (5 if section == "training" else 1)
    doc = json.loads(res.datalist.read_text())
    assert doc["structures"] == STRUCT and doc["priors"]["method"] == "demons"
    assert json.loads((out / "quality.json").read_text())[1]["case_id"] == "cxr_0001"
    assert load_prior(res.population_prior).shape == (3, 64, 64)
    # report: Dice of the registered masks vs ground truth, compared with affine / population priors
    summary = priors_report(out, n_cases=1)
    d = summary["dice"]
    assert set(d) == {"registered", "affine", "population", "population_gt"}
    assert d["registered"]["mean"]["n"] == 5
    assert d["registered"]["left_lung"]["mean"] > 0.85 and d["registered"]["right_lung"]["mean"] > 0.85
    assert d["registered"]["mean"]["mean"] >= d["affine"]["mean"]["mean"] - 0.01
    assert Image.open(summary["overlay"]).size[0] > 64
    text = format_report(summary)
    assert "Dice vs ground truth on 5 images" in text and "population (GT, leave-one-out)" in text
    # a second run registers nothing and gives the same files
    before = {r["case_id"]: np.load(r["prior"]) for r in res.records}
    res2 = build_priors(ex, cxr_set, out, sigma=2.0, settings=_settings(), progress=False)
    assert res2.registered_now == []
    for r in res2.records:
        np.testing.assert_array_equal(np.load(r["prior"]), before[r["case_id"]])
    # other settings in the same folder: refused unless overwrite
    with pytest.raises(DataError, match="other settings"):
        build_priors(ex, cxr_set, out, sigma=3.0, settings=_settings(), progress=False)


def test_killed_run_resumes_with_only_the_rest(cxr_set, tmp_path):
    ex = exemplar_from_datalist(cxr_set, "cxr_0001", STRUCT)
    out = tmp_path / "priors"
    seen: list[str] = []

    def kill_after_two(rec):
        seen.append(rec["case_id"])
        if len(seen) == 2:
            raise KeyboardInterrupt  # what a Ctrl-C / kill between two images looks like

    with pytest.raises(KeyboardInterrupt):
        build_priors(ex, cxr_set, out, sigma=2.0, settings=_settings(), progress=False, on_record=kill_after_two)
    assert sorted(p.stem for p in (out / "quality").glob("*.json")) == sorted(seen)
    (out / "priors" / ".tmp-0123456789ab-cxr_0005.npy").write_bytes(b"half a file")  # a kill during a write
    again: list[str] = []
    res = build_priors(ex, cxr_set, out, sigma=2.0, settings=_settings(), progress=False, on_record=lambda r: again.append(r["case_id"]))
    everything = [f"cxr_{i:04d}" for i in range(6)]
    assert sorted(again) == sorted(set(everything) - set(seen)) and sorted(res.registered_now) == sorted(again)
    assert not any(p.name.startswith(".") for p in (out / "priors").iterdir())
    assert sum(res.counts.values()) == 6 and res.counts["failed"] == 0


def test_corrupt_image_is_a_named_failure_and_the_rest_complete(cxr_set, tmp_path):
    ex = exemplar_from_datalist(cxr_set, "cxr_0000", STRUCT)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    jobs, _, _ = collect_images(cxr_set, ["training"])
    entries = [{"image": j["image"], "case_id": j["case_id"]} for j in jobs[1:4]] + [{"image": str(bad), "case_id": "broken"}]
    res = build_priors(ex, entries, tmp_path / "out", sigma=2.0, settings=_settings(), progress=False)
    rec = next(r for r in res.records if r["case_id"] == "broken")
    assert rec["status"] == "failed" and rec["prior"] is None
    assert str(bad) in rec["error"] and "cannot read image" in rec["error"]
    others = [r for r in res.records if r["case_id"] != "broken"]
    assert len(others) == 3 and all(r["status"] in ("ok", "retried") and Path(r["prior"]).is_file() for r in others)
    doc = json.loads(res.datalist.read_text())
    assert len(doc["training"]) == 3 and doc["priors"]["excluded"][0]["case_id"] == "broken"
    summary = priors_report(tmp_path / "out")
    assert summary["counts"]["failed"] == 1 and summary["flagged"][0]["error"].startswith(str(bad))


def test_failed_registration_falls_back_to_the_population_prior(cxr_set, tmp_path):
    ex = exemplar_from_datalist(cxr_set, "cxr_0000", STRUCT)
    jobs, _, _ = collect_images(cxr_set, ["training"])
    inv = tmp_path / "inverted.png"  # contrast-inverted radiograph: the correlation checks reject it
    Image.fromarray(255 - np.asarray(Image.open(jobs[2]["image"]))).save(inv)
    entries = [{"image": j["image"]} for j in jobs[1:3]] + [{"image": str(inv)}]
    res = build_priors(ex, entries, tmp_path / "out", sigma=2.0, settings=_settings(), progress=False)
    rec = res.records[-1]
    assert rec["status"] == "fallback_population" and any("anti-correlated" in x for x in rec["reasons"])
    pop = load_prior(res.population_prior)
    np.testing.assert_allclose(load_prior(rec["prior"]), pop, atol=1e-3)  # same 64 px grid
    assert rec["population_images"] == 2


def test_parallel_workers_give_the_same_priors(cxr_set, tmp_path):
    ex = exemplar_from_datalist(cxr_set, "cxr_0000", STRUCT)
    jobs, _, _ = collect_images(cxr_set, ["training"])
    entries = [{"image": j["image"]} for j in jobs[1:4]]
    serial = build_priors(ex, entries, tmp_path / "a", sigma=2.0, settings=_settings(), progress=False)
    parallel = build_priors(ex, entries, tmp_path / "b", sigma=2.0, settings=_settings(), workers=2, progress=False)
    for r1, r2 in zip(serial.records, parallel.records):
        np.testing.assert_array_equal(np.load(r1["prior"]), np.load(r2["prior"]))


def test_cli_build_priors_and_report(cxr_set, tmp_path, capsys):
    from medspan.cli import main

    out = tmp_path / "cli"
    rc = main(["build-priors", "--datalist", str(cxr_set), "--exemplar-case", "cxr_0000", "--structures",
               "left_lung", "right_lung", "--out", str(out), "--method", "affine", "--sigma", "2", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "priors: 6 images (exemplar 1, ok 5)" in text
    assert "Dice vs ground truth on 5 images" in text and "affine only" in text
    assert main(["priors-report", str(out), "--out", str(tmp_path / "rep"), "--cases", "1"]) == 0
    assert (tmp_path / "rep" / "report.md").is_file() and (tmp_path / "rep" / "overlay_worst_best.png").is_file()
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["method"] == "affine"
    assert main(["build-priors", "--images", str(tmp_path), "--out", str(out)]) == 2
    assert "give --exemplar" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- defaults


def test_prepare_synthetic_cxr_uses_registered_priors(tmp_path):
    from medspan.recipes.cxr import prepare_synthetic_cxr

    path = prepare_synthetic_cxr(tmp_path, n_cases=6, n_val=1, size=64, mask_sigma=2.0)
    assert path.endswith("_ex0_reg-default.json")
    train = load_datalist(path, "training", require=("image", "prior"), check_shapes=True)
    val = load_datalist(path, "validation", require=("image", "label"))
    assert len(train) == 5 and len(val) == 1 and len(val[0]["label"]) == 3
    priors = [np.load(e["prior"]) for e in train]
    assert len({e["prior"] for e in train}) == 5 and not np.array_equal(priors[1], priors[2])
    stand_in = prepare_synthetic_cxr(tmp_path, n_cases=6, n_val=1, size=64, mask_sigma=2.0, prior="exemplar")
    assert len({e["prior"] for e in load_datalist(stand_in, "training")}) == 1


def test_registered_priors_on_synthetic_cts_3d_dice_and_overlay(tmp_path):
    from medspan.recipes.cxr import registered_priors
    from medspan.data.synthetic import write_ct_dataset

    dl = write_ct_dataset(tmp_path / "ct", n=3, shape=(48, 48, 48), seed=0, val_fraction=0.0)
    doc = json.loads(Path(dl).read_text())
    entries = load_datalist(dl, "training")
    ex_masks = [entries[0]["label"][doc["structures"].index(s)] for s in STRUCT]
    images = [e["image"] for e in entries]
    priors = registered_priors(images[0], ex_masks, STRUCT, images, tmp_path / "atlas", sigma=1.5)
    assert sorted(priors) == sorted(images) and np.load(priors[images[1]]).shape == (3, 48, 48, 48)
    quality = json.loads((tmp_path / "atlas" / "quality.json").read_text())
    for rec in quality[1:]:
        assert rec["status"] in ("ok", "retried") and rec["jacobian"]["min"] > 0
        assert rec["jacobian"]["folded_fraction"] == 0
    summary = priors_report(tmp_path / "atlas", datalist=dl, n_cases=1)
    d = summary["dice"]["registered"]
    assert d["mean"]["n"] == 2
    assert d["left_lung"]["mean"] > 0.8 and d["right_lung"]["mean"] > 0.8 and d["heart"]["mean"] > 0.6
    w, h = Image.open(summary["overlay"]).size
    assert w > 2 * h / 2  # two rows (worst, best), each with axial, coronal and sagittal panels side by side


# ---------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (REAL / "mhh_covid_cxr_v7_lungs" / "manifest.csv").is_file(), reason="real MHH set absent")
def test_real_mhh_lungs_registered_onto_three_radiographs(tmp_path):
    sys.path.insert(0, str(REPO))
    from medspan.data_prep.mhh_covid_lungs import convert, read_manifest

    root = REAL / "mhh_covid_cxr_v7_lungs"
    cases = read_manifest(root)[:4]
    sub = tmp_path / "sub"
    (sub / "images").mkdir(parents=True)
    (sub / "masks").mkdir()
    with open(sub / "manifest.csv", "w") as f:
        f.write("image,mask,mhh_image_id\n")
        for c in cases:
            for kind, p in (("images", c.image), ("masks", c.mask)):
                (sub / kind / p.name).symlink_to(p)
            f.write(f"images/{c.image.name},masks/{c.mask.name},{c.case_id}\n")
    dl = convert(sub, tmp_path / "mhh", size=128)
    res = build_priors(exemplar_from_datalist(dl, cases[0].case_id), dl, tmp_path / "priors", sigma=2.0,
                       progress=False)
    summary = priors_report(res.out_dir)
    reg = summary["dice"]["registered"]
    assert reg["mean"]["n"] == 3 and reg["mean"]["mean"] > 0.85
    assert summary["jacobian"]["folded_images"] == []


@pytest.mark.skipif(not (REAL / "lidc_thorax_vtkjs" / "LIDC2.vti").is_dir(), reason="real LIDC volume absent")
def test_real_lidc_volume_synthetic_exemplar_runs_without_folding(tmp_path):
    sys.path.insert(0, str(REPO))
    from medspan.data_prep.lidc_thorax_vtkjs import convert
    from medspan.data.synthetic import write_ct_dataset

    dl = convert(REAL / "lidc_thorax_vtkjs", tmp_path / "lidc", shrink=4)  # 64 x 64 x 33
    ct = write_ct_dataset(tmp_path / "ct", n=1, shape=(48, 48, 48), seed=0, val_fraction=0.0)
    ex = exemplar_from_datalist(ct, "ct_0000", STRUCT)
    # the exemplar is in HU, the LIDC volume 8-bit windowed (lung = air = 0): clip the exemplar to a window
    settings = registration_settings("demons", 3, max_size=48, moving_window=(-200.0, 300.0))
    res = build_priors(ex, dl, tmp_path / "priors", sigma=1.0, settings=settings, progress=False)
    rec = res.records[0]
    assert rec["status"] in ("ok", "retried", "fallback_affine")
    assert rec["jacobian"]["folded_fraction"] == 0 and rec["jacobian"]["min"] > 0
    masks = np.load(rec["masks"])["registered"]
    assert masks.shape == (3, 64, 64, 33) and masks.any(axis=(1, 2, 3)).all()
    # left lung on the patient's left: LIDC array x grows towards the left
    xs = [np.argwhere(m)[:, 0].mean() for m in masks[:2]]
    assert xs[0] > xs[1]
    summary = priors_report(res.out_dir, n_cases=1)
    assert summary["dice"] == {} and Path(summary["overlay"]).is_file()
