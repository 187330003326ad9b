"""Failures that must not lose or hide anything (issue 13): orphan workers, retried failed records,
the user's umask, datalist checks shared with the bundles, NaN voxels, inference over a folder with a
bad image, a DICOM series with a missing slice, and the one top-level error handler.

Each test fails on the code before the fix (the defect it names) and passes after. Subprocess tests
kill only the processes they started, by pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medspan.atlas.build import (
    build_priors,
    collect_images,
    exemplar_from_datalist,
    registration_settings,
)

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
STRUCT = ["left_lung", "right_lung", "heart"]
FAST = {"max_size": 64, "demons_iterations": (30, 15)}


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


# ---------------------------------------------------------------------------------- processes


def _children(pid: int) -> list[int]:
    """Live child pids of ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, ...
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _kill_and_check(proc: subprocess.Popen, workers: list[int], sig: int) -> None:
    try:
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        left = _wait_gone(workers, 15.0)
        assert left == [], f"worker processes {left} outlived their parent (signal {sig})"
    finally:
        for p in workers:  # only the processes this test started
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def cxr_set(tmp_path_factory) -> Path:
    """10 phantom CXRs at 96 px with masks and dataset.json."""
    from medspan.data.synthetic import write_cxr_dataset

    return write_cxr_dataset(tmp_path_factory.mktemp("cxr"), n=10, size=96, seed=3, val_fraction=0.1)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find child processes")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_build_priors_leaves_no_worker_alive(cxr_set: Path, tmp_path: Path, sig: int) -> None:
    out = tmp_path / "priors"
    proc = subprocess.Popen(
        [PY, "-m", "medspan.cli", "build-priors", "--datalist", str(cxr_set), "--exemplar-case", "cxr_0000",
         "--structures", *STRUCT, "--out", str(out), "--workers", "2", "--no-progress", "--no-report"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        # wait until the workers exist and registered at least one image (they are working)
        while time.monotonic() < deadline and proc.poll() is None:
            workers = sorted(set(workers) | set(_children(proc.pid)))
            if len(workers) >= 2 and any((out / "quality").glob("cxr_*.json")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "build-priors finished before it could be killed; make the set larger"
        assert len(workers) >= 2
    except BaseException:
        proc.kill()
        raise
    _kill_and_check(proc, workers, sig)
    records = sorted(p.name for p in (out / "quality").glob("*.json"))
    time.sleep(1.0)  # nothing goes on writing after the kill
    assert sorted(p.name for p in (out / "quality").glob("*.json")) == records


_POOL_SCRIPT = """
import sys, time
from medspan.data_prep.common import run_items
print("ready", flush=True)
run_items(time.sleep, [60.0, 60.0, 60.0], workers=2, progress=False)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find child processes")
def test_killed_converter_pool_leaves_no_worker_alive(tmp_path: Path) -> None:
    proc = subprocess.Popen([PY, "-c", _POOL_SCRIPT], env=_env(), stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(workers) < 2:
            workers = _children(proc.pid)
            time.sleep(0.05)
        time.sleep(0.5)  # the workers took their first item (time.sleep(60))
        assert len(workers) >= 2
    except BaseException:
        proc.kill()
        raise
    _kill_and_check(proc, workers, signal.SIGKILL)


# ---------------------------------------------------------------------------------- build-priors re-runs


def test_failed_record_is_retried_after_the_file_is_fixed(cxr_set: Path, tmp_path: Path) -> None:
    ex = exemplar_from_datalist(cxr_set, "cxr_0000", STRUCT)
    jobs, _, _ = collect_images(cxr_set, ["training"])
    good = Path(jobs[1]["image"])
    fixed = tmp_path / "later_fixed.png"
    fixed.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    entries = [{"image": str(fixed), "case_id": "later_fixed"}]
    settings = registration_settings("demons", 2, **FAST)
    first = build_priors(ex, entries, tmp_path / "out", sigma=2.0, settings=settings, progress=False)
    assert first.records[0]["status"] == "failed"
    fixed.write_bytes(good.read_bytes())  # the user replaces the broken file
    kept = build_priors(ex, entries, tmp_path / "out", sigma=2.0, settings=settings, progress=False,
                        keep_failed=True)
    assert kept.records[0]["status"] == "failed" and kept.registered_now == []
    again = build_priors(ex, entries, tmp_path / "out", sigma=2.0, settings=settings, progress=False)
    assert again.registered_now == ["later_fixed"]
    assert again.records[0]["status"] in ("ok", "retried") and Path(again.records[0]["prior"]).is_file()


# ---------------------------------------------------------------------------------- umask


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: int) -> None:
    from medspan.io import atomic_write, write_json_atomic, write_png_atomic

    old = os.umask(umask)
    try:
        paths = [
            write_json_atomic({"a": 1}, tmp_path / "a.json"),
            write_png_atomic(np.zeros((4, 4), np.uint8), tmp_path / "a.png"),
            atomic_write(tmp_path / "a.npy", lambda t: np.save(t, np.zeros(3)), suffix=".npy"),
        ]
    finally:
        os.umask(old)
    for p in paths:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


# ---------------------------------------------------------------------------------- check-datalist


def _datalist_with_priors(tmp_path: Path) -> Path:
    """Three 2D images (64 x 48 px, MONAI shape (64, 48)) and one 3D image, each with a .npy prior."""
    import nibabel as nib
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((48, 64), 10 * i + 5, np.uint8)).save(tmp_path / f"im{i}.png")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.float32), np.eye(4)), str(tmp_path / "ct.nii.gz"))
    np.save(tmp_path / "good.npy", np.zeros((3, 64, 48), np.float16))
    np.save(tmp_path / "coarse.npy", np.zeros((3, 32, 24), np.float16))  # same field of view: fine
    np.save(tmp_path / "wrong_fov.npy", np.zeros((3, 64, 64), np.float16))
    np.save(tmp_path / "two_ch.npy", np.zeros((2, 64, 48), np.float16))
    np.save(tmp_path / "flat.npy", np.zeros((3, 16, 16), np.float16))  # 2D prior of a 3D image
    doc = {
        "structures": STRUCT,
        "training": [
            {"case_id": "a", "image": "im0.png", "prior": "good.npy"},
            {"case_id": "b", "image": "im1.png", "prior": "coarse.npy"},
            {"case_id": "c", "image": "im2.png", "prior": "wrong_fov.npy"},
            {"case_id": "d", "image": "im0.png", "prior": "two_ch.npy"},
            {"case_id": "e", "image": "ct.nii.gz", "prior": "flat.npy"},
        ],
    }
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(doc))
    return path


def test_check_datalist_shapes_reads_npy_priors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medspan.cli import main

    path = _datalist_with_priors(tmp_path)
    assert main(["check-datalist", str(path), "--shapes"]) == 1
    out = capsys.readouterr().out.splitlines()
    t = tmp_path
    assert out == [
        (f"{path}: training[2] (case c): 'prior' {t / 'wrong_fov.npy'}: prior spatial shape (64, 64) does not cover "
        "the image's field of view (64, 48) (different aspect ratio)"),
        f"{path}: training[3] (case d): 'prior' {t / 'two_ch.npy'}: prior has 2 channels, expected 3 structures",
        (f"{path}: training[4] (case e): 'prior' {t / 'flat.npy'}: prior must be channel-first (structures, *spatial) "
        "with 3 spatial dims like its image (16, 16, 8), got shape (3, 16, 16)"),
        f"3 problems in {path}",
    ]
    assert main(["check-datalist", str(path)]) == 0  # headers are read only with --shapes


def test_bundle_prior_check_gives_the_same_message(tmp_path: Path) -> None:
    """The bundles load the prior with MONAI and check it with PriorToImaged: the same words as the CLI."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from medspan.data.datalist import load_datalist, prior_shape_problem
    from medspan.data.prior_transforms import PriorToImaged
    from medspan.data.readers import MedspanReader
    from medspan.errors import DataError

    path = _datalist_with_priors(tmp_path)
    entries = load_datalist(path, "training", require=("image", "prior"))
    load = Compose([
        LoadImaged(keys="image", reader=MedspanReader(), image_only=True),
        LoadImaged(keys="prior", reader="NumpyReader", channel_dim=0, image_only=True),
        EnsureChannelFirstd(keys=["image", "prior"]),
        PriorToImaged(image_key="image", prior_key="prior", n_structures=3),
    ])
    out = load(entries[1])  # the coarse prior: resampled onto the image grid
    assert tuple(out["prior"].shape) == (3, 64, 48)
    for i, (ishape, pshape) in zip((2, 3, 4), [((64, 48), (3, 64, 64)), ((64, 48), (2, 64, 48)),
                                               ((16, 16, 8), (3, 16, 16))]):
        with pytest.raises(Exception) as err:
            load(entries[i])
        cause = err.value
        while not isinstance(cause, DataError) and cause.__cause__ is not None:
            cause = cause.__cause__  # MONAI wraps a transform's error
        assert isinstance(cause, DataError)
        assert cause.problem == prior_shape_problem(ishape, pshape, 3)


def test_check_datalist_reports_empty_training_misnamed_section_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from medspan.cli import main
    from medspan.data.datalist import load_datalist
    from medspan.errors import DataError

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    np.save(tmp_path / "a.npy", np.zeros((3, 8, 8), np.float16))
    cases = {
        "empty_training": ({"training": [], "validation": [{"image": "a.png"}]},
                           "section 'training' is empty"),
        "train_section": ({"train": [{"image": "a.png", "prior": "a.npy"}]},
                          "section 'train' is not a section medspan reads: rename it 'training'"),
        "priors_key": ({"training": [{"image": "a.png", "priors": "a.npy"}]},
                       "training[0]: key 'priors' is not a key medspan reads: rename it 'prior'"),
    }
    for name, (doc, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(doc))
        assert main(["check-datalist", str(path)]) == 1, name
        out = capsys.readouterr().out.splitlines()
        assert out == [f"{path}: {message}", f"1 problem in {path}"], name
        with pytest.raises(DataError) as err:  # what the bundles call: the same message
            load_datalist(path, "training", require=("image",))
        assert str(err.value) == f"{path}: {message}", name


# ---------------------------------------------------------------------------------- inference over a folder


def _pngs(folder: Path, bad_name: str = "b_broken.png") -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    good = []
    for name in ("a_good.png", "c_good.png"):
        Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 251).astype(np.uint8)).save(folder / name)
        good.append(folder / name)
    (folder / bad_name).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return good


def _evaluator(dataset, out_dir: Path):
    """A real MONAI SupervisedEvaluator: a 1x1 conv gives 2 'heads'; AttentionMapWriter writes them."""
    import torch
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator

    from medspan.inference.writers import AttentionMapWriter

    net = torch.nn.Conv2d(1, 2, 1)
    loader = DataLoader(dataset, batch_size=1, num_workers=0)
    writer = AttentionMapWriter(out_dir, write_nifti=False, write_overlay=False)
    ev = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=net, decollate=False)
    writer.attach(ev)
    return ev


