"""MLflow tracking: `--tracking mlflow` with a real tracking server on 127.0.0.1 (started by the test),
and runs that end FAILED / KILLED, never RUNNING, in a real SQLite store (exception, NaN stop, full
disk, Ctrl-C, SIGTERM), and resume into the same run."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from bundle_utils import REPO, cli_args, make_workflow, toy_overrides
from ignite.engine import Engine, Events
from mlflow.tracking import MlflowClient
from monai.handlers import StatsHandler

from medspan.engines.checkpoint import StorageError
from medspan.engines.tracking import END_REASON, RESUMED_AFTER, MLFlowRunHandler, SignalExit, sqlite_uri
from medspan.errors import TrainingError

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
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 -- closed in the finally below
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
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
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


# ----------------------------------------------------------------------------- run status in a SQLite store
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One real SQLite store for the module (creating its schema takes seconds)."""
    return sqlite_uri(tmp_path_factory.mktemp("mlflow") / "mlruns.db")


def _tracked_run(uri: str, name: str, act: Any = None, stats: bool = True) -> tuple[str, list[str]]:
    """A 3-iteration ignite run tracked by MLFlowRunHandler; ``act(engine)`` runs after iteration 2.

    Returns the run id and the run's status seen from inside iteration 1 (by a second client).
    """
    engine = Engine(lambda e, b: {"loss": float(b)})
    if stats:  # MONAI's StatsHandler re-raises on EXCEPTION_RAISED, as in the bundles
        StatsHandler(iteration_log=False, epoch_log=False).attach(engine)
    handler = MLFlowRunHandler(tracking_uri=uri, experiment_name="status", run_name=name, close_on_complete=True,
                               output_transform=lambda o: o)
    handler.attach(engine)
    seen: list[str] = []
    ids: list[str] = []

    def _look(e: Engine) -> None:
        ids.append(handler.cur_run.info.run_id)
        seen.append(MlflowClient(uri).get_run(ids[0]).info.status)

    engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), _look)
    if act is not None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=2), act)
    engine.run([1, 2, 3], max_epochs=1)
    return ids[0], seen


def _run_of(uri: str, name: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("status").experiment_id],
                                filter_string=f"attributes.run_name = '{name}'")
    return run


def _raise(exc: BaseException):
    def _act(engine: Engine) -> None:
        raise exc

    return _act


@pytest.mark.parametrize("stats", [True, False], ids=["with StatsHandler", "alone"])
def test_exception_ends_the_run_failed_with_the_reason(store: str, stats: bool) -> None:
    name = f"fails-{stats}"
    with pytest.raises(TrainingError, match="non-finite loss"):  # reaches the caller exactly as raised
        _tracked_run(store, name, _raise(TrainingError("non-finite loss at epoch 1, iteration 2")), stats=stats)
    run = _run_of(store, name)
    assert run.info.status == "FAILED"
    assert run.data.tags[END_REASON] == "TrainingError: non-finite loss at epoch 1, iteration 2"
    assert run.data.metrics["loss"] == 2.0  # what was logged before the failure is kept


def test_full_disk_error_ends_the_run_failed(store: str) -> None:
    err = StorageError("/runs/x/checkpoints/checkpoint_epoch=2.pt", "no space left on device (errno 28)", errno.ENOSPC)
    with pytest.raises(StorageError):
        _tracked_run(store, "disk-full", _raise(err))
    run = _run_of(store, "disk-full")
    assert run.info.status == "FAILED" and "no space left on device" in run.data.tags[END_REASON]


def test_ctrl_c_ends_the_run_killed(store: str) -> None:
    """A real SIGINT to this process (Python turns it into KeyboardInterrupt in the main thread)."""
    # started as a background job (``cmd &`` without job control), the process inherits SIGINT
    # ignored; a terminal's Ctrl-C reaches Python's default handler, so put that one in place here
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _tracked_run(store, "ctrl-c", lambda e: os.kill(os.getpid(), signal.SIGINT))
    finally:
        signal.signal(signal.SIGINT, previous)
    run = _run_of(store, "ctrl-c")
    assert run.info.status == "KILLED" and run.data.tags[END_REASON].startswith("KeyboardInterrupt")


