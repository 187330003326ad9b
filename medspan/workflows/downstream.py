"""``medspan compare``: encoders x label fractions x seeds through a downstream bundle, one table.

A comparison runs one downstream bundle (``bundles/cxr_seg/train.json`` or
``bundles/cxr_cls/train.json``) once per *cell* -- encoder x label fraction x seed -- in-process
through MONAI's ``ConfigWorkflow``, then writes what a reader needs to trust the numbers:

- ``results.csv``: one row per cell (task, encoder, fraction, seed, n_train, key_metric, value,
  ci_lo, ci_hi, eval_section, run_dir, collapsed);
- ``results.md``: encoder rows x fraction columns, ``mean ± sd`` over seeds (sample sd, ddof=1, with
  n), the encoder-health table, and one generated sentence per fraction naming the best encoder and
  its margin over each other one;
- ``results.png``: key metric against label fraction (log x axis), one line per encoder, error
  bars = sd over seeds, zero-label rows as separate markers at the left;
- ``results.json``: all of it, machine-readable;
- an MLflow parent run (experiment ``cxr_<task>_compare``, SQLite store ``<out>/mlruns.db`` by
  default) with one child run per cell (tag ``mlflow.parentRunId``).

Cells run in ``<out>/cells/<run_name>`` (run name ``<encoder>_f<fraction>_s<seed>``, or
``<encoder>_zero_label``). A cell is *finished* when its ``final_summary.json`` exists next to a
``compare_cell.json`` fingerprint written by this module after the run: the bundle file's digest,
the overrides, and the digests of the pretrained weights and the datalist. A re-run skips a cell
whose fingerprint equals what it would run now, and says so; a killed comparison resumes with the
remaining cells.

Before the numbers are trusted, each pretrained encoder (and scratch, as the reference) is checked
for collapse on the labeled validation images of the task's datalist
(:func:`medspan.eval.collapse.encoder_health`); a degenerate encoder is flagged in every output.

Paths (``--encoders``, ``--datalist``, ``--out``) are relative to the current folder; the README
runs the command from the repository root, where the defaults point.

Example::

    report = compare("seg", encoders={"scratch": None, "span": "bundles/span_cxr/runs/span_cxr"},
                     fractions=[0.1, 1.0], seeds=[0, 1, 2], out="runs/compare")
    report.rows[0]["value"]          # the key metric of the first cell
    print(report.markdown)           # the results.md text
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigWorkflow
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize

from medspan.data.datalist import load_datalist, read_datalist_json
from medspan.data.readers import MedspanReader
from medspan.data.transforms import CXRNormalize
from medspan.engines.tracking import artifact_location, sqlite_uri
from medspan.errors import DataError
from medspan.eval.collapse import encoder_features, encoder_health, format_health_table
from medspan.io import atomic_write, json_plain, write_json_atomic, write_text_atomic
from medspan.models.pretrained import build_encoder, resolve_pretrained
from medspan.models.vit import VisionTransformer

__all__ = [
    "CELL_FINGERPRINT",
    "CSV_COLUMNS",
    "DEFAULT_BUNDLES",
    "DEFAULT_ENCODERS",
    "MAIN_JOB",
    "TASKS",
    "ZERO_LABEL_BUNDLE",
    "Cell",
    "CompareReport",
    "aggregate",
    "best_sentences",
    "cell_fingerprint",
    "cell_overrides",
    "check_encoders",
    "compare",
    "encoder_health_rows",
    "format_health",
    "format_results_md",
    "log_mlflow",
    "parse_encoders",
    "parse_fractions",
    "parse_seeds",
    "parse_set",
    "plan_cells",
    "plot_results",
    "results_csv",
    "run_cell",
]

TASKS: dict[str, dict[str, str]] = {
    "seg": {"name": "segmentation", "key_metric": "mean_dice"},
    "cls": {"name": "classification", "key_metric": "mean_auc"},
}
"""Short task name -> what its bundle reports."""

DEFAULT_BUNDLES: dict[str, str] = {"seg": "bundles/cxr_seg/train.json", "cls": "bundles/cxr_cls/train.json"}
"""Task -> its downstream bundle (relative to the repository root)."""

ZERO_LABEL_BUNDLE = "bundles/cxr_seg/zero_label.json"
"""The zero-label segmentation bundle (masks from the SPAN-guided heads, no training)."""

DEFAULT_ENCODERS: dict[str, str | None] = {
    "scratch": None,
    "dino": "bundles/span_cxr/runs/span_cxr_baseline",
    "span": "bundles/span_cxr/runs/span_cxr",
}
"""The encoders compared by default: none, and the two runs the ``span_cxr`` main job writes."""

MAIN_JOB = "python -m monai.bundle run --config_file bundles/span_cxr/train.json"
"""The command that writes the default encoders."""

CELL_FINGERPRINT = "compare_cell.json"
"""File written into a cell's run folder after it finished: what it ran (see :func:`cell_fingerprint`)."""

