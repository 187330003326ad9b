"""Register an exemplar scan onto another scan (2D or 3D) with SimpleITK and warp its masks.

The pipeline of :func:`register`:

1. **Intensities.** Both images are cast to float32, optionally clipped to a window
   (``fixed_window`` / ``moving_window``, e.g. HU), mapped to ``[0, 1]`` by their 1st and 99th
   percentiles (robust to scanners, bit depths, exposure), then reduced (bin averaging) so that no
   side exceeds ``max_size`` voxels: registration runs on that grid, the transform is physical and
   is applied at full resolution afterwards.
2. **Initialisation** (``init``): ``"geometry"`` aligns the image centres, ``"moments"`` the
   centres of mass, ``"fov"`` aligns the centres and scales by the ratio of the fields of view
   (for radiographs whose pixel spacing is unknown); ``"auto"`` is ``"fov"`` in 2D, ``"geometry"``
   in 3D.
3. **Affine**, multi-resolution (``affine_shrink`` / ``affine_smooth``), correlation (default) or
   Mattes mutual information, regular-step gradient descent with scales from physical shifts;
   the metric samples a fixed random subset of voxels (``seed``), so results are deterministic.
4. **Deformable** (``method``): ``"bspline"`` (free-form deformation, same metric, L-BFGS-B),
   ``"demons"`` (diffeomorphic demons, multi-level, on the affinely pre-aligned moving image after
   histogram matching) or ``"demons_cc"`` (demons, then a dense displacement field refined by
   gradient descent on the local (neighbourhood) cross-correlation of ANTs, Gaussian-regularised:
   a greedy, SyN-like step that aligns edges whatever the regional brightness; the 2D default);
   ``"affine"`` stops after step 3.
5. **Checks.** Every stage is accepted only if its result is finite, maps enough of the image
   inside the exemplar (``min_overlap``), is not anti-correlated with the image (correlation
   metric), the similarity did not get worse (compared on the voxels both transforms cover), the
   affine is plausible (singular values within ``1/max_scale .. max_scale``, no flip) and the
   deformation does not fold (minimum Jacobian determinant ``> min_jacobian``).
   :func:`register` retries a rejected stage once with :meth:`RegistrationSettings.safer`, then
   falls back to the affine result (``status="fallback_affine"``) or gives up
   (``status="failed"``: the caller uses a population prior). Nothing is silently accepted: the
   :class:`RegistrationResult` carries the status, the reasons and every attempt.

Conventions. Arrays are in MONAI axis order (2D ``(x, y)``, 3D ``(x, y, z)``), as
:func:`medspan.data.readers.read_image` returns them. :func:`to_sitk` builds the SimpleITK image
from such an array and its 4x4 affine (RAS for 3D as MONAI's readers give it, converted to ITK's
LPS; for 2D the pixel-grid affine is used as is). A transform maps a point of the **fixed** image
to the corresponding point of the **moving** image (ITK convention), so the moving image (and its
masks) is resampled onto the fixed grid with it.

Example::

    fixed = to_sitk(img_b)                          # (x, y) float array of the target scan
    moving = to_sitk(img_a)                         # the labeled exemplar
    res = register(fixed, moving, RegistrationSettings(method="demons"))
    prior = warp_masks(masks_a, moving, res.transform, fixed)     # (S, x, y) float32 in [0, 1]
    res.status, res.metrics["metric_final"], res.jacobian["min"]
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import SimpleITK as sitk

__all__ = [
    "METHODS",
    "RegistrationResult",
    "RegistrationSettings",
    "affine_matrix",
    "evaluate_metric",
    "from_sitk",
    "jacobian_stats",
    "normalise_intensity",
    "reduce_to",
    "register",
    "register_affine",
    "register_bspline",
    "register_cc",
    "register_demons",
    "sitk_threads",
    "to_sitk",
    "warp",
    "warp_masks",
]

METHODS: tuple[str, ...] = ("affine", "bspline", "demons", "demons_cc")
_LPS = np.diag([-1.0, -1.0, 1.0])


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------


def to_sitk(
    array: np.ndarray,
    affine: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    dtype: type = np.float32,
) -> sitk.Image:
    """A SimpleITK image from a MONAI-order array ``(x, y)`` or ``(x, y, z)``.

    Args:
        array: spatial array in MONAI order (no channel axis).
        affine: 4x4 affine of the array (RAS for 3D, as MONAI's readers return; for 2D the
            pixel-grid affine ``diag(sx, sy, 1, 1)`` of :func:`~medspan.data.readers.read_image`).
            None: identity direction, origin 0.
        spacing: voxel size per axis, used when ``affine`` is None (default 1).
        dtype: pixel type of the SimpleITK image.

    Returns:
        ``sitk.Image`` with ``GetSize() == array.shape``; voxel ``array[i, j(, k)]`` is at index
        ``(i, j(, k))``.

    Example::

        img = to_sitk(np.zeros((64, 32)), spacing=(0.5, 0.5)); img.GetSize()   # (64, 32)
    """
    arr = np.asarray(array)
    dim = arr.ndim
    if dim not in (2, 3):
        raise ValueError(f"expected a 2D (x, y) or 3D (x, y, z) array, got shape {arr.shape}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.T.astype(dtype, copy=False)))
    if affine is not None:
        a = np.asarray(affine, dtype=np.float64)
        lin = a[:dim, :dim].copy()
        origin = a[:dim, 3].copy()
        if dim == 3:  # RAS -> LPS
            lin = _LPS @ lin
            origin = _LPS @ origin
        sp = np.sqrt((lin**2).sum(axis=0))
        if np.any(sp <= 0) or not np.all(np.isfinite(lin)):
            raise ValueError(f"degenerate affine {a.tolist()}")
        img.SetSpacing(tuple(float(s) for s in sp))
        img.SetDirection(tuple(float(v) for v in (lin / sp).ravel()))
        img.SetOrigin(tuple(float(v) for v in origin))
    elif spacing is not None:
        img.SetSpacing(tuple(float(s) for s in spacing))
    return img


def from_sitk(image: sitk.Image) -> np.ndarray:
    """The MONAI-order array ``(x, y[, z])`` of a SimpleITK image (inverse of :func:`to_sitk`)."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).T)


