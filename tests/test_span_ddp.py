"""span_cxr under torchrun with the multi_gpu.json overlay: 2 processes, gloo on CPU (DDP for real)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bundle_utils import REPO, cli_args, toy_overrides

pytestmark = pytest.mark.slow


def test_two_process_ddp_run(tmp_path: Path) -> None:
    work = tmp_path / "runs"
    ov = toy_overrides(work)
    ov.pop("compare_baseline")  # the overlay turns it off
    configs = "['bundles/span_cxr/train.json','bundles/span_cxr/multi_gpu.json']"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "monai.bundle", "run", "--config_file", configs, *cli_args(ov)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    run = work / "span_cxr"
    state = torch.load(run / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=True)
    # 16 training cases, 2 ranks, batch 8: one iteration per epoch on each rank
    assert state["trainer"]["iteration"] == 2
    assert not any(k.startswith("module.") for k in state["student"]), "checkpoint must hold the unwrapped model"
    final = json.loads((run / "final_summary.json").read_text())
    assert final["epoch"] == 2 and "comparison" not in final
    assert (run / "model.pt").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="sqlite:///" + str((work / "mlruns.db").resolve()))
    exp = client.get_experiment_by_name("span_cxr")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "only rank 0 tracks"
    assert len(client.get_metric_history(runs[0].info.run_id, "loss")) == 2
