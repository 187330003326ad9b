"""Epoch checkpoints on ignite's ``Checkpoint`` + ``DiskSaver(atomic=True)``, with an exact resume.

:class:`EpochCheckpoint` is the handler the bundles attach to their trainer. It writes
``save_dir/checkpoint_epoch=N.pt`` (the newest ``n_saved`` are kept) and ``save_dir/fingerprint.json``
(the settings the checkpoints belong to, for a reader), and on ``Events.STARTED`` restores the newest
checkpoint, so re-running the same command continues where a stopped run ended.

What a checkpoint holds::

    <name>        state_dict of every object of ``save_dict`` (student, teacher, optimizer, loss
                  centres, ...), modules unwrapped from DDP, so the file loads without a process group
    trainer       the engine's epoch, iteration, epoch_length, max_epochs
    settings      the settings fingerprint (:class:`SettingsFingerprint`), checked before anything loads
    random_state  {"world_size": W, "ranks": [state of rank 0, ..., rank W-1]}, see below
    checkpointer  ignite's list of the files kept (``n_saved``)

**When.** At ``EPOCH_COMPLETED`` every ``interval`` epochs and at the last epoch, *after* every
other ``EPOCH_COMPLETED`` handler attached before the run started (validation included): the save is
registered when the engine starts, so it is the last handler of the event. Only rank 0 writes.

**Exact resume.** Each rank saves its own random state at that moment: Python's ``random``, NumPy's
global generator, torch's CPU (and CUDA) generator, and every generator reachable from the trainer's
data loader (the loader's and sampler's ``torch.Generator``, the ``R`` of every MONAI
``Randomizable`` in the dataset's transforms: crops, flips, intensity jitter) or held by the trainer
itself (an attribute that is a ``torch.Generator`` or has one as ``.generator``: SMARTFormer's masking
and patch-dropout noise). On resume each rank restores its own states, so a run stopped after epoch
k and resumed draws the same data order, crops and masks as an uninterrupted run, and ends with
bit-identical weights on the same hardware and thread count (CPU; on GPU as far as the kernels are
deterministic). Exact for ``num_workers=0`` and for worker processes that are not persistent (their
seeds come from the restored torch generator at each epoch); with ``persistent_workers=True`` the
workers' transform states are not restored. When the number of ranks changed, the random state is
not restored (a warning says so) and the run continues with fresh draws.

**Mid-epoch kills.** Checkpoints are written at epoch ends only. A run killed (SIGKILL, Ctrl-C, an
error) inside epoch k+1 resumes from the checkpoint of epoch k and re-runs epoch k+1 from its start,
identically to the interrupted attempt; the partial epoch's work is lost.

**Settings.** A resume whose settings differ from the checkpoint's is refused with
:class:`ResumeError` naming each differing key as a dotted path with its old and new value
(``hparams.lr: 0.001 -> 0.002``). Keys in ``allow_change`` (default: ``hparams.epochs``) may change:

- *Continuing a run with more epochs* (raising ``epochs`` on a finished or stopped run) is allowed.
  The schedules that depend on the length are those of the new configuration: the bundles rebuild
  their cosine schedules (learning rate, weight decay, teacher momentum, the teacher-temperature
  warm-up, the SAR weight) for the new number of epochs and the trainer reads them at the global
  iteration, so epochs k+1.. follow the longer cosine from iteration ``k * epoch_length`` on. The
  learning rate therefore steps from the end of the short cosine (near ``min_lr``) up to the longer
  cosine's value at that point, and the teacher momentum steps down likewise; the result is a
  continuation, not the same as a run trained with the longer schedule from the start. A log line
  says so when it happens.
- Lowering ``epochs`` below the checkpoint's epoch is refused.

**Never non-finite, never half-written.** The saver (:class:`SafeDiskSaver`) refuses a checkpoint
holding a NaN or an infinity in any floating tensor (weights, optimizer moments, centres) with
:class:`~medspan.errors.TrainingError` naming the tensors; nothing is written or removed, so the
previous good checkpoint stays the newest. A write error (full disk, quota, permissions) raises
:class:`StorageError` with the path and, for a full disk, "no space left on device"; the temporary
file is removed and the older checkpoints stay (ignite deletes the oldest file before writing the
new one; here the deletion waits until the new file is complete).

Example::

    EpochCheckpoint("runs/span_cxr/checkpoints",
                    {"student": s, "teacher": t, "optimizer": opt, "dino_loss": loss},
                    fingerprint={"hparams": hparams}).attach(trainer)
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed as torch_dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.transforms import Randomizable, Transform
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from medspan.engines.dist import is_main_rank, rank, world_size
from medspan.engines.step import non_finite_tensors
from medspan.errors import MedspanError, TrainingError
from medspan.io import atomic_write, json_plain, write_json_atomic

__all__ = [
    "EpochCheckpoint",
    "RandomStates",
    "ResumeError",
    "SafeDiskSaver",
    "SettingsFingerprint",
    "StorageError",
    "atomic_torch_save",
    "capture_random_state",
    "check_finite",
    "latest_checkpoint",
    "restore_random_state",
    "settings_diff",
]

_PATTERN = re.compile(r"^checkpoint_epoch=(\d+)\.pt$")
_STALE_TMP = re.compile(r"^tmp[a-z0-9_]{8}$")  # DiskSaver's temporary names (tempfile's default)
logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- errors
class ResumeError(MedspanError, ValueError):
    """A checkpoint folder cannot be resumed with these settings; the message says what differs."""


class StorageError(MedspanError, OSError):
    """A file could not be written (full disk, quota, permissions); names the path and the reason.

    Args:
        path: the file that was being written.
        problem: what happened and what to do, in words.
        code: the ``errno`` of the underlying error (``errno.ENOSPC`` for a full disk).
    """

    def __init__(self, path: str | os.PathLike, problem: str, code: int | None = None) -> None:
        OSError.__init__(self, code, problem, os.fspath(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"

    def __reduce__(self):  # keep (path, problem, code) across process boundaries
        return (type(self), (self.filename, self.strerror, self.errno))


_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (itself, or the one torch's writer wrapped), or None."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _storage_error(path: Path, exc: BaseException, what: str, kept: str) -> StorageError | None:
    """A :class:`StorageError` describing ``exc`` while writing ``what`` at ``path``, or None if not an OS error."""
    err = _os_error(exc)
    if err is None:
        return None
    reason = _REASONS.get(err.errno, err.strerror or os.strerror(err.errno))
    return StorageError(
        path,
        f"{reason} (errno {err.errno}) while writing {what}; the file was not written and no partial file "
        f"was left. {kept} Free space or fix the folder (or point --work_dir elsewhere) and re-run the same "
        "command to resume.",
        err.errno,
    )


# ----------------------------------------------------------------------------- finite check and writing
def _named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(dotted name, tensor)`` for every floating tensor in nested mappings / sequences."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _named_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _named_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def check_finite(state: Any, what: str, kept: str = "", limit: int = 3, refused: str = "not saved") -> None:
    """Raise :class:`~medspan.errors.TrainingError` if any floating tensor of ``state`` is NaN / infinite.

    Args:
        state: a (nested) state dict, e.g. ``{"student": {...}, "optimizer": {...}}``.
        what: the file or object concerned (starts the message).
        kept: a sentence saying what was kept (e.g. the last good checkpoint).
        limit: how many tensor names the message lists (dotted paths, e.g. ``student.head.last_layer.weight``).
        refused: what is refused (``"not saved"``, ``"not resumed"``).

    Example::

        check_finite({"model": model.state_dict()}, "runs/x/model.pt")   # TrainingError if a NaN is in it
    """
    named = list(_named_tensors(state))
    names, count = non_finite_tensors(named, limit)
    if count:
        more = f", ... ({count} in all)" if count > len(names) else ""
        raise TrainingError(
            f"{what}: {refused}: {count} of {len(named)} tensors hold NaN or infinite values "
            f"({', '.join(names)}{more}). {kept}".rstrip()
        )


def _save_and_sync(obj: Any, f: BinaryIO) -> None:
    """``torch.save`` into an open file, flushed and fsync'ed (a write error surfaces as ``OSError``)."""
    torch.save(obj, f)
    f.flush()
    os.fsync(f.fileno())


