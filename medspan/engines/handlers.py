"""Small handlers for the pretraining engine (everything else is MONAI's own handlers).

- :class:`ProgressBarHandler` -- ignite's tqdm progress bar showing the loss terms.
- :class:`ExportWeights` -- at ``COMPLETED`` writes the final weights (``model.pt``: teacher backbone,
  the network used downstream; ``student.pt``) atomically, before tracking handlers log them. Weights
  holding a NaN or an infinity are refused (:class:`~medspan.errors.TrainingError` naming the tensors,
  nothing written); a full disk raises :class:`~medspan.engines.checkpoint.StorageError` with the path
  and "no space left on device", leaving no partial file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from torch import nn

from medspan.engines.checkpoint import atomic_torch_save, check_finite
from medspan.engines.dist import is_main_rank
from medspan.engines.pretrain import loss_terms

__all__ = ["ExportWeights", "ProgressBarHandler"]


class ProgressBarHandler:
    """tqdm progress bar over iterations, showing ``keys`` of the iteration output dict.

    Args:
        keys: output entries to show (missing ones are skipped).
        disable: turn the bar off.
        only_tty: show it only when stderr is a terminal (log files and CI get the stats lines only).
    """

    def __init__(
        self, keys: Sequence[str] = ("loss", "dino", "prior"), disable: bool = False, only_tty: bool = True
    ) -> None:
        self.keys = tuple(keys)
        self.disable = disable
        self.only_tty = only_tty

    def attach(self, engine: Engine) -> None:
        if self.disable or (self.only_tty and not sys.stderr.isatty()):
            return
        ProgressBar(persist=False, ncols=100).attach(engine, output_transform=loss_terms(self.keys))


class ExportWeights:
    """Write final weights at ``Events.COMPLETED`` (atomic), e.g. ``{"model.pt": teacher.backbone}``.

    Every module is checked before any file is written: if one holds a non-finite tensor, none is
    written (a previous export stays as it was).

    Args:
        output_dir: folder of the files.
        modules: file name -> module whose ``state_dict`` is saved (DDP wrappers are unwrapped).
    """

    def __init__(self, output_dir: str | os.PathLike, modules: Mapping[str, nn.Module]) -> None:
        self.output_dir = Path(output_dir)
        self.modules = dict(modules)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> list[Path]:
        if not is_main_rank():
            return []
        states = {name: getattr(m, "module", m).state_dict() for name, m in self.modules.items()}
        where = f" after epoch {engine.state.epoch}" if engine is not None else ""
        for name, state in states.items():
            check_finite(
                state,
                f"{self.output_dir / name} (exported weights{where})",
                "No weights were exported; an earlier export, if any, is unchanged. Training stopped.",
            )
        return [
            atomic_torch_save(state, self.output_dir / name, check=False, what="the exported weights",
                              kept="An earlier export, if any, is unchanged.")
            for name, state in states.items()
        ]
