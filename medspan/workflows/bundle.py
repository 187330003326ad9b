"""Small named parts that the bundle configs compose (``bundles/*/train.json``, ``inference.json``).

A bundle config only wires objects together; every decision it needs lives here, with a name and
a docstring, instead of in a ``$`` expression:

- :func:`bundle_dir`: the folder of the config being run, so that a bundle writes under its own
  ``runs/`` whatever the working directory (``bundle_root``'s default); :func:`config_path`: a
  config file beside it;
- :func:`run_identity`: what defines a run's result (hyper-parameters, data settings, the
  datalist's path and content); checkpoints and the baseline reuse are keyed on it;
- :func:`validation_entries`: the ``validation`` section of a datalist, or none (one line says so)
  when the datalist has no such section (e.g. one written by ``medspan build-priors``);
- :func:`guided_heads`, :func:`head_names`, :func:`head_titles`: which heads a prior guides, as the
  losses, the validation and the pictures need it;
- :func:`cached_dataset`: the in-memory or on-disk cached dataset of a training set;
- :func:`epoch_end_filter`: an ignite event filter for "last iteration of each epoch";
- :func:`inference_input`: what ``inference.json`` reads when no ``--input`` is given.

Example::

    from monai.bundle import ConfigWorkflow
    wf = ConfigWorkflow(config_file="/abs/path/bundles/span_cxr/train.json", workflow_type="train")
    wf.initialize()
    wf.bundle_root          # '/abs/path/bundles/span_cxr' (bundle_dir(), from any working directory)
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow
from monai.data import CacheDataset, PersistentDataset

from medspan.data.datalist import datalist_sections, load_datalist
from medspan.engines.attention_validation import head_map
from medspan.errors import DataError
from medspan.io import json_plain

__all__ = [
    "bundle_dir",
    "cached_dataset",
    "config_path",
    "datalist_digest",
    "epoch_end_filter",
    "guided_heads",
    "head_names",
    "head_titles",
    "inference_input",
    "run_identity",
    "validation_entries",
]


def _config_dir() -> Path | None:
    """``config_root_path`` (absolute) of the innermost :class:`monai.bundle.ConfigWorkflow` on the call stack."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, ConfigWorkflow):
                return Path(owner.config_root_path).resolve()
            frame = frame.f_back
    finally:
        del frame
    return None


def bundle_dir() -> str:
    """The absolute folder of the bundle config that MONAI is running (a bundle's ``bundle_root``).

    MONAI does not tell a config where it lives, but the :class:`monai.bundle.ConfigWorkflow` that
    evaluates it knows: its ``config_root_path`` is the folder of the first config file (MONAI
    looks for ``metadata.json`` and ``logging.conf`` there, and puts it, or its parent when it is
    named ``configs``, on ``sys.path``). This function is called from inside that evaluation and
    returns the same folder (the parent of a ``configs`` folder), made absolute, so ``python -m
    monai.bundle run --config_file /abs/bundles/span_cxr/train.json`` writes under
    ``/abs/bundles/span_cxr/runs`` from any working directory. ``--bundle_root DIR`` on the command
    line replaces the call altogether.

    Raises:
        ValueError: called outside a ``ConfigWorkflow`` (e.g. from a bare ``ConfigParser``) without a
            ``bundle_root`` override.
    """
    root = _config_dir()
    if root is None:
        raise ValueError("bundle_root: cannot tell which bundle folder this config is in; pass --bundle_root <folder>")
    return str(root.parent if root.name == "configs" else root)


def config_path(name: str) -> str:
    """The absolute path of the config file ``name`` beside the config MONAI is running.

    ``span_cxr`` runs its plain-DINO baseline from its own ``train.json`` this way, wherever
    ``--bundle_root`` points the outputs.

    Raises:
        ValueError: called outside a ``ConfigWorkflow``.
    """
    root = _config_dir()
    if root is None:
        raise ValueError(f"cannot tell which folder holds {name}: run the bundle through monai.bundle")
    return str(root / name)


