"""End-to-end runs of bundles/span_cxr at toy size: CLI, MLflow, resume, NaN, bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_utils import (
    REPO,
    SPAN_BUNDLE,
    TOY_TRAIN,
    cli_args,
    make_workflow,
    toy_overrides,
)
from ignite.engine import Events

from medspan.errors import DataError, TrainingError

pytestmark = pytest.mark.slow


def _chain(exc: BaseException) -> list[BaseException]:
    out = []
    while exc is not None:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def test_cli_end_to_end_with_baseline_and_mlflow(tmp_path: Path) -> None:
    """The documented command (at toy size): checkpoint, weights, summary, baseline table, MLflow run."""
    work = tmp_path / "runs"
    ov = toy_overrides(work, compare_baseline=True)
    before = set(os.listdir(REPO))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundles/span_cxr/train.json", *cli_args(ov)]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(os.listdir(REPO)) == before, "the run wrote into the repository root"

    run = work / "span_cxr"
    assert (run / "checkpoints" / "checkpoint_epoch=2.pt").is_file()
    assert (run / "model.pt").is_file() and (run / "student.pt").is_file()
    assert not list(run.rglob("*.tmp")), "temporary files left behind"
    final = json.loads((run / "final_summary.json").read_text())
    assert final["epoch"] == 2
    assert set(final["comparison"]) == {"left_lung", "right_lung", "heart"}
    assert final["comparison"]["left_lung"]["assigned_head"] == 0
    assert final["comparison"]["heart"]["assigned_head"] == 2
    base = json.loads((work / "span_cxr_baseline" / "final_summary.json").read_text())
    assert base["baseline"] is True and base["hparams"] == final["hparams"]
    assert base["identity"] == final["identity"] and final["identity"]["datalist_sha256"]
    assert "plain DINO" in proc.stdout and "left_lung" in proc.stdout
    # the two runs, in the order of train.json's run list
    assert proc.stdout.index("running the plain-DINO baseline") < proc.stdout.index("plain DINO (baseline run)")
    assert proc.stdout.index("plain DINO (baseline run)") < proc.stdout.index("SPAN (anatomy-guided heads)")

    # the overlay PNGs exist for every validation epoch
    assert sorted(p.name for p in (run / "overlays").glob("*img0.png")) == [
        "attention_epoch=1_img0.png",
        "attention_epoch=2_img0.png",
    ]

    # MLflow: a real SQLite store that the client reads back
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="sqlite:///" + str((work / "mlruns.db").resolve()))
    exp = client.get_experiment_by_name("span_cxr")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert {"span_cxr", "span_cxr_baseline"} <= set(runs)
    r = runs["span_cxr"]
    assert r.info.status == "FINISHED"
    assert r.data.params["hparams.epochs"] == "2"
    assert r.data.params["baseline"] == "false"
    assert runs["span_cxr_baseline"].data.params["prior_weight"] == "0.0"
    n_iter = 2 * (16 // 8)  # 2 epochs x (16 training cases / batch 8)
    assert len(client.get_metric_history(r.info.run_id, "loss")) == n_iter
    assert len(client.get_metric_history(r.info.run_id, "ap/left_lung/assigned")) == 2
    arts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"model.pt", "latest_summary.json"} <= arts
    assert any(a.startswith("attention_epoch=") for a in arts) or "overlays" in arts

    # inference.json: per-head attention maps of the trained run's model.pt; no --input: the run's validation images.
    # The network is declared in inference.json: the toy architecture is given as in train.json.
    inf = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundles/span_cxr/inference.json",
           "--bundle_root", str(SPAN_BUNDLE), "--work_dir", str(work), "--hparams::global_size", "32",
           "--hparams::val_size", "32"]
    proc = subprocess.run(inf, check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = run / "inference"
    nii = sorted(out.glob("*_attention.nii.gz"))
    assert len(nii) == 4  # the 4 validation images
    import nibabel as nib

    vol = np.asarray(nib.load(nii[0]).dataobj)
    assert vol.shape == (32, 32, 6)  # val_size x val_size x heads of vit_toy
    np.testing.assert_allclose(vol.sum(axis=(0, 1)), 32 * 32 / 16, rtol=1e-4)  # per head: its distribution over 4 x 4 patches, upsampled
    stem = nii[0].name[: -len("_attention.nii.gz")]
    assert {f"{stem}_head{h}.png" for h in range(6)} | {f"{stem}_overlay.png"} <= {p.name for p in out.iterdir()}


def test_resume_after_interruption(tmp_path: Path) -> None:
    """A run killed in epoch 2 of 3 restarts from the epoch-1 checkpoint and runs only epochs 2-3."""
    ov = toy_overrides(tmp_path, mlflow_tracking=False, **{"hparams::epochs": 3})
    wf = make_workflow(ov)
    trainer = wf.parser.get_parsed_content("train::trainer")

    def _kill(engine):
        if engine.state.epoch == 2:
            raise RuntimeError("simulated kill")

    trainer.add_event_handler(Events.ITERATION_STARTED, _kill)
    with pytest.raises(RuntimeError) as info:
        wf.run()
    assert any("simulated kill" in str(e) for e in _chain(info.value))
    ckpt_dir = tmp_path / "span_cxr" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.glob("*.pt")) == ["checkpoint_epoch=1.pt"]

    wf2 = make_workflow(ov)
    trainer2 = wf2.parser.get_parsed_content("train::trainer")
    seen_epochs: list[int] = []
    trainer2.add_event_handler(Events.EPOCH_STARTED, lambda e: seen_epochs.append(e.state.epoch))
    wf2.run()
    assert seen_epochs == [2, 3]
    assert trainer2.state.epoch == 3 and trainer2.state.iteration == 3 * 2
    assert sorted(p.name for p in ckpt_dir.glob("*.pt")) == ["checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt"]
    # the DINO centre and teacher were restored too: the checkpoint holds them
    state = torch.load(ckpt_dir / "checkpoint_epoch=3.pt", weights_only=True)
    assert {"student", "teacher", "optimizer", "dino_loss", "trainer"} <= set(state)
    assert state["trainer"]["iteration"] == 3 * 2 and state["trainer"]["max_epochs"] == 3


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    ov = toy_overrides(tmp_path, mlflow_tracking=False, **{"hparams::epochs": 3})
    wf = make_workflow(ov)
    trainer = wf.parser.get_parsed_content("train::trainer")
    student = wf.parser.get_parsed_content("student")

    def _poison(engine):
        if engine.state.epoch == 2:
            with torch.no_grad():
                next(student.parameters()).fill_(float("nan"))

    trainer.add_event_handler(Events.ITERATION_STARTED, _poison)
    with pytest.raises(RuntimeError) as info:
        wf.run()
    errors = [e for e in _chain(info.value) if isinstance(e, TrainingError)]
    assert errors, _chain(info.value)
    assert re.search(r"non-finite loss at epoch 2, iteration 3 .*cases: cxr_", str(errors[0])), str(errors[0])
    ckpt = tmp_path / "span_cxr" / "checkpoints" / "checkpoint_epoch=1.pt"
    state = torch.load(ckpt, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())
    assert not (tmp_path / "span_cxr" / "checkpoints" / "checkpoint_epoch=2.pt").exists()


def _toy_datalist(tmp_path: Path) -> tuple[Path, dict]:
    from medspan.data.datalist import load_datalist
    from medspan.recipes.cxr import prepare_synthetic_cxr

    path = prepare_synthetic_cxr(tmp_path / "data", n_cases=8, n_val=2, size=64, mask_sigma=2.0)
    doc = json.loads(Path(path).read_text())
    for section in ("training", "validation"):  # absolute paths, so the copy can live elsewhere
        doc[section] = load_datalist(path, section)
    return Path(path), doc


def test_missing_file_is_named(tmp_path: Path) -> None:
    _, doc = _toy_datalist(tmp_path)
    missing = tmp_path / "nowhere" / "ghost.png"
    doc["training"][1]["image"] = str(missing)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(BaseException) as info:
        make_workflow(toy_overrides(tmp_path / "runs", mlflow_tracking=False, datalist=str(bad))).run()
    msgs = [str(e) for e in _chain(info.value) if isinstance(e, DataError)]
    assert msgs, f"no DataError in {_chain(info.value)}"
    assert "training[1]" in msgs[0] and "ghost.png" in msgs[0]


def test_wrong_prior_shape_is_named(tmp_path: Path) -> None:
    _, doc = _toy_datalist(tmp_path)
    wrong = tmp_path / "wrong_prior.npy"
    np.save(wrong, np.zeros((3, 64, 32), np.float16))  # half the field of view
    doc["training"][2]["prior"] = str(wrong)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(BaseException) as info:
        make_workflow(toy_overrides(tmp_path / "runs", mlflow_tracking=False, datalist=str(bad))).run()
    msgs = [str(e) for e in _chain(info.value) if isinstance(e, DataError)]
    assert msgs, f"no DataError in {_chain(info.value)}"
    assert "wrong_prior.npy" in msgs[0] and "field of view" in msgs[0]


def test_bundle_files_present() -> None:
    for name in ("train.json", "inference.json", "metadata.json", "logging.conf", "README.md"):
        assert (SPAN_BUNDLE / name).is_file(), name
    meta = json.loads((SPAN_BUNDLE / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]


# ----------------------------------------------------------------------------- where outputs go, what is compared


def test_runs_from_another_directory_into_its_own_runs_folder(tmp_path: Path) -> None:
    """An absolute --config_file from another working directory, no --bundle_root / --work_dir: all under <bundle>/runs."""
    import shutil

    copy = tmp_path / "bundle" / "span_cxr"
    shutil.copytree(SPAN_BUNDLE, copy, ignore=shutil.ignore_patterns("runs"))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    ov = {**TOY_TRAIN["span_cxr"], "hparams::epochs": 1, "compare_baseline": False, "progress_bar": False}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(copy / "train.json"), *cli_args(ov)]
    proc = subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not list(cwd.iterdir()), "the run wrote into the working directory"
    runs = copy / "runs"
    assert (runs / "span_cxr" / "model.pt").is_file() and (runs / "mlruns.db").is_file()
    final = json.loads((runs / "span_cxr" / "final_summary.json").read_text())
    assert final["epoch"] == 1 and Path(final["identity"]["datalist"]).is_relative_to(runs / "data")


def test_run_identity_tracks_the_datalist(tmp_path: Path) -> None:
    """Same hyper-parameters: another datalist path, or the same path with other content, is another run."""
    from medspan.workflows.bundle import run_identity

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text('{"training": [{"image": "x.png"}]}')
    b.write_text(a.read_text())
    hp = {"epochs": 2, "data": {"n_cases": 20}}
    first = run_identity(hp, a)
    assert run_identity(dict(hp), a) == first
    assert run_identity(hp, b)["datalist"] != first["datalist"]
    assert run_identity(hp, b)["datalist_sha256"] == first["datalist_sha256"]
    a.write_text('{"training": [{"image": "y.png"}]}')
    assert run_identity(hp, a)["datalist_sha256"] != first["datalist_sha256"]
    assert run_identity({**hp, "data": {"n_cases": 21}}, b)["hparams"] != first["hparams"]


def test_baseline_is_rerun_when_the_datalist_changes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The baseline is reused only for the same settings AND data: --datalist with the same run name re-runs it."""
    work = tmp_path / "runs"
    ov = toy_overrides(work, mlflow_tracking=False, compare_baseline=True,
                       **{"hparams::epochs": 1, "hparams::data::prior": "exemplar"})
    make_workflow(ov).run()
    out = capsys.readouterr().out
    assert "running the plain-DINO baseline" in out
    synthetic = json.loads((work / "span_cxr_baseline" / "final_summary.json").read_text())["identity"]

    # the user's own datalist (here: the synthetic one, copied elsewhere with absolute paths, one case fewer)
    from medspan.data.datalist import load_datalist

    doc = json.loads(Path(synthetic["datalist"]).read_text())
    for section in ("training", "validation"):
        doc[section] = load_datalist(synthetic["datalist"], section)
    doc["training"] = doc["training"][:-1]
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(doc))
    make_workflow({**ov, "datalist": str(mine), "resume": False}).run()
    out = capsys.readouterr().out
    assert "running the plain-DINO baseline" in out and "reusing" not in out
    base = json.loads((work / "span_cxr_baseline" / "final_summary.json").read_text())
    final = json.loads((work / "span_cxr" / "final_summary.json").read_text())
    assert base["identity"]["datalist"] == str(mine.resolve()) and base["identity"] != synthetic
    assert final["identity"] == base["identity"] and set(final["comparison"]) == {"left_lung", "right_lung", "heart"}

    make_workflow({**ov, "datalist": str(mine)}).run()  # nothing changed: the finished runs are reused
    out = capsys.readouterr().out
    assert "reusing the plain-DINO baseline" in out and "running the plain-DINO baseline" not in out


