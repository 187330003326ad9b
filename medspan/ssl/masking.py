"""Token masks for masked-image modelling on a coarse token grid, 2D and 3D.

SMARTFormer (DAGMaN) masks on the Swin's **stage-3 grid** (for a 128^3 crop at patch 2: 8^3 cells of
16^3 voxels) and applies the mask to the student's **input patch tokens**; the reconstruction loss
is taken on the **voxels** of the masked cells. This module makes the masks and maps them between
those grids.

* :func:`attention_guided_mask` (DAGMaN / AttMask-Hint): rank the cells by the teacher's
  head-averaged CLS attention, select the top ``k = ceil(ratio * N)``; a random
  ``h = floor(hint * k)`` of those stay visible as hints ("show_max" of AttMask: a fraction of the
  *selected* tokens, see ``research/smartformer.md`` section 1.4). Masked per sample: ``k - h`` cells, all
  among the ``k`` most attended.
* :func:`random_block_mask` (SMIT baseline): ``ceil(ratio * N)`` cells chosen uniformly at random.
* :func:`upsample_mask`: a cell mask ``(B, *grid)`` -> a finer grid, each cell repeated ``factor``
  times per axis (stage-3 -> input patches: factor ``2**3``; -> voxels: ``patch_size * 2**3``).

Counts are exact per sample (no Bernoulli draws). Cells are indexed row-major over the grid, the
token order of :mod:`medspan.models.swin_ca` and :mod:`medspan.models.vit`. Randomness comes only
from the ``generator`` argument (a :class:`torch.Generator`), so masks are reproducible.

Example:
    >>> attn = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])            # (B=1, N=5)
    >>> attention_guided_mask(attn, ratio=0.6, hint=0.0).int().tolist()  # top ceil(3.0) = 3 cells
    [[0, 1, 0, 1, 1]]
    >>> upsample_mask(torch.tensor([[[True, False], [False, False]]]), 2).int()[0].tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "MaskingPolicy",
    "SeededSampler",
    "attention_guided_mask",
    "hint_count",
    "random_block_mask",
    "select_count",
    "upsample_mask",
]

_EPS = 1e-9


def select_count(ratio: float, n: int) -> int:
    """``ceil(ratio * n)`` (with a 1e-9 guard against float noise), clipped to ``[0, n]``."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return min(n, max(0, math.ceil(ratio * n - _EPS)))


def hint_count(hint: float, k: int) -> int:
    """``floor(hint * k)`` (1e-9 guard): how many of the ``k`` selected cells stay visible."""
    if not 0.0 <= hint <= 1.0:
        raise ValueError(f"hint must be in [0, 1], got {hint}")
    return min(k, max(0, math.floor(hint * k + _EPS)))


