"""Per-head attention maps of a pretrained backbone for given images (the bundles' ``inference.json``).

- :func:`find_images` turns what the user points at (an image file, a DICOM series folder, a folder
  of images, or a datalist JSON) into MONAI data dicts ``[{"image": path}, ...]``. A folder whose
  DICOM files are the slices of one series is ONE 3D image, even a broken one (a missing slice):
  its problem is then reported by the reader, not hidden behind 2D shape errors.
- :class:`InferenceDataset` loads and transforms the images one by one; an image that cannot be
  read or transformed is skipped with its reason in ``inference_report.json`` next to the outputs,
  and the others go on (``strict=True`` stops at the first one instead).
- :class:`AttentionMapWriter` is an evaluator handler: for each image it writes
  ``<stem>_attention.nii.gz`` (float32 (x, y, H): the last axis is the head), one 8-bit PNG per head
  ``<stem>_head<h>.png`` and an overlay ``<stem>_overlay.png``; every file is written under a
  temporary name and renamed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import apply_transform
from torch.utils.data import IterableDataset

from medspan.data.datalist import load_datalist
from medspan.data.readers import IMAGE_SUFFIXES, image_stem, is_dicom_series
from medspan.errors import DataError, find_medspan_error
from medspan.eval.overlay import attention_overlay
from medspan.io import (
    write_json_atomic,
    write_nifti_atomic,
    write_png_atomic,
    write_text_atomic,
)

__all__ = ["REPORT_NAME", "AttentionMapWriter", "InferenceDataset", "MaskWriter", "ProbabilityWriter", "find_images", "image_stems", "to_input_grid"]

REPORT_NAME = "inference_report.json"
"""The report :class:`InferenceDataset` writes next to the outputs."""

logger = logging.getLogger(__name__)


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
        if files and all(p.suffix.lower() == ".dcm" for p in files) and is_dicom_series(src):
            files = [src]  # one 3D series (read, and checked for gaps, when it is loaded)
        items = [{"image": str(p)} for p in files]
    else:
        items = [{"image": str(src)}]
    if not items:
        raise DataError(src, "no image files found")
    return items[:limit] if limit else items


def _batch_output(engine: Engine) -> dict[str, Any]:
    """The evaluator's ``{"image", "pred"}`` batch (re-stacked when the engine decollated it)."""
    out = engine.state.output
    if isinstance(out, list):
        out = {k: torch.stack([torch.as_tensor(o[k]) for o in out]) for k in ("image", "pred")}
    return out


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
        out = _batch_output(engine)
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


def to_input_grid(probs: torch.Tensor, image: Any) -> tuple[torch.Tensor, Any]:
    """Probabilities (S, x, y) on the network's grid -> (S, *original spatial shape), with the input's affine.

    The original size is the reader's ``meta["spatial_shape"]`` (bilinear resampling); the affine is
    ``meta["original_affine"]`` when the reader kept it, else ``meta["affine"]`` scaled back to it.
    """
    meta = getattr(image, "meta", {}) or {}
    shape = meta.get("spatial_shape")
    shape = tuple(int(v) for v in (shape.tolist() if hasattr(shape, "tolist") else shape)) if shape is not None else None
    out = probs
    if shape is not None and tuple(probs.shape[1:]) != shape:
        out = torch.nn.functional.interpolate(probs[None].float(), size=shape, mode="bilinear", align_corners=False)[0]
    affine = meta.get("original_affine")
    if affine is None:
        affine = getattr(image, "affine", None)
        if affine is not None and shape is not None:
            affine = torch.as_tensor(affine, dtype=torch.float64).clone()
            scale = torch.tensor([probs.shape[1 + i] / shape[i] for i in range(len(shape))], dtype=torch.float64)
            affine[: len(shape), : len(shape)] = affine[: len(shape), : len(shape)] * scale
    return out, affine