def test_build_priors_datalist_without_validation_trains(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A datalist from `medspan build-priors` (training only) goes straight in: one line, no validation, no baseline."""
    from medspan.cli import main as medspan_main
    from medspan.data.synthetic import write_cxr_dataset

    dataset = write_cxr_dataset(tmp_path / "set", n=10, size=64, seed=0, val_fraction=0.0)  # images + masks
    meta = json.loads(dataset.read_text())
    base = dataset.parent
    structures = ["left_lung", "right_lung", "heart"]
    ex = meta["training"][0]
    masks = [str(base / ex["label"][meta["structures"].index(s)]) for s in structures]
    rc = medspan_main(["build-priors", "--images", str(base / "images"), "--exemplar", str(base / ex["image"]),
                       "--masks", *masks, "--structures", *structures, "--out", str(tmp_path / "priors"),
                       "--sigma", "2", "--no-progress", "--no-report"])
    assert rc == 0
    datalist = tmp_path / "priors" / "datalist.json"
    assert "validation" not in json.loads(datalist.read_text())
    capsys.readouterr()

    work = tmp_path / "runs"
    wf = make_workflow(toy_overrides(work, mlflow_tracking=False, compare_baseline=True, datalist=str(datalist),
                                     **{"hparams::epochs": 1, "hparams::batch_size": 4}))
    wf.run()
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "no 'validation' section" in ln]
    assert len(lines) == 1 and "training without attention validation" in lines[0] and str(datalist) in lines[0]
    assert "baseline comparison is skipped" in out and "Traceback" not in out
    final = json.loads((work / "span_cxr" / "final_summary.json").read_text())
    assert final["summary"] is None and final["epoch"] == 1
    assert (work / "span_cxr" / "model.pt").is_file() and not (work / "span_cxr_baseline").exists()
