"""Fixed-size crops of CT volumes for SMARTFormer: two random views for training, a centre crop for validation.

* :class:`RandCropViewsd` cuts ``num_views`` random ``roi_size`` crops out of the same volume (the
  views u and v of DAGMaN; SMIT takes two crops inside one region, which overlap heavily) and
  stacks them as ``(V, C, *roi)`` under ``out_key``; keys listed after the first (e.g. a prior) get
  exactly the same boxes (``(V, S, *roi)`` under their own output key).
* :class:`CenterCropStrictd` cuts the central ``roi_size`` box of every key (validation).

Both refuse a volume smaller than the crop with a :class:`~medspan.errors.DataError` naming the file
and both sizes, instead of padding it silently (a short CT slab padded with air is not a chest).

Array convention: MONAI channel-first ``(C, x, y, z)`` (or ``(C, x, y)``); crops keep it.

Example::

    >>> t = RandCropViewsd(keys=["image", "prior"], roi_size=32, out_keys=["views", "view_priors"])
    >>> _ = t.set_random_state(0)
    >>> out = t({"image": torch.rand(1, 40, 40, 36), "prior": torch.rand(3, 40, 40, 36)})
    >>> tuple(out["views"].shape), tuple(out["view_priors"].shape), tuple(out["view_boxes"].shape)
    ((2, 1, 32, 32, 32), (2, 3, 32, 32, 32), (2, 3))
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_tensor, ensure_tuple, ensure_tuple_rep

from medspan.data.transforms import source_name
from medspan.errors import DataError

__all__ = ["CenterCropStrictd", "RandCropViewsd", "check_fits"]


def check_fits(x: Any, roi: Sequence[int], where: str, what: str = "crop") -> tuple[int, ...]:
    """Spatial shape of channel-first ``x``; DataError naming ``where`` if it is smaller than ``roi`` anywhere."""
    shape = tuple(int(s) for s in x.shape[1:])
    if len(shape) != len(roi):
        raise DataError(
            where, f"expected a channel-first volume with {len(roi)} spatial dims, got shape {tuple(x.shape)}"
        )
    if any(s < r for s, r in zip(shape, roi)):
        raise DataError(
            where,
            f"volume of {shape} voxels (after resampling) is smaller than the {what} size {tuple(roi)}; "
            "use a smaller crop or a coarser spacing, or leave this scan out",
        )
    return shape


def _crop(x: torch.Tensor, start: Sequence[int], roi: Sequence[int]) -> torch.Tensor:
    sl = (slice(None),) + tuple(slice(int(s), int(s) + int(r)) for s, r in zip(start, roi))
    return x[sl]


class RandCropViewsd(Randomizable, MapTransform):
    """``num_views`` random crops of the same volume, the same boxes for every key.

    Args:
        keys: the image key first, then keys that must follow it (priors), all channel-first on the
            same grid.
        roi_size: crop size (int or one per spatial axis).
        num_views: number of views V (2: u and v).
        out_keys: output key per input key (default ``"<key>_views"``); the inputs are removed.
        box_key: where the crop starts ``(V, nsp)`` int64 are stored (None: not stored).

    Output: ``out_key`` -> float tensor ``(V, C, *roi)`` (plain tensor, no meta).
    """

    def __init__(
        self,
        keys: KeysCollection,
        roi_size: int | Sequence[int],
        num_views: int = 2,
        out_keys: KeysCollection | None = None,
        box_key: str | None = "view_boxes",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.roi_size = roi_size
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        self.num_views = int(num_views)
        outs = ensure_tuple(out_keys) if out_keys is not None else tuple(f"{k}_views" for k in self.keys)
        if len(outs) != len(self.keys):
            raise ValueError(f"{len(self.keys)} keys but {len(outs)} out_keys")
        self.out_keys = outs
        self.box_key = box_key

    def randomize(self, shape: Sequence[int], roi: Sequence[int]) -> np.ndarray:
        starts = [[int(self.R.randint(0, s - r + 1)) for s, r in zip(shape, roi)] for _ in range(self.num_views)]
        return np.asarray(starts, dtype=np.int64)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        present = [(k, o) for k, o in zip(self.keys, self.out_keys) if k in d]
        if not present:
            if self.allow_missing_keys:
                return d
            raise KeyError(f"none of {self.keys} in the data")
        ref_key = present[0][0]
        ref = d[ref_key]
        where = source_name(ref, d, ref_key)
        roi = tuple(int(r) for r in ensure_tuple_rep(self.roi_size, ref.ndim - 1))
        shape = check_fits(ref, roi, where)
        for k, _ in present[1:]:
            other = tuple(int(s) for s in d[k].shape[1:])
            if other != shape:
                raise DataError(
                    source_name(d[k], d, k), f"spatial shape {other} differs from '{ref_key}' {shape} ({where})"
                )
        starts = self.randomize(shape, roi)
        for k, o in present:
            x = convert_to_tensor(d.pop(k), dtype=torch.float32, track_meta=False)
            d[o] = torch.stack([_crop(x, s, roi) for s in starts])
        if self.box_key:
            d[self.box_key] = torch.as_tensor(starts)
        return d


class CenterCropStrictd(MapTransform):
    """Central ``roi_size`` box of every key (same box for all); DataError when a volume is smaller.

    Args:
        keys: channel-first arrays on the same grid (image, label, ...).
        roi_size: crop size (int or one per spatial axis).

    MetaTensors keep their meta; the affine is shifted to the box origin.
    """

    def __init__(self, keys: KeysCollection, roi_size: int | Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.roi_size = roi_size

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            where = source_name(x, d, key)
            roi = tuple(int(r) for r in ensure_tuple_rep(self.roi_size, x.ndim - 1))
            shape = check_fits(x, roi, where)
            start = [(s - r) // 2 for s, r in zip(shape, roi)]
            out = _crop(x, start, roi)
            if isinstance(x, MetaTensor):
                aff = x.affine.clone().to(torch.float64)
                n = len(roi)
                aff[:n, n] = aff[:n, n] + aff[:n, :n] @ torch.as_tensor(start, dtype=torch.float64)
                out = MetaTensor(
                    out.as_tensor().clone(), affine=aff, meta={k: v for k, v in x.meta.items() if k != "affine"}
                )
            d[key] = out
        return d
