"""DINO multi-crop views of a radiograph whose anatomical priors move with it.

SPAN pulls chosen attention heads toward per-image organ priors. DINO's random resized crops
shift the anatomy in every view, so the prior of a global view must be cut, resized and flipped
exactly like the view itself. :class:`MultiCropd` does this: each global view's image and prior
go through the *same* box and the *same* ``torch.nn.functional.interpolate`` call (image and
prior channels concatenated), so a prior equal to the image yields a ``global_priors`` equal to
``global_crops`` bit for bit (with intensity augmentation off). The intensity jitter of each view
is composed from MONAI's random intensity transforms (:func:`view_jitter`); the joint image +
prior geometry is medspan's.

Axis convention: MONAI's ``LoadImaged`` gives 2D images as ``(C, x, y)``, i.e. columns first.
Crop boxes are ``(x0, y0, x1, y1)`` in input pixel indices along those axes (``x1``/``y1``
exclusive); the aspect ratio of a box is ``(x1 - x0) / (y1 - y0)`` = width / height, as in
torchvision's ``RandomResizedCrop``. Outputs keep the ``(.., x, y)`` order.

Example::

    >>> import torch
    >>> t = MultiCropd(global_size=32, local_size=16, n_local=2, intensity=False)
    >>> _ = t.set_random_state(0)
    >>> out = t({"image": torch.rand(1, 64, 64), "prior": torch.rand(3, 64, 64)})
    >>> tuple(out["global_crops"].shape), tuple(out["global_priors"].shape)
    ((2, 1, 32, 32), (2, 3, 32, 32))
    >>> tuple(out["local_crops"].shape), tuple(out["global_boxes"].shape)
    ((2, 1, 16, 16), (2, 4))
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import get_track_meta, set_track_meta
from monai.networks.layers import gaussian_1d, separable_filtering
from monai.transforms import (
    Compose,
    Identity,
    Lambda,
    MapTransform,
    OneOf,
    RandAdjustContrast,
    RandGaussianNoise,
    RandLambda,
    Randomizable,
    RandomizableTransform,
    RandScaleIntensity,
    RandScaleIntensityFixedMean,
)
from monai.utils import MAX_SEED, convert_to_tensor

from medspan.data.transforms import source_name
from medspan.errors import DataError

__all__ = [
    "MultiCropd",
    "RandIsotropicGaussianBlur",
    "ViewParams",
    "crop_and_resize",
    "resize",
    "sample_crop_box",
    "view_jitter",
]

Box = tuple[int, int, int, int]
FLIP_MODES = ("none", "swap", "plain")


# ----------------------------------------------------------------------------- geometry


def sample_crop_box(
    rng: np.random.RandomState,
    spatial_shape: Sequence[int],
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> Box:
    """Sample a RandomResizedCrop box ``(x0, y0, x1, y1)`` in a ``(x, y)`` image.

    The area fraction is uniform in ``scale``, the aspect ratio width/height = dx/dy is
    log-uniform in ``ratio``; a box that does not fit is redrawn up to ``attempts`` times, then
    the largest centred box whose ratio lies in ``ratio`` is returned.

    Args:
        rng: the only source of randomness (e.g. a transform's ``self.R``).
        spatial_shape: ``(X, Y)`` of the image.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of width/height = dx/dy.
        attempts: draws before the centre-crop fallback.

    Returns:
        integer box ``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive.

    Example::

        >>> sample_crop_box(np.random.RandomState(0), (64, 48), scale=(1, 1), ratio=(1, 1))
        (8, 0, 56, 48)
    """
    width, height = int(spatial_shape[0]), int(spatial_shape[1])
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.randint(0, width - w + 1))
            y0 = int(rng.randint(0, height - h + 1))
            return (x0, y0, x0 + w, y0 + h)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    w, h = max(1, min(w, width)), max(1, min(h, height))
    x0, y0 = (width - w) // 2, (height - h) // 2
    return (x0, y0, x0 + w, y0 + h)


def resize(x: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Bilinear resize of a ``(C, X, Y)`` float tensor to ``(C, *size)``.

    ``align_corners=False``; antialiasing is switched on when either axis shrinks. Every
    channel goes through the same ``interpolate`` call, so identical channels stay identical.
    A resize to the same shape returns a copy of the input.
    """
    out = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == out:
        return x.clone()
    antialias = x.shape[-2] > out[0] or x.shape[-1] > out[1]
    return F.interpolate(
        x.unsqueeze(0), size=out, mode="bilinear", align_corners=False, antialias=antialias
    )[0]


def crop_and_resize(x: torch.Tensor, box: Sequence[int], size: int | Sequence[int]) -> torch.Tensor:
    """Cut ``box = (x0, y0, x1, y1)`` out of a ``(C, X, Y)`` tensor and resize it (see :func:`resize`).

    Example::

        >>> img = torch.zeros(1, 8, 8); img[0, 3, 5] = 1.0
        >>> crop_and_resize(img, (2, 4, 6, 8), 4)[0].nonzero().tolist()
        [[1, 1]]
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    return resize(x[:, x0:x1, y0:y1], size)


# ----------------------------------------------------------------------------- intensity


class RandIsotropicGaussianBlur(RandomizableTransform):
    """Gaussian blur of a ``(C, *spatial)`` view with ONE sigma for every axis, reflect padding (DINO's blur).

    With probability ``prob``, sigma is drawn uniformly in ``sigma`` (pixels) and the view is
    filtered with MONAI's ``separable_filtering`` and a sampled Gaussian kernel of radius
    ``round(truncated * sigma)`` (edge replicated instead when the radius reaches a view side).
    MONAI's ``RandGaussianSmooth`` draws one sigma per axis and pads with zeros, which darkens the
    border of a view; hence this small transform.

    Example::

        >>> out = RandIsotropicGaussianBlur(sigma=(1.0, 1.0), prob=1.0)(torch.ones(1, 8, 8))
        >>> bool(torch.allclose(out, torch.ones(1, 8, 8)))
        True
    """

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0), prob: float = 0.5, truncated: float = 3.0) -> None:
        RandomizableTransform.__init__(self, prob)
        self.sigma_range = (float(sigma[0]), float(sigma[1]))
        self.truncated = float(truncated)
        self.sigma = self.sigma_range[0]

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.sigma = float(self.R.uniform(*self.sigma_range))

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        x = convert_to_tensor(img, dtype=torch.float32, track_meta=False)
        kernel = gaussian_1d(torch.tensor(self.sigma), truncated=self.truncated, approx="sampled", normalize=True)
        radius = (kernel.numel() - 1) // 2
        mode = "reflect" if radius < min(x.shape[1:]) else "replicate"
        return separable_filtering(x[None], [kernel.to(x)] * (x.ndim - 1), mode=mode)[0]


def _clip_unit(u: torch.Tensor) -> torch.Tensor:
    return u.clamp(0.0, 1.0)


def _solarize(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u >= 0.5, 1.0 - u, u)


def view_jitter(
    jitter_prob: float = 0.8,
    brightness: float = 0.4,
    contrast: float = 0.4,
    gamma_prob: float = 0.5,
    gamma: Sequence[float] = (0.7, 1.5),
    blur_prob: float = 0.5,
    blur_sigma: Sequence[float] = (0.1, 2.0),
    noise_prob: float = 0.2,
    noise_std: float = 0.03,
    solarize_prob: float = 0.0,
) -> Compose:
    """The radiograph intensity jitter of one view, on intensities scaled to ``[0, 1]``, from MONAI parts.

    In order: with probability ``jitter_prob`` brightness (``RandScaleIntensity``, factor in
    ``1 ± brightness``) then contrast about the mean (``RandScaleIntensityFixedMean``, factor in
    ``1 ± contrast``), each clipped to [0, 1]; gamma (``RandAdjustContrast``, gamma uniform in
    ``gamma``, probability ``gamma_prob``); Gaussian blur (:class:`RandIsotropicGaussianBlur`,
    sigma in ``blur_sigma`` pixels, probability ``blur_prob``); Gaussian noise (``RandGaussianNoise``,
    std uniform in ``[0, noise_std]``, probability ``noise_prob``), clipped; solarization (values
    ``>= 0.5`` become ``1 - u``, probability ``solarize_prob``).

    Returns:
        a MONAI ``Compose`` mapping a ``(C, x, y)`` tensor in [0, 1] to one of the same shape.
    """
    clip = Lambda(func=_clip_unit, track_meta=False)
    colour = Compose([
        RandScaleIntensity(factors=brightness, prob=1.0),
        clip,
        RandScaleIntensityFixedMean(prob=1.0, factors=contrast, fixed_mean=True),
        clip,
    ])
    parts = [
        OneOf([colour, Identity()], weights=(jitter_prob, 1.0 - jitter_prob)) if jitter_prob < 1.0 else colour,
        RandAdjustContrast(prob=gamma_prob, gamma=tuple(gamma)),
        RandIsotropicGaussianBlur(sigma=blur_sigma, prob=blur_prob),
        RandGaussianNoise(prob=noise_prob, mean=0.0, std=noise_std, sample_std=True),
        clip,
    ]
    if solarize_prob > 0:
        parts.append(RandLambda(func=_solarize, prob=solarize_prob, track_meta=False))
    return Compose(parts)


def _jitter_in_unit_range(x: torch.Tensor, jitter: Compose, value_range: tuple[float, float] | None) -> torch.Tensor:
    """Run ``jitter`` on ``u = (x - lo) / (hi - lo)`` clipped to [0, 1] and map back to ``[lo, hi]``.

    ``lo, hi``: the view's min/max, or ``value_range``. Returns a plain float32 tensor.
    """
    if value_range is None:
        lo, hi = float(x.min()), float(x.max())
    else:
        lo, hi = float(value_range[0]), float(value_range[1])
    span = hi - lo if hi > lo else 1.0
    u = ((x - lo) / span).clamp_(0.0, 1.0)
    # A view is a plain tensor whose metadata is dropped anyway, and MONAI's MetaTensor bookkeeping
    # costs several times the jitter itself on views this small. MONAI keeps this switch global:
    # the jitter must not run beside other transforms in threads of the same process (the bundles'
    # DataLoader runs transforms in the main thread or in worker processes).
    tracking = get_track_meta()
    set_track_meta(False)
    try:
        u = convert_to_tensor(jitter(u), track_meta=False)
    finally:
        set_track_meta(tracking)
    return (u * span + lo).to(torch.float32)


@dataclass
class ViewParams:
    """Geometry of one view: crop box ``(x0, y0, x1, y1)`` and whether it is mirrored."""

    box: Box
    flip: bool = False


# ----------------------------------------------------------------------------- helpers


def _plain(x: Any) -> torch.Tensor:
    """A plain float32 torch tensor (MetaTensor meta dropped, numpy accepted)."""
    return convert_to_tensor(x, dtype=torch.float32, track_meta=False)


def _gather_image(data: Mapping[Hashable, Any], keys: Sequence[Hashable]) -> tuple[torch.Tensor, str]:
    """Concatenate the ``(C, x, y)`` arrays under ``keys`` along channels; validate shapes."""
    where = source_name(data[keys[0]], data, keys[0])
    parts = []
    for key in keys:
        x = _plain(data[key])
        if x.ndim != 3:
            raise DataError(
                source_name(data[key], data, key),
                f"'{key}' must be a 2D image of shape (C, x, y), got shape {tuple(x.shape)}",
            )
        if parts and x.shape[1:] != parts[0].shape[1:]:
            raise DataError(
                source_name(data[key], data, key),
                f"'{key}' spatial shape {tuple(x.shape[1:])} differs from '{keys[0]}' "
                f"spatial shape {tuple(parts[0].shape[1:])}",
            )
        parts.append(x)
    return (parts[0] if len(parts) == 1 else torch.cat(parts, 0)), where


def _gather_prior(
    data: Mapping[Hashable, Any], prior_key: Hashable, image: torch.Tensor, where: str, what: str = "prior"
) -> torch.Tensor:
    prior = _plain(data[prior_key])
    if prior.ndim != 3 or prior.shape[1:] != image.shape[1:]:
        raise DataError(
            where,
            f"{what} '{prior_key}' has shape {tuple(prior.shape)} but the image has shape "
            f"{tuple(image.shape)}; the {what} must be (S, x, y) on the image's spatial grid "
            f"{tuple(image.shape[1:])}",
        )
    return prior


# ----------------------------------------------------------------------------- transforms


class MultiCropd(Randomizable, MapTransform):
    """DINO multi-crop of a ``(C, x, y)`` radiograph; priors follow the global views exactly.

    Output keys (plain ``torch.float32`` tensors unless noted):

    * ``global_crops``  ``(n_global, C, G, G)``
    * ``global_priors`` ``(n_global, S, G, G)`` only when ``prior_key`` is in the dict
    * ``local_crops``   ``(n_local, C, L, L)`` (``(0, C, L, L)`` when ``n_local == 0``)
    * ``global_boxes``  ``(n_global, 4)`` int64 boxes ``(x0, y0, x1, y1)`` in input pixels
    * ``local_boxes``   ``(n_local, 4)`` int64
    * ``global_flips``  ``(n_global,)`` bool, whether each global view was mirrored

    Geometry: RandomResizedCrop semantics (area fraction uniform in ``*_scale``, aspect
    dx/dy log-uniform in ``ratio``, 10 attempts then a centred fallback, see
    :func:`sample_crop_box`), bilinear resize with antialiasing when shrinking. Each global
    view's image and prior channels are concatenated and resized in ONE ``interpolate`` call,
    so if the prior equals the image the two outputs are bit-identical (intensity off).

    Flipping (mirror along spatial axis ``flip_spatial_axis``, default 0 = x = the image's
    left-right axis in MONAI's order), one coin per view with probability ``flip_prob``:

    * ``"none"`` (default, recommended for chest X-rays): never flip. The heart lies on one side,
      and a mirrored radiograph shows an anatomy that does not occur in the data.
    * ``"swap"``: mirror image and priors, then exchange the prior channels of each pair in
      ``swap_pairs`` (e.g. ``(left_lung, right_lung)``). After a mirror, the patient's left lung
      appears on the side where the right lung normally is. Swapping makes paired channels
      *position-named*: channel ``left_lung`` then marks the lung on the side of the picture where
      the left lung appears in a normal radiograph (the mirrored right lung, whose outline
      looks roughly like a left lung there). This is what SPAN needs. A head is tied to a
      structure by name and is evaluated on unflipped images, where each lung has a fixed side.
      With swapping, the head's target in a flipped view lies on the same side and has about
      the same shape as in every normal view, so the DINO augmentation gives the head no
      conflicting target. Unpaired channels (the heart) are only mirrored, so they follow
      their organ wherever it ends up.
    * ``"plain"``: mirror image and priors together with no swap. The channels stay *anatomical*
      (``left_lung`` = the patient's left lung, now on the other side). This is geometrically
      exact, but a lung head must then jump sides depending on the heart's position, which is a
      rule the unflipped data never needs. Meant for structures with no left/right identity.

    Local views (no priors) are flipped with the same rule in "swap"/"plain" modes.

    Intensity (``intensity=True``): independent per view, single-channel friendly, never
    applied to priors; MONAI's random intensity transforms composed by :func:`view_jitter`.
    Brightness factor in ``1 ± brightness`` and contrast factor in ``1 ± contrast`` (together with
    probability ``jitter_prob``), gamma uniform in ``gamma`` (probability ``gamma_prob``), Gaussian
    blur with sigma in ``blur_sigma`` (output pixels) and probability ``blur_prob = (first global,
    other globals, locals)`` = DINO's (1.0, 0.1, 0.5), Gaussian noise with std up to ``noise_std``
    (fraction of the view's intensity range, probability ``noise_prob``), solarization of the
    second global view with probability ``solarize_prob`` (default 0 = off). Intensities are
    handled relative to each view's min/max (or ``value_range``) and are mapped back to that range
    afterwards.

    Randomness: boxes and flip coins come from ``self.R``, all boxes first, then all coins (drawn
    even in mode "none"), so the same seed gives the same boxes whatever the flip and intensity
    settings. The four jitters (first global, second global, other globals, locals) draw from
    their own generators, which :meth:`set_random_state` seeds from ``self.R`` (so ``Compose``,
    ``set_determinism`` and MONAI's DataLoader workers make the whole transform deterministic).

    Args:
        keys: image key(s); several keys are concatenated along channels.
        prior_key: key of the ``(S, x, y)`` prior on the image's grid, or ``None``. A dict
            without it gets no ``global_priors``.
        global_size / local_size: output side lengths G and L.
        n_global / n_local: number of views.
        global_scale / local_scale / ratio: RandomResizedCrop ranges.
        flip: "none" | "swap" | "plain" (see above).
        swap_pairs: prior channel index pairs exchanged by "swap".
        flip_prob: probability that a view is mirrored ("swap"/"plain").
        flip_spatial_axis: spatial axis mirrored (0 = x in MONAI's (x, y)).
        intensity: switch all intensity augmentation on/off.
        drop_source: remove the image key(s) and ``prior_key`` from the output dict (other keys
            such as labels or case ids are kept).
        value_range: fixed intensity range for the intensity augmentations instead of each
            view's min/max.

    Raises:
        DataError: the image is not ``(C, x, y)`` or the prior's shape does not match it. The
            message names the image's ``filename_or_obj`` and both shapes.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        prior_key: str | None = "prior",
        global_size: int = 224,
        local_size: int = 96,
        n_global: int = 2,
        n_local: int = 8,
        global_scale: Sequence[float] = (0.4, 1.0),
        local_scale: Sequence[float] = (0.05, 0.4),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip: str = "none",
        swap_pairs: Sequence[tuple[int, int]] = ((0, 1),),
        flip_prob: float = 0.5,
        intensity: bool = True,
        flip_spatial_axis: int = 0,
        drop_source: bool = True,
        jitter_prob: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        gamma_prob: float = 0.5,
        gamma: Sequence[float] = (0.7, 1.5),
        blur_prob: Sequence[float] = (1.0, 0.1, 0.5),
        blur_sigma: Sequence[float] = (0.1, 2.0),
        noise_prob: float = 0.2,
        noise_std: float = 0.03,
        solarize_prob: float = 0.0,
        value_range: tuple[float, float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
        if flip_spatial_axis not in (0, 1):
            raise ValueError(f"flip_spatial_axis must be 0 or 1 for 2D images, got {flip_spatial_axis}")
        if n_global < 0 or n_local < 0:
            raise ValueError(f"n_global and n_local must be >= 0, got {n_global}, {n_local}")
        if len(blur_prob) != 3:
            raise ValueError("blur_prob must be (first global, other globals, locals)")
        self.prior_key = prior_key
        self.global_size, self.local_size = int(global_size), int(local_size)
        self.n_global, self.n_local = int(n_global), int(n_local)
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.ratio = tuple(ratio)
        self.flip = flip
        self.swap_pairs = tuple((int(a), int(b)) for a, b in swap_pairs)
        self.flip_prob = float(flip_prob)
        self.flip_spatial_axis = int(flip_spatial_axis)
        self.intensity = bool(intensity)
        self.drop_source = bool(drop_source)
        self.value_range = value_range
        jitter = {
            "jitter_prob": jitter_prob, "brightness": brightness, "contrast": contrast, "gamma_prob": gamma_prob,
            "gamma": gamma, "blur_sigma": blur_sigma, "noise_prob": noise_prob, "noise_std": noise_std,
        }
        bp = tuple(float(p) for p in blur_prob)
        self.jitters = (
            view_jitter(blur_prob=bp[0], **jitter),  # first global view
            view_jitter(blur_prob=bp[1], solarize_prob=solarize_prob, **jitter),  # second global view
            view_jitter(blur_prob=bp[1], **jitter),  # other global views
            view_jitter(blur_prob=bp[2], **jitter),  # local views
        )
        self._seed_jitters()

    # -- randomness -------------------------------------------------------------------
    def _seed_jitters(self) -> None:
        for jitter in self.jitters:
            jitter.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> MultiCropd:
        """Seed ``self.R`` (boxes, flips) and, from it, the generators of the intensity jitters."""
        super().set_random_state(seed, state)
        self._seed_jitters()
        return self

    def randomize(self, data: Sequence[int]) -> tuple[list[ViewParams], list[ViewParams]]:
        """Draw all view parameters for an image of spatial shape ``data = (X, Y)``.

        Returns:
            ``(global_params, local_params)``, lists of :class:`ViewParams`.
        """
        spatial = tuple(int(s) for s in data)
        g = [ViewParams(sample_crop_box(self.R, spatial, self.global_scale, self.ratio)) for _ in range(self.n_global)]
        loc = [ViewParams(sample_crop_box(self.R, spatial, self.local_scale, self.ratio)) for _ in range(self.n_local)]
        for p in g + loc:
            coin = self.R.rand()
            p.flip = self.flip != "none" and coin < self.flip_prob
        return g, loc

    def _jitter(self, view: torch.Tensor, global_index: int | None) -> torch.Tensor:
        if not self.intensity:
            return view
        k = 3 if global_index is None else min(global_index, 2)
        return _jitter_in_unit_range(view, self.jitters[k], self.value_range)

    # -- application ------------------------------------------------------------------
    def _flip(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, dims=(1 + self.flip_spatial_axis,))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = [k for k in self.key_iterator(d)]
        if not keys:
            return d
        image, where = _gather_image(d, keys)
        c = image.shape[0]
        prior = None
        if self.prior_key is not None and self.prior_key in d:
            prior = _gather_prior(d, self.prior_key, image, where)
            s = prior.shape[0]
            bad = [i for pair in self.swap_pairs for i in pair if not 0 <= i < s]
            if self.flip == "swap" and bad:
                raise DataError(where, f"prior has {s} channels but swap_pairs {self.swap_pairs} refers to {bad}")
        perm = None
        if prior is not None and self.flip == "swap":
            perm = list(range(prior.shape[0]))
            for a, b in self.swap_pairs:
                perm[a], perm[b] = perm[b], perm[a]

        g_params, l_params = self.randomize(image.shape[1:])

        both = image if prior is None else torch.cat([image, prior], 0)
        crops, priors = [], []
        for i, p in enumerate(g_params):
            out = crop_and_resize(both, p.box, self.global_size)
            if p.flip:
                out = self._flip(out)
            crops.append(self._jitter(out[:c], i))
            if prior is not None:
                pr = out[c:]
                priors.append(pr[perm] if (p.flip and perm is not None) else pr)
        locs = []
        for p in l_params:
            out = crop_and_resize(image, p.box, self.local_size)
            if p.flip:
                out = self._flip(out)
            locs.append(self._jitter(out, None))

        g_side, l_side = self.global_size, self.local_size
        d["global_crops"] = torch.stack(crops).contiguous() if crops else image.new_zeros((0, c, g_side, g_side))
        if prior is not None:
            s = prior.shape[0]
            d["global_priors"] = torch.stack(priors).contiguous() if priors else prior.new_zeros((0, s, g_side, g_side))
        d["local_crops"] = torch.stack(locs).contiguous() if locs else image.new_zeros((0, c, l_side, l_side))
        d["global_boxes"] = torch.tensor([p.box for p in g_params], dtype=torch.int64).reshape(-1, 4)
        d["local_boxes"] = torch.tensor([p.box for p in l_params], dtype=torch.int64).reshape(-1, 4)
        d["global_flips"] = torch.tensor([p.flip for p in g_params], dtype=torch.bool)
        if self.drop_source:
            for key in keys:
                d.pop(key, None)
            if prior is not None:
                d.pop(self.prior_key, None)
        return d
