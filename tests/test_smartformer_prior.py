"""smartformer_ct with the anatomical prior on (SPAN in 3D): registered per-volume priors, prior loss term."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_smartformer_bundle import TOY as SMART_TOY

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "smartformer_ct"

TOY = {**SMART_TOY, "hparams::epochs": 1}  # the toy size of test_smartformer_bundle, one epoch


def test_prepare_synthetic_ct_prior_modes(tmp_path: Path) -> None:
    """registered: one prior per training volume from the atlas builder; exemplar: one shared file; none: no key."""
    from medspan.recipes.ct import prepare_synthetic_ct
    from medspan.atlas.statistics import load_prior

    kw = dict(n_cases=4, n_val=1, shape=(36, 40, 40), spacing=(10, 10, 10), prior_workers=1)
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


def test_bundle_with_prior_trains_the_assigned_heads(tmp_path: Path) -> None:
    """--hparams::prior_weight > 0: registered priors, a finite 'prior' loss term, heads named by structure."""
    from monai.bundle import ConfigWorkflow

    ov = {"bundle_root": str(BUNDLE), "work_dir": str(tmp_path / "runs"), "progress_bar": False,
          "mlflow_tracking": False, "hparams::prior_weight": 1.0, "hparams::data::prior_workers": 1, **TOY}
    wf = ConfigWorkflow(config_file=str(BUNDLE / "train.json"), workflow_type="train", **ov)
    wf.initialize()
    datalist = json.loads(Path(wf.parser.get_parsed_content("resolved_datalist")).read_text())
    assert all("atlas_default_ex0" in e["prior"] for e in datalist["training"])
    wf.run()
    wf.finalize()
    final = json.loads((tmp_path / "runs" / "smartformer_ct" / "final_summary.json").read_text())
    last = final["losses"][-1]
    assert "prior" in last and np.isfinite(last["prior"]) and last["prior"] > 0
    assert final["hparams"]["prior_weight"] == 1.0


def test_bundle_with_sar_adds_the_spatial_entropy_term(tmp_path: Path) -> None:
    """--hparams::sar_weight > 0 (no prior): SAR on all SA-branch heads, 3D 26-connectivity, logged per term."""
    from monai.bundle import ConfigWorkflow

    from medspan.losses.spatial_entropy import SpatialEntropyLoss

    ov = {"bundle_root": str(BUNDLE), "work_dir": str(tmp_path / "runs"), "progress_bar": False,
          "mlflow_tracking": False, "hparams::sar_weight": 0.5, "hparams::sar_warmup_epochs": 0, **TOY}
    wf = ConfigWorkflow(config_file=str(BUNDLE / "train.json"), workflow_type="train", **ov)
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train::trainer")
    assert isinstance(trainer.sar_loss, SpatialEntropyLoss) and trainer.sar_loss.selected_heads(6) == list(range(6))
    assert float(trainer.sar_weight[0]) == 0.5  # no warm-up: the cosine schedule starts at the base weight
    wf.run()
    wf.finalize()
    final = json.loads((tmp_path / "runs" / "smartformer_ct" / "final_summary.json").read_text())
    last = final["losses"][-1]
    assert "sar" in last and 0.0 <= last["sar"] <= np.log(8) + 1e-6  # at most log(#cells) of the 2^3 grid
    assert "prior" not in last
