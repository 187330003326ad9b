"""Errors that name the offending file or datalist entry, and the one top-level handler that shows them.

Every user-facing failure about input data raises a subclass of :class:`MedspanError`, whose
message always starts with the file (or entry) and then states the problem, e.g.::

    DataError: /data/cxr/0001.dcm: not a DICOM file (no DICM preamble and no readable header)

The top-level handler (:func:`report_failure`; :func:`install_error_handler` makes it the
``sys.excepthook`` of a bundle run, the ``medspan`` command calls it directly) turns a failure into
ONE message on stderr, even when MONAI wrapped the medspan error (``Failed to evaluate
ConfigExpression``, ``applying transform``): it walks ``__cause__`` / ``__context__`` to it. The
full traceback goes to a log file (``<log_dir>/error.log``), or to stderr with ``--debug`` /
``MEDSPAN_DEBUG=1``. Ctrl-C prints one line naming the last checkpoint and saying that running the
same command again resumes from it.

Example (a bundle's ``initialize`` list)::

    "$medspan.errors.install_error_handler(log_dir=@output_dir, checkpoint_dir=@ckpt_dir)"
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

__all__ = [
    "DEBUG_ENV",
    "DataError",
    "MedspanError",
    "TrainingError",
    "find_medspan_error",
    "install_error_handler",
    "interrupt_message",
    "latest_checkpoint_file",
    "report_failure",
]

DEBUG_ENV = "MEDSPAN_DEBUG"
"""Set to ``1`` to print full tracebacks on stderr instead of one message."""


class MedspanError(Exception):
    """Base class of medspan's user-facing errors."""


class DataError(MedspanError, ValueError):
    """A problem with one input file or datalist entry.

    Args:
        where: the file path or an entry description such as ``"training[3]"``.
        problem: what is wrong, in words.
    """

    def __init__(self, where: str | os.PathLike | Any, problem: str) -> None:
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")

    def __reduce__(self):  # keep (where, problem) across process boundaries (worker pools)
        return (type(self), (self.where, self.problem))


class TrainingError(MedspanError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says what and where."""


# ----------------------------------------------------------------------------------------------
# the one top-level handler
# ----------------------------------------------------------------------------------------------


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception it was raised from or during, outermost first (causes first)."""
    out: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is o for o in out):
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__]
    return out


def find_medspan_error(exc: BaseException) -> MedspanError | None:
    """The :class:`MedspanError` behind ``exc``: ``exc`` itself, or one it was raised from.

    MONAI wraps errors raised while a bundle config is resolved (``RuntimeError: Failed to evaluate
    ConfigExpression``, ``Failed to instantiate``) or while a transform runs (``applying transform``);
    the medspan error is their ``__cause__`` or ``__context__``, some levels down.
    """
    for e in _chain(exc):
        if isinstance(e, MedspanError):
            return e
    return None


def _innermost(exc: BaseException) -> BaseException:
    """The deepest cause of ``exc`` (what actually went wrong behind the wrappers)."""
    e = exc
    while True:
        nxt = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
        if nxt is None or nxt is e:
            return e
        e = nxt


_EPOCH = re.compile(r"(\d+)\.pt$")


def latest_checkpoint_file(checkpoint_dir: str | os.PathLike | None) -> Path | None:
    """The newest ``*.pt`` checkpoint of a folder (highest epoch number in the name, else newest file)."""
    if checkpoint_dir is None or not Path(checkpoint_dir).is_dir():
        return None
    files = [p for p in Path(checkpoint_dir).glob("*.pt") if p.is_file() and not p.name.startswith(".")]
    if not files:
        return None

    def key(p: Path) -> tuple[int, float]:
        m = _EPOCH.search(p.name)
        return (int(m.group(1)) if m else -1, p.stat().st_mtime)

    return max(files, key=key)


def interrupt_message(checkpoint_dir: str | os.PathLike | None, resume_hint: str | None = None) -> str:
    """The one line printed on Ctrl-C: where the last checkpoint is and that a re-run resumes from it.

    Without ``checkpoint_dir`` (a command that keeps no checkpoints), ``resume_hint`` ends the line.

    Example::

        interrupt_message("runs/span_cxr/checkpoints")
        # '[medspan] interrupted (Ctrl-C). Last checkpoint: runs/span_cxr/checkpoints/checkpoint_epoch=3.pt;
        #  run the same command again to resume from it.'
    """
    last = latest_checkpoint_file(checkpoint_dir)
    if last is not None:
        return (f"[medspan] interrupted (Ctrl-C). Last checkpoint: {last}; "
                "run the same command again to resume from it.")
    if checkpoint_dir is not None:
        return (f"[medspan] interrupted (Ctrl-C). No checkpoint written yet in {checkpoint_dir}; "
                "running the same command again starts from the beginning.")
    return "[medspan] interrupted (Ctrl-C)." + (f" {resume_hint}" if resume_hint else "")


