"""Experiment-tracking helpers (MLflow through MONAI's ``MLFlowHandler``).

The bundles keep every tunable under one ``hparams`` key; :func:`flatten` turns it into the flat
``{"a.b": value}`` dict that MLflow stores as run parameters (values longer than MLflow's limit are
cut with a marker).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["flatten", "sqlite_uri", "artifact_location"]

_MAX_PARAM = 500


def flatten(config: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, str]:
    """Flatten nested mappings into ``{"outer.inner": "value"}`` with string values.

    Example::

        >>> flatten({"lr": 0.001, "heads": {"0": "left_lung"}})
        {'lr': '0.001', 'heads.0': 'left_lung'}
    """
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key, sep))
        else:
            s = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key] = s if len(s) <= _MAX_PARAM else s[: _MAX_PARAM - 3] + "..."
    return out


def sqlite_uri(path: str | os.PathLike) -> str:
    """``sqlite:////abs/path/mlruns.db`` for a local file (MLflow >= 3.13 refuses plain folders)."""
    p = Path(path).resolve()
    p.parent.mkdir(parents=True, exist_ok=True)
    return "sqlite:///" + p.as_posix()


def artifact_location(path: str | os.PathLike) -> str:
    """Absolute ``file://`` URI of an artifact folder (so artifacts never land in the current directory)."""
    p = Path(path).resolve()
    p.mkdir(parents=True, exist_ok=True)
    return p.as_uri()
