"""SAR in the pretraining engine and in bundles/span_cxr (toy size): switches, loss wiring, logging."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_utils import make_workflow, toy_overrides

from medspan.losses.spatial_entropy import SpatialEntropyLoss


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread avoids OpenMP stalls on a loaded shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_trainer(sar_weight: float, prior: bool):
    from medspan.engines.pretrain import SelfDistillationTrainer, param_groups
    from medspan.models.heads import DINOHead, MultiCropWrapper
    from medspan.models.vit import build_vit
    from medspan.losses.span import SpanPriorLoss
    from medspan.losses.dino import DINOLoss
    from medspan.ssl.teacher import copy_teacher

    torch.manual_seed(0)
    student = MultiCropWrapper(build_vit("vit_toy", depth=1, img_size=32), DINOHead(96, 64, 32, 16))
    teacher = copy_teacher(student)
    g = torch.Generator().manual_seed(0)
    batch = {
        "global_crops": torch.randn(2, 2, 1, 32, 32, generator=g),
        "local_crops": torch.randn(2, 2, 1, 16, 16, generator=g),
        "global_priors": torch.rand(2, 2, 3, 32, 32, generator=g),
    }
    trainer = SelfDistillationTrainer(
        "cpu", 1, [batch], student, teacher, DINOLoss(64, 4, nepochs=1),
        torch.optim.AdamW(param_groups(student), lr=1e-3),
        prior_loss=SpanPriorLoss({0: 0, 1: 1, 2: 2}) if prior else None, prior_weight=1.0 if prior else 0.0,
        sar_loss=SpatialEntropyLoss("free", {0: 0, 1: 1, 2: 2} if prior else None), sar_weight=sar_weight,
        freeze_last_layer=0, epoch_length=1,
    )
    trainer.state.epoch, trainer.state.iteration = 1, 1
    return trainer, batch


@pytest.mark.parametrize("prior", [False, True])
def test_trainer_adds_weighted_sar_term(prior: bool, one_thread: None) -> None:
    """SAR alone (plain DINO + SAR) and with SPAN: loss = dino (+ prior) + w * sar, and it trains."""
    trainer, batch = _tiny_trainer(0.5, prior)
    qkv = trainer.student.backbone.blocks[-1].attn.qkv.weight
    before = qkv.detach().clone()
    out = trainer._iteration(trainer, batch)[0]
    assert math.isfinite(out["sar"]) and out["sar"] >= 0
    assert ("prior" in out) == prior
    expected = out["dino"] + (out["prior"] if prior else 0.0) + 0.5 * out["sar"]
    assert out["loss"] == pytest.approx(expected, rel=1e-5)
    assert not torch.equal(before, qkv.detach())


def test_trainer_skips_sar_when_its_weight_is_zero(one_thread: None) -> None:
    trainer, batch = _tiny_trainer(0.0, False)
    out = trainer._iteration(trainer, batch)[0]
    assert "sar" not in out and "prior" not in out


def test_bundle_sar_switches_default_off(tmp_path: Path) -> None:
    wf = make_workflow(toy_overrides(tmp_path, mlflow_tracking=False))
    trainer = wf.parser.get_parsed_content("train::trainer")
    assert isinstance(trainer.sar_loss, SpatialEntropyLoss)
    assert not np.any(trainer.sar_weight)  # hparams::sar_weight 0.0: off, nothing computed
    assert trainer.sar_loss.selected_heads(6) == [3, 4, 5]  # "free": heads 0-2 carry structures

    wf = make_workflow(toy_overrides(tmp_path, mlflow_tracking=False, baseline=True,
                                     **{"hparams::sar_weight": 0.1, "hparams::sar_heads": [1, 4]}))
    trainer = wf.parser.get_parsed_content("train::trainer")
    assert trainer.sar_loss.selected_heads(6) == [1, 4]
    w = np.asarray(trainer.sar_weight)
    assert len(w) == 2 * 2 and w[0] == 0.0 and w.max() == pytest.approx(0.1)  # 2 warm-up epochs of 2 its
    wf = make_workflow(toy_overrides(tmp_path, mlflow_tracking=False, baseline=True))
    assert wf.parser.get_parsed_content("sar_loss").selected_heads(6) == list(range(6))  # plain DINO: all free


@pytest.mark.slow
def test_bundle_runs_with_sar_and_logs_it(tmp_path: Path) -> None:
    """A toy run of span_cxr with SAR on: the `sar` term is logged to MLflow every iteration."""
    ov = toy_overrides(tmp_path, run_name="span_sar",
                       **{"hparams::sar_weight": 0.5, "hparams::sar_warmup_epochs": 0, "hparams::sar_heads": "all"})
    wf = make_workflow(ov)
    wf.run()
    wf.finalize()
    final = json.loads((tmp_path / "span_sar" / "final_summary.json").read_text())
    assert final["hparams"]["sar_weight"] == 0.5 and final["epoch"] == 2

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="sqlite:///" + str((tmp_path / "mlruns.db").resolve()))
    exp = client.get_experiment_by_name("span_cxr")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["hparams.sar_weight"] == "0.5"
    sar = client.get_metric_history(run.info.run_id, "sar")
    assert len(sar) == 2 * (16 // 8)  # 2 epochs x 2 iterations, the weight is > 0 at each
    assert all(math.isfinite(m.value) and 0.0 <= m.value < math.log(64) for m in sar)
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    dino = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "dino")}
    prior = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "prior")}
    assert all(loss[m.step] > dino[m.step] + prior[m.step] for m in sar if m.value > 0)
