"""Phantom chest X-rays with organ masks (:func:`synth_cxr`).

``image`` and masks are numpy ``(rows, cols)`` arrays, shown as a PA radiograph: the patient's right
lung is on the image left, the patient's left lung and the heart are towards the image right, the
head is at row 0. Every generator is a pure function of its seed.
"""


from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from medspan.data.synthetic.shapes import (
    branching_tree,
    fourier_perturb,
    largest_component,
    polar_depth,
    polar_radius,
    random_waves,
    segment_distance,
    smooth_circular,
    smoothstep,
    splat_segments,
    waves_at,
    waves_on_grid,
)

CXR_STRUCTURES: tuple[str, ...] = ("left_lung", "right_lung", "heart", "spine", "ribs", "clavicles")
"""Order of the CXR label channels (``label`` list of a datalist entry)."""

CXR_FINDINGS: tuple[str, ...] = ("cardiomegaly", "nodule", "effusion", "pneumothorax")
"""The findings :func:`synth_cxr` records per case in ``params["findings"]`` (classification labels)."""

CXR_GENERATOR_VERSION = 3
"""Version of the CXR phantom's image content, recorded by the writers (1: no findings but
cardiomegaly; 2: nodule, effusion and pneumothorax added; 3: the three made larger so a classifier
trained on a few hundred 128-px phantoms learns them). A folder written by another version is
refused, so cases of two versions are never mixed."""

FINDING_PREVALENCE = 0.25
"""Probability of each of ``nodule``, ``effusion``, ``pneumothorax`` (independent draws; cardiomegaly: 0.2)."""

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

