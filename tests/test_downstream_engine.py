"""Unit tests of the downstream pieces the cxr_seg / cxr_cls bundles compose (medspan.engines.downstream)
and of the inference writers they use (MaskWriter, ProbabilityWriter)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from medspan.engines.downstream import (
    BestModel,
    DownstreamReport,
    NonFiniteLossCheck,
    SelectLabelsd,
    ZeroLabelScore,
    case_mean_ci,
    check_mode,
    class_names,
    cosine_lambda,
    entry_labels,
    eval_section,
    pretrained_identity,
)
from medspan.errors import DataError, TrainingError
from medspan.inference.writers import MaskWriter, ProbabilityWriter, to_input_grid
from medspan.models.vit import ViTOutput


def _datalist(tmp_path: Path, **doc) -> Path:
    p = tmp_path / "dl.json"
    p.write_text(json.dumps(doc))
    return p


def test_cosine_lambda_exact() -> None:
    f = cosine_lambda(10, warmup_steps=2, final_factor=0.0)
    assert [round(f(i), 6) for i in (0, 1, 2, 6, 10, 20)] == [0.5, 1.0, 1.0, 0.5, 0.0, 0.0]
    g = cosine_lambda(4, 0, final_factor=0.1)
    assert g(0) == pytest.approx(1.0) and g(4) == pytest.approx(0.1) and g(2) == pytest.approx(0.55)


def test_select_labels_picks_columns_and_names_bad_entries() -> None:
    t = SelectLabelsd([2, 0])
    out = t({"image": torch.zeros(1, 2, 2), "labels": [1, 0, 0, 1]})
    assert out["label"].tolist() == [0.0, 1.0] and out["label"].dtype == torch.float32
    with pytest.raises(DataError, match="no 'labels'"):
        t({"image": torch.zeros(1, 2, 2)})
    with pytest.raises(DataError, match="has 2 values, column 2"):
        t({"image": torch.zeros(1, 2, 2), "labels": [1, 0]})
    with pytest.raises(DataError, match="must be 0/1"):
        t({"image": torch.zeros(1, 2, 2), "labels": [1, 0, -1, 0]})


def test_class_names_and_sections(tmp_path: Path) -> None:
    dl = _datalist(tmp_path, classes=["a", "b", "c"], training=[], validation=[{"image": "x"}], test=[])
    assert class_names(dl) == (["a", "b", "c"], [0, 1, 2])
    assert class_names(dl, ["c", "a"]) == (["c", "a"], [2, 0])
    with pytest.raises(DataError, match=r"\['z'\] are not in"):
        class_names(dl, ["z"])
    assert eval_section(dl) == "validation"  # empty test section
    dl2 = _datalist(tmp_path, training=[], test=[{"image": "x"}])
    assert eval_section(dl2) == "test"
    with pytest.raises(DataError, match="no top-level 'classes'"):
        class_names(dl2)
    assert entry_labels([{"labels": [1, 0, 1]}, {"labels": [0, 1, 1]}], [2, 1]).tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert check_mode("linear") == "linear"
    with pytest.raises(ValueError, match="hparams::mode"):
        check_mode("probe")


def test_best_model_keeps_the_best_across_a_resume(tmp_path: Path) -> None:
    net = torch.nn.Linear(2, 1)
    engine = SimpleNamespace(state=SimpleNamespace(metrics={"m": 0.5}, epoch=2))
    best = BestModel(tmp_path, net, "m")
    best(engine)
    assert best.best() == {"metric": "m", "value": 0.5, "epoch": 2}
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.fill_(7.0)
    resumed = BestModel(tmp_path, net, "m")  # a new process after a kill
    resumed(SimpleNamespace(state=SimpleNamespace(metrics={"m": 0.4}, epoch=4)))  # worse: kept
    assert resumed.best()["epoch"] == 2
    torch.testing.assert_close(torch.load(resumed.weights)["weight"], saved["weight"])
    resumed(SimpleNamespace(state=SimpleNamespace(metrics={"m": float("nan")}, epoch=5)))  # ignored
    resumed(SimpleNamespace(state=SimpleNamespace(metrics={"m": 0.6}, epoch=6)))
    assert resumed.best()["value"] == 0.6 and torch.load(resumed.weights)["weight"].eq(7.0).all()
    fresh = BestModel(tmp_path, net, "m", resume=False)
    assert fresh.best() is None and not fresh.weights.exists()


def test_non_finite_loss_stops_training() -> None:
    check = NonFiniteLossCheck()
    ok = SimpleNamespace(state=SimpleNamespace(output={"loss": torch.tensor(1.0)}, epoch=1, iteration=3))
    check(ok)
    bad = SimpleNamespace(state=SimpleNamespace(output=[{"loss": torch.tensor(float("nan"))}], epoch=2, iteration=9))
    with pytest.raises(TrainingError, match="non-finite loss .* epoch 2, iteration 9"):
        check(bad)


def test_pretrained_identity(tmp_path: Path) -> None:
    assert pretrained_identity(None) == {"pretrained": None, "pretrained_sha256": None}
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"abc")
    a = pretrained_identity(run)
    assert a["pretrained_sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")
    (run / "model.pt").write_bytes(b"abd")
    assert pretrained_identity(run)["pretrained_sha256"] != a["pretrained_sha256"]
    with pytest.raises(DataError, match="pretrained weights not found"):
        pretrained_identity(tmp_path / "missing")


def test_case_mean_ci() -> None:
    report = {"structures": {"a": {"dice_per_case": [0.2, 0.4, None, 0.8]},
                             "b": {"dice_per_case": [0.4, 0.6, 0.5, None]}}}
    ci = case_mean_ci(report, ["a", "b"], n_boot=2000, seed=3)
    # per case: 0.3, 0.5, 0.5, 0.8 -> mean 0.525
    assert ci == case_mean_ci(report, ["a", "b"], n_boot=2000, seed=3)
    assert 0.3 <= ci[0] < 0.525 < ci[1] <= 0.8
    assert case_mean_ci({"structures": {"a": {"dice_per_case": [0.5]}}}, ["a"]) is None


def test_downstream_report_writes_the_contract(tmp_path: Path) -> None:
    net = torch.nn.Linear(3, 2)
    best = BestModel(tmp_path, net, "m")
    best(SimpleNamespace(state=SimpleNamespace(metrics={"m": 0.9}, epoch=3)))
    kept = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.zero_()  # the final weights differ from the best ones
    entries = [{"image": "a", "patient_id": "p1"}, {"image": "b", "patient_id": "p1"}, {"image": "c", "patient_id": "p2"}]
    rep = DownstreamReport(tmp_path, "classification", lambda: {"mean_auc": 0.75, "mean_ci": [0.6, 0.9]}, "mean_auc",
                           net, best=best, train_entries=entries,
                           extra={"eval_section": "test", "encoder_name": "span", "label_fraction": 0.1, "seed": 2})
    rec = rep.write()
    on_disk = json.loads((tmp_path / "final_summary.json").read_text())
    assert on_disk == json.loads(json.dumps(rec))
    assert (rec["task"], rec["key_metric"], rec["key_value"], rec["key_ci"]) == ("classification", "mean_auc", 0.75, [0.6, 0.9])
    assert (rec["n_train"], rec["n_train_patients"], rec["encoder_name"], rec["seed"]) == (3, 2, "span", 2)
    assert rec["best_validation"] == {"metric": "m", "value": 0.9, "epoch": 3}
    torch.testing.assert_close(torch.load(tmp_path / "model.pt")["weight"], kept["weight"])  # the best weights


class _FakeEncoder(torch.nn.Module):
    """forward_features returns fixed attention: head 0 attends the left half, head 1 the top-left patch."""

    def forward_features(self, x, return_attention=False, attn_heads=None):
        b = x.shape[0]
        a = torch.zeros(b, 2, 4)  # grid (2, 2): tokens (0,0) (0,1) (1,0) (1,1)
        a[:, 0] = torch.tensor([0.45, 0.05, 0.45, 0.05])  # axis-0 index 0 and 1 at column 0
        a[:, 1] = torch.tensor([0.7, 0.1, 0.1, 0.1])
        heads = list(attn_heads)
        return ViTOutput(cls=torch.zeros(b, 4), patch_tokens=torch.zeros(b, 4, 4), cls_attn=a[:, heads],
                         cls_logits=None, grid=(2, 2))


def test_zero_label_chooses_the_mass_on_one_set_and_scores_another() -> None:
    lab = torch.zeros(2, 4, 4)
    lab[0, :, :2] = 1  # structure "a": the left half (axis 1 < 2)
    lab[1, :2, :2] = 1  # structure "b": the top-left quarter
    item = {"image": torch.zeros(1, 4, 4), "label": lab}
    score = ZeroLabelScore(_FakeEncoder(), {"a": 0, "b": 1}, ["a", "b"], [item], [item, item], masses=(0.5, 0.9))
    rep = score()
    assert rep["mass_chosen_on"] == "validation" and rep["mass"] in (0.5, 0.9)
    assert set(rep["validation_dice_by_mass"]) == {0.5, 0.9}
    assert rep["heads"] == {"a": 0, "b": 1}
    assert rep["structures"]["a"]["n_cases"] == 2
    with pytest.raises(DataError, match=r"no prior-guided head for \['c'\]"):
        ZeroLabelScore(_FakeEncoder(), {"a": 0}, ["a", "c"], [item], [item])


def test_mask_writer_writes_on_the_input_grid(tmp_path: Path) -> None:
    # an input of 6 x 4 (x, y) resized to 4 x 4 for the network
    img = MetaTensor(torch.rand(1, 1, 4, 4), meta={"spatial_shape": np.array([6, 4]), "filename_or_obj": ["/a/case_7.png"]})
    logits = torch.full((1, 2, 4, 4), -5.0)
    logits[0, 0, :2] = 5.0  # structure 0 on the first half of axis x
    logits[0, 1, 2:] = 3.0
    logits[0, 0, 3, 3] = 6.0  # both above threshold there: structure 0 wins (more probable)
    writer = MaskWriter(tmp_path, ["s0", "s1"])
    writer(SimpleNamespace(state=SimpleNamespace(output={"image": img, "pred": logits})))
    png = np.asarray(Image.open(tmp_path / "case_7_mask.png"))
    nii = np.asarray(nib.load(tmp_path / "case_7_mask.nii.gz").dataobj)
    assert png.shape == (4, 6) and nii.shape == (6, 4, 1)  # picture (rows, cols) = (y, x); NIfTI (x, y, 1)
    nii = nii[..., 0]
    np.testing.assert_array_equal(png.T, nii)
    assert set(np.unique(nii).tolist()) == {1, 2}
    assert (nii[:2] == 1).all() and (nii[-2:, :3] == 2).all()
    assert (tmp_path / "case_7_overlay.png").is_file()
    probs, _ = to_input_grid(torch.ones(2, 4, 4), img[0])
    assert probs.shape == (2, 6, 4)


def test_probability_writer_csv(tmp_path: Path) -> None:
    w = ProbabilityWriter(tmp_path, ["a", "b"])
    img = MetaTensor(torch.zeros(2, 1, 2, 2), meta={"filename_or_obj": ["x.png", "y,z.png"]})
    w(SimpleNamespace(state=SimpleNamespace(output={"image": img, "pred": torch.tensor([[0.0, 2.0], [-1.0, 0.5]])})))
    w.write()
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert lines == ["image,a,b", '"x.png",0.500000,0.880797', '"y,z.png",0.268941,0.622459']
    doc = json.loads((tmp_path / "predictions.json").read_text())
    assert doc["classes"] == ["a", "b"] and doc["predictions"][1]["probabilities"]["a"] == 0.268941
