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
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from medspan.errors import DataError

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
    (0.91, 0.45), (0.88, 0.70), (0.6, 0.66), (0.0, 0.62), (-0.6, 0.64), (-0.88, 0.68), (-0.91, 0.45), (-0.89, 0.10),
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
    du = (u - centre[0]) / scale[0]
    dv = (v - centre[1]) / scale[1]
    rho = np.hypot(du, dv)
    theta = np.arctan2(dv, du)
    n = radius.shape[0]
    grid = -np.pi + 2.0 * np.pi * np.arange(n) / n
    r = np.interp(theta, grid, radius, period=2.0 * np.pi).astype(u.dtype)
    return (r - rho) * np.float32(min(scale))


def _segment_distance(u: np.ndarray, v: np.ndarray, p0: Sequence[float], p1: Sequence[float]) -> np.ndarray:
    """Euclidean distance of points ``(u, v)`` to the segment ``p0``-``p1``."""
    ax, ay = float(p1[0] - p0[0]), float(p1[1] - p0[1])
    denom = ax * ax + ay * ay
    t = np.clip(((u - p0[0]) * ax + (v - p0[1]) * ay) / denom, 0.0, 1.0)
    return np.hypot(u - (p0[0] + t * ax), v - (p0[1] + t * ay))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndi.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _smooth_field_2d(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, amp: float, n_waves: int, freq: tuple[float, float]
) -> np.ndarray:
    """Sum of ``n_waves`` random plane waves (a cheap smooth random field), float32."""
    out = np.zeros(np.broadcast_shapes(x.shape, y.shape), dtype=np.float32)
    for _ in range(n_waves):
        f = rng.uniform(*freq)
        a = rng.uniform(0, 2 * np.pi)
        out += np.float32(rng.normal(0.0, amp)) * np.sin(
            np.float32(np.pi * f) * (np.float32(np.cos(a)) * x + np.float32(np.sin(a)) * y) + np.float32(rng.uniform(0, 2 * np.pi))
        )
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
        segments.append((pts, ends, width * 0.72**g))
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
    """Accumulate points sampled along segments into a grid (weights = width**2 per unit length).

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
        out += np.bincount(flat, weights=lengths * width**2, minlength=out.size)
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
    wave_seed = rng.integers(0, 2**31)
    disp_amp = rng.uniform(0.01, 0.025)

    def displacement(px_: np.ndarray, py_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng(wave_seed)
        return (
            _smooth_field_2d(r, px_, py_, disp_amp, 3, (0.4, 1.2)),
            _smooth_field_2d(r, px_, py_, disp_amp, 3, (0.4, 1.2)),
        )

    dx, dy = displacement(x, y)
    xs, ys = x - f32(shift[0]), y - f32(shift[1])
    u = f32(inv[0, 0]) * xs + f32(inv[0, 1]) * ys + dx
    v = f32(inv[1, 0]) * xs + f32(inv[1, 1]) * ys + dy

    def to_image(pts: np.ndarray) -> np.ndarray:
        """canonical (k, 2) -> image normalised coords (k, 2), first-order inverse of the warp."""
        p = pts @ fwd.T + shift
        ddx, ddy = displacement(p[:, 0].astype(np.float32), p[:, 1].astype(np.float32))
        return (pts - np.stack([ddx, ddy], 1)) @ fwd.T + shift

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
    half_w = half_w * (1 + _smooth_field_2d(rng, u * 0, v, 0.012, 2, (0.5, 1.5)))
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

    def lung_field(points, centre, side_amp):
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
    k_post = np.interp(v_post, rib_knots, np.arange(n_ribs), left=-10, right=-10)
    fr = k_post - np.rint(k_post)
    widths = rng.uniform(0.32, 0.42, n_ribs)
    w_k = widths[np.clip(np.rint(k_post).astype(np.int64), 0, n_ribs - 1)]
    post_band = np.clip(1 - np.abs(fr) / (w_k / 2), 0, 1) * (k_post > -5) * (a > sp_w * 0.6)
    post = post_band > 0
    # anterior ribs: from the lateral wall, running down towards the midline
    slope = rng.uniform(0.5, 0.65)
    v_ant = v - f32(slope) * (f32(0.9) - a) + f32(0.15) * np.maximum(f32(0.45) - a, 0)
    ant_knots = rib_knots[:8] + rib_gap * 0.8 + np.arange(8) * rib_gap * 0.45
    k_ant = np.interp(v_ant, ant_knots, np.arange(8), left=-10, right=-10)
    fa = k_ant - np.rint(k_ant)
    ant_band = np.clip(1 - np.abs(fa) / 0.17, 0, 1) * (k_ant > -5) * (a > 0.3)
    ant = ant_band > 0
    ribs = (post | ant) & cage & body
    rib_att = (
        (np.sqrt(post_band) * (0.7 + 0.6 * (post_band < 0.45))) * cage
        + 0.45 * np.sqrt(ant_band) * cage * (a > 0.32)
    )

    # clavicles: S-shaped bands from the sternal notch towards the shoulders
    c_med = rng.uniform(-0.62, -0.54)
    c_len = rng.uniform(0.55, 0.68)
    c_up = rng.uniform(0.18, 0.3)
    t_c = (a - 0.07) / c_len
    cv = c_med - c_up * t_c + 0.035 * np.sin(2 * np.pi * t_c)
    c_hw = 0.026 + 0.01 * np.abs(np.cos(np.pi * t_c))
    clav_depth = np.minimum(c_hw - np.abs(v - cv), np.minimum(t_c, 1 - t_c) * c_len)
    clavicles = (clav_depth > 0) & body
    clav_att = np.sqrt(np.clip(clav_depth / c_hw, 0, 1))

    # shoulders: humeral heads and faint scapulae at the upper corners
    hum_c = (torso_w + rng.uniform(-0.04, 0.04), shoulder_v + slope * max(torso_w - neck_w, 0) ** 1.5 + rng.uniform(0.1, 0.16))
    hum = np.clip(1 - np.hypot(np.abs(u) - hum_c[0], v - hum_c[1]) / 0.13, 0, 1)
    scap = np.clip(1 - np.abs(np.abs(u) - 0.7 - 0.18 * (v + 0.5)) / 0.12, 0, 1) * (v > -0.6) * (v < 0.0)

    # --- airways, gastric bubble, breasts ----------------------------------------------------
    carina = np.array([rng.normal(0.0, 0.01), rng.uniform(-0.32, -0.24) * lung_sy])
    trach = np.clip(1 - _segment_distance(u, v, (carina[0] - 0.01, -1.1), carina) / 0.04, 0, 1)
    r_hilum = np.array([-0.2, rng.uniform(-0.12, -0.04)])
    l_hilum = np.array([0.19, rng.uniform(-0.18, -0.1)])
    bronchi = np.maximum(
        np.clip(1 - _segment_distance(u, v, carina, r_hilum + [0.06, 0]) / 0.026, 0, 1),
        np.clip(1 - _segment_distance(u, v, carina, l_hilum - [0.06, 0]) / 0.024, 0, 1),
    )
    airway = np.maximum(trach, bronchi)
    bubble = np.zeros_like(u)
    if rng.random() < 0.65:
        bc = (rng.uniform(0.3, 0.45) * lung_sx, (0.48 + rng.uniform(0.05, 0.12)) * lung_sy)
        br = _fourier_perturb(np.full(64, 1.0), rng, 0.1, range(2, 4))
        bd = _polar_depth(u, v, br, bc, (rng.uniform(0.07, 0.12), rng.uniform(0.04, 0.07)))
        bubble = np.clip(bd / 0.4, 0, 1) * (l_field < 0)
    breasts = np.zeros_like(u)
    if rng.random() < 0.4:
        for sgn in (-1, 1):
            bd = 1 - np.hypot((u - sgn * 0.45) / 0.38, (v - 0.45) / 0.3)
            breasts += np.clip(bd / 0.3, 0, 1) * (v < 0.7)

    # --- vessel markings -------------------------------------------------------------------------
    roots, dirs = [], []
    for hil, sgn in ((r_hilum, -1.0), (l_hilum, 1.0)):
        for ang in (-70, -30, 10, 50, 85):
            a_r = np.deg2rad(ang + rng.normal(0, 10))
            roots.append(hil + rng.normal(0, 0.015, 2))
            dirs.append([sgn * np.cos(a_r), np.sin(a_r)])
    tree = _branching_tree(rng, np.array(roots), np.array(dirs), 6, 0.13, 0.02)
    tree_img = [(to_image(s), to_image(e), w) for s, e, w in tree]
    to_idx = lambda p: (p[:, ::-1] + 1.0) / 2.0 * size - 0.5  # noqa: E731  (x, y) -> (row, col)
    thick = _splat_segments(tree_img[:3], (size, size), to_idx, 0.5 * px)
    thin = _splat_segments(tree_img[3:], (size, size), to_idx, 0.5 * px)
    vessels = ndi.gaussian_filter(thick, 1.6 * size / 256) / (0.02**2) * 0.6
    vessels += ndi.gaussian_filter(thin, 0.8 * size / 256) / (0.02**2) * 0.9
    hila = np.exp(-((u - r_hilum[0]) ** 2 + (v - r_hilum[1]) ** 2) / 0.006) + np.exp(
        -((u - l_hilum[0]) ** 2 + (v - l_hilum[1]) ** 2) / 0.005
    )

    # --- projection ------------------------------------------------------------------------------
    r_air = np.clip(r_field / edge + 0.5, 0, 1) * (0.3 + 0.7 * _smoothstep(r_field / f32(0.16)))
    l_air = np.clip(l_field / edge + 0.5, 0, 1) * (0.3 + 0.7 * _smoothstep(l_field / f32(0.16)))
    heart_soft = np.clip(h_depth / edge + 0.5, 0, 1) * (0.5 + 0.5 * _smoothstep(h_depth / f32(0.1)))
    air = np.maximum(r_air, l_air) * (1 - 0.6 * heart_soft) * body_soft
    lung_area = np.maximum(r_air, l_air)
    texture = ndi.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 1.2 * size / 256)
    att = (
        thickness
        - 0.55 * air
        + 0.06 * heart_soft
        + 0.12 * spine_att * (spine_depth > -edge)
        + 0.09 * rib_att * body_soft
        + 0.2 * clav_att * body_soft
        + 0.4 * hum * body_soft
        + 0.05 * scap * body_soft
        - 0.2 * airway * body_soft
        - 0.3 * bubble
        + 0.1 * breasts * body_soft
        + lung_area * (0.12 * np.clip(vessels, 0, 1.5) + 0.1 * hila + 0.03 * texture)
    )
    att = att * f32(rng.uniform(0.92, 1.08))
    # tone curve (sigmoid around a random level, normalised so that air -> 0), then gamma
    level = rng.uniform(0.55, 0.65)
    contrast = rng.uniform(3.2, 4.2)
    lo = 1.0 / (1.0 + np.exp(contrast * level))
    hi = 1.0 / (1.0 + np.exp(-contrast * (1.2 - level)))
    img = (1.0 / (1.0 + np.exp(f32(-contrast) * (att - f32(level)))) - f32(lo)) / f32(hi - lo)
    bias = np.exp(_smooth_field_2d(rng, x, y, 0.07, 4, (0.2, 0.8)))
    img = np.clip(img * bias, 0, 1) ** f32(rng.uniform(0.85, 1.2))
    noise_sd = rng.uniform(0.006, 0.02)
    img = img + rng.standard_normal((size, size)).astype(np.float32) * f32(noise_sd) * (0.4 + img)
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


def _draw_marker(img: np.ndarray, rng: np.random.Generator, letter: str) -> np.ndarray:
    """Burn a bright lead-marker letter into an upper corner of ``img`` (float32, [0, 1])."""
    from PIL import Image, ImageDraw

    size = img.shape[0]
    box = max(8, size // 16)
    tile = Image.new("L", (box, box), 0)
    draw = ImageDraw.Draw(tile)
    draw.rectangle((0, 0, box - 1, box - 1), outline=255)
    draw.text((box // 4, box // 8), letter, fill=255)
    mark = np.asarray(tile, dtype=np.float32) / 255.0
    r0 = int(rng.integers(size // 32, size // 10))
    c0 = int(rng.integers(size // 32, size // 10)) if rng.random() < 0.5 else size - box - int(rng.integers(size // 32, size // 10))
    out = img.copy()
    out[r0 : r0 + box, c0 : c0 + box] = np.maximum(out[r0 : r0 + box, c0 : c0 + box], 0.95 * mark)
    return out