def _load():
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from medspan.data.readers import MedspanReader

    return Compose([LoadImaged(keys="image", reader=MedspanReader(), image_only=True),
                    EnsureChannelFirstd(keys="image")])


def test_inference_over_a_folder_skips_an_unreadable_image_and_reports_it(tmp_path: Path) -> None:
    from medspan.inference.writers import REPORT_NAME, InferenceDataset, find_images

    _pngs(tmp_path / "in")
    items = find_images(tmp_path / "in")
    assert [Path(i["image"]).name for i in items] == ["a_good.png", "b_broken.png", "c_good.png"]
    out = tmp_path / "out"
    _evaluator(InferenceDataset(items, _load(), report_dir=out), out).run()
    assert sorted(p.name for p in out.glob("*.png")) == [
        "a_good_head0.png", "a_good_head1.png", "c_good_head0.png", "c_good_head1.png"]
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["images"] == 3 and report["strict"] is False
    assert [Path(p).name for p in report["loaded"]] == ["a_good.png", "c_good.png"]
    assert len(report["failed"]) == 1 and report["failed"][0]["image"] == str(tmp_path / "in" / "b_broken.png")
    assert report["failed"][0]["error"].startswith(f"{tmp_path / 'in' / 'b_broken.png'}: ")

    # strict: the first bad image stops the run, with its own error
    from medspan.errors import DataError, find_medspan_error

    with pytest.raises(Exception) as err:
        _evaluator(InferenceDataset(items, _load(), report_dir=tmp_path / "strict", strict=True),
                   tmp_path / "strict").run()
    found = find_medspan_error(err.value)
    assert isinstance(found, DataError) and found.where == str(tmp_path / "in" / "b_broken.png")


