"""Priors from masks: one exemplar's softened masks, or the mean of many masks (population prior).

A soft prior is a float array (S, *spatial) in [0, 1], one channel per structure, in the same axis
order as the images it goes with (MONAI order when loaded through ``LoadImaged``). Priors are
stored as ``.npy`` float16 files, channel first, which MONAI's ``NumpyReader`` loads.

Example::

    prior = soften_masks(masks, sigma=4.0)        # (3, 256, 256) float32 in [0, 1]
    save_prior(prior, "priors/exemplar.npy")
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from medspan.io import atomic_write

__all__ = ["soften_masks", "mean_prior", "save_prior", "load_prior"]


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
    return atomic_write(path, lambda tmp: np.save(tmp, np.asarray(prior, dtype=np.float16)), suffix=".npy")


def load_prior(path: str | os.PathLike) -> np.ndarray:
    """Load a prior saved by :func:`save_prior` as float32 (S, *spatial)."""
    return np.load(path).astype(np.float32)
