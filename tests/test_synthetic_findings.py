"""Findings of the CXR phantom (nodule, effusion, pneumothorax) and the downstream default datalist."""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from medspan.data.datalist import load_datalist
from medspan.data.splits import check_patient_disjoint
from medspan.data.synthetic import CXR_FINDINGS, case_seed, synth_cxr, write_cxr_dataset
from medspan.data.synthetic.cxr import CXR_GENERATOR_VERSION
from medspan.errors import DataError
from medspan.recipes.cxr_downstream import (
    DOWNSTREAM_CLASSES,
    downstream_datalist,
    findings_multi_hot,
    prepare_downstream_cxr,
)

# sha256 of the masks (sorted names, bool bytes) of synth_cxr(seed, 64), computed with the generator
# BEFORE findings were added (medspan commit a820965)
OLD_MASKS_64 = {
    0: "cd000f20e83b13d45e41de2cc253aa6340f61e78e17711b44fcdc059325b9a20",
    1: "0d10034939f49831fe11e80af3be4df9af62ddd776ee9a00c16df44765984db9",
    4: "0d23a5ce067edad7c4ffc4dd647fc93bb95acf928ef651d4dfa5d724d6c87c36",
}
# rint(image * 255) of synth_cxr(seed, 32, findings=False) from the generator before findings were added,
# uint8 (32, 32), zlib + base64: compared with a one-level tolerance (float32 transcendental functions may
# differ in the last bit between CPUs, which can move a value across a rounding boundary)
OLD_32 = {
    0: (
        "eNoBAAT/+wEAAAAAAAIAAQAAAABKoLTSq2MCAAAAAgAAAAAAAAACAAADAAMAAAIJERcbHYDJwOTGniggIx8TCQAAAAAAAAACAAAD"
        "AgMdP0tha4KU1d7k9/TioJ2FfGhVQyABAAACAAAAAQIYOnivwKvJ0OL69/j/8Pno3trLtOHBVS4IAwABAQABBi5Pd5fY8tDb9PP3"
        "7vvz6MvIyf/1u5BrPQwBAQAAAgIWRGiWq8S3ydSn5f/2//jWnmzJfJvBp4VVGQABAAABAExgeJ+zqpdyetru8fn98t7WZ1tmhKm7"
        "mWhSAAABAAQBd3iJrqtvQV90ervk8//utnt7cGRGc7e4a2gDAQEAAhNQaYmmjldBiW9vl9by//aHU3lthFBJi6Z0RxQRBAA2ACtl"
        "jaNiNWZpi5Gk0/f/9Ltwi3Z0Uj+GsnkyAFs2REoAMWGPh11RVz5wcl/E9/f4xGNvbWRQQW2mhzoAV3V0SQA3YJJ6dlllTm6KasnX"
        "7+zWg4yIeF1ne6eIPQBfmnpFADl6i2JJSmhsSHmZ3u/53s+QS11GTz9wlZY/AFaTdUACNGKIbFdpbHBwhbLD+/fYuo+JhoZyX3mA"
        "f04AU4pwQwA6bntaU0lYWISgxNn3/efDoVhqYV9RWHeCQQBRjntDADhjaUg9WEhkcHyk3v/78eSQdHt2UURJUHNUAFKWdEQBOGp1"
        "RzM/ZoCHlKDz/fn5/ezZZ1lSVkVacD0AVI90SQE3a2Y8P0tWa2p1yPT4/Pjl9+SWYjg8HUZ3PwBXlXpIADZhZCU6cIKAe3S37v/3"
        "+v/l9tuQRzAPNmBCAlaTdEkDOGRhLCF1n7e1mLz4/u/79P/q7GoxKx9EXDYAWZ1sSgA2aVEde7DExOLTtvv/9efq9+/qt0onIB9e"
        "NQBel3BEBS5VSIC0uczN3Nfe7+/37O388fLZtkkvEE9BCGOjaU4JKmSBkKm/ys7c6N3o/P358P328dLVkjkZWSgOZ6JmWBQrWn6b"
        "qbPC19Db3fPw5ury9fDw3NvBrk9EJhZypWlUIhpZf6S4usrOztnp8vXq6+vq6Oft7s7Fj1UUI3OmXV8pE1x/kKq7xM7h2Of59+P2"
        "9eru5uPbz7SRfBEseqxcajAGV3SUqLXLx+DY4vL65PDw8u7m5tnDso5jCDqFoU9qOABFe5aqusjP0tXY5vft7uvr9ePX18Kpi1cA"
        "Q4SlUm5CAEdmjqa0w8jV3t/46uPt7ebz4eDSvp2EWAFFi5xIekMAO2qNo7bCz9jS4uzy8fPp6eff3eK8p39PAEyckkFvTQEzX4ec"
        "uL7J1+Xk7Oze4+Xq7+Pf1cejf0gAWJiPO3JRCilggJ+2ub/Q2Njq8eXl+O7d3ODUuKl8RwBalYZwbAub"
    ),
    4: (
        "eNo9k2tQW0UYhvdABy+Il9YRWyYtijNOW1rUaEsDtDBJaGnCRShQICDEGCgEg1TBUBRSikB6qlxaLZWbaItFLC0xUCiXhDSQcE5u"
        "nJzcIJwAQqEqOjujv/zhoajv7M63M+9+z76zM58PggCwtQCIb7rd1SdAHp0RgNCiC/xPACQ03u3oznxk04YPfYPeEGyJrm+3jHR1"
        "pG9ZW0iaAJHNZv9nYMCz5T+YVIPVgbuCGIzYk8F+//b5wbNVPfAQ5BYYzOt2wtBSU4kOnMnmR4QGPQ6AP2RD6QUFNMDCruWNvxbW"
        "yc6Gscb2tqqijKN7dwDwMkzf5KezoGp0cuNPasNOducKP/qkE5XlsHb7gr1QBpWwhHccJtc6//5jaa2mUCDN42fLmxUSbqgPYMJm"
        "OFEG98fAujq57RfKXS3LSeUnZBU1NJyJ5wZs40AUNidGwxz4vvSa9SHpRN8rLj98+EiK+Lw06cgTjwkgOoxGHkwRw9p61LzucIyX"
        "ZkSfFGSeEp/9MPXgNp+k//9PLFU4KDfeX11SfDqGxWTxJTmv+yGh2RfbSkTstMpy+fkOo2GtbehjISuCl5Z47NTpVOZT4FVRc3Um"
        "m52YlV/wabvy91WLtrO2ICEpPGz/a9z0iADklUx5UYagtLBQ2tRS4/31Z9Jl+FHOY4axY0OYSW9tB3sSq945cSgmNV8irR+nftsg"
        "cRxXCaLjAp/eEZ4VGYgEphTHR3HSCjLKxEXD1Nqiw2a+r+7LPbZv5/MH4qJ2Is/xi7KCmTyJrEauMKysrhImLY7fv1GXH/LiAX7k"
        "LsQ/TnI8IPDC8OT0xJjaubZidlscNsO48kZjykucE0HA96gonvE5RngoLzXvWp5zki7SgqlH7/R2NbAjGQCwPnizfdI0511cXCGs"
        "Hg9htzt0mrHBgZ6rtQXcPQBE5bVqjLiLekCtUnbPvIWwzRrV2L2h/vbPxNxggLwh6RjU2e0L8w8eem3UvNXmIIxa3aiyt6OpNIbm"
        "h4lbVTMESXnXF+eIhUXSaraY9VPjP/W1nstJ3A3AvqyLYzNG19Iy5bLavU6jHjfMTGlUfd2oLHeTH5Jc0X4Pc5GzJOm2Ly04TNN6"
        "7V3lrW+/qpOJ6HwII/nc170j05jJRrjp8FbcODU6obzZdaW+TBhL598eX9ZyUzWBYxYT4VwgbZhRpx1X9n53WVGRx6Xff5In/aJ7"
        "UIdbyVmn2eN2z0wZtCNDfT1XL8mEHAaC+HIK0W9UkwbCSlic1rlZDNNpx/oHrn+JVuRGB9EDFCFBrw+q9ZiZIG0E5cR0k5ph5a3v"
        "r12qeJcTRE9wuKiu87ZmSm+2W0ib22PC9Rr10J3uNrRSyHnhH9w8DAc="
    ),
}
# seeds whose case has exactly this one finding (from the separate findings stream)
ONLY = {"nodule": 0, "pneumothorax": 4, "effusion": 16}