def atomic_torch_save(
    obj: Any, path: str | os.PathLike, check: bool = True, what: str = "the weights", kept: str = ""
) -> Path:
    """``torch.save`` to a temporary file beside ``path`` (flushed, fsync'ed), then rename it onto ``path``.

    Args:
        obj: what to save (a state dict).
        path: the final file.
        check: refuse (``TrainingError``) when a floating tensor of ``obj`` is not finite.
        what: how messages call the content.
        kept: a sentence for the messages saying what stays (e.g. the previous file).

    Raises:
        TrainingError: non-finite tensors (nothing written).
        StorageError: the write failed (full disk: "no space left on device"); the temporary file is
            removed and ``path`` is untouched.
    """
    path = Path(path)
    if check:
        check_finite(obj, f"{path} ({what})", kept)

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            _save_and_sync(obj, f)

    try:
        return atomic_write(path, _write, suffix=".tmp")
    except (OSError, RuntimeError) as e:
        err = _storage_error(path, e, what, kept)
        if err is None:
            raise
        raise err from e


class SafeDiskSaver(DiskSaver):
    """ignite's ``DiskSaver(atomic=True)`` that never writes non-finite state and never loses the newest file.

    Differences from :class:`ignite.handlers.DiskSaver`:

    - a checkpoint with a NaN / infinite floating tensor is refused (:func:`check_finite`, on every
      rank, so all ranks stop together); nothing is written or removed;
    - the file is fsync'ed before the rename, and a write error becomes :class:`StorageError` naming
      the path ("no space left on device" for ``ENOSPC``);
    - ``remove`` (ignite calls it for the oldest file *before* writing the new one) is deferred until
      the next file is complete, so a failed write leaves every older checkpoint in place.

    Args:
        dirname: the checkpoint folder (created).
        save_on_rank: the rank that writes (medspan's :func:`~medspan.engines.dist.rank`).
    """

    def __init__(self, dirname: str | os.PathLike, save_on_rank: int = 0) -> None:
        super().__init__(dirname, atomic=True, create_dir=True, require_empty=False, save_on_rank=save_on_rank)
        self.pending_removal: list[str] = []

    def newest(self) -> Path | None:
        """The newest ``checkpoint_epoch=N.pt`` on disk (the last good one), or None."""
        return latest_checkpoint(self.dirname)

    def _kept(self) -> str:
        prev = self.newest()
        return f"The newest complete checkpoint is {prev}." if prev else "No earlier checkpoint exists."

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        path = self.dirname / filename
        try:
            check_finite(checkpoint, f"{path} (checkpoint)", self._kept() + " Training stopped.")
            if rank() != self.save_on_rank:
                return
            try:
                self._save_func(checkpoint, path, _save_and_sync)
            except (OSError, RuntimeError) as e:
                err = _storage_error(path, e, "the checkpoint", self._kept())
                if err is None:
                    raise
                raise err from e
            for name in self.pending_removal:  # the new file is complete: now drop the oldest
                if name != filename:
                    (self.dirname / name).unlink(missing_ok=True)
        finally:
            self.pending_removal.clear()

    def remove(self, filename: str) -> None:
        if filename not in self.pending_removal:
            self.pending_removal.append(filename)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The ``checkpoint_epoch=N.pt`` with the largest N in ``directory``, or None."""
    found = _checkpoints(directory)
    return found[-1][1] if found else None


def _checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in d.iterdir() if (m := _PATTERN.match(p.name)))


# ----------------------------------------------------------------------------- settings fingerprint
_ABSENT = "(absent)"


def settings_diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Differences between two nested settings as ``(dotted path, old, new)``; missing keys are ``"(absent)"``.

    Example:
        >>> settings_diff({"hparams": {"lr": 0.1, "epochs": 2}}, {"hparams": {"lr": 0.2, "epochs": 2}})
        [('hparams.lr', 0.1, 0.2)]
    """
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[tuple[str, Any, Any]] = []
        for k in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append((path, _ABSENT, new[k]))
            elif k not in new:
                out.append((path, old[k], _ABSENT))
            else:
                out.extend(settings_diff(old[k], new[k], path))
        return out
    return [] if old == new else [(prefix, old, new)]