def normalise_intensity(image: sitk.Image, lower: float = 1.0, upper: float = 99.0) -> sitk.Image:
    """Map intensities to ``[0, 1]`` by the ``lower`` / ``upper`` percentiles (clipped), as float32.

    A constant image becomes all zeros. Geometry is kept.
    """
    arr = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    lo, hi = np.percentile(arr, [lower, upper]) if arr.size else (0.0, 0.0)
    out = np.zeros_like(arr) if hi <= lo else np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(image)
    return img


def reduce_to(image: sitk.Image, max_size: int | None) -> sitk.Image:
    """Bin-average ``image`` by the smallest integer factor that brings every side to ``<= max_size``.

    The physical extent is kept (ITK's BinShrink moves the origin to the bins' centres). None or a
    large enough ``max_size`` returns the image unchanged.
    """
    if not max_size:
        return image
    factor = max(1, math.ceil(max(image.GetSize()) / float(max_size)))
    if factor == 1:
        return image
    return sitk.BinShrink(image, [factor] * image.GetDimension())


@contextlib.contextmanager
def sitk_threads(n: int | None) -> Iterator[None]:
    """Set SimpleITK's global default number of threads for the ``with`` block (None: unchanged)."""
    if not n:
        yield
        return
    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)


# ----------------------------------------------------------------------------------------------
# settings and result
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistrationSettings:
    """What :func:`register` does; every field has a working default (the CXR default method).

    Attributes:
        method: ``"affine"``, ``"bspline"`` or ``"demons"`` (deformable stage after the affine).
        metric: affine (and B-spline) similarity: ``"mattes"`` (mutual information) or ``"correlation"``.
        init: ``"auto"``, ``"geometry"``, ``"moments"`` or ``"fov"`` (see the module docstring).
        max_size: registration grid: images are bin-averaged so that no side exceeds this (None: full).
        affine_shrink, affine_smooth: pyramid of the affine stage (shrink factors, smoothing sigmas in voxels).
        affine_iterations: maximum optimizer iterations per level.
        learning_rate: initial step of the regular-step gradient descent (in scaled units), or the largest
            step in physical units of the plain gradient descent.
        affine_optimizer: ``"regular_step"`` (regular-step gradient descent, stops when the step falls
            below ``affine_min_step``) or ``"gradient_descent"`` (learning rate estimated at each
            iteration, stops when the metric settles over 10 iterations).
        affine_min_step: stopping step of the regular-step gradient descent.
        sampling: fraction of fixed voxels the metric samples (random, fixed ``seed``); 1 = all.
        bins: histogram bins of Mattes mutual information.
        bspline_mesh: B-spline control-point mesh per axis at the first B-spline level.
        bspline_shrink: pyramid of the B-spline stage.
        bspline_iterations: optimizer iterations per level.
        bspline_optimizer: ``"lbfgsb"`` (L-BFGS-B, one mesh for all levels; fast) or ``"line_search"``
            (gradient descent with line search and scales from physical shifts; the mesh doubles at
            every level; slow in 3D).
        demons_shrink: pyramid of the demons stage (factors relative to the registration grid).
        demons_iterations: iterations per demons level.
        demons_sigma: Gaussian smoothing of the displacement field, in voxels of each level.
        demons_update_sigma: Gaussian smoothing of each update field (fluid-like regularisation), 0 = off.
        demons_max_step: largest update of one demons iteration, in voxels (0 = unlimited).
        demons_presmooth: Gaussian blur (voxels of the registration grid) of both images before demons,
            so that large structures (organ outlines) drive the field rather than fine texture.
        cc_radius: neighbourhood radius (voxels) of the local cross-correlation of ``"demons_cc"``.
        cc_shrink, cc_smooth: pyramid of the correlation refinement (shrink factors, smoothing sigmas).
        cc_iterations: gradient-descent iterations per level of the refinement.
        cc_update_variance, cc_total_variance: Gaussian variances (voxels^2) smoothing each update of
            the displacement field and the whole field (the regularisation of the refinement).
        cc_max_step: largest update per iteration, in voxels of the registration grid.
        histogram_match: match the moving histogram to the fixed one before demons.
        histogram_threshold_at_mean: leave voxels below the mean out of the histogram matching
            (ITK's usual choice to ignore background).
        max_scale: an affine whose singular values leave ``[1/max_scale, max_scale]`` is rejected.
        min_jacobian: a deformation whose Jacobian determinant falls to or below this folds.
        tolerance: a stage that worsens the (lower-is-better) metric by more than this is rejected.
        min_overlap: a transform mapping less than this fraction of the image inside the exemplar is rejected.
        fixed_window, moving_window: clip the image's (the exemplar's) intensities to ``(low, high)``
            before the normalisation, e.g. a CT window in HU for an exemplar in HU registered onto
            8-bit windowed volumes (None: no clipping).
        seed: sampling seed (fixed for determinism; >= 1, since SimpleITK reads 0 as "seed from the clock").
        threads: SimpleITK threads (1 gives the same result on every machine; parallelise over images).
    """

    method: str = "demons"
    metric: str = "correlation"
    init: str = "auto"
    max_size: int | None = 128
    affine_shrink: tuple[int, ...] = (4, 2, 1)
    affine_smooth: tuple[float, ...] = (2.0, 1.0, 0.0)
    affine_iterations: int = 100
    learning_rate: float = 1.0
    affine_optimizer: str = "regular_step"
    affine_min_step: float = 1e-3
    sampling: float = 0.25
    bins: int = 32
    bspline_mesh: int = 4
    bspline_shrink: tuple[int, ...] = (2, 1)
    bspline_iterations: int = 30
    bspline_optimizer: str = "lbfgsb"
    demons_shrink: tuple[int, ...] = (2, 1)
    demons_iterations: tuple[int, ...] = (60, 30)
    demons_sigma: float = 5.0
    demons_presmooth: float = 0.0
    demons_update_sigma: float = 0.0
    demons_max_step: float = 2.0
    cc_radius: int = 5
    cc_shrink: tuple[int, ...] = (2, 1)
    cc_smooth: tuple[float, ...] = (1.0, 0.0)
    cc_iterations: int = 20
    cc_update_variance: float = 1.0
    cc_total_variance: float = 0.75
    cc_max_step: float = 2.0
    histogram_match: bool = True
    histogram_threshold_at_mean: bool = True
    max_scale: float = 2.0
    min_jacobian: float = 0.0
    tolerance: float = 0.005
    min_overlap: float = 0.3
    fixed_window: tuple[float, float] | None = None
    moving_window: tuple[float, float] | None = None
    seed: int = 20
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.metric not in ("mattes", "correlation"):
            raise ValueError(f"metric must be 'mattes' or 'correlation', got {self.metric!r}")
        if self.affine_optimizer not in ("regular_step", "gradient_descent"):
            raise ValueError(f"affine_optimizer must be regular_step or gradient_descent, got {self.affine_optimizer!r}")
        if self.bspline_optimizer not in ("lbfgsb", "line_search"):
            raise ValueError(f"bspline_optimizer must be lbfgsb or line_search, got {self.bspline_optimizer!r}")
        if self.init not in ("auto", "geometry", "moments", "fov"):
            raise ValueError(f"init must be auto, geometry, moments or fov, got {self.init!r}")
        for name in ("fixed_window", "moving_window"):
            w = getattr(self, name)
            if w is not None and (len(w) != 2 or not float(w[0]) < float(w[1])):
                raise ValueError(f"{name} must be (low, high) with low < high, got {w!r}")
        if len(self.affine_shrink) != len(self.affine_smooth):
            raise ValueError("affine_shrink and affine_smooth need the same length")
        if len(self.demons_shrink) != len(self.demons_iterations):
            raise ValueError("demons_shrink and demons_iterations need the same length")
        if len(self.cc_shrink) != len(self.cc_smooth):
            raise ValueError("cc_shrink and cc_smooth need the same length")
        if int(self.seed) < 1:
            raise ValueError(f"seed must be >= 1 (SimpleITK takes 0 as 'seed from the wall clock'), got {self.seed}")
        if not 0 < self.sampling <= 1:
            raise ValueError(f"sampling must be in (0, 1], got {self.sampling}")

    def safer(self) -> RegistrationSettings:
        """Settings for a retry: smoother, coarser, smaller steps (less likely to diverge or fold).

        The affine retry also optimises Mattes mutual information instead of correlation: ITK's
        correlation metric is the squared correlation, so it has a degenerate optimum at an
        anti-correlated alignment, which the checks reject. (The checks keep comparing the metric of
        the original settings.)
        """
        return replace(
            self,
            metric="mattes",
            learning_rate=self.learning_rate / 4.0,
            affine_smooth=tuple(s + 1.0 for s in self.affine_smooth),
            sampling=min(1.0, self.sampling * 2.0),
            bspline_mesh=max(2, self.bspline_mesh // 2),
            bspline_shrink=self.bspline_shrink[:1],
            demons_sigma=self.demons_sigma * 2.0,
            demons_iterations=tuple(max(1, n // 2) for n in self.demons_iterations),
            cc_total_variance=self.cc_total_variance * 4.0,
            cc_max_step=self.cc_max_step / 2.0,
        )

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-friendly dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class RegistrationResult:
    """Outcome of :func:`register`.

    Attributes:
        transform: fixed physical point -> moving physical point (the accepted result; the identity
            when ``status == "failed"``).
        affine: the accepted affine stage alone (None when it failed).
        status: ``"ok"``, ``"retried"`` (accepted after a retry), ``"fallback_affine"`` (the
            deformable stage was rejected twice; ``transform`` is the affine) or ``"failed"``
            (no plausible affine; use a population prior).
        method: the method of the accepted transform (``"affine"``, ``"bspline"``, ``"demons"``, or
            ``"none"``).
        metrics: for ``initial`` (the centred start), ``affine`` and ``final``: ``metric_*`` (what the
            checks compare, lower is better: ``-NCC`` for the correlation metric, Mattes MI otherwise),
            ``mi_*`` (Mattes MI), ``ncc_*`` (normalised cross-correlation where the images overlap),
            ``overlap_*`` (fraction of the image that maps inside the exemplar); on the registration grid.
        iterations: optimizer iterations of the accepted stages (``affine``, ``deformable``).
        jacobian: ``min``, ``max``, ``folded_fraction`` of the accepted transform's Jacobian determinant.
        attempts: one dict per stage attempt (stage, settings tag, accepted, reasons, numbers).
        reasons: why anything was rejected (empty when ``status == "ok"``).
        seconds: wall time of the whole registration.
    """

    transform: sitk.Transform
    affine: sitk.Transform | None
    status: str
    method: str
    metrics: dict[str, float] = field(default_factory=dict)
    iterations: dict[str, int] = field(default_factory=dict)
    jacobian: dict[str, float] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_record(self) -> dict[str, Any]:
        """JSON-friendly summary (no transforms)."""
        return {
            "status": self.status,
            "method": self.method,
            "metrics": dict(self.metrics),
            "iterations": dict(self.iterations),
            "jacobian": dict(self.jacobian),
            "reasons": list(self.reasons),
            "attempts": list(self.attempts),
            "seconds": round(float(self.seconds), 4),
        }


# ----------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------


def _resample(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform, interp: int, default: float = 0.0) -> sitk.Image:
    return sitk.Resample(image, reference, transform, interp, default, image.GetPixelID())


def evaluate_metric(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, settings: RegistrationSettings) -> float:
    """Mattes mutual information (negative; lower is better) of ``moving`` mapped by ``transform``.

    Sampled like the registration (random, ``settings.seed``), on the grid of ``fixed``. Returns
    ``nan`` when too few samples fall inside the moving image.
    """
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(min(1.0, settings.sampling * 2), settings.seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetMovingInitialTransform(transform)
    reg.SetInitialTransform(sitk.TranslationTransform(fixed.GetDimension()))
    try:
        return float(reg.MetricEvaluate(fixed, moving))
    except RuntimeError:
        return float("nan")


def _valid(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """Bool array (numpy order of ``fixed``): the fixed voxels that ``transform`` maps inside ``moving``."""
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    return sitk.GetArrayFromImage(_resample(ones, fixed, transform, sitk.sitkNearestNeighbor)) > 0


def _ncc(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, region: np.ndarray) -> float:
    """Normalised cross-correlation of ``fixed`` and the resampled ``moving`` on ``region`` (nan if empty)."""
    if not region.any():
        return float("nan")
    warped = sitk.GetArrayFromImage(_resample(moving, fixed, transform, sitk.sitkLinear)).astype(np.float64)[region]
    f = sitk.GetArrayFromImage(fixed).astype(np.float64)[region]
    f, w = f - f.mean(), warped - warped.mean()
    den = float(np.sqrt((f * f).sum() * (w * w).sum()))
    return float((f * w).sum() / den) if den > 0 else 0.0


def _score(
    fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, s: RegistrationSettings,
    reference: tuple[sitk.Transform, np.ndarray] | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """Similarity of a transform, and the fixed voxels it maps inside the exemplar.

    Returns:
        ``(score, valid)``: ``score`` has ``mi`` (Mattes, lower is better), ``ncc`` (on the valid
        voxels), ``overlap`` (valid fraction) and ``metric``, the value the checks compare: ``-ncc``
        for the correlation metric, ``mi`` otherwise (lower is better). With ``reference`` (the
        previous stage's transform and valid voxels) the score also has ``metric_ref`` and
        ``metric_new``: both transforms' ``metric`` on the voxels valid for both, so a change of the
        overlap does not pass for a change of similarity.
    """
    valid = _valid(fixed, moving, transform)
    mi = evaluate_metric(fixed, moving, transform, s)
    ncc = _ncc(fixed, moving, transform, valid)
    score = {"metric": -ncc if s.metric == "correlation" else mi, "mi": mi, "ncc": ncc, "overlap": float(valid.mean())}
    if reference is not None and s.metric == "correlation":
        common = valid & reference[1]
        score["metric_ref"] = -_ncc(fixed, moving, reference[0], common)
        score["metric_new"] = -_ncc(fixed, moving, transform, common)
    return score, valid


def _score_problems(stage: str, new: dict[str, float], ref: dict[str, float], s: RegistrationSettings) -> list[str]:
    """Why a stage's result is not acceptable compared with the previous stage's (empty: accepted)."""
    if not np.isfinite(new["metric"]):
        return [f"{stage} similarity is not finite (the images do not overlap)"]
    problems = []
    if new["overlap"] < s.min_overlap:
        problems.append(f"{stage} maps only {100 * new['overlap']:.0f}% of the image inside the exemplar "
                        f"(< {100 * s.min_overlap:.0f}%)")
    if s.metric == "correlation" and new["ncc"] <= 0:
        problems.append(f"{stage} result is anti-correlated with the image (NCC {new['ncc']:.3f})")
    before, after = (new["metric_ref"], new["metric_new"]) if "metric_ref" in new else (ref["metric"], new["metric"])
    if np.isfinite(before) and after > before + s.tolerance:
        problems.append(f"{stage} made the similarity worse ({before:.4f} -> {after:.4f})")
    return problems


def jacobian_stats(transform: sitk.Transform, reference: sitk.Image) -> dict[str, float]:
    """Jacobian determinant of ``transform`` sampled on the grid of ``reference``.

    Returns:
        ``{"min", "max", "mean", "folded_fraction"}``; ``folded_fraction`` is the share of voxels
        with a determinant ``<= 0`` (the deformation folds there). The determinant includes the
        affine part (scales ``sx, sy`` give ``sx * sy`` everywhere). The border voxels are left out
        (their finite differences are one-sided).
    """
    field_img = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, reference.GetSize(), reference.GetOrigin(),
        reference.GetSpacing(), reference.GetDirection(),
    )
    det = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field_img))
    if min(det.shape) > 2:  # one-sided differences at the border are biased: use the interior
        det = det[(slice(1, -1),) * det.ndim]
    if not np.all(np.isfinite(det)):
        return {"min": float("nan"), "max": float("nan"), "mean": float("nan"), "folded_fraction": 1.0}
    return {
        "min": float(det.min()),
        "max": float(det.max()),
        "mean": float(det.mean()),
        "folded_fraction": float((det <= 0).mean()),
    }


def affine_matrix(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """``(A, t)`` with ``transform(p) = A @ p + t`` for an affine-like (or composite affine) transform.

    Computed from the transform's action on the unit points, so it works for any transform that is
    affine (AffineTransform, Euler, Similarity, Translation, composites of them).
    """
    dim = transform.GetDimension()
    origin = np.array(transform.TransformPoint((0.0,) * dim))
    cols = [np.array(transform.TransformPoint(tuple(np.eye(dim)[i]))) - origin for i in range(dim)]
    return np.stack(cols, axis=1), origin


def _affine_problems(transform: sitk.Transform, max_scale: float) -> list[str]:
    a, t = affine_matrix(transform)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(t))):
        return ["affine has non-finite parameters"]
    sv = np.linalg.svd(a, compute_uv=False)
    problems = []
    if np.linalg.det(a) <= 0:
        problems.append("affine flips the image (determinant <= 0)")
    if sv.max() > max_scale or sv.min() < 1.0 / max_scale:
        problems.append(f"affine scale {sv.min():.3g}..{sv.max():.3g} outside [{1 / max_scale:.3g}, {max_scale:.3g}]")
    return problems


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------


def _initial_transform(fixed: sitk.Image, moving: sitk.Image, init: str) -> sitk.AffineTransform:
    dim = fixed.GetDimension()
    if init == "auto":
        init = "fov" if dim == 2 else "geometry"
    mode = (
        sitk.CenteredTransformInitializerFilter.MOMENTS
        if init == "moments"
        else sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    tx = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(dim), mode)
    tx = sitk.AffineTransform(tx)
    if init == "fov":
        ext_f = np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())
        ext_m = np.array(moving.GetSize()) * np.array(moving.GetSpacing())
        scale = ext_m / ext_f
        d_f = np.array(fixed.GetDirection()).reshape(dim, dim)
        d_m = np.array(moving.GetDirection()).reshape(dim, dim)
        # fixed index axis i (scaled by the FOV ratio) onto moving index axis i
        mat = d_m @ np.diag(scale) @ d_f.T
        tx.SetMatrix(tuple(mat.ravel()))
    return tx


def _iteration_counter(reg: sitk.ImageRegistrationMethod) -> list[int]:
    counts = [0]
    reg.AddCommand(sitk.sitkIterationEvent, lambda: counts.__setitem__(0, counts[0] + 1))
    return counts


def _set_metric(reg: sitk.ImageRegistrationMethod, s: RegistrationSettings) -> None:
    if s.metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=s.bins)
    else:
        reg.SetMetricAsCorrelation()
    if s.sampling < 1.0:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(s.sampling, s.seed)
    else:
        reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)


