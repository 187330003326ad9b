"""MONAI's bundle contracts, checked on EVERY bundle under bundles/ (a folder with a metadata.json).

- ``verify_metadata`` against the schema kept in the repository (offline);
- ``verify_net_in_out`` of ``network_def`` (train.json and inference.json) and of every other network
  described in metadata.json (``<id>_data_format`` describes inference.json's ``<id>``);
- ``ConfigWorkflow.check_properties()`` of train.json (train) and inference.json (infer): every required
  property and every optional one under its standard id;
- ``bundle_root`` follows the config file, from any working directory, or the ``--bundle_root`` given;
- ``inference.json`` runs on a ``model.pt`` in a fresh copy of the bundle where nothing was trained.

A new bundle is picked up automatically; it needs its toy sizes in ``tests/bundle_utils.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from bundle_utils import (
    BUNDLES,
    REPO,
    SCHEMA,
    SCHEMA_MD5,
    TOY_INFERENCE,
    TOY_TRAIN,
    bundle_names,
    cli_args,
    toy_inputs,
)
from monai.bundle import (
    ConfigParser,
    ConfigWorkflow,
    verify_metadata,
    verify_net_in_out,
)

NAMES = bundle_names()
CONFIGS = ("train.json", "inference.json")


def _meta(name: str) -> dict:
    return json.loads((BUNDLES / name / "metadata.json").read_text())


def test_bundles_are_found_and_registered() -> None:
    assert {"span_cxr", "smartformer_ct"} <= set(NAMES)
    for name in NAMES:
        assert name in TOY_TRAIN and name in TOY_INFERENCE, (
            f"bundle {name}: add its toy sizes to TOY_TRAIN / TOY_INFERENCE in tests/bundle_utils.py"
        )
        for f in ("train.json", "inference.json", "metadata.json", "logging.conf", "README.md"):
            assert (BUNDLES / name / f).is_file(), f"bundles/{name}/{f} is missing"


@pytest.mark.parametrize("name", NAMES)
def test_verify_metadata(name: str) -> None:
    meta = _meta(name)
    assert meta["schema"].endswith("/" + SCHEMA.name), "metadata.json names a schema that the repository does not keep"
    verify_metadata(meta_file=str(BUNDLES / name / "metadata.json"), filepath=str(SCHEMA), hash_val=SCHEMA_MD5)
    assert meta["version"] in meta["changelog"]
    # what the product asks of every bundle beyond the schema
    refs = " ".join(meta["references"])
    assert "DINO" in refs and len(meta["references"]) >= 2
    assert meta["eval_metrics"] and meta["deviations_from_papers"]


def test_verify_metadata_rejects_bad_metadata(tmp_path: Path) -> None:
    """The schema check can fail: a missing ``network_data_format``, or a tensor description of the wrong type."""
    bad = tmp_path / "metadata.json"
    meta = _meta("span_cxr")
    del meta["network_data_format"]
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(bad), filepath=str(SCHEMA), hash_val=SCHEMA_MD5)
    meta = _meta("span_cxr")
    meta["network_data_format"]["inputs"]["image"]["num_channels"] = [1]  # the schema's $defs/tensor: an integer
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="Failed validating"):
        verify_metadata(meta_file=str(bad), filepath=str(SCHEMA), hash_val=SCHEMA_MD5)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", NAMES)
def test_verify_net_in_out(name: str, config: str) -> None:
    meta_file, cfg = str(BUNDLES / name / "metadata.json"), str(BUNDLES / name / config)
    for n in (1, 2):  # the "8*n" / "32*n" spatial shapes for two n
        verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=cfg, device="cpu", n=n)


@pytest.mark.parametrize("name", NAMES)
def test_other_described_networks(name: str) -> None:
    """``<id>_data_format`` in metadata.json describes inference.json's ``<id>`` (e.g. the attention probe)."""
    meta = _meta(name)
    others = [k[: -len("_data_format")] for k in meta if k.endswith("_data_format") and k != "network_data_format"]
    for net_id in others:
        verify_net_in_out(
            net_id=net_id,
            meta_file=str(BUNDLES / name / "metadata.json"),
            config_file=str(BUNDLES / name / "inference.json"),
            device="cpu",
            n=2,
            **{"_meta_::network_data_format": meta[f"{net_id}_data_format"]},
        )


