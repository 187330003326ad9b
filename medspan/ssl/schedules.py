"""Per-iteration schedules (DINO's ``cosine_scheduler``) for LR, weight decay and EMA momentum.

Example:
    >>> lr = cosine_schedule(5e-4, 1e-6, epochs=100, niter_per_ep=50, warmup_epochs=10)
    >>> momentum = cosine_schedule(0.996, 1.0, epochs=100, niter_per_ep=50)
    >>> lr.shape, float(momentum[0])
    ((5000,), 0.996)
    >>> scale_lr(5e-4, batch_size=64, rule="linear", world_size=8)    # DINO: 5e-4 * 64 * 8 / 256
    0.001
"""

from __future__ import annotations

import numpy as np
import torch.distributed as dist

__all__ = ["LR_SCALING", "cosine_schedule", "scale_lr"]

LR_SCALING: tuple[str, ...] = ("none", "linear")
"""Learning-rate scaling rules of :func:`scale_lr`."""


def scale_lr(
    lr: float, batch_size: int, rule: str = "none", world_size: int | None = None, reference_batch: int = 256
) -> float:
    """The base learning rate for the global batch, before the schedule is built.

    Args:
        lr: the learning rate given by the user.
        batch_size: the batch size of one process (the data loader's).
        rule: ``"none"``: ``lr`` unchanged (medspan's default); ``"linear"``: DINO's rule
            ``lr * batch_size * world_size / reference_batch``.
        world_size: number of processes; None: ``torch.distributed``'s world size (1 when it is
            not initialised).
        reference_batch: the batch the given ``lr`` is meant for (DINO: 256).

    Returns:
        the learning rate to give :func:`cosine_schedule` as ``base`` (DINO scales only the base,
        not the final value).
    """
    if rule not in LR_SCALING:
        raise ValueError(f"lr_scaling must be one of {LR_SCALING}, got {rule!r}")
    if rule == "none":
        return float(lr)
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if batch_size < 1 or world_size < 1 or reference_batch < 1:
        raise ValueError(
            f"batch_size ({batch_size}), world_size ({world_size}) and reference_batch ({reference_batch}) "
            "must be >= 1"
        )
    return float(lr) * int(batch_size) * int(world_size) / int(reference_batch)


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """One value per iteration, float64 array of length ``epochs * niter_per_ep``.

    The first ``W = warmup_epochs * niter_per_ep`` values rise linearly from
    ``start_warmup_value`` to ``base`` (``np.linspace``, both ends included). The remaining
    ``L`` values are ``final + 0.5 * (base - final) * (1 + cos(pi * i / L))`` for i = 0..L-1,
    so they start at exactly ``base`` and, as in DINO, end one step short of ``final``
    (``final + 0.5 * (base - final) * (1 + cos(pi * (L - 1) / L))``).
    """
    if epochs < 0 or niter_per_ep < 0 or warmup_epochs < 0:
        raise ValueError("epochs, niter_per_ep and warmup_epochs must be >= 0")
    if warmup_epochs > epochs:
        raise ValueError(f"warmup_epochs ({warmup_epochs}) exceeds epochs ({epochs})")
    warmup_iters = int(warmup_epochs * niter_per_ep)
    total = int(epochs * niter_per_ep)
    warmup = np.linspace(start_warmup_value, base, warmup_iters) if warmup_iters > 0 else np.array([])
    n = total - warmup_iters
    iters = np.arange(n)
    main = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(n, 1)))
    schedule = np.concatenate((warmup, main)).astype(np.float64)
    assert len(schedule) == total
    return schedule