CSV_COLUMNS = (
    "task", "encoder", "fraction", "seed", "n_train", "key_metric", "value",
    "ci_lo", "ci_hi", "eval_section", "run_dir", "collapsed",
)  # fmt: skip
"""Columns of ``results.csv``."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _say(message: str) -> None:
    print(f"[medspan] compare: {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------


def parse_encoders(text: str) -> dict[str, str | None]:
    """``"scratch=none,span=runs/span"`` -> ``{"scratch": None, "span": "runs/span"}`` (order kept).

    ``none`` (any case) or an empty path means training from scratch.

    Raises:
        DataError: an item without ``=``, a name used twice, or a name that is not a plain folder name.
    """
    out: dict[str, str | None] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep:
            raise DataError("--encoders", f"'{item}' is not NAME=PATH (use NAME=none for scratch)")
        if not _NAME.match(name):
            raise DataError("--encoders", f"'{name}' is not a usable name (letters, digits, '_', '-', '.')")
        if name in out:
            raise DataError("--encoders", f"'{name}' is given twice")
        out[name] = None if path.lower() in ("", "none") else path
    if not out:
        raise DataError("--encoders", "no encoder given")
    return out


def parse_fractions(text: str) -> list[float]:
    """``"0.01,0.1,1"`` -> ``[0.01, 0.1, 1.0]`` (sorted, duplicates dropped).

    Raises:
        DataError: a value that is not a number in (0, 1].
    """
    values: set[float] = set()
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        try:
            v = float(item)
        except ValueError:
            raise DataError("--fractions", f"'{item}' is not a number") from None
        if not 0.0 < v <= 1.0:
            raise DataError("--fractions", f"{item} is not in (0, 1] (a fraction of the training labels)")
        values.add(v)
    if not values:
        raise DataError("--fractions", "no fraction given")
    return sorted(values)


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (order kept, duplicates dropped).

    Raises:
        DataError: a value that is not an integer.
    """
    seeds: list[int] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        try:
            v = int(item)
        except ValueError:
            raise DataError("--seeds", f"'{item}' is not an integer") from None
        if v not in seeds:
            seeds.append(v)
    if not seeds:
        raise DataError("--seeds", "no seed given")
    return seeds


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``["hparams::epochs=5", "x=abc"]`` -> ``{"hparams::epochs": 5, "x": "abc"}``.

    Values are parsed as JSON when they are JSON (numbers, true/false/null, lists, objects), else
    kept as strings.

    Raises:
        DataError: an item without ``=`` or with an empty key.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DataError("--set", f"'{item}' is not KEY=VALUE (e.g. hparams::epochs=5)")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def check_encoders(encoders: Mapping[str, str | None], *, defaults: bool = False) -> None:
    """Fail with one clear message when an encoder's run folder or ``model.pt`` is missing.

    Args:
        encoders: name -> pretraining run folder, ``model.pt``, or None (scratch).
        defaults: the encoders are :data:`DEFAULT_ENCODERS` (the message then says to run the
            ``span_cxr`` main job first).

    Raises:
        DataError: the path does not exist, or a folder has no ``model.pt``.
    """
    for name, path in encoders.items():
        if path is None:
            continue
        p = Path(path)
        if not p.exists():
            if defaults:
                raise DataError(
                    p,
                    f"no pretraining run for the default encoder '{name}'; run the span_cxr main job "
                    f"first ({MAIN_JOB}), or give --encoders NAME=PATH,...",
                )
            raise DataError(p, f"encoder '{name}': not found (give a pretraining run folder, a model.pt, or none)")
        if p.is_dir() and not (p / "model.pt").is_file():
            hint = f"; the span_cxr main job writes it ({MAIN_JOB})" if defaults else ""
            raise DataError(p, f"encoder '{name}': the folder has no model.pt (is the pretraining run finished?){hint}")