def _levels(shrink: Sequence[int], image: sitk.Image) -> list[int]:
    """Drop shrink factors that would leave fewer than 8 voxels along an axis."""
    smallest = min(image.GetSize())
    out = [int(f) for f in shrink if smallest // int(f) >= 8]
    return out or [1]


def register_affine(
    fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings, moving_mask: sitk.Image | None = None
) -> tuple[sitk.AffineTransform, dict[str, Any]]:
    """Multi-resolution affine registration of prepared (normalised, reduced) images.

    Returns:
        ``(transform, info)``; ``info`` has ``iterations`` (all levels), ``stop`` (the optimizer's
        stop condition) and ``metric`` (the optimizer's final value).
    """
    tx = _initial_transform(fixed, moving, settings.init)
    shrink = _levels(settings.affine_shrink, fixed)
    smooth = list(settings.affine_smooth[-len(shrink):])
    reg = sitk.ImageRegistrationMethod()
    _set_metric(reg, settings)
    if settings.affine_optimizer == "regular_step":
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=settings.learning_rate, minStep=settings.affine_min_step,
            numberOfIterations=settings.affine_iterations, relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8,
        )
    else:
        reg.SetOptimizerAsGradientDescent(
            learningRate=settings.learning_rate, numberOfIterations=settings.affine_iterations,
            convergenceMinimumValue=1e-6, convergenceWindowSize=10,
            estimateLearningRate=reg.EachIteration, maximumStepSizeInPhysicalUnits=settings.learning_rate,
        )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(smooth)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(tx, inPlace=True)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    counts = _iteration_counter(reg)
    reg.Execute(fixed, moving)
    return tx, {"iterations": counts[0], "stop": reg.GetOptimizerStopConditionDescription(), "metric": reg.GetMetricValue()}


