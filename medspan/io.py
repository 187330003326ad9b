"""Atomic file writes: outputs are written under a temporary name in the target folder and renamed.

A reader (or a re-run after a kill) therefore sees either the previous complete file or the new
complete file, never a partial one.

Example::

    atomic_write("out/model.pt", lambda tmp: torch.save(state, tmp))
    write_json_atomic({"epoch": 3}, "out/summary.json")
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_write", "write_json_atomic", "write_text_atomic"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], suffix: str | None = None) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then ``os.replace`` it onto ``path``.

    Args:
        path: the final file; its folder is created.
        write: writes the whole content to the path it is given.
        suffix: suffix of the temporary name (some writers pick the format from it, e.g. ``".nii.gz"``,
            ``".png"``, ``".npy"``); default: ``path``'s suffixes.

    Returns:
        ``path`` as a :class:`~pathlib.Path`. On any error the temporary file is removed and the
        error re-raised; ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sfx = "".join(path.suffixes) if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=sfx or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_text_atomic(text: str, path: str | os.PathLike, fsync: bool = True) -> Path:
    """Write a text file atomically (UTF-8), optionally fsync'ed before the rename."""

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    return atomic_write(path, _write)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "detach") and hasattr(o, "tolist"):  # torch tensors
        return o.detach().cpu().tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    return str(o)


def write_json_atomic(obj: Any, path: str | os.PathLike, indent: int = 2) -> Path:
    """Write ``obj`` as JSON atomically (numpy / torch values become plain numbers and lists)."""
    return write_text_atomic(json.dumps(obj, indent=indent, default=_json_default) + "\n", path)
