"""Validation and pictures for SMARTFormer runs: 3D attention maps as segmentations, reconstructions.

* :class:`SwinCAProbe` -- the network of a ``SupervisedEvaluator``: CT crop (B, C, *S) -> the SA
  branch's CLS->stage-3 attention of every head, trilinearly upsampled to the crop, (B, H[+1], *S);
  with ``mean_head=True`` a last map is the mean of the heads (the map the teacher masks with).
  It feeds :class:`medspan.engines.attention_validation.AttentionSegMetric` unchanged (that
  metric works on (B, H, *S) maps and (B, S, *S) masks in 2D and 3D).
* :class:`AttentionSegReport3D` -- :class:`~medspan.engines.attention_validation.AttentionSegReport`
  whose per-epoch pictures suit volumes: ``attention/maps_epoch=N_img{i}.nii.gz`` (float32
  (x, y, z, H), the crop's affine) and PNG slices ``overlays/attention_epoch=N_img{i}_{axial,coronal}.png``
  (the slice where the labelled structures are largest; organ contours drawn).
* :class:`AttentionSnapshot` -- trainer handler: every epoch, the teacher's maps of one fixed validation
  volume: ``attention/maps_epoch=N.nii.gz`` on the stage-3 token grid (with its affine) and the PNG slices
  ``overlays/attention_epoch=N_{axial,coronal}.png``.
* :class:`ReconstructionPreview` -- trainer handler: per epoch ``previews/recon_epoch=N.png`` with the
  input, the teacher's input (patch dropout), the teacher's attention, the student's masked input, the
  reconstruction (visible voxels kept, masked voxels predicted) and the raw prediction; one row
  axial, one coronal.
* :class:`AttentionVolumeWriter` -- evaluator handler for ``inference.json``: per volume a NIfTI of
  the maps and the PNG slices.

Array convention: MONAI ``(C, x, y, z)``. A picture of an axial slice ``[:, :, k]`` shows x across and
y down; a coronal slice ``[:, j, :]`` shows x across and z up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from medspan.engines.attention_validation import AttentionSegMetric, AttentionSegReport
from medspan.engines.dist import is_main_rank
from medspan.eval.overlay import GAP, TITLE_HEIGHT, attention_overlay, heat_colormap
from medspan.inference.writers import image_stems
from medspan.io import write_json_atomic, write_nifti_atomic, write_png_atomic

__all__ = [
    "AttentionSegReport3D",
    "AttentionSnapshot",
    "AttentionVolumeWriter",
    "ReconstructionPreview",
    "SwinCAProbe",
    "attention_to_volume",
    "best_slices",
    "grid_affine",
    "write_attention_slices",
]

logger = logging.getLogger(__name__)


def attention_to_volume(attn: torch.Tensor, grid: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """(B, H, N) attention over a row-major ``grid`` -> (B, H, *size) maps (tri/bilinear, align_corners False).

    Example:
        >>> a = torch.zeros(1, 1, 8); a[0, 0, 5] = 1.0        # cell (1, 0, 1) of a 2x2x2 grid
        >>> attention_to_volume(a, (2, 2, 2), (2, 2, 2))[0, 0].nonzero().tolist()
        [[1, 0, 1]]
    """
    grid = tuple(int(g) for g in grid)
    b, h, n = attn.shape
    if n != int(np.prod(grid)):
        raise ValueError(f"attn has {n} tokens but grid {grid} has {int(np.prod(grid))}")
    x = attn.float().reshape(b, h, *grid)
    size = tuple(int(s) for s in size)
    if size == grid:
        return x.clone()
    mode = "trilinear" if len(grid) == 3 else "bilinear"
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


class SwinCAProbe(nn.Module):
    """SA-branch attention maps of a :class:`~medspan.models.swin_ca.SwinCA` (or a model holding one).

    Args:
        model: a ``SwinCA``, or a module with a ``backbone`` attribute (e.g. ``SmartFormer``).
        mean_head: append the mean of the heads as one more map.

    Shapes: (B, C, *S) -> (B, H (+1), *S) float32, each head's map a distribution over the stage-3
    cells, resampled.
    """

    def __init__(self, model: nn.Module, mean_head: bool = True) -> None:
        super().__init__()
        self.backbone = getattr(model, "backbone", model)
        self.mean_head = bool(mean_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone.forward_features(x)
        attn = out.cls_attn.float()
        if self.mean_head:
            attn = torch.cat([attn, attn.mean(1, keepdim=True)], dim=1)
        return attention_to_volume(attn, out.grid, tuple(x.shape[2:]))


def best_slices(label: np.ndarray | None, shape: Sequence[int]) -> tuple[int, int]:
    """``(axial z, coronal y)``: where the union of the label channels (S, x, y, z) is largest, else the centre."""
    if label is None or not np.any(label):
        return int(shape[2]) // 2, int(shape[1]) // 2
    u = np.any(label > 0.5, axis=0)
    return int(np.argmax(u.sum(axis=(0, 1)))), int(np.argmax(u.sum(axis=(0, 2))))


def write_attention_slices(
    image: np.ndarray,
    maps: np.ndarray,
    label: np.ndarray | None,
    titles: Sequence[str],
    stem: str | os.PathLike,
    mask_names: Sequence[str] | None = None,
    zoom: int = 2,
) -> list[Path]:
    """Axial and coronal PNG overlays of 3D maps: ``<stem>_axial.png`` and ``<stem>_coronal.png``.

    Args:
        image: (C, x, y, z) or (x, y, z).
        maps: (H, x, y, z).
        label: (S, x, y, z) masks or None.
        titles: H panel titles.
        stem: path without suffix.
    """
    img = image[0] if image.ndim == 4 else image
    z, y = best_slices(label, img.shape)
    written = []
    for name, sl in (("axial", (slice(None), slice(None), z)), ("coronal", (slice(None), y, slice(None, None, -1)))):
        lab = None if label is None else label[(slice(None), *sl)] > 0.5
        path = Path(f"{stem}_{name}.png")
        written.append(
            attention_overlay(
                img[sl],
                maps[(slice(None), *sl)],
                lab,
                titles,
                path,
                zoom=zoom,
                image_title=f"{name} {'z' if name == 'axial' else 'y'}={z if name == 'axial' else y}",
                mask_names=mask_names,
            )
        )
    return written


def _affine(x: Any) -> np.ndarray:
    aff = getattr(x, "affine", None)
    return np.eye(4) if aff is None else np.asarray(torch.as_tensor(aff).detach().cpu(), dtype=float)


class AttentionSegReport3D(AttentionSegReport):
    """:class:`AttentionSegReport` for volumes: NIfTI maps + axial/coronal PNG slices per validation.

    Args (besides those of :class:`AttentionSegReport`):
        mean_head: the probe's last map is the mean of the heads (titles and summaries say so).
        zoom: PNG upscale.
    """

    def __init__(
        self,
        metric_name: str,
        output_dir: str | os.PathLike,
        n_overlay: int = 1,
        image_key: str = "image",
        label_key: str = "label",
        mean_head: bool = True,
        zoom: int = 2,
    ) -> None:
        super().__init__(metric_name, output_dir, n_overlay, image_key, label_key)
        self.mean_head = bool(mean_head)
        self.zoom = int(zoom)
        self._affines: list[np.ndarray] = []

    def _capture(self, engine: Engine) -> None:
        first = self._sample is None
        super()._capture(engine)
        if first and self._sample is not None:
            img = engine.state.output["image"] if isinstance(engine.state.output, dict) else None
            n = self._sample["image"].shape[0]
            self._affines = [_affine(img[i]) if img is not None else np.eye(4) for i in range(n)]

    def _report(self, engine: Engine) -> None:
        super()._report(engine)
        if self.last_summary is not None and self.last_summary.get("epoch") == int(engine.state.epoch):
            self.last_summary["mean_head"] = self.mean_head
            epoch = int(engine.state.epoch)
            write_json_atomic(self.last_summary, self.output_dir / "attention" / f"summary_epoch={epoch}.json")
            write_json_atomic(self.last_summary, self.output_dir / "latest_summary.json")

    def _overlay(self, metric: AttentionSegMetric, epoch: int) -> None:
        s = self._sample
        assert s is not None
        names = {h: metric.structures[t] for h, t in metric.head_to_structure.items()}
        n_maps = s["pred"].shape[1]
        n_heads = n_maps - 1 if self.mean_head else n_maps
        titles = [f"head {h}" + (f": {names[h]}" if h in names else "") for h in range(n_heads)]
        if self.mean_head:
            titles.append("mean of heads")
        for i in range(s["image"].shape[0]):
            try:
                maps = s["pred"][i].numpy()
                aff = self._affines[i] if i < len(self._affines) else np.eye(4)
                path = self.output_dir / "attention" / f"maps_epoch={epoch}_img{i}.nii.gz"
                write_nifti_atomic(maps, path, aff, channel_dim=0)  # (x, y, z, H)
                write_attention_slices(
                    s["image"][i].numpy(),
                    maps,
                    s["label"][i].numpy(),
                    titles,
                    self.output_dir / "overlays" / f"attention_epoch={epoch}_img{i}",
                    metric.structures,
                    self.zoom,
                )
            except Exception as e:  # a picture must never stop training
                logger.warning("attention pictures of epoch %d failed: %s", epoch, e)


def _grey(x: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(x, 0.0, 1.0)[..., None] * 255.0, 3, axis=-1)


class ReconstructionPreview:
    """Trainer handler: ``previews/recon_epoch=N.png`` from the trainer's kept sample (``trainer.preview``).

    Columns: input u | teacher input (dropped patches black) | teacher attention (head mean) |
    student input (masked cells slate blue) | reconstruction (visible voxels + predicted masked voxels) |
    raw prediction. Rows: the axial and the coronal slice through the crop centre. Intensities are
    the [0, 1] CT window of the bundle.

    Args:
        output_dir: run folder.
        every: write every this many epochs (the last epoch always).
        zoom: integer upscale of each panel.
    """

    def __init__(self, output_dir: str | os.PathLike, every: int = 1, zoom: int = 3) -> None:
        self.output_dir = Path(output_dir)
        self.every = max(1, int(every))
        self.zoom = max(1, int(zoom))
        self.written: list[Path] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> Path | None:
        epoch = int(engine.state.epoch)
        if (epoch % self.every and epoch != engine.state.max_epochs) or not is_main_rank():
            return None
        p = getattr(engine, "preview", None)
        if not p:
            return None
        try:
            path = self.render(p, self.output_dir / "previews" / f"recon_epoch={epoch}.png", self.zoom)
        except Exception as e:  # never stop training for a picture
            logger.warning("reconstruction preview of epoch %d failed: %s", epoch, e)
            return None
        self.written.append(path)
        return path

    @staticmethod
    def render(p: dict[str, torch.Tensor], path: str | os.PathLike, zoom: int = 3) -> Path:
        """Draw the preview of one kept sample (see the class docstring) into ``path``."""
        img = p["image"].float().cpu().numpy()[0]  # (x, y, z)
        rec = p["recon"].float().cpu().numpy()[0]
        vmask = p["mask"].cpu().numpy().astype(bool)
        ps = int(p.get("patch_size", torch.tensor(1)))
        drop = p["teacher_drop"].cpu()
        drop_vox = drop.numpy().astype(bool)
        for axis in range(drop_vox.ndim):
            drop_vox = drop_vox.repeat(ps, axis=axis)
        attn = p["teacher_attn"].float().cpu()[None, None]
        attn = F.interpolate(attn, size=img.shape, mode="trilinear", align_corners=False)[0, 0].numpy()
        attn = (attn - attn.min()) / (np.ptp(attn) + 1e-12)
        filled = np.where(vmask, rec, img)
        cz, cy = img.shape[2] // 2, img.shape[1] // 2
        rows = []
        for sl in ((slice(None), slice(None), cz), (slice(None), cy, slice(None, None, -1))):
            base = img[sl].T  # picture (rows, cols)
            teacher_in = np.where(drop_vox[sl].T, 0.0, base)
            student_in = _grey(base)
            student_in[vmask[sl].T] = np.array([70.0, 110.0, 160.0])  # masked cells in slate blue
            a = attn[sl].T
            heat = _grey(base) * (1 - 0.75 * a[..., None]) + heat_colormap(a) * 0.75 * a[..., None]
            rows.append([_grey(base), _grey(teacher_in), heat, student_in, _grey(filled[sl].T), _grey(rec[sl].T)])
        titles = ["input u", "teacher input", "teacher attention", "student input", "reconstruction", "prediction"]
        ph, pw = rows[0][0].shape[0] * zoom, rows[0][0].shape[1] * zoom
        n = len(titles)
        canvas = Image.new("RGB", (n * pw + (n - 1) * GAP, TITLE_HEIGHT + len(rows) * ph + GAP), (0, 0, 0))
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default()
        for k, t in enumerate(titles):
            draw.text((k * (pw + GAP) + 2, 1), t, fill=(255, 255, 255), font=font)
        for r, row in enumerate(rows):
            for k, panel in enumerate(row):
                tile = Image.fromarray(np.clip(np.rint(panel), 0, 255).astype(np.uint8), mode="RGB")
                tile = tile.resize((pw, ph), Image.Resampling.NEAREST)
                canvas.paste(tile, (k * (pw + GAP), TITLE_HEIGHT + r * (ph + GAP)))
        return write_png_atomic(canvas, path)


class AttentionVolumeWriter:
    """Evaluator handler (inference): ``<stem>_attention.nii.gz`` (x, y, z, H) and axial/coronal PNGs per volume.

    Args:
        output_dir: destination folder.
        head_titles: one title per map.

    The evaluator output must hold ``image`` (B, C, x, y, z) and ``pred`` (B, H, x, y, z).
    """

    def __init__(self, output_dir: str | os.PathLike, head_titles: Sequence[str] | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.head_titles = list(head_titles) if head_titles else None
        self.written: list[Path] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        images, maps = out["image"], out["pred"]
        names = image_stems(images)
        for b in range(maps.shape[0]):
            m = maps[b].detach().float().cpu().numpy()
            img = torch.as_tensor(images[b]).detach().float().cpu().numpy()
            titles = self.head_titles or [f"head {h}" for h in range(m.shape[0])]
            self.written.append(
                write_nifti_atomic(m, self.output_dir / f"{names[b]}_attention.nii.gz", _affine(images[b]), channel_dim=0)
            )
            self.written += write_attention_slices(img, m, None, titles[: m.shape[0]], self.output_dir / names[b])


def grid_affine(affine: np.ndarray, factor: Sequence[float]) -> np.ndarray:
    """Affine of a grid whose cells are ``factor`` voxels of ``affine``'s grid (cell centres, same origin corner).

    Example:
        >>> grid_affine(np.diag([2.0, 2.0, 2.0, 1.0]), (16, 16, 16))[:3, 3].tolist()   # centre of cell 0
        [15.0, 15.0, 15.0]
    """
    n = len(factor)
    scale = np.eye(n + 1)
    for i, f in enumerate(factor):
        scale[i, i] = float(f)
        scale[i, n] = (float(f) - 1.0) / 2.0
    return np.asarray(affine, dtype=float) @ scale


class AttentionSnapshot:
    """Trainer handler: every ``every`` epochs, the teacher's class-attention maps of one fixed validation volume.

    Writes ``attention/maps_epoch=N.nii.gz`` -- float32 (gx, gy, gz, H[+1]) on the stage-3 token grid with
    the matching affine (cell centres; a viewer overlays it on the CT) -- and
    ``overlays/attention_epoch=N_{axial,coronal}.png`` (maps upsampled to the crop, organ contours).

    Args:
        network: the teacher (:class:`~medspan.models.swin_ca.SmartFormer` or :class:`~medspan.models.swin_ca.SwinCA`).
        dataset: the validation dataset; item ``index`` gives ``image`` (C, x, y, z) and optionally ``label``.
        output_dir: run folder.
        structures: label channel names (legend).
        head_names: ``{head: structure}`` for the titles of prior-guided heads.
        mean_head: add the mean of the heads.
        index: which validation item.
        every: epochs between snapshots (the last epoch always).
    """

    def __init__(
        self,
        network: nn.Module,
        dataset: Any,
        output_dir: str | os.PathLike,
        structures: Sequence[str] | None = None,
        head_names: dict | None = None,
        mean_head: bool = True,
        index: int = 0,
        every: int = 1,
        zoom: int = 2,
    ) -> None:
        self.probe = SwinCAProbe(network, mean_head=mean_head)
        self.dataset = dataset
        self.output_dir = Path(output_dir)
        self.structures = list(structures) if structures else None
        self.head_names = {int(k): str(v) for k, v in (head_names or {}).items()}
        self.mean_head = bool(mean_head)
        self.index = int(index)
        self.every = max(1, int(every))
        self.zoom = int(zoom)
        self.written: list[Path] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        if (epoch % self.every and epoch != engine.state.max_epochs) or not is_main_rank():
            return
        try:
            self.write(epoch)
        except Exception as e:  # a picture must never stop training
            logger.warning("attention snapshot of epoch %d failed: %s", epoch, e)

    def write(self, epoch: int) -> list[Path]:
        """Compute and write the snapshot of ``epoch``; returns the written paths."""
        item = self.dataset[self.index]
        image = item["image"]
        backbone = self.probe.backbone
        device = next(backbone.parameters()).device
        x = torch.as_tensor(image).float()[None].to(device)
        was_training = backbone.training
        backbone.eval()
        try:
            with torch.no_grad():
                out = backbone.forward_features(x)
        finally:
            backbone.train(was_training)
        attn = out.cls_attn.float()
        if self.mean_head:
            attn = torch.cat([attn, attn.mean(1, keepdim=True)], dim=1)
        grid = out.grid
        coarse = attn[0].reshape(attn.shape[1], *grid).cpu().numpy()
        factor = [s / g for s, g in zip(x.shape[2:], grid)]
        path = self.output_dir / "attention" / f"maps_epoch={epoch}.nii.gz"
        paths = [write_nifti_atomic(coarse, path, grid_affine(_affine(image), factor), channel_dim=0)]
        maps = attention_to_volume(attn.cpu(), grid, tuple(x.shape[2:]))[0].numpy()
        n_heads = attn.shape[1] - (1 if self.mean_head else 0)
        titles = [f"head {h}" + (f": {self.head_names[h]}" if h in self.head_names else "") for h in range(n_heads)]
        if self.mean_head:
            titles.append("mean of heads")
        label = item.get("label")
        lab = None if label is None else torch.as_tensor(label).float().numpy()
        img = torch.as_tensor(image).float().numpy()
        paths += write_attention_slices(img, maps, lab, titles, self.output_dir / "overlays" / f"attention_epoch={epoch}",
                                        self.structures, self.zoom)
        self.written += paths
        return paths
