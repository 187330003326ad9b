"""cxr_seg and cxr_cls end to end at toy size: real MONAI trainers, evaluators and handlers.

A pretraining run folder is made by hand (a toy ViT's ``model.pt`` and the ``final_summary.json``
that span_cxr writes), at a smaller image size than the fine-tuning size, so the position
embedding is interpolated on the way in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from bundle_utils import BUNDLES, TOY_INFERENCE, TOY_TRAIN
from monai.bundle import ConfigParser, ConfigWorkflow

from medspan.models.vit import build_vit

pytestmark = pytest.mark.slow

CONTRACT = ("task", "key_metric", "key_value", "key_ci", "eval_section", "encoder_name", "pretrained",
            "label_fraction", "n_train", "n_train_patients", "seed", "mode", "identity", "hparams", "report")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A toy pretraining run folder and one folder for the synthetic labeled set (made once)."""
    root = tmp_path_factory.mktemp("downstream")
    run = root / "span_toy"
    run.mkdir()
    torch.manual_seed(0)
    vit = build_vit("vit_toy", img_size=16)
    torch.save(vit.state_dict(), run / "model.pt")
    hp = {"model": "vit_toy", "in_chans": 1, "global_size": 16,
          "head_structures": {"0": "left_lung", "1": "right_lung", "2": "heart"}}
    (run / "final_summary.json").write_text(json.dumps({"hparams": hp, "baseline": False}))
    return {"run": run, "data": root / "data", "root": root}


def _run(bundle: str, config: str, work: Path, shared: dict[str, Path], **overrides: Any) -> ConfigWorkflow:
    over = {"work_dir": str(work), "dataset_dir": str(shared["data"]), "mlflow_tracking": False,
            "progress_bar": False, **TOY_TRAIN[bundle], **overrides}
    if config == "zero_label.json":
        over = {k: v for k, v in over.items() if not k.startswith("hparams::") or k.startswith("hparams::data")
                or k == "hparams::img_size"}
    wf = ConfigWorkflow(config_file=str(BUNDLES / bundle / config), workflow_type="train", **over)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def _summary(wf: ConfigWorkflow) -> dict[str, Any]:
    return json.loads((Path(wf.parser.get_parsed_content("output_dir")) / "final_summary.json").read_text())


def _loads_into_inference(bundle: str, model_pt: Path) -> None:
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "inference.json"))
    parser.update(TOY_INFERENCE[bundle])
    net = parser.get_parsed_content("network_def")
    missing, unexpected = net.load_state_dict(torch.load(model_pt, weights_only=True), strict=True)
    assert not missing and not unexpected


def test_cxr_seg_from_a_pretraining_run_then_resume_and_fractions(tmp_path: Path, shared: dict[str, Path]) -> None:
    wf = _run("cxr_seg", "train.json", tmp_path, shared, pretrained=str(shared["run"]), encoder_name="span")
    rec = _summary(wf)
    assert set(CONTRACT) <= set(rec)
    assert (rec["task"], rec["key_metric"], rec["mode"], rec["eval_section"]) == ("segmentation", "mean_dice", "finetune", "test")
    assert 0.0 <= rec["key_value"] <= 1.0 and rec["n_train"] == 8 and rec["n_train_patients"] == 8
    assert rec["pretrained"] == str(shared["run"]) and rec["encoder_name"] == "span"
    assert rec["identity"]["pretrained_sha256"] and rec["report"]["structures"].keys() == {"left_lung", "right_lung", "heart"}
    assert "pos_embed" in rec["load_report"]["interpolated"]  # 16-px pretraining grid -> 32-px fine-tuning grid
    out = Path(wf.parser.get_parsed_content("output_dir"))
    _loads_into_inference("cxr_seg", out / "model.pt")
    assert (out / "best_model.pt").is_file() and (out / "checkpoints" / "checkpoint_epoch=2.pt").is_file()

    # a longer run of the same cell resumes from the last checkpoint instead of starting again
    wf2 = _run("cxr_seg", "train.json", tmp_path, shared, pretrained=str(shared["run"]), encoder_name="span",
               **{"hparams::epochs": 3})
    ckpt = wf2.parser.get_parsed_content("train::handlers")[0]
    assert ckpt.resumed_from is not None and ckpt.resumed_from.name == "checkpoint_epoch=2.pt"
    assert wf2.parser.get_parsed_content("train::trainer").state.epoch == 3

    # a smaller label fraction trains on whole patients of the larger one
    half = _summary(_run("cxr_seg", "train.json", tmp_path, shared, **{"hparams::label_fraction": 0.5}))
    assert half["n_train_patients"] == 4 and half["encoder_name"] == "scratch" and half["pretrained"] is None