# ----------------------------------------------------------------------------------------------
# cells
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One run of the comparison.

    Args:
        encoder: the encoder's name (``"scratch"``, ``"dino"``, ``"span"``, ...).
        pretrained: its pretraining run folder or ``model.pt``; None for scratch.
        fraction: label fraction in (0, 1]; 0.0 for a zero-label cell.
        seed: the seed of the label subset and training; None for a zero-label cell.
    """

    encoder: str
    pretrained: str | None
    fraction: float
    seed: int | None

    @property
    def zero_label(self) -> bool:
        """True for a zero-label cell (no training, masks from the guided heads)."""
        return self.seed is None

    @property
    def run_name(self) -> str:
        """``span_f0.01_s0``; ``span_zero_label`` for a zero-label cell."""
        if self.zero_label:
            return f"{self.encoder}_zero_label"
        return f"{self.encoder}_f{self.fraction:g}_s{self.seed}"


def has_guided_heads(pretrained: str | os.PathLike | None) -> bool:
    """True when ``pretrained`` is a pretraining run whose heads were guided by priors (SPAN).

    A plain-DINO baseline records no ``head_structures``; a bare ``model.pt`` or a folder without
    ``final_summary.json`` has no record, and is taken as guided (the zero-label bundle then says
    what is missing).
    """
    if pretrained is None:
        return False
    path = Path(pretrained)
    if not path.is_dir():
        return True
    spec = resolve_pretrained(path)
    return spec.hparams is None or bool(spec.head_structures)


def plan_cells(
    encoders: Mapping[str, str | None],
    fractions: Sequence[float],
    seeds: Sequence[int],
    zero_label: bool = False,
    guided: Callable[[str | None], bool] = lambda p: p is not None,
) -> list[Cell]:
    """Every cell of a comparison: zero-label cells first (one per encoder with guided heads), then encoder x fraction x seed.

    ``guided(path)`` says whether an encoder has prior-guided heads (zero-label masks need them;
    :func:`has_guided_heads` for real runs).

    Example::

        >>> [c.run_name for c in plan_cells({"scratch": None, "span": "r"}, [0.1], [0, 1], zero_label=True)]
        ['span_zero_label', 'scratch_f0.1_s0', 'scratch_f0.1_s1', 'span_f0.1_s0', 'span_f0.1_s1']
    """
    cells: list[Cell] = []
    if zero_label:
        cells += [Cell(name, path, 0.0, None) for name, path in encoders.items() if path is not None and guided(path)]
    for name, path in encoders.items():
        for fraction in fractions:
            cells += [Cell(name, path, float(fraction), int(seed)) for seed in seeds]
    return cells


def _abs(path: str | os.PathLike | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def cell_overrides(
    cell: Cell,
    *,
    work_dir: str | os.PathLike,
    datalist: str | os.PathLike | None = None,
    mode: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The bundle overrides of one cell (the downstream contract).

    ``pretrained``, ``encoder_name``, ``datalist``, ``work_dir``, ``run_name``; for a trained cell
    ``hparams::label_fraction`` and ``hparams::seed`` (and ``hparams::mode`` when ``mode`` is given);
    ``mlflow_tracking=False`` (the comparison logs the child runs itself) and ``progress_bar=False``.
    ``extra`` (``--set``) comes last, so it can change anything but the cell's own keys.

    Paths are made absolute, so a fingerprint does not depend on the current folder.
    """
    over: dict[str, Any] = {
        "pretrained": _abs(cell.pretrained),
        "encoder_name": cell.encoder,
        "datalist": _abs(datalist),
        "work_dir": _abs(work_dir),
        "run_name": cell.run_name,
        "mlflow_tracking": False,
        "progress_bar": False,
    }
    if not cell.zero_label:
        over["hparams::label_fraction"] = float(cell.fraction)
        over["hparams::seed"] = int(cell.seed)  # type: ignore[arg-type]
        if mode is not None:
            over["hparams::mode"] = mode
    for key, value in (extra or {}).items():
        if key in ("pretrained", "encoder_name", "run_name", "work_dir") or (
            key in ("hparams::label_fraction", "hparams::seed") and not cell.zero_label
        ):
            raise DataError("--set", f"'{key}' is set by the comparison for every cell; it cannot be overridden")
        over[key] = value
    return over


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _weights_file(pretrained: str | None) -> Path | None:
    if pretrained is None:
        return None
    p = Path(pretrained)
    return p / "model.pt" if p.is_dir() else p


