"""Synthetic chest anatomy: phantom chest X-rays and chest CTs with organ masks.

With no real data given, medspan builds its default pretraining set from these phantoms: one
case is labeled as the exemplar, registered onto the others to make organ priors, and the
attention maps of the pretrained ViT are scored against the masks. The phantoms therefore aim
to look like radiographs / CTs: smooth organ shapes that vary per case, a global pose change,
intensity, bias-field and noise changes, and non-organ structures (ribs, spine, trachea, vessel
markings, gastric bubble, ...) so that the organs are not simply the only dark blobs.

Every generator is a pure function of its seed: the same seed gives bit-identical arrays. The
writers derive case ``i``'s seed from ``(seed, i)`` with :func:`case_seed`, so a case does not
depend on how many cases are written or on the number of worker processes.

Geometry conventions

* CXR (:func:`synth_cxr`): ``image`` and masks are numpy ``(rows, cols)`` arrays, shown as a PA
  radiograph: the patient's right lung is on the image left, the patient's left lung and the
  heart are towards the image right, the head is at row 0.
* CT (:func:`synth_ct`): ``image`` and masks are numpy ``(z, y, x)`` arrays (slice, row, column)
  in DICOM patient space (LPS): ``x`` (column) increases towards the patient's **left**, ``y``
  (row) towards **posterior**, ``z`` (slice) towards **superior** (head). ``spacing`` is given
  as ``(sx, sy, sz)`` in mm. The result carries ``affine``: the 4x4 RAS affine of the transposed
  ``(x, y, z)`` array, the one written into NIfTI files and the one MONAI's readers return.

Files on disk (:func:`write_cxr_dataset`, :func:`write_ct_dataset`) are ordinary PNG, DICOM and
NIfTI files described by a MONAI datalist ``dataset.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from medspan.errors import DataError

__all__ = [
    "CT_STRUCTURES",
    "CXR_STRUCTURES",
    "case_seed",
    "ct_geometry",
    "nodule_malignancy",
    "synth_ct",
    "synth_cxr",
    "write_ct_dataset",
    "write_cxr_dataset",
]

CXR_STRUCTURES: tuple[str, ...] = ("left_lung", "right_lung", "heart", "spine", "ribs", "clavicles")
"""Order of the CXR label channels (``label`` list of a datalist entry)."""

CT_STRUCTURES: tuple[str, ...] = ("left_lung", "right_lung", "heart", "airways", "vessels")
"""Order of the CT label channels (``label`` list of a datalist entry)."""

_GENERATOR_VERSION = 1

# ----------------------------------------------------------------------------------------------
# Templates (canonical frame of the CXR phantom: x to the image right, y down, image = [-1, 1]^2)
# ----------------------------------------------------------------------------------------------

# Lung fields (before the heart is cut out). Patient's right lung is on the image left.
_RIGHT_LUNG = (
    (-0.30, -0.76), (-0.44, -0.72), (-0.57, -0.60), (-0.67, -0.42), (-0.74, -0.18), (-0.78, 0.08),
    (-0.80, 0.30), (-0.82, 0.50), (-0.72, 0.44), (-0.60, 0.36), (-0.46, 0.31), (-0.32, 0.31),
    (-0.20, 0.34), (-0.10, 0.40), (-0.08, 0.22), (-0.09, 0.02), (-0.08, -0.16), (-0.07, -0.36),
    (-0.10, -0.56), (-0.19, -0.71),
)
_RIGHT_LUNG_CENTRE = (-0.42, -0.04)
_LEFT_LUNG = (
    (0.29, -0.74), (0.43, -0.70), (0.56, -0.59), (0.67, -0.41), (0.75, -0.16), (0.80, 0.10),
    (0.82, 0.34), (0.84, 0.54), (0.72, 0.48), (0.58, 0.40), (0.45, 0.36), (0.30, 0.37),
    (0.15, 0.41), (0.05, 0.44), (0.03, 0.25), (0.05, 0.04), (0.10, -0.14), (0.16, -0.30),
    (0.11, -0.44), (0.10, -0.58), (0.18, -0.70),
)
_LEFT_LUNG_CENTRE = (0.42, 0.0)
# Cardiac silhouette; its lower edge runs below the lung bases so that no lung sliver remains.
_HEART = (
    (-0.05, -0.08), (-0.13, 0.00), (-0.17, 0.10), (-0.18, 0.22), (-0.15, 0.34), (-0.08, 0.43),
    (0.04, 0.47), (0.20, 0.48), (0.34, 0.45), (0.44, 0.38), (0.47, 0.28), (0.43, 0.15),
    (0.33, 0.03), (0.22, -0.04), (0.14, -0.09), (0.05, -0.11),
)
_HEART_CENTRE = (0.14, 0.20)
# Thoracic cage (lateral extent of the ribs).
_CAGE = (
    (0.0, -0.86), (0.30, -0.84), (0.52, -0.74), (0.72, -0.52), (0.84, -0.22), (0.89, 0.10),
    (0.91, 0.45), (0.88, 0.72), (0.6, 0.62), (0.3, 0.52), (0.0, 0.48), (-0.3, 0.52), (-0.6, 0.62), (-0.88, 0.72),
    (-0.91, 0.45), (-0.89, 0.10),
    (-0.84, -0.22), (-0.72, -0.52), (-0.52, -0.74), (-0.30, -0.84),
)
_CAGE_CENTRE = (0.0, 0.0)


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


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _polar_radius(points: Sequence[Sequence[float]], centre: Sequence[float], n: int = 512) -> np.ndarray:
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


def _fourier_perturb(radius: np.ndarray, rng: np.random.Generator, amp: float, orders: range) -> np.ndarray:
    """Multiply ``r(theta)`` by ``exp(sum_k a_k cos(k theta + phi_k))`` (smooth random shape change)."""
    n = radius.shape[0]
    theta = -np.pi + 2.0 * np.pi * np.arange(n) / n
    log_scale = np.zeros(n)
    for k in orders:
        log_scale += rng.normal(0.0, amp / k**0.7) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return radius * np.exp(log_scale)


def _smooth_circular(radius: np.ndarray, sigma: float) -> np.ndarray:
    return ndi.gaussian_filter1d(radius, sigma, mode="wrap")


def _polar_depth(
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


def _segment_distance(u: np.ndarray, v: np.ndarray, p0: Sequence[float], p1: Sequence[float]) -> np.ndarray:
    """Euclidean distance of points ``(u, v)`` to the segment ``p0``-``p1``."""
    x0, y0 = float(p0[0]), float(p0[1])
    ax, ay = float(p1[0]) - x0, float(p1[1]) - y0
    denom = ax * ax + ay * ay
    t = np.clip(((u - x0) * ax + (v - y0) * ay) * (1.0 / denom), 0.0, 1.0)
    return np.hypot(u - (x0 + t * ax), v - (y0 + t * ay))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndi.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _random_waves(rng: np.random.Generator, amp: float, n_waves: int, freq: tuple[float, float]) -> np.ndarray:
    """Parameters ``(n_waves, 4)`` = (kx, ky, phase, amplitude) of a random plane-wave field."""
    f = rng.uniform(*freq, n_waves)
    a = rng.uniform(0.0, 2.0 * np.pi, n_waves)
    return np.stack(
        [np.pi * f * np.cos(a), np.pi * f * np.sin(a), rng.uniform(0.0, 2.0 * np.pi, n_waves), rng.normal(0.0, amp, n_waves)], 1
    )


def _waves_on_grid(waves: np.ndarray, xc: np.ndarray, yc: np.ndarray) -> np.ndarray:
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


def _waves_at(waves: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Evaluate a plane-wave field at points (same shape as ``px``)."""
    out = np.zeros(np.broadcast_shapes(np.shape(px), np.shape(py)), dtype=np.float64)
    for kx, ky, ph, am in waves:
        out += am * np.sin(kx * px + ky * py + ph)
    return out


