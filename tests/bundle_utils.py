"""Shared helpers for the toy-size bundle tests.

Every bundle under ``bundles/`` (a folder with a ``metadata.json``) is checked by
``tests/test_bundle_contracts.py``; its toy sizes are registered here in :data:`TOY_TRAIN` and
:data:`TOY_INFERENCE` (a new bundle without an entry fails that test with a message saying so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SPAN_BUNDLE = BUNDLES / "span_cxr"
SMART_BUNDLE = BUNDLES / "smartformer_ct"
SCHEMA = BUNDLES / "schema" / "meta_schema_20240725.json"
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"

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

# smartformer_ct: 32^3 crops at 10 mm (stage-3 grid 2^3), 4 training + 2 validation phantoms of 40 x 40 x 36 voxels
SMART_TOY: dict[str, Any] = {
    "hparams::data::n_cases": 6,
    "hparams::data::n_val": 2,
    "hparams::data::shape_zyx": [36, 40, 40],
    "hparams::data::spacing_xyz": [10.0, 10.0, 10.0],
    "hparams::spacing": [10.0, 10.0, 10.0],
    "hparams::crop_size": 32,
    "hparams::batch_size": 2,
    "hparams::epochs": 2,
    "hparams::warmup_epochs": 0,
    "hparams::val_interval": 1,
    "hparams::out_dim": 64,
    "hparams::head_hidden_dim": 32,
    "hparams::head_bottleneck_dim": 16,
}

# the downstream bundles: 12 labeled 64-px phantoms (8 training, 2 validation, 2 test), 32-px network input
DOWNSTREAM_TOY: dict[str, Any] = {
    "hparams::data::n_cases": 12,
    "hparams::data::n_val": 2,
    "hparams::data::n_test": 2,
    "hparams::data::size": 64,
    "hparams::img_size": 32,
    "hparams::epochs": 2,
    "hparams::samples_per_epoch": 4,
    "hparams::batch_size": 2,
    "hparams::val_interval": 1,
}

TOY_TRAIN: dict[str, dict[str, Any]] = {
    # the exemplar's prior for every image: no registration, so a property check takes seconds
    "span_cxr": {**TOY_HPARAMS, "hparams::data::prior": "exemplar"},
    "smartformer_ct": dict(SMART_TOY),
    "cxr_seg": {**DOWNSTREAM_TOY, "hparams::feature_size": 8},
    "cxr_cls": {**DOWNSTREAM_TOY, "hparams::n_boot": 50},
}
"""Per bundle: train.json overrides that make a run (or a property check) toy-sized."""

TOY_INFERENCE: dict[str, dict[str, Any]] = {
    "span_cxr": {"hparams::val_size": 32},
    "smartformer_ct": {"hparams::spacing": [10.0, 10.0, 10.0]},
    "cxr_seg": {"hparams::img_size": 32, "hparams::feature_size": 8},
    "cxr_cls": {"hparams::img_size": 32},
}
"""Per bundle: inference.json overrides for the toy inputs of :func:`toy_inputs`."""


def bundle_names() -> list[str]:
    """Names of the bundles: the folders under ``bundles/`` holding a ``metadata.json``."""
    return sorted(p.parent.name for p in BUNDLES.glob("*/metadata.json"))


def toy_inputs(bundle: str, folder: Path, n: int = 2) -> list[Path]:
    """Write ``n`` small input images for ``bundle``'s inference.json into ``folder``.

    span_cxr, cxr_seg, cxr_cls: 64 x 48 8-bit PNG radiograph-like pictures; smartformer_ct: 40 x 40 x 36 NIfTI volumes
    in HU at 10 mm.
    """
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if bundle in ("span_cxr", "cxr_seg", "cxr_cls"):
            from PIL import Image

            yy, xx = np.mgrid[0:64, 0:48]
            pic = 60 + 120 * np.exp(-(((xx - 24) / 14.0) ** 2 + ((yy - 30 - 4 * i) / 20.0) ** 2))
            pic = np.clip(pic + rng.normal(0, 8, pic.shape), 0, 255).astype(np.uint8)
            path = folder / f"toy_{i}.png"
            Image.fromarray(pic).save(path)
        elif bundle == "smartformer_ct":
            import nibabel as nib

            vol = rng.normal(-700, 60, (40, 40, 36))
            vol[10:30, 12:28, 8:28] = rng.normal(40, 20, (20, 16, 20)) + 10 * i  # soft tissue block
            path = folder / f"toy_{i}.nii.gz"
            nib.save(nib.Nifti1Image(vol.astype(np.int16), np.diag([10.0, 10.0, 10.0, 1.0])), path)
        else:
            raise KeyError(f"no toy inputs for bundle {bundle!r}: add them to tests/bundle_utils.py")
        out.append(path)
    return out


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
