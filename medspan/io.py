"""Atomic writes: every file (or folder) medspan writes goes under a temporary name beside its
target first and is then renamed onto it.

A reader (or a re-run after a kill) therefore sees either the previous complete output or the
new complete output, never a partial one. The temporary name ``.tmp-<12 hex>-<name>`` keeps the
target's extension, because nibabel, PIL and numpy choose the format from it; a kill can leave
such a name behind, and :func:`remove_stale_temporaries` clears them.

- :func:`atomic_write`: the one primitive (a file or a whole folder).
- :func:`write_text_atomic`, :func:`write_json_atomic`: text and JSON (numpy / torch values become
  plain numbers and lists).
- :func:`write_png_atomic`: a PIL picture.
- :func:`write_nifti_atomic`: a NIfTI volume through MONAI's ``NibabelWriter`` (affine kept, qform =
  sform, code 1, mm).
- :func:`worker_pool`: a process pool whose workers die with the process that made it (a killed
  run leaves no orphan worker writing behind it).

Files are created with the user's umask (as ``open`` creates them: ``0o666 & ~umask``), never with
a private mode of their own.

Example::

    atomic_write("out/model.pt", lambda tmp: torch.save(state, tmp))
    write_json_atomic({"epoch": 3}, "out/summary.json")
    write_nifti_atomic(mask, "out/mask.nii.gz", affine, dtype=np.uint8)
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "json_plain",
    "TEMP_PREFIX",
    "atomic_write",
    "die_with_parent",
    "remove_stale_temporaries",
    "temporary_path",
    "worker_pool",
    "write_json_atomic",
    "write_nifti_atomic",
    "write_png_atomic",
    "write_text_atomic",
]

TEMP_PREFIX = ".tmp-"
"""Every temporary name starts with this (hidden on POSIX; :func:`remove_stale_temporaries` globs it)."""


def temporary_path(path: str | os.PathLike, suffix: str | None = None) -> Path:
    """A new unique name beside ``path``: ``.tmp-<12 hex>-<name>``, plus ``suffix`` unless the name ends with it.

    Example::

        >>> temporary_path("out/ct.nii.gz").name.endswith("-ct.nii.gz")
        True
    """
    path = Path(path)
    name = f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}"
    if suffix and not name.endswith(suffix):
        name += suffix
    return path.with_name(name)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], suffix: str | None = None) -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it onto ``path``.

    ``write`` creates whatever ``path`` should become: a file, or a folder with its files (e.g. a
    DICOM series). An existing folder at ``path`` is swapped out and removed after the rename.

    Args:
        path: the final file or folder; its parent folder is created.
        write: writes the whole content to the path (a ``str``) it is given; it must not exist yet.
        suffix: appended to the temporary name when ``path``'s name does not end with it (a writer
            that picks the format from the name, e.g. ``".npy"`` for ``numpy.save``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`. On any error (or interrupt) the temporary is removed
        and the error re-raised; ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path, suffix)
    try:
        write(str(tmp))
        if tmp.is_dir() and path.is_dir():  # a folder cannot be renamed onto a non-empty folder
            old = temporary_path(path)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
    return path


def remove_stale_temporaries(*folders: str | os.PathLike, min_age_s: float = 600.0) -> int:
    """Remove temporaries (:data:`TEMP_PREFIX`) left in ``folders`` by a killed run; returns how many.

    Only those older than ``min_age_s`` go, so a run writing in parallel (another rank or process)
    keeps its own; ``min_age_s=0`` removes them all.
    """
    now, removed = time.time(), 0
    for folder in folders:
        for p in Path(folder).glob(f"{TEMP_PREFIX}*"):
            try:
                if now - p.lstat().st_mtime < min_age_s:
                    continue
            except FileNotFoundError:
                continue
            _remove(p)
            removed += 1
    return removed


def write_text_atomic(text: str, path: str | os.PathLike, fsync: bool = True) -> Path:
    """Write a text file atomically (UTF-8), optionally fsync'ed before the rename."""

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    return atomic_write(path, _write)


def json_plain(obj: Any) -> Any:
    """JSON round trip: tuples become lists, numbers plain, unknown objects their ``str``.

    The form in which settings and run identities are stored, so that a value read back from a
    file compares equal to the one computed now.

    Example::

        >>> json_plain({"size": (64, 64), "dtype": float})
        {'size': [64, 64], 'dtype': "<class 'float'>"}
    """
    return json.loads(json.dumps(obj, default=str))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "detach") and hasattr(o, "tolist"):  # torch tensors
        return o.detach().cpu().tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    return str(o)


def write_json_atomic(obj: Any, path: str | os.PathLike, indent: int = 2) -> Path:
    """Write ``obj`` as JSON atomically (numpy / torch values become plain numbers and lists)."""
    return write_text_atomic(json.dumps(obj, indent=indent, default=_json_default) + "\n", path)