def _branching_tree(
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


def _splat_segments(
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


def synth_cxr(seed: int, size: int = 256) -> dict[str, Any]:
    """Generate one phantom PA chest radiograph with its structure masks.

    The anatomy is built from smooth analytic shapes in a canonical frame (lung fields and heart
    as Fourier-perturbed polar contours, rib families as curved bands, spine, clavicles,
    trachea, shoulders), evaluated on a pixel grid warped by a random affine pose and a smooth
    random displacement field. Intensities follow a projection model (soft-tissue thickness
    minus lung air plus bone and vessel attenuation), then a tone curve, a multiplicative bias
    field, gamma and noise.

    Masks follow the SCR convention: lung masks exclude the heart; left lung, right lung and
    heart are pairwise disjoint. ``ribs`` holds the posterior and anterior rib bands inside the
    thoracic cage, ``body`` the patient's silhouette.

    Args:
        seed: any int; the same seed gives bit-identical output.
        size: output side in pixels.

    Returns:
        ``{"image": float32 (size, size) in [0, 1], "masks": {name: bool (size, size)} for
        CXR_STRUCTURES + ("body",), "structures": CXR_STRUCTURES, "spacing": (mm per column,
        mm per row), "seed": seed, "params": {...}}``.

    Example::

        >>> case = synth_cxr(0, size=128)
        >>> case["image"].shape, case["masks"]["heart"].dtype
        ((128, 128), dtype('bool'))
    """
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    rng = np.random.default_rng(int(seed))
    f32 = np.float32
    px = 2.0 / size  # one pixel in canonical units
    coords = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0)
    x, y = np.meshgrid(coords, coords)  # image coordinates, (rows, cols)

    # --- pose: canonical = M (p - t) + D(p) ---------------------------------------------------
    angle = np.deg2rad(rng.normal(0.0, 2.5))
    scale = rng.uniform(0.9, 1.08)
    aspect = rng.uniform(0.95, 1.05)
    shift = rng.normal(0.0, 0.035, 2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    fwd = rot @ np.diag([scale * aspect, scale / aspect])  # canonical -> image (linear part)
    inv = np.linalg.inv(fwd)
    disp_amp = rng.uniform(0.01, 0.025)
    waves_x = _random_waves(rng, disp_amp, 3, (0.4, 1.2))
    waves_y = _random_waves(rng, disp_amp, 3, (0.4, 1.2))
    dx, dy = _waves_on_grid(waves_x, coords, coords), _waves_on_grid(waves_y, coords, coords)
    xs, ys = x - f32(shift[0]), y - f32(shift[1])
    u = f32(inv[0, 0]) * xs + f32(inv[0, 1]) * ys + dx
    v = f32(inv[1, 0]) * xs + f32(inv[1, 1]) * ys + dy

    def to_image(pts: np.ndarray) -> np.ndarray:
        """canonical (k, 2) -> image normalised coords (k, 2), first-order inverse of the warp."""
        p = pts @ fwd.T + shift
        d = np.stack([_waves_at(waves_x, p[:, 0], p[:, 1]), _waves_at(waves_y, p[:, 0], p[:, 1])], 1)
        return (pts - d) @ fwd.T + shift

    edge = f32(0.8 * px)  # anti-aliasing width

    # --- body silhouette: neck, sloping shoulders, curved lateral chest walls ------------------
    neck_w = rng.uniform(0.16, 0.22)
    torso_w = rng.uniform(0.84, 0.96)
    shoulder_v = rng.uniform(-0.98, -0.86)  # where the shoulder line leaves the neck
    slope = rng.uniform(0.25, 0.45)
    au = np.abs(u)
    v_top = f32(shoulder_v) + f32(slope) * np.maximum(au - f32(neck_w), 0) ** 1.5
    v_top = np.where(au < neck_w, f32(-10.0), v_top)
    half_w = f32(torso_w) * (1 - f32(rng.uniform(0.02, 0.08)) * (v - f32(0.1)) ** 2)
    half_w = half_w * (1 + _waves_on_grid(_random_waves(rng, 0.012, 2, (0.5, 1.5)), coords, coords))
    body_depth = np.minimum(half_w - au, v - v_top)
    body = body_depth > 0
    body_soft = np.clip(body_depth / edge + 0.5, 0, 1)
    # soft-tissue path length: elliptical cross-section, thinner at the shoulders and neck
    thickness = np.sqrt(np.clip(1.0 - (u / np.maximum(half_w, f32(1e-3))) ** 2, 0, 1))
    thickness *= f32(0.6) + f32(0.4) * _smoothstep((v - v_top) / f32(0.25))
    neck = np.sqrt(np.clip(1 - (u / f32(neck_w)) ** 2, 0, 1)) * f32(0.75)
    neck_blend = _smoothstep((v - f32(shoulder_v)) / f32(0.2))
    thickness = thickness * neck_blend + neck * (1 - neck_blend)
    thickness *= body_soft
    # arms alongside the chest (optional): soft-tissue bands beyond a thin air gap
    arms = rng.random() < 0.35
    if arms:
        gap = rng.uniform(0.02, 0.06)
        arm_w = rng.uniform(0.15, 0.3)
        a_depth = np.minimum(au - (half_w + f32(gap)), f32(gap + arm_w) + half_w - au)
        a_depth = np.minimum(a_depth, v - v_top - f32(0.25))
        arm_soft = np.clip(a_depth / edge + 0.5, 0, 1)
        body = body | (arm_soft > 0.5)
        body_soft = np.maximum(body_soft, arm_soft)
        thickness = thickness + f32(0.6) * arm_soft * np.sqrt(np.clip(a_depth / f32(arm_w / 2), 0, 1))

    # --- lung fields ---------------------------------------------------------------------------
    lung_sx = rng.uniform(0.9, 1.05)
    lung_sy = rng.uniform(0.86, 1.06)  # depth of inspiration
    lung_pivot = np.array([0.0, -0.75])

    def lung_field(points: Sequence[Sequence[float]], centre: Sequence[float], side_amp: float) -> np.ndarray:
        r = _polar_radius(points, centre)
        r = _fourier_perturb(r, rng, side_amp, range(2, 7))
        r = _smooth_circular(r, 1.5)
        c = lung_pivot + (np.asarray(centre) - lung_pivot) * [lung_sx, lung_sy]
        sc = (lung_sx * rng.uniform(0.96, 1.04), lung_sy * rng.uniform(0.96, 1.04))
        return _polar_depth(u, v, r, c, sc)

    r_field = lung_field(_RIGHT_LUNG, _RIGHT_LUNG_CENTRE, 0.035)
    l_field = lung_field(_LEFT_LUNG, _LEFT_LUNG_CENTRE, 0.035)

    # --- heart -----------------------------------------------------------------------------------
    cardiomegaly = rng.random() < 0.2
    h_sx = rng.uniform(1.12, 1.35) if cardiomegaly else rng.uniform(0.88, 1.08)
    h_sy = rng.uniform(0.92, 1.1)
    h_centre = np.array(_HEART_CENTRE) + rng.normal(0, 0.02, 2) + [0.0, (lung_sy - 1.0) * 0.6]
    hr = _fourier_perturb(_polar_radius(_HEART, _HEART_CENTRE), rng, 0.03, range(2, 6))
    h_depth = _polar_depth(u, v, _smooth_circular(hr, 2.0), h_centre, (h_sx * lung_sx, h_sy))
    heart = h_depth > 0

    right_lung = (r_field > 0) & ~heart & body
    left_lung = (l_field > 0) & ~heart & body & ~right_lung
    right_lung = _largest_component(right_lung)
    left_lung = _largest_component(left_lung)
    heart &= body

    # --- bones -----------------------------------------------------------------------------------
    # spine: slightly curved column with vertebral levels (discs darker, pedicles brighter)
    sp_x = rng.normal(0.0, 0.015) + rng.normal(0.0, 0.02) * v + rng.normal(0.0, 0.02) * v * v
    sp_w = f32(rng.uniform(0.065, 0.08)) * (1 + f32(0.25) * (v + 1) / 2)
    su = u - sp_x.astype(np.float32)
    spine_depth = sp_w - np.abs(su)
    spine = (spine_depth > 0) & body
    spine_prof = np.sqrt(np.clip(1 - (su / sp_w) ** 2, 0, 1))
    v_period = rng.uniform(0.095, 0.115)
    phase = (v - f32(rng.uniform(0, v_period))) / f32(v_period)
    frac = phase - np.floor(phase)
    discs = np.clip(1 - np.abs(frac - 0.92) / 0.06, 0, 1)
    ped = ((np.abs(su) - 0.62 * sp_w) / (0.22 * sp_w)) ** 2 + ((frac - 0.4) / 0.2) ** 2
    pedicles = np.clip(1.0 - np.abs(ped - 0.8) * 2.0, 0, 1)
    spine_att = spine_prof * (1 - 0.5 * discs) + 0.35 * pedicles * (spine_depth > 0)

    # thoracic cage and ribs
    cage_r = _fourier_perturb(_polar_radius(_CAGE, _CAGE_CENTRE), rng, 0.02, range(2, 5))
    cage = _polar_depth(u, v, cage_r, (0.0, 0.0), (lung_sx * 1.02, lung_sy * 1.02 + 0.0)) > 0
    a = np.abs(su)
    side = np.where(su > 0, f32(1.0), f32(-1.0))
    n_ribs = 12
    rib_top = rng.uniform(-0.82, -0.74)
    rib_gap = rng.uniform(0.115, 0.135) * lung_sy
    rib_knots = rib_top + rib_gap * np.arange(n_ribs) * (1 + 0.02 * np.arange(n_ribs))
    rib_knots = rib_knots + rng.normal(0, 0.006, n_ribs)
    rise = rng.uniform(0.26, 0.36)
    fall = rng.uniform(0.8, 1.1)
    # posterior rib centre line: v = knot - rise*a + fall*max(a-0.35,0)^2 (up from the spine, then
    # down along the lateral wall); the upper ribs are more curved
    curl = 1 + 1.5 * np.clip(-0.35 - v, 0, 1)
    v_post = v + f32(rise) * a - f32(fall) * curl * np.maximum(a - f32(0.35), 0) ** 2 + f32(0.02) * side * v
    k_post = np.interp(v_post, rib_knots, np.arange(n_ribs), left=-10, right=-10).astype(np.float32)
    fr = k_post - np.rint(k_post)
    widths = rng.uniform(0.32, 0.42, n_ribs).astype(np.float32)
    w_k = widths[np.clip(np.rint(k_post).astype(np.int64), 0, n_ribs - 1)]
    post_band = np.clip(1 - np.abs(fr) / (w_k / 2), 0, 1) * (k_post > -5) * (a > sp_w * 0.6)
    post = post_band > 0
    # anterior ribs: from the lateral wall, running down towards the midline
    slope = rng.uniform(0.5, 0.65)
    v_ant = v - f32(slope) * (f32(0.9) - a) + f32(0.15) * np.maximum(f32(0.45) - a, 0)
    ant_knots = rib_knots[:8] + rib_gap * 0.8 + np.arange(8) * rib_gap * 0.45
    k_ant = np.interp(v_ant, ant_knots, np.arange(8), left=-10, right=-10).astype(np.float32)
    fa = k_ant - np.rint(k_ant)
    ant_band = np.clip(1 - np.abs(fa) / 0.17, 0, 1) * (k_ant > -5) * (a > 0.3)
    ant = ant_band > 0
    ribs = (post | ant) & cage & body
    rib_att = (
        (np.sqrt(post_band) * np.where(post_band < 0.45, f32(1.3), f32(0.7))) * cage
        + 0.45 * np.sqrt(ant_band) * cage * (a > 0.32)
    )

    # clavicles: S-shaped bands from the sternal notch towards the shoulders
    c_med = rng.uniform(-0.62, -0.54)
    c_len = rng.uniform(0.55, 0.68)
    c_up = rng.uniform(0.18, 0.3)
    t_c = (a - 0.07) * f32(1 / c_len)
    t_in = np.clip(t_c, 0, 1)  # rounded caps: distance to the curve's end points beyond [0, 1]
    cv = f32(c_med) - f32(c_up) * t_in + f32(0.035) * np.sin(f32(2 * np.pi) * t_in)
    c_hw = f32(rng.uniform(0.026, 0.034)) + f32(0.01) * np.abs(np.cos(f32(np.pi) * t_in))
    clav_depth = c_hw - np.hypot((t_c - t_in) * f32(c_len), v - cv)
    clavicles = (clav_depth > 0) & body
    clav_att = np.sqrt(np.clip(clav_depth / c_hw, 0, 1)) * (f32(0.55) + f32(0.45) * _smoothstep(t_c * f32(1 / 0.2)))

    # shoulders: humeral heads and faint scapulae at the upper corners
    hum_c = (torso_w + rng.uniform(-0.04, 0.04), shoulder_v + slope * max(torso_w - neck_w, 0) ** 1.5 + rng.uniform(0.1, 0.16))
    hum = np.clip(1 - np.hypot(np.abs(u) - hum_c[0], v - hum_c[1]) / 0.13, 0, 1)
    scap = np.clip(1 - np.abs(au - 0.7 - 0.18 * (v + 0.5)) / 0.12, 0, 1) * _smoothstep((v + 0.65) / 0.15) * _smoothstep(-v / 0.2)

    # --- airways, gastric bubble, breasts ----------------------------------------------------
    carina = np.array([rng.normal(0.0, 0.01), rng.uniform(-0.32, -0.24) * lung_sy])
    r_hilum = np.array([-0.2, rng.uniform(-0.12, -0.04)])
    l_hilum = np.array([0.19, rng.uniform(-0.18, -0.1)])
    # airways live in the upper part of the image: evaluate them on the rows above the hila only
    low = to_image(np.array([[x_, y_] for x_ in (-0.4, 0.4) for y_ in (max(carina[1], r_hilum[1], l_hilum[1]) + 0.1,)]))
    rows = slice(0, int(np.clip(np.ceil((low[:, 1].max() + 1.0) / 2.0 * size + 0.1 * size), 1, size)))
    ur, vr = u[rows], v[rows]
    airway = np.zeros_like(u)
    airway[rows] = np.maximum.reduce([
        np.clip(1 - _segment_distance(ur, vr, (carina[0] - 0.01, -1.1), carina) * f32(1 / 0.04), 0, 1),
        np.clip(1 - _segment_distance(ur, vr, carina, r_hilum + [0.06, 0]) * f32(1 / 0.026), 0, 1),
        np.clip(1 - _segment_distance(ur, vr, carina, l_hilum - [0.06, 0]) * f32(1 / 0.024), 0, 1),
    ])
    bubble = np.zeros_like(u)
    if rng.random() < 0.65:
        bc = (rng.uniform(0.3, 0.45) * lung_sx, (0.48 + rng.uniform(0.05, 0.12)) * lung_sy)
        br = _fourier_perturb(np.full(64, 1.0), rng, 0.1, range(2, 4))
        b_ax = (rng.uniform(0.07, 0.12), rng.uniform(0.04, 0.07))
        box = _image_box(to_image, bc, 1.3 * max(b_ax) + 0.05, size)
        bd = _polar_depth(u[box], v[box], br, bc, b_ax)
        bubble[box] = np.clip(bd * f32(1 / 0.4), 0, 1) * (l_field[box] < 0)
    breasts = np.zeros_like(u)
    if rng.random() < 0.4:
        for sgn in (-1, 1):
            bd = 1 - np.hypot((u - sgn * 0.45) / 0.38, (v - 0.45) / 0.3)
            breasts += np.clip(bd / 0.3, 0, 1) * (v < 0.7)

    # --- vessel markings -------------------------------------------------------------------------
    roots, dirs = [], []
    for hil, sgn in ((r_hilum, -1.0), (l_hilum, 1.0)):
        for ang in (-80, -55, -30, -5, 20, 45, 70, 95):
            a_r = np.deg2rad(ang + rng.normal(0, 8))
            roots.append(hil + rng.normal(0, 0.015, 2))
            dirs.append([sgn * np.cos(a_r), np.sin(a_r)])
    tree = _branching_tree(rng, np.array(roots), np.array(dirs), 6, 0.12, 0.016, spread=(0.3, 0.6), shrink=0.78)
    flat = to_image(np.concatenate([np.concatenate([a, b]) for a, b, _ in tree]))
    tree_img, at = [], 0
    for a, _b, w in tree:
        k = a.shape[0]
        tree_img.append((flat[at : at + k], flat[at + k : at + 2 * k], w))
        at += 2 * k
    to_idx = lambda p: (p[:, ::-1] + 1.0) / 2.0 * size - 0.5  # noqa: E731  (x, y) -> (row, col)
    thick = _splat_segments(tree_img[:3], (size, size), to_idx, 0.75 * px)
    thin = _splat_segments(tree_img[3:], (size, size), to_idx, 0.75 * px)
    # parenchymal texture: white noise blurred together with the thin vessels
    noise_tex = rng.standard_normal((size, size), dtype=np.float32)
    vessels = ndi.gaussian_filter(thick, 1.3 * size / 256) / 0.016 * 1.0
    thin_tex = ndi.gaussian_filter(thin * f32(0.7 / 0.016) + noise_tex * f32(0.3), 0.8 * size / 256)
    vessels += thin_tex
    hila = np.exp(-((u - float(r_hilum[0])) ** 2 + (v - float(r_hilum[1])) ** 2) / 0.006) + np.exp(
        -((u - float(l_hilum[0])) ** 2 + (v - float(l_hilum[1])) ** 2) / 0.005
    )

    # --- projection ------------------------------------------------------------------------------
    r_air = np.clip(r_field / edge + 0.5, 0, 1) * (0.3 + 0.7 * _smoothstep(r_field / f32(0.16)))
    l_air = np.clip(l_field / edge + 0.5, 0, 1) * (0.3 + 0.7 * _smoothstep(l_field / f32(0.16)))
    heart_soft = np.clip(h_depth / edge + 0.5, 0, 1) * (0.5 + 0.5 * _smoothstep(h_depth / f32(0.1)))
    air = np.maximum(r_air, l_air) * (1 - 0.85 * heart_soft) * body_soft
    lung_area = np.maximum(r_air, l_air)
    abdomen = thickness * _smoothstep((v - f32(0.3 * lung_sy)) / f32(0.35)) * (1 - lung_area)
    see_through = 0.35 + 0.65 * lung_area * (1 - 0.85 * heart_soft)  # display compression: bone contrast is low over dense areas
    att = (
        thickness
        - 0.55 * air
        + 0.08 * heart_soft
        + 0.06 * abdomen
        + 0.12 * spine_att * (spine_depth > -edge) * (0.5 + 0.5 * see_through)
        + 0.14 * rib_att * body_soft * see_through
        + 0.3 * clav_att * body_soft
        + 0.4 * hum * body_soft
        + 0.05 * scap * body_soft
        - 0.2 * airway * body_soft
        - 0.3 * bubble
        + 0.1 * breasts * body_soft
        + lung_area * (1 - 0.7 * heart_soft) * (0.1 * np.clip(vessels, -0.3, 1.2) + 0.1 * hila)
    )
    att = att * f32(rng.uniform(0.92, 1.08))
    # tone curve (sigmoid around a random level, normalised so that air -> 0), then gamma
    level = rng.uniform(0.55, 0.65)
    contrast = rng.uniform(3.2, 4.2)
    lo = 1.0 / (1.0 + np.exp(contrast * level))
    hi = 1.0 / (1.0 + np.exp(-contrast * (1.2 - level)))
    img = (1.0 / (1.0 + np.exp(f32(-contrast) * (att - f32(level)))) - f32(lo)) / f32(hi - lo)
    bias = np.exp(_waves_on_grid(_random_waves(rng, 0.07, 4, (0.2, 0.8)), coords, coords))
    img = np.clip(img * bias, 0, 1) ** f32(rng.uniform(0.85, 1.2))
    noise_sd = rng.uniform(0.006, 0.02)
    img = img + rng.standard_normal((size, size), dtype=np.float32) * f32(noise_sd) * (0.4 + img)
    if rng.random() < 0.5:  # a side marker in an upper corner
        img = _draw_marker(img, rng, "L" if rng.random() < 0.5 else "R")
    img = np.clip(img, 0.0, 1.0).astype(np.float32)

    masks = {
        "left_lung": left_lung,
        "right_lung": right_lung,
        "heart": heart,
        "spine": spine,
        "ribs": ribs,
        "clavicles": clavicles,
        "body": body,
    }
    spacing = 400.0 / size
    return {
        "image": img,
        "masks": {k: np.ascontiguousarray(m, dtype=bool) for k, m in masks.items()},
        "structures": CXR_STRUCTURES,
        "spacing": (spacing, spacing),
        "seed": int(seed),
        "params": {"cardiomegaly": bool(cardiomegaly), "arms": bool(arms), "rotation_deg": float(np.rad2deg(angle))},
    }


_GLYPHS = {
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
}


def _draw_marker(img: np.ndarray, rng: np.random.Generator, letter: str) -> np.ndarray:
    """Burn a bright lead side marker (a framed 5x7 letter) into an upper corner of ``img``."""
    size = img.shape[0]
    cell = max(1, size // 128)
    glyph = np.array([[c == "1" for c in row] for row in _GLYPHS[letter]], dtype=np.float32)
    mark = np.pad(np.kron(glyph, np.ones((cell, cell), np.float32)), 2 * cell)
    mark[:cell, :] = mark[-cell:, :] = mark[:, :cell] = mark[:, -cell:] = 1.0
    h, w = mark.shape
    r0 = int(rng.integers(size // 32, size // 10))
    off = int(rng.integers(size // 32, size // 10))
    c0 = off if rng.random() < 0.5 else size - w - off
    out = img.copy()
    out[r0 : r0 + h, c0 : c0 + w] = np.maximum(out[r0 : r0 + h, c0 : c0 + w], np.float32(0.95) * mark)
    return out


def _image_box(
    to_image: Callable[[np.ndarray], np.ndarray], centre: Sequence[float], half: float, size: int
) -> tuple[slice, slice]:
    """Row/column slices of the image region that holds a canonical square ``centre +- half``."""
    c = np.asarray(centre, dtype=np.float64)
    corners = to_image(np.array([c + [dx, dy] for dx in (-half, half) for dy in (-half, half)]))
    lo = np.floor((corners.min(0) + 1.0) / 2.0 * size).astype(int) - 2
    hi = np.ceil((corners.max(0) + 1.0) / 2.0 * size).astype(int) + 2
    lo, hi = np.clip(lo, 0, size), np.clip(hi, 0, size)
    return slice(lo[1], max(lo[1], hi[1])), slice(lo[0], max(lo[0], hi[0]))


# ----------------------------------------------------------------------------------------------
# Chest CT
# ----------------------------------------------------------------------------------------------

_CT_Z_CENTRE = -10.0
"""World z (mm) of the volume centre; the canonical anatomy has the lung apices near +135 mm and
the diaphragm domes near -70 mm."""

_CT_DEFAULT_FOV = (384.0, 384.0, 336.0)
"""Field of view (x, y, z) in mm used when ``spacing`` is not given."""


def ct_geometry(shape: Sequence[int], spacing: Sequence[float]) -> dict[str, np.ndarray]:
    """World coordinates of a phantom CT grid.

    Args:
        shape: array shape ``(nz, ny, nx)``.
        spacing: ``(sx, sy, sz)`` in mm.

    Returns:
        ``{"x": (nx,), "y": (ny,), "z": (nz,)}`` voxel-centre coordinates in mm (DICOM LPS) and
        ``"affine"``: the 4x4 RAS affine of the ``(x, y, z)``-ordered array (NIfTI / MONAI), i.e.
        ``diag(-sx, -sy, sz)`` with origin ``(-x[0], -y[0], z[0])``.

    Example::

        >>> g = ct_geometry((96, 96, 96), (4.0, 4.0, 3.5))
        >>> g["affine"][:3, :3].diagonal().tolist()
        [-4.0, -4.0, 3.5]
    """
    nz, ny, nx = (int(s) for s in shape)
    sx, sy, sz = (float(s) for s in spacing)
    x = (np.arange(nx) - (nx - 1) / 2.0) * sx
    y = (np.arange(ny) - (ny - 1) / 2.0) * sy
    z = (np.arange(nz) - (nz - 1) / 2.0) * sz + _CT_Z_CENTRE
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [-x[0], -y[0], z[0]]
    return {"x": x, "y": y, "z": z, "affine": affine}


class _CTFrame:
    """Canonical anatomy coordinates of every voxel of a CT grid under a random pose.

    ``canonical = lin^-1 (world - shift) + D(world)`` with ``D`` a smooth random displacement
    (sum of plane waves). ``U, V, W`` are float32 ``(nz, ny, nx)`` canonical x, y, z in mm.
    """

    def __init__(self, shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        geo = ct_geometry(self.shape, self.spacing)
        self.x, self.y, self.z = geo["x"], geo["y"], geo["z"]
        self.affine = geo["affine"]
        roll = np.deg2rad(rng.normal(0.0, 2.5))
        tilt = np.deg2rad(rng.normal(0.0, 1.5))
        rz = np.array([[np.cos(roll), -np.sin(roll), 0], [np.sin(roll), np.cos(roll), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
        scale = np.array([rng.uniform(0.88, 1.1), rng.uniform(0.88, 1.12), rng.uniform(0.92, 1.08)])
        self.lin = rz @ rx @ np.diag(scale)
        self.inv = np.linalg.inv(self.lin)
        self.shift = np.array([rng.normal(0, 6.0), rng.normal(0, 6.0), rng.normal(0, 8.0)])
        amp = rng.uniform(3.0, 7.0)
        self.waves = [self._random_waves3(rng, amp) for _ in range(3)]
        self.margin = 3.0 * amp + 4.0
        xb, yb, zb = self.x[None, None, :], self.y[None, :, None], self.z[:, None, None]
        xs, ys, zs = xb - self.shift[0], yb - self.shift[1], zb - self.shift[2]
        coords = []
        for row, waves in zip(self.inv, self.waves):
            c = (row[0] * xs + row[1] * ys + row[2] * zs).astype(np.float32)
            coords.append(c + self._waves3_on_grid(waves))
        self.U, self.V, self.W = coords

    @staticmethod
    def _random_waves3(rng: np.random.Generator, amp: float, n: int = 3) -> np.ndarray:
        d = rng.normal(size=(n, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        k = 2 * np.pi / rng.uniform(120.0, 320.0, n)
        return np.concatenate([d * k[:, None], rng.uniform(0, 2 * np.pi, (n, 1)), rng.normal(0, amp / np.sqrt(n), (n, 1))], 1)

    def _waves3_on_grid(self, waves: np.ndarray) -> np.ndarray:
        out = np.zeros(self.shape, dtype=np.float32)
        for kx, ky, kz, ph, am in waves:
            yz = ky * self.y[None, :] + kz * self.z[:, None] + ph
            s2, c2 = np.sin(yz).astype(np.float32), np.cos(yz).astype(np.float32)
            sx, cx = np.sin(kx * self.x).astype(np.float32), np.cos(kx * self.x).astype(np.float32)
            out += np.float32(am) * (s2[:, :, None] * cx[None, None, :] + c2[:, :, None] * sx[None, None, :])
        return out

    def to_world(self, pts: np.ndarray) -> np.ndarray:
        """Canonical ``(k, 3)`` points -> world LPS mm (first-order inverse of the warp)."""
        pts = np.atleast_2d(np.asarray(pts, dtype=np.float64))
        w = pts @ self.lin.T + self.shift
        d = np.stack([sum(am * np.sin(w @ np.array([kx, ky, kz]) + ph) for kx, ky, kz, ph, am in wv) for wv in self.waves], 1)
        return (pts - d) @ self.lin.T + self.shift

    def to_index(self, pts: np.ndarray) -> np.ndarray:
        """Canonical ``(k, 3)`` points -> float voxel indices ``(k, 3)`` in ``(z, y, x)`` order."""
        w = self.to_world(pts)
        origin = np.array([self.x[0], self.y[0], self.z[0]])
        return ((w - origin) / self.spacing)[:, ::-1]

    def bbox(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice]:
        """Index slices ``(z, y, x)`` covering the canonical box ``lo``..``hi`` (mm), with margin."""
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])], float)
        w = corners @ self.lin.T + self.shift
        origin = np.array([self.x[0], self.y[0], self.z[0]])
        i_lo = np.floor((w.min(0) - self.margin - origin) / self.spacing).astype(int)
        i_hi = np.ceil((w.max(0) + self.margin - origin) / self.spacing).astype(int) + 1
        n = np.array(self.shape[::-1])
        i_lo, i_hi = np.clip(i_lo, 0, n), np.clip(i_hi, 0, n)
        return (slice(i_lo[2], i_hi[2]), slice(i_lo[1], i_hi[1]), slice(i_lo[0], i_hi[0]))

    def sub(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.U[sl], self.V[sl], self.W[sl]


def _tube_depth(
    frame: _CTFrame, depth: np.ndarray, p0: Sequence[float], p1: Sequence[float], r0: float, r1: float | None = None
) -> None:
    """Max-accumulate ``radius(t) - distance`` of a tapered tube ``p0``-``p1`` (canonical mm) into ``depth``."""
    r1 = r0 if r1 is None else r1
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    pad = max(r0, r1) + 2.0
    sl = frame.bbox(np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad)
    if any(s.stop <= s.start for s in sl):
        return
    u, v, w = frame.sub(sl)
    a = p1 - p0
    t = np.clip(((u - p0[0]) * a[0] + (v - p0[1]) * a[1] + (w - p0[2]) * a[2]) * (1.0 / float(a @ a)), 0.0, 1.0)
    dist = np.sqrt((u - (p0[0] + t * a[0])) ** 2 + (v - (p0[1] + t * a[1])) ** 2 + (w - (p0[2] + t * a[2])) ** 2)
    np.maximum(depth[sl], (r0 + (r1 - r0) * t) - dist, out=depth[sl])


def _polyline(frame: _CTFrame, depth: np.ndarray, points: Sequence[Sequence[float]], radii: Sequence[float]) -> None:
    for i in range(len(points) - 1):
        _tube_depth(frame, depth, points[i], points[i + 1], radii[i], radii[i + 1])


def _ellipsoid_q(
    u: np.ndarray, v: np.ndarray, w: np.ndarray, centre: Sequence[float], axes: Sequence[float], rot: np.ndarray
) -> np.ndarray:
    """Normalised ellipsoid radius (``< 1`` inside) of points in an ellipsoid rotated by ``rot``."""
    du, dv, dw = u - float(centre[0]), v - float(centre[1]), w - float(centre[2])
    q2 = np.zeros(u.shape, dtype=np.float32)
    for row, ax in zip(rot.T, axes):  # local coordinate = rot^T @ d
        q2 += ((float(row[0]) * du + float(row[1]) * dv + float(row[2]) * dw) * (1.0 / float(ax))) ** 2
    return np.sqrt(q2)


def _rotation(rng: np.random.Generator, yaw_deg: float, pitch_deg: float, roll_deg: float = 0.0) -> np.ndarray:
    a, b, c = np.deg2rad([yaw_deg, pitch_deg, roll_deg])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


def nodule_malignancy(diameter_mm: float, spiculation: float, lobulation: float, calcified: bool) -> int:
    """Malignancy rating 1..5 of a phantom nodule (LIDC-like scale, 1 = highly unlikely, 5 = highly suspicious).

    ``score = 1 + 2.2 * clip((diameter_mm - 4) / 20, 0, 1.25) + 1.4 * spiculation + 0.8 * lobulation``
    rounded half up and clipped to 1..5; a calcified nodule is rated 1 (benign calcification).
    ``spiculation`` and ``lobulation`` are in [0, 1]. So the rating grows with size, spiculation and
    margin irregularity (lobulation).

    Example::

        >>> nodule_malignancy(5.0, 0.0, 0.0, False), nodule_malignancy(28.0, 0.9, 0.8, False)
        (1, 5)
    """
    if calcified:
        return 1
    score = 1.0 + 2.2 * float(np.clip((diameter_mm - 4.0) / 20.0, 0.0, 1.25)) + 1.4 * spiculation + 0.8 * lobulation
    return int(np.clip(np.floor(score + 0.5), 1, 5))


def synth_ct(
    seed: int,
    shape: tuple[int, int, int] = (96, 96, 96),
    spacing: Sequence[float] | None = None,
    nodules: int | None = None,
) -> dict[str, Any]:
    """Generate one phantom chest CT (HU) with organ masks and lung nodules.

    Array order is numpy ``(z, y, x)``: slice, row, column in DICOM patient space (LPS): ``x``
    grows towards the patient's left, ``y`` towards posterior, ``z`` towards the head. An axial
    slice ``image[k]`` is therefore shown in radiological convention as is (anterior up, patient's
    right on the left). Writers transpose to ``(x, y, z)`` and use ``affine`` (RAS).

    Anatomy: body with subcutaneous fat, chest wall, ribs (inclined bands, cortical rim), spine
    (vertebral bodies with discs, canal, posterior arch), sternum; lungs bounded by the rib cage,
    apical domes, diaphragm domes (right higher), mediastinum, heart (rotated ellipsoid with blood
    pool and pericardial fat), aorta, SVC, pulmonary arteries, trachea and main/lobar bronchi,
    branching pulmonary vessels; liver, stomach (with gas) and spleen below the diaphragm.
    A random pose and smooth displacement field vary every shape. HU: air -1000, lung about
    -850 with texture and a posterior density gradient, fat -100, soft tissue 40, blood 40-60,
    bone 400-1000, Gaussian-correlated noise; values are rounded to integers in [-1024, 3071].

    Nodules: ``nodules`` of them (default: 1-3 at random) inside the lungs; each has a diameter
    3-30 mm, lobulation and spiculation in [0, 1], maybe calcification, and a ``malignancy``
    1..5 given by :func:`nodule_malignancy` (grows with size, spiculation and lobulation).

    Args:
        seed: any int; the same seed gives bit-identical output.
        shape: array shape ``(nz, ny, nx)``.
        spacing: ``(sx, sy, sz)`` mm; default: a 384 x 384 x 336 mm field of view over ``shape``.
        nodules: number of nodules, or None for 1-3.

    Returns:
        dict with ``image`` float32 ``(nz, ny, nx)`` HU; ``masks``: bool ``(nz, ny, nx)`` for
        ``body`` and CT_STRUCTURES; ``nodules``: int16 label map (0 background, k = nodule k);
        ``nodule_records``: list of dicts (``label``, ``centre_index_zyx``, ``centre_voxel_xyz``,
        ``centre_mm_lps``, ``centre_mm_ras``, ``diameter_mm``, ``volume_mm3``, ``spiculation``,
        ``lobulation``, ``calcified``, ``malignancy``, ``side``); ``spacing`` ``(sx, sy, sz)``;
        ``affine`` (RAS, for the ``(x, y, z)`` array); ``structures``; ``seed``.

    Example::

        >>> ct = synth_ct(0, shape=(48, 48, 48))
        >>> ct["image"].shape, bool(ct["masks"]["left_lung"].any())
        ((48, 48, 48), True)
    """
    rng = np.random.default_rng(int(seed))
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes >= 8, got {shape}")
    if spacing is None:
        spacing = tuple(f / n for f, n in zip(_CT_DEFAULT_FOV, shape[::-1]))
    spacing = tuple(float(s) for s in spacing)
    f32 = np.float32
    fr = _CTFrame(shape, spacing, rng)
    U, V, W = fr.U, fr.V, fr.W

    # --- body, fat, chest wall, thoracic cavity ------------------------------------------------
    A = rng.uniform(150.0, 175.0)
    B = rng.uniform(100.0, 120.0)
    yb = rng.uniform(-5.0, 10.0)
    fat_t = rng.uniform(6.0, 24.0)
    wall_t = rng.uniform(16.0, 22.0)
    back = rng.uniform(0.8, 0.9) * B
    Vb = V - f32(yb)
    q_body = np.hypot(U * f32(1 / A), Vb * f32(1 / B))
    body = (q_body < 1) & (Vb < back)
    q_fat = np.hypot(U * f32(1 / (A - fat_t)), Vb * f32(1 / (B - fat_t)))
    inner = (q_fat < 1) & (Vb < back - fat_t)
    narrow = 1 - f32(0.22) * _smoothstep((W - f32(30)) * f32(1 / 110))
    Ac, Bc = A - fat_t - wall_t, B - fat_t - wall_t
    q_cav = np.hypot(U / (f32(Ac) * narrow), Vb / (f32(Bc) * narrow))
    cavity = q_cav < 1

    # --- landmarks -------------------------------------------------------------------------------
    z_apex = rng.uniform(112.0, 132.0)
    z_dome_r = rng.uniform(-75.0, -45.0)
    z_dome_l = z_dome_r - rng.uniform(8.0, 25.0)
    z_carina = z_apex - rng.uniform(55.0, 75.0)
    rv = rng.uniform(16.0, 20.0)  # vertebral body radius
    yv = yb + Bc - rv * 0.6  # vertebral body centre (protrudes into the cavity)
    yt = yv - rv - rng.uniform(20.0, 26.0)  # trachea (in front of oesophagus and spine)
    m0 = rng.uniform(10.0, 16.0)  # half-width of the mediastinum at the junction lines

    # --- heart -------------------------------------------------------------------------------------
    cardiomegaly = rng.random() < 0.15
    hs = rng.uniform(1.15, 1.35) if cardiomegaly else rng.uniform(0.88, 1.08)
    h_axes = np.array([rng.uniform(55, 66) * hs, rng.uniform(42, 50) * hs, rng.uniform(45, 55) * min(hs, 1.15)])
    h_centre = np.array([rng.uniform(12, 30), yb - rng.uniform(25, 40), z_dome_l + rng.uniform(38, 50)])
    h_rot = _rotation(rng, -rng.uniform(30, 50), rng.uniform(10, 25))
    h_floor = 0.5 * (z_dome_l + z_dome_r) - rng.uniform(0, 10)
    ext = h_axes.max() * 1.25 + 8
    h_sl = fr.bbox(h_centre - ext, h_centre + ext)
    hu, hv, hw = fr.sub(h_sl)
    h_q = _ellipsoid_q(hu, hv, hw, h_centre, h_axes, h_rot)
    for _ in range(3):  # smooth random bumps
        k = rng.normal(size=3)
        k *= rng.uniform(0.04, 0.08) / np.linalg.norm(k)
        h_q = h_q * (1 + f32(rng.uniform(0.03, 0.07)) * np.sin(
            (hu - f32(h_centre[0])) * f32(k[0]) + (hv - f32(h_centre[1])) * f32(k[1]) + (hw - f32(h_centre[2])) * f32(k[2])
            + f32(rng.uniform(0, 2 * np.pi))
        ))
    h_mean = float(h_axes.mean())
    heart = np.zeros(shape, bool)
    heart[h_sl] = (h_q < 1) & (hw > h_floor)
    heart_excl = np.zeros(shape, bool)
    heart_excl[h_sl] = (h_q < 1 + 6.0 / h_mean) & (hw > h_floor - 6)

    # --- mediastinal tubes: aorta, SVC, pulmonary arteries, oesophagus, airways ------------------
    z_lo = float(W.min()) - 40
    z_hi = float(W.max()) + 40
    big = f32(-1e3)
    vasc = np.full(shape, big, dtype=np.float32)
    r_ao = rng.uniform(12.0, 16.0)
    top_h = h_centre + h_rot @ np.array([-0.2, 0.3, 0.75]) * h_axes
    _polyline(
        fr,
        vasc,
        [top_h, (4, yt - 24, z_carina + 8), (12, yt - 2, z_carina + 26), (rv + 10, yv - 6, z_carina + 6), (rv + 6, yv - 8, z_lo)],
        [r_ao, r_ao, r_ao * 0.92, r_ao * 0.85, r_ao * 0.8],
    )
    _polyline(fr, vasc, [(-m0 - 10, yt - 16, z_hi), (-m0 - 6, yt - 16, h_centre[2] + 30)], [9.0, 9.0])  # SVC
    pa_root = h_centre + h_rot @ np.array([0.35, -0.45, 0.6]) * h_axes
    pa_bif = np.array([10.0, yt - 6, z_carina - 18])
    r_hil = np.array([-m0 - 32, yt + 6, z_carina - 30])
    l_hil = np.array([m0 + 34, yt + 10, z_carina - 20])
    _polyline(fr, vasc, [pa_root, pa_bif], [12.0, 11.0])
    _polyline(fr, vasc, [pa_bif, r_hil], [9.0, 7.0])
    _polyline(fr, vasc, [pa_bif, l_hil], [9.0, 7.0])
    oes = np.full(shape, big, dtype=np.float32)
    _polyline(fr, oes, [(-4, yv - rv - 8, z_hi), (-2, yv - rv - 8, z_dome_l - 10)], [7.0, 7.0])

    airway = np.full(shape, big, dtype=np.float32)
    r_tr = rng.uniform(7.5, 10.0)
    carina = np.array([0.0, yt, z_carina])
    _tube_depth(fr, airway, (0.0, yt - 4, z_hi), carina, r_tr, r_tr)
    rb_end = np.array([-m0 - 24, yt + 8, z_carina - 22])
    lb_end = np.array([m0 + 30, yt + 12, z_carina - 42])
    _tube_depth(fr, airway, carina, rb_end, r_tr * 0.8, r_tr * 0.7)
    _tube_depth(fr, airway, carina, lb_end, r_tr * 0.7, r_tr * 0.6)
    for end, sgn in ((rb_end, -1.0), (lb_end, 1.0)):
        for d in ((sgn * 0.5, 0.1, 0.85), (sgn * 0.45, 0.25, -0.85), (sgn * 0.8, -0.4, -0.3)):
            dv = np.asarray(d) / np.linalg.norm(d)
            child = end + dv * rng.uniform(18, 28)
            _tube_depth(fr, airway, end, child, r_tr * 0.5, r_tr * 0.4)
    airways = (airway > 0) & body
    airway_wall = (airway > -1.8) & ~airways

    # --- lungs -----------------------------------------------------------------------------------
    def side_lung(sign: float, z_dome: float) -> np.ndarray:
        x_ap, y_ap = sign * rng.uniform(55, 75), yb + rng.uniform(5, 35)
        r_apx, r_apy = rng.uniform(45, 65), rng.uniform(100, 150)  # apical dome curvature (lateral, AP)
        x_d, y_d = sign * rng.uniform(55, 80), yb + rng.uniform(-25, 5)
        rdx, rdy = rng.uniform(70, 110), rng.uniform(70, 110)
        su = U * f32(sign)
        top = f32(z_apex) - (U - f32(x_ap)) ** 2 * f32(1 / (2 * r_apx)) - (V - f32(y_ap)) ** 2 * f32(1 / (2 * r_apy))
        bot = f32(z_dome) - (U - f32(x_d)) ** 2 * f32(1 / (2 * rdx)) - (V - f32(y_d)) ** 2 * f32(1 / (2 * rdy))
        return (su > 0) & (W < top) & (W > bot)

    m_half = f32(m0) + f32(rng.uniform(8, 16)) * np.clip(1 - ((V - f32(yt + 5)) * f32(1 / 45)) ** 2, 0, 1)
    spine_zone = ((U**2 + (V - f32(yv)) ** 2) < (rv + 9) ** 2) | ((np.abs(U) < rv + 6) & (V > yv))
    free = cavity & body & (np.abs(U) > m_half) & ~spine_zone & ~heart_excl & (vasc < -4) & (airway < -3) & (oes < -3)
    right_lung = free & side_lung(-1.0, z_dome_r)
    left_lung = free & side_lung(1.0, z_dome_l)

    # --- pulmonary vessels: branching trees from the hila ----------------------------------------
    roots, dirs = [], []
    for hil, sgn in ((r_hil, -1.0), (l_hil, 1.0)):
        for d in ((0.3, 0.0, 1.0), (0.8, -0.3, 0.5), (1.0, 0.1, 0.0), (0.7, 0.5, -0.5), (0.4, -0.4, -0.9), (0.5, 0.6, -0.8), (0.6, -0.8, 0.1)):
            roots.append(hil + rng.normal(0, 3, 3))
            dirs.append(np.array([sgn * d[0], d[1], d[2]]) + rng.normal(0, 0.15, 3))
    tree = _branching_tree(rng, np.array(roots), np.array(dirs), 9, 26.0, 5.5, spread=(0.5, 0.9), shrink=0.84, width_shrink=0.8)
    vox = float(np.prod(spacing)) ** (1 / 3)
    step = 0.5 * min(spacing)
    groups = (tree[:2], tree[2:4], tree[4:])
    vess = np.zeros(shape, np.float32)
    for grp in groups:
        # splat cross-section area per unit length / voxel area, then blur by the vessel radius
        seg = [(s, e, float(np.pi * w**2 / vox**2)) for s, e, w in grp]
        dens = _splat_segments(seg, shape, fr.to_index, step) * (step / vox)
        sigma = max(0.6, 0.8 * grp[0][2] / vox)
        vess += ndi.gaussian_filter(dens, sigma / np.asarray(spacing[::-1]) * vox, truncate=3.0)
    lungs = right_lung | left_lung
    vessel_frac = np.clip(vess, 0, 1) * lungs
    vessels = vessel_frac > 0.35

    # --- nodules ---------------------------------------------------------------------------------
    n_nod = int(rng.integers(1, 4)) if nodules is None else int(nodules)
    nod_map = np.zeros(shape, np.int16)
    records = _place_nodules(rng, fr, n_nod, right_lung, left_lung, nod_map)

    # --- HU composition --------------------------------------------------------------------------
    texture = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.0)
    img = np.full(shape, -1000.0, dtype=np.float32)
    img[body] = -100.0 + rng.uniform(-10, 10)  # subcutaneous fat
    img[inner] = 40.0 + rng.uniform(-5, 10)  # chest-wall muscle
    img[cavity & inner] = -85.0  # mediastinal / abdominal fat
    # abdomen below the domes: liver (right), stomach with gas, spleen (left)
    abd = cavity & inner & ~right_lung & ~left_lung & (W < f32(max(z_dome_r, z_dome_l) + 5))
    liver = abd & (U < f32(rng.uniform(20, 45))) & (W < f32(z_dome_r + 2))
    img[abd] = 35.0
    img[liver] = 58.0 + rng.uniform(-5, 8)
    st_c = np.array([rng.uniform(50, 70), yb - rng.uniform(10, 30), z_dome_l - rng.uniform(30, 45)])
    st_sl = fr.bbox(st_c - 50, st_c + 50)
    su_, sv_, sw_ = fr.sub(st_sl)
    st_q = _ellipsoid_q(su_, sv_, sw_, st_c, (rng.uniform(35, 48), rng.uniform(32, 42), rng.uniform(35, 45)), np.eye(3))
    stomach = (st_q < 1) & abd[st_sl] & ~liver[st_sl]
    gas_level = st_c[2] + rng.uniform(5, 25)
    sub_img = img[st_sl]
    sub_img[stomach] = 20.0
    sub_img[stomach & (sw_ > gas_level)] = -1000.0
    sp_c = np.array([rng.uniform(75, 95), yb + rng.uniform(35, 60), z_dome_l - rng.uniform(25, 40)])
    sp_sl = fr.bbox(sp_c - 50, sp_c + 50)
    pu, pv, pw = fr.sub(sp_sl)
    spleen = (_ellipsoid_q(pu, pv, pw, sp_c, (22, 40, 42), _rotation(rng, 30, 0)) < 1) & abd[sp_sl]
    img[sp_sl][spleen] = 48.0

    # bones: ribs (inclined bands in the chest wall), spine, sternum
    ribs = _ct_ribs(rng, U, Vb, W, Ac, Bc, narrow, z_apex, inner)
    img[ribs == 1] = 300.0 + rng.uniform(-50, 80)
    img[ribs == 2] = 750.0 + rng.uniform(-100, 150)
    spine = _ct_spine(rng, fr, img, yv, rv, inner)

    # lungs with texture and a posterior (dependent) density gradient
    lung_hu = (
        f32(rng.uniform(-870, -830))
        + f32(rng.uniform(15, 45)) * np.clip(Vb * f32(1 / Bc), -1, 1)
        + f32(rng.uniform(12, 25)) * texture
    )
    img = np.where(lungs, lung_hu, img)
    img += vessel_frac * (f32(45.0) - img) * lungs

    # heart: myocardium, blood pool, pericardial fat
    h_img = img[h_sl]
    h_reg = heart[h_sl]
    h_img[(heart_excl[h_sl]) & ~h_reg & ~lungs[h_sl]] = -95.0
    h_img[h_reg] = 38.0 + rng.uniform(-4, 6)
    h_img[h_reg & (h_q < rng.uniform(0.65, 0.8))] = 50.0 + rng.uniform(-5, 8)
    img[(vasc > 0) & ~heart] = 45.0 + rng.uniform(-5, 8)
    img[oes > 0] = 38.0
    img[airway_wall & ((vasc < 0) | lungs)] = 45.0
    img[airways] = -1000.0 + 30.0 * np.abs(texture[airways])

    # nodules: solid soft tissue, or calcified (bright)
    for rec in records:
        k = rec["label"]
        val = 450.0 if rec["calcified"] else rng.uniform(15.0, 45.0)
        img[nod_map == k] = val

    # table under the patient
    if rng.random() < 0.8:
        t_y = yb + back + rng.uniform(8, 20)
        table = (V > f32(t_y)) & (V < f32(t_y + 6)) & (np.abs(U) < f32(A * 0.9)) & ~body
        img[table] = 150.0

    noise = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 0.7) * f32(rng.uniform(10.0, 30.0) * 2.2)
    img = np.clip(np.rint(img + noise), -1024, 3071).astype(np.float32)

    masks = {
        "body": body,
        "left_lung": left_lung,
        "right_lung": right_lung,
        "heart": heart & body,
        "airways": airways,
        "vessels": vessels,
        "spine": spine,
        "ribs": ribs > 0,
    }
    return {
        "image": img,
        "masks": masks,
        "nodules": nod_map,
        "nodule_records": records,
        "structures": CT_STRUCTURES,
        "spacing": spacing,
        "affine": fr.affine,
        "seed": int(seed),
        "params": {"cardiomegaly": bool(cardiomegaly)},
    }


def _ct_ribs(
    rng: np.random.Generator,
    U: np.ndarray,
    Vb: np.ndarray,
    W: np.ndarray,
    Ac: float,
    Bc: float,
    narrow: np.ndarray,
    z_apex: float,
    inner: np.ndarray,
) -> np.ndarray:
    """Rib label volume: 0 none, 1 marrow, 2 cortex. Ribs are bands on the cage that drop anteriorly."""
    f32 = np.float32
    out = np.zeros(U.shape, np.uint8)
    rib_off = rng.uniform(5.0, 8.0)
    q_in = np.hypot(U / (f32(Ac + 1) * narrow), Vb / (f32(Bc + 1) * narrow))
    q_out = np.hypot(U / (f32(Ac + 2 * rib_off) * narrow), Vb / (f32(Bc + 2 * rib_off) * narrow))
    band = (q_in > 1) & (q_out < 1) & inner
    idx = np.nonzero(band)
    u, v, w = U[idx], Vb[idx], W[idx]
    rho = np.hypot(u, v) + f32(1e-3)
    cos_post = v / rho  # 1 at the back, -1 at the front
    drop = f32(rng.uniform(110, 150)) * (1 - cos_post) * f32(0.5)
    gap = rng.uniform(22.0, 27.0)
    top = z_apex + rng.uniform(0, 12)
    k = (f32(top) - (w + drop)) * f32(1 / gap)
    frac = k - np.floor(k)
    thick = f32(rng.uniform(0.34, 0.44))
    rib = (frac < thick) & (k > 0) & (k < 12) & (cos_post > -0.85)
    # radial position inside the band: cortex at the band's edges and at the rib's upper/lower borders
    t_rad = (q_out[idx] - 1) / (q_out[idx] - q_in[idx] + f32(1e-6))  # 0 outer .. 1 inner (approx)
    cortex = (np.abs(frac - thick / 2) > thick / 2 - f32(0.09)) | (np.abs(t_rad - 0.5) > 0.3)
    out[idx] = np.where(rib, np.where(cortex, 2, 1), 0).astype(np.uint8)
    return out


def _ct_spine(
    rng: np.random.Generator, fr: _CTFrame, img: np.ndarray, yv: float, rv: float, inner: np.ndarray
) -> np.ndarray:
    """Paint vertebrae (body, discs, canal, arch, processes) into ``img``; return the spine mask."""
    f32 = np.float32
    sl = fr.bbox((-rv - 45, yv - rv - 10, -1e3), (rv + 45, yv + rv + 70, 1e3))
    u, v, w = fr.sub(sl)
    dv = v - f32(yv)
    r = np.hypot(u, dv)
    period = rng.uniform(24.0, 28.0)
    ph = (w - f32(rng.uniform(0, period))) * f32(1 / period)
    frac = ph - np.floor(ph)
    disc = frac > 0.82
    vbody = r < rv
    canal_y = rv + 9.0
    rc = np.hypot(u, dv - f32(canal_y))
    canal = rc < 7.0
    arch = (rc >= 7.0) & (rc < 12.5) & (dv > rv - 2)
    spinous = (np.abs(u) < 4.0) & (dv > canal_y + 8) & (dv < canal_y + 38) & (frac < 0.6)
    transverse = (np.abs(dv - f32(canal_y - 2)) < 5.0) & (np.abs(u) > 8) & (np.abs(u) < 34) & (frac < 0.5)
    bone = (vbody & ~disc) | arch | spinous | transverse
    bone &= inner[sl]
    sub = img[sl]
    sub[vbody & disc] = 85.0
    sub[bone] = 380.0 + rng.uniform(-40, 60)
    sub[vbody & ~disc & (r > rv - 3.0)] = 800.0 + rng.uniform(-100, 150)
    sub[(arch | spinous | transverse) & inner[sl]] = 650.0
    sub[canal & inner[sl]] = 15.0
    mask = np.zeros(img.shape, bool)
    mask[sl] = bone | (vbody & disc)
    return mask


def _place_nodules(
    rng: np.random.Generator,
    fr: _CTFrame,
    n: int,
    right_lung: np.ndarray,
    left_lung: np.ndarray,
    nod_map: np.ndarray,
) -> list[dict[str, Any]]:
    """Draw ``n`` nodules into ``nod_map`` (labels 1..n) inside the lungs and return their records."""
    records: list[dict[str, Any]] = []
    if n <= 0:
        return records
    lungs = right_lung | left_lung
    cand = np.flatnonzero(lungs)
    if cand.size == 0:
        return records
    spacing = fr.spacing  # (sx, sy, sz)
    sp_zyx = spacing[::-1]
    dirs = np.array([[a, b, c] for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)], float)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origin = np.array([fr.x[0], fr.y[0], fr.z[0]])
    placed: list[tuple[np.ndarray, float]] = []
    for k in range(1, n + 1):
        m = rng.beta(1.3, 1.3)
        diameter = float(np.clip((4.0 + 24.0 * m**1.2) * rng.uniform(0.8, 1.15), 3.0, 30.0))
        spic = float(np.clip(1.4 * m - 0.45 + rng.normal(0, 0.15), 0, 1))
        lob = float(np.clip(m + rng.normal(0, 0.2), 0, 1))
        calcified = bool(m < 0.35 and rng.random() < 0.35)
        centre = None
        for _attempt in range(200):
            if _attempt and _attempt % 50 == 0:
                diameter = max(3.0, diameter * 0.75)
            c_idx = np.array(np.unravel_index(cand[rng.integers(cand.size)], lungs.shape), float)  # (z, y, x)
            probe = np.rint(c_idx + dirs * (diameter / 2 + 3.0) / sp_zyx).astype(int)
            if (probe < 0).any() or (probe >= np.array(lungs.shape)).any():
                continue
            inside = lungs[tuple(probe.T)]
            if not inside.all():
                continue
            c_mm = origin + c_idx[::-1] * spacing
            if any(np.linalg.norm(c_mm - p) < (diameter + d) / 2 + 6 for p, d in placed):
                continue
            centre = c_idx
            break
        if centre is None:
            break
        c_mm = origin + centre[::-1] * spacing  # LPS
        placed.append((c_mm, diameter))
        r0 = diameter / 2
        reach = r0 * (1.6 + 1.2 * spic) + 2 * spacing.max()
        lo = np.maximum(np.floor(centre - reach / sp_zyx).astype(int), 0)
        hi = np.minimum(np.ceil(centre + reach / sp_zyx).astype(int) + 1, np.array(lungs.shape))
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        zz, yy, xx = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij")
        d = np.stack([(xx - centre[2]) * spacing[0], (yy - centre[1]) * spacing[1], (zz - centre[0]) * spacing[2]], -1)
        rho = np.linalg.norm(d, axis=-1)
        unit = d / np.maximum(rho, 1e-6)[..., None]
        radius = np.full(rho.shape, r0)
        for _ in range(3):  # lobulation: smooth bumps around random axes
            ax = rng.normal(size=3)
            ax /= np.linalg.norm(ax)
            order = int(rng.integers(2, 5))
            radius += r0 * 0.18 * lob * np.cos(order * np.arccos(np.clip(unit @ ax, -1, 1)) + rng.uniform(0, 2 * np.pi))
        n_sp = int(round(spic * 14))
        if n_sp:
            sp_dirs = rng.normal(size=(n_sp, 3))
            sp_dirs /= np.linalg.norm(sp_dirs, axis=1, keepdims=True)
            ang = np.arccos(np.clip(unit @ sp_dirs.T, -1, 1))  # (..., n_sp)
            width = rng.uniform(0.12, 0.22, n_sp)
            length = r0 * rng.uniform(0.4, 1.2, n_sp) * spic + 0.6 * spacing.max()
            radius += np.max(length * np.clip(1 - ang / width, 0, 1) ** 2, axis=-1)
        region = (rho <= radius) & lungs[sl] & (nod_map[sl] == 0)
        region[tuple(np.clip(np.rint(centre - lo).astype(int), 0, np.array(region.shape) - 1))] = True
        nod_map[sl][region] = k
        side = "right" if right_lung[tuple(np.rint(centre).astype(int))] else "left"
        ras = np.array([-c_mm[0], -c_mm[1], c_mm[2]])
        records.append(
            {
                "label": k,
                "centre_index_zyx": [int(round(c)) for c in centre],
                "centre_voxel_xyz": [int(round(c)) for c in centre[::-1]],
                "centre_mm_lps": [round(float(c), 2) for c in c_mm],
                "centre_mm_ras": [round(float(c), 2) for c in ras],
                "diameter_mm": round(diameter, 2),
                "volume_mm3": round(float(region.sum() * np.prod(spacing)), 1),
                "spiculation": round(spic, 3),
                "lobulation": round(lob, 3),
                "calcified": calcified,
                "malignancy": nodule_malignancy(diameter, spic, lob, calcified),
                "side": side,
            }
        )
    return records


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------

_PARAMS_FILE = ".synth.json"
_DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
_CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage


def _tmp_path(path: Path) -> Path:
    """A unique temporary name next to ``path`` that keeps its extension (for nibabel)."""
    return path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary name in the same folder, then rename onto ``path``."""
    tmp = _tmp_path(path)
    try:
        write(tmp)
        if tmp.is_dir() and path.is_dir():  # a folder cannot replace a non-empty folder: swap it out
            old = _tmp_path(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def _atomic_json(path: Path, obj: Any) -> None:
    _atomic(path, lambda p: p.write_text(json.dumps(obj, indent=1) + "\n"))


def _save_png(path: Path, array: np.ndarray, compress_level: int = 3) -> None:
    from PIL import Image

    _atomic(path, lambda p: Image.fromarray(array).save(p, format="PNG", compress_level=compress_level))


def _validation_indices(n: int, val_fraction: float) -> set[int]:
    """Cases ``i`` with ``floor((i + 1) f) > floor(i f)``: evenly spread and independent of ``n``."""
    from fractions import Fraction

    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    f = Fraction(val_fraction).limit_denominator(10_000)
    return {i for i in range(n) if ((i + 1) * f).__floor__() > (i * f).__floor__()}


def _check_params(out_dir: Path, params: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix cases generated with other settings into ``out_dir`` (unless ``overwrite``)."""
    path = out_dir / _PARAMS_FILE
    if path.exists() and not overwrite:
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(path, f"unreadable generator settings ({exc}); delete it or pass overwrite=True") from exc
        if old != params:
            diff = {k: (old.get(k), params.get(k)) for k in sorted(set(old) | set(params)) if old.get(k) != params.get(k)}
            raise DataError(
                path, f"folder was generated with other settings {diff} (old, new); use another folder or overwrite=True"
            )
    _atomic_json(path, params)


def _clean_tmp(*folders: Path, min_age_s: float = 600.0) -> None:
    """Remove temporaries left by an interrupted run (older than ``min_age_s``, so that a run
    going on in parallel, e.g. another rank, keeps its own)."""
    import time

    now = time.time()
    for folder in folders:
        for p in folder.glob(".tmp-*"):
            try:
                if now - p.stat().st_mtime < min_age_s:
                    continue
            except FileNotFoundError:
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _run_cases(fn: Callable[..., dict[str, Any]], jobs: list[tuple], workers: int, progress: bool, desc: str) -> list[dict]:
    """Run ``fn(*job)`` for every job, in ``workers`` processes; results in job order."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=desc, unit="case")
    results: list[dict] = []
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(fn(*job))
                if bar is not None:
                    bar.update(1)
        else:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                chunk = max(1, min(16, len(jobs) // (4 * workers)))
                for res in pool.map(fn, *zip(*jobs), chunksize=chunk):
                    results.append(res)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


def _dicom_base(case_id: str, modality: str, sop_class: str, uid_seed: str):
    """A pydicom Dataset with patient/study/series modules filled in deterministically."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[uid_seed, "frame"])
    ds.PatientName = f"SYNTH^{case_id}"
    ds.PatientID = f"SYNTH-{case_id}"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "medspan synthetic phantom"
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def _write_dicom(path: Path, ds) -> None:
    from pydicom import dcmwrite

    _atomic(path, lambda p: dcmwrite(p, ds, enforce_file_format=True))


def _cxr_case_paths(case_id: str, fmt: str) -> dict[str, str]:
    ext = "png" if fmt == "png" else "dcm"
    paths = {"image": f"images/{case_id}.{ext}"}
    for name in (*CXR_STRUCTURES, "body"):
        paths[name] = f"masks/{case_id}_{name}.png"
    return paths


def _write_cxr_case(out_dir: str, index: int, seed: int, size: int, fmt: str, bit_depth: int, force: bool) -> dict[str, Any]:
    out = Path(out_dir)
    case_id = f"cxr_{index:04d}"
    paths = _cxr_case_paths(case_id, fmt)
    if force or not all((out / p).exists() for p in paths.values()):
        case = synth_cxr(seed, size)
        for name in (*CXR_STRUCTURES, "body"):
            _save_png(out / paths[name], case["masks"][name].astype(np.uint8) * np.uint8(255), compress_level=1)
        img = case["image"]
        if fmt == "png":
            arr = np.rint(img * 255.0).astype(np.uint8) if bit_depth == 8 else np.rint(img * 65535.0).astype(np.uint16)
            _save_png(out / paths["image"], arr)
        else:
            ds = _dicom_base(case_id, "DX", _DX_SOP_CLASS, f"medspan-cxr-{seed}")
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(f"medspan-cxr-{seed}", "image")
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.ViewPosition = "PA"
            ds.PatientOrientation = ["L", "F"]  # columns run to the patient's left, rows to the feet
            ds.InstanceNumber = 1
            ds.Rows, ds.Columns = img.shape
            ds.PixelSpacing = ds.ImagerPixelSpacing = [f"{case['spacing'][1]:.6g}", f"{case['spacing'][0]:.6g}"]
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.WindowCenter, ds.WindowWidth = 32768, 65536
            ds.PresentationLUTShape = "IDENTITY"
            ds.PixelData = np.rint(img * 65535.0).astype("<u2").tobytes()
            _write_dicom(out / paths["image"], ds)
    return {
        "image": paths["image"],
        "label": [paths[s] for s in CXR_STRUCTURES],
        "body": paths["body"],
        "case_id": case_id,
        "seed": int(seed),
    }


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=list(parts)))


def write_cxr_dataset(
    out_dir: str | os.PathLike,
    n: int,
    size: int = 256,
    seed: int = 0,
    fmt: str = "png",
    val_fraction: float = 0.2,
    workers: int = 1,
    bit_depth: int = 8,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``n`` phantom CXRs, one PNG mask per structure and a MONAI datalist.

    Layout under ``out_dir``: ``images/cxr_0000.png`` (grayscale, ``bit_depth`` 8 or 16) or
    ``images/cxr_0000.dcm`` (DX, MONOCHROME2, 16-bit, PixelSpacing, deterministic UIDs),
    ``masks/cxr_0000_<structure>.png`` (uint8 0/255, also ``_body``), and ``dataset.json``::

        {"name": ..., "modality": "CXR", "structures": [...], "spacing": [sx, sy],
         "training": [{"image": "images/cxr_0000.png", "label": ["masks/cxr_0000_left_lung.png", ...],
                       "body": "masks/cxr_0000_body.png", "case_id": "cxr_0000", "seed": ...}],
         "validation": [...], "test": []}

    Paths are relative to the datalist. Case ``i`` uses ``case_seed(seed, i)``; it is in the
    validation split when ``floor((i + 1) * val_fraction) > floor(i * val_fraction)``. Every file
    is written atomically; a re-run with the same settings skips complete cases (settings are kept
    in ``.synth.json``; other settings raise :class:`DataError` unless ``overwrite``).

    Returns:
        the path of ``dataset.json``.

    Example::

        >>> dl = write_cxr_dataset("/tmp/cxr", n=4, size=128)  # doctest: +SKIP
    """
    if fmt not in ("png", "dicom"):
        raise ValueError(f"fmt must be 'png' or 'dicom', got {fmt!r}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out_dir)
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    _clean_tmp(out, out / "images", out / "masks")
    params = {"kind": "cxr", "version": _GENERATOR_VERSION, "size": int(size), "seed": int(seed), "format": fmt}
    if fmt == "png":
        params["bit_depth"] = int(bit_depth)
    _check_params(out, params, overwrite)
    jobs = [(str(out), i, case_seed(seed, i), int(size), fmt, int(bit_depth), bool(overwrite)) for i in range(n)]
    entries = _run_cases(_write_cxr_case, jobs, workers, progress, "synth cxr")
    val = _validation_indices(n, val_fraction)
    spacing = 400.0 / size
    datalist = {
        "name": "medspan synthetic chest X-rays",
        "description": "phantom PA chest radiographs (medspan.data.synthetic.synth_cxr); masks follow the SCR convention",
        "modality": "CXR",
        "structures": list(CXR_STRUCTURES),
        "spacing": [spacing, spacing],
        "generator": params,
        "training": [e for i, e in enumerate(entries) if i not in val],
        "validation": [e for i, e in enumerate(entries) if i in val],
        "test": [],
    }
    path = out / "dataset.json"
    _atomic_json(path, datalist)
    return path


def _ct_case_paths(case_id: str, fmt: str) -> dict[str, str]:
    paths = {"image": f"images/{case_id}.nii.gz" if fmt == "nifti" else f"images/{case_id}"}
    for name in (*CT_STRUCTURES, "body"):
        paths[name] = f"masks/{case_id}_{name}.nii.gz"
    paths["nodule_label"] = f"masks/{case_id}_nodules.nii.gz"
    paths["records"] = f"masks/{case_id}_nodules.json"
    return paths


def _save_nifti(path: Path, array_zyx: np.ndarray, affine: np.ndarray, dtype: type) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array_zyx.transpose(2, 1, 0), dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_slope_inter(1.0, 0.0)
    _atomic(path, lambda p: nib.save(img, str(p)))


def _write_ct_series(folder: Path, case: dict[str, Any], case_id: str, seed: int) -> None:
    """One DICOM file per axial slice (CT Image Storage, HU = stored - 1024), written atomically as a folder."""
    image = case["image"]
    nz, ny, nx = image.shape
    sx, sy, sz = case["spacing"]
    geo = ct_geometry(image.shape, case["spacing"])
    stored = (np.rint(image) + 1024).astype("<u2")
    uid_seed = f"medspan-ct-{seed}"

    def write(tmp: Path) -> None:
        from pydicom import dcmwrite

        tmp.mkdir(parents=True)
        for k in range(nz):
            ds = _dicom_base(case_id, "CT", _CT_SOP_CLASS, uid_seed)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(uid_seed, "slice", str(k))
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [f"{geo['x'][0]:.4f}", f"{geo['y'][0]:.4f}", f"{geo['z'][k]:.4f}"]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.SliceLocation = f"{geo['z'][k]:.4f}"
            ds.SliceThickness = f"{sz:.6g}"
            ds.SpacingBetweenSlices = f"{sz:.6g}"
            ds.PixelSpacing = [f"{sy:.6g}", f"{sx:.6g}"]  # row spacing, column spacing
            ds.PatientPosition = "HFS"
            ds.Rows, ds.Columns = ny, nx
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
            ds.WindowCenter, ds.WindowWidth = -600, 1600
            ds.KVP = 120
            ds.PixelData = stored[k].tobytes()
            dcmwrite(tmp / f"{k:04d}.dcm", ds, enforce_file_format=True)

    _atomic(folder, write)


def _write_ct_case(
    out_dir: str, index: int, seed: int, shape: tuple[int, int, int], spacing: tuple[float, ...] | None,
    nodules: int | None, fmt: str, force: bool,
) -> dict[str, Any]:
    out = Path(out_dir)
    case_id = f"ct_{index:04d}"
    paths = _ct_case_paths(case_id, fmt)
    if force or not all((out / p).exists() for p in paths.values()):
        case = synth_ct(seed, shape, spacing, nodules)
        aff = case["affine"]
        for name in (*CT_STRUCTURES, "body"):
            _save_nifti(out / paths[name], case["masks"][name], aff, np.uint8)
        _save_nifti(out / paths["nodule_label"], case["nodules"], aff, np.uint8 if len(case["nodule_records"]) < 256 else np.int16)
        if fmt == "nifti":
            _save_nifti(out / paths["image"], case["image"], aff, np.int16)
        else:
            _write_ct_series(out / paths["image"], case, case_id, seed)
        records = case["nodule_records"]
        _atomic_json(out / paths["records"], records)
    else:
        records = json.loads((out / paths["records"]).read_text())
    return {
        "image": paths["image"],
        "label": [paths[s] for s in CT_STRUCTURES],
        "body": paths["body"],
        "nodule_label": paths["nodule_label"],
        "nodules": records,
        "case_id": case_id,
        "seed": int(seed),
    }


def write_ct_dataset(
    out_dir: str | os.PathLike,
    n: int,
    shape: tuple[int, int, int] = (96, 96, 96),
    seed: int = 0,
    fmt: str = "nifti",
    spacing: Sequence[float] | None = None,
    nodules: int | None = None,
    val_fraction: float = 0.2,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``n`` phantom chest CTs with masks, nodule labels and a MONAI datalist.

    ``shape`` is the :func:`synth_ct` array shape ``(nz, ny, nx)``; ``spacing`` is ``(sx, sy, sz)``
    mm. Files hold the usual ``(x, y, z)`` arrays:

    * ``images/ct_0000.nii.gz``: int16 HU, RAS affine ``diag(-sx, -sy, sz)`` (LPS axes, qform =
      sform, code 1); or ``images/ct_0000/`` a DICOM series (CT Image Storage, one file per slice,
      ImagePositionPatient / ImageOrientationPatient ``[1,0,0,0,1,0]``, 12-bit stored values with
      RescaleIntercept -1024, RescaleSlope 1, deterministic UIDs).
    * ``masks/ct_0000_<structure>.nii.gz``: uint8 0/1 for CT_STRUCTURES and ``body``;
      ``masks/ct_0000_nodules.nii.gz``: nodule label map (0 background, k = nodule k);
      ``masks/ct_0000_nodules.json``: the nodule records.
    * ``dataset.json``: like :func:`write_cxr_dataset`, with ``"modality": "CT"``, ``"spacing":
      [sx, sy, sz]`` and per entry ``"nodule_label"`` and ``"nodules"`` (records: ``label``,
      ``centre_voxel_xyz``, ``centre_mm_ras``, ``centre_mm_lps``, ``diameter_mm``, ``malignancy``, ...).

    Atomic writes, re-runs skip complete cases, case ``i`` uses ``case_seed(seed, i)``.

    Returns:
        the path of ``dataset.json``.
    """
    if fmt not in ("nifti", "dicom"):
        raise ValueError(f"fmt must be 'nifti' or 'dicom', got {fmt!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    shape = tuple(int(s) for s in shape)
    if spacing is None:
        spacing = tuple(f / s for f, s in zip(_CT_DEFAULT_FOV, shape[::-1]))
    spacing = tuple(float(s) for s in spacing)
    out = Path(out_dir)
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    _clean_tmp(out, out / "images", out / "masks")
    params = {
        "kind": "ct", "version": _GENERATOR_VERSION, "shape_zyx": list(shape), "spacing_xyz": list(spacing),
        "seed": int(seed), "format": fmt, "nodules": nodules,
    }
    _check_params(out, params, overwrite)
    jobs = [(str(out), i, case_seed(seed, i), shape, spacing, nodules, fmt, bool(overwrite)) for i in range(n)]
    entries = _run_cases(_write_ct_case, jobs, workers, progress, "synth ct")
    val = _validation_indices(n, val_fraction)
    datalist = {
        "name": "medspan synthetic chest CTs",
        "description": "phantom chest CTs in HU (medspan.data.synthetic.synth_ct); nodule malignancy 1..5 "
        "from size, spiculation and lobulation (see nodule_malignancy)",
        "modality": "CT",
        "structures": list(CT_STRUCTURES),
        "spacing": list(spacing),
        "shape": list(shape[::-1]),
        "generator": params,
        "training": [e for i, e in enumerate(entries) if i not in val],
        "validation": [e for i, e in enumerate(entries) if i in val],
        "test": [],
    }
    path = out / "dataset.json"
    _atomic_json(path, datalist)
    return path