def test_cxr_seg_zero_label(tmp_path: Path, shared: dict[str, Path]) -> None:
    rec = _summary(_run("cxr_seg", "zero_label.json", tmp_path, shared, pretrained=str(shared["run"])))
    assert set(CONTRACT) <= set(rec)
    assert (rec["mode"], rec["label_fraction"], rec["n_train"]) == ("zero_label", 0.0, 0)
    rep = rec["report"]
    assert rep["mass_chosen_on"] == "validation" and rep["mass"] in rep["validation_dice_by_mass"].keys() | {
        float(k) for k in rep["validation_dice_by_mass"]}
    assert rep["heads"] == {"left_lung": 0, "right_lung": 1, "heart": 2}
    assert 0.0 <= rec["key_value"] <= 1.0


def test_cxr_seg_zero_label_refuses_a_run_without_guided_heads(tmp_path: Path, shared: dict[str, Path]) -> None:
    base = tmp_path / "dino_toy"
    base.mkdir()
    torch.save(torch.load(shared["run"] / "model.pt"), base / "model.pt")
    hp = {"model": "vit_toy", "in_chans": 1, "global_size": 16, "head_structures": {"0": "left_lung"}}
    (base / "final_summary.json").write_text(json.dumps({"hparams": hp, "baseline": True}))
    with pytest.raises(Exception) as info:
        _run("cxr_seg", "zero_label.json", tmp_path, shared, pretrained=str(base))
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("no prior-guided head" in m for m in chain), chain


@pytest.mark.parametrize("mode", ["linear", "finetune"])
def test_cxr_cls_modes(mode: str, tmp_path: Path, shared: dict[str, Path]) -> None:
    wf = _run("cxr_cls", "train.json", tmp_path, shared, pretrained=str(shared["run"]), **{"hparams::mode": mode})
    rec = _summary(wf)
    assert set(CONTRACT) <= set(rec)
    assert (rec["task"], rec["key_metric"], rec["mode"]) == ("classification", "mean_auc", mode)
    assert rec["classes"] == ["cardiomegaly", "nodule", "effusion", "pneumothorax", "no_finding"]
    per = rec["report"]["per_class"]
    assert set(per) == set(rec["classes"]) and all(v["n_pos"] + v["n_neg"] == 2 for v in per.values())
    # 2 test cases: every class has fewer than 5 positives or negatives, so none is averaged
    assert rec["key_value"] is None and all(v["status"] != "ok" for v in per.values())
    out = Path(wf.parser.get_parsed_content("output_dir"))
    _loads_into_inference("cxr_cls", out / "model.pt")
    if mode == "linear":  # the frozen encoder is exported unchanged
        state = torch.load(out / "model.pt", weights_only=True)
        src = torch.load(shared["run"] / "model.pt", weights_only=True)
        torch.testing.assert_close(state["encoder.blocks.0.attn.qkv.weight"], src["blocks.0.attn.qkv.weight"])
    loss = wf.parser.get_parsed_content("loss")
    assert loss.pos_weight.shape == (5,) and math.isfinite(float(loss.pos_weight.sum()))


def test_cxr_seg_without_validation_scores_the_final_weights(tmp_path: Path, shared: dict[str, Path]) -> None:
    """A few labeled images, all for training (no validation section): no model selection, final weights scored;
    the zero-label mode then chooses its threshold on the training section, never on the scored test section."""
    wf = _run("cxr_seg", "train.json", tmp_path / "a", shared)
    dl = json.loads(Path(wf.parser.get_parsed_content("resolved_datalist")).read_text())
    folder = Path(wf.parser.get_parsed_content("resolved_datalist")).parent
    dl.pop("validation")
    dl["training"] = dl["training"][:3]
    small = folder / "no_validation.json"
    small.write_text(json.dumps(dl))
    rec = _summary(_run("cxr_seg", "train.json", tmp_path / "b", shared, datalist=str(small)))
    assert rec["best_validation"] is None and rec["n_train"] == 3 and rec["eval_section"] == "test"
    zl = _summary(_run("cxr_seg", "zero_label.json", tmp_path / "c", shared, datalist=str(small),
                       pretrained=str(shared["run"])))
    assert zl["report"]["mass_chosen_on"] == "training" and zl["report"]["structures"]["heart"]["n_cases"] == 2
