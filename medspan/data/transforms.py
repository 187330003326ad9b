"""Intensity and geometry transforms for CT and chest X-ray, as MONAI array + dict pairs.

All transforms take channel-first data: ``(C, x, y)`` for 2D, ``(C, x, y, z)`` for 3D (MONAI
axis order, as ``LoadImaged`` + ``EnsureChannelFirstd`` give it), as ``numpy.ndarray``,
``torch.Tensor`` or ``MetaTensor``. They validate their input first and raise
:class:`~medspan.errors.DataError` naming the file (``meta["filename_or_obj"]`` of a MetaTensor,
or the ``<key>_meta_dict`` of a dict) and stating expected vs. got.

- :class:`CTIntensity` / :class:`CTIntensityd`: HU window -> [b_min, b_max], rejects non-CT input.
- :class:`CXRNormalize` / :class:`CXRNormalized`: percentile normalisation of a radiograph to [0, 1].
- :class:`Standardize2D` / :class:`Standardize2Dd`, :class:`Standardize3D` /
  :class:`Standardize3Dd`: resample to a target spacing, then resize (aspect-preserving + pad)
  or pad/crop to a target size; the dict versions apply one geometry to every key.

Example::

    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
    from medspan.data.transforms import CXRNormalized, Standardize2Dd

    pre = Compose([
        LoadImaged(keys=["image", "label"]),
        EnsureChannelFirstd(keys=["image", "label"]),
        CXRNormalized(keys="image"),
        Standardize2Dd(keys=["image", "label"], spatial_size=256, mode=("bilinear", "nearest")),
    ])
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, ResizeWithPadOrCrop, Resize, Spacing, SpatialPad, Transform
from monai.utils import TransformBackends, ensure_tuple_rep

from medspan.errors import DataError

ArrayLike = np.ndarray | torch.Tensor

__all__ = [
    "CTIntensity",
    "CTIntensityd",
    "CXRNormalize",
    "CXRNormalized",
    "Standardize2D",
    "Standardize2Dd",
    "Standardize3D",
    "Standardize3Dd",
    "check_channel_first",
    "source_name",
]

#: meta-data keys that may hold the DICOM Modality (pydicom keyword, ITK tag, plain)
_MODALITY_KEYS = ("Modality", "modality", "0008|0060", "00080060")


# --------------------------------------------------------------------------------------------
# helpers: where does the data come from, is it what we expect
# --------------------------------------------------------------------------------------------


def _meta_of(x: Any, data: Mapping[Hashable, Any] | None = None, key: Hashable | None = None) -> Mapping:
    if isinstance(x, MetaTensor):
        return x.meta
    if data is not None and key is not None:
        md = data.get(f"{key}_meta_dict")
        if isinstance(md, Mapping):
            return md
    return {}


def source_name(x: Any, data: Mapping[Hashable, Any] | None = None, key: Hashable | None = None) -> str:
    """Name of the file ``x`` came from, for error messages.

    ``x.meta["filename_or_obj"]`` for a MetaTensor, else ``data[f"{key}_meta_dict"]``'s, else
    ``"<array>"``; with ``key`` the key is appended: ``"/d/a.png (key 'image')"``.
    """
    name = _meta_of(x, data, key).get("filename_or_obj")
    if isinstance(name, (list, tuple)) and name:
        name = name[0]
    text = str(name) if name not in (None, "") else "<array>"
    return f"{text} (key '{key}')" if key is not None else text


def _expected(spatial_dims: Sequence[int], num_channels: int | None) -> str:
    c = "C" if num_channels is None else str(num_channels)
    forms = {2: f"({c}, x, y)", 3: f"({c}, x, y, z)"}
    return " or ".join(forms[s] for s in sorted(spatial_dims))


def check_channel_first(
    x: Any,
    spatial_dims: int | Sequence[int],
    where: str,
    transform: str,
    *,
    num_channels: int | None = None,
    allow_bool: bool = False,
) -> None:
    """Raise DataError unless ``x`` is a numeric channel-first array with the right dims.

    Args:
        x: the array / tensor.
        spatial_dims: allowed number(s) of spatial dims (2, 3 or both).
        where: the file name for the message (see :func:`source_name`).
        transform: the transform's name for the message.
        num_channels: required channel count (``None``: any).
        allow_bool: accept a boolean array (masks).

    Example::

        check_channel_first(np.zeros((100, 50)), 2, "a.png", "Standardize2D")
        # DataError: a.png: Standardize2D expects a channel-first array (C, x, y), got shape (100, 50) ...
    """
    dims = (spatial_dims,) if isinstance(spatial_dims, int) else tuple(spatial_dims)
    expected = _expected(dims, num_channels)
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise DataError(where, f"{transform} expects a numpy array or torch tensor {expected}, got {type(x).__name__}")
    if isinstance(x, np.ndarray):
        kind = x.dtype.kind
        numeric = kind in "iuf" or (allow_bool and kind == "b")
    else:
        numeric = (x.dtype.is_floating_point or not (x.dtype.is_complex or x.dtype == torch.bool)) or (
            allow_bool and x.dtype == torch.bool
        )
    if not numeric:
        raise DataError(where, f"{transform} expects a numeric array {expected}, got dtype {x.dtype}")
    shape = tuple(int(s) for s in x.shape)
    if len(shape) - 1 not in dims:
        no_channel = len(shape) in dims and shape[0] != 1
        hint = " (add EnsureChannelFirstd after LoadImaged)" if no_channel else ""
        raise DataError(where, f"{transform} expects a channel-first array {expected}, got shape {shape}{hint}")
    if num_channels is not None and shape[0] != num_channels:
        raise DataError(
            where,
            f"{transform} expects {num_channels} channel(s), shape {expected}, got shape {shape} ({shape[0]} channels)",
        )
    if min(shape) == 0:
        raise DataError(where, f"{transform} got an empty array of shape {shape}")


def _check_finite(t: torch.Tensor, where: str, transform: str) -> None:
    if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise DataError(where, f"{transform}: the image has {n_nan} NaN and {n_inf} infinite values")


def _as_float_tensor(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return x.to(torch.float32)


def _back(out: torch.Tensor, like: ArrayLike) -> ArrayLike:
    """Return ``out`` as numpy when the input was numpy (MetaTensor / tensor stay tensors)."""
    if isinstance(like, np.ndarray) and not isinstance(out, np.ndarray):
        return (out.as_tensor() if isinstance(out, MetaTensor) else out).detach().cpu().numpy()
    return out


def _modality(meta: Mapping) -> str | None:
    for k in _MODALITY_KEYS:
        if k in meta:
            v = meta[k]
            if isinstance(v, Mapping):  # pydicom JSON style {"vr": "CS", "Value": ["CT"]}
                v = (v.get("Value") or [None])[0]
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if isinstance(v, bytes):
                v = v.decode(errors="replace")
            return None if v is None else str(v).strip()
    return None


# --------------------------------------------------------------------------------------------
# CT intensity
# --------------------------------------------------------------------------------------------


class CTIntensity(Transform):
    """Clip CT Hounsfield units to ``[a_min, a_max]`` and scale linearly to ``[b_min, b_max]``.

    Input: ``(C, x, y)`` or ``(C, x, y, z)``, any numeric dtype, in HU. Output: float32, same
    shape and type (numpy stays numpy, a MetaTensor keeps its meta). The default window
    -1000..400 HU maps air to 0 and dense bone to 1: ``-1000 -> 0``, ``-300 -> 0.5``, ``400 -> 1``.

    Rejects non-CT input with a DataError naming ``filename_or_obj``: a ``Modality`` in the
    meta-data other than ``CT`` (always), NaN/inf values (always), and with ``strict=True`` data
    that cannot be HU: dtype uint8, or all values within 0..255 (no air below 0).

    Example::

        CTIntensity()(np.array([[[-2000, -1000, -300, 400, 3000]]]))
        # array([[[0. , 0. , 0.5, 1. , 1. ]]], dtype=float32)
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        a_min: float = -1000.0,
        a_max: float = 400.0,
        b_min: float = 0.0,
        b_max: float = 1.0,
        clip: bool = True,
        strict: bool = False,
    ) -> None:
        if not a_max > a_min:
            raise ValueError(f"CTIntensity: a_max ({a_max}) must be greater than a_min ({a_min})")
        self.a_min, self.a_max, self.b_min, self.b_max = float(a_min), float(a_max), float(b_min), float(b_max)
        self.clip = clip
        self.strict = strict

    def __call__(self, img: ArrayLike) -> ArrayLike:
        return self._call(img, source_name(img), _meta_of(img))

    def _call(self, img: ArrayLike, where: str, meta: Mapping) -> ArrayLike:
        name = type(self).__name__
        check_channel_first(img, (2, 3), where, name)
        modality = _modality(meta)
        if modality is not None and modality.upper() != "CT":
            raise DataError(where, f"{name} expects a CT image, but the meta-data says Modality '{modality}'")
        t = _as_float_tensor(img)
        _check_finite(t, where, name)
        if self.strict:
            lo, hi = float(t.min()), float(t.max())
            if _dtype_name(img.dtype) == "uint8" or (lo >= 0 and hi <= 255):
                raise DataError(
                    where,
                    f"{name}: values span {lo:g}..{hi:g} (dtype {img.dtype}) with no negatives; this looks like an "
                    "8-bit picture, not CT in Hounsfield units (air is -1000). Check the DICOM rescale slope/"
                    "intercept or pass strict=False",
                )
        if self.clip:
            t = t.clamp(self.a_min, self.a_max)
        out = (t - self.a_min) * ((self.b_max - self.b_min) / (self.a_max - self.a_min)) + self.b_min
        return _back(out, img)