def test_dicom_series_with_a_missing_slice_reports_the_gap_at_inference(tmp_path: Path) -> None:
    """smartformer_ct inference on a series folder: the slice gap, not a 2D shape error in a transform."""
    from medspan.data.readers import is_dicom_series
    from medspan.data.synthetic import write_ct_dataset
    from medspan.errors import DataError
    from medspan.inference.writers import InferenceDataset, find_images

    write_ct_dataset(tmp_path / "dcm", n=1, shape=(12, 16, 16), spacing=(4.0, 4.0, 4.0), fmt="dicom",
                     val_fraction=0.0)
    series = tmp_path / "dcm" / "images" / "ct_0000"
    assert is_dicom_series(series)
    assert find_images(series) == [{"image": str(series)}]
    sorted(series.glob("*.dcm"))[5].unlink()  # a missing slice
    assert is_dicom_series(series) and find_images(series) == [{"image": str(series)}]
    ds = InferenceDataset(find_images(series), _load(), report_dir=tmp_path / "out")
    with pytest.raises(DataError) as err:
        list(ds)
    assert "inconsistent slice gaps" in str(err.value) and str(series) in str(err.value)
    report = json.loads((tmp_path / "out" / "inference_report.json").read_text())
    assert "inconsistent slice gaps" in report["failed"][0]["error"]
    # a folder of 2D DICOM images without positions is not a series
    import pydicom

    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted(series.glob("*.dcm"))[:3]:
        d = pydicom.dcmread(f)
        del d.ImagePositionPatient
        d.save_as(flat / f.name)
    assert not is_dicom_series(flat)
    assert len(find_images(flat)) == 3


