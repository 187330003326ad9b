"""Per-iteration schedules (DINO's ``cosine_scheduler``) for LR, weight decay and EMA momentum.

Example:
    >>> lr = cosine_schedule(5e-4, 1e-6, epochs=100, niter_per_ep=50, warmup_epochs=10)
    >>> momentum = cosine_schedule(0.996, 1.0, epochs=100, niter_per_ep=50)
    >>> lr.shape, float(momentum[0])
    ((5000,), 0.996)
"""

from __future__ import annotations

import numpy as np

__all__ = ["cosine_schedule"]


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
