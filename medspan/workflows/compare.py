"""End of a pretraining run: the attention-segmentation figures, and the plain-DINO comparison.

:func:`finish` is called from a bundle's ``finalize`` list. It reads the run's last validation
summary (``latest_summary.json``), writes ``final_summary.json`` (with the hyper-parameters), and,
when asked, runs the same bundle as a *baseline* (prior weight 0: plain DINO, same data, seed and
budget) in a sibling run folder -- reused when its ``final_summary.json`` was made with the same
hyper-parameters -- and prints, per structure, the AP of the assigned head, of the best free head
and of plain DINO's best head.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medspan.eval.attention_seg import format_summary
from medspan.io import write_json_atomic

__all__ = ["finish", "run_baseline", "comparison_rows"]

logger = logging.getLogger(__name__)


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_baseline(config_file: str | os.PathLike, overrides: Mapping[str, Any]) -> None:
    """Run the bundle at ``config_file`` with ``baseline=True`` (plain DINO) and ``overrides``."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=str(config_file),
        workflow_type="train",
        **{**dict(overrides), "baseline": True, "compare_baseline": False},
    )
    wf.initialize()
    wf.run()
    wf.finalize()


def comparison_rows(summary: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per structure: assigned-head AP, best-free-head AP, plain-DINO best-head AP and the gap (0-1 scale)."""
    rows: dict[str, dict[str, Any]] = {}
    for name, info in summary["summary"].items():
        row = {
            "assigned_head": info.get("assigned_head"),
            "assigned_ap": info.get("assigned_ap"),
            "best_free_head": info.get("best_free_head"),
            "best_free_ap": info.get("best_free_ap"),
        }
        if baseline is not None and name in baseline["summary"]:
            b = baseline["summary"][name]
            row["baseline_best_head"] = b.get("best_head")
            row["baseline_best_ap"] = b.get("best_ap")
            if row["assigned_ap"] is not None and b.get("best_ap") is not None:
                row["gap"] = row["assigned_ap"] - b["best_ap"]
        rows[name] = row
    return rows


def finish(
    output_dir: str | os.PathLike,
    hparams: Mapping[str, Any],
    *,
    baseline: bool = False,
    compare_baseline: bool = False,
    config_file: str | os.PathLike | None = None,
    baseline_dir: str | os.PathLike | None = None,
    baseline_overrides: Mapping[str, Any] | None = None,
    datalist: str | os.PathLike | None = None,
    evaluator: Any = None,
    final_epoch: int | None = None,
) -> dict[str, Any]:
    """Write ``final_summary.json``, optionally run/reuse the baseline, print the comparison table.

    If ``evaluator`` is given and the last validation is older than ``final_epoch``, the evaluator
    runs once more so that the figures are those of the final weights.

    Returns:
        the final record (``summary`` from the last validation, ``hparams``, and ``comparison`` when a
        baseline was compared).
    """
    out = Path(output_dir)
    latest = _load(out / "latest_summary.json")
    if evaluator is not None and final_epoch and (latest is None or latest.get("epoch") != final_epoch):
        evaluator.run(final_epoch)  # the last epoch was not validated (interval): validate it now
        latest = _load(out / "latest_summary.json")
    if latest is None:
        raise RuntimeError(f"{out / 'latest_summary.json'}: no validation summary; did validation run?")
    record = {**latest, "hparams": dict(hparams), "baseline": bool(baseline),
              "datalist": None if datalist is None else str(datalist)}
    write_json_atomic(record, out / "final_summary.json")

    base_record = None
    if compare_baseline and not baseline:
        if config_file is None or baseline_dir is None:
            raise ValueError("compare_baseline needs config_file and baseline_dir")
        bdir = Path(baseline_dir)
        base_record = _load(bdir / "final_summary.json")
        if base_record is None or base_record.get("hparams") != dict(hparams):
            print(f"[medspan] running the plain-DINO baseline (same data, seed and budget) in {bdir}", flush=True)
            run_baseline(config_file, {**dict(baseline_overrides or {}), "hparams": dict(hparams)})
            base_record = _load(bdir / "final_summary.json")
        else:
            print(f"[medspan] reusing the plain-DINO baseline in {bdir} (same hyper-parameters)", flush=True)
        if base_record is not None:
            record["comparison"] = comparison_rows(latest, base_record)
            write_json_atomic(record, out / "final_summary.json")

    title = "plain DINO (baseline run)" if baseline else "SPAN (anatomy-guided heads)"
    print(f"\n[medspan] attention-map segmentation, epoch {latest['epoch']}, {title}: AP (0-100) per structure")
    print(format_summary(latest["summary"], base_record["summary"] if base_record else None), flush=True)
    return record