# ---------------------------------------------------------------------------------- NaN voxels


def test_info_reports_nan_voxels_and_the_folder_converter_refuses_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import nibabel as nib
    from medspan.data_prep.folder import convert

    from medspan.cli import main

    src = tmp_path / "src"
    src.mkdir()
    vol = np.ones((8, 8, 4), np.float32)
    vol[0, 0, :3] = np.nan
    vol[1, 1, 0] = np.inf
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(src / "nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.float32), np.eye(4)), str(src / "fine.nii.gz"))
    assert main(["info", str(src / "nan.nii.gz")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "range:       1 .. 1 (mean 1) over the finite voxels" in lines
    assert ("non-finite:  3 NaN, 1 infinite voxels of 256: fix or drop this image (training on it gives NaN losses)"
            in lines)
    assert main(["info", str(src / "fine.nii.gz")]) == 0
    assert "non-finite:  0 NaN, 0 infinite voxels" in capsys.readouterr().out.splitlines()

    report = convert(src, tmp_path / "out", progress=False)
    doc = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert [Path(e["image"]).name for e in doc["training"]] == ["fine.nii.gz"]
    assert [(Path(item).name, reason) for item, reason in report.problems] == [
        ("nan.nii.gz", (f"{src / 'nan.nii.gz'}: image holds 3 NaN and 1 infinite voxels of 256 (1.56%); "
                       "left out (fix or drop the file)"))]


# ---------------------------------------------------------------------------------- the top-level handler


def _no_warnings(text: str) -> list[str]:
    """stderr lines without Python's warning lines (MONAI warns about config eval on every run)."""
    lines = text.splitlines()
    out, skip = [], False
    for line in lines:
        if "Warning:" in line:
            skip = True
            continue
        if skip and line.startswith("  "):
            continue
        skip = False
        out.append(line)
    return out


def test_bundle_run_with_a_bad_datalist_prints_one_message(tmp_path: Path) -> None:
    """A real ``python -m monai.bundle run``: the DataError comes wrapped in MONAI's 'Failed to
    instantiate' chain; the handler installed from ``initialize`` prints it as one message."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": [{"image": "a.png", "prior": "a.npy"}]}))
    logs = tmp_path / "logs"
    init = [f"$medspan.errors.install_error_handler(log_dir={str(logs)!r})", "$monai.utils.set_determinism(seed=0)"]
    proc = subprocess.run(
        [PY, "-m", "monai.bundle", "run", "--config_file", str(REPO / "bundles/span_cxr/train.json"),
         "--datalist", str(bad), "--work_dir", str(tmp_path / "runs"), "--initialize", repr(init)],
        env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = _no_warnings(proc.stderr)
    assert err == [
        f"[medspan] error: DataError: {bad}: section 'train' is not a section medspan reads: rename it 'training'",
        f"[medspan] full traceback in {logs / 'error.log'}; set MEDSPAN_DEBUG=1 (or --debug) to print it",
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout
    log = (logs / "error.log").read_text()
    assert "Traceback" in log and "Failed to instantiate" in log and "rename it 'training'" in log


_CTRL_C_SCRIPT = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, also under a background job
from medspan.errors import install_error_handler
install_error_handler(log_dir=sys.argv[1], checkpoint_dir=sys.argv[2])
print("ready", flush=True)
def train():
    try:
        time.sleep(60)
    finally:  # a second interrupt while stopping: two chained tracebacks without the hook
        raise KeyboardInterrupt("while stopping")
train()
"""


def test_ctrl_c_prints_one_line_naming_the_last_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    for epoch in (2, 10):
        (ckpt / f"checkpoint_epoch={epoch}.pt").write_bytes(b"x")
    proc = subprocess.Popen([PY, "-c", _CTRL_C_SCRIPT,
                             str(tmp_path / "logs"), str(ckpt)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert err.splitlines() == [
        (f"[medspan] interrupted (Ctrl-C). Last checkpoint: {ckpt / 'checkpoint_epoch=10.pt'}; "
        "run the same command again to resume from it.")
    ]


def test_cli_ctrl_c_during_build_priors_prints_one_line(cxr_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "priors"
    proc = subprocess.Popen(
        [PY, "-m", "medspan.cli", "build-priors", "--datalist", str(cxr_set), "--exemplar-case", "cxr_0000",
         "--structures", *STRUCT, "--out", str(out), "--no-progress", "--no-report"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not any((out / "quality").glob("*.json")):
            time.sleep(0.05)
        assert proc.poll() is None, "build-priors finished before the interrupt"
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert err.splitlines() == [
        "[medspan] interrupted (Ctrl-C). Finished images are kept; run the same command again to resume with the rest."
    ]


def test_report_failure_walks_to_the_medspan_error(tmp_path: Path) -> None:
    import io

    from medspan.errors import DataError, find_medspan_error, report_failure

    try:
        try:
            raise DataError("/d/x.json", "section 'train' is not a section medspan reads: rename it 'training'")
        except DataError as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression: $load(...)") from inner
    except RuntimeError as outer:
        wrapped = outer
    assert find_medspan_error(wrapped) is wrapped.__cause__
    buf = io.StringIO()
    assert report_failure(wrapped, log_dir=tmp_path, debug=False, stream=buf) == 1
    assert buf.getvalue().splitlines() == [
        "[medspan] error: DataError: /d/x.json: section 'train' is not a section medspan reads: rename it 'training'",
        f"[medspan] full traceback in {tmp_path / 'error.log'}; set MEDSPAN_DEBUG=1 (or --debug) to print it",
    ]
    buf = io.StringIO()
    report_failure(wrapped, log_dir=tmp_path, debug=True, stream=buf)
    assert "Traceback" in buf.getvalue() and "Failed to evaluate ConfigExpression" in buf.getvalue()
