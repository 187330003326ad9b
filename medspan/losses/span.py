"""SPAN loss: pull chosen heads' CLS->patch attention toward anatomical priors.

Our formulation (the paper's code is not public; see research/span.md section 4.3):

* A prior map ``M_s`` per structure s (left lung, right lung, heart, ...), in the same array
  axes and size as the image crop it belongs to (priors travel with the image through the
  crop/resize transforms).
* On the patch grid: ``p_s = normalise(avgpool_to_grid(blur_sigma(M_s)) + eps)``, a
  distribution over the N patch tokens, tokens in row-major order of the spatial axes, the same
  order as :class:`medspan.models.vit.VisionTransformer`.
* ``a_h``: the last block's CLS->patch attention of head h (CLS entry dropped, renormalised),
  ``ViTOutput.cls_attn`` with all heads.
* mode ``"kl"``:      ``L_h = KL(p_s || a_h) = sum_i p_i (log p_i - log a_h,i)``
* mode ``"inside"``:  ``L_h = -log sum_i [i in R_s] a_h,i``, with the region
  ``R_s = {i : q_s,i > inside_threshold * max_j q_s,j}`` where ``q_s = avgpool_to_grid(blur(M_s))``
  (relative threshold per map; for a binary mask with threshold 0.5 and no blur: the patches
  more than half covered, or more than half as covered as the best-covered patch).
* ``L = mean of L_h over regularized heads h and batch items b`` whose structure is present.

**Absent structures.** A prior channel that is all zero for an item (the structure is missing
or cropped away) gives no target; its (b, h) terms are masked out of the mean instead of giving
NaN or pulling toward a uniform map. If no term is left, the loss is 0 (still connected to the
graph). Priors must be non-negative (not checked, to avoid a host sync).

Example:
    >>> from medspan.models.vit import build_vit
    >>> vit = build_vit("vit_toy")                       # 6 heads, patch 8
    >>> images, priors = torch.randn(2, 1, 64, 64), torch.rand(2, 3, 64, 64)   # priors (B, S, X, Y)
    >>> loss_fn = SpanPriorLoss({0: 0, 1: 1, 2: 2})      # heads 0..2 -> structures 0..2, 3..5 free
    >>> out = vit.forward_features(images, return_attention=True)   # cls_attn (2, 6, 64)
    >>> loss = loss_fn(out.cls_attn, priors, out.grid)   # scalar
    >>> loss_fn.per_head(out.cls_attn, priors, out.grid).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medspan.errors import DataError

__all__ = ["SpanPriorLoss", "gaussian_blur", "pool_to_grid", "prior_to_patch_distribution"]


def _gaussian_kernel1d(sigma: float, truncate: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_blur(x: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """Separable Gaussian blur over the trailing spatial axes of ``x`` (B, C, *spatial).

    ``sigma`` is in pixels of ``x``; the kernel has radius ``int(truncate * sigma + 0.5)`` and sums
    to 1; borders are padded by replicating the edge (like ``scipy.ndimage.gaussian_filter(...,
    mode="nearest")``), so constant maps stay constant and mass away from the borders is preserved.
    ``sigma <= 0`` returns ``x`` unchanged. 2D and 3D spatial inputs (4D/5D tensors).
    """
    if sigma <= 0:
        return x
    nsp = x.ndim - 2
    if nsp not in (2, 3):
        raise ValueError(f"gaussian_blur expects (B, C, *spatial) with 2 or 3 spatial dims, got {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    b, c = x.shape[:2]
    k = _gaussian_kernel1d(float(sigma), truncate, x.dtype, x.device)
    r = (k.numel() - 1) // 2
    conv = F.conv2d if nsp == 2 else F.conv3d
    y = x.reshape(b * c, 1, *x.shape[2:])
    for axis in range(nsp):
        shape = [1, 1] + [1] * nsp
        shape[2 + axis] = k.numel()
        pad = [0, 0] * nsp  # F.pad order: last axis first
        pad[2 * (nsp - 1 - axis)] = r
        pad[2 * (nsp - 1 - axis) + 1] = r
        y = conv(F.pad(y, pad, mode="replicate"), k.reshape(shape))
    return y.reshape(x.shape)


def pool_to_grid(x: Tensor, grid: Sequence[int]) -> Tensor:
    """Adaptive average pool of ``x`` (B, C, *spatial) to ``grid``, flattened: (B, C, prod(grid)).

    Flattening is row-major over the spatial axes as given: grid cell (i, j) -> index
    ``i * grid[1] + j`` (the ViT's token order).
    """
    grid = tuple(int(g) for g in grid)
    pool = F.adaptive_avg_pool2d if len(grid) == 2 else F.adaptive_avg_pool3d
    return pool(x, grid).flatten(2)


@functools.lru_cache(maxsize=64)
def _axis_operator_f64(length: int, cells: int, sigma: float, truncate: float) -> Tensor:
    """(cells, length) matrix = adaptive-average-pool(length -> cells) @ Gaussian blur (replicate border)."""
    blur = torch.eye(length, dtype=torch.float64)
    if sigma > 0:
        k = _gaussian_kernel1d(sigma, truncate, torch.float64, torch.device("cpu"))
        r = (k.numel() - 1) // 2
        blur = torch.zeros(length, length, dtype=torch.float64)
        rows = torch.arange(length)
        for t in range(k.numel()):  # output i reads input clamp(i + t - r)
            cols = (rows + t - r).clamp(0, length - 1)
            blur.index_put_((rows, cols), k[t].expand(length), accumulate=True)
    pool = torch.zeros(cells, length, dtype=torch.float64)
    for c in range(cells):  # torch's adaptive pooling bins
        start, end = (c * length) // cells, -((-(c + 1) * length) // cells)
        pool[c, start:end] = 1.0 / (end - start)
    return pool @ blur


def blur_pool_to_grid(x: Tensor, grid: Sequence[int], sigma: float, truncate: float = 4.0) -> Tensor:
    """``pool_to_grid(gaussian_blur(x, sigma), grid)`` as one small matrix product per axis.

    Blur and adaptive average pooling are linear and separable, so along each spatial axis they
    collapse into a (cells, length) matrix; the prior goes to the grid in O(pixels * cells) without
    a convolution (a conv with a 1-channel kernel is slow on CPU).

    Args:
        x: (B, C, *spatial) float maps, 2 or 3 spatial dims.
        grid: target grid, as many ints as spatial dims.
        sigma: blur in pixels of ``x`` (0: pooling only).

    Returns:
        (B, C, prod(grid)), row-major over the grid like :func:`pool_to_grid`.
    """
    grid = tuple(int(g) for g in grid)
    y = x
    for axis, cells in enumerate(grid):
        op = _axis_operator_f64(int(x.shape[2 + axis]), cells, float(max(sigma, 0.0)), float(truncate))
        op = op.to(device=x.device, dtype=x.dtype)
        y = torch.movedim(torch.movedim(y, 2 + axis, -1) @ op.T, -1, 2 + axis)
    return y.flatten(2)


def _check_prior(prior: Tensor, grid: Sequence[int], where: str = "priors") -> None:
    if len(grid) not in (2, 3) or any(int(g) < 1 for g in grid):
        raise ValueError(f"grid must be 2 or 3 positive ints, got {tuple(grid)}")
    if prior.ndim != 2 + len(grid):
        raise DataError(
            where,
            f"expected shape (B, S, *spatial) with {len(grid)} spatial dims for grid {tuple(grid)}, "
            f"got {tuple(prior.shape)}",
        )


def prior_to_patch_distribution(
    prior: Tensor,
    grid: Sequence[int],
    sigma: float = 1.0,
    eps: float = 1e-6,
) -> Tensor:
    """Prior maps -> one distribution over the patch tokens per structure.

    Args:
        prior: (B, S, *spatial) non-negative maps, same axes as the image the ViT saw.
        grid: the ViT's patch grid (``ViTOutput.grid``), 2 or 3 ints.
        sigma: Gaussian blur in pixels of ``prior`` (0 = no blur).
        eps: added to every pooled cell before normalising.

    Returns:
        (B, S, N) float, N = prod(grid), each row summing to 1 (an all-zero map gives the
        uniform distribution when eps > 0, zeros when eps == 0).

    Example:
        >>> m = torch.zeros(1, 1, 4, 4); m[0, 0, :2, 2:] = 1          # top-right patch of a 2x2 grid
        >>> prior_to_patch_distribution(m, (2, 2), sigma=0, eps=0)
        tensor([[[0., 1., 0., 0.]]])
    """
    _check_prior(prior, grid)
    if not prior.is_floating_point():
        prior = prior.float()
    pooled = blur_pool_to_grid(prior, grid, sigma) + eps
    return pooled / pooled.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(pooled.dtype).tiny)


class SpanPriorLoss(nn.Module):
    """SPAN attention-prior loss (module docstring has the formulas).

    Args:
        head_to_structure: ``{head: structure}`` or a sequence indexed by head whose entries are
            a structure index or None (free head), e.g. ``[0, 1, 2, None, None, None]``.
        sigma: Gaussian blur of the priors in pixels (0 = none).
        eps: added to the pooled prior before normalising (``"kl"`` mode).
        mode: ``"kl"`` or ``"inside"``.
        inside_threshold: relative threshold defining the region in ``"inside"`` mode.
        attn_floor: lower clamp of attention values before ``log``.

    ``forward(cls_attn (B, H, N), priors (B, S, *spatial), grid) -> scalar``; ``cls_attn`` holds
    ALL heads of the last block (head index = position). Raises
    :class:`~medspan.errors.DataError` on mismatching shapes.
    """

    def __init__(
        self,
        head_to_structure: Mapping[int, int] | Sequence[int | None],
        sigma: float = 1.0,
        eps: float = 1e-6,
        mode: str = "kl",
        inside_threshold: float = 0.5,
        attn_floor: float = 1e-12,
    ) -> None:
        super().__init__()
        if isinstance(head_to_structure, Mapping):
            pairs = [(int(h), int(s)) for h, s in head_to_structure.items() if s is not None]
        else:
            pairs = [(h, int(s)) for h, s in enumerate(head_to_structure) if s is not None]
        pairs.sort()
        for h, s in pairs:
            if h < 0 or s < 0:
                raise ValueError(f"head and structure indices must be >= 0, got head {h} -> structure {s}")
        if mode not in ("kl", "inside"):
            raise ValueError(f"mode must be 'kl' or 'inside', got {mode!r}")
        if sigma < 0 or eps < 0:
            raise ValueError(f"sigma and eps must be >= 0, got sigma={sigma}, eps={eps}")
        self._heads = tuple(h for h, _ in pairs)
        self._structures = tuple(s for _, s in pairs)
        self.sigma = float(sigma)
        self.eps = float(eps)
        self.mode = mode
        self.inside_threshold = float(inside_threshold)
        self.attn_floor = float(attn_floor)

    @property
    def regularized_heads(self) -> tuple[int, ...]:
        """Heads with a structure, ascending."""
        return self._heads

    @property
    def structures(self) -> tuple[int, ...]:
        """Structure of each regularized head (aligned with :attr:`regularized_heads`)."""
        return self._structures

    def extra_repr(self) -> str:
        m = ", ".join(f"{h}->{s}" for h, s in zip(self._heads, self._structures))
        return f"heads={{{m}}}, mode={self.mode!r}, sigma={self.sigma}, eps={self.eps}"

    def _validate(self, cls_attn: Tensor, priors: Tensor, grid: Sequence[int]) -> None:
        _check_prior(priors, grid)
        n = math.prod(int(g) for g in grid)
        if cls_attn.ndim != 3 or cls_attn.shape[2] != n:
            raise DataError(
                "cls_attn", f"expected (B, H, {n}) for grid {tuple(grid)}, got {tuple(cls_attn.shape)}"
            )
        if priors.shape[0] != cls_attn.shape[0]:
            raise DataError(
                "priors",
                f"batch size {priors.shape[0]} differs from cls_attn batch size {cls_attn.shape[0]} "
                f"(priors {tuple(priors.shape)}, cls_attn {tuple(cls_attn.shape)})",
            )
        for h, s in zip(self._heads, self._structures):
            if h >= cls_attn.shape[1]:
                raise DataError(
                    "cls_attn", f"cls_attn has {cls_attn.shape[1]} heads but head {h} is regularized"
                )
            if s >= priors.shape[1]:
                raise DataError(
                    "priors",
                    f"prior has {priors.shape[1]} channels but head {h} is assigned structure {s} "
                    f"(priors shape {tuple(priors.shape)})",
                )

    def _terms(self, cls_attn: Tensor, priors: Tensor, grid: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Per-(item, regularized head) losses (B, H_reg) and a presence mask (B, H_reg) bool."""
        self._validate(cls_attn, priors, grid)
        if not priors.is_floating_point():
            priors = priors.float()
        priors = priors.to(cls_attn.dtype) if cls_attn.is_floating_point() else priors
        heads = list(self._heads)
        structs = list(self._structures)
        a = cls_attn[:, heads]  # (B, H_reg, N)
        m = priors[:, structs]  # (B, H_reg, *spatial)
        present = m.flatten(2).amax(dim=-1) > 0  # (B, H_reg)
        if self.mode == "kl":
            p = prior_to_patch_distribution(m, grid, sigma=self.sigma, eps=self.eps)
            log_a = a.clamp_min(self.attn_floor).log()
            terms = (torch.xlogy(p, p) - p * log_a).sum(dim=-1)
        else:
            q = pool_to_grid(gaussian_blur(m, self.sigma), grid)
            thr = self.inside_threshold * q.amax(dim=-1, keepdim=True)
            region = (q > thr).to(a.dtype)
            terms = -(region * a).sum(dim=-1).clamp_min(self.attn_floor).log()
        return terms, present

    def per_head(
        self, cls_attn: Tensor, priors: Tensor, grid: Sequence[int], absent_value: float = float("nan")
    ) -> Tensor:
        """(B, H_reg) loss per item and regularized head (order of :attr:`regularized_heads`),
        ``absent_value`` (default NaN: use ``torch.nanmean``) where the structure is absent."""
        terms, present = self._terms(cls_attn, priors, grid)
        return torch.where(present, terms, torch.full_like(terms, absent_value))

    def forward(self, cls_attn: Tensor, priors: Tensor, grid: Sequence[int]) -> Tensor:
        """Mean loss over present (item, regularized head) pairs; a scalar tensor."""
        if not self._heads:
            return cls_attn.sum() * 0.0
        terms, present = self._terms(cls_attn, priors, grid)
        masked = torch.where(present, terms, torch.zeros_like(terms))
        return masked.sum() / present.sum().clamp_min(1).to(terms.dtype)