class MaskWriter:
    """Write one segmentation per image, on the input's own grid and size, plus an overlay.

    For each image the evaluator sees (output ``image`` (B, C, x, y) MetaTensor, ``pred`` (B, S, x, y)
    logits; ``decollate=False``), the sigmoid probabilities are resampled to the input's original
    size (:func:`to_input_grid`) and thresholded; a pixel above threshold in several structures goes
    to the most probable one. Files (each written under a temporary name, then renamed):

    - ``<stem>_mask.png``: 8-bit label map as a picture (rows, cols): 0 background, ``s + 1`` for
      ``structures[s]``;
    - ``<stem>_mask.nii.gz``: the same label map (x, y) with the input's affine;
    - ``<stem>_overlay.png``: the image, then one panel per structure (probability as heat colour),
      every predicted outline drawn on each.

    Args:
        output_dir: destination folder.
        structures: names of the S output channels.
        threshold: probability threshold.
    """

    def __init__(self, output_dir: str | os.PathLike, structures: Sequence[str], threshold: float = 0.5) -> None:
        self.output_dir = Path(output_dir)
        self.structures = list(structures)
        self.threshold = float(threshold)
        self.written: list[Path] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = _batch_output(engine)
        images, logits = out["image"], out["pred"]
        if logits.shape[1] != len(self.structures):
            raise DataError("<network output>", f"{logits.shape[1]} channels but {len(self.structures)} structures")
        names = image_stems(images)
        for b in range(logits.shape[0]):
            self._write_one(names[b], images[b], torch.sigmoid(logits[b].detach().float().cpu()))

    def _write_one(self, stem: str, image: Any, probs: torch.Tensor) -> None:
        probs_in, affine = to_input_grid(probs, image)
        img_in, _ = to_input_grid(torch.as_tensor(image).detach().float().cpu()[:1], image)
        above = probs_in > self.threshold
        best = probs_in.argmax(0)
        label = torch.where(above.any(0), best + 1, torch.zeros_like(best)).to(torch.uint8).numpy()  # (x, y)
        self.written.append(write_png_atomic(label.T, self.output_dir / f"{stem}_mask.png"))
        self.written.append(write_nifti_atomic(label, self.output_dir / f"{stem}_mask.nii.gz", affine, dtype=np.uint8))
        masks = np.stack([label == s + 1 for s in range(len(self.structures))])
        path = self.output_dir / f"{stem}_overlay.png"
        attention_overlay(img_in.numpy(), probs_in.numpy(), masks, self.structures, path,
                          mask_names=self.structures)
        self.written.append(path)