def test_sigterm_ends_the_run_killed_and_restores_the_handler(store: str) -> None:
    """A real SIGTERM to this process: raised as SignalExit (exit code 143) so the run can be marked."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SignalExit) as info:
        _tracked_run(store, "sigterm", lambda e: os.kill(os.getpid(), signal.SIGTERM))
    assert info.value.code == 143
    run = _run_of(store, "sigterm")
    assert run.info.status == "KILLED" and run.data.tags[END_REASON] == "SignalExit: terminated by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before
    _tracked_run(store, "sigterm-ok")  # a completed run puts the previous handler back too
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_resumed_run_reopens_the_failed_run(store: str) -> None:
    with pytest.raises(TrainingError):
        _tracked_run(store, "resumed", _raise(TrainingError("boom")))
    first = _run_of(store, "resumed")
    run_id, seen = _tracked_run(store, "resumed")  # the re-run (a resume) logs into the same run
    assert run_id == first.info.run_id and seen == ["RUNNING"]
    run = _run_of(store, "resumed")
    assert run.info.status == "FINISHED" and run.data.tags[RESUMED_AFTER] == "FAILED: TrainingError: boom"
    assert END_REASON not in run.data.tags


def test_bundle_nan_stop_and_ctrl_c_leave_no_running_run(tmp_path: Path) -> None:
    """span_cxr at toy size with its own SQLite store: a NaN stop ends the run FAILED naming the
    non-finite loss; a real SIGINT (Ctrl-C) in epoch 2 of another run ends that one KILLED."""

    def _bundle_run(name: str, act: Any) -> Any:
        wf = make_workflow(toy_overrides(tmp_path, run_name=name, **{"hparams::epochs": 2, "hparams::data::prior": "exemplar"}))
        trainer = wf.parser.get_parsed_content("train::trainer")
        student = wf.parser.get_parsed_content("student")
        trainer.add_event_handler(Events.ITERATION_STARTED(once=3), act, student)  # epoch 2, iteration 1
        with pytest.raises(BaseException) as info:
            wf.run()
        client = MlflowClient(sqlite_uri(tmp_path / "mlruns.db"))
        (run,) = client.search_runs([client.get_experiment_by_name("span_cxr").experiment_id],
                                    filter_string=f"attributes.run_name = '{name}'")
        return info.value, run

    def _poison(engine: Engine, student: torch.nn.Module) -> None:
        with torch.no_grad():
            next(student.parameters()).fill_(float("nan"))

    error, run = _bundle_run("nan", _poison)
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(x, TrainingError) for x in chain), chain
    assert run.info.status == "FAILED"
    assert run.data.tags[END_REASON].startswith("TrainingError: ") and "non-finite" in run.data.tags[END_REASON]

    # The Ctrl-C run goes to a child process: a KeyboardInterrupt that passes through MONAI's eval() of
    # the bundle's "$@train::trainer.run()" sets CPython's "unhandled KeyboardInterrupt" flag, and the
    # interpreter then exits with 130 (as a real Ctrl-C should) -- which would fail pytest's own run.
    script = f"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, also under a background job
sys.path.insert(0, {str(Path(__file__).parent)!r})
from bundle_utils import make_workflow, toy_overrides
from ignite.engine import Events
from pathlib import Path
wf = make_workflow(toy_overrides(Path({str(tmp_path)!r}), run_name="ctrl-c",
                                 **{{"hparams::epochs": 2, "hparams::data::prior": "exemplar"}}))
trainer = wf.parser.get_parsed_content("train::trainer")
trainer.add_event_handler(Events.ITERATION_STARTED(once=3), lambda e: os.kill(os.getpid(), signal.SIGINT))
wf.run()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO)
    # Python ends an unhandled Ctrl-C by re-raising SIGINT on itself (a shell shows 130)
    assert proc.returncode == -signal.SIGINT, proc.stderr[-3000:]
    assert "[medspan] interrupted (Ctrl-C). Last checkpoint: " in proc.stderr and "Traceback" not in proc.stderr
    client = MlflowClient(sqlite_uri(tmp_path / "mlruns.db"))
    (run,) = client.search_runs([client.get_experiment_by_name("span_cxr").experiment_id],
                                filter_string="attributes.run_name = 'ctrl-c'")
    assert run.info.status == "KILLED" and run.data.tags[END_REASON].startswith("KeyboardInterrupt")
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 2  # epoch 1 was logged before the interrupt
