"""Shape helpers shared by the phantom generators: smooth outlines, noise waves, branching trees.

Every helper is a pure function of its arguments (and of the ``rng`` it is given).
"""


from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage as ndi

GENERATOR_VERSION = 1

# ----------------------------------------------------------------------------------------------
# Small shared helpers
# ----------------------------------------------------------------------------------------------


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a dataset generated with ``seed`` (independent of ``n``).

    Example::

        >>> case_seed(0, 3) == case_seed(0, 3)
        True
    """
    return int(np.random.SeedSequence(entropy=int(seed), spawn_key=(int(index),)).generate_state(1)[0])


def smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def polar_radius(points: Sequence[Sequence[float]], centre: Sequence[float], n: int = 512) -> np.ndarray:
    """Radius ``r(theta)`` of a star-shaped closed polygon around ``centre`` on ``n`` angles.

    Returns float64 ``(n,)`` sampled at ``theta_k = -pi + 2 pi k / n``.
    """
    p = np.asarray(points, dtype=np.float64) - np.asarray(centre, dtype=np.float64)
    q = np.roll(p, -1, axis=0)
    t = np.linspace(0.0, 1.0, 24, endpoint=False)[None, :, None]
    dense = (p[:, None, :] * (1.0 - t) + q[:, None, :] * t).reshape(-1, 2)
    theta = np.arctan2(dense[:, 1], dense[:, 0])
    radius = np.hypot(dense[:, 0], dense[:, 1])
    order = np.argsort(theta)
    grid = -np.pi + 2.0 * np.pi * np.arange(n) / n
    return np.interp(grid, theta[order], radius[order], period=2.0 * np.pi)


def fourier_perturb(radius: np.ndarray, rng: np.random.Generator, amp: float, orders: range) -> np.ndarray:
    """Multiply ``r(theta)`` by ``exp(sum_k a_k cos(k theta + phi_k))`` (smooth random shape change)."""
    n = radius.shape[0]
    theta = -np.pi + 2.0 * np.pi * np.arange(n) / n
    log_scale = np.zeros(n)
    for k in orders:
        log_scale += rng.normal(0.0, amp / k**0.7) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return radius * np.exp(log_scale)


def smooth_circular(radius: np.ndarray, sigma: float) -> np.ndarray:
    return ndi.gaussian_filter1d(radius, sigma, mode="wrap")


def polar_depth(
    u: np.ndarray, v: np.ndarray, radius: np.ndarray, centre: Sequence[float], scale: Sequence[float] = (1.0, 1.0)
) -> np.ndarray:
    """Signed inward distance-like depth ``r(theta) - rho`` of points ``(u, v)`` to a polar shape.

    ``scale`` stretches the shape about its centre. Positive inside, in canonical units
    (approximately: exact along rays from the centre).
    """
    du = (u - float(centre[0])) * (1.0 / float(scale[0]))
    dv = (v - float(centre[1])) * (1.0 / float(scale[1]))
    rho = np.hypot(du, dv)
    theta = np.arctan2(dv, du)
    n = radius.shape[0]
    table = np.concatenate([radius, radius[:2]]).astype(u.dtype)
    pos = (theta + np.float32(np.pi)) * np.float32(n / (2.0 * np.pi))
    i0f = np.floor(pos)
    i0 = i0f.astype(np.int32)
    r0 = table[i0]
    r = r0 + (pos - i0f) * (table[i0 + 1] - r0)
    return (r - rho) * float(min(scale))


def segment_distance(u: np.ndarray, v: np.ndarray, p0: Sequence[float], p1: Sequence[float]) -> np.ndarray:
    """Euclidean distance of points ``(u, v)`` to the segment ``p0``-``p1``."""
    x0, y0 = float(p0[0]), float(p0[1])
    ax, ay = float(p1[0]) - x0, float(p1[1]) - y0
    denom = ax * ax + ay * ay
    t = np.clip(((u - x0) * ax + (v - y0) * ay) * (1.0 / denom), 0.0, 1.0)
    return np.hypot(u - (x0 + t * ax), v - (y0 + t * ay))


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndi.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def random_waves(rng: np.random.Generator, amp: float, n_waves: int, freq: tuple[float, float]) -> np.ndarray:
    """Parameters ``(n_waves, 4)`` = (kx, ky, phase, amplitude) of a random plane-wave field."""
    f = rng.uniform(*freq, n_waves)
    a = rng.uniform(0.0, 2.0 * np.pi, n_waves)
    return np.stack(
        [np.pi * f * np.cos(a), np.pi * f * np.sin(a), rng.uniform(0.0, 2.0 * np.pi, n_waves), rng.normal(0.0, amp, n_waves)], 1
    )


def waves_on_grid(waves: np.ndarray, xc: np.ndarray, yc: np.ndarray) -> np.ndarray:
    """Evaluate a plane-wave field on the grid ``yc x xc`` (float32 ``(len(yc), len(xc))``).

    Uses ``sin(kx x + ky y + p) = sin(kx x) cos(ky y + p) + cos(kx x) sin(ky y + p)`` so that only
    1D sines are computed.
    """
    out = np.zeros((yc.shape[0], xc.shape[0]), dtype=np.float32)
    for kx, ky, ph, am in waves:
        sx, cx = np.sin(kx * xc).astype(np.float32), np.cos(kx * xc).astype(np.float32)
        sy, cy = np.sin(ky * yc + ph).astype(np.float32), np.cos(ky * yc + ph).astype(np.float32)
        out += np.float32(am) * (cy[:, None] * sx[None, :] + sy[:, None] * cx[None, :])
    return out


def waves_at(waves: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Evaluate a plane-wave field at points (same shape as ``px``)."""
    out = np.zeros(np.broadcast_shapes(np.shape(px), np.shape(py)), dtype=np.float64)
    for kx, ky, ph, am in waves:
        out += am * np.sin(kx * px + ky * py + ph)
    return out


