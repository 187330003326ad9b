"""End of a pretraining run and the plain-DINO comparison: the last steps of a bundle's ``run`` list.

The pretraining bundles end with::

    "run": [
        "$@train::trainer.run()",            # 1. the run itself (SPAN: DINO + prior)
        "$@report.write()",                   # 2. final validation + final_summary.json
        "$@baseline_run.run()",               # 3. span_cxr only: the SECOND run, plain DINO
        "$@report.print(@baseline_run.record)"  # 4. the tables
    ]

- :class:`FinalReport` validates the final weights when the last epoch was not validated
  (``val_interval``), writes ``final_summary.json`` (the last validation summary, the
  hyper-parameters, the run identity, the loss history when there is one) and prints the
  per-term loss table (when there are ``loss_weights``) and the attention-segmentation AP table,
  side by side with a baseline when given.
- :class:`BaselineRun` is the second training run of ``span_cxr``'s comparison: the same bundle
  with ``baseline=True`` (prior weight 0: plain DINO, same data, seed and budget) in a sibling run
  folder. An existing baseline is reused only when its run identity
  (:func:`medspan.workflows.bundle.run_identity`: hyper-parameters, data settings, the datalist's
  path and content) equals this run's, so a comparison always sets like against like.
- :func:`comparison_rows` is the per-structure comparison stored in ``final_summary.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow

from medspan.engines.smart import format_losses
from medspan.eval.attention_seg import format_summary
from medspan.io import json_plain, write_json_atomic

__all__ = ["BaselineRun", "FinalReport", "comparison_rows"]


def _load(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def comparison_rows(summary: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per structure: assigned-head AP, best-free-head AP, plain-DINO best-head AP and the gap (0-1 scale).

    Args:
        summary: a run's validation record (``{"summary": {structure: {...}}, ...}``).
        baseline: the baseline run's record, or None.
    """
    rows: dict[str, dict[str, Any]] = {}
    for name, info in summary["summary"].items():
        row = {
            "assigned_head": info.get("assigned_head"),
            "assigned_ap": info.get("assigned_ap"),
            "best_free_head": info.get("best_free_head"),
            "best_free_ap": info.get("best_free_ap"),
        }
        if baseline is not None and baseline.get("summary") and name in baseline["summary"]:
            b = baseline["summary"][name]
            row["baseline_best_head"] = b.get("best_head")
            row["baseline_best_ap"] = b.get("best_ap")
            if row["assigned_ap"] is not None and b.get("best_ap") is not None:
                row["gap"] = row["assigned_ap"] - b["best_ap"]
        rows[name] = row
    return rows