def _run_on_top(
    reg: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform,
    optimised: sitk.Transform, moving_mask: sitk.Image | None,
) -> tuple[sitk.CompositeTransform, int]:
    """Run ``reg`` (its initial transform ``optimised`` already set) after the fixed ``initial``.

    Returns the composite ``initial∘optimised`` (fixed -> moving) and the iterations run.
    """
    reg.SetMovingInitialTransform(initial)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    counts = _iteration_counter(reg)
    reg.Execute(fixed, moving)
    total = sitk.CompositeTransform(fixed.GetDimension())
    total.AddTransform(initial)
    total.AddTransform(optimised)
    return total, counts[0]


def register_bspline(
    fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, settings: RegistrationSettings,
    moving_mask: sitk.Image | None = None,
) -> tuple[sitk.Transform, dict[str, Any]]:
    """B-spline free-form deformation on top of ``initial`` (fixed -> moving).

    Returns:
        ``(composite transform initial∘bspline, info)`` with ``iterations`` and ``stop``.
    """
    dim = fixed.GetDimension()
    shrink = _levels(settings.bspline_shrink, fixed)
    mesh = [max(1, int(settings.bspline_mesh))] * dim
    bsp = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = sitk.ImageRegistrationMethod()
    _set_metric(reg, settings)
    if settings.bspline_optimizer == "lbfgsb":
        # one mesh for all levels (L-BFGS-B cannot follow a refined mesh); the parameters are all
        # displacements in mm, so unit scales fit
        reg.SetOptimizerAsLBFGSB(
            gradientConvergenceTolerance=1e-5, numberOfIterations=settings.bspline_iterations,
            maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=2 * settings.bspline_iterations,
            costFunctionConvergenceFactor=1e7,
        )
        factors = [1] * len(shrink)
    else:
        reg.SetOptimizerAsGradientDescentLineSearch(
            learningRate=1.0, numberOfIterations=settings.bspline_iterations, convergenceMinimumValue=1e-5,
            convergenceWindowSize=5,
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        factors = [2**i for i in range(len(shrink))]
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel([max(0.0, f - 1.0) for f in shrink])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransformAsBSpline(bsp, inPlace=True, scaleFactors=factors)
    total, iterations = _run_on_top(reg, fixed, moving, initial, bsp, moving_mask)
    return total, {"iterations": iterations, "stop": reg.GetOptimizerStopConditionDescription()}


def register_demons(
    fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, settings: RegistrationSettings,
    moving_mask: sitk.Image | None = None,
) -> tuple[sitk.Transform, dict[str, Any]]:
    """Diffeomorphic demons on the moving image pre-aligned by ``initial``, coarse to fine.

    The moving image is resampled onto the fixed grid with ``initial``, histogram-matched to the
    fixed image (``settings.histogram_match``), and a displacement field is estimated level by level
    (``demons_shrink``; the field of a level initialises the next). The result maps a fixed point
    ``p`` to ``initial(p + u(p))``.

    Returns:
        ``(composite transform, info)`` with ``iterations`` (all levels) and ``rms`` (last RMS change).
    """
    dim = fixed.GetDimension()
    pre = _resample(moving, fixed, initial, sitk.sitkLinear)
    if settings.histogram_match:
        hm = sitk.HistogramMatchingImageFilter()
        hm.SetNumberOfHistogramLevels(64)
        hm.SetNumberOfMatchPoints(7)
        hm.SetThresholdAtMeanIntensity(settings.histogram_threshold_at_mean)
        pre = hm.Execute(pre, fixed)
    fixed_d = fixed
    if settings.demons_presmooth > 0:
        sig = [settings.demons_presmooth * sp for sp in fixed.GetSpacing()]
        fixed_d = sitk.SmoothingRecursiveGaussian(fixed, sig)
        pre = sitk.SmoothingRecursiveGaussian(pre, sig)
    field_img: sitk.Image | None = None
    total_iter, rms = 0, float("nan")
    for factor, n_iter in zip(settings.demons_shrink, settings.demons_iterations):
        f = sitk.BinShrink(fixed_d, [int(factor)] * dim) if factor > 1 else fixed_d
        m = sitk.BinShrink(pre, [int(factor)] * dim) if factor > 1 else pre
        demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        demons.SetNumberOfIterations(int(n_iter))
        demons.SetSmoothDisplacementField(True)
        demons.SetStandardDeviations(float(settings.demons_sigma))
        if settings.demons_update_sigma > 0:
            demons.SetSmoothUpdateField(True)
            demons.SetUpdateFieldStandardDeviations(float(settings.demons_update_sigma))
        demons.SetMaximumUpdateStepLength(float(settings.demons_max_step))
        if field_img is None:
            field_img = demons.Execute(f, m)
        else:
            init = sitk.Resample(field_img, f, sitk.Transform(), sitk.sitkLinear, 0.0, field_img.GetPixelID())
            field_img = demons.Execute(f, m, init)
        total_iter += int(demons.GetElapsedIterations())
        rms = float(demons.GetRMSChange())
    assert field_img is not None
    disp = sitk.DisplacementFieldTransform(sitk.Cast(field_img, sitk.sitkVectorFloat64))
    total = sitk.CompositeTransform(dim)
    total.AddTransform(initial)
    total.AddTransform(disp)
    return total, {"iterations": total_iter, "rms": rms}


def register_cc(
    fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, settings: RegistrationSettings,
    moving_mask: sitk.Image | None = None,
) -> tuple[sitk.Transform, dict[str, Any]]:
    """Refine ``initial`` with a dense displacement field on the local cross-correlation (ANTs metric).

    Gradient descent (learning rate estimated every iteration, steps capped at ``cc_max_step``
    voxels) over a displacement field on the fixed grid, coarse to fine (``cc_shrink`` /
    ``cc_smooth``); each update and the total field are Gaussian-smoothed (``cc_update_variance``,
    ``cc_total_variance``). The metric compares every voxel's neighbourhood (radius ``cc_radius``)
    after removing its local mean and scale, so edges align regardless of regional brightness.

    Returns:
        ``(composite transform initial∘field, info)`` with ``iterations`` (all levels) and ``metric``.
    """
    dim = fixed.GetDimension()
    field_img = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64, dim)
    field_img.CopyInformation(fixed)
    disp = sitk.DisplacementFieldTransform(field_img)
    disp.SetSmoothingGaussianOnUpdate(
        varianceForUpdateField=float(settings.cc_update_variance), varianceForTotalField=float(settings.cc_total_variance)
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsANTSNeighborhoodCorrelation(radius=int(settings.cc_radius))
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetOptimizerAsGradientDescent(
        learningRate=1.0, numberOfIterations=int(settings.cc_iterations), estimateLearningRate=reg.EachIteration,
        maximumStepSizeInPhysicalUnits=float(settings.cc_max_step) * min(fixed.GetSpacing()),
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    shrink = _levels(settings.cc_shrink, fixed)
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(list(settings.cc_smooth[-len(shrink):]))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(disp, inPlace=True)
    total, iterations = _run_on_top(reg, fixed, moving, initial, disp, moving_mask)
    return total, {"iterations": iterations, "metric": reg.GetMetricValue()}


def register_demons_cc(
    fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, settings: RegistrationSettings,
    moving_mask: sitk.Image | None = None,
) -> tuple[sitk.Transform, dict[str, Any]]:
    """:func:`register_demons`, then :func:`register_cc` on its result (the ``"demons_cc"`` method)."""
    tx, info = register_demons(fixed, moving, initial, settings, moving_mask)
    tx2, info2 = register_cc(fixed, moving, tx, settings, moving_mask)
    return tx2, {"iterations": int(info["iterations"]) + int(info2["iterations"]), "rms": info.get("rms"),
                 "metric_cc": info2["metric"]}


# ----------------------------------------------------------------------------------------------
# the whole registration with checks, retry and fallback
# ----------------------------------------------------------------------------------------------


def _prepare(image: sitk.Image, settings: RegistrationSettings, window: tuple[float, float] | None) -> sitk.Image:
    img = sitk.Cast(image, sitk.sitkFloat32)
    if window is not None:
        img = sitk.Clamp(img, sitk.sitkFloat32, float(window[0]), float(window[1]))
    return reduce_to(normalise_intensity(img), settings.max_size)


def register(
    fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings | None = None,
    moving_mask: sitk.Image | None = None,
) -> RegistrationResult:
    """Register ``moving`` (the exemplar) onto ``fixed``: affine, then the deformable ``method``.

    Each stage is checked (finite, metric not worse, plausible affine, no folding); a rejected
    stage is retried once with :meth:`RegistrationSettings.safer`; a deformable stage rejected
    twice falls back to the affine (``status="fallback_affine"``); an affine rejected twice gives
    ``status="failed"`` with the identity transform. Never raises on a registration problem
    (SimpleITK errors are caught and recorded as reasons); raises ValueError for images of
    different dimension.

    Args:
        fixed: the image to label (any pixel type; 2D or 3D).
        moving: the exemplar, same dimension.
        settings: :class:`RegistrationSettings` (default: the CXR default, demons).

    Returns:
        :class:`RegistrationResult`.
    """
    s = settings or RegistrationSettings()
    if fixed.GetDimension() != moving.GetDimension():
        raise ValueError(f"fixed is {fixed.GetDimension()}D but moving is {moving.GetDimension()}D")
    t0 = time.perf_counter()
    dim = fixed.GetDimension()
    with sitk_threads(s.threads):
        f, m = _prepare(fixed, s, s.fixed_window), _prepare(moving, s, s.moving_window)
        mm = None
        if moving_mask is not None:
            mm = reduce_to(sitk.Cast(moving_mask > 0, sitk.sitkFloat32), s.max_size) > 0
        init = _initial_transform(f, m, s.init)
        scores: dict[str, dict[str, float]] = {}
        scores["initial"], valid_init = _score(f, m, init, s)
        attempts: list[dict[str, Any]] = []
        reasons: list[str] = []

        affine, aff_info = None, {}
        for tag, cfg in (("default", s), ("safer", s.safer())):
            problems: list[str] = []
            score: dict[str, float] = {}
            try:
                tx, info = register_affine(f, m, cfg, mm)
                problems += _affine_problems(tx, s.max_scale)
                if not problems:
                    score, valid = _score(f, m, tx, s, reference=(init, valid_init))
                    problems += _score_problems("affine", score, scores["initial"], s)
            except RuntimeError as e:
                tx, info = None, {}
                problems.append(f"SimpleITK error in the affine stage: {_short(e)}")
            attempts.append({"stage": "affine", "settings": tag, "accepted": not problems, "reasons": problems,
                             "iterations": info.get("iterations"), **score})
            if not problems:
                affine, aff_info, valid_aff = tx, info, valid
                scores["affine"] = score
                break
            reasons += [f"affine ({tag}): {p}" for p in problems]

        if affine is None:
            return RegistrationResult(
                transform=sitk.AffineTransform(dim), affine=None, status="failed", method="none",
                metrics=_flat(scores), iterations={}, jacobian={}, attempts=attempts, reasons=reasons,
                seconds=time.perf_counter() - t0,
            )
        result = RegistrationResult(
            transform=affine, affine=affine, status="retried" if reasons else "ok", method="affine",
            iterations={"affine": int(aff_info.get("iterations", 0)), "deformable": 0},
            attempts=attempts,
        )
        scores["final"] = scores["affine"]
        if s.method != "affine":
            stage = {"bspline": register_bspline, "demons": register_demons, "demons_cc": register_demons_cc}[s.method]
            accepted = False
            for tag, cfg in (("default", s), ("safer", s.safer())):
                problems = []
                score, jac = {}, {}
                try:
                    tx, info = stage(f, m, affine, cfg, mm)
                    jac = jacobian_stats(tx, f)
                    score, _ = _score(f, m, tx, s, reference=(affine, valid_aff))
                    if not np.isfinite(jac["min"]):
                        problems.append(f"{s.method} deformation is not finite")
                    elif jac["min"] <= s.min_jacobian:
                        problems.append(
                            f"{s.method} folds: Jacobian determinant min {jac['min']:.3g} <= {s.min_jacobian:g} "
                            f"on {100 * jac['folded_fraction']:.2f}% of voxels"
                        )
                    problems += _score_problems(s.method, score, scores["affine"], s)
                except RuntimeError as e:
                    tx, info = None, {}
                    problems.append(f"SimpleITK error in the {s.method} stage: {_short(e)}")
                attempts.append({"stage": s.method, "settings": tag, "accepted": not problems, "reasons": problems,
                                 "iterations": info.get("iterations"), "jacobian_min": jac.get("min"), **score})
                if not problems:
                    accepted = True
                    result.transform, result.method = tx, s.method
                    result.iterations["deformable"] = int(info.get("iterations", 0))
                    result.jacobian = jac
                    scores["final"] = score
                    break
                reasons += [f"{s.method} ({tag}): {p}" for p in problems]
            if not accepted:
                result.status = "fallback_affine"
            elif reasons:
                result.status = "retried"
        if result.method == "affine":
            result.jacobian = jacobian_stats(affine, f)
        result.metrics = _flat(scores)
        result.reasons = reasons
        result.seconds = time.perf_counter() - t0
    return result


def _flat(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{"initial": {"metric": ..}}`` -> ``{"metric_initial": ..}``."""
    return {f"{k}_{stage}": float(v) for stage, d in scores.items() for k, v in d.items()}


def _short(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


# ----------------------------------------------------------------------------------------------
# warping
# ----------------------------------------------------------------------------------------------


_INTERP = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


def warp(
    image: sitk.Image, transform: sitk.Transform, reference: sitk.Image, interpolation: str = "linear",
    default: float = 0.0,
) -> sitk.Image:
    """Resample ``image`` (moving) onto the grid of ``reference`` (fixed) with ``transform``.

    ``interpolation``: ``"nearest"`` for label maps, ``"linear"`` for soft maps and images.
    """
    if interpolation not in _INTERP:
        raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {interpolation!r}")
    return sitk.Resample(image, reference, transform, _INTERP[interpolation], float(default), image.GetPixelID())


def warp_masks(
    masks: np.ndarray, moving: sitk.Image, transform: sitk.Transform, fixed: sitk.Image,
    interpolation: str = "linear",
) -> np.ndarray:
    """Warp per-structure masks of the moving image onto the fixed grid.

    Args:
        masks: (S, *moving spatial) bool or float masks in MONAI order, on ``moving``'s grid.
        moving, fixed: the images that define the two grids (only their geometry is used).
        transform: fixed -> moving (a :class:`RegistrationResult` transform).
        interpolation: ``"linear"`` -> float32 in [0, 1] (soft, partial-volume); ``"nearest"`` ->
            bool (every output voxel takes one input voxel's value).

    Returns:
        (S, *fixed spatial) float32 (linear) or bool (nearest).
    """
    m = np.asarray(masks)
    if m.shape[1:] != tuple(moving.GetSize()):
        raise ValueError(f"masks have spatial shape {m.shape[1:]}, moving image has {tuple(moving.GetSize())}")
    out = []
    for ch in m:
        img = to_sitk(ch.astype(np.float32))
        img.CopyInformation(moving)
        w = from_sitk(warp(img, transform, fixed, interpolation))
        out.append(w > 0.5 if interpolation == "nearest" else np.clip(w, 0.0, 1.0))
    return np.stack(out).astype(bool if interpolation == "nearest" else np.float32)
