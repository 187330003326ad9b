"""SAR in the pretraining engine and in bundles/span_cxr (toy size): the term's value and gradient, switches, logging.

The end-to-end checks record every call of the trainer's SAR module with a forward hook
(:class:`SarProbe`, a real module of a real run, nothing mocked) and compare the value with a
reference computed independently (scipy's labelling, :func:`test_spatial_entropy.reference_entropy`)
on the logits the trainer passed; the token grids are large enough for several regions (4 x 4 with
8-connectivity here, 4^3 with 26-connectivity in ``test_smartformer_prior.py``), so the term is not
identically zero.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from bundle_utils import make_workflow, toy_overrides
from test_spatial_entropy import reference_entropy
from torch import nn

from medspan.losses.spatial_entropy import SpatialEntropyLoss


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread avoids OpenMP stalls on a loaded shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class SarProbe:
    """Forward hook on a SAR loss module: for every call, the logits it got, its value, the gradient of
    the value w.r.t. those logits and the norm of its gradient w.r.t. ``params`` (the model's weights).

    Args:
        module: the trainer's :class:`SpatialEntropyLoss` (called as ``module(logits (B, H, N), grid)``).
        params: parameters whose gradient from the SAR term alone is measured.
    """

    def __init__(self, module: nn.Module, params: Iterable[nn.Parameter]) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.calls: list[dict[str, Any]] = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        z, grid = inputs[0], tuple(int(g) for g in inputs[1])
        grads = torch.autograd.grad(output, [z, *self.params], retain_graph=True, allow_unused=True)
        param_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads[1:] if g is not None))
        self.calls.append(
            {
                "z": z.detach().double().cpu().clone(),
                "grid": grid,
                "value": float(output.detach()),
                "grad_z": grads[0].detach().cpu().clone(),
                "grad_params": param_norm,
            }
        )

    def check(self, heads: Sequence[int], n_calls: int) -> list[float]:
        """Every call: value = mean reference entropy of the maps of ``heads``; gradient on the logits
        non-zero exactly on those maps with entropy > 0 (0 on the other heads); a non-zero gradient on
        the weights when the value is > 0; the value > 0 in at least half of the calls. Returns the values."""
        assert len(self.calls) == n_calls
        for i, c in enumerate(self.calls):
            z, g = c["z"], c["grad_z"]  # (B, H, N)
            n_heads = z.shape[1]
            ref = np.array([[reference_entropy(z[b, h].numpy(), c["grid"]) for h in range(n_heads)]
                            for b in range(z.shape[0])])
            assert c["value"] == pytest.approx(float(ref[:, heads].mean()), abs=1e-5), f"call {i}"
            others = [h for h in range(n_heads) if h not in heads]
            assert int(torch.count_nonzero(g[:, others])) == 0, f"call {i}: gradient on unselected heads"
            moved = (g[:, heads].abs().sum(-1) > 0).numpy()  # (B, len(heads))
            sel = ref[:, heads]
            assert moved[sel > 1e-6].all() and not moved[sel == 0].any(), f"call {i}: {moved} vs {sel}"
            if c["value"] > 1e-3:
                assert c["grad_params"] > 0, f"call {i}: no gradient reaches the weights"
        # 0 is a legitimate value (every selected map one blob after thresholding), so not every call
        # must be non-zero; most must be, or the term does nothing
        nonzero = [c["value"] > 1e-3 for c in self.calls]
        assert sum(nonzero) * 2 >= len(nonzero), f"SAR is zero in {nonzero.count(False)} of {len(nonzero)} calls"
        return [c["value"] for c in self.calls]


def _tiny_trainer(sar_weight: float, prior: bool):
    from medspan.engines.pretrain import SelfDistillationTrainer, param_groups
    from medspan.losses.dino import DINOLoss
    from medspan.losses.span import SpanPriorLoss
    from medspan.models.heads import DINOHead, MultiCropWrapper
    from medspan.models.vit import build_vit
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
    """SAR alone (plain DINO + SAR) and with SPAN: the term is the entropy of the free heads' maps
    (4 x 4 grid of the two global crops), non-zero with a gradient, and loss = dino (+ prior) + w * sar."""
    trainer, batch = _tiny_trainer(0.5, prior)
    probe = SarProbe(trainer.sar_loss, trainer.student.parameters())
    qkv = trainer.student.backbone.blocks[-1].attn.qkv.weight
    before = qkv.detach().clone()
    out = trainer._iteration(trainer, batch)[0]
    (value,) = probe.check([3, 4, 5] if prior else list(range(6)), n_calls=1)
    assert probe.calls[0]["z"].shape == (4, 6, 16)  # 2 images x 2 global crops, 6 heads, 4 x 4 tokens
    assert out["sar"] == pytest.approx(value, rel=1e-6)
    assert ("prior" in out) == prior
    expected = out["dino"] + (out["prior"] if prior else 0.0) + 0.5 * out["sar"]
    assert out["loss"] == pytest.approx(expected, rel=1e-5)
    assert not torch.equal(before, qkv.detach())


def test_trainer_skips_sar_when_its_weight_is_zero(one_thread: None) -> None:
    trainer, batch = _tiny_trainer(0.0, False)
    probe = SarProbe(trainer.sar_loss, [])
    out = trainer._iteration(trainer, batch)[0]
    assert "sar" not in out and "prior" not in out
    assert probe.calls == []  # not even computed


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
def test_bundle_runs_with_sar_and_logs_it(tmp_path: Path, one_thread: None) -> None:
    """A toy run of span_cxr with SAR on the free heads (4 x 4 token grid, 8-connectivity): at every
    iteration the term equals the reference entropy of the heads 3-5 maps, is non-zero, moves the
    weights, and is logged to MLflow with loss = dino + prior + w_sar(it) * sar."""
    ov = toy_overrides(tmp_path, run_name="span_sar",
                       **{"hparams::sar_weight": 0.5, "hparams::sar_warmup_epochs": 0,
                          "hparams::data::prior": "exemplar"})
    wf = make_workflow(ov)
    trainer = wf.parser.get_parsed_content("train::trainer")
    probe = SarProbe(trainer.sar_loss, wf.parser.get_parsed_content("student").parameters())
    wf.run()
    wf.finalize()
    n_iter = 2 * (16 // 8)  # 2 epochs x (16 training cases / batch 8)
    values = probe.check([3, 4, 5], n_calls=n_iter)
    assert probe.calls[0]["z"].shape == (16, 6, 16)  # 8 images x 2 global crops, 6 heads, 4 x 4 tokens
    final = json.loads((tmp_path / "span_sar" / "final_summary.json").read_text())
    assert final["hparams"]["sar_weight"] == 0.5 and final["epoch"] == 2

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="sqlite:///" + str((tmp_path / "mlruns.db").resolve()))
    exp = client.get_experiment_by_name("span_cxr")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["hparams.sar_weight"] == "0.5"

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

    sar = history("sar")
    assert sar == pytest.approx(values, rel=1e-6)  # the logged term is the computed one, every iteration
    w = np.asarray(trainer.sar_weight, dtype=float)
    assert len(w) == n_iter and w[0] == pytest.approx(0.5)  # no warm-up: the cosine starts at the base weight
    expected = np.asarray(history("dino")) + np.asarray(history("prior")) + w * np.asarray(sar)
    np.testing.assert_allclose(history("loss"), expected, rtol=1e-5)