def _masks_sha(masks: dict[str, np.ndarray]) -> str:
    return hashlib.sha256(b"".join(masks[k].tobytes() for k in sorted(masks))).hexdigest()


def _old_image(seed: int) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode("".join(OLD_32[seed]))), np.uint8).reshape(32, 32)


@pytest.mark.parametrize("seed", sorted(OLD_32))
def test_findings_off_gives_the_image_of_the_generator_before_findings(seed: int) -> None:
    got = np.rint(synth_cxr(seed, 32, findings=False)["image"] * 255).astype(np.int16)
    diff = np.abs(got - _old_image(seed))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99  # bit-identical here; see OLD_32
    assert (_old_image(seed).std()) > 40  # a real radiograph, not a blank reference


@pytest.mark.parametrize("seed", sorted(OLD_MASKS_64))
def test_anatomy_is_the_same_with_findings_on_and_off(seed: int) -> None:
    off = synth_cxr(seed, 64, findings=False)
    on = synth_cxr(seed, 64)
    assert _masks_sha(off["masks"]) == _masks_sha(on["masks"]) == OLD_MASKS_64[seed]  # masks stay anatomical
    assert off["params"]["findings"] == {"cardiomegaly": off["params"]["cardiomegaly"], "nodule": False,
                                         "effusion": False, "pneumothorax": False}
    assert on["params"]["cardiomegaly"] == off["params"]["cardiomegaly"]
    assert on["params"]["findings"]["cardiomegaly"] == on["params"]["cardiomegaly"]
    assert list(on["params"]["findings"]) == list(CXR_FINDINGS)
    if not any(on["params"]["findings"][k] for k in ("nodule", "effusion", "pneumothorax")):
        assert np.array_equal(on["image"], off["image"])  # nothing drawn: bit-identical image
    else:
        assert not np.array_equal(on["image"], off["image"])