def test_verify_net_in_out_rejects_a_wrong_description() -> None:
    """The shape check can fail: a wrong output channel count in the description is refused."""
    name = "span_cxr"
    wrong = _meta(name)["network_data_format"]["outputs"]["pred"]["num_channels"] + 1
    with pytest.raises(ValueError, match="output channel number"):
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(BUNDLES / name / "metadata.json"),
            config_file=str(BUNDLES / name / "inference.json"),
            device="cpu",
            **{"_meta_::network_data_format::outputs::pred::num_channels": wrong},
        )


def _toy_model(name: str, path: Path, **overrides) -> dict[str, torch.Tensor]:
    """A randomly initialised ``network_def`` of inference.json, its state dict saved as ``path``."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / name / "inference.json"))
    parser.update(overrides)
    torch.manual_seed(1)
    net = parser.get_parsed_content("network_def")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name", NAMES)
def test_required_properties(name: str, tmp_path: Path) -> None:
    """check_properties() finds every required train / infer property (and no optional one under a wrong id)."""
    train = ConfigWorkflow(
        config_file=str(BUNDLES / name / "train.json"),
        workflow_type="train",
        **{"work_dir": str(tmp_path / "runs"), "mlflow_tracking": False, **TOY_TRAIN[name]},
    )
    train.initialize()
    assert train.check_properties() == []

    images = toy_inputs(name, tmp_path / "images", n=1)
    _toy_model(name, tmp_path / "model.pt")
    infer = ConfigWorkflow(
        config_file=str(BUNDLES / name / "inference.json"),
        workflow_type="infer",
        **{"work_dir": str(tmp_path / "runs"), "input": str(images[0]), "model_path": str(tmp_path / "model.pt"),
           **TOY_INFERENCE[name]},
    )
    infer.initialize()
    assert infer.check_properties() == []


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", NAMES)
def test_bundle_root_follows_the_config_file(name: str, config: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The repository-root command, an absolute path from elsewhere, and --bundle_root: outputs under the bundle."""
    bundle = BUNDLES / name
    cases = [
        (REPO, f"bundles/{name}/{config}", {}, bundle),  # the documented command, from the repository root
        (tmp_path, str(bundle / config), {}, bundle),  # an absolute path from another directory
        (tmp_path, str(bundle / config), {"bundle_root": str(tmp_path / "other")}, tmp_path / "other"),
    ]
    wtype = "train" if config == "train.json" else "infer"
    for cwd, cfg, extra, expected in cases:
        monkeypatch.chdir(cwd)
        wf = ConfigWorkflow(config_file=cfg, workflow_type=wtype, initialize=[], **extra)
        wf.initialize()
        assert Path(wf.bundle_root) == expected
        out = Path(wf.parser.get_parsed_content("output_dir"))
        assert out.is_absolute() and out.parent == expected / "runs", out
    assert not list(tmp_path.iterdir()), "parsing the bundle wrote into the working directory"


def test_bundle_root_outside_a_workflow_is_refused() -> None:
    """Evaluated by a bare ConfigParser (no ConfigWorkflow knows the file), bundle_root asks for --bundle_root."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "span_cxr" / "train.json"))
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("bundle_root")
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("pass --bundle_root" in m for m in chain), chain


PROBE_BUNDLES = [n for n in NAMES if "probe" in json.loads((BUNDLES / n / "inference.json").read_text())]
"""The pretraining bundles: their inference.json writes attention maps of a probe."""


def _fresh_copy_inference(name: str, tmp_path: Path) -> tuple[Path, list[Path], dict[str, torch.Tensor]]:
    """Run inference.json of a copy of the bundle (no training ran) on a random model.pt and two toy images."""
    copy = tmp_path / "fresh" / name
    shutil.copytree(BUNDLES / name, copy, ignore=shutil.ignore_patterns("runs"))
    assert not (copy / "runs").exists()
    images = toy_inputs(name, tmp_path / "images", n=2)
    model = tmp_path / "weights" / "model.pt"
    model.parent.mkdir()
    state = _toy_model(name, model, **TOY_INFERENCE[name])
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(copy / "inference.json"),
           "--model_path", str(model), "--input", str(tmp_path / "images"), *cli_args(TOY_INFERENCE[name])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not list(cwd.iterdir()), "inference wrote into the working directory"
    return copy, images, state


def _network_output(copy: Path, name: str, image: Path, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """The bundle's own preprocessing and network_def with ``state``: (logits of the one image, its MetaTensor)."""
    parser = ConfigParser()
    parser.read_config(str(copy / "inference.json"))
    parser.update({"bundle_root": str(copy), "device": "$torch.device('cpu')", "input": str(image),
                   **TOY_INFERENCE[name]})
    item = parser.get_parsed_content("preprocessing")({"image": str(image)})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(state)
    with torch.no_grad():
        return net.eval()(item["image"][None].float())[0], item["image"]