def _random_keys(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    # drawn on the CPU so that a CPU generator works for any device and results do not depend on it
    return torch.rand(tuple(shape), generator=generator).to(device)


def attention_guided_mask(
    attn: Tensor,
    ratio: float = 0.7,
    hint: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mask the most-attended cells, keeping a random fraction of them visible as hints.

    Args:
        attn: (B, N) or (B, *grid) attention per cell (e.g. head-averaged CLS attention); higher =
            more attended. Ties are broken by the lower index (stable sort).
        ratio: fraction of cells selected, ``k = ceil(ratio * N)``.
        hint: fraction of the selected cells left visible, ``h = floor(hint * k)``, chosen at random.
        generator: source of the hint draw.

    Returns:
        bool mask with the shape of ``attn``, True = masked; exactly ``k - h`` True per sample,
        all among the ``k`` highest-attention cells.
    """
    if attn.ndim < 2:
        raise ValueError(f"attn must be (B, N) or (B, *grid), got shape {tuple(attn.shape)}")
    b = attn.shape[0]
    flat = attn.detach().reshape(b, -1)
    n = flat.shape[1]
    k = select_count(ratio, n)
    h = hint_count(hint, k)
    order = torch.argsort(flat.float(), dim=1, descending=True, stable=True)
    top = order[:, :k]  # (B, k) indices of the selected cells, most attended first
    mask = torch.zeros(b, n, dtype=torch.bool, device=attn.device)
    mask.scatter_(1, top, True)
    if h > 0:
        # a uniformly random subset of h among the k selected: the h smallest random keys
        pick = torch.argsort(_random_keys((b, k), generator, attn.device), dim=1)[:, :h]
        mask.scatter_(1, torch.gather(top, 1, pick), False)
    return mask.reshape(attn.shape)


def random_block_mask(
    batch: int,
    grid: Sequence[int],
    ratio: float = 0.7,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """SMIT's random masking: exactly ``ceil(ratio * N)`` cells of the grid per sample, uniformly at random.

    Returns:
        bool (batch, *grid), True = masked.
    """
    grid = tuple(int(g) for g in grid)
    if len(grid) not in (2, 3):
        raise ValueError(f"grid must have 2 or 3 sizes, got {grid}")
    n = math.prod(grid)
    k = select_count(ratio, n)
    rank = torch.argsort(torch.argsort(_random_keys((batch, n), generator, torch.device(device)), dim=1), dim=1)
    return (rank < k).reshape(batch, *grid)


def upsample_mask(mask: Tensor, factor: int | Sequence[int]) -> Tensor:
    """Repeat every cell of ``mask`` (B, *grid) ``factor`` times along each spatial axis.

    Args:
        mask: (B, *grid) bool.
        factor: int or one int per spatial axis.

    Returns:
        (B, *(grid * factor)) bool; fine cell ``i`` belongs to coarse cell ``i // factor``.
    """
    nsp = mask.ndim - 1
    f = (int(factor),) * nsp if isinstance(factor, int) else tuple(int(v) for v in factor)
    if len(f) != nsp:
        raise ValueError(f"factor needs {nsp} entries for a mask of shape {tuple(mask.shape)}, got {factor}")
    out = mask
    for axis, r in enumerate(f):
        if r != 1:
            out = out.repeat_interleave(r, dim=1 + axis)
    return out


class SeededSampler:
    """Base of the mask samplers: an own :class:`torch.Generator` (``seed=None``: the global RNG)
    whose state travels through checkpoints with ``state_dict`` / ``load_state_dict``."""

    def __init__(self, seed: int | None = 0) -> None:
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    def state_dict(self) -> dict:
        """The generator state (so a resumed run continues the same sequence)."""
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])


class MaskingPolicy(SeededSampler):
    """How the student's stage-3 mask is chosen each step, with its own random generator.

    Args:
        mode: ``"attention"`` (DAGMaN: :func:`attention_guided_mask` on the teacher's head-averaged
            CLS attention) or ``"random"`` (SMIT baseline: :func:`random_block_mask`).
        ratio: masking ratio (0.7).
        hint: fraction of the selected cells kept visible (attention mode only; 0.1).
        seed: seed of its :class:`torch.Generator` (None: the global RNG).

    ``policy(attn (B, N) or None, batch, grid, device) -> (B, *grid) bool``; ``state_dict`` /
    ``load_state_dict`` carry the generator state through checkpoints.

    Example:
        >>> policy = MaskingPolicy("attention", 0.7, 0.1, seed=0)
        >>> policy(torch.rand(2, 64), 2, (4, 4, 4)).flatten(1).sum(1).tolist()
        [41, 41]
    """

    def __init__(self, mode: str = "attention", ratio: float = 0.7, hint: float = 0.1, seed: int | None = 0) -> None:
        if mode not in ("attention", "random"):
            raise ValueError(f"masking mode must be 'attention' or 'random', got {mode!r}")
        select_count(ratio, 1)
        hint_count(hint, 1)
        super().__init__(seed)
        self.mode, self.ratio, self.hint = mode, float(ratio), float(hint)

    @property
    def needs_attention(self) -> bool:
        return self.mode == "attention"

    def __call__(
        self, attn: Tensor | None, batch: int, grid: Sequence[int], device: torch.device | str = "cpu"
    ) -> Tensor:
        grid = tuple(int(g) for g in grid)
        if self.mode == "random":
            return random_block_mask(batch, grid, self.ratio, self.generator, device)
        if attn is None:
            raise ValueError("attention-guided masking needs the teacher's attention")
        return attention_guided_mask(attn.reshape(batch, *grid), self.ratio, self.hint, self.generator)

    def __repr__(self) -> str:
        return f"MaskingPolicy(mode={self.mode!r}, ratio={self.ratio}, hint={self.hint})"