class FinalReport:
    """Final validation, ``final_summary.json`` and the printed tables of one pretraining run.

    Args:
        output_dir: the run folder (``latest_summary.json`` and ``losses.json`` are read from it).
        trainer: the run's trainer; its ``state.epoch`` is the final epoch.
        hparams: the run's hyper-parameters (recorded).
        identity: :func:`~medspan.workflows.bundle.run_identity` of the run (recorded; the baseline
            reuse compares it).
        datalist: the datalist the run trained on (recorded; ``inference.json`` falls back to it).
        evaluator: the validation evaluator, run once more when the last epoch was not validated.
        validated: False when the run has no validation data: no final validation, no AP table.
        title: what the AP table is of (e.g. ``"SPAN (anatomy-guided heads)"``).
        baseline: this run is a plain-DINO baseline; ``baseline_title`` then names the table.
        loss_weights: weights of the loss terms; given, the per-term loss table of the last epoch
            (from ``losses.json``) is printed too.
        enabled: False on DDP ranks other than 0 (they write and print nothing).

    ``record`` holds what was written (None before :meth:`write`).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        trainer: Any,
        hparams: Mapping[str, Any],
        *,
        identity: Mapping[str, Any] | None = None,
        datalist: str | os.PathLike | None = None,
        evaluator: Any = None,
        validated: bool = True,
        title: str = "pretraining",
        baseline: bool = False,
        baseline_title: str = "plain DINO (baseline run)",
        loss_weights: Mapping[str, float] | None = None,
        enabled: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.trainer = trainer
        self.hparams = dict(hparams)
        self.identity = None if identity is None else json_plain(identity)
        self.datalist = None if datalist is None else str(datalist)
        self.evaluator = evaluator
        self.validated = bool(validated)
        self.title = baseline_title if baseline else title
        self.baseline = bool(baseline)
        self.loss_weights = None if loss_weights is None else {k: float(v) for k, v in loss_weights.items()}
        self.enabled = bool(enabled)
        self.record: dict[str, Any] | None = None

    def write(self) -> dict[str, Any] | None:
        """Validate the final weights if needed; write and return ``final_summary.json`` (None when disabled).

        Raises:
            RuntimeError: validation is on but produced no ``latest_summary.json``.
        """
        if not self.enabled:
            return None
        final_epoch = int(getattr(getattr(self.trainer, "state", None), "epoch", 0) or 0)
        latest = _load(self.output_dir / "latest_summary.json") if self.validated else None
        stale = latest is None or latest.get("epoch") != final_epoch
        if self.validated and self.evaluator is not None and final_epoch and stale:
            self.evaluator.run(final_epoch)  # the last epoch was not validated (interval): do it now
            latest = _load(self.output_dir / "latest_summary.json")
        if self.validated and latest is None:
            raise RuntimeError(f"{self.output_dir / 'latest_summary.json'}: no validation summary; did validation run?")
        record: dict[str, Any] = dict(latest) if latest is not None else {"epoch": final_epoch, "summary": None}
        record.update(
            hparams=self.hparams,
            baseline=self.baseline,
            datalist=self.datalist,
            identity=self.identity,
        )
        losses = _load_list(self.output_dir / "losses.json")
        if losses is not None:
            record["losses"] = losses
        write_json_atomic(record, self.output_dir / "final_summary.json")
        self.record = record
        return record

    def print(self, baseline: Mapping[str, Any] | None = None) -> None:
        """Print the loss table (with ``loss_weights``) and the AP table, next to ``baseline``'s when given.

        With a baseline record the per-structure :func:`comparison_rows` are added to
        ``final_summary.json``.
        """
        if not self.enabled or self.record is None:
            return
        record = self.record
        losses = record.get("losses") or []
        if self.loss_weights is not None and losses:
            last = losses[-1]
            print(f"\n[medspan] loss terms, mean over epoch {last['epoch']}")
            print(
                format_losses({k: v for k, v in last.items() if k != "epoch"}, self.loss_weights),
                flush=True,
            )
        if not record.get("summary"):
            print(
                f"\n[medspan] {self.title}: no validation data, so no attention-segmentation table",
                flush=True,
            )
            return
        base_summary = None
        if baseline is not None and baseline.get("summary"):
            base_summary = baseline["summary"]
            record["comparison"] = comparison_rows(record, baseline)
            write_json_atomic(record, self.output_dir / "final_summary.json")
        n_maps = len(record["ap_table"]) if record.get("ap_table") else 0
        note = f" (h{n_maps - 1} = mean of the heads)" if record.get("mean_head") else ""
        print(
            f"\n[medspan] attention-map segmentation, epoch {record['epoch']}, {self.title}: "
            f"AP (0-100) per structure{note}"
        )
        print(format_summary(record["summary"], base_summary), flush=True)


def _load_list(path: Path) -> list[Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, list) else None


class BaselineRun:
    """The second training run of the comparison: the same bundle as plain DINO (``baseline=True``).

    Args:
        config_file: the bundle's ``train.json``.
        run_dir: the baseline's run folder (``<work_dir>/<run_name>_baseline``).
        identity: the run identity of the run to compare (:func:`medspan.workflows.bundle.run_identity`);
            a baseline in ``run_dir`` is reused only when its recorded identity is equal.
        overrides: config overrides that make the baseline the same run as this one (run name,
            folders, datalist, tracking, ``hparams``); ``baseline=True`` and
            ``compare_baseline=False`` are added.
        enabled: False to skip (``--compare_baseline False``, the baseline run itself, DDP ranks
            other than 0).
        validated: False when the runs have no validation data; then there is nothing to compare
            and one line says so.

    ``record`` is the baseline's ``final_summary.json`` after :meth:`run` (None when skipped).

    Example::

        base = BaselineRun("bundles/span_cxr/train.json", "runs/span_cxr_baseline", identity,
                           {"run_name": "span_cxr", "work_dir": "runs", "hparams": hparams})
        base.run()              # trains plain DINO, or reuses an identical earlier baseline
        base.record["summary"]  # its AP per structure
    """

    def __init__(
        self,
        config_file: str | os.PathLike,
        run_dir: str | os.PathLike,
        identity: Mapping[str, Any],
        overrides: Mapping[str, Any],
        enabled: bool = True,
        validated: bool = True,
    ) -> None:
        self.config_file = str(config_file)
        self.run_dir = Path(run_dir)
        self.identity = json_plain(identity)
        self.overrides = dict(overrides)
        self.enabled = bool(enabled)
        self.validated = bool(validated)
        self.record: dict[str, Any] | None = None

    def reusable(self) -> dict[str, Any] | None:
        """The baseline record in ``run_dir`` when it was made with this identity, else None."""
        rec = _load(self.run_dir / "final_summary.json")
        if rec is not None and rec.get("baseline") and rec.get("identity") == self.identity:
            return rec
        return None

    def run(self) -> dict[str, Any] | None:
        """Reuse or train the baseline; return its record (None when skipped).

        Raises:
            RuntimeError: the baseline run finished without a ``final_summary.json`` of this identity.
        """
        if not self.enabled:
            return None
        if not self.validated:
            print(
                "[medspan] no validation data: the plain-DINO baseline comparison is skipped",
                flush=True,
            )
            return None
        rec = self.reusable()
        if rec is not None:
            print(
                f"[medspan] reusing the plain-DINO baseline in {self.run_dir} (same settings and data)",
                flush=True,
            )
            self.record = rec
            return rec
        print(
            f"[medspan] running the plain-DINO baseline (same data, seed and budget) in {self.run_dir}",
            flush=True,
        )
        wf = ConfigWorkflow(
            config_file=self.config_file,
            workflow_type="train",
            **{**self.overrides, "baseline": True, "compare_baseline": False},
        )
        wf.initialize()
        wf.run()
        wf.finalize()
        rec = self.reusable()
        if rec is None:
            raise RuntimeError(
                f"{self.run_dir / 'final_summary.json'}: the baseline run did not record the settings of this run"
            )
        self.record = rec
        return rec
