"""Experiment tracking: MLflow through MONAI's ``MLFlowHandler``, with runs that never stay RUNNING.

- :class:`MLFlowRunHandler` -- MONAI's ``MLFlowHandler`` whose run ends ``FAILED`` (an exception:
  non-finite loss, full disk, bad data, ...) or ``KILLED`` (Ctrl-C, SIGTERM) with the reason as the
  tag ``medspan.end_reason``, instead of staying ``RUNNING``; a re-run that resumes logs into the
  same run and sets it back to ``RUNNING`` (tag ``medspan.resumed_after``).
- :func:`flatten` -- the bundles keep every tunable under one ``hparams`` key; this turns it into the
  flat ``{"a.b": value}`` dict that MLflow stores as run parameters (values longer than MLflow's
  limit are cut with a marker).
- :func:`sqlite_uri`, :func:`artifact_location` -- the local store under the run folder.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

__all__ = ["END_REASON", "RESUMED_AFTER", "MLFlowRunHandler", "SignalExit", "artifact_location", "end_reason", "flatten", "sqlite_uri"]

logger = logging.getLogger(__name__)

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


class SignalExit(SystemExit):
    """Raised in the main thread when the process receives SIGTERM during a tracked run.

    A ``SystemExit`` with code ``128 + signum`` (143 for SIGTERM, the shell's convention), so the
    process still ends as a terminated one, but only after the engine's exception handlers ran (the
    MLflow run is marked ``KILLED``; atomic writes leave no partial file).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)

    def __str__(self) -> str:
        return f"terminated by {signal.Signals(self.signum).name}"


_KILLED = (KeyboardInterrupt, SystemExit)

END_REASON = "medspan.end_reason"
"""Tag of a run ended ``FAILED`` / ``KILLED``: the exception, ``"<Type>: <message>"``."""
RESUMED_AFTER = "medspan.resumed_after"
"""Tag of a run set back to ``RUNNING`` by a resumed run: ``"<old status>: <old end reason>"``."""


def end_reason(e: BaseException) -> str:
    """``"<Type>: <message>"`` of an exception, for the ``medspan.end_reason`` tag (5000 characters at most)."""
    msg = str(e) or ("interrupted (Ctrl-C / SIGINT)" if isinstance(e, KeyboardInterrupt) else "")
    return f"{type(e).__name__}: {msg}"[:5000]


class MLFlowRunHandler(MLFlowHandler):
    """MONAI's :class:`~monai.handlers.MLFlowHandler` whose run never stays ``RUNNING``.

    Everything MONAI's handler does is unchanged (same arguments). In addition:

    - **failure**: on the engine's ``EXCEPTION_RAISED`` the current run is ended with status
      ``KILLED`` for ``KeyboardInterrupt`` (Ctrl-C) and ``SystemExit`` (SIGTERM, see below), and
      ``FAILED`` for any other exception, and tagged ``medspan.end_reason = "<Type>: <message>"``.
      The handler goes first among the exception handlers (MONAI's ``StatsHandler`` re-raises and
      would stop the others); it re-raises only when it is the sole one, so the exception still
      reaches the caller exactly once.
    - **SIGTERM** (``catch_sigterm``, main thread only): while the engine runs, SIGTERM raises
      :class:`SignalExit` in the main thread, so the run ends ``KILLED`` and the process exits with
      143; the previous handler is put back when the run ends.
    - **resume**: MONAI picks up the newest run of the same name that is not ``FINISHED``; if that
      run was ended ``FAILED`` / ``KILLED``, it is set back to ``RUNNING`` (tag
      ``medspan.resumed_after``) and ends ``FINISHED`` when the resumed run completes.

    Example::

        MLFlowRunHandler(tracking_uri=sqlite_uri("runs/mlruns.db"), experiment_name="span_cxr",
                         run_name="span_cxr", close_on_complete=True).attach(trainer)
    """

    def __init__(self, *args: Any, catch_sigterm: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.catch_sigterm = bool(catch_sigterm)
        self._previous_sigterm: Any = None
        self._sigterm_installed = False

    # ------------------------------------------------------------------ wiring
    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if not engine.has_event_handler(self.failed, Events.EXCEPTION_RAISED):
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.failed)
            # first among the exception handlers: ignite calls them in order and MONAI's StatsHandler
            # re-raises, which would skip the ones after it (ignite's own time profilers reorder likewise)
            handlers = engine._event_handlers[Events.EXCEPTION_RAISED]
            handlers.insert(0, handlers.pop())
        if not engine.has_event_handler(self._restore_sigterm, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self._restore_sigterm)

    def start(self, engine: Engine) -> None:
        super().start(engine)
        self._install_sigterm()
        if self.cur_run is None:
            return
        run = self.client.get_run(self.cur_run.info.run_id)
        if run.info.status in ("FAILED", "KILLED"):
            run_id, reason = run.info.run_id, run.data.tags.get(END_REASON, "")
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, RESUMED_AFTER, f"{run.info.status}: {reason}"[:5000])
            if reason:
                self.client.delete_tag(run_id, END_REASON)
            logger.info("MLflow run %s (%s) resumed after %s", run.info.run_name, run_id, run.info.status)

    # ------------------------------------------------------------------ failure
    def failed(self, engine: Engine, e: BaseException) -> None:
        """``EXCEPTION_RAISED``: end the run ``FAILED`` / ``KILLED`` with the reason as a tag."""
        self._restore_sigterm()
        status = "KILLED" if isinstance(e, _KILLED) else "FAILED"
        if self.cur_run is not None:
            run_id = self.cur_run.info.run_id
            try:
                self.client.set_tag(run_id, END_REASON, end_reason(e))
                self.client.set_terminated(run_id, status)
                logger.info("MLflow run %s ended %s", run_id, status)
            except Exception as err:  # noqa: BLE001 -- never hide the original error behind a tracking one
                logger.warning("could not mark MLflow run %s as %s: %s", run_id, status, err)
            finally:
                self.cur_run = None
                self._dispose_sqlite_store()
        others = [h for h, _, _ in engine._event_handlers[Events.EXCEPTION_RAISED] if h != self.failed]
        if not others:  # ignite re-raises only when no handler is attached: keep that behaviour
            raise e

    # ------------------------------------------------------------------ SIGTERM
    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._restore_sigterm()  # a second SIGTERM acts as usual
        logger.warning("SIGTERM received: stopping the run (checkpoints written so far are kept)")
        raise SignalExit(signum)

    def _install_sigterm(self) -> None:
        if not self.catch_sigterm or self._sigterm_installed:
            return
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._sigterm_installed = True

    def _restore_sigterm(self) -> None:
        if not self._sigterm_installed:
            return
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm if self._previous_sigterm is not None else signal.SIG_DFL)
        self._sigterm_installed = False