def _show(v: Any) -> str:
    return v if v is _ABSENT or v == _ABSENT else json.dumps(v)


class SettingsFingerprint:
    """The settings a run's checkpoints belong to, and the check that refuses to resume with others.

    Args:
        settings: nested JSON-like settings (the bundles pass ``{"hparams": ..., "datalist": ...}``).
        allow_change: dotted keys (or key prefixes) that may differ on resume; by default the
            training length ``hparams.epochs`` (see the module docstring for the schedules).

    ``state_dict()`` is what a checkpoint stores; :meth:`check` compares a stored fingerprint.

    Example:
        >>> fp = SettingsFingerprint({"hparams": {"lr": 0.2, "epochs": 4}})
        >>> fp.check({"hparams": {"lr": 0.2, "epochs": 2}}, "ckpt")   # only epochs changed: allowed
        [('hparams.epochs', 2, 4)]
    """

    def __init__(self, settings: Mapping[str, Any], allow_change: Sequence[str] = ("hparams.epochs",)) -> None:
        self.settings = json_plain(dict(settings))
        self.allow_change = tuple(allow_change)

    def state_dict(self) -> dict[str, Any]:
        return self.settings

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # checked explicitly, never loaded over
        pass

    def _allowed(self, key: str) -> bool:
        return any(key == a or key.startswith(a + ".") for a in self.allow_change)

    def check(self, saved: Mapping[str, Any], where: str | os.PathLike) -> list[tuple[str, Any, Any]]:
        """Raise :class:`ResumeError` if ``saved`` differs in a key not allowed to change.

        Returns:
            the allowed differences (``(dotted key, old, new)``), empty when the settings are equal.
        """
        diff = settings_diff(json_plain(saved), self.settings)
        refused = [d for d in diff if not self._allowed(d[0])]
        if refused:
            lines = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in refused)
            raise ResumeError(
                f"{where}: the checkpoints there were made with other settings ({len(refused)} differ: {lines}). "
                "Use another run name / output folder, set the old values back, or start afresh with "
                "--resume False (which deletes these checkpoints)."
            )
        return [d for d in diff if self._allowed(d[0])]

    def write(self, directory: str | os.PathLike) -> Path:
        """Write ``fingerprint.json`` (for a reader of the folder) atomically."""
        return write_json_atomic(self.settings, Path(directory) / "fingerprint.json")


