"""Atomic, resumable epoch checkpoints for ignite / MONAI engines.

MONAI's ``CheckpointSaver`` writes in place (``atomic=False``), so a kill during ``torch.save``
leaves a truncated file that looks like a checkpoint. :class:`EpochCheckpoint` writes
``checkpoint_epoch=N.pt`` under a temporary name in the same folder and renames it, keeps the
newest ``n_saved``, and on ``STARTED`` restores the newest one (student, teacher, optimizer, DINO
centre, trainer epoch/iteration), so re-running the same command continues where a killed run
stopped.

Example::

    EpochCheckpoint("runs/span_cxr/checkpoints",
                    {"student": s, "teacher": t, "optimizer": opt, "dino_loss": loss}
                    ).attach(trainer)
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from medspan.io import atomic_write, write_json_atomic

__all__ = ["EpochCheckpoint", "latest_checkpoint", "atomic_torch_save"]

_PATTERN = re.compile(r"^checkpoint_epoch=(\d+)\.pt$")
logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the target folder, then ``os.replace`` onto ``path``."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), suffix=".tmp")


def _unwrap(obj: Any) -> Any:
    """The module inside a DistributedDataParallel / DataParallel wrapper (checkpoints stay portable)."""
    return getattr(obj, "module", obj) if isinstance(obj, torch.nn.Module) else obj


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The ``checkpoint_epoch=N.pt`` with the largest N in ``directory``, or None."""
    d = Path(directory)
    if not d.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _PATTERN.match(p.name))]
    return max(found)[1] if found else None


class EpochCheckpoint:
    """Save every ``interval`` epochs atomically; restore the newest checkpoint when the engine starts.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: name -> object with ``state_dict`` / ``load_state_dict`` (modules, optimizer, loss, engine).
        n_saved: how many recent checkpoints to keep.
        interval: save every this many epochs (the last epoch is always saved).
        resume: restore the newest checkpoint at ``Events.STARTED`` if one exists.
        fingerprint: settings the checkpoints belong to (e.g. the hyper-parameters); stored beside them,
            and a resume with different settings is refused with a clear error instead of loading
            weights of another configuration.
        save_engine: also save/restore the engine it is attached to (epoch, iteration) as ``"trainer"``;
            this avoids a circular reference between a trainer and its handlers in bundle configs.
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
    ) -> None:
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.n_saved = max(1, int(n_saved))
        self.interval = max(1, int(interval))
        self.resume = bool(resume)
        self.save_engine = bool(save_engine)
        self.fingerprint = None if fingerprint is None else json.loads(json.dumps(fingerprint, default=str))
        self.resumed_from: Path | None = None

    def attach(self, engine: Engine) -> None:
        if self.save_engine:
            self.save_dict.setdefault("trainer", engine)
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def load(self, engine: Engine) -> None:
        path = latest_checkpoint(self.save_dir)
        if path is None:
            return
        if not self.resume:  # a fresh start: old checkpoints must not be picked up later
            for p in self.save_dir.iterdir():
                if _PATTERN.match(p.name):
                    p.unlink()
            logger.info("resume is off: removed old checkpoints in %s", self.save_dir)
            return
        fp_file = self.save_dir / "fingerprint.json"
        if self.fingerprint is not None and fp_file.is_file():
            saved = json.loads(fp_file.read_text())
            if saved != self.fingerprint:
                diff = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
                raise ValueError(
                    f"{self.save_dir}: the checkpoints there were made with other settings ({', '.join(diff)} "
                    "differ); use another run name / output folder, or start afresh with resume off"
                )
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load={k: _unwrap(v) for k, v in self.save_dict.items()}, checkpoint=checkpoint)
        if max_epochs is not None and engine.state.epoch > max_epochs:
            raise ValueError(
                f"{path}: checkpoint is at epoch {engine.state.epoch} but max_epochs is {max_epochs}; "
                "raise max_epochs to continue or start a new run directory"
            )
        engine.state.max_epochs = max_epochs
        self.resumed_from = path
        logger.info("resumed from %s (epoch %d)", path, engine.state.epoch)

    def save(self, engine: Engine) -> None:
        from medspan.engines.dist import is_main_rank

        epoch = engine.state.epoch
        if (epoch % self.interval and epoch != engine.state.max_epochs) or not is_main_rank():
            return
        if self.fingerprint is not None:
            write_json_atomic(self.fingerprint, self.save_dir / "fingerprint.json")
        state = {k: _unwrap(v).state_dict() for k, v in self.save_dict.items()}
        atomic_torch_save(state, self.save_dir / f"checkpoint_epoch={epoch}.pt")
        found = sorted((int(m.group(1)), p) for p in self.save_dir.iterdir() if (m := _PATTERN.match(p.name)))
        for _, p in found[: -self.n_saved]:
            p.unlink(missing_ok=True)
