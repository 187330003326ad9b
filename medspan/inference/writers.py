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

from medspan.errors import DataError
from medspan.io import atomic_write

__all__ = ["find_images", "AttentionMapWriter", "load_run_record"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".nii", ".nii.gz", ".mha", ".nrrd", ".tif", ".tiff", ".bmp")


def _is_image(p: Path) -> bool:
    name = p.name.lower()
    return any(name.endswith(s) for s in _IMAGE_SUFFIXES)


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
        from medspan.data.datalist import load_datalist

        doc = json.loads(src.read_text())
        sec = section if section in doc else "training"
        items = [{"image": e["image"]} for e in load_datalist(src, sec, require=("image",))]
    elif src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file() and _is_image(p))
        if files and all(p.suffix.lower() == ".dcm" for p in files):
            from medspan.data.readers import read_dicom_series

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
        names = self._names(images)
        for b in range(maps.shape[0]):
            self._write_one(names[b], images[b], maps[b])

    @staticmethod
    def _names(images: Any) -> list[str]:
        meta = getattr(images, "meta", {}) or {}
        files = meta.get("filename_or_obj")
        n = images.shape[0]
        if isinstance(files, str):
            files = [files]
        if not files:
            return [f"image_{i}" for i in range(n)]
        out = []
        for f in list(files)[:n]:
            p = Path(str(f).rstrip("/"))
            stem = p.name
            for s in sorted(_IMAGE_SUFFIXES, key=len, reverse=True):
                if stem.lower().endswith(s):
                    stem = stem[: -len(s)]
                    break
            out.append(stem)
        return out

    def _write_one(self, stem: str, image: torch.Tensor, maps: torch.Tensor) -> None:
        m = maps.detach().float().cpu().numpy()  # (H, x, y)
        img = torch.as_tensor(image).detach().float().cpu().numpy()
        n_heads = m.shape[0]
        titles = self.head_titles or [f"head {h}" for h in range(n_heads)]
        if self.write_nifti:
            import nibabel as nib

            affine = getattr(image, "affine", None)
            aff = np.eye(4) if affine is None else np.asarray(torch.as_tensor(affine).cpu(), dtype=float)
            if aff.shape == (3, 3):  # 2D affine -> 3D
                full = np.eye(4)
                full[:2, :2], full[:2, 3] = aff[:2, :2], aff[:2, 2]
                aff = full
            vol = np.moveaxis(m, 0, -1).astype(np.float32)  # (x, y, H)
            path = self.output_dir / f"{stem}_attention.nii.gz"
            atomic_write(path, lambda t: nib.save(nib.Nifti1Image(vol, aff), t))
            self.written.append(path)
        if self.write_png:
            from PIL import Image

            for h in range(n_heads):
                a = m[h]
                a = (a - a.min()) / (np.ptp(a) + 1e-12)
                arr = (a.T * 255).round().astype(np.uint8)  # MONAI (x, y) -> picture (rows, cols)
                path = self.output_dir / f"{stem}_head{h}.png"
                atomic_write(path, lambda t, arr=arr: Image.fromarray(arr).save(t, format="PNG"))
                self.written.append(path)
        if self.write_overlay:
            from medspan.eval.overlay import attention_overlay

            path = self.output_dir / f"{stem}_overlay.png"
            attention_overlay(img, m, None, titles, path)
            self.written.append(path)