def write_png_atomic(picture: Any, path: str | os.PathLike, **save_options: Any) -> Path:
    """Write a PNG atomically: ``picture`` is a PIL image or an array PIL takes (``(rows, cols)``, ``(rows, cols, 3)``).

    ``save_options`` go to ``PIL.Image.save`` (e.g. ``compress_level=1``, ``optimize=True``).
    """
    im = picture if isinstance(picture, Image.Image) else Image.fromarray(np.asarray(picture))
    return atomic_write(path, lambda tmp: im.save(tmp, format="PNG", **save_options))


def write_nifti_atomic(
    array: Any,
    path: str | os.PathLike,
    affine: Any = None,
    *,
    dtype: Any = np.float32,
    channel_dim: int | None = None,
) -> Path:
    """Write a NIfTI (``.nii`` / ``.nii.gz``) atomically through MONAI's ``NibabelWriter``.

    Args:
        array: numpy array or tensor in MONAI's spatial order ``(x, y[, z])``, or with one channel
            axis at ``channel_dim`` (e.g. ``(H, x, y, z)`` maps with ``channel_dim=0``), which is moved
            last: ``(x, y, z, H)``. Trailing singleton spatial axes of a channel-less 3D array are
            dropped (MONAI's ``squeeze_end_dims``); a channel-less 2D array is stored as ``(x, y, 1)``.
        path: the output file.
        affine: ``(4, 4)`` RAS affine (a 2D ``(3, 3)`` one is embedded in 3D); default identity.
            Written as qform and sform with code 1, spatial units mm.
        dtype: stored data type; values are rounded first for integer types.
        channel_dim: the channel axis of ``array``, or None.

    Returns:
        the path written.

    Example::

        write_nifti_atomic(hu, "out/ct.nii.gz", meta["affine"], dtype=np.int16)
        write_nifti_atomic(maps, "out/maps.nii.gz", affine, channel_dim=0)   # (H, x, y, z) -> (x, y, z, H)
    """
    # monai.data takes seconds to import; the text, JSON and PNG writers above (the base of every
    # module, data_prep's worker processes included) do not need it
    import nibabel as nib
    from monai.data import NibabelWriter

    data = np.asarray(array.detach().cpu() if hasattr(array, "detach") else array)
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(data.dtype, np.integer) and data.dtype != bool:
        data = np.rint(data)
    writer = NibabelWriter(output_dtype=dtype)
    # a channel-less 2D array is written as (x, y, 1): MONAI's end-dimension squeezing fails on 2D input
    squeeze = channel_dim is None and data.ndim > 2
    writer.set_data_array(data, channel_dim=channel_dim, squeeze_end_dims=squeeze, spatial_ndim=None)
    aff = None if affine is None else np.asarray(affine.detach().cpu() if hasattr(affine, "detach") else affine, float)
    writer.set_metadata({"affine": aff, "original_affine": aff}, resample=False)
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_xyzt_units("mm")
    return atomic_write(path, lambda tmp: writer.write(tmp, verbose=False, header=header))


# ----------------------------------------------------------------------------------------------
# worker processes that die with their parent
# ----------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, poll_s: float = 0.2, ignore_sigint: bool = False) -> None:
    """Make the calling (worker) process end as soon as the process ``parent_pid`` is gone.

    Meant as a pool ``initializer`` (:func:`worker_pool` installs it). Two guards: on Linux the kernel
    sends SIGKILL when the parent dies (``prctl(PR_SET_PDEATHSIG)``; this also stops a worker busy
    inside C code such as a SimpleITK registration), and everywhere a daemon thread polls the parent
    pid and calls ``os._exit(1)`` when the worker has been re-parented. Without them, a SIGKILL or
    SIGTERM of the main process leaves its workers writing outputs and then idling forever.

    Args:
        parent_pid: the pid of the process that started the pool (``os.getpid()`` there).
        poll_s: how often the thread checks, in seconds.
        ignore_sigint: ignore Ctrl-C here (the terminal sends it to every process of the group); the
            parent alone decides to stop, and its exit then ends this worker.
    """
    if ignore_sigint:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the thread below still guards
            pass
    if os.getppid() != parent_pid:  # the parent died before this worker got here
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="medspan-watch-parent", daemon=True).start()


def worker_pool(
    max_workers: int, mp_context: Any = None, start_method: str | None = None, ignore_sigint: bool = True
) -> ProcessPoolExecutor:
    """A :class:`~concurrent.futures.ProcessPoolExecutor` whose workers die with this process.

    Args:
        max_workers: number of worker processes.
        mp_context: a multiprocessing context (default: ``start_method``'s, or the platform default).
        start_method: ``"spawn"``, ``"fork"``, ... when ``mp_context`` is not given.
        ignore_sigint: workers ignore Ctrl-C (the parent handles it once, see :func:`die_with_parent`).

    Example::

        with worker_pool(4, start_method="spawn") as pool:
            results = list(pool.map(convert_one, jobs))
    """
    if mp_context is None and start_method is not None:
        mp_context = multiprocessing.get_context(start_method)
    return ProcessPoolExecutor(
        max_workers=max_workers, mp_context=mp_context, initializer=die_with_parent,
        initargs=(os.getpid(), 0.2, ignore_sigint),
    )