class ProbabilityWriter:
    """Collect per-image class probabilities; write ``predictions.csv`` and ``predictions.json`` at the end.

    The evaluator output holds ``image`` (B, C, x, y) MetaTensor and ``pred`` (B, K) logits
    (``decollate=False``). ``predictions.csv`` has one row per image: ``image`` (the file), then one
    column per class with the sigmoid probability (6 decimals); ``predictions.json`` the same as a
    list of ``{"image", "probabilities": {class: p}}``. Both are written atomically when the run
    completes, so a partial run leaves no file that looks complete.

    Args:
        output_dir: destination folder.
        classes: names of the K outputs.
    """

    def __init__(self, output_dir: str | os.PathLike, classes: Sequence[str]) -> None:
        self.output_dir = Path(output_dir)
        self.classes = list(classes)
        self.rows: list[dict[str, Any]] = []
        self.written: list[Path] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def __call__(self, engine: Engine) -> None:
        out = _batch_output(engine)
        images, logits = out["image"], out["pred"]
        if logits.ndim != 2 or logits.shape[1] != len(self.classes):
            raise DataError("<network output>", f"expected (B, {len(self.classes)}) logits, got {tuple(logits.shape)}")
        meta = getattr(images, "meta", {}) or {}
        files = meta.get("filename_or_obj") or [f"image_{i}" for i in range(logits.shape[0])]
        files = [files] if isinstance(files, str) else list(files)
        probs = torch.sigmoid(logits.detach().float().cpu())
        for b in range(probs.shape[0]):
            self.rows.append({"image": str(files[b]),
                              "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, probs[b])}})

    def write(self, engine: Engine | None = None) -> list[Path]:
        """Write both files (also when no image could be read: then with no rows)."""
        lines = [",".join(["image", *self.classes])]
        for r in self.rows:
            name = r["image"].replace('"', '""')
            lines.append(",".join([f'"{name}"', *(f"{r['probabilities'][c]:.6f}" for c in self.classes)]))
        self.written = [
            write_text_atomic("\n".join(lines) + "\n", self.output_dir / "predictions.csv"),
            write_json_atomic({"classes": self.classes, "predictions": self.rows}, self.output_dir / "predictions.json"),
        ]
        return self.written


def _failure_text(exc: BaseException) -> str:
    """The medspan error behind ``exc`` (MONAI wraps a transform's error), else its innermost cause."""
    known = find_medspan_error(exc)
    if known is not None:
        return str(known)
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    return f"{type(root).__name__}: {root}"


class InferenceDataset(IterableDataset):
    """The images of an inference run, loaded and transformed one at a time; bad ones are skipped.

    An image whose loading or transform fails (unreadable file, a DICOM series with a missing slice,
    NaN voxels refused by a transform, ...) is left out: a warning names it and the reason, and
    ``report_dir/inference_report.json`` lists it (``{"images", "loaded", "failed": [{"image",
    "error"}], "strict"}``; rewritten atomically after each image, so a killed run leaves a valid
    report). The loop goes on with the next image. With ``strict=True`` the first failure stops the
    run (the error is raised as it is). When no image at all could be used the run fails with a
    :class:`~medspan.errors.DataError` quoting the first reason.

    An iterable dataset has no length: MONAI's evaluator then counts the iterations as they come.

    Args:
        data: data dicts ``{"image": path, ...}`` (what :func:`find_images` returns).
        transform: the loading + preprocessing transform (a MONAI ``Compose``).
        report_dir: where the report goes (the inference output folder); None: no report file.
        strict: stop at the first image that fails.

    Example (bundle JSON)::

        "dataset": {"_target_": "medspan.inference.writers.InferenceDataset", "data": "@datalist",
                    "transform": "@preprocessing", "report_dir": "@infer_dir", "strict": "@strict"}
    """

    def __init__(
        self,
        data: Sequence[dict[str, Any]],
        transform: Callable[[Any], Any] | None = None,
        report_dir: str | os.PathLike | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.data = list(data)
        self.transform = transform
        self.report_path = None if report_dir is None else Path(report_dir) / REPORT_NAME
        self.strict = bool(strict)
        self.loaded: list[str] = []
        self.failed: list[dict[str, str]] = []

    def _write_report(self) -> None:
        if self.report_path is not None:
            write_json_atomic({"images": len(self.data), "loaded": self.loaded, "failed": self.failed,
                               "strict": self.strict}, self.report_path)

    def __iter__(self) -> Iterator[Any]:
        self.loaded, self.failed = [], []
        for item in self.data:
            name = str(item.get("image")) if isinstance(item, dict) else str(item)
            try:
                out = apply_transform(self.transform, item) if self.transform is not None else item
            except Exception as exc:
                if self.strict:
                    raise
                reason = _failure_text(exc)
                self.failed.append({"image": name, "error": reason})
                logger.warning("inference: skipped %s: %s", name, reason)
                self._write_report()
                continue
            self.loaded.append(name)
            self._write_report()
            yield out
        if not self.loaded and self.failed:
            raise DataError(self.failed[0]["image"],
                            f"no image could be used ({len(self.failed)} failed); first: {self.failed[0]['error']}")
        self._write_report()