def synth_cxr(seed: int, size: int = 256, findings: bool = True) -> dict[str, Any]:
    """Generate one phantom PA chest radiograph with its structure masks and findings.

    The anatomy is built from smooth analytic shapes in a canonical frame (lung fields and heart
    as Fourier-perturbed polar contours, rib families as curved bands, spine, clavicles,
    trachea, shoulders), evaluated on a pixel grid warped by a random affine pose and a smooth
    random displacement field. Intensities follow a projection model (soft-tissue thickness
    minus lung air plus bone and vessel attenuation), then a tone curve, a multiplicative bias
    field, gamma and noise.

    Masks follow the SCR convention: lung masks exclude the heart; left lung, right lung and
    heart are pairwise disjoint. ``ribs`` holds the posterior and anterior rib bands inside the
    thoracic cage, ``body`` the patient's silhouette.

    Findings (:data:`CXR_FINDINGS`), each depending on the anatomy of the case:

    * ``cardiomegaly`` (20%): a wider heart (part of the anatomy draw; the heart mask follows it);
    * ``nodule`` (25%): a round soft-tissue opacity 15-35 mm across, inside one lung field;
    * ``effusion`` (25%): fluid density filling the lateral costophrenic angle of one lung (40-80 mm
      high at the wall, about half that medially: the whole lung base), with a meniscus (higher at the chest wall) and no vessel markings through it;
    * ``pneumothorax`` (25%): a rim of lucency (20-36 mm) without vessel markings along the apex and
      upper lateral edge of one lung, bounded by a thin bright visceral pleural line.

    The last three are drawn from their own random stream (``default_rng([seed, 7])``), so the
    anatomy, the masks and the rest of the image are those of ``findings=False`` for the same
    seed; they change the attenuation (before the tone curve), and with none drawn the image is
    bit-identical to the one without findings. The organ masks stay anatomical: a nodule or an
    effusion does not cut the lung mask, a pneumothorax does not shrink it.

    Args:
        seed: any int >= 0; the same seed gives bit-identical output.
        size: output side in pixels.
        findings: False: no nodule / effusion / pneumothorax (the generator of version 1; all
            three recorded as False; cardiomegaly still drawn).

    Returns:
        ``{"image": float32 (size, size) in [0, 1], "masks": {name: bool (size, size)} for
        CXR_STRUCTURES + ("body",), "structures": CXR_STRUCTURES, "spacing": (mm per column,
        mm per row), "seed": seed, "params": {"cardiomegaly": bool, "findings": {name: bool}
        for CXR_FINDINGS, "finding_details": {name: {...}} of the findings present (``side``
        = the lung, and ``centre_rc`` (pixels) / ``diameter_mm`` of a nodule, ``height_mm`` of
        an effusion, ``depth_mm`` (about: canonical units x 200 mm) of a pneumothorax), "arms": bool,
        "rotation_deg": float}}``.

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
    waves_x = random_waves(rng, disp_amp, 3, (0.4, 1.2))
    waves_y = random_waves(rng, disp_amp, 3, (0.4, 1.2))
    dx, dy = waves_on_grid(waves_x, coords, coords), waves_on_grid(waves_y, coords, coords)
    xs, ys = x - f32(shift[0]), y - f32(shift[1])
    u = f32(inv[0, 0]) * xs + f32(inv[0, 1]) * ys + dx
    v = f32(inv[1, 0]) * xs + f32(inv[1, 1]) * ys + dy

    def to_image(pts: np.ndarray) -> np.ndarray:
        """canonical (k, 2) -> image normalised coords (k, 2), first-order inverse of the warp."""
        p = pts @ fwd.T + shift
        d = np.stack([waves_at(waves_x, p[:, 0], p[:, 1]), waves_at(waves_y, p[:, 0], p[:, 1])], 1)
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
    half_w = half_w * (1 + waves_on_grid(random_waves(rng, 0.012, 2, (0.5, 1.5)), coords, coords))
    body_depth = np.minimum(half_w - au, v - v_top)
    body = body_depth > 0
    body_soft = np.clip(body_depth / edge + 0.5, 0, 1)
    # soft-tissue path length: elliptical cross-section, thinner at the shoulders and neck
    thickness = np.sqrt(np.clip(1.0 - (u / np.maximum(half_w, f32(1e-3))) ** 2, 0, 1))
    thickness *= f32(0.6) + f32(0.4) * smoothstep((v - v_top) / f32(0.25))
    neck = np.sqrt(np.clip(1 - (u / f32(neck_w)) ** 2, 0, 1)) * f32(0.75)
    neck_blend = smoothstep((v - f32(shoulder_v)) / f32(0.2))
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
        r = polar_radius(points, centre)
        r = fourier_perturb(r, rng, side_amp, range(2, 7))
        r = smooth_circular(r, 1.5)
        c = lung_pivot + (np.asarray(centre) - lung_pivot) * [lung_sx, lung_sy]
        sc = (lung_sx * rng.uniform(0.96, 1.04), lung_sy * rng.uniform(0.96, 1.04))
        return polar_depth(u, v, r, c, sc)

    r_field = lung_field(_RIGHT_LUNG, _RIGHT_LUNG_CENTRE, 0.035)
    l_field = lung_field(_LEFT_LUNG, _LEFT_LUNG_CENTRE, 0.035)

    # --- heart -----------------------------------------------------------------------------------
    cardiomegaly = rng.random() < 0.2
    h_sx = rng.uniform(1.12, 1.35) if cardiomegaly else rng.uniform(0.88, 1.08)
    h_sy = rng.uniform(0.92, 1.1)
    h_centre = np.array(_HEART_CENTRE) + rng.normal(0, 0.02, 2) + [0.0, (lung_sy - 1.0) * 0.6]
    hr = fourier_perturb(polar_radius(_HEART, _HEART_CENTRE), rng, 0.03, range(2, 6))
    h_depth = polar_depth(u, v, smooth_circular(hr, 2.0), h_centre, (h_sx * lung_sx, h_sy))
    heart = h_depth > 0

    right_lung = (r_field > 0) & ~heart & body
    left_lung = (l_field > 0) & ~heart & body & ~right_lung
    right_lung = largest_component(right_lung)
    left_lung = largest_component(left_lung)
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
    cage_r = fourier_perturb(polar_radius(_CAGE, _CAGE_CENTRE), rng, 0.02, range(2, 5))
    cage = polar_depth(u, v, cage_r, (0.0, 0.0), (lung_sx * 1.02, lung_sy * 1.02 + 0.0)) > 0
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
    clav_att = np.sqrt(np.clip(clav_depth / c_hw, 0, 1)) * (f32(0.55) + f32(0.45) * smoothstep(t_c * f32(1 / 0.2)))

    # shoulders: humeral heads and faint scapulae at the upper corners
    hum_c = (torso_w + rng.uniform(-0.04, 0.04), shoulder_v + slope * max(torso_w - neck_w, 0) ** 1.5 + rng.uniform(0.1, 0.16))
    hum = np.clip(1 - np.hypot(np.abs(u) - hum_c[0], v - hum_c[1]) / 0.13, 0, 1)
    scap = np.clip(1 - np.abs(au - 0.7 - 0.18 * (v + 0.5)) / 0.12, 0, 1) * smoothstep((v + 0.65) / 0.15) * smoothstep(-v / 0.2)

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
        np.clip(1 - segment_distance(ur, vr, (carina[0] - 0.01, -1.1), carina) * f32(1 / 0.04), 0, 1),
        np.clip(1 - segment_distance(ur, vr, carina, r_hilum + [0.06, 0]) * f32(1 / 0.026), 0, 1),
        np.clip(1 - segment_distance(ur, vr, carina, l_hilum - [0.06, 0]) * f32(1 / 0.024), 0, 1),
    ])
    bubble = np.zeros_like(u)
    if rng.random() < 0.65:
        bc = (rng.uniform(0.3, 0.45) * lung_sx, (0.48 + rng.uniform(0.05, 0.12)) * lung_sy)
        br = fourier_perturb(np.full(64, 1.0), rng, 0.1, range(2, 4))
        b_ax = (rng.uniform(0.07, 0.12), rng.uniform(0.04, 0.07))
        box = _image_box(to_image, bc, 1.3 * max(b_ax) + 0.05, size)
        bd = polar_depth(u[box], v[box], br, bc, b_ax)
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
    tree = branching_tree(rng, np.array(roots), np.array(dirs), 6, 0.12, 0.016, spread=(0.3, 0.6), shrink=0.78)
    flat = to_image(np.concatenate([np.concatenate([a, b]) for a, b, _ in tree]))
    tree_img, at = [], 0
    for a, _b, w in tree:
        k = a.shape[0]
        tree_img.append((flat[at : at + k], flat[at + k : at + 2 * k], w))
        at += 2 * k
    to_idx = lambda p: (p[:, ::-1] + 1.0) / 2.0 * size - 0.5  # (x, y) -> (row, col)
    thick = splat_segments(tree_img[:3], (size, size), to_idx, 0.75 * px)
    thin = splat_segments(tree_img[3:], (size, size), to_idx, 0.75 * px)
    # parenchymal texture: white noise blurred together with the thin vessels
    noise_tex = rng.standard_normal((size, size), dtype=np.float32)
    vessels = ndi.gaussian_filter(thick, 1.3 * size / 256) / 0.016 * 1.0
    thin_tex = ndi.gaussian_filter(thin * f32(0.7 / 0.016) + noise_tex * f32(0.3), 0.8 * size / 256)
    vessels += thin_tex
    hila = np.exp(-((u - float(r_hilum[0])) ** 2 + (v - float(r_hilum[1])) ** 2) / 0.006) + np.exp(
        -((u - float(l_hilum[0])) ** 2 + (v - float(l_hilum[1])) ** 2) / 0.005
    )

    # --- projection ------------------------------------------------------------------------------
    r_air = np.clip(r_field / edge + 0.5, 0, 1) * (0.3 + 0.7 * smoothstep(r_field / f32(0.16)))
    l_air = np.clip(l_field / edge + 0.5, 0, 1) * (0.3 + 0.7 * smoothstep(l_field / f32(0.16)))
    heart_soft = np.clip(h_depth / edge + 0.5, 0, 1) * (0.5 + 0.5 * smoothstep(h_depth / f32(0.1)))
    air = np.maximum(r_air, l_air) * (1 - 0.85 * heart_soft) * body_soft
    lung_area = np.maximum(r_air, l_air)
    abdomen = thickness * smoothstep((v - f32(0.3 * lung_sy)) / f32(0.35)) * (1 - lung_area)
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
    present = {"cardiomegaly": bool(cardiomegaly), "nodule": False, "effusion": False, "pneumothorax": False}
    details: dict[str, dict[str, Any]] = {}
    if findings:
        vessel_term = lung_area * (1 - 0.7 * heart_soft) * (0.1 * np.clip(vessels, -0.3, 1.2) + 0.1 * hila)
        extra, details = _findings_attenuation(
            np.random.default_rng([int(seed), 7]), x, y, u, v, px,
            {"right_lung": (right_lung, r_field, r_air), "left_lung": (left_lung, l_field, l_air)},
            heart_soft, body_soft, vessel_term,
        )
        if extra is not None:
            att = att + extra
        present.update({k: True for k in details})
    att = att * f32(rng.uniform(0.92, 1.08))
    # tone curve (sigmoid around a random level, normalised so that air -> 0), then gamma
    level = rng.uniform(0.55, 0.65)
    contrast = rng.uniform(3.2, 4.2)
    lo = 1.0 / (1.0 + np.exp(contrast * level))
    hi = 1.0 / (1.0 + np.exp(-contrast * (1.2 - level)))
    img = (1.0 / (1.0 + np.exp(f32(-contrast) * (att - f32(level)))) - f32(lo)) / f32(hi - lo)
    bias = np.exp(waves_on_grid(random_waves(rng, 0.07, 4, (0.2, 0.8)), coords, coords))
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
        "params": {
            "cardiomegaly": bool(cardiomegaly),
            "findings": present,
            "finding_details": details,
            "arms": bool(arms),
            "rotation_deg": float(np.rad2deg(angle)),
        },
    }


def _findings_attenuation(
    frng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    px: float,
    lungs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    heart_soft: np.ndarray,
    body_soft: np.ndarray,
    vessel_term: np.ndarray,
) -> tuple[np.ndarray | None, dict[str, dict[str, Any]]]:
    """Attenuation added by the nodule / effusion / pneumothorax findings drawn from ``frng``.

    All draws come first and in a fixed order (three presence flags, then every parameter of
    every finding whether present or not), so each finding's shape depends only on the seed.
    ``x, y`` are the image coordinates in ``[-1, 1]`` (one unit = 200 mm), ``u, v`` the canonical
    ones; ``lungs`` maps each lung to ``(mask, field depth, soft air)`` arrays ``(rows, cols)``.

    Returns:
        ``(float32 (rows, cols) added to the attenuation or None when no finding is present,
        {finding: details})``.
    """
    f32 = np.float32
    size = x.shape[0]
    flags = frng.random(3) < FINDING_PREVALENCE
    sides = ["left_lung" if frng.random() < 0.5 else "right_lung" for _ in range(3)]
    nod_t, nod_d_mm, nod_aspect, nod_angle = frng.random(), frng.uniform(15.0, 35.0), frng.uniform(0.85, 1.15), frng.uniform(0, np.pi)
    nod_amp = frng.uniform(0.35, 0.5)
    eff_h, eff_w, eff_amp = frng.uniform(0.2, 0.4), frng.uniform(0.3, 0.6), frng.uniform(0.5, 0.58)
    ptx_d, ptx_dir, ptx_spread = frng.uniform(0.1, 0.18), np.deg2rad(frng.uniform(40, 80)), np.deg2rad(frng.uniform(70, 95))
    ptx_line = frng.uniform(0.14, 0.2)

    extra = np.zeros_like(x)
    details: dict[str, dict[str, Any]] = {}
    mm = 200.0  # mm per image unit (the image spans 400 mm)
    if flags[0]:  # nodule: a soft-tissue sphere seen in projection, fully inside the chosen lung when it fits
        mask = lungs[sides[0]][0]
        if mask.any():
            radius = nod_d_mm / 2.0 / mm
            inside = ndi.distance_transform_edt(mask) * px  # distance to the lung edge, image units
            cand = np.flatnonzero(inside >= radius + px)
            if cand.size == 0:
                cand = np.array([int(np.argmax(inside))])
            r0, c0 = divmod(int(cand[min(int(nod_t * cand.size), cand.size - 1)]), size)
            cx, cy = float(x[r0, c0]), float(y[r0, c0])
            ca, sa = np.cos(nod_angle), np.sin(nod_angle)
            dx, dy = x - f32(cx), y - f32(cy)
            du = (f32(ca) * dx + f32(sa) * dy) * f32(1 / nod_aspect)
            dv = (f32(-sa) * dx + f32(ca) * dy) * f32(nod_aspect)
            rho = np.hypot(du, dv) * f32(1 / radius)
            sphere = np.sqrt(np.clip(1 - rho * rho, 0, 1))
            rim = np.clip((1 - rho) * f32(radius / (0.7 * px)) + 0.5, 0, 1)  # anti-aliased edge
            extra += f32(nod_amp) * np.maximum(np.sqrt(sphere), rim * f32(0.3)) * rim
            details["nodule"] = {"side": sides[0], "centre_rc": [r0, c0], "diameter_mm": round(float(nod_d_mm), 2)}
    if flags[1]:  # effusion: fluid in the lateral costophrenic angle, meniscus rising towards the wall
        mask, _field, air = lungs[sides[1]]
        if mask.any():
            sgn = f32(-1.0 if sides[1] == "right_lung" else 1.0)
            lat = sgn * u  # increases towards the chest wall of that side
            score = np.where(mask, lat + v, -np.inf)
            r0, c0 = np.unravel_index(int(np.argmax(score)), score.shape)  # the costophrenic angle
            a_cp, v_cp = float(lat[r0, c0]), float(v[r0, c0])
            surface = f32(v_cp) - f32(eff_h) * (f32(0.45) + f32(0.55) * np.exp(np.minimum(lat - f32(a_cp), 0) * f32(1 / eff_w)))
            depth = v - surface
            fluid = np.clip(depth * f32(1 / (1.5 * px)) + 0.5, 0, 1) * (f32(0.75) + f32(0.25) * smoothstep(depth * f32(1 / eff_h)))
            fluid *= air * (1 - f32(0.85) * heart_soft) * body_soft
            extra += fluid * (f32(eff_amp) - vessel_term * f32(0.9) * (air > 0))
            details["effusion"] = {"side": sides[1], "height_mm": round(float(eff_h * mm), 2)}
    if flags[2]:  # pneumothorax: air rim without lung markings at the apex / upper lateral edge
        mask, field, air = lungs[sides[2]]
        if mask.any():
            sgn = f32(-1.0 if sides[2] == "right_lung" else 1.0)
            lat = sgn * u
            c_lat, c_v = float(lat[mask].mean()), float(v[mask].mean())
            dl, dv_ = lat - f32(c_lat), v - f32(c_v)
            rho = np.maximum(np.hypot(dl, dv_), f32(1e-6))
            cos_dir = (dl * f32(np.cos(ptx_dir)) - dv_ * f32(np.sin(ptx_dir))) / rho  # 1 towards up-lateral
            lo = f32(np.cos(ptx_spread))
            width = f32(ptx_d) * np.clip((cos_dir - lo) / (1 - lo), 0, 1) ** f32(0.6)
            edge = f32(0.7 * px)
            inner = np.clip(field / edge + 0.5, 0, 1)
            rim = inner * np.clip((width - field) / edge + 0.5, 0, 1) * (width > 0)
            line = np.exp(-0.5 * ((field - width) / f32(0.6 * px)) ** 2) * smoothstep(width / f32(0.3 * ptx_d)) * inner
            extra += -rim * (vessel_term + f32(0.25) * air) + f32(ptx_line) * line * body_soft
            details["pneumothorax"] = {"side": sides[2], "depth_mm": round(float(ptx_d * mm), 2)}
    return (extra.astype(np.float32) if details else None), details


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

