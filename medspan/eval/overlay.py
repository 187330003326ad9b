"""Attention overlay pictures (one PNG per image, Pillow only, no matplotlib).

Layout: one row of panels, separated by ``GAP`` black pixels, each under a ``TITLE_HEIGHT``
pixel title bar. The first panel is the radiograph; then each head's attention map is shown
as a heat colour blended over it, with more opacity where attention is higher. Structure mask
outlines (``skimage.segmentation.find_boundaries``) are drawn on every panel in distinct
colours. Arrays come in MONAI's ``(x, y)`` order and are transposed to picture ``(rows, cols)``,
so the PNG looks like a normal radiograph.

PNG size (``zoom`` = integer upscale, ``n`` = number of heads)::

    width  = (n + 1) * X * zoom + n * GAP
    height = TITLE_HEIGHT + Y * zoom

Example::

    >>> import numpy as np, tempfile, pathlib
    >>> img = np.random.rand(64, 48); maps = np.random.rand(2, 64, 48)
    >>> out = attention_overlay(img, maps, None, ["h0", "h1"], pathlib.Path(tempfile.mkdtemp()) / "a.png")
    >>> from PIL import Image; Image.open(out).size
    (196, 62)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage.segmentation import find_boundaries

from medspan.io import write_png_atomic

__all__ = ["GAP", "MASK_COLOURS", "TITLE_HEIGHT", "attention_overlay", "heat_colormap"]

TITLE_HEIGHT = 14
GAP = 2
MASK_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 230, 0),  # green
    (0, 200, 255),  # cyan
    (255, 0, 255),  # magenta
    (255, 255, 0),  # yellow
    (60, 90, 255),  # blue
    (255, 140, 0),  # orange
    (255, 255, 255),  # white
    (150, 255, 150),  # light green
)
# "hot"-like anchors: dark red -> red -> orange -> pale yellow
_HEAT_ANCHORS = np.array([0.0, 0.35, 0.7, 1.0])
_HEAT_COLOURS = np.array([[90, 0, 0], [230, 30, 0], [255, 170, 0], [255, 255, 170]], dtype=np.float64)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def heat_colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] ``(...)`` to RGB ``(..., 3)`` float64 in [0, 255] (a "hot" colormap)."""
    v = np.clip(values, 0.0, 1.0)
    return np.stack([np.interp(v, _HEAT_ANCHORS, _HEAT_COLOURS[:, c]) for c in range(3)], axis=-1)


def _normalise(x: np.ndarray, lo_pct: float = 0.0, hi_pct: float = 100.0) -> np.ndarray:
    x = x.astype(np.float64)
    lo, hi = np.percentile(x, [lo_pct, hi_pct]) if (lo_pct, hi_pct) != (0.0, 100.0) else (x.min(), x.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(x)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _base_rgb(image: np.ndarray) -> np.ndarray:
    """``(x, y)`` or ``(C, x, y)`` -> picture ``(rows, cols, 3)`` float64 in [0, 255]."""
    if image.ndim == 2:
        gray = _normalise(image.T, 0.5, 99.5)
        return np.repeat(gray[..., None], 3, axis=-1) * 255.0
    if image.ndim == 3 and image.shape[0] == 3:
        return _normalise(np.transpose(image, (2, 1, 0)), 0.5, 99.5) * 255.0
    if image.ndim == 3:
        return _base_rgb(image[0])
    raise ValueError(f"image must be (x, y) or (C, x, y), got shape {image.shape}")


def _draw_contours(panel: np.ndarray, masks_rc: np.ndarray | None) -> None:
    if masks_rc is None:
        return
    for s, mask in enumerate(masks_rc):
        edge = find_boundaries(mask, mode="inner")
        panel[edge] = MASK_COLOURS[s % len(MASK_COLOURS)]


def attention_overlay(
    image: Any,
    maps: Any,
    masks: Any | None,
    head_titles: Sequence[str],
    path: str | os.PathLike,
    *,
    zoom: int = 1,
    alpha: float = 0.75,
    image_title: str = "image",
    mask_names: Sequence[str] | None = None,
) -> Path:
    """Write one PNG: the image, then one panel per head with its map over the image.

    Args:
        image: ``(x, y)`` or ``(C, x, y)`` array or tensor (C=3 is shown as RGB, otherwise channel 0);
            intensities are stretched between the 0.5th and 99.5th percentiles.
        maps: ``(H, x, y)`` attention maps on the image grid, each min-max normalised. Opacity
            of the heat colour is ``alpha * value``, so unattended areas show the plain image.
        masks: ``(S, x, y)`` bool masks (or ``None``); structure ``s`` is outlined in
            ``MASK_COLOURS[s]`` on every panel.
        head_titles: H panel titles (PIL's default font; clipped to the panel width).
        path: output ``.png``; parent folders are created, and the write is atomic (temporary
            file in the same folder, then ``os.replace``).
        zoom: integer nearest-neighbour upscale for small images.
        alpha: maximum opacity of the heat colour.
        image_title: title of the first panel.
        mask_names: optional S names written as a colour legend in the first panel.

    Returns:
        the written path.
    """
    img = _numpy(image)
    mp = _numpy(maps)
    spatial = img.shape[-2:]
    if mp.ndim != 3 or mp.shape[1:] != spatial:
        raise ValueError(f"maps must be (H, x, y) with (x, y) = {spatial}, got {mp.shape}")
    if len(head_titles) != mp.shape[0]:
        raise ValueError(f"{mp.shape[0]} maps but {len(head_titles)} head titles")
    mk = None
    if masks is not None:
        mk = _numpy(masks).astype(bool)
        if mk.ndim != 3 or mk.shape[1:] != spatial:
            raise ValueError(f"masks must be (S, x, y) with (x, y) = {spatial}, got {mk.shape}")
        mk = np.transpose(mk, (0, 2, 1))  # (S, rows, cols)
    zoom = max(1, int(zoom))

    base = _base_rgb(img)  # (rows, cols, 3)
    panels = [base.copy()]
    for h in range(mp.shape[0]):
        m = _normalise(mp[h].T)
        a = (alpha * m)[..., None]
        panels.append(base * (1.0 - a) + heat_colormap(m) * a)
    for p in panels:
        _draw_contours(p, mk)

    rows, cols = base.shape[:2]
    pw, ph = cols * zoom, rows * zoom
    n = len(panels)
    canvas = Image.new("RGB", (n * pw + (n - 1) * GAP, TITLE_HEIGHT + ph), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    titles = [image_title, *head_titles]
    for k, p in enumerate(panels):
        tile = Image.fromarray(np.clip(np.rint(p), 0, 255).astype(np.uint8), mode="RGB")
        if zoom > 1:
            tile = tile.resize((pw, ph), Image.Resampling.NEAREST)
        x0 = k * (pw + GAP)
        canvas.paste(tile, (x0, TITLE_HEIGHT))
        title_box = Image.new("RGB", (pw, TITLE_HEIGHT), (0, 0, 0))
        ImageDraw.Draw(title_box).text((2, 1), str(titles[k]), fill=(255, 255, 255), font=font)
        canvas.paste(title_box, (x0, 0))  # clipped to the panel width
    if mask_names is not None:
        for s, name in enumerate(mask_names):
            draw.text((2, TITLE_HEIGHT + 2 + 12 * s), str(name), fill=MASK_COLOURS[s % len(MASK_COLOURS)], font=font)

    return write_png_atomic(canvas, path)
