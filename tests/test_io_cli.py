"""Atomic writes and the `medspan` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medspan.cli import COMMANDS, main
from medspan.io import (
    TEMP_PREFIX,
    atomic_write,
    remove_stale_temporaries,
    write_json_atomic,
    write_nifti_atomic,
)


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    write_json_atomic({"a": np.float32(1.5), "b": np.arange(3)}, target)
    assert json.loads(target.read_text()) == {"a": 1.5, "b": [0, 1, 2]}

    def _fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, _fail)
    assert json.loads(target.read_text()) == {"a": 1.5, "b": [0, 1, 2]}  # untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]  # no temp file left


def test_atomic_write_temp_suffix_follows_the_target(tmp_path: Path) -> None:
    seen: list[str] = []
    atomic_write(tmp_path / "x.nii.gz", lambda tmp: (seen.append(tmp), Path(tmp).write_bytes(b"1")))
    assert seen[0].endswith(".nii.gz") and Path(seen[0]).parent == tmp_path
    assert (tmp_path / "x.nii.gz").read_bytes() == b"1"


def test_atomic_write_swaps_a_whole_folder(tmp_path: Path) -> None:
    series = tmp_path / "ct_0000"

    def write(names: list[str]):
        def _write(tmp: str) -> None:
            Path(tmp).mkdir()
            for n in names:
                (Path(tmp) / n).write_text(n)
        return _write

    atomic_write(series, write(["0000.dcm", "0001.dcm"]))
    atomic_write(series, write(["0000.dcm"]))  # a re-written series replaces the old one wholly
    assert sorted(p.name for p in series.iterdir()) == ["0000.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct_0000"]


def test_remove_stale_temporaries_keeps_young_ones_and_other_files(tmp_path: Path) -> None:
    old, young, kept = tmp_path / f"{TEMP_PREFIX}a-x.png", tmp_path / f"{TEMP_PREFIX}b-y.png", tmp_path / "z.png"
    for p in (old, young, kept):
        p.write_bytes(b"1")
    (tmp_path / f"{TEMP_PREFIX}c-dir").mkdir()
    for p in (old, tmp_path / f"{TEMP_PREFIX}c-dir"):
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    assert remove_stale_temporaries(tmp_path, min_age_s=600) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([young.name, kept.name])


def test_write_nifti_atomic_keeps_affine_dtype_and_moves_channels_last(tmp_path: Path) -> None:
    affine = np.array([[-0.7, 0, 0, 10.0], [0, -0.7, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
    hu = np.array([[[-1000.4, 0.6], [40.5, 1.49]]])  # (x, y, z) = (1, 2, 2)
    path = write_nifti_atomic(hu, tmp_path / "ct.nii.gz", affine, dtype=np.int16)
    img = nib.load(path)
    assert img.get_data_dtype() == np.int16 and img.header["qform_code"] == img.header["sform_code"] == 1
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.rint(hu).astype(np.int16))
    np.testing.assert_allclose(img.affine, affine)
    maps = np.arange(24, dtype=np.float32).reshape(3, 2, 4)  # (H, x, y)
    img = nib.load(write_nifti_atomic(maps, tmp_path / "maps.nii.gz", np.diag([2.0, 3.0, 1.0]), channel_dim=0))
    assert img.shape == (2, 4, 3)  # (x, y, H); a 2D affine is embedded in 3D
    np.testing.assert_array_equal(img.get_fdata(), np.moveaxis(maps, 0, -1))
    np.testing.assert_allclose(img.affine, np.diag([2.0, 3.0, 1.0, 1.0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "maps.nii.gz"]


def test_cli_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "medspan.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


def test_cli_synth_then_check_datalist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "cxr", "--out", str(tmp_path / "s"), "--n", "3", "--size", "64"]) == 0
    datalist = tmp_path / "s" / "dataset.json"
    assert datalist.is_file()
    assert main(["check-datalist", str(datalist), "--shapes"]) == 0
    doc = json.loads(datalist.read_text())
    doc["training"][0]["image"] = "images/missing.png"
    bad = tmp_path / "s" / "bad.json"
    bad.write_text(json.dumps(doc))
    assert main(["check-datalist", str(bad)]) == 1
    assert "missing.png" in capsys.readouterr().out