def cell_fingerprint(bundle: str | os.PathLike, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """What a cell runs, as a JSON-able dict: equal fingerprints give equal results.

    ``{"bundle": abs path, "bundle_sha256", "overrides" (without work_dir and run_name: those are
    where, not what), "pretrained_sha256" (of the weights file), "datalist_sha256"}``.

    Raises:
        DataError: the bundle, the weights or the datalist cannot be read.
    """
    files = {"bundle": bundle, "pretrained": _weights_file(overrides.get("pretrained")), "datalist": overrides.get("datalist")}
    digests: dict[str, str | None] = {}
    for what, path in files.items():
        try:
            digests[what] = None if path is None else _sha256(path)
        except OSError as e:
            raise DataError(path, f"cannot read the {what} file: {e.strerror or e}") from e
    return {
        "bundle": _abs(bundle),
        "bundle_sha256": digests["bundle"],
        "overrides": json_plain({k: v for k, v in overrides.items() if k not in ("work_dir", "run_name")}),
        "pretrained_sha256": digests["pretrained"],
        "datalist_sha256": digests["datalist"],
    }


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _check_summary(summary: Mapping[str, Any], cell: Cell, path: Path) -> None:
    """The bundle honoured the cell's overrides (else the table would mislabel a result)."""
    missing = [k for k in ("key_metric", "key_value", "eval_section", "n_train") if k not in summary]
    if missing:
        raise DataError(path, f"missing {', '.join(missing)} (see the downstream bundle contract)")
    wrong = []
    if summary.get("encoder_name", cell.encoder) != cell.encoder:
        wrong.append(f"encoder_name {summary.get('encoder_name')!r} (asked {cell.encoder!r})")
    if not cell.zero_label:
        if not math.isclose(float(summary.get("label_fraction", cell.fraction)), cell.fraction, abs_tol=1e-9):
            wrong.append(f"label_fraction {summary.get('label_fraction')} (asked {cell.fraction:g})")
        if summary.get("seed", cell.seed) != cell.seed:
            wrong.append(f"seed {summary.get('seed')} (asked {cell.seed})")
    if wrong:
        raise DataError(path, "the run records " + "; ".join(wrong) + ": the bundle did not apply the overrides")


def run_cell(
    cell: Cell,
    bundle: str | os.PathLike,
    overrides: Mapping[str, Any],
    run_dir: str | os.PathLike,
    on_start: Callable[[], None] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Run one cell through ``ConfigWorkflow``, or reuse it when it already finished with the same fingerprint.

    Args:
        cell: the cell.
        bundle: the bundle config (``train.json`` / ``zero_label.json``).
        overrides: :func:`cell_overrides` of the cell (its ``work_dir``/``run_name`` give ``run_dir``).
        run_dir: ``work_dir/run_name``, where the bundle writes ``final_summary.json``.
        on_start: called just before the bundle runs (not for a reused cell).

    Returns:
        ``(final_summary, skipped)``; ``skipped`` is True when the earlier result was reused.

    Raises:
        DataError: the run did not write ``final_summary.json``, or it records other settings.
    """
    run_dir = Path(run_dir)
    fp_file, summary_file = run_dir / CELL_FINGERPRINT, run_dir / "final_summary.json"
    fingerprint = cell_fingerprint(bundle, overrides)
    summary = _load_json(summary_file)
    if summary is not None and _load_json(fp_file) == fingerprint:
        _check_summary(summary, cell, summary_file)
        return summary, True
    fp_file.unlink(missing_ok=True)  # a crash below must not leave an old fingerprint beside a new summary
    if on_start is not None:
        on_start()
    wf = ConfigWorkflow(config_file=str(bundle), workflow_type="train", **dict(overrides))
    wf.initialize()
    wf.run()
    wf.finalize()
    summary = _load_json(summary_file)
    if summary is None:
        raise DataError(summary_file, f"the {cell.run_name} run of {bundle} finished without writing it")
    _check_summary(summary, cell, summary_file)
    write_json_atomic(fingerprint, fp_file)
    return summary, False


def _row(task: str, cell: Cell, summary: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    ci = summary.get("key_ci")
    lo, hi = (ci[0], ci[1]) if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None, None)
    return {
        "task": task,
        "encoder": cell.encoder,
        "fraction": float(cell.fraction),
        "seed": cell.seed,
        "n_train": int(summary["n_train"]),
        "key_metric": str(summary["key_metric"]),
        "value": None if summary["key_value"] is None else float(summary["key_value"]),
        "ci_lo": None if lo is None else float(lo),
        "ci_hi": None if hi is None else float(hi),
        "eval_section": str(summary["eval_section"]),
        "run_dir": str(run_dir),
        "mode": str(summary.get("mode", "zero_label" if cell.zero_label else "")),
        "collapsed": None,
    }


# ----------------------------------------------------------------------------------------------
# encoder health
# ----------------------------------------------------------------------------------------------


def _health_entries(datalist: str | os.PathLike, max_images: int = 1000) -> tuple[list[dict[str, Any]], str]:
    """The training and validation images (never the scored test section), at most ``max_images``.

    k-NN accuracy on a few dozen images is too noisy to call an encoder collapsed, so both sections
    are used; without either, the test section.
    """
    data = read_datalist_json(datalist)
    names = [s for s in ("training", "validation") if data.get(s)] or [s for s in ("test",) if data.get(s)]
    if not names:
        raise DataError(datalist, "no training, validation or test section: nothing to check the encoders on")
    entries = [e for s in names for e in load_datalist(datalist, s)]
    return entries[:max_images], "+".join(names)


def _load_images(entries: Sequence[Mapping[str, Any]], size: Sequence[int]) -> torch.Tensor:
    """(N, 1, *size) float32 images of ``entries`` (MONAI loading, CXR normalisation, area resize)."""
    load = Compose(
        [
            LoadImage(reader=MedspanReader(), image_only=True),
            EnsureChannelFirst(),
            CXRNormalize(),
            Resize(spatial_size=tuple(int(s) for s in size), mode="area"),
        ]
    )
    return torch.stack([torch.as_tensor(load(e["image"])).float() for e in entries])


def encoder_health_rows(
    encoders: Mapping[str, str | None],
    datalist: str | os.PathLike,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """:func:`~medspan.eval.collapse.encoder_health` of every encoder on the datalist's training and
    validation images (at most 1000; the test section only when there is nothing else).

    Images are loaded with MONAI (``MedspanReader``, channel first, :class:`CXRNormalize`) and
    resized to the encoder's own ``img_size``. The k-NN accuracy uses the entries' multi-hot
    ``labels`` when every entry has them (classification datalists); otherwise it is skipped.
    Scratch (``None``) is the reference: a ViT with fresh weights (``torch.manual_seed(seed)``), of the
    model and size of the first pretrained encoder.

    Returns:
        encoder name -> the :func:`~medspan.eval.collapse.encoder_health` dict (``knn_accuracy``,
        ``effective_rank``, ``head_similarity``, ``border_attention``, ..., ``collapsed``, ``reasons``)
        plus ``n_images`` and ``section`` (the datalist section the images came from).

    Raises:
        DataError: the datalist has no validation/test images, or an image cannot be read.
    """
    entries, section = _health_entries(datalist)
    labels = None
    if entries and all("labels" in e for e in entries):
        labels = torch.as_tensor(np.asarray([e["labels"] for e in entries], dtype=np.float32))
        if labels.ndim == 1:
            labels = labels[:, None]
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # building encoders draws random numbers: not from the caller's stream
        torch.manual_seed(seed)
        built: dict[str, VisionTransformer] = {}
        reference: dict[str, Any] = {}
        for name, path in encoders.items():  # pretrained first: scratch copies their model and size
            if path is None:
                continue
            built[name], _report = build_encoder(path)
            spec = resolve_pretrained(path)
            if not reference and spec.arch is not None:
                reference = {"model": spec.arch["model"], "in_chans": spec.arch["in_chans"],
                             "img_size": tuple(built[name].img_size)}
        for name, path in encoders.items():
            if path is None:
                torch.manual_seed(seed)
                built[name], _report = build_encoder(
                    None, model=reference.get("model"), in_chans=reference.get("in_chans"),
                    img_size=reference.get("img_size"),
                )
    rows: dict[str, dict[str, Any]] = {}
    images: dict[tuple[int, ...], torch.Tensor] = {}
    for name in encoders:
        encoder = built[name]
        size = tuple(int(s) for s in encoder.img_size)
        if size not in images:
            images[size] = _load_images(entries, size)
        feats, attn, grid = encoder_features(encoder, images[size], device)
        health = dict(encoder_health(feats, labels, attn, grid))
        health.update(n_images=len(entries), section=section)
        rows[name] = json_plain(health)
    return rows


# ----------------------------------------------------------------------------------------------
# tables, plot, tracking
# ----------------------------------------------------------------------------------------------


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[float, dict[str, Any]]]:
    """Mean, sample sd (ddof=1; None for one value) and n of the key metric per encoder and fraction.

    Cells whose value is undefined (None: e.g. no class with positives and negatives) are left out
    of the mean and of ``n``; a group with none defined gets ``{"mean": None, "sd": None, "n": 0}``.

    Example::

        >>> aggregate([{"encoder": "a", "fraction": 0.1, "value": v} for v in (0.5, 0.75, 1.0)])["a"][0.1]
        {'mean': 0.75, 'sd': 0.25, 'n': 3}
    """
    values: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        group = values.setdefault(r["encoder"], {}).setdefault(float(r["fraction"]), [])
        if r["value"] is not None:
            group.append(float(r["value"]))
    out: dict[str, dict[float, dict[str, Any]]] = {}
    for enc, per in values.items():
        out[enc] = {}
        for frac, vs in sorted(per.items()):
            arr = np.asarray(vs, dtype=np.float64)
            if arr.size == 0:
                out[enc][frac] = {"mean": None, "sd": None, "n": 0}
                continue
            out[enc][frac] = {
                "mean": float(arr.mean()),
                "sd": float(arr.std(ddof=1)) if arr.size > 1 else None,
                "n": int(arr.size),
            }
    return out


def _frac_label(fraction: float) -> str:
    return "zero-label" if fraction == 0 else f"{100 * fraction:g}%"


def _cell_text(stat: Mapping[str, Any] | None) -> str:
    if stat is None:
        return "—"
    if stat["mean"] is None:
        return "undefined"
    if stat["sd"] is None:
        return f"{stat['mean']:.3f} (n={stat['n']})"
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f} (n={stat['n']})"


def best_sentences(
    stats: Mapping[str, Mapping[float, Mapping[str, Any]]],
    key_metric: str,
    collapsed: Mapping[str, bool | None] | None = None,
) -> list[str]:
    """One sentence per fraction: the best encoder (highest mean) and its margin over each other one.

    A margin smaller than the larger of the two sds is called "within the spread of the seeds";
    an encoder flagged collapsed is named so.

    Example::

        >>> best_sentences({"a": {0.1: {"mean": 0.7, "sd": 0.01, "n": 3}},
        ...                 "b": {0.1: {"mean": 0.6, "sd": 0.01, "n": 3}}}, "mean_dice")
        ['At 10% labels, a is best (mean_dice 0.700, n=3): +0.100 over b (0.600).']
    """
    collapsed = collapsed or {}
    fractions = sorted({f for per in stats.values() for f in per})
    out = []
    for frac in fractions:
        have = {enc: per[frac] for enc, per in stats.items() if frac in per and per[frac]["mean"] is not None}
        if not have:
            continue
        order = sorted(have, key=lambda e: -have[e]["mean"])
        best = order[0]
        b = have[best]
        where = "With zero labels" if frac == 0 else f"At {_frac_label(frac)} labels"
        flag = " — flagged collapsed" if collapsed.get(best) else ""
        text = f"{where}, {best} is best ({key_metric} {b['mean']:.3f}, n={b['n']}{flag})"
        parts = []
        for other in order[1:]:
            o = have[other]
            diff = b["mean"] - o["mean"]
            spread = max(s for s in (b["sd"], o["sd"], 0.0) if s is not None)
            note = ", within the spread of the seeds" if diff < spread else ""
            oflag = ", flagged collapsed" if collapsed.get(other) else ""
            parts.append(f"+{diff:.3f} over {other} ({o['mean']:.3f}{note}{oflag})")
        out.append(text + (": " + "; ".join(parts) + "." if parts else " (the only encoder)."))
    return out


def format_health(health: Mapping[str, Mapping[str, Any]], encoders: Mapping[str, str | None]) -> str:
    """The encoder-health table (markdown-friendly text) via :func:`~medspan.eval.collapse.format_health_table`."""
    return format_health_table(
        {(name if encoders.get(name) is not None else f"{name} (reference)"): h for name, h in health.items()}
    )


def format_results_md(
    *,
    task: str,
    mode: str | None,
    rows: Sequence[Mapping[str, Any]],
    health: Mapping[str, Mapping[str, Any]] | None,
    encoders: Mapping[str, str | None],
    command: str | None = None,
) -> str:
    """``results.md``: the mean ± sd table (encoder rows x fraction columns), the health table, the sentences."""
    key = rows[0]["key_metric"] if rows else TASKS[task]["key_metric"]
    stats = aggregate(rows)
    fractions = sorted({float(r["fraction"]) for r in rows})
    sections = sorted({str(r["eval_section"]) for r in rows})
    collapsed = _collapsed_flags(health, encoders)
    lines = [f"# cxr_{task} comparison: {key}" + (f" ({mode})" if mode else ""), ""]
    if command:
        lines += ["Command:", "", "    " + command, ""]
    lines += [
        (f"{key} on the {'/'.join(sections) or '-'} section, mean ± sd over seeds (sample sd, ddof=1; "
        "n = number of seeds; zero-label runs are deterministic, n=1)."),
        "",
        "| encoder | " + " | ".join(_frac_label(f) for f in fractions) + " |",
        "|---|" + "---|" * len(fractions),
    ]
    for enc in encoders:
        if enc not in stats:
            continue
        flag = " ⚠ collapsed" if collapsed.get(enc) else ""
        lines.append(f"| {enc}{flag} | " + " | ".join(_cell_text(stats[enc].get(f)) for f in fractions) + " |")
    lines += ["", "## Encoder health", ""]
    if health:
        lines += [
            (
                f"On the {_health_where(health)}. Scratch (random weights) is the reference: a random ViT "
                "often fails these checks too, and it is not judged."
            ),
            "",
            format_health(health, encoders),
            "",
        ]
        for enc, flag in collapsed.items():
            if flag:
                reasons = "; ".join(str(r) for r in health[enc].get("reasons") or []) or "see the table"
                lines.append(f"WARNING: encoder '{enc}' looks collapsed ({reasons}); do not trust its gains or losses.")
        if any(collapsed.values()):
            lines.append("")
    else:
        lines += ["not computed (health check off, or the runs recorded no datalist: give --datalist)", ""]
    lines += ["## Summary", ""] + best_sentences(stats, key, collapsed) + [""]
    return "\n".join(lines)


def _health_where(health: Mapping[str, Mapping[str, Any]]) -> str:
    first = next(iter(health.values()))
    return f"{first.get('n_images', '?')} images of the datalist's {first.get('section', '?')} section"


def _collapsed_flags(
    health: Mapping[str, Mapping[str, Any]] | None, encoders: Mapping[str, str | None]
) -> dict[str, bool | None]:
    """Encoder -> collapsed (pretrained encoders with a health check), None otherwise (scratch, unchecked)."""
    out: dict[str, bool | None] = {}
    for enc, path in encoders.items():
        h = (health or {}).get(enc)
        out[enc] = None if path is None or h is None else bool(h.get("collapsed"))
    return out


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def results_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """``results.csv`` text: :data:`CSV_COLUMNS`, one row per cell (None -> empty, floats in full precision)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([_csv_value(r.get(c)) for c in CSV_COLUMNS])
    return buf.getvalue()


def plot_results(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str = "",
    encoders: Sequence[str] | None = None,
) -> Path:
    """``results.png``: mean key metric against label fraction (log x), one line per encoder, sd error bars.

    Zero-label rows (fraction 0) are drawn as star markers at the left of the smallest fraction.
    Written atomically with matplotlib's Agg canvas (no display, no pyplot state).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = aggregate(rows)
    key = rows[0]["key_metric"] if rows else ""
    fractions = sorted({float(r["fraction"]) for r in rows if float(r["fraction"]) > 0})
    x_zero = (fractions[0] if fractions else 1.0) / 4
    fig = Figure(figsize=(7.5, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, enc in enumerate(encoders or list(stats)):
        per = stats.get(enc)
        if not per:
            continue
        color = f"C{i % 10}"
        xs = [f for f in sorted(per) if f > 0 and per[f]["mean"] is not None]
        if xs:
            ax.errorbar(
                xs,
                [per[f]["mean"] for f in xs],
                yerr=[per[f]["sd"] or 0.0 for f in xs],
                marker="o",
                capsize=3,
                color=color,
                label=enc,
            )
        if 0.0 in per and per[0.0]["mean"] is not None:
            ax.plot([x_zero], [per[0.0]["mean"]], marker="*", markersize=12, linestyle="none", color=color,
                    label=f"{enc} (zero-label)")
    ticks = ([x_zero] if any(0.0 in per for per in stats.values()) else []) + fractions
    ax.set_xscale("log")
    ax.set_xticks(ticks)
    ax.set_xticklabels(["0 labels" if t == x_zero and t not in fractions else _frac_label(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("label fraction (log scale)")
    ax.set_ylabel(f"{key} (mean ± sd over seeds)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: never hides a point
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _dispose(client: Any) -> None:
    """Release the SQLite engine of an MLflow client (MLflow has no public close)."""
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    dispose = getattr(store, "_dispose_engine", None)
    if callable(dispose):
        dispose()
    for attr in ("engine", "read_engine"):
        engine = getattr(store, attr, None)
        if engine is not None and hasattr(engine, "dispose"):
            engine.dispose()


def log_mlflow(
    *,
    tracking_uri: str,
    experiment: str,
    artifact_dir: str | os.PathLike,
    parent_name: str,
    parent_params: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    artifacts: Sequence[str | os.PathLike] = (),
) -> str:
    """One parent run with one child run per cell (tag ``mlflow.parentRunId``); returns the parent's id.

    Child runs carry the params ``encoder``, ``fraction``, ``seed``, ``mode``, ``n_train``,
    ``eval_section``, ``run_dir`` and the metrics ``<key_metric>``, ``<key_metric>_ci_lo`` /
    ``_ci_hi`` (when there is an interval); tag ``medspan.collapsed`` when the encoder was checked.
    The parent carries ``parent_params``, the mean per encoder and fraction
    (``<encoder>_f<fraction>_mean``) and the ``artifacts``. Runs end ``FINISHED``, or ``FAILED``
    when logging breaks.
    """
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        exp_id = (
            exp.experiment_id
            if exp is not None
            else client.create_experiment(experiment, artifact_location=artifact_location(artifact_dir))
        )
        now = int(time.time() * 1000)
        parent = client.create_run(exp_id, run_name=parent_name, tags={"medspan.kind": "compare"})
        pid = parent.info.run_id
        status = "FAILED"
        try:
            params = [Param(k, str(v)[:500]) for k, v in parent_params.items()]
            stats = aggregate(rows)
            metrics = [
                Metric(f"{enc}_f{frac:g}_mean", s["mean"], now, 0)
                for enc, per in stats.items()
                for frac, s in per.items()
                if s["mean"] is not None
            ]
            client.log_batch(pid, metrics=metrics, params=params)
            for r in rows:
                tags = {"mlflow.parentRunId": pid}
                if r.get("collapsed") is not None:
                    tags["medspan.collapsed"] = str(bool(r["collapsed"])).lower()
                run_name = Path(r["run_dir"]).name
                child = client.create_run(exp_id, run_name=run_name, tags=tags)
                cid = child.info.run_id
                key = r["key_metric"]
                cm = [] if r["value"] is None else [Metric(key, float(r["value"]), now, 0)]
                for end in ("ci_lo", "ci_hi"):
                    if r.get(end) is not None:
                        cm.append(Metric(f"{key}_{end}", float(r[end]), now, 0))
                cp = {
                    "encoder": r["encoder"],
                    "fraction": f"{float(r['fraction']):g}",
                    "seed": "" if r["seed"] is None else str(r["seed"]),
                    "mode": r.get("mode") or "",
                    "n_train": str(r["n_train"]),
                    "eval_section": r["eval_section"],
                    "run_dir": r["run_dir"],
                }
                client.log_batch(cid, metrics=cm, params=[Param(k, v) for k, v in cp.items()])
                client.set_terminated(cid, "FINISHED")
            for a in artifacts:
                if Path(a).is_file():
                    client.log_artifact(pid, str(a))
            status = "FINISHED"
        finally:
            client.set_terminated(pid, status)
        return pid
    finally:
        _dispose(client)


# ----------------------------------------------------------------------------------------------
# the comparison
# ----------------------------------------------------------------------------------------------


@dataclass
class CompareReport:
    """What :func:`compare` produced.

    ``rows``: one dict per cell (the ``results.csv`` columns plus ``mode``); ``stats``: :func:`aggregate`;
    ``health``: encoder -> health dict (empty when not computed); ``ran`` / ``skipped``: run names of
    the cells run now / reused; ``files``: output name -> path; ``parent_run_id``: the MLflow parent
    (None with ``mlflow=False``); ``markdown``: the ``results.md`` text.
    """

    rows: list[dict[str, Any]]
    stats: dict[str, dict[float, dict[str, Any]]]
    health: dict[str, dict[str, Any]]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    parent_run_id: str | None = None
    markdown: str = ""


def _datalist_of(summaries: Sequence[Mapping[str, Any]]) -> str | None:
    """The datalist a bundle run recorded (``datalist`` or ``identity.datalist`` of its summary)."""
    for s in summaries:
        for where in (s, s.get("identity") if isinstance(s.get("identity"), dict) else {}):
            d = where.get("datalist")
            if isinstance(d, str) and Path(d).is_file():
                return d
    return None


def compare(
    task: str,
    *,
    encoders: Mapping[str, str | None] | None = None,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    seeds: Sequence[int] = (0, 1, 2),
    mode: str | None = None,
    zero_label: bool = False,
    datalist: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    extra: Mapping[str, Any] | None = None,
    mlflow: bool = True,
    tracking_uri: str | None = None,
    bundle: str | os.PathLike | None = None,
    zero_label_bundle: str | os.PathLike | None = None,
    health: bool = True,
    device: torch.device | str | None = None,
    command: str | None = None,
    log: Callable[[str], None] = _say,
) -> CompareReport:
    """Run (or reuse) every cell, check the encoders, write results.{csv,md,png,json} and the MLflow runs.

    Args:
        task: ``"seg"`` or ``"cls"``.
        encoders: name -> pretraining run folder / ``model.pt`` / None (scratch); default
            :data:`DEFAULT_ENCODERS` (which must exist: run the span_cxr main job first).
        fractions: label fractions in (0, 1].
        seeds: seeds per encoder and fraction.
        mode: ``"linear"`` or ``"finetune"`` (cls only; None: the bundle's default).
        zero_label: seg only: one zero-label cell per pretrained encoder (fraction 0).
        datalist: the task's datalist; None: the bundle's synthetic default.
        out: output folder; default ``bundles/cxr_<task>/runs/compare`` (``compare_<mode>`` with a mode).
        extra: more bundle overrides (``--set``), e.g. ``{"hparams::epochs": 5}``.
        mlflow: log the parent and child runs.
        tracking_uri: MLflow store; default ``sqlite:///<out>/mlruns.db``.
        bundle: the bundle config; default :data:`DEFAULT_BUNDLES` ``[task]``.
        zero_label_bundle: default :data:`ZERO_LABEL_BUNDLE`.
        health: run the encoder-health check.
        device: for the health check; default CUDA when available.
        command: the command line, quoted in ``results.md``.
        log: where the one-line progress messages go.

    Raises:
        DataError: a bad argument, a missing encoder, a run that did not honour its overrides.
    """
    if task not in TASKS:
        raise DataError("--task", f"'{task}' is not one of {', '.join(TASKS)}")
    if mode is not None and task != "cls":
        raise DataError("--mode", "linear/finetune is a classification setting (--task cls)")
    if mode is not None and mode not in ("linear", "finetune"):
        raise DataError("--mode", f"'{mode}' is not linear or finetune")
    if zero_label and task != "seg":
        raise DataError("--zero-label", "zero-label mode exists for segmentation only (--task seg)")
    defaults = encoders is None
    encoders = dict(DEFAULT_ENCODERS if encoders is None else encoders)
    check_encoders(encoders, defaults=defaults)
    if datalist is not None and not Path(datalist).is_file():
        raise DataError(datalist, "datalist not found")
    bundle = Path(bundle if bundle is not None else DEFAULT_BUNDLES[task])
    zl_bundle = Path(zero_label_bundle if zero_label_bundle is not None else ZERO_LABEL_BUNDLE)
    for b in [bundle] + ([zl_bundle] if zero_label else []):
        if not b.is_file():
            raise DataError(b, "bundle config not found (run from the repository root, or give the bundle)")
    out = Path(out if out is not None else f"bundles/cxr_{task}/runs/compare" + (f"_{mode}" if mode else ""))
    work_dir = out / "cells"
    cells = plan_cells(encoders, fractions, seeds, zero_label, guided=has_guided_heads)
    report = CompareReport(rows=[], stats={}, health={})
    summaries = []
    for i, cell in enumerate(cells, 1):
        over = cell_overrides(cell, work_dir=work_dir, datalist=datalist, mode=mode, extra=extra)
        run_dir = work_dir / cell.run_name
        what = f"cell {i}/{len(cells)} {cell.run_name}"
        t0 = time.perf_counter()
        summary, skipped = run_cell(
            cell, zl_bundle if cell.zero_label else bundle, over, run_dir, on_start=lambda w=what: log(f"{w}: start")
        )
        row = _row(task, cell, summary, run_dir)
        summaries.append(summary)
        report.rows.append(row)
        (report.skipped if skipped else report.ran).append(cell.run_name)
        how = "skipped (finished earlier with the same settings)" if skipped else f"finished in {time.perf_counter() - t0:.1f} s"
        value = "undefined" if row["value"] is None else f"{row['value']:.4f}"
        log(f"{what}: {how}: {row['key_metric']} {value} ({row['eval_section']}, n_train={row['n_train']})")
    if health:
        health_list = datalist if datalist is not None else _datalist_of(summaries)
        if health_list is None:
            log("encoder health skipped: the runs did not record their datalist (give --datalist)")
        else:
            dev = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
            report.health = encoder_health_rows(encoders, health_list, dev)
            for enc, flag in _collapsed_flags(report.health, encoders).items():
                if flag:
                    reasons = "; ".join(str(r) for r in report.health[enc].get("reasons") or [])
                    log(f"WARNING: encoder '{enc}' looks collapsed ({reasons}); its numbers are not to be trusted")
    flags = _collapsed_flags(report.health, encoders)
    for row in report.rows:
        row["collapsed"] = flags.get(row["encoder"])
    report.stats = aggregate(report.rows)
    report.markdown = format_results_md(
        task=task, mode=mode, rows=report.rows, health=report.health, encoders=encoders, command=command
    )
    files = {
        "csv": write_text_atomic(results_csv(report.rows), out / "results.csv"),
        "md": write_text_atomic(report.markdown, out / "results.md"),
        "png": plot_results(
            report.rows, out / "results.png", title=f"cxr_{task}" + (f" ({mode})" if mode else ""), encoders=list(encoders)
        ),
    }
    doc = {
        "task": task,
        "mode": mode,
        "key_metric": report.rows[0]["key_metric"] if report.rows else TASKS[task]["key_metric"],
        "bundle": str(bundle),
        "encoders": encoders,
        "fractions": list(fractions),
        "seeds": list(seeds),
        "zero_label": zero_label,
        "datalist": None if datalist is None else str(datalist),
        "extra": dict(extra or {}),
        "cells": report.rows,
        "stats": {enc: {f"{f:g}": s for f, s in per.items()} for enc, per in report.stats.items()},
        "health": report.health,
        "summary": best_sentences(report.stats, report.rows[0]["key_metric"], flags) if report.rows else [],
    }
    files["json"] = write_json_atomic(doc, out / "results.json")
    report.files = files
    if mlflow:
        report.parent_run_id = log_mlflow(
            tracking_uri=tracking_uri or sqlite_uri(out / "mlruns.db"),
            experiment=f"cxr_{task}_compare",
            artifact_dir=out / "mlartifacts",
            parent_name=f"compare_{task}" + (f"_{mode}" if mode else ""),
            parent_params={
                "task": task,
                "mode": mode or "",
                "encoders": json.dumps(encoders),
                "fractions": ",".join(f"{f:g}" for f in fractions),
                "seeds": ",".join(str(s) for s in seeds),
                "zero_label": zero_label,
                "datalist": "" if datalist is None else str(datalist),
            },
            rows=report.rows,
            artifacts=list(files.values()),
        )
    log(f"{len(report.ran)} cell(s) run, {len(report.skipped)} skipped; results in {out}")
    return report