def datalist_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a datalist file's bytes.

    Raises:
        DataError: the file cannot be read.
    """
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as e:
        raise DataError(path, f"cannot read datalist: {e.strerror or e}") from e


def run_identity(hparams: Mapping[str, Any], datalist: str | os.PathLike | None) -> dict[str, Any]:
    """What defines a pretraining run's result, as a JSON-able dict.

    ``{"hparams": ..., "datalist": absolute path, "datalist_sha256": digest of its content}``. The
    hyper-parameters include the data settings (``hparams["data"]``), so two runs with equal
    identities trained on the same data with the same settings. A checkpoint folder resumes only
    for the same identity, and the plain-DINO baseline of ``span_cxr`` is reused only when its
    identity equals the SPAN run's (:class:`medspan.workflows.compare.BaselineRun`).

    Args:
        hparams: the run's hyper-parameters.
        datalist: the datalist the run trains on (None: no datalist).

    Example::

        a = run_identity({"epochs": 30}, "runs/data/span_datalist.json")
        a["datalist_sha256"]   # changes when the file's content changes
    """
    return {
        "hparams": json_plain(dict(hparams)),
        "datalist": None if datalist is None else str(Path(datalist).resolve()),
        "datalist_sha256": None if datalist is None else datalist_digest(datalist),
    }


def validation_entries(
    datalist: str | os.PathLike,
    require: Sequence[str] = ("image", "label"),
    section: str = "validation",
) -> list[dict[str, Any]]:
    """The ``section`` entries of a datalist (validated), or ``[]`` when it has no such section.

    A datalist written by ``medspan build-priors`` from a set without labels has only a
    ``training`` section; the bundle then trains without attention validation and one line says
    so, instead of failing.

    Raises:
        DataError: the datalist cannot be read, or its section has problems
            (:func:`medspan.data.datalist.load_datalist`).
    """
    path = Path(datalist)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(path, f"cannot read datalist: {e}") from e
    if not isinstance(doc, Mapping) or section not in datalist_sections(doc):
        print(
            f"[medspan] {path}: no '{section}' section; training without attention validation "
            f"(add '{section}' entries with {' + '.join(require)} to get the AP table)",
            flush=True,
        )
        return []
    return load_datalist(path, section, require=tuple(require))


def guided_heads(
    head_structures: Mapping[Any, str] | None,
    structures: Sequence[str],
    enabled: bool = True,
) -> dict[int, int]:
    """``{head: index of its structure in structures}`` for the heads a prior guides; ``{}`` when not ``enabled``.

    ``enabled`` is off for runs without a prior (``span_cxr``'s plain-DINO baseline,
    ``smartformer_ct`` with prior weight 0): their heads are all free.

    Example::

        guided_heads({"0": "heart"}, ["left_lung", "heart"])          # {0: 1}
        guided_heads({"0": "heart"}, ["left_lung", "heart"], False)   # {}
    """
    return head_map(head_structures, structures) if enabled else {}


def head_names(head_structures: Mapping[Any, str] | None, enabled: bool = True) -> dict[int, str]:
    """``{head: structure name}`` of the guided heads (``{}`` when not ``enabled``), for picture titles."""
    if not enabled:
        return {}
    return {int(h): str(s) for h, s in (head_structures or {}).items() if s is not None}


def head_titles(
    num_heads: int,
    head_structures: Mapping[Any, str] | None = None,
    mean_head: bool = False,
) -> list[str]:
    """Titles of the attention maps an inference writes: ``head 0: left_lung``, ``head 3 (free)``, ...

    Args:
        num_heads: heads of the network.
        head_structures: ``{"0": "left_lung", ...}``; None: plain titles ``head h``.
        mean_head: one more map, the mean of the heads, comes last.
    """
    names = head_names(head_structures) if head_structures is not None else None
    titles = []
    for h in range(int(num_heads)):
        if names is None:
            titles.append(f"head {h}")
        elif h in names:
            titles.append(f"head {h}: {names[h]}")
        else:
            titles.append(f"head {h} (free)")
    return titles + (["mean of heads"] if mean_head else [])


def cached_dataset(
    data: Sequence[Mapping[str, Any]],
    transform: Callable,
    cache: str = "memory",
    cache_dir: str | os.PathLike | None = None,
):
    """The training dataset with its deterministic preprocessing cached.

    Args:
        data: data dicts.
        transform: the preprocessing (a ``Compose``; the random part after the deterministic one).
        cache: ``"memory"`` (:class:`monai.data.CacheDataset`, all items) or ``"disk"``
            (:class:`monai.data.PersistentDataset` in ``cache_dir``, for sets larger than memory).
        cache_dir: folder of the disk cache.
    """
    if cache == "memory":
        return CacheDataset(data, transform, cache_rate=1.0, num_workers=0, progress=False)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache 'disk' needs cache_dir")
        return PersistentDataset(data, transform, cache_dir=cache_dir)
    raise ValueError(f"hparams::cache must be 'memory' or 'disk', got {cache!r}")


def epoch_end_filter(iters_per_epoch: int) -> Callable[[Any, int], bool]:
    """An ignite event filter that fires on the last iteration of every epoch (for per-epoch log lines)."""
    n = max(1, int(iters_per_epoch))

    def _last_of_epoch(engine: Any, iteration: int) -> bool:
        return iteration % n == 0

    return _last_of_epoch


def inference_input(input: str | os.PathLike | None, output_dir: str | os.PathLike) -> str:
    """What ``inference.json`` reads: ``input`` when given, else the datalist of a finished run in ``output_dir``.

    Raises:
        DataError: no ``input`` and no finished run to take a datalist from.
    """
    if input:
        return str(input)
    record = Path(output_dir) / "final_summary.json"
    try:
        datalist = json.loads(record.read_text()).get("datalist")
    except (OSError, ValueError, AttributeError):
        datalist = None
    if not datalist:
        raise DataError("<input>", "no input given: pass --input FILE|FOLDER|DATALIST.json")
    return str(datalist)
