"""A resumed bundle run ends with the weights of an uninterrupted one, bit for bit (CPU, toy size).

For span_cxr and smartformer_ct: run A trains 2 epochs; run B is killed at the first iteration of
epoch 2 (after the epoch-1 checkpoint and validation) and re-run with the same settings, which
resumes from the epoch-1 checkpoint. Every tensor of B's final checkpoint (student, teacher,
optimizer moments, loss centres) and of its exported ``model.pt`` must equal A's exactly: the data
order, the multi-crop / view crops and intensity jitter, and (smartformer_ct) the attention-guided
masks and the teacher's patch dropout continue from the saved generator states instead of being
re-seeded. Before this was true, a resumed run repeated epoch 1's random draws in epoch 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from bundle_utils import SMART_BUNDLE, SMART_TOY, SPAN_BUNDLE, TOY_HPARAMS
from ignite.engine import Events

pytestmark = pytest.mark.slow


class Kill(RuntimeError):
    """Stands for a kill of the process inside epoch 2."""


def _kill_in_epoch_2(engine: Any) -> None:
    if engine.state.epoch == 2:
        raise Kill("killed in epoch 2")


def _train(bundle: Path, overrides: dict[str, Any], kill: bool = False) -> list[int]:
    """Build the bundle's trainer (initialize section included) and run it; returns the epochs it ran."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=str(bundle / "train.json"), workflow_type="train", **overrides)
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train::trainer")
    epochs: list[int] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    if kill:
        trainer.add_event_handler(Events.ITERATION_STARTED, _kill_in_epoch_2)
    trainer.run()
    return epochs


def _assert_identical(a: Path, b: Path) -> None:
    """Every tensor of the two runs' final checkpoints and exported weights is equal."""
    ca = torch.load(a / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=True)
    cb = torch.load(b / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=True)
    assert ca["trainer"] == cb["trainer"]
    compared = 0
    for key in set(ca) - {"random_state", "checkpointer", "settings", "trainer"}:
        flat_a, flat_b = _flatten(ca[key], key), _flatten(cb[key], key)
        assert flat_a.keys() == flat_b.keys(), key
        for name, ta in flat_a.items():
            assert torch.equal(ta, flat_b[name]), f"{name} differs after the resume"
            compared += 1
    assert compared > 50
    ma, mb = torch.load(a / "model.pt", weights_only=True), torch.load(b / "model.pt", weights_only=True)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def _flatten(obj: Any, prefix: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flatten(val, f"{prefix}.{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _flatten(val, f"{prefix}.{i}").items()}
    return {}


def _check_bundle(bundle: Path, overrides: dict[str, Any], work: Path) -> None:
    assert _train(bundle, {**overrides, "run_name": "full"}) == [1, 2]
    with pytest.raises(Kill):
        _train(bundle, {**overrides, "run_name": "resumed"}, kill=True)
    assert _train(bundle, {**overrides, "run_name": "resumed"}) == [2]
    _assert_identical(work / "full", work / "resumed")


def test_span_cxr_resume_is_bit_identical(tmp_path: Path) -> None:
    ov = {"bundle_root": str(SPAN_BUNDLE), "work_dir": str(tmp_path), "compare_baseline": False,
          "progress_bar": False, "mlflow_tracking": False, **TOY_HPARAMS, "hparams::data::prior": "exemplar"}
    _check_bundle(SPAN_BUNDLE, ov, tmp_path)


def test_smartformer_ct_resume_is_bit_identical(tmp_path: Path) -> None:
    """Masks and noise too: the attention-guided masking and patch dropout draw from their generators."""
    ov = {"bundle_root": str(SMART_BUNDLE), "work_dir": str(tmp_path), "progress_bar": False,
          "mlflow_tracking": False, **SMART_TOY}
    _check_bundle(SMART_BUNDLE, ov, tmp_path)
