"""Checks that bring a per-image prior onto its image's grid before any augmentation.

A prior file (``.npy`` float16, channel first, see :mod:`medspan.atlas.statistics`) covers the
same field of view as its image, on the same grid or a coarser one with the same aspect ratio.
:class:`PriorToImaged` checks that, resamples the prior to the image grid (linear) when needed,
and from then on every spatial transform moves image and prior together.

Example::

    PriorToImaged(image_key="image", prior_key="prior", n_structures=3)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import MapTransform

from medspan.data.datalist import prior_shape_problem
from medspan.data.transforms import source_name
from medspan.errors import DataError

__all__ = ["PriorToImaged"]


class PriorToImaged(MapTransform):
    """Validate the prior of an image and resample it onto the image grid.

    Args:
        image_key: key of the channel-first image (C, *spatial).
        prior_key: key of the channel-first prior (S, *spatial').
        n_structures: expected number of prior channels (None: any).
        aspect_tol: relative tolerance on the aspect ratio of prior vs image.

    Raises:
        DataError: naming the prior file and the image file: wrong number of dims or channels,
            a different field of view (aspect ratio), or non-finite values.
    """

    def __init__(
        self,
        image_key: str = "image",
        prior_key: str = "prior",
        n_structures: int | None = None,
        aspect_tol: float = 0.02,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__([prior_key], allow_missing_keys)
        self.image_key, self.prior_key = image_key, prior_key
        self.n_structures = n_structures
        self.aspect_tol = aspect_tol

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.prior_key not in d:
            if self.allow_missing_keys:
                return d
            raise DataError(source_name(d.get(self.image_key)), f"entry has no '{self.prior_key}'")
        img, prior = d[self.image_key], d[self.prior_key]
        where = f"{source_name(prior)} (prior of {source_name(img)})"
        sdim = img.ndim - 1
        # the same rule (and words) as `medspan check-datalist --shapes`
        problem = prior_shape_problem(tuple(img.shape[1:]), tuple(prior.shape), self.n_structures, self.aspect_tol)
        if problem is not None:
            raise DataError(where, problem)
        ishape, pshape = tuple(img.shape[1:]), tuple(prior.shape[1:])
        p = torch.as_tensor(prior).float()
        if not torch.isfinite(p).all():
            raise DataError(where, "prior has NaN or infinite values")
        if ishape != pshape:
            mode = "bilinear" if sdim == 2 else "trilinear"
            p = F.interpolate(p[None], size=ishape, mode=mode, align_corners=False)[0]
        meta = dict(getattr(img, "meta", {}) or {})
        meta["filename_or_obj"] = source_name(prior)
        d[self.prior_key] = MetaTensor(p.clamp_(0, 1), affine=getattr(img, "affine", None), meta=meta)
        return d