# ----------------------------------------------------------------------------- random state
_FOLLOW = (Transform, Randomizable, Dataset, DataLoader, Sampler)


def _np_state(state: tuple) -> dict[str, Any]:
    """NumPy ``RandomState.get_state()`` as tensors and numbers (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _np_state_back(d: Mapping[str, Any]) -> tuple:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached_gaussian"])


def _generators(obj: Any, path: str, out: dict[str, Any], seen: set[int], depth: int = 0) -> None:
    """Collect ``torch.Generator`` / NumPy random states reachable from a data loader, by attribute path.

    Follows data loaders, samplers, datasets and MONAI transforms through their attributes, and lists
    (only when their first item is one of these, so data lists are not walked) and small dicts.
    """
    if obj is None or depth > 64 or id(obj) in seen:  # seen: no cycles; depth: a guard only
        return
    if isinstance(obj, (torch.Generator, np.random.RandomState, np.random.Generator)):
        seen.add(id(obj))
        out[path] = obj
        return
    if isinstance(obj, (list, tuple)):
        if obj and isinstance(obj[0], (*_FOLLOW, torch.Generator, np.random.RandomState)):
            seen.add(id(obj))
            for i, v in enumerate(obj):
                _generators(v, f"{path}[{i}]", out, seen, depth + 1)
        return
    if isinstance(obj, Mapping):
        if len(obj) <= 64:
            seen.add(id(obj))
            for k, v in obj.items():
                _generators(v, f"{path}[{k!r}]", out, seen, depth + 1)
        return
    if not isinstance(obj, _FOLLOW):
        return
    seen.add(id(obj))
    if isinstance(obj, Randomizable):  # R may still be the class-level default: take what the object uses
        _generators(obj.R, f"{path}.R", out, seen, depth + 1)
    for k, v in vars(obj).items():
        _generators(v, f"{path}.{k}", out, seen, depth + 1)


def _engine_generators(engine: Engine) -> dict[str, Any]:
    """Every random generator of a training run's process-local objects, keyed by a stable path."""
    out: dict[str, Any] = {}
    seen: set[int] = set()
    loader = getattr(engine, "data_loader", None) or getattr(engine.state, "dataloader", None)
    _generators(loader, "loader", out, seen)
    for name, v in vars(engine).items():  # the trainer's own generators (masking, noise, ...)
        g = v if isinstance(v, torch.Generator) else getattr(v, "generator", None)
        if isinstance(g, torch.Generator) and not isinstance(v, (nn.Module, DataLoader)) and id(g) not in seen:
            seen.add(id(g))
            out[f"engine.{name}" if g is v else f"engine.{name}.generator"] = g
    return out


