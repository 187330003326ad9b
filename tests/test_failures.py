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

from medspan.atlas.build import build_priors, collect_images, exemplar_from_datalist, registration_settings

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
