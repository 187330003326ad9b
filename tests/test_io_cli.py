"""Atomic writes and the `medspan` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medspan.cli import COMMANDS, main
from medspan.io import atomic_write, write_json_atomic


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
