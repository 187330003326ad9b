"""Phantom chest CTs with organ and nodule masks (:func:`synth_ct`).

``image`` and masks are numpy ``(z, y, x)`` arrays (slice, row, column) in DICOM patient space
(LPS): ``x`` (column) increases towards the patient's **left**, ``y`` (row) towards **posterior**,
``z`` (slice) towards **superior** (head). ``spacing`` is given as ``(sx, sy, sz)`` in mm. The result
carries ``affine``: the 4x4 RAS affine of the transposed ``(x, y, z)`` array, the one written into
NIfTI files and the one MONAI's readers return.
"""


from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from medspan.data.synthetic.shapes import branching_tree, smoothstep, splat_segments

CT_STRUCTURES: tuple[str, ...] = ("left_lung", "right_lung", "heart", "airways", "vessels")
"""Order of the CT label channels (``label`` list of a datalist entry)."""

_CT_Z_CENTRE = -10.0
"""World z (mm) of the volume centre; the canonical anatomy has the lung apices near +135 mm and
the diaphragm domes near -70 mm."""

CT_DEFAULT_FOV = (384.0, 384.0, 336.0)
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
        spacing = tuple(f / n for f, n in zip(CT_DEFAULT_FOV, shape[::-1]))
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
    narrow = 1 - f32(0.22) * smoothstep((W - f32(30)) * f32(1 / 110))
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
    tree = branching_tree(rng, np.array(roots), np.array(dirs), 9, 26.0, 5.5, spread=(0.5, 0.9), shrink=0.84, width_shrink=0.8)
    vox = float(np.prod(spacing)) ** (1 / 3)
    step = 0.5 * min(spacing)
    groups = (tree[:2], tree[2:4], tree[4:])
    vess = np.zeros(shape, np.float32)
    for grp in groups:
        # splat cross-section area per unit length / voxel area, then blur by the vessel radius
        seg = [(s, e, float(np.pi * w**2 / vox**2)) for s, e, w in grp]
        dens = splat_segments(seg, shape, fr.to_index, step) * (step / vox)
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

