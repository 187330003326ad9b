"""EMA teacher for self-distillation.

* :func:`copy_teacher` makes the teacher: a deep copy of the student with gradients off, in eval
  mode and with stochastic depth disabled (DINO builds its teacher without drop-path).
* :func:`ema_update` moves it: ``t = m * t + (1 - m) * s`` for every parameter (with
  ``torch._foreach`` ops, one kernel per group instead of one per tensor), buffers copied.
* :func:`patch_dropout_mask` / :class:`PatchDropout` make it *noisy* (SMARTFormer / DAGMaN): a random
  ``ratio`` of the teacher's input patch tokens is dropped. A windowed Swin needs the full token
  grid, so "dropped" means the token is set to zero after the patch embedding
  (``SwinCA.forward_features(x, token_mask, mask_mode="zero")``), not removed; the note
  ``research/smartformer.md`` section 1.5 (Liu et al., WACV 2023 patch dropout; ratio 0.7) calls zeroing
  the natural reading for Swin. Only the teacher's input is touched; the student's is not.

Example:
    >>> student = torch.nn.Linear(4, 2)
    >>> teacher = copy_teacher(student)
    >>> ema_update(student, teacher, momentum=0.996)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from medspan.ssl.masking import SeededSampler

__all__ = ["PatchDropout", "copy_teacher", "ema_update", "patch_dropout_mask"]


def copy_teacher(student: nn.Module, disable_drop_path: bool = True) -> nn.Module:
    """Deep copy of ``student`` with ``requires_grad=False`` everywhere, in eval mode.

    Args:
        student: the student network (unwrapped, not the DDP wrapper).
        disable_drop_path: set ``drop_prob = 0`` on every module that has one
            (:class:`medspan.models.vit.DropPath`), so the teacher is deterministic even if
            someone puts it back into train mode.
    """
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if disable_drop_path:
        for m in teacher.modules():
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0
    teacher.eval()
    return teacher


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """In place: ``t = momentum * t + (1 - momentum) * s`` for parameters; buffers copied.

    Parameters and buffers are matched by position (``.parameters()`` / ``.buffers()`` order),
    so pass the unwrapped student (``model.module`` under DDP). Shapes must agree.

    Args:
        student: source network.
        teacher: network updated in place (same architecture).
        momentum: m in [0, 1]; 1 keeps the teacher, 0 copies the student.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    s_params = list(student.parameters())
    t_params = list(teacher.parameters())
    s_bufs = list(student.buffers())
    t_bufs = list(teacher.buffers())
    if len(s_params) != len(t_params) or len(s_bufs) != len(t_bufs):
        raise ValueError(
            f"student and teacher differ: {len(s_params)} vs {len(t_params)} parameters, "
            f"{len(s_bufs)} vs {len(t_bufs)} buffers"
        )
    for s, t in zip(s_params, t_params):
        if s.shape != t.shape:
            raise ValueError(f"parameter shape mismatch: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
    if t_params:
        s_data = [s.detach().to(t.dtype) for s, t in zip(s_params, t_params)]
        t_data = [t.detach() for t in t_params]
        torch._foreach_mul_(t_data, momentum)
        torch._foreach_add_(t_data, s_data, alpha=1.0 - momentum)
    for s, t in zip(s_bufs, t_bufs):
        t.copy_(s)


def patch_dropout_mask(
    batch: int,
    grid: Sequence[int],
    ratio: float = 0.7,
    block: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Which input patch tokens of the noisy teacher are dropped: exactly ``round(ratio * M)`` per sample.

    Args:
        batch: B.
        grid: the input patch grid (2 or 3 sizes), e.g. ``(64, 64, 64)`` for a 128^3 crop at patch 2.
        ratio: fraction dropped (DAGMaN: 0.7); 0 gives an all-False mask (a clean teacher).
        block: drop cubes of ``block`` patches per axis instead of single patches (1 = per token);
            every grid size must be divisible by it. M = number of blocks.
        generator: the only source of randomness (drawn on the CPU, then moved to ``device``).
        device: where the mask lives.

    Returns:
        bool (B, *grid), True = dropped (zeroed). ``round`` is half up: ``floor(ratio * M + 0.5)``.

    Example:
        >>> m = patch_dropout_mask(2, (4, 4, 4), 0.7, generator=torch.Generator().manual_seed(0))
        >>> m.shape, m.flatten(1).sum(1).tolist()            # 0.7 * 64 = 44.8 -> 45 per sample
        (torch.Size([2, 4, 4, 4]), [45, 45])
    """
    grid = tuple(int(g) for g in grid)
    if len(grid) not in (2, 3):
        raise ValueError(f"grid must have 2 or 3 sizes, got {grid}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"patch dropout ratio must be in [0, 1], got {ratio}")
    block = int(block)
    if block < 1 or any(g % block for g in grid):
        raise ValueError(f"block {block} must be >= 1 and divide every grid size {grid}")
    coarse = tuple(g // block for g in grid)
    m = math.prod(coarse)
    k = min(m, int(math.floor(ratio * m + 0.5)))
    keys = torch.rand(batch, m, generator=generator)
    rank = torch.argsort(torch.argsort(keys, dim=1), dim=1)
    mask = (rank < k).reshape(batch, *coarse)
    for axis in range(len(grid)):
        if block > 1:
            mask = mask.repeat_interleave(block, dim=1 + axis)
    return mask.to(device)


class PatchDropout(SeededSampler):
    """Noise of the SMARTFormer teacher: a callable making :func:`patch_dropout_mask` masks.

    Args:
        ratio: fraction of patch tokens dropped (0.7 in DAGMaN; 0 = clean teacher).
        block: size in patches of the dropped cubes (1 = single tokens).
        seed: seed of its own :class:`torch.Generator` (reproducible noise, independent of the
            global RNG); None draws from the global RNG.

    ``noise(batch, grid, device) -> (B, *grid) bool`` or None when ``ratio == 0``.

    Example:
        >>> noise = PatchDropout(0.7, seed=0)
        >>> noise(2, (8, 8, 8)).flatten(1).sum(1).tolist()      # round(0.7 * 512) = 358
        [358, 358]
    """

    def __init__(self, ratio: float = 0.7, block: int = 1, seed: int | None = 0) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"patch dropout ratio must be in [0, 1], got {ratio}")
        super().__init__(seed)
        self.ratio = float(ratio)
        self.block = int(block)

    def __call__(self, batch: int, grid: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor | None:
        if self.ratio == 0.0:
            return None
        return patch_dropout_mask(batch, grid, self.ratio, self.block, self.generator, device)

    def __repr__(self) -> str:
        return f"PatchDropout(ratio={self.ratio}, block={self.block})"
