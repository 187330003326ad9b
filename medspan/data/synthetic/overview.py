"""``medspan overview``: a PNG grid of synthetic CXRs and CTs with colored mask contours.

Uses PIL + numpy (+ ``skimage.segmentation.find_boundaries``); matplotlib is not needed.

Example::

    medspan overview --out docs/synthetic_overview.png --n-cxr 8 --n-ct 4 --seed 0

The cases drawn are the first cases of a dataset written with the same ``--seed`` (see
:func:`medspan.data.synthetic.case_seed`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage.segmentation import find_boundaries

from medspan.data.synthetic.ct import synth_ct
from medspan.data.synthetic.cxr import synth_cxr
from medspan.data.synthetic.shapes import case_seed
from medspan.io import write_png_atomic

CXR_COLORS: dict[str, tuple[int, int, int]] = {
    "right_lung": (70, 150, 255),
    "left_lung": (255, 80, 80),
    "heart": (255, 215, 0),
    "spine": (0, 220, 220),
    "clavicles": (230, 80, 255),
    "ribs": (60, 200, 60),
}
CT_COLORS: dict[str, tuple[int, int, int]] = {
    "right_lung": (70, 150, 255),
    "left_lung": (255, 80, 80),
    "heart": (255, 215, 0),
    "airways": (60, 230, 60),
    "nodules": (255, 140, 0),
}
VESSEL_TINT = (200, 60, 255)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _resize(array: np.ndarray, shape: tuple[int, int], nearest: bool) -> np.ndarray:
    img = Image.fromarray(array)
    return np.asarray(img.resize((shape[1], shape[0]), Image.NEAREST if nearest else Image.BILINEAR))


def overlay_contours(
    gray: np.ndarray,
    masks: dict[str, np.ndarray],
    colors: dict[str, tuple[int, int, int]],
    tint: dict[str, tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """Draw mask outlines (and optional translucent fills) on a grayscale image.

    Args:
        gray: uint8 ``(H, W)``.
        masks: bool ``(H, W)`` per name; only names in ``colors`` / ``tint`` are drawn.
        colors: outline RGB per name.
        tint: fill RGB per name (blended at 45 %).

    Returns:
        uint8 ``(H, W, 3)``.

    Example::

        >>> out = overlay_contours(np.zeros((8, 8), np.uint8), {"heart": np.eye(8, dtype=bool)}, {"heart": (255, 0, 0)})
        >>> out.shape, out[0, 0].tolist()
        ((8, 8, 3), [255, 0, 0])
    """
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    for name, color in (tint or {}).items():
        if name in masks:
            m = masks[name]
            rgb[m] = 0.55 * rgb[m] + 0.45 * np.asarray(color, np.float32)
    for name, color in colors.items():
        if name in masks and masks[name].any():
            rgb[find_boundaries(masks[name], mode="inner")] = color
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _window(hu: np.ndarray, lo: float = -1300.0, hi: float = 300.0) -> np.ndarray:
    return (np.clip((hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _fit(gray: np.ndarray, masks: dict[str, np.ndarray], out_hw: tuple[int, int], tile: int):
    """Resize a slice to ``out_hw`` and pad it into a ``tile`` x ``tile`` square."""
    g = _resize(gray, out_hw, nearest=False)
    ms = {k: _resize(m.astype(np.uint8) * 255, out_hw, nearest=True) > 127 for k, m in masks.items()}
    pad_t = (tile - out_hw[0]) // 2
    pad_l = (tile - out_hw[1]) // 2
    gp = np.zeros((tile, tile), np.uint8)
    gp[pad_t : pad_t + out_hw[0], pad_l : pad_l + out_hw[1]] = g
    mp = {}
    for k, m in ms.items():
        full = np.zeros((tile, tile), bool)
        full[pad_t : pad_t + out_hw[0], pad_l : pad_l + out_hw[1]] = m
        mp[k] = full
    return gp, mp


def render_overview(
    n_cxr: int = 8, n_ct: int = 4, seed: int = 0, size: int = 256, shape: Sequence[int] = (96, 96, 96), tile: int = 224
) -> np.ndarray:
    """Render the overview grid; returns uint8 ``(H, W, 3)``.

    Row pairs: CXRs (plain, then with contours); CTs, two per row, each as axial plain / axial
    contours / coronal plain / coronal contours (window -1300..300 HU; the axial slice passes
    through the largest nodule, the coronal one through the centre of the lungs and heart).
    """
    font, small = _font(18), _font(13)
    cols = max(n_cxr, 8 if n_ct > 1 else 4)
    width = cols * tile
    blocks: list[np.ndarray] = []
    labels: list[tuple[int, int, str]] = []  # (y, x, text) in the final canvas

    header = 56
    y = header
    if n_cxr:
        plain = np.zeros((tile, width, 3), np.uint8)
        over = np.zeros((tile, width, 3), np.uint8)
        for i in range(n_cxr):
            case = synth_cxr(case_seed(seed, i), size)
            g = (case["image"] * 255).astype(np.uint8)
            gp, mp = _fit(g, case["masks"], (tile, tile), tile)
            plain[:, i * tile : (i + 1) * tile] = np.repeat(gp[..., None], 3, -1)
            over[:, i * tile : (i + 1) * tile] = overlay_contours(
                gp, mp, {k: v for k, v in CXR_COLORS.items() if k != "ribs"}, tint=None
            )
            tags = [t for t, on in (("cardiomegaly", case["params"]["cardiomegaly"]),) if on]
            labels.append((y + 4, i * tile + 4, f"cxr_{i:04d}" + (" " + ",".join(tags) if tags else "")))
        blocks += [plain, over]
        y += 2 * tile
    if n_ct:
        per_row = max(1, cols // 4)
        rows = (n_ct + per_row - 1) // per_row
        ct_block = np.zeros((rows * tile, width, 3), np.uint8)
        for j in range(n_ct):
            case = synth_ct(case_seed(seed, j), tuple(shape))
            img, masks = case["image"], dict(case["masks"])
            masks["nodules"] = case["nodules"] > 0
            recs = case["nodule_records"]
            if recs:
                big = max(recs, key=lambda r: r["diameter_mm"])
                kz = big["centre_index_zyx"][0]
            else:
                kz = img.shape[0] // 2
            lung_y = np.nonzero((masks["left_lung"] | masks["right_lung"] | masks["heart"]).any(axis=(0, 2)))[0]
            ky = int(round(lung_y.mean())) if lung_y.size else img.shape[1] // 2
            sx, sy, sz = case["spacing"]
            nz, ny, nx = img.shape
            ax_hw = _fit_hw(ny * sy, nx * sx, tile)
            co_hw = _fit_hw(nz * sz, nx * sx, tile)
            ax_g, ax_m = _fit(_window(img[kz]), {k: m[kz] for k, m in masks.items()}, ax_hw, tile)
            co_g, co_m = _fit(
                _window(img[::-1, ky, :]), {k: m[::-1, ky, :] for k, m in masks.items()}, co_hw, tile
            )
            r, c0 = divmod(j, per_row)
            x0 = c0 * 4 * tile
            tiles = [
                np.repeat(ax_g[..., None], 3, -1),
                overlay_contours(ax_g, ax_m, CT_COLORS, tint={"vessels": VESSEL_TINT}),
                np.repeat(co_g[..., None], 3, -1),
                overlay_contours(co_g, co_m, CT_COLORS, tint={"vessels": VESSEL_TINT}),
            ]
            for t, arr in enumerate(tiles):
                ct_block[r * tile : (r + 1) * tile, x0 + t * tile : x0 + (t + 1) * tile] = arr
            mal = ",".join(str(rr["malignancy"]) for rr in recs) or "-"
            labels.append((y + r * tile + 4, x0 + 4, f"ct_{j:04d} axial z={kz}  nodules malignancy {mal}"))
            labels.append((y + r * tile + 4, x0 + 2 * tile + 4, f"coronal y={ky}"))
        blocks.append(ct_block)
        y += rows * tile
    canvas = np.concatenate([np.full((header, width, 3), 24, np.uint8)] + blocks, axis=0)
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    draw.text((8, 6), f"medspan synthetic anatomy (seed {seed}): CXR {size}px, CT {tuple(shape)} voxels", fill=(255, 255, 255), font=font)
    x = 8
    legend = {**CXR_COLORS, **CT_COLORS, "vessels (tint)": VESSEL_TINT}
    legend.pop("ribs")
    for name, color in legend.items():
        draw.rectangle((x, 34, x + 12, 46), fill=color)
        draw.text((x + 16, 32), name, fill=(230, 230, 230), font=small)
        x += 24 + int(draw.textlength(name, font=small))
    for ly, lx, text in labels:
        draw.text((lx, ly), text, fill=(255, 255, 120), font=small)
    return np.asarray(pil)


def _fit_hw(height_mm: float, width_mm: float, tile: int) -> tuple[int, int]:
    s = tile / max(height_mm, width_mm)
    return max(1, int(round(height_mm * s))), max(1, int(round(width_mm * s)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medspan overview``."""
    parser.add_argument("--out", default="docs/synthetic_overview.png", help="output PNG")
    parser.add_argument("--n-cxr", type=int, default=8, help="number of CXRs (default 8)")
    parser.add_argument("--n-ct", type=int, default=4, help="number of CTs (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--size", type=int, default=256, help="CXR size in pixels (default 256)")
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 96, 96), metavar=("NZ", "NY", "NX"), help="CT shape")
    parser.add_argument("--tile", type=int, default=224, help="tile side in the grid, pixels (default 224)")


def run(args: argparse.Namespace) -> int:
    """Render and save the overview; prints the output path."""
    grid = render_overview(args.n_cxr, args.n_ct, args.seed, args.size, tuple(args.shape), args.tile)
    out = Path(args.out)
    write_png_atomic(grid, out, optimize=True)
    print(f"overview: {out} ({grid.shape[1]}x{grid.shape[0]})")
    return 0
