"""Shared helpers for the toy-size bundle tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SPAN_BUNDLE = REPO / "bundles" / "span_cxr"

# A toy configuration of span_cxr: a few 64-px phantoms, 32-px global crops (4x4 patches of 8 px).
TOY_HPARAMS: dict[str, Any] = {
    "hparams::data::n_cases": 20,
    "hparams::data::n_val": 4,
    "hparams::data::size": 64,
    "hparams::data::mask_sigma": 2.0,
    "hparams::img_size": 48,
    "hparams::global_size": 32,
    "hparams::local_size": 16,
    "hparams::n_local": 2,
    "hparams::batch_size": 8,
    "hparams::epochs": 2,
    "hparams::warmup_epochs": 0,
    "hparams::out_dim": 256,
    "hparams::head_hidden_dim": 64,
    "hparams::head_bottleneck_dim": 32,
    "hparams::val_interval": 1,
    "hparams::val_size": 32,
}


def toy_overrides(work_dir: Path, **extra: Any) -> dict[str, Any]:
    """Overrides for a toy run of span_cxr writing everything under ``work_dir``."""
    out: dict[str, Any] = {
        "bundle_root": str(SPAN_BUNDLE),
        "work_dir": str(work_dir),
        "compare_baseline": False,
        "progress_bar": False,
        **TOY_HPARAMS,
    }
    out.update(extra)
    return out


def cli_args(overrides: dict[str, Any]) -> list[str]:
    """``--key value`` pairs for ``python -m monai.bundle run`` (python-fire parses the values)."""
    args: list[str] = []
    for k, v in overrides.items():
        args += [f"--{k}", repr(v) if isinstance(v, (list, dict)) else str(v)]
    return args


def make_workflow(overrides: dict[str, Any]):
    """A :class:`monai.bundle.ConfigWorkflow` of span_cxr/train.json with ``overrides``, initialised."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=str(SPAN_BUNDLE / "train.json"), workflow_type="train", **overrides)
    wf.initialize()
    return wf