@pytest.mark.slow
def test_cxr_seg_inference_masks_on_the_input_grid(tmp_path: Path) -> None:
    """cxr_seg/inference.json: per image a label-map PNG and NIfTI of the INPUT's size, equal to the network's masks."""
    import nibabel as nib
    from PIL import Image

    from medspan.inference.writers import to_input_grid

    copy, images, state = _fresh_copy_inference("cxr_seg", tmp_path)
    out = copy / "runs" / "cxr_seg_scratch_f1_s0" / "inference"
    for img in images:
        stem = img.name.split(".")[0]
        picture = np.asarray(Image.open(img))
        mask_png = np.asarray(Image.open(out / f"{stem}_mask.png"))
        mask_nii = np.asarray(nib.load(out / f"{stem}_mask.nii.gz").dataobj)[..., 0]
        assert mask_png.shape == picture.shape == (64, 48)
        np.testing.assert_array_equal(mask_png.T, mask_nii)
        assert (out / f"{stem}_overlay.png").is_file()
        logits, meta_image = _network_output(copy, "cxr_seg", img, state)
        probs, _ = to_input_grid(torch.sigmoid(logits), meta_image)
        expected = torch.where((probs > 0.5).any(0), probs.argmax(0) + 1, 0).numpy()
        np.testing.assert_array_equal(mask_nii, expected)


@pytest.mark.slow
def test_cxr_cls_inference_probabilities(tmp_path: Path) -> None:
    """cxr_cls/inference.json: predictions.csv holds one row per image with the network's probabilities."""
    copy, images, state = _fresh_copy_inference("cxr_cls", tmp_path)
    out = copy / "runs" / "cxr_cls_linear_scratch_f1_s0" / "inference"
    lines = (out / "predictions.csv").read_text().splitlines()
    classes = json.loads((copy / "inference.json").read_text())["hparams"]["classes"]
    assert lines[0] == ",".join(["image", *classes]) and len(lines) == 1 + len(images)
    for img, line in zip(sorted(images), lines[1:]):
        cells = line.rsplit(",", len(classes))
        assert cells[0].strip('"').endswith(img.name)
        logits, _ = _network_output(copy, "cxr_cls", img, state)
        np.testing.assert_allclose([float(c) for c in cells[1:]], torch.sigmoid(logits).numpy(), atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", PROBE_BUNDLES)
def test_inference_on_a_model_pt_in_a_fresh_copy(name: str, tmp_path: Path) -> None:
    """inference.json of a copied bundle where no training ran: a random model.pt, two images, from another cwd."""
    copy, images, state = _fresh_copy_inference(name, tmp_path)
    out = copy / "runs" / name / "inference"
    nii = sorted(out.glob("*_attention.nii.gz"))
    assert [p.name for p in nii] == [f"{p.name.split('.')[0]}_attention.nii.gz" for p in images]

    # the maps are those of THIS model.pt: recompute the first with the bundle's own parts
    import nibabel as nib

    parser = ConfigParser()
    parser.read_config(str(copy / "inference.json"))
    parser.update({"bundle_root": str(copy), "device": "$torch.device('cpu')", "input": str(images[0]),
                   **TOY_INFERENCE[name]})
    item = parser.get_parsed_content("preprocessing")({"image": str(images[0])})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(state)
    probe = parser.get_parsed_content("probe").eval()
    with torch.no_grad():
        expected = probe(item["image"][None].float())[0].numpy()  # (H, *spatial)
    written = np.asarray(nib.load(nii[0]).dataobj)
    assert written.shape == np.moveaxis(expected, 0, -1).shape
    np.testing.assert_allclose(written, np.moveaxis(expected, 0, -1), atol=1e-5)
    n_maps = expected.shape[0]
    assert n_maps == _meta(name)["probe_data_format"]["outputs"]["pred"]["num_channels"]
    assert np.all(written >= 0) and not np.allclose(written[..., 0], written[..., 1])  # heads differ
