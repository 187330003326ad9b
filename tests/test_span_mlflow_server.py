"""`--tracking mlflow` with a real MLflow tracking server on 127.0.0.1 (started by the test)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from bundle_utils import REPO, cli_args, toy_overrides

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(tmp_path: Path):
    port = _free_port()
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "server_artifacts")]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("mlflow server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_tracking_flag_with_server(tmp_path: Path, mlflow_server: str) -> None:
    work = tmp_path / "runs"
    ov = toy_overrides(work, run_name="served", **{"hparams::epochs": 1})
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundles/span_cxr/train.json",
           "--tracking", "mlflow", "--tracking_uri", mlflow_server, *cli_args(ov)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (work / "mlruns.db").exists(), "the local store was used instead of the server"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("span_cxr")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'served'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["hparams.epochs"] == "1"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 2  # 1 epoch x 2 iterations
    # MONAI's own handler (added by --tracking mlflow) logs train_loss and the executed config
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "model.pt" in arts
    assert any(a.startswith("config_") and a.endswith(".json") for a in arts)
