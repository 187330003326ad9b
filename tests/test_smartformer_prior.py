"""smartformer_ct with the anatomical prior on (SPAN in 3D) or SAR on: registered priors, the prior and SAR terms.

The bundle runs record every call of the trainer's prior / SAR module with a forward hook (real
modules of a real run) and check the value against a reference computed from the inputs the
trainer passed, and the gradient: the terms act on the heads they should and reach the weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from bundle_utils import SMART_BUNDLE, SMART_TOY
from test_sar_bundle import SarProbe
from torch import nn

pytestmark = pytest.mark.slow

BUNDLE = SMART_BUNDLE

TOY = {**SMART_TOY, "hparams::epochs": 1}  # the toy size of test_smartformer_bundle, one epoch

# SAR needs a grid where several 26-connected regions can exist: 64^3 crops (stage-3 grid 4^3) of the
# same 10 mm phantoms resampled to 5 mm (72 x 80 x 80 voxels)
SAR_TOY = {**TOY, "hparams::spacing": [5.0, 5.0, 5.0], "hparams::crop_size": 64}


@pytest.fixture
def one_thread():
    """One torch thread: no OpenMP stalls on a loaded shared CPU (the bundle's num_threads is 1 too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class PriorProbe:
    """Forward hook on the trainer's :class:`~medspan.losses.span.SpanPriorLoss`: per call, the attention,
    priors and grid it got, its value and its gradient w.r.t. the attention."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.calls: list[dict[str, Any]] = []
        module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        attn, priors, grid = inputs
        (g,) = torch.autograd.grad(output, attn, retain_graph=True)
        self.calls.append({"attn": attn.detach().double().cpu().clone(), "priors": priors.detach().double().cpu(),
                           "grid": tuple(int(v) for v in grid), "value": float(output.detach()),
                           "grad": g.detach().double().cpu()})


def _workflow(tmp_path: Path, **extra: Any):
    from monai.bundle import ConfigWorkflow

    ov = {"bundle_root": str(BUNDLE), "work_dir": str(tmp_path / "runs"), "progress_bar": False,
          "mlflow_tracking": False, **extra}
    wf = ConfigWorkflow(config_file=str(BUNDLE / "train.json"), workflow_type="train", **ov)
    wf.initialize()
    return wf


def test_prepare_synthetic_ct_prior_modes(tmp_path: Path) -> None:
    """registered: one prior per training volume from the atlas builder; exemplar: one shared file; none: no key."""
    from medspan.atlas.statistics import load_prior
    from medspan.recipes.ct import prepare_synthetic_ct

    kw = {"n_cases": 4, "n_val": 1, "shape": (36, 40, 40), "spacing": (10, 10, 10), "prior_workers": 1}
    reg_path = Path(prepare_synthetic_ct(tmp_path, prior="registered", **kw))
    reg = json.loads(reg_path.read_text())
    fixed = json.loads(Path(prepare_synthetic_ct(tmp_path, prior="exemplar", **kw)).read_text())
    none = json.loads(Path(prepare_synthetic_ct(tmp_path, prior="none", **kw)).read_text())
    base = reg_path.parent  # paths in the datalists are relative to them (same folder)

    assert [e["case_id"] for e in reg["training"]] == [e["case_id"] for e in fixed["training"]]
    reg_priors = [base / e["prior"] for e in reg["training"]]
    assert len(set(reg_priors)) == 3 and all("atlas_default_ex0" in str(p) for p in reg_priors)
    assert len({e["prior"] for e in fixed["training"]}) == 1
    assert all("prior" not in e for e in none["training"]) and len(none["training"]) == 3
    assert reg["validation"] == fixed["validation"] == none["validation"]

    # the exemplar's own entry keeps its (softened) masks; the others are warped copies, same grid
    exemplar_prior = load_prior(base / fixed["training"][0]["prior"])
    own = load_prior(reg_priors[0])
    assert own.shape == exemplar_prior.shape == (3, 40, 40, 36)
    np.testing.assert_allclose(own, exemplar_prior, atol=2e-3)  # float16 storage
    other = load_prior(reg_priors[1])
    assert other.shape == own.shape and not np.allclose(other, own, atol=1e-2)
    quality = json.loads((reg_priors[1].parent.parent / "quality.json").read_text())
    assert {r["status"] for r in quality} <= {"exemplar", "ok", "retried", "fallback_affine"}

    with pytest.raises(ValueError, match="prior must be"):
        prepare_synthetic_ct(tmp_path, prior="atlas", **kw)


def test_bundle_with_prior_trains_the_assigned_heads(tmp_path: Path, one_thread: None) -> None:
    """--hparams::prior_weight > 0: registered priors; at every step the prior term is KL(p_s || a_h)
    of heads 0-2 toward their structures (p from the cropped priors), its gradient is -p / (n a) on
    those heads and 0 on the free heads 3-5, and losses.json logs its mean."""
    from medspan.losses.span import prior_to_patch_distribution

    wf = _workflow(tmp_path, **{"hparams::prior_weight": 1.0, "hparams::data::prior_workers": 1, **TOY})
    datalist = json.loads(Path(wf.parser.get_parsed_content("resolved_datalist")).read_text())
    assert all("atlas_default_ex0" in e["prior"] for e in datalist["training"])
    trainer = wf.parser.get_parsed_content("train::trainer")
    probe = PriorProbe(trainer.prior_loss)
    wf.run()
    wf.finalize()
    assert len(probe.calls) == 2  # 1 epoch x (4 training cases / batch 2)
    sigma, eps = trainer.prior_loss.sigma, trainer.prior_loss.eps
    for i, c in enumerate(probe.calls):
        a, grid = c["attn"], c["grid"]  # (B, 6, 8) on the 2^3 grid
        assert a.shape == (2, 6, 8) and grid == (2, 2, 2)
        p = prior_to_patch_distribution(c["priors"], grid, sigma=sigma, eps=eps)  # (B, 3, 8)
        present = c["priors"].flatten(2).amax(-1) > 0  # (B, 3)
        assert bool(present.all()), f"call {i}: every organ lies in every 32^3 crop of the toy phantoms"
        kl = (p * (p.log() - a[:, :3].log())).sum(-1)  # heads 0, 1, 2 -> structures 0, 1, 2
        assert c["value"] == pytest.approx(float(kl.mean()), rel=1e-4), f"call {i}"
        assert c["value"] > 0.05, f"call {i}: the attention is far from the priors at the start"
        torch.testing.assert_close(c["grad"][:, :3], -p / (a[:, :3] * kl.numel()), rtol=1e-3, atol=1e-7)
        assert int(torch.count_nonzero(c["grad"][:, 3:])) == 0, f"call {i}: gradient on the free heads"
    final = json.loads((tmp_path / "runs" / "smartformer_ct" / "final_summary.json").read_text())
    assert final["hparams"]["prior_weight"] == 1.0
    last = final["losses"][-1]
    assert last["prior"] == pytest.approx(np.mean([c["value"] for c in probe.calls]), rel=1e-5)
    weighted = sum(trainer.weights[k] * last[k] for k in ("rec", "ampd", "aitd", "gitd"))
    assert last["loss"] == pytest.approx(weighted + 1.0 * last["prior"], rel=1e-5)


def test_bundle_with_sar_adds_the_spatial_entropy_term(tmp_path: Path, one_thread: None) -> None:
    """--hparams::sar_weight > 0 (no prior) on 64^3 crops (stage-3 grid 4^3, 26-connectivity): at every
    step the term is the reference entropy of all six SA-branch heads' maps, non-zero, with a gradient
    on the maps that have several regions and on the weights; losses.json logs its mean."""
    from medspan.losses.spatial_entropy import SpatialEntropyLoss

    wf = _workflow(tmp_path, **{"hparams::sar_weight": 0.5, "hparams::sar_warmup_epochs": 0, **SAR_TOY})
    trainer = wf.parser.get_parsed_content("train::trainer")
    assert isinstance(trainer.sar_loss, SpatialEntropyLoss) and trainer.sar_loss.selected_heads(6) == list(range(6))
    assert float(trainer.sar_weight[0]) == 0.5  # no warm-up: the cosine schedule starts at the base weight
    probe = SarProbe(trainer.sar_loss, wf.parser.get_parsed_content("student").parameters())
    wf.run()
    wf.finalize()
    values = probe.check(list(range(6)), n_calls=2)  # 1 epoch x (4 training cases / batch 2)
    assert probe.calls[0]["z"].shape == (2, 6, 64) and probe.calls[0]["grid"] == (4, 4, 4)
    final = json.loads((tmp_path / "runs" / "smartformer_ct" / "final_summary.json").read_text())
    last = final["losses"][-1]
    assert last["sar"] == pytest.approx(float(np.mean(values)), rel=1e-5)
    assert "prior" not in last
    w = np.asarray(trainer.sar_weight, dtype=float)
    weighted = sum(trainer.weights[k] * last[k] for k in ("rec", "ampd", "aitd", "gitd"))
    assert last["loss"] == pytest.approx(weighted + float(np.mean(w * np.asarray(values))), rel=1e-5)
    assert math.isclose(final["hparams"]["sar_weight"], 0.5)
