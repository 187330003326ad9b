"""Priors from masks: one exemplar's softened masks, or the mean of many masks (population prior).

A soft prior is a float array (S, *spatial) in [0, 1], one channel per structure, in the same axis
order as the images it goes with (MONAI order when loaded through ``LoadImaged``). Priors are
stored as ``.npy`` float16 files, channel first, which MONAI's ``NumpyReader`` loads.

Population priors live in a **common frame**: the normalised field of view, i.e. every image's
grid stretched onto one reference grid (``shape``) so that the image corners meet. That is the
frame in which a fixed prior is used for every image (``PriorToImaged`` resamples a prior by field
of view), so a population prior is usable as a fixed prior for any image:

* :func:`population_prior`: the voxel-wise mean of masks given on any grids (each resampled to the
  common frame with :func:`resize_prior`), e.g. the warped exemplar masks of every registered image;
* :func:`read_masks`: the masks of label files (a datalist's ``label``), for :func:`population_prior`;
* :func:`resize_prior`: bring a prior from the common frame onto one image's grid (or back).

Example::

    prior = soften_masks(masks, sigma=4.0)        # (3, 256, 256) float32 in [0, 1]
    save_prior(prior, "priors/exemplar.npy")
    pop = population_prior(warped_masks, shape=(256, 256))      # (3, 256, 256), frequencies
    save_prior(resize_prior(pop, (512, 480)), "priors/case.npy")
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from medspan.data.readers import read_image
from medspan.errors import DataError
from medspan.io import atomic_write

__all__ = [
    "load_prior",
    "mean_prior",
    "population_prior",
    "read_masks",
    "resize_prior",
    "save_prior",
    "soften_masks",
]


def soften_masks(masks: np.ndarray, sigma: float | Sequence[float] = 4.0) -> np.ndarray:
    """Gaussian-blur binary masks into a soft prior that keeps its peak at 1.

    Args:
        masks: (S, *spatial) bool or {0, 1} array.
        sigma: blur in pixels (scalar or per spatial axis); 0 returns the masks as float.

    Returns:
        (S, *spatial) float32 in [0, 1]; each non-empty channel is rescaled so that its maximum is 1.
    """
    m = np.asarray(masks, dtype=np.float32)
    if m.ndim < 3:
        raise ValueError(f"masks must be (S, *spatial) with 2 or 3 spatial dims, got shape {m.shape}")
    sig = np.broadcast_to(np.asarray(sigma, dtype=float), (m.ndim - 1,))
    out = np.empty_like(m)
    for s in range(m.shape[0]):
        blurred = ndimage.gaussian_filter(m[s], sigma=tuple(sig)) if np.any(sig > 0) else m[s]
        peak = float(blurred.max())
        out[s] = blurred / peak if peak > 0 else blurred
    return np.clip(out, 0.0, 1.0)


def mean_prior(masks: Iterable[np.ndarray], sigma: float | Sequence[float] = 0.0) -> np.ndarray:
    """Population prior: voxel-wise mean of (S, *spatial) masks on a common grid, optionally blurred.

    Returns:
        (S, *spatial) float32 in [0, 1] (the frequency of each structure at each pixel).
    """
    total, n = None, 0
    for m in masks:
        m = np.asarray(m, dtype=np.float64)
        total = m.copy() if total is None else total + m
        n += 1
    if total is None:
        raise ValueError("mean_prior needs at least one mask")
    prior = (total / n).astype(np.float32)
    if np.any(np.asarray(sigma) > 0):
        sig = np.broadcast_to(np.asarray(sigma, dtype=float), (prior.ndim - 1,))
        prior = np.stack([ndimage.gaussian_filter(c, sigma=tuple(sig)) for c in prior])
    return np.clip(prior, 0.0, 1.0)


def save_prior(prior: np.ndarray, path: str | os.PathLike) -> Path:
    """Save a (S, *spatial) prior as float16 ``.npy`` atomically (temp file + rename)."""
    return atomic_write(path, lambda tmp: np.save(tmp, np.asarray(prior, dtype=np.float16)))


def load_prior(path: str | os.PathLike) -> np.ndarray:
    """Load a prior saved by :func:`save_prior` as float32 (S, *spatial)."""
    return np.load(path).astype(np.float32)


def resize_prior(prior: np.ndarray, shape: Sequence[int], order: int = 1) -> np.ndarray:
    """Resample a (S, *spatial) prior onto another grid over the same field of view.

    The image corners meet (pixel edges aligned, ``grid_mode``), as when a fixed prior is stretched
    over an image of another size. Linear (``order=1``) by default; values stay in the input range.

    Args:
        prior: (S, *spatial) array (any real dtype; bool is read as 0/1).
        shape: the target spatial shape (same number of dims).
        order: spline order (0 nearest, 1 linear).

    Returns:
        (S, *shape) float32.

    Example::

        resize_prior(np.ones((2, 4, 4)), (8, 6)).shape     # (2, 8, 6)
    """
    p = np.asarray(prior, dtype=np.float32)
    shape = tuple(int(n) for n in shape)
    if p.ndim - 1 != len(shape):
        raise ValueError(f"prior has {p.ndim - 1} spatial dims, shape {shape} has {len(shape)}")
    if p.shape[1:] == shape:
        return p.copy()
    zoom = [n / o for n, o in zip(shape, p.shape[1:])]
    out = np.stack([
        ndimage.zoom(c, zoom, order=order, mode="nearest", grid_mode=True, prefilter=False) for c in p
    ])
    lo, hi = float(p.min(initial=0.0)), float(p.max(initial=0.0))
    return np.clip(out, lo, hi).astype(np.float32)


def population_prior(
    masks: Iterable[np.ndarray], shape: Sequence[int], sigma: float | Sequence[float] = 0.0
) -> np.ndarray:
    """Mean of (S, *spatial_i) masks given on any grids, in the common frame ``shape``.

    Each mask stack is resampled to ``shape`` by field of view (:func:`resize_prior`, linear) and the
    stacks are averaged: the value at a voxel is the frequency of the structure there.

    Returns:
        (S, *shape) float32 in [0, 1].

    Raises:
        ValueError: no masks, or stacks with different numbers of structures.
    """
    total, n, n_ch = None, 0, None
    for m in masks:
        r = resize_prior(np.asarray(m, dtype=np.float32), shape)
        if n_ch is not None and r.shape[0] != n_ch:
            raise ValueError(f"mask stack {n} has {r.shape[0]} structures, the first had {n_ch}")
        n_ch = r.shape[0]
        total = r.astype(np.float64) if total is None else total + r
        n += 1
    if total is None:
        raise ValueError("population_prior needs at least one mask stack")
    return mean_prior([total / n], sigma=sigma)


def read_masks(paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """Read one mask file per structure (any format of :func:`medspan.data.readers.read_image`).

    Returns:
        (S, *spatial) bool in MONAI axis order (value > 0 is inside).

    Raises:
        DataError: unreadable file, or masks of different shapes (naming the file).
    """
    out: list[np.ndarray] = []
    for p in paths:
        arr, _ = read_image(p)
        arr = np.asarray(arr)
        if out and arr.shape != out[0].shape:
            raise DataError(p, f"mask shape {arr.shape} differs from {paths[0]} ({out[0].shape})")
        out.append(arr > 0)
    if not out:
        raise ValueError("read_masks needs at least one path")
    return np.stack(out)
