"""Small handlers for the pretraining engine (everything else is MONAI's own handlers).

- :class:`ProgressBarHandler` -- ignite's tqdm progress bar showing the loss terms.
- :class:`ExportWeights` -- at ``COMPLETED`` writes the final weights (``model.pt``: teacher backbone,
  the network used downstream; ``student.pt``) atomically, before tracking handlers log them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ignite.engine import Engine, Events
from torch import nn

from medspan.engines.checkpoint import atomic_torch_save

__all__ = ["ProgressBarHandler", "ExportWeights"]


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
        from ignite.handlers import ProgressBar

        from medspan.engines.pretrain import loss_terms

        ProgressBar(persist=False, ncols=100).attach(engine, output_transform=loss_terms(self.keys))


class ExportWeights:
    """Write final weights at ``Events.COMPLETED`` (atomic), e.g. ``{"model.pt": teacher.backbone}``.

    Args:
        output_dir: folder of the files.
        modules: file name -> module whose ``state_dict`` is saved.
    """

    def __init__(self, output_dir: str | os.PathLike, modules: Mapping[str, nn.Module]) -> None:
        self.output_dir = Path(output_dir)
        self.modules = dict(modules)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> list[Path]:
        from medspan.engines.dist import is_main_rank

        if not is_main_rank():
            return []
        return [
            atomic_torch_save(getattr(m, "module", m).state_dict(), self.output_dir / name)
            for name, m in self.modules.items()
        ]
