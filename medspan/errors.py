"""Errors that name the offending file or datalist entry.

Every user-facing failure about input data raises a subclass of :class:`MedspanError`, whose
message always starts with the file (or entry) and then states the problem, e.g.::

    DataError: /data/cxr/0001.dcm: not a DICOM file (no DICM preamble and no readable header)
"""

from __future__ import annotations

import os
from typing import Any


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