def _debug(debug: bool | None) -> bool:
    if debug is not None:
        return debug
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _write_log(log_dir: str | os.PathLike | None, exc: BaseException) -> Path | None:
    folder = Path(log_dir) if log_dir is not None else Path(tempfile.gettempdir())
    path = folder / ("error.log" if log_dir is not None else f"medspan-error-{os.getpid()}.log")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:  # a log is appended to, not an output
            f.write(f"==== {datetime.datetime.now().isoformat(timespec='seconds')} pid {os.getpid()} "
                    f"argv {sys.argv}\n")
            f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            f.write("\n")
    except OSError:
        return None
    return path


def _first_line(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."


def report_failure(
    exc: BaseException,
    *,
    log_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    debug: bool | None = None,
    stream: TextIO | None = None,
    resume_hint: str | None = None,
) -> int:
    """Show a failure the way a user should see it; return the exit code (130 for Ctrl-C, else 1).

    * Ctrl-C (``KeyboardInterrupt``): one line, :func:`interrupt_message`.
    * a :class:`MedspanError` (also when wrapped by MONAI): ``[medspan] error: <Type>: <file>: <problem>``.
    * anything else: ``[medspan] unexpected error: <Type>: <message>`` of the innermost cause.

    Then one line saying where the full traceback is (``<log_dir>/error.log``, or a file in the
    temporary folder), unless ``debug`` (default: ``MEDSPAN_DEBUG`` set) prints it on ``stream``.
    """
    stream = stream if stream is not None else sys.stderr
    if isinstance(exc, KeyboardInterrupt) or (
        not isinstance(exc, Exception) and any(isinstance(e, KeyboardInterrupt) for e in _chain(exc))
    ):
        print(interrupt_message(checkpoint_dir, resume_hint), file=stream, flush=True)
        return 130
    if _debug(debug):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=stream)
    known = find_medspan_error(exc)
    if known is not None:
        print(f"[medspan] error: {type(known).__name__}: {_first_line(str(known))}", file=stream)
    else:
        root = _innermost(exc)
        print(f"[medspan] unexpected error: {type(root).__name__}: {_first_line(str(root))}", file=stream)
    if not _debug(debug):
        log = _write_log(log_dir, exc)
        where = f"in {log}" if log is not None else "not written (the log folder is not writable)"
        print(f"[medspan] full traceback {where}; set {DEBUG_ENV}=1 (or --debug) to print it", file=stream)
    stream.flush()
    return 1


class _NoTraceback(logging.Filter):
    """Drop the traceback MONAI's ``StatsHandler`` logs for an engine exception (the handler reports it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[1] is not None)


def install_error_handler(
    log_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    debug: bool | None = None,
) -> Callable[[type[BaseException], BaseException, TracebackType | None], None]:
    """Make :func:`report_failure` the process's ``sys.excepthook`` (for a bundle run); returns the hook.

    Call it first in a bundle's ``initialize`` list. An exception that ends the run then prints one
    message (and Ctrl-C one line naming the last checkpoint in ``checkpoint_dir``), the traceback
    going to ``log_dir/error.log``; the engines' own traceback logging (MONAI ``StatsHandler``'s
    ``Exception: ...`` with its traceback) is dropped, since the log file holds it. With ``debug``
    (default: ``MEDSPAN_DEBUG`` set) nothing is hidden.

    Example (bundle JSON)::

        "initialize": ["$medspan.errors.install_error_handler(log_dir=@output_dir, checkpoint_dir=@ckpt_dir)", ...]
    """

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if exc.__traceback__ is None:
            exc = exc.with_traceback(tb)
        report_failure(exc, log_dir=log_dir, checkpoint_dir=checkpoint_dir, debug=debug)

    if not _debug(debug):
        logger = logging.getLogger("monai.handlers.StatsHandler")
        if not any(isinstance(f, _NoTraceback) for f in logger.filters):
            logger.addFilter(_NoTraceback())
    sys.excepthook = hook
    return hook