def test_seed_1_has_no_new_finding_and_seed_0_has_a_nodule() -> None:
    assert synth_cxr(1, 64)["params"]["finding_details"] == {}
    assert np.array_equal(synth_cxr(1, 64)["image"], synth_cxr(1, 64, findings=False)["image"])
    d = synth_cxr(0, 128)["params"]["finding_details"]
    assert list(d) == ["nodule"] and d["nodule"]["side"] == "left_lung" and 15 <= d["nodule"]["diameter_mm"] <= 35


def test_prevalence_over_40_seeds() -> None:
    counts = dict.fromkeys(CXR_FINDINGS, 0)
    for seed in range(40):
        for k, v in synth_cxr(seed, 32)["params"]["findings"].items():
            counts[k] += int(v)
    assert counts == {"cardiomegaly": 9, "nodule": 10, "effusion": 8, "pneumothorax": 9}
    assert all(4 <= c <= 18 for c in counts.values())  # between 10% and 45%


def _changed(finding: str, size: int = 128) -> tuple[np.ndarray, dict, dict]:
    seed = ONLY[finding]
    on, off = synth_cxr(seed, size), synth_cxr(seed, size, findings=False)
    assert [k for k, v in on["params"]["findings"].items() if v] == [finding]
    return np.abs(on["image"] - off["image"]), on["masks"], on["params"]["finding_details"][finding]


def test_nodule_changes_pixels_only_inside_its_lung() -> None:
    diff, masks, det = _changed("nodule")
    changed = diff > 0
    lung = masks[det["side"]]
    r, c = det["centre_rc"]
    assert lung[r, c]
    assert changed.any() and not (changed & ~lung).any()  # fully inside the lung field
    # about the size recorded: a disc of diameter diameter_mm / 3.125 mm per px (plus the soft edge)
    area = np.pi * (det["diameter_mm"] / 3.125 / 2) ** 2
    assert 0.7 * area <= changed.sum() <= 1.6 * area and diff.max() > 0.2  # visible at 128 px
    rows, cols = np.nonzero(changed)
    assert abs(rows.mean() - r) <= 1 and abs(cols.mean() - c) <= 1


def test_effusion_fills_the_costophrenic_angle_of_one_lung() -> None:
    diff, masks, det = _changed("effusion")
    changed = diff > 0.02
    lung = masks[det["side"]]
    near = ndi.binary_dilation(lung, iterations=3)  # the lung field's soft edge
    near |= ndi.binary_dilation(masks["heart"], iterations=3)  # fluid seen through the heart shadow, faintly
    assert changed.sum() >= 20 and not (changed & ~near).any()
    rows, cols = np.nonzero(changed)
    lung_rows, lung_cols = np.nonzero(lung)
    assert rows.min() > np.percentile(lung_rows, 60)  # in the lowest part of the lung
    lateral = cols.mean() < lung_cols.mean() if det["side"] == "right_lung" else cols.mean() > lung_cols.mean()
    assert lateral  # towards the chest wall, away from the heart
    assert diff.max() > 0.15


def test_pneumothorax_is_an_apical_lateral_rim_with_a_pleural_line() -> None:
    seed = ONLY["pneumothorax"]
    on, off = synth_cxr(seed, 128), synth_cxr(seed, 128, findings=False)
    det = on["params"]["finding_details"]["pneumothorax"]
    lung = on["masks"][det["side"]]
    delta = on["image"] - off["image"]
    near = ndi.binary_dilation(lung, iterations=2)
    assert not (np.abs(delta) > 0.01)[~near].any()
    brighter, darker = delta > 0.05, delta < -0.02  # the pleural line, the lucent rim
    assert brighter.sum() >= 15 and darker.sum() >= 15
    lung_rows = np.nonzero(lung)[0]
    assert np.nonzero(brighter)[0].mean() < np.percentile(lung_rows, 50)  # upper half of the lung