def branching_tree(
    rng: np.random.Generator,
    roots: np.ndarray,
    directions: np.ndarray,
    generations: int,
    length: float,
    width: float,
    spread: tuple[float, float] = (0.35, 0.65),
    shrink: float = 0.74,
    width_shrink: float = 0.72,
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Random bifurcating tree in 2D or 3D, vectorised per generation.

    Args:
        roots: ``(m, d)`` start points; directions: ``(m, d)`` unit vectors.
    Returns:
        One ``(start (k, d), end (k, d), width)`` triple per generation.
    """
    pts = np.asarray(roots, dtype=np.float64)
    dirs = np.asarray(directions, dtype=np.float64)
    dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    dim = pts.shape[1]
    segments = []
    for g in range(generations):
        m = pts.shape[0]
        seg_len = length * shrink**g * rng.uniform(0.7, 1.3, m)
        ends = pts + dirs * seg_len[:, None]
        segments.append((pts, ends, width * width_shrink**g))
        # two children, rotated away from the parent direction on either side
        if dim == 2:
            ang = np.arctan2(dirs[:, 1], dirs[:, 0])
            split = rng.uniform(*spread, m)
            share = rng.uniform(0.3, 0.7, m)
            a1 = ang + split * share + rng.normal(0, 0.08, m)
            a2 = ang - split * (1 - share) + rng.normal(0, 0.08, m)
            new_dirs = np.concatenate([np.stack([np.cos(a1), np.sin(a1)], 1), np.stack([np.cos(a2), np.sin(a2)], 1)])
        else:
            perp = rng.normal(size=(m, 3))
            perp -= (perp * dirs).sum(1, keepdims=True) * dirs
            perp /= np.linalg.norm(perp, axis=1, keepdims=True) + 1e-12
            split = rng.uniform(*spread, m)
            share = rng.uniform(0.3, 0.7, m)
            a1 = (split * share)[:, None]
            a2 = (split * (1 - share))[:, None]
            d1 = dirs * np.cos(a1) + perp * np.sin(a1)
            d2 = dirs * np.cos(a2) - perp * np.sin(a2)
            new_dirs = np.concatenate([d1, d2])
        pts = np.concatenate([ends, ends])
        dirs = new_dirs
    return segments


def splat_segments(
    segments: Sequence[tuple[np.ndarray, np.ndarray, float]],
    shape: tuple[int, ...],
    to_index: Callable[[np.ndarray], np.ndarray],
    step: float,
) -> np.ndarray:
    """Accumulate points sampled along segments into a grid (weight = width x length / step).

    ``to_index`` maps ``(k, d)`` points to float voxel indices in ``shape`` order; ``step`` is the
    sampling step in the segments' units.
    """
    out = np.zeros(int(np.prod(shape)), dtype=np.float64)
    for start, end, width in segments:
        seg_len = float(np.max(np.linalg.norm(end - start, axis=1)))
        n_t = max(2, int(np.ceil(seg_len / step)) + 1)
        t = np.linspace(0.0, 1.0, n_t)[None, :, None]
        pts = (start[:, None, :] * (1 - t) + end[:, None, :] * t).reshape(-1, start.shape[1])
        idx = np.rint(to_index(pts)).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
        if not ok.any():
            continue
        flat = np.ravel_multi_index(tuple(idx[ok].T), shape)
        lengths = np.repeat(np.linalg.norm(end - start, axis=1) / (n_t - 1), n_t)[ok]
        out += np.bincount(flat, weights=lengths / step * width, minlength=out.size)
    return out.reshape(shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Chest X-ray
# ----------------------------------------------------------------------------------------------