class CTIntensityd(MapTransform):
    """Dict version of :class:`CTIntensity` (same arguments, applied to each of ``keys``).

    Example::

        CTIntensityd(keys="image", strict=True)({"image": ct})   # ct: (1, x, y, z) in HU
    """

    backend = CTIntensity.backend

    def __init__(
        self,
        keys: KeysCollection,
        a_min: float = -1000.0,
        a_max: float = 400.0,
        b_min: float = 0.0,
        b_max: float = 1.0,
        clip: bool = True,
        strict: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.intensity = CTIntensity(a_min, a_max, b_min, b_max, clip, strict)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.intensity._call(d[key], source_name(d[key], d, key), _meta_of(d[key], d, key))
        return d


# --------------------------------------------------------------------------------------------
# CXR normalisation
# --------------------------------------------------------------------------------------------


class CXRNormalize(Transform):
    """Robust normalisation of a radiograph to [0, 1] by percentiles, with an optional gamma.

    Per channel: ``lo, hi = percentile(x, (lower, upper))`` (numpy's linear interpolation),
    ``y = clip((x - lo) / (hi - lo), 0, 1) ** gamma``. Works on 8-bit, 16-bit and float input;
    a constant channel (``hi == lo``) becomes zeros (never NaN). NaN/inf input raises DataError.

    Input: ``(C, x, y)``, by default exactly one channel (``num_channels=None``: any). Output:
    float32, same shape and type (numpy stays numpy, a MetaTensor keeps its meta).

    Example::

        x = np.arange(1001, dtype=np.uint16).reshape(1, 7, 143)       # ramp 0..1000
        CXRNormalize(lower=10, upper=90)(x)   # 100 -> 0, 500 -> 0.5, 900 -> 1, clipped outside
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self, lower: float = 0.5, upper: float = 99.5, gamma: float = 1.0, num_channels: int | None = 1
    ) -> None:
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"CXRNormalize: need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
        if not gamma > 0:
            raise ValueError(f"CXRNormalize: gamma must be > 0, got {gamma}")
        self.lower, self.upper, self.gamma = float(lower), float(upper), float(gamma)
        self.num_channels = num_channels

    def __call__(self, img: ArrayLike) -> ArrayLike:
        return self._call(img, source_name(img))

    def _call(self, img: ArrayLike, where: str) -> ArrayLike:
        name = type(self).__name__
        check_channel_first(img, 2, where, name, num_channels=self.num_channels)
        t = _as_float_tensor(img)
        _check_finite(t, where, name)
        flat = (t.as_tensor() if isinstance(t, MetaTensor) else t).detach().reshape(t.shape[0], -1).cpu().numpy()
        q = np.percentile(flat, [self.lower, self.upper], axis=1)  # (2, C), float64
        lo = torch.as_tensor(q[0], dtype=torch.float32, device=t.device).reshape(-1, *([1] * (t.ndim - 1)))
        span = torch.as_tensor(q[1] - q[0], dtype=torch.float32, device=t.device).reshape(lo.shape)
        flat_channel = span <= 0
        out = ((t - lo) / torch.where(flat_channel, torch.ones_like(span), span)).clamp(0.0, 1.0)
        out = torch.where(flat_channel, torch.zeros_like(out), out)
        if self.gamma != 1.0:
            out = out**self.gamma
        return _back(out, img)


class CXRNormalized(MapTransform):
    """Dict version of :class:`CXRNormalize` (same arguments, applied to each of ``keys``)."""

    backend = CXRNormalize.backend

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 0.5,
        upper: float = 99.5,
        gamma: float = 1.0,
        num_channels: int | None = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalize = CXRNormalize(lower, upper, gamma, num_channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalize._call(d[key], source_name(d[key], d, key))
        return d


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------

_LINEAR = ("linear", "bilinear", "trilinear")


def _interp_modes(mode: str, spatial_dims: int) -> tuple[str, str]:
    """(Spacing mode, Resize mode) for a user mode: linear family, nearest or area."""
    m = str(mode).lower()
    if m in _LINEAR:
        return "bilinear", ("bilinear" if spatial_dims == 2 else "trilinear")
    if m in ("nearest", "nearest-exact"):
        return "nearest", "nearest-exact"  # nearest-exact samples pixel centres like bilinear
    if m == "area":
        return "bilinear", "area"
    raise ValueError(f"unknown interpolation mode '{mode}' (use 'bilinear', 'nearest' or 'area')")


def _with_affine(x: ArrayLike, affine: torch.Tensor) -> MetaTensor:
    """``x`` as a MetaTensor carrying ``affine`` (keeps its other meta; input is not modified)."""
    if isinstance(x, MetaTensor):
        if x.affine.shape == affine.shape and torch.allclose(x.affine.to(affine), affine):
            return x
        meta = {k: v for k, v in x.meta.items() if k != "affine"}
        ops = list(x.applied_operations)
        return MetaTensor(x.as_tensor(), affine=affine.clone(), meta=meta, applied_operations=ops)
    return MetaTensor(torch.as_tensor(x), affine=affine.clone())


class _Standardize(Transform):
    """Shared implementation of :class:`Standardize2D` / :class:`Standardize3D`."""

    spatial_dims = 2
    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        spacing: float | Sequence[float] | None,
        spatial_size: int | Sequence[int] | None,
        size_mode: str | None,
        keep_aspect: bool,
        mode: str,
        pad_value: float,
        anti_aliasing: bool,
    ) -> None:
        nd = self.spatial_dims
        self.spacing = None if spacing is None else tuple(float(s) for s in ensure_tuple_rep(spacing, nd))
        if self.spacing is not None and min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {spacing}")
        self.spatial_size = None if spatial_size is None else tuple(int(s) for s in ensure_tuple_rep(spatial_size, nd))
        if self.spatial_size is not None and min(self.spatial_size) <= 0:
            raise ValueError(f"spatial_size must be positive, got {spatial_size}")
        if size_mode not in (None, "resize", "pad_crop"):
            raise ValueError(f"size_mode must be 'resize', 'pad_crop' or None, got {size_mode!r}")
        self.size_mode = size_mode
        self.keep_aspect = keep_aspect
        _interp_modes(mode, nd)  # validates
        self.mode = mode
        self.pad_value = float(pad_value)
        self.anti_aliasing = anti_aliasing

    def _resize(self, x: torch.Tensor, shape: tuple[int, ...], new: tuple[int, ...], mode: str) -> torch.Tensor:
        return _resize_impl(x, shape, new, mode, self.anti_aliasing)

    def __call__(self, img: ArrayLike, mode: str | None = None, pad_value: float | None = None) -> ArrayLike:
        """Standardise ``img`` (``mode`` / ``pad_value`` override the constructor's)."""
        return self._call(img, source_name(img), mode, pad_value)

    def _call(self, img: ArrayLike, where: str, mode: str | None = None, pad_value: float | None = None) -> ArrayLike:
        name = type(self).__name__
        nd = self.spatial_dims
        check_channel_first(img, nd, where, name, allow_bool=True)
        spacing_mode, resize_mode = _interp_modes(mode or self.mode, nd)
        nearest = spacing_mode == "nearest"
        value = self.pad_value if pad_value is None else float(pad_value)
        in_dtype = img.dtype
        x: torch.Tensor = torch.from_numpy(np.ascontiguousarray(img)) if isinstance(img, np.ndarray) else img
        if x.dtype == torch.bool or not x.dtype.is_floating_point:
            x = x.to(torch.float32)
        if not nearest:
            _check_finite(x, where, name)

        if self.spacing is not None and isinstance(x, MetaTensor):
            x = Spacing(pixdim=self.spacing, mode=spacing_mode, padding_mode="zeros" if nearest else "border")(x)

        if self.spatial_size is not None and self.size_mode is not None:
            target = self.spatial_size
            shape = tuple(int(s) for s in x.shape[1:])
            if self.size_mode == "pad_crop":
                x = ResizeWithPadOrCrop(target, method="symmetric", mode="constant", value=value)(x)
            elif self.keep_aspect:
                scale = min(t / s for t, s in zip(target, shape))
                new = tuple(max(1, int(round(s * scale))) for s in shape)
                x = self._resize(x, shape, new, resize_mode)
                if new != target:
                    x = SpatialPad(target, method="symmetric", mode="constant", value=value)(x)
            else:
                x = self._resize(x, shape, target, resize_mode)

        if nearest and not _is_float_dtype(in_dtype):
            x = x.round().to(_torch_dtype(in_dtype))
        elif x.dtype != torch.float32:
            x = x.to(torch.float32)
        return _back(x, img)


def _resize_impl(
    x: torch.Tensor, shape: tuple[int, ...], new: tuple[int, ...], mode: str, anti_aliasing: bool
) -> torch.Tensor:
    """Resize to ``new``; a linear-mode shrink in every axis uses area averaging when anti-aliasing
    (no blur at the borders, unlike a zero-padded Gaussian), a mixed shrink/grow stays linear."""
    if new == shape:
        return x
    shrink = all(n <= s for n, s in zip(new, shape))
    if anti_aliasing and shrink and mode in ("bilinear", "trilinear"):
        mode = "area"
    return Resize(new, mode=mode)(x)


def _dtype_name(dtype: Any) -> str:
    """'uint8', 'float32', 'bool'... for a numpy or torch dtype."""
    return str(dtype).removeprefix("torch.")


def _is_float_dtype(dtype: Any) -> bool:
    return dtype.is_floating_point if isinstance(dtype, torch.dtype) else np.dtype(dtype).kind == "f"


def _torch_dtype(dtype: Any) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else torch.from_numpy(np.zeros(0, dtype=dtype)).dtype


class Standardize2D(_Standardize):
    """Bring a 2D image ``(C, x, y)`` to a target spacing and size.

    1. if ``spacing`` (mm, per axis or one number) is given and the input is a MetaTensor (its
       affine gives the spacing), resample with :class:`monai.transforms.Spacing`; plain arrays
       have no known spacing and skip this step;
    2. ``size_mode="resize"`` with ``keep_aspect=True``: scale so the image fits inside
       ``spatial_size`` (aspect kept), then pad symmetrically with ``pad_value``;
       ``keep_aspect=False``: resize to ``spatial_size``; ``size_mode="pad_crop"``: centre
       pad/crop to ``spatial_size``; ``None``: no size step.

    ``mode``: ``"bilinear"`` (images, priors), ``"nearest"`` (labels: values kept exactly, integer
    and bool dtypes kept) or ``"area"``. ``anti_aliasing``: a linear-mode resize that shrinks
    every axis averages areas instead (no aliasing, no darkened border); a Spacing
    resample does not smooth. Output: float32 (or the label's dtype), a MetaTensor
    with the updated affine when the input was a tensor, numpy when the input was numpy.
    Note: a PNG has no spacing (its affine says 1 mm); leave ``spacing=None`` for PNG data.

    Example::

        img = MetaTensor(torch.rand(1, 100, 50), affine=torch.diag(torch.tensor([0.5, 1.0, 1.0, 1.0])))
        Standardize2D(spacing=1.0, spatial_size=64)(img).shape     # (1, 64, 64): 100x50 -> 50x50 -> 64x64
        Standardize2D(spatial_size=64)(np.zeros((1, 100, 50))).shape  # (1, 64, 64): 64x32 padded
    """

    spatial_dims = 2

    def __init__(
        self,
        spacing: float | Sequence[float] | None = None,
        spatial_size: int | Sequence[int] | None = 256,
        size_mode: str | None = "resize",
        keep_aspect: bool = True,
        mode: str = "bilinear",
        pad_value: float = 0.0,
        anti_aliasing: bool = True,
    ) -> None:
        super().__init__(spacing, spatial_size, size_mode, keep_aspect, mode, pad_value, anti_aliasing)


class Standardize3D(_Standardize):
    """Bring a 3D image ``(C, x, y, z)`` to a target spacing and size (CT defaults).

    Same steps as :class:`Standardize2D`; defaults: resample to ``(1.5, 1.5, 2.0)`` mm, then
    centre pad/crop to ``(96, 96, 96)``. Pad with the value of air in the current intensity
    scale (``pad_value=-1000`` before :class:`CTIntensity`, ``0`` after it).

    Example::

        Standardize3D(spatial_size=(96, 96, 64))(ct)   # ct: MetaTensor (1, 512, 512, 120)
    """

    spatial_dims = 3

    def __init__(
        self,
        spacing: float | Sequence[float] | None = (1.5, 1.5, 2.0),
        spatial_size: int | Sequence[int] | None = (96, 96, 96),
        size_mode: str | None = "pad_crop",
        keep_aspect: bool = True,
        mode: str = "bilinear",
        pad_value: float = 0.0,
        anti_aliasing: bool = True,
    ) -> None:
        super().__init__(spacing, spatial_size, size_mode, keep_aspect, mode, pad_value, anti_aliasing)


class _Standardized(MapTransform):
    """Dict version: one geometry for every key (the first present key is the reference)."""

    array_class: type[_Standardize] = Standardize2D
    backend = _Standardize.backend

    def __init__(
        self,
        keys: KeysCollection,
        spacing: Any,
        spatial_size: Any,
        size_mode: str | None,
        keep_aspect: bool,
        mode: str | Sequence[str],
        pad_value: float | Sequence[float],
        anti_aliasing: bool,
        allow_missing_keys: bool,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.pad_value = ensure_tuple_rep(pad_value, len(self.keys))
        for m in self.mode:
            _interp_modes(m, self.array_class.spatial_dims)
        self.standardize = self.array_class(
            spacing=spacing,
            spatial_size=spatial_size,
            size_mode=size_mode,
            keep_aspect=keep_aspect,
            mode=self.mode[0],
            pad_value=float(self.pad_value[0]),
            anti_aliasing=anti_aliasing,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        items = list(self.key_iterator(d, self.mode, self.pad_value))
        if not items:
            return d
        name = type(self).__name__
        nd = self.standardize.spatial_dims
        ref_key = items[0][0]
        ref = d[ref_key]
        for key, _, _ in items:
            check_channel_first(d[key], nd, source_name(d[key], d, key), name, allow_bool=True)
        ref_shape = tuple(int(s) for s in ref.shape[1:])
        for key, _, _ in items[1:]:
            shape = tuple(int(s) for s in d[key].shape[1:])
            if shape != ref_shape:
                raise DataError(
                    source_name(d[key], d, key),
                    f"{name}: spatial shape {shape} differs from '{ref_key}' {ref_shape}; "
                    "all keys must share the image grid",
                )
        ref_affine = ref.affine if isinstance(ref, MetaTensor) and self.standardize.spacing is not None else None
        for key, mode, pad in items:
            x = d[key]
            was_numpy = isinstance(x, np.ndarray)
            if ref_affine is not None:
                x = _with_affine(x, ref_affine)  # same grid as the reference: same resampling
            out = self.standardize._call(x, source_name(d[key], d, key), mode, pad)
            d[key] = _back(out, d[key]) if was_numpy else out
        return d


class Standardize2Dd(_Standardized):
    """Dict version of :class:`Standardize2D`: the same geometry for every key.

    The first present key is the reference: every other key must have the same spatial shape,
    and is resampled with the reference's affine (a PNG mask of a DICOM image gets the image's
    spacing), so image, label and prior stay aligned voxel for voxel. ``mode`` and ``pad_value``
    may be given per key, e.g. ``mode=("bilinear", "nearest", "bilinear")`` for
    ``keys=("image", "label", "prior")``.

    Example::

        Standardize2Dd(keys=["image", "label"], spatial_size=256, mode=("bilinear", "nearest"))
    """

    array_class = Standardize2D

    def __init__(
        self,
        keys: KeysCollection,
        spacing: float | Sequence[float] | None = None,
        spatial_size: int | Sequence[int] | None = 256,
        size_mode: str | None = "resize",
        keep_aspect: bool = True,
        mode: str | Sequence[str] = "bilinear",
        pad_value: float | Sequence[float] = 0.0,
        anti_aliasing: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(
            keys, spacing, spatial_size, size_mode, keep_aspect, mode, pad_value, anti_aliasing, allow_missing_keys
        )


class Standardize3Dd(_Standardized):
    """Dict version of :class:`Standardize3D` (see :class:`Standardize2Dd` for the key rules).

    Example::

        Standardize3Dd(keys=["image", "label"], spacing=(1.5, 1.5, 2.0), spatial_size=(96, 96, 96),
                       mode=("bilinear", "nearest"), pad_value=(-1000, 0))
    """

    array_class = Standardize3D

    def __init__(
        self,
        keys: KeysCollection,
        spacing: float | Sequence[float] | None = (1.5, 1.5, 2.0),
        spatial_size: int | Sequence[int] | None = (96, 96, 96),
        size_mode: str | None = "pad_crop",
        keep_aspect: bool = True,
        mode: str | Sequence[str] = "bilinear",
        pad_value: float | Sequence[float] = 0.0,
        anti_aliasing: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(
            keys, spacing, spatial_size, size_mode, keep_aspect, mode, pad_value, anti_aliasing, allow_missing_keys
        )