def test_writer_records_findings_patient_and_version(tmp_path: Path) -> None:
    out = tmp_path / "cxr"
    dl = json.loads(write_cxr_dataset(out, 3, size=32, seed=2, val_fraction=0.0).read_text())
    assert dl["generator"]["version"] == CXR_GENERATOR_VERSION == 3 and dl["generator"]["findings"] is True
    for i, e in enumerate(dl["training"]):
        params = synth_cxr(case_seed(2, i), 32)["params"]
        assert e["patient_id"] == e["case_id"] == f"cxr_{i:04d}"
        assert e["findings"] == params["findings"]
        side = json.loads((out / f"masks/cxr_{i:04d}_findings.json").read_text())
        assert side == {"findings": params["findings"], "details": params["finding_details"]}
    # a re-run reads the findings back from the files (nothing regenerated)
    assert json.loads(write_cxr_dataset(out, 3, size=32, seed=2, val_fraction=0.0).read_text()) == dl
    # a folder of the generator without findings (version 1) is refused, not mixed
    settings = out / ".synth.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "version": 1}))
    with pytest.raises(DataError, match=r"other settings \{'version': \(1, 3\)\}"):
        write_cxr_dataset(out, 3, size=32, seed=2, val_fraction=0.0)


def test_findings_multi_hot() -> None:
    assert DOWNSTREAM_CLASSES == ("cardiomegaly", "nodule", "effusion", "pneumothorax", "no_finding")
    assert findings_multi_hot(dict.fromkeys(CXR_FINDINGS, False)) == [0, 0, 0, 0, 1]
    assert findings_multi_hot({"cardiomegaly": True, "nodule": False, "effusion": True, "pneumothorax": False}) == \
        [1, 0, 1, 0, 0]


def test_downstream_datalist_toy(tmp_path: Path) -> None:
    path = prepare_downstream_cxr(tmp_path, n_cases=12, n_val=2, n_test=4, size=64)
    assert Path(path).parent.name == f"downstream_v{CXR_GENERATOR_VERSION}_n12_s64_seed1"
    doc = json.loads(Path(path).read_text())
    assert doc["classes"] == list(CXR_FINDINGS) + ["no_finding"]
    assert doc["structures"] == ["left_lung", "right_lung", "heart"]
    assert [len(doc[s]) for s in ("training", "validation", "test")] == [6, 2, 4]
    check_patient_disjoint({s: doc[s] for s in ("training", "validation", "test")}, where=path)
    ids = sorted(e["case_id"] for s in ("training", "validation", "test") for e in doc[s])
    assert ids == [f"cxr_{i:04d}" for i in range(12)]
    for s in ("training", "validation", "test"):
        for e in doc[s]:
            i = int(e["case_id"][4:])
            f = synth_cxr(case_seed(1, i), 64)["params"]["findings"]
            assert e["labels"] == [int(f[k]) for k in CXR_FINDINGS] + [int(not any(f.values()))]
            assert e["patient_id"] == e["case_id"]
            assert e["label"] == [f"masks/{e['case_id']}_{k}.png" for k in doc["structures"]]
    train = load_datalist(path, "training", require=("image", "label", "labels"), check_shapes=True)
    assert len(train) == 6 and all(Path(e["image"]).is_file() for e in train)
    # reused: same path, file untouched; the bundle entry point gives the same set
    before = Path(path).stat().st_mtime_ns
    again = downstream_datalist(None, tmp_path, settings={"n_cases": 12, "n_val": 2, "n_test": 4, "size": 64})
    assert again == path and Path(path).stat().st_mtime_ns == before
    # other split sizes: another datalist over the same images
    other = prepare_downstream_cxr(tmp_path, n_cases=12, n_val=3, n_test=3, size=64)
    assert Path(other).parent == Path(path).parent and other != path
    assert [len(json.loads(Path(other).read_text())[s]) for s in ("training", "validation", "test")] == [6, 3, 3]


def test_downstream_datalist_user_file_and_errors(tmp_path: Path) -> None:
    user = tmp_path / "mine.json"
    user.write_text("{}")
    assert downstream_datalist(str(user), tmp_path / "data") == str(user)
    with pytest.raises(DataError, match="datalist does not exist"):
        downstream_datalist(str(tmp_path / "nope.json"), tmp_path / "data")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['n_vall'\]"):
        downstream_datalist(None, tmp_path / "data", settings={"n_vall": 3})
    with pytest.raises(ValueError, match="at least one training case"):
        prepare_downstream_cxr(tmp_path / "data", n_cases=6, n_val=3, n_test=3, size=32)
    assert not (tmp_path / "data").exists()