def capture_random_state(engine: Engine | None = None) -> dict[str, Any]:
    """This process's random state: Python, NumPy, torch (CPU, CUDA) and ``engine``'s generators.

    Returns:
        a dict of tensors, numbers, tuples and strings (loadable with ``weights_only=True``).
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _np_state(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "generators": {},
    }
    if engine is not None:
        for path, g in _engine_generators(engine).items():
            if isinstance(g, torch.Generator):
                state["generators"][path] = {"torch": g.get_state()}
            elif isinstance(g, np.random.RandomState):
                state["generators"][path] = {"numpy": _np_state(g.get_state())}
            else:
                state["generators"][path] = {"numpy_generator": g.bit_generator.state}
    return state


def restore_random_state(engine: Engine | None, state: Mapping[str, Any]) -> list[str]:
    """Restore what :func:`capture_random_state` captured; returns the generator paths not found here."""
    random.setstate(tuple(state["python"]) if not isinstance(state["python"], tuple) else state["python"])
    np.random.set_state(_np_state_back(state["numpy"]))
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    missing: list[str] = []
    if engine is not None:
        here = _engine_generators(engine)
        for path, saved in state.get("generators", {}).items():
            g = here.get(path)
            if g is None:
                missing.append(path)
            elif "torch" in saved and isinstance(g, torch.Generator):
                g.set_state(saved["torch"])
            elif "numpy" in saved and isinstance(g, np.random.RandomState):
                g.set_state(_np_state_back(saved["numpy"]))
            elif "numpy_generator" in saved and isinstance(g, np.random.Generator):
                g.bit_generator.state = saved["numpy_generator"]
            else:
                missing.append(path)
    return missing


class RandomStates:
    """Checkpoint item holding the random state of every rank (``state_dict`` gathers, ``load_state_dict`` picks).

    Args:
        engine: the trainer whose loader and generators are included.

    ``state_dict()`` is a collective under DDP (``all_gather_object``): every rank must call it, as
    ignite's ``Checkpoint`` does. ``load_state_dict`` restores this rank's entry.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def state_dict(self) -> dict[str, Any]:
        local = capture_random_state(self.engine)
        n = world_size()
        if n > 1 and torch_dist.is_available() and torch_dist.is_initialized():
            ranks: list[Any] = [None] * n
            torch_dist.all_gather_object(ranks, local)
        else:
            ranks = [local]
        return {"world_size": n, "ranks": ranks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        n, here = int(state.get("world_size", 1)), world_size()
        if n != here:
            logger.warning(
                "random state not restored: the checkpoint was written by %d process(es), this run has %d; "
                "the data order, crops and masks from here on differ from an uninterrupted run", n, here
            )
            return
        missing = restore_random_state(self.engine, state["ranks"][rank()])
        if missing:
            logger.warning("random generators of the checkpoint not found in this run: %s", ", ".join(missing))


# ----------------------------------------------------------------------------- the handler
class EpochCheckpoint:
    """Save every ``interval`` epochs (ignite ``Checkpoint`` + :class:`SafeDiskSaver`); resume on start.

    See the module docstring for what is saved, when, and how a resume treats settings and randomness.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: name -> object with ``state_dict`` / ``load_state_dict`` (modules, optimizer, loss,
            masking / noise policies); modules may be DDP-wrapped (saved unwrapped).
        n_saved: how many recent checkpoints to keep.
        interval: save every this many epochs (the last epoch is always saved).
        resume: restore the newest checkpoint at ``Events.STARTED`` if one exists; False deletes the
            folder's checkpoints at start (a fresh run).
        save_engine: also save / restore the engine it is attached to (epoch, iteration) as ``"trainer"``.
        fingerprint: settings the checkpoints belong to (e.g. ``{"hparams": ..., "datalist": ...}``);
            a resume with other settings is refused naming the differing keys.
        allow_change: fingerprint keys that may differ on resume (default: the training length).
        random_state: save and restore every rank's random state (exact resume).
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        n_saved: int = 2,
        interval: int = 1,
        resume: bool = True,
        save_engine: bool = True,
        fingerprint: Mapping[str, Any] | None = None,
        allow_change: Sequence[str] = ("hparams.epochs",),
        random_state: bool = True,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        for reserved in ("settings", "random_state", "checkpointer"):
            if reserved in self.save_dict:
                raise ValueError(f"save_dict may not use the reserved name {reserved!r}")
        self.n_saved = max(1, int(n_saved))
        self.interval = max(1, int(interval))
        self.resume = bool(resume)
        self.save_engine = bool(save_engine)
        self.fingerprint = None if fingerprint is None else SettingsFingerprint(fingerprint, allow_change)
        self.random_state = bool(random_state)
        self.resumed_from: Path | None = None
        self.saver: SafeDiskSaver | None = None
        self.checkpointer: Checkpoint | None = None

    # ------------------------------------------------------------------ wiring
    def attach(self, engine: Engine) -> None:
        if self.save_engine:
            self.save_dict.setdefault("trainer", engine)
        engine.add_event_handler(Events.STARTED, self.load)

    def _to_save(self, engine: Engine) -> dict[str, Any]:
        to_save = dict(self.save_dict)
        if self.fingerprint is not None:
            to_save["settings"] = self.fingerprint
        if self.random_state:
            to_save["random_state"] = RandomStates(engine)
        return to_save

    def _setup(self, engine: Engine) -> None:
        """Create the saver and ignite's Checkpoint (at start: the process group exists by then)."""
        self.saver = SafeDiskSaver(self.save_dir)
        self.checkpointer = Checkpoint(
            self._to_save(engine),
            self.saver,
            n_saved=self.n_saved,
            filename_pattern="checkpoint_epoch={global_step}.{ext}",
            global_step_transform=lambda e, _: e.state.epoch,
            include_self=True,
        )
        # the save runs after every EPOCH_COMPLETED handler attached so far (validation included), so the
        # random state it captures is the one the next epoch starts from
        if not engine.has_event_handler(self.save, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    # ------------------------------------------------------------------ resume
    def load(self, engine: Engine) -> None:
        """``Events.STARTED``: set up saving, then restore the newest checkpoint (see the module docstring)."""
        self._setup(engine)
        if is_main_rank():
            self.save_dir.mkdir(parents=True, exist_ok=True)
            for p in self.save_dir.iterdir():
                if _STALE_TMP.match(p.name):  # left by a kill during a write: never a checkpoint
                    p.unlink(missing_ok=True)
        found = _checkpoints(self.save_dir)
        if not found:
            return
        if not self.resume:  # a fresh start: old checkpoints must not be picked up later
            if is_main_rank():
                for _, p in found:
                    p.unlink(missing_ok=True)
                (self.save_dir / "fingerprint.json").unlink(missing_ok=True)
            logger.info("resume is off: removed old checkpoints in %s", self.save_dir)
            return
        path = found[-1][1]
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ResumeError(
                f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}). Delete it to resume from an "
                "earlier one, or start afresh with --resume False"
            ) from e
        self._check_settings(checkpoint, path)
        check_finite(
            {k: v for k, v in checkpoint.items() if k not in ("random_state", "checkpointer", "settings")},
            f"{path} (checkpoint)",
            "It was written before medspan refused non-finite checkpoints; delete it to resume from an earlier "
            "one, or start afresh with --resume False.",
            refused="not resumed",
        )
        max_epochs, epoch_length = engine.state.max_epochs, engine.state.epoch_length
        to_load = dict(self.save_dict)
        missing = [k for k in to_load if k not in checkpoint]
        if missing:
            raise ResumeError(f"{path}: the checkpoint has no {', '.join(missing)}; start afresh with --resume False")
        Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint)
        saved_max = engine.state.max_epochs
        if epoch_length is not None and engine.state.epoch_length != epoch_length:
            raise ResumeError(
                f"{path}: the checkpoint's epochs have {engine.state.epoch_length} iterations, this run's data "
                f"loader has {epoch_length}; use another run name / output folder or start afresh with --resume False"
            )
        if max_epochs is not None and engine.state.epoch > max_epochs:
            raise ResumeError(
                f"{path}: the checkpoint is at epoch {engine.state.epoch} but epochs is {max_epochs}; "
                "raise epochs to continue, or use another run name / output folder"
            )
        engine.state.max_epochs = max_epochs
        if saved_max is not None and max_epochs is not None and max_epochs != saved_max:
            logger.warning(
                "continuing %s from epoch %d with epochs %d (was %d): the cosine schedules now span %d epochs and "
                "epochs %d-%d follow them from iteration %d on (see medspan.engines.checkpoint)",
                self.save_dir, engine.state.epoch, max_epochs, saved_max, max_epochs, engine.state.epoch + 1,
                max_epochs, engine.state.iteration,
            )
        # ignite's list of kept files, rebuilt from the folder so n_saved also counts files of earlier runs
        self.checkpointer.load_state_dict({"_saved": [(e, p.name) for e, p in found]})
        if self.random_state and "random_state" in checkpoint:
            RandomStates(engine).load_state_dict(checkpoint["random_state"])
        elif self.random_state:
            logger.warning("%s holds no random state (an older checkpoint): random draws are re-seeded", path)
        self.resumed_from = path
        logger.info("resumed from %s (epoch %d)", path, engine.state.epoch)

    def _check_settings(self, checkpoint: Mapping[str, Any], path: Path) -> None:
        if self.fingerprint is None:
            return
        saved = checkpoint.get("settings")
        fp_file = self.save_dir / "fingerprint.json"
        if saved is None and fp_file.is_file():  # checkpoints of earlier medspan versions
            saved = json.loads(fp_file.read_text())
        if saved is None:
            return
        changed = self.fingerprint.check(saved, self.save_dir)
        if changed:
            logger.info(
                "resuming %s with changed %s", self.save_dir,
                "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in changed),
            )

    # ------------------------------------------------------------------ save
    def save(self, engine: Engine) -> None:
        """``Events.EPOCH_COMPLETED``: write ``checkpoint_epoch=N.pt`` (rank 0) on interval epochs and the last."""
        epoch = engine.state.epoch
        if epoch % self.interval and epoch != engine.state.max_epochs:
            return
        assert self.checkpointer is not None
        before = self.checkpointer.state_dict()
        try:
            self.checkpointer(engine)
        except BaseException:
            self.checkpointer.load_state_dict(before)  # the list of kept files stays what is on disk
            raise
        if self.fingerprint is not None and is_main_rank():
            self.fingerprint.write(self.save_dir)
