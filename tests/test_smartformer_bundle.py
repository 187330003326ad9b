"""End-to-end runs of bundles/smartformer_ct at toy size: CLI + MLflow + inference, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from bundle_utils import REPO, SMART_BUNDLE, SMART_TOY
from ignite.engine import Events

from medspan.errors import DataError

pytestmark = pytest.mark.slow

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
BUNDLE = SMART_BUNDLE

# 32^3 crops at 10 mm (stage-3 grid 2^3), 4 training + 2 validation phantoms of 40 x 40 x 36 voxels
TOY: dict[str, Any] = SMART_TOY


def _overrides(work: Path, **extra: Any) -> dict[str, Any]:
    return {"bundle_root": str(BUNDLE), "work_dir": str(work), "progress_bar": False, **TOY, **extra}


def _cli(ov: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for k, v in ov.items():
        args += [f"--{k}", repr(v) if isinstance(v, (list, dict)) else str(v)]
    return args


def _workflow(ov: dict[str, Any]):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=str(BUNDLE / "train.json"), workflow_type="train", **ov)
    wf.initialize()
    return wf


def _chain(exc: BaseException | None) -> list[BaseException]:
    out = []
    while exc is not None:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _data_errors(fn) -> list[str]:
    with pytest.raises(BaseException) as info:
        fn()
    msgs = [str(e) for e in _chain(info.value) if isinstance(e, DataError)]
    assert msgs, f"no DataError in {_chain(info.value)}"
    return msgs


def test_cli_end_to_end_with_mlflow_and_inference(tmp_path: Path) -> None:
    """The documented command at toy size: losses per term, AP per structure, pictures, MLflow, inference."""
    work = tmp_path / "runs"
    before = set(os.listdir(REPO))
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "bundles/smartformer_ct/train.json",
        *_cli(_overrides(work)),
    ]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(os.listdir(REPO)) == before, "the run wrote into the repository root"

    run = work / "smartformer_ct"
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == [
        "checkpoint_epoch=1.pt",
        "checkpoint_epoch=2.pt",
    ]
    state = torch.load(run / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=True)
    assert {
        "student",
        "teacher",
        "optimizer",
        "patch_loss",
        "cls_loss",
        "global_loss",
        "masking",
        "noise",
        "trainer",
    } <= set(state)
    assert (run / "model.pt").is_file() and (run / "student.pt").is_file()
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".*.tmp"))
    final = json.loads((run / "final_summary.json").read_text())
    assert final["epoch"] == 2 and final["structures"] == ["left_lung", "right_lung", "heart", "nodules"]
    assert len(final["ap_table"]) == 7  # 6 heads + their mean
    assert [h["epoch"] for h in final["losses"]] == [1, 2]
    assert {"loss", "rec", "ampd", "aitd", "gitd"} <= set(final["losses"][-1])
    for i, name in enumerate(("left_lung", "right_lung", "heart")):  # the best of the 7 maps' APs
        column = [row[i] for row in final["ap_table"]]
        assert final["summary"][name]["best_ap"] == pytest.approx(max(column), abs=1e-6)
        assert final["summary"][name]["best_head"] == int(np.argmax(column))
    # printed: the per-term loss table and the AP table
    assert "AMIP masked-voxel L1" in proc.stdout and "AITD SA-CLS distillation" in proc.stdout
    assert "AP (0-100) per structure" in proc.stdout and "left_lung" in proc.stdout
    # pictures and maps of every epoch
    assert sorted(p.name for p in (run / "previews").glob("*.png")) == ["recon_epoch=1.png", "recon_epoch=2.png"]
    shots = sorted(p.name for p in (run / "overlays").glob("*.png"))
    assert shots == [f"attention_epoch={e}_{v}.png" for e in (1, 2) for v in ("axial", "coronal")]
    import nibabel as nib

    maps = nib.load(run / "attention" / "maps_epoch=2.nii.gz")  # on the stage-3 token grid: 2^3 cells of 16^3
    assert maps.shape == (2, 2, 2, 7)
    assert np.allclose(np.abs(maps.affine.diagonal()[:3]), 160.0)
    assert np.allclose(np.asarray(maps.dataobj).sum(axis=(0, 1, 2)), 1.0, atol=1e-5)  # each head: a distribution

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="sqlite:///" + str((work / "mlruns.db").resolve()))
    exp = client.get_experiment_by_name("smartformer_ct")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.run_name == "smartformer_ct" and r.info.status == "FINISHED"
    assert r.data.params["hparams.masking"] == "attention" and r.data.params["hparams.teacher_drop"] == "0.7"
    for term in ("loss", "rec", "ampd", "aitd", "gitd", "mask_fraction"):
        assert len(client.get_metric_history(r.info.run_id, term)) == 2 * 2, term  # 2 epochs x 2 iterations
    assert len(client.get_metric_history(r.info.run_id, "ap/left_lung/best")) == 2
    arts = {a.path for a in client.list_artifacts(r.info.run_id)}
    # MONAI's MLFlowHandler logs the files of an artifact folder at the top level
    assert {
        "model.pt",
        "latest_summary.json",
        "losses.json",
        "recon_epoch=2.png",
        "attention_epoch=2_axial.png",
    } <= arts

    inf = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "bundles/smartformer_ct/inference.json",
        "--bundle_root",
        str(BUNDLE),
        "--work_dir",
        str(work),
        "--hparams::crop_size",  # the architecture of model.pt, as in train.json (inference.json declares it)
        "32",
        "--hparams::spacing",
        "[10.0, 10.0, 10.0]",
    ]
    proc = subprocess.run(inf, check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    nii = sorted((run / "inference").glob("*_attention.nii.gz"))
    assert len(nii) == 2  # the 2 validation phantoms, whole volumes padded to a multiple of 32
    assert nib.load(nii[0]).shape == (64, 64, 64, 7)
    stem = nii[0].name[: -len("_attention.nii.gz")]
    assert (run / "inference" / f"{stem}_axial.png").is_file()


def test_two_process_ddp_run(tmp_path: Path) -> None:
    """torchrun with the multi_gpu.json overlay: 2 processes (gloo on CPU), DDP student, rank 0 writes."""
    work = tmp_path / "runs"
    ov = _overrides(work, **{"hparams::data::n_cases": 10})  # 8 training cases: 2 ranks x batch 2 x 2 steps
    configs = "['bundles/smartformer_ct/train.json','bundles/smartformer_ct/multi_gpu.json']"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        configs,
        *_cli(ov),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run = work / "smartformer_ct"
    state = torch.load(run / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2 * 2
    assert not any(k.startswith("module.") for k in state["student"]), "checkpoint must hold the unwrapped model"
    assert json.loads((run / "final_summary.json").read_text())["epoch"] == 2

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="sqlite:///" + str((work / "mlruns.db").resolve()))
    runs = client.search_runs([client.get_experiment_by_name("smartformer_ct").experiment_id])
    assert len(runs) == 1, "only rank 0 tracks"
    assert len(client.get_metric_history(runs[0].info.run_id, "rec")) == 4


def test_resume_after_interruption(tmp_path: Path) -> None:
    """Killed in epoch 2 of 3: the rerun restarts from the epoch-1 checkpoint and runs epochs 2-3 only."""
    ov = _overrides(tmp_path, mlflow_tracking=False, **{"hparams::epochs": 3, "hparams::val_interval": 3})
    wf = _workflow(ov)
    trainer = wf.parser.get_parsed_content("train::trainer")

    def _kill(engine):
        if engine.state.epoch == 2:
            raise RuntimeError("simulated kill")

    trainer.add_event_handler(Events.ITERATION_STARTED, _kill)
    with pytest.raises(RuntimeError) as info:
        wf.run()
    assert any("simulated kill" in str(e) for e in _chain(info.value))
    ckpt = tmp_path / "smartformer_ct" / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("*.pt")) == ["checkpoint_epoch=1.pt"]
    saved_noise = torch.load(ckpt / "checkpoint_epoch=1.pt", weights_only=True)["noise"]["generator"]

    wf2 = _workflow(ov)
    trainer2 = wf2.parser.get_parsed_content("train::trainer")
    seen: list[int] = []
    trainer2.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(e.state.epoch))
    trainer2.add_event_handler(
        Events.EPOCH_STARTED(once=2),
        lambda e: seen.append(torch.equal(trainer2.noise.generator.get_state(), saved_noise)),
    )
    wf2.run()
    assert seen == [2, True, 3]  # the noise generator continued from the checkpoint
    assert trainer2.state.iteration == 3 * 2
    losses = json.loads((tmp_path / "smartformer_ct" / "losses.json").read_text())
    assert [h["epoch"] for h in losses] == [1, 2, 3]
    # another configuration in the same folder is refused
    with pytest.raises(BaseException) as info:
        _workflow(
            _overrides(tmp_path, mlflow_tracking=False, **{"hparams::epochs": 3, "hparams::mask_ratio": 0.5})
        ).run()
    assert any("other settings" in str(e) and "hparams" in str(e) for e in _chain(info.value))


# ----------------------------------------------------------------------------- bad input


def _toy_set(tmp_path: Path) -> tuple[Path, dict]:
    from medspan.recipes.ct import prepare_synthetic_ct

    path = prepare_synthetic_ct(tmp_path / "data", n_cases=4, n_val=1, shape=(36, 40, 40), spacing=(10, 10, 10))
    return Path(path), json.loads(Path(path).read_text())


def _write_datalist(tmp_path: Path, doc: dict, base: Path) -> Path:
    for sec in ("training", "validation"):  # absolute paths so the copy can live elsewhere
        for e in doc[sec]:
            for k in ("image", "prior"):
                if k in e:
                    e[k] = str((base.parent / e[k]).resolve())
            if "label" in e:
                e["label"] = [str((base.parent / p).resolve()) for p in e["label"]]
    out = tmp_path / "bad.json"
    out.write_text(json.dumps(doc))
    return out


def _first_training_item(tmp_path: Path, datalist: Path, **extra: Any) -> Any:
    wf = _workflow(_overrides(tmp_path / "runs", mlflow_tracking=False, datalist=str(datalist), **extra))
    return wf.parser.get_parsed_content("train::dataset")[0]


def test_volume_smaller_than_crop_is_named(tmp_path: Path) -> None:
    import nibabel as nib

    base, doc = _toy_set(tmp_path)
    small = tmp_path / "short_slab.nii.gz"
    nib.save(nib.Nifti1Image(np.full((40, 40, 2), -800, np.int16), np.diag([10.0, 10.0, 10.0, 1.0])), small)
    doc["training"][0]["image"] = str(small)
    bad = _write_datalist(tmp_path, doc, base)
    msgs = _data_errors(lambda: _first_training_item(tmp_path, bad))
    assert (
        "short_slab.nii.gz" in msgs[0]
        and "(40, 40, 2)" in msgs[0]
        and "smaller than the crop size (32, 32, 32)" in msgs[0]
    )


def test_non_ct_modality_is_refused(tmp_path: Path) -> None:
    import nibabel as nib

    base, doc = _toy_set(tmp_path)
    # a datalist that declares another modality
    mr_list = _write_datalist(tmp_path, json.loads(json.dumps(dict(doc, modality="MR"))), base)
    ov = _overrides(tmp_path / "r1", mlflow_tracking=False, datalist=str(mr_list))
    msgs = _data_errors(lambda: _workflow(ov).parser.get_parsed_content("resolved_datalist"))
    assert "bad.json" in msgs[0] and "modality is 'MR'" in msgs[0]
    # an 8-bit picture saved as NIfTI (no Hounsfield units)
    pic = tmp_path / "photo.nii.gz"
    nib.save(
        nib.Nifti1Image(
            np.random.default_rng(0).integers(0, 255, (40, 40, 36)).astype(np.uint8), np.diag([10.0] * 3 + [1.0])
        ),
        pic,
    )
    doc["training"][0]["image"] = str(pic)
    msgs = _data_errors(lambda: _first_training_item(tmp_path, _write_datalist(tmp_path, doc, base)))
    assert "photo.nii.gz" in msgs[0] and "not CT in Hounsfield units" in msgs[0]


def _dicom_series(tmp_path: Path) -> Path:
    from medspan.data.synthetic import write_ct_dataset

    write_ct_dataset(
        tmp_path / "dcm", n=1, shape=(40, 40, 40), spacing=(10.0, 10.0, 10.0), fmt="dicom", val_fraction=0.0
    )
    return tmp_path / "dcm" / "images" / "ct_0000"


def test_dicom_series_with_mr_modality_or_inconsistent_spacing(tmp_path: Path) -> None:
    import pydicom

    base, doc = _toy_set(tmp_path)
    series = _dicom_series(tmp_path)
    files = sorted(series.glob("*.dcm"))
    mr = tmp_path / "mr_series"  # the same series, tagged as MR
    mr.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(mr / f.name)

    doc["training"][0]["image"] = str(series)
    bad = _write_datalist(tmp_path, doc, base)
    item = _first_training_item(tmp_path, bad)  # the intact CT series trains
    assert tuple(item["views"].shape) == (2, 1, 32, 32, 32)

    files[17].unlink()  # a missing slice: the slice spacing is no longer constant
    msgs = _data_errors(lambda: _first_training_item(tmp_path, bad))
    assert "ct_0000" in msgs[0] and "inconsistent slice gaps" in msgs[0]

    doc["training"][0]["image"] = str(mr)
    msgs = _data_errors(lambda: _first_training_item(tmp_path, _write_datalist(tmp_path, doc, base)))
    assert "mr_series" in msgs[0] and "Modality 'MR'" in msgs[0]


@pytest.mark.real_data
@pytest.mark.skipif(
    not (REAL / "lidc_idri_ctc_slabs" / "LIDC-IDRI-0001" / "ct").is_dir(), reason="needs ../shared/data/real"
)
def test_real_lidc_slab_is_smaller_than_a_128_crop(tmp_path: Path) -> None:
    """A real 16-slice LIDC slab (40 mm) cannot give a 128^3 crop at 2 mm: the error names the series folder."""
    base, doc = _toy_set(tmp_path)
    series = REAL / "lidc_idri_ctc_slabs" / "LIDC-IDRI-0001" / "ct"
    doc["training"][0]["image"] = str(series)
    bad = _write_datalist(tmp_path, doc, base)
    msgs = _data_errors(
        lambda: _first_training_item(tmp_path, bad, **{"hparams::spacing": [2.0, 2.0, 2.0], "hparams::crop_size": 128})
    )
    assert "LIDC-IDRI-0001" in msgs[0] and "smaller than the crop size (128, 128, 128)" in msgs[0]


def test_bundle_files_present() -> None:
    for name in ("train.json", "inference.json", "metadata.json", "logging.conf", "README.md", "multi_gpu.json"):
        assert (BUNDLE / name).is_file(), name
    meta = json.loads((BUNDLE / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"] and meta["name"] == "smartformer_ct"
