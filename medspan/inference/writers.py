"""Per-head attention maps of a pretrained backbone for given images (the bundles' ``inference.json``).

- :func:`find_images` turns what the user points at (an image file, a DICOM series folder, a folder
  of images, or a datalist JSON) into MONAI data dicts ``[{"image": path}, ...]``.
- :class:`AttentionMapWriter` is an evaluator handler: for each image it writes
  ``<stem>_attention.nii.gz`` (float32 (x, y, H): the last axis is the head), one 8-bit PNG per head
  ``<stem>_head<h>.png`` and an overlay ``<stem>_overlay.png``; every file is written under a
  temporary name and renamed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from medspan.data.datalist import load_datalist
from medspan.data.readers import IMAGE_SUFFIXES, image_stem, read_dicom_series
from medspan.errors import DataError
from medspan.eval.overlay import attention_overlay
from medspan.io import write_nifti_atomic, write_png_atomic

__all__ = ["AttentionMapWriter", "find_images", "image_stems", "load_run_record"]


def load_run_record(output_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``final_summary.json`` of a finished pretraining run (its hyper-parameters and datalist)."""
    path = Path(output_dir) / "final_summary.json"
    if not path.is_file():
        raise DataError(path, "no finished pretraining run here; run the bundle's train.json first")
    return json.loads(path.read_text())


def find_images(source: str | os.PathLike | None, section: str = "validation", limit: int | None = None) -> list[dict]:
    """Data dicts ``{"image": path}`` for inference.

    Args:
        source: an image file, a DICOM series folder, a folder of images (not recursive), or a
            datalist JSON (its ``section``, falling back to ``training``).
        section: datalist section to read.
        limit: keep at most this many images.

    Raises:
        DataError: the source does not exist or holds no image.
    """
    if source is None:
        raise DataError("<input>", "no input given: pass --input FILE|FOLDER|DATALIST.json")
    src = Path(source)
    if not src.exists():
        raise DataError(src, "input does not exist")
    if src.suffix == ".json":
        doc = json.loads(src.read_text())
        sec = section if section in doc else "training"
        items = [{"image": e["image"]} for e in load_datalist(src, sec, require=("image",))]
    elif src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
        if files and all(p.suffix.lower() == ".dcm" for p in files):
            try:  # one 3D series, or many 2D DICOM files
                read_dicom_series(src)
                files = [src]
            except DataError:
                pass
        items = [{"image": str(p)} for p in files]
    else:
        items = [{"image": str(src)}]
    if not items:
        raise DataError(src, "no image files found")
    return items[:limit] if limit else items


def image_stems(images: Any) -> list[str]:
    """Output name stems of a batch ``(B, ...)``: each image's file name without its suffix
    (``meta["filename_or_obj"]``), else ``image_<b>``."""
    meta = getattr(images, "meta", {}) or {}
    files = meta.get("filename_or_obj")
    n = images.shape[0]
    if isinstance(files, str):
        files = [files]
    if not files:
        return [f"image_{i}" for i in range(n)]
    return [image_stem(f) for f in list(files)[:n]]


class AttentionMapWriter:
    """Write per-head attention maps (NIfTI + PNG) and an overlay for every image an evaluator sees.

    Args:
        output_dir: destination folder.
        head_titles: one title per head for the overlay (default ``head h``).
        write_nifti / write_png / write_overlay: which files to write.

    The evaluator output must hold ``image`` (B, C, x, y) MetaTensor and ``pred`` (B, H, x, y).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        head_titles: Sequence[str] | None = None,
        write_nifti: bool = True,
        write_png: bool = True,
        write_overlay: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.head_titles = list(head_titles) if head_titles else None
        self.write_nifti, self.write_png, self.write_overlay = write_nifti, write_png, write_overlay
        self.written: list[Path] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        if isinstance(out, list):
            out = {k: torch.stack([torch.as_tensor(o[k]) for o in out]) for k in ("image", "pred")}
        images, maps = out["image"], out["pred"]
        names = image_stems(images)
        for b in range(maps.shape[0]):
            self._write_one(names[b], images[b], maps[b])

    def _write_one(self, stem: str, image: torch.Tensor, maps: torch.Tensor) -> None:
        m = maps.detach().float().cpu().numpy()  # (H, x, y)
        img = torch.as_tensor(image).detach().float().cpu().numpy()
        n_heads = m.shape[0]
        titles = self.head_titles or [f"head {h}" for h in range(n_heads)]
        if self.write_nifti:
            path = self.output_dir / f"{stem}_attention.nii.gz"  # (x, y, H): the last axis is the head
            self.written.append(write_nifti_atomic(m, path, getattr(image, "affine", None), channel_dim=0))
        if self.write_png:
            for h in range(n_heads):
                a = m[h]
                a = (a - a.min()) / (np.ptp(a) + 1e-12)
                arr = (a.T * 255).round().astype(np.uint8)  # MONAI (x, y) -> picture (rows, cols)
                self.written.append(write_png_atomic(arr, self.output_dir / f"{stem}_head{h}.png"))
        if self.write_overlay:
            path = self.output_dir / f"{stem}_overlay.png"
            attention_overlay(img, m, None, titles, path)
            self.written.append(path)
