"""SAR spatial-entropy loss: few connected regions per attention map, batched on CPU and GPU.

Our implementation of SAR (Peruzzo et al., "Spatial entropy as an inductive bias for vision
transformers", Machine Learning 2024; research/sar.md section 1). For one map of CLS->patch
attention **logits** ``z`` on a 2D or 3D token grid (one map per image and head):

* ``mu = mean(z)`` over the N tokens (with gradient); foreground ``B = [z > mu]`` (a constant);
* the foreground is split into connected components C_1..C_n: 8-connectivity in 2D, 26 in 3D
  (``connectivity="full"``; ``"face"`` gives 4 / 6). The labelling is exact (the partition of
  ``scipy.ndimage.label`` with the matching structure) and is a constant for autograd;
* region masses ``m_r = sum_{i in C_r} relu(z_i - mu)`` (gradient flows to ``z`` and ``mu``);
* shares ``p_r = m_r / sum_r m_r`` and the spatial entropy ``H = -sum_r p_r log p_r`` (natural
  log). ``H = 0`` for a single region; ``log n`` for n regions of equal mass. A map with no
  foreground (a constant map) has ``H = 0`` and zero gradient;
* the loss is the mean of ``H`` over the selected maps.

Everything runs in float32 (float64 input stays float64) with autocast disabled, whatever the
input dtype; a map with a non-finite logit gives a NaN entropy (never a silent 0).

**Batched labelling, no loop over maps, no host sync per map.** Two exact backends:

* ``"torch"`` -- :func:`label_components`, any device: label propagation with root hooking
  (label-equivalence style). Every foreground token starts with its own label ``1 + flat index``;
  each iteration (1) takes the maximum label over each token's neighbourhood, (2) hooks: the token
  the label points to (the "root") absorbs that maximum (``scatter_reduce`` amax), (3) pointer
  jumping: every token takes the label of the token its label points to. Labels only grow and
  always name a token of the same component; an iteration that changes nothing is a fixpoint where
  each component carries one label, ``1 + the largest flat index of its tokens``. Convergence is
  tested on the whole batch every ``check_every`` iterations (one host sync per test, for all
  maps). Measured: random 14x14 and 8x8x8 maps need at most 7 iterations (the last one confirms
  the fixpoint), serpentines, spirals and 15x15 mazes 6-8, 29x29 mazes 9; plain propagation would
  need the path length (~100 for a 14x14 serpentine). Region masses are dense (M, N+1) bins.
* ``"cc3d"`` -- CPU tensors: ONE call of ``cc3d.connected_components`` (the SAUF / decision-tree
  labeller of the ``connected-components-3d`` package) on the M maps laid side by side along the
  last grid axis with a zero column (2D) or zero plane (3D) between neighbours, so regions never
  cross maps; then masses and shares on the K regions only. The fastest path on CPU (about 3x
  faster than scipy's labelling of the same stack).
* ``"scipy"`` -- CPU tensors: ONE ``scipy.ndimage.label`` call on the M maps stacked along a new
  axis, with a structure that has no links along that axis; the rest as ``"cc3d"``.

``backend="auto"`` (default) takes cc3d on CPU (scipy when cc3d is not installed) and torch elsewhere. The per-map reference (a
Python loop of ``scipy.ndimage.label`` as in SAR's public code) is in ``benchmarks/bench_sar.py``.

Example:
    >>> z = torch.zeros(1, 1, 16)                       # one 4x4 map, tokens row-major
    >>> z[0, 0, [0, 1, 4, 5]] = 1.0                     # a 2x2 blob in the top-left corner
    >>> z[0, 0, [10, 11, 14, 15]] = 1.0                 # an equal blob bottom-right (diagonal contact)
    >>> float(SpatialEntropyLoss(connectivity="face")(z, (4, 4)))   # 4-connectivity: 2 regions
    0.6931471824645996
    >>> float(SpatialEntropyLoss()(z, (4, 4)))          # 8-connectivity: corners touch -> 1 region
    0.0
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medspan.errors import DataError
from medspan.ssl.schedules import cosine_schedule

__all__ = [
    "SpatialEntropyLoss",
    "entropy_from_masses",
    "label_components",
    "region_masses",
    "sar_schedule",
    "spatial_entropy",
]

_CONNECTIVITIES = ("full", "face")
_BACKENDS = ("auto", "torch", "cc3d", "scipy")


def _check_grid(grid: Sequence[int]) -> tuple[int, ...]:
    g = tuple(int(s) for s in grid)
    if len(g) not in (2, 3) or any(s < 1 for s in g):
        raise ValueError(f"grid must be 2 or 3 positive ints, got {tuple(grid)}")
    return g


def _neighbour_max(labels: Tensor, connectivity: str) -> Tensor:
    """Max of ``labels`` (M, *grid), int64 >= 0, over each token's neighbourhood (itself included).

    ``"full"``: the 3x3 (x3) box, i.e. 8 / 26 neighbours, as separable 1D maxima; ``"face"``: the
    cross of the 4 / 6 face neighbours. Outside the grid counts as 0 (neutral for labels >= 0).
    """
    nd = labels.ndim - 1
    padded = F.pad(labels, (1, 1) * nd)  # zero border on every grid axis
    if connectivity == "full":
        out = padded
        for axis in range(1, nd + 1):
            n = out.shape[axis] - 2
            out = torch.maximum(
                torch.maximum(out.narrow(axis, 0, n), out.narrow(axis, 1, n)), out.narrow(axis, 2, n)
            )
        return out
    inner = [slice(None)] + [slice(1, -1)] * nd
    out = labels
    for axis in range(1, nd + 1):
        for start in (0, 2):
            idx = list(inner)
            idx[axis] = slice(start, start + labels.shape[axis])
            out = torch.maximum(out, padded[tuple(idx)])
    return out


def label_components(
    mask: Tensor,
    connectivity: str = "full",
    check_every: int | None = None,
    return_iterations: bool = False,
) -> Tensor | tuple[Tensor, int]:
    """Connected components of many binary maps at once (no Python loop over maps).

    Args:
        mask: (M, *grid) bool (or 0/1) tensor, 2 or 3 grid axes, any device. Each of the M maps
            is labelled on its own (no connection across maps).
        connectivity: ``"full"`` (8-connectivity in 2D, 26 in 3D; scipy's
            ``generate_binary_structure(ndim, ndim)``) or ``"face"`` (4 / 6; ``(ndim, 1)``).
        check_every: test convergence every this many iterations (one host sync per test, for
            the whole batch). Default: 1 on CPU (syncs are free there), 4 on other devices.
        return_iterations: also return the number of iterations run.

    Returns:
        (M, *grid) int64: 0 on the background; on the foreground, the label of a component is
        ``1 + the largest row-major flat index of its tokens`` (labels are unique per map, not
        consecutive). With ``return_iterations``: ``(labels, iterations)``.

    The partition equals ``scipy.ndimage.label`` with the matching structure, exactly (see the
    module docstring for the algorithm and why its fixpoint is exact).

    Example:
        >>> m = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 0]], [[1, 0, 1], [0, 0, 0], [1, 1, 0]]], dtype=torch.bool)
        >>> label_components(m)                  # 8-connectivity: the diagonal pair is one region
        tensor([[[5, 0, 0],
                 [0, 5, 0],
                 [0, 0, 0]],
        <BLANKLINE>
                [[1, 0, 3],
                 [0, 0, 0],
                 [8, 8, 0]]])
        >>> label_components(m, "face")[0]       # 4-connectivity: two regions
        tensor([[1, 0, 0],
                [0, 5, 0],
                [0, 0, 0]])
    """
    if connectivity not in _CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {_CONNECTIVITIES}, got {connectivity!r}")
    if mask.ndim not in (3, 4):
        raise ValueError(f"mask must be (M, *grid) with 2 or 3 grid axes, got shape {tuple(mask.shape)}")
    shape = tuple(mask.shape)
    m, grid = shape[0], shape[1:]
    n = math.prod(grid)
    if check_every is None:
        check_every = 1 if mask.device.type == "cpu" else 4
    check_every = max(int(check_every), 1)
    fg = mask.reshape(m, n).to(torch.bool)
    if m == 0 or n == 0:
        out = torch.zeros(shape, dtype=torch.long, device=mask.device)
        return (out, 0) if return_iterations else out
    fg_long = fg.long()
    labels = torch.arange(1, n + 1, device=mask.device, dtype=torch.long).expand(m, n) * fg_long
    # Propagation alone needs <= (longest geodesic path) < n iterations; hooking and jumping only
    # add progress, so n + check_every bounds the loop with room for the last check.
    limit = n + check_every
    it = 0
    while True:
        prev = labels
        nbr = _neighbour_max(labels.reshape(m, *grid), connectivity).reshape(m, n) * fg_long
        table = F.pad(labels, (1, 0))  # column 0 = background, always 0; column 1 + i = label of token i
        table.scatter_reduce_(1, labels, nbr, reduce="amax")  # hook: roots absorb neighbour maxima
        table[:, 1:] = torch.maximum(table[:, 1:], nbr)
        labels = torch.gather(table, 1, table[:, 1:])  # pointer jump
        it += 1
        if it % check_every == 0 and not bool((labels != prev).any()):
            break
        if it >= limit:  # unreachable by the bound above; guards against a broken invariant
            raise RuntimeError(f"label_components did not converge in {it} iterations on {m} maps of {grid}")
    labels = labels.reshape(shape)
    return (labels, it) if return_iterations else labels


def region_masses(z: Tensor, labels: Tensor) -> Tensor:
    """Mass per region: ``masses[i, l - 1] = sum of relu(z_i - mean(z_i)) over tokens labelled l``.

    Args:
        z: (M, N) float logits (one map per row), with gradient.
        labels: (M, N) int64 labels from :func:`label_components` (0 = background, else in 1..N).

    Returns:
        (M, N) float masses (bin ``l - 1`` for label ``l``; bins without a region are 0),
        differentiable w.r.t. ``z`` (through the soft weights and the mean).
    """
    return _dense_masses(z - z.mean(dim=-1, keepdim=True), labels)


def _dense_masses(d: Tensor, labels: Tensor) -> Tensor:
    """(M, N) masses of :func:`region_masses` from ``d = z - mean`` (M, N)."""
    bins = torch.zeros(d.shape[0], d.shape[1] + 1, dtype=d.dtype, device=d.device)
    return bins.scatter_add(1, labels, torch.relu(d))[:, 1:]


def entropy_from_masses(masses: Tensor) -> Tensor:
    """Entropy ``-sum_r p_r log p_r`` of the shares ``p_r = m_r / sum m`` per row of ``masses`` (M, R).

    Zero bins contribute 0 (and a zero gradient); a row with zero total mass has entropy 0.

    Example:
        >>> entropy_from_masses(torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
        tensor([0.6931, 0.0000, 0.0000])
    """
    total = masses.sum(dim=-1, keepdim=True)
    p = masses / torch.where(total > 0, total, torch.ones_like(total))
    safe = torch.where(p > 0, p, torch.ones_like(p))
    return 0.0 - (p * safe.log()).sum(dim=-1)  # 0.0 - x: +0.0 (not -0.0) for a single region


@functools.lru_cache(maxsize=8)
def _scipy_structure(nd: int, connectivity: str) -> np.ndarray:
    """Structure for labelling M stacked maps in one scipy call: the map axis gets no links."""
    from scipy import ndimage

    inner = ndimage.generate_binary_structure(nd, nd if connectivity == "full" else 1)
    st = np.zeros((3,) * (nd + 1), dtype=bool)
    st[1] = inner
    st.setflags(write=False)
    return st


def _entropy_torch(d: Tensor, grid: tuple[int, ...], connectivity: str, check_every: int | None) -> Tensor:
    """Entropy per row of ``d = z - mean`` (M, N) with :func:`label_components` (any device)."""
    with torch.no_grad():
        labels = label_components((d > 0).reshape(-1, *grid), connectivity, check_every).reshape(d.shape)
    return entropy_from_masses(_dense_masses(d, labels))


@functools.lru_cache(maxsize=1)
def _have_cc3d() -> bool:
    try:
        import cc3d  # noqa: F401
    except ImportError:
        return False
    return True


def _label_stack(fg: np.ndarray, connectivity: str, labeller: str) -> tuple[np.ndarray, int]:
    """Label M binary maps ``fg`` (M, *grid) in ONE call; return (labels (M * N,) int64, K).

    Labels are 0 on the background and 1..K over the whole batch (a region never spans two maps).
    ``labeller``: ``"cc3d"`` (maps side by side along the last grid axis, one zero column / plane
    between neighbours) or ``"scipy"`` (maps along a new axis, a structure without links along it).
    """
    m, grid = fg.shape[0], fg.shape[1:]
    nd = len(grid)
    if labeller == "cc3d" and min(grid[:-1]) < 2:
        labeller = "scipy"  # cc3d 4.1 mislabels arrays with a singleton axis; such grids are tiny anyway
    if labeller == "scipy":
        from scipy import ndimage

        out = np.empty(fg.shape, dtype=np.int64)
        k = int(ndimage.label(fg, _scipy_structure(nd, connectivity), output=out))
        return out.reshape(-1), k
    import cc3d

    w = grid[-1]
    side = np.zeros((*grid[:-1], m, w + 1), dtype=bool)  # (..., map, last axis + separator)
    side[..., :w] = np.moveaxis(fg, 0, -2)
    conn = {(2, "full"): 8, (2, "face"): 4, (3, "full"): 26, (3, "face"): 6}[(nd, connectivity)]
    lab, k = cc3d.connected_components(side.reshape(*grid[:-1], m * (w + 1)), connectivity=conn, return_N=True)
    out = np.empty((m, *grid), dtype=np.int64)
    out[...] = np.moveaxis(lab.reshape(*grid[:-1], m, w + 1)[..., :w], -2, 0)  # (astype on this view is slow)
    return out.reshape(-1), int(k)


@functools.lru_cache(maxsize=8)
def _owner(m: int, n: int) -> Tensor:
    """(M * N,) int64: the map of every token of M maps of N tokens (cached: the shapes repeat every step)."""
    return torch.arange(m).repeat_interleave(n)


class _CPUEntropy(torch.autograd.Function):
    """Per-map spatial entropy of CPU logits (M, N) with ONE labelling call for all maps.

    The M maps are labelled together (:func:`_label_stack`: cc3d or scipy) so that regions never
    cross maps. Masses and shares are computed on the K regions only. The backward pass is the closed form (research/sar.md 1.5): a token of region r
    of map i gets ``g_r = dL/dH_i * -(log p_r + H_i) / M_i``, background tokens 0, and every token
    of the map then loses the map's mean of those terms (the gradient through the mean threshold).
    """

    @staticmethod
    def forward(ctx, z: Tensor, grid: tuple[int, ...], connectivity: str, labeller: str) -> Tensor:  # type: ignore[override]
        m, n = z.shape
        mu = z.mean(dim=-1, keepdim=True)
        d = z - mu
        gid_np, k = _label_stack((d > 0).reshape(m, *grid).numpy(), connectivity, labeller)
        gid = torch.from_numpy(gid_np)  # 0 = background, regions 1..k over the whole batch
        tiny = torch.finfo(z.dtype).tiny
        # (scatter_add_ is about twice as fast as index_add_ on CPU; d is not needed after this)
        masses = torch.zeros(k + 1, dtype=z.dtype).scatter_add_(0, gid, d.clamp_min_(0.0).reshape(-1))[1:]
        region_map = torch.zeros(k + 1, dtype=torch.long).scatter_(0, gid, _owner(m, n))[1:]  # map of every region
        total = torch.zeros(m, dtype=z.dtype).index_add_(0, region_map, masses).clamp_min(tiny)
        p = masses / total.index_select(0, region_map)
        log_p = p.clamp_min(tiny).log()
        h = torch.zeros(m, dtype=z.dtype).index_add_(0, region_map, p * log_p).neg_()
        ctx.save_for_backward(gid, region_map, log_p, h, total)
        ctx.shape = (m, n)
        return h + 0.0 * mu.squeeze(-1)  # NaN for a map with a non-finite logit (its mean is not finite)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        gid, region_map, log_p, h, total = ctx.saved_tensors
        m, n = ctx.shape
        g_map = grad_h / total  # (M,)
        g_region = -(log_p + h.index_select(0, region_map)) * g_map.index_select(0, region_map)
        g_tok = torch.cat([g_region.new_zeros(1), g_region]).index_select(0, gid).reshape(m, n)
        return g_tok - g_tok.mean(dim=-1, keepdim=True), None, None, None


def spatial_entropy(
    z: Tensor,
    grid: Sequence[int],
    connectivity: str = "full",
    backend: str = "auto",
    check_every: int | None = None,
) -> Tensor:
    """Spatial entropy of each map: ``z`` (..., N) float logits on ``grid`` -> (...) float32.

    The leading axes are flattened into maps and restored. Runs in float32 (float64 stays
    float64) with autocast off.

    Args:
        z: logits, last axis = the N = prod(grid) tokens in row-major grid order.
        grid: 2 or 3 ints.
        connectivity: ``"full"`` (8 / 26) or ``"face"`` (4 / 6).
        backend: how the components are found, all exact and batched (no loop over maps):
            ``"torch"``: :func:`label_components` (propagation + hooking; CPU or GPU, no host
            sync per map, one per convergence check); ``"cc3d"`` / ``"scipy"``: one labelling call
            on all maps (CPU tensors only; cc3d is the fastest on CPU); ``"auto"``: cc3d on CPU
            (scipy without the cc3d package), torch elsewhere. All give the same entropies (up to
            float rounding of sums).
        check_every: convergence-check interval of the torch backend.

    Example:
        >>> z = torch.zeros(2, 3, 64)                  # (B, H, N) logits on an 8x8 grid
        >>> z[..., 0] = 1.0                            # one hot token per map: a single region
        >>> spatial_entropy(z, (8, 8))
        tensor([[0., 0., 0.],
                [0., 0., 0.]])
    """
    grid = _check_grid(grid)
    n = math.prod(grid)
    if connectivity not in _CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {_CONNECTIVITIES}, got {connectivity!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if z.shape[-1] != n:
        raise DataError("attention logits", f"last axis {z.shape[-1]} does not match grid {grid} ({n} tokens)")
    if backend in ("cc3d", "scipy") and z.device.type != "cpu":
        raise ValueError(f"backend {backend!r} needs CPU tensors, got {z.device}; use 'torch' or 'auto'")
    lead = tuple(z.shape[:-1])
    with torch.autocast(device_type=z.device.type, enabled=False):
        flat = z.reshape(-1, n).to(torch.promote_types(z.dtype, torch.float32))
        if flat.shape[0] == 0:
            return flat.sum(dim=-1).reshape(lead)
        if backend == "auto" and z.device.type == "cpu":
            backend = "cc3d" if _have_cc3d() else "scipy"
        if backend in ("cc3d", "scipy"):
            h = _CPUEntropy.apply(flat, grid, connectivity, backend)
        else:
            d = flat - flat.mean(dim=-1, keepdim=True)
            h = _entropy_torch(d, grid, connectivity, check_every)
            h = h + 0.0 * d.sum(dim=-1)  # NaN for a map with a non-finite logit (its mass may sit in bin 0)
    return h.reshape(lead)


def _parse_assigned(head_to_structure: Mapping | Sequence | None) -> frozenset[int]:
    if head_to_structure is None:
        return frozenset()
    if isinstance(head_to_structure, Mapping):
        return frozenset(int(h) for h, s in head_to_structure.items() if s is not None)
    return frozenset(h for h, s in enumerate(head_to_structure) if s is not None)


class SpatialEntropyLoss(nn.Module):
    """SAR loss: mean spatial entropy of the selected heads' CLS->patch logit maps.

    Args:
        heads: ``"all"``, ``"free"`` (heads without a structure in ``head_to_structure``; all heads
            when it is empty or None) or a sequence of head indices.
        head_to_structure: the SPAN assignment, ``{head: structure}`` or a sequence indexed by
            head with None for free heads (as :class:`medspan.losses.span.SpanPriorLoss`).
            Only used by ``heads="free"``.
        connectivity: ``"full"`` (8 in 2D / 26 in 3D, SAR's choice) or ``"face"`` (4 / 6).
        backend: labelling backend of :func:`spatial_entropy` (``"auto"``: cc3d in one call on
            CPU, :func:`label_components` on GPU).
        check_every: convergence test interval of :func:`label_components`.

    ``forward(cls_logits (B, H, N), grid) -> scalar`` where ``cls_logits`` holds ALL heads of the
    block (head index = position, as ``ViTOutput.cls_logits`` with default heads), raw logits
    ``q_cls . k / sqrt(d)``, any float dtype (computed in float32). ``grid`` has 2 or 3 ints with
    ``prod(grid) == N``. With no head selected the loss is 0, still attached to the graph.
    Raises :class:`~medspan.errors.DataError` on mismatching shapes or head indices.

    Example:
        >>> loss_fn = SpatialEntropyLoss("free", head_to_structure={0: 0, 1: 1, 2: 2})
        >>> loss_fn.selected_heads(6)
        [3, 4, 5]
        >>> float(loss_fn(torch.randn(4, 6, 196), (14, 14))) >= 0
        True
    """

    def __init__(
        self,
        heads: str | Sequence[int] = "all",
        head_to_structure: Mapping | Sequence | None = None,
        connectivity: str = "full",
        backend: str = "auto",
        check_every: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(heads, str):
            if heads not in ("all", "free"):
                raise ValueError(f"heads must be 'all', 'free' or a list of head indices, got {heads!r}")
            self.heads: str | tuple[int, ...] = heads
        else:
            idx = tuple(int(h) for h in heads)
            if any(h < 0 for h in idx) or len(set(idx)) != len(idx):
                raise ValueError(f"head indices must be distinct and >= 0, got {list(heads)}")
            self.heads = idx
        if connectivity not in _CONNECTIVITIES:
            raise ValueError(f"connectivity must be one of {_CONNECTIVITIES}, got {connectivity!r}")
        self.assigned = _parse_assigned(head_to_structure)
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.connectivity = connectivity
        self.backend = backend
        self.check_every = check_every

    def extra_repr(self) -> str:
        heads = self.heads if isinstance(self.heads, str) else list(self.heads)
        return (f"heads={heads!r}, assigned={sorted(self.assigned)}, connectivity={self.connectivity!r}, "
                f"backend={self.backend!r}")

    def selected_heads(self, num_heads: int) -> list[int]:
        """Indices of the regularized heads among ``num_heads``, ascending for ``"all"``/``"free"``."""
        if self.heads == "all":
            return list(range(num_heads))
        if self.heads == "free":
            return [h for h in range(num_heads) if h not in self.assigned]
        bad = [h for h in self.heads if h >= num_heads]
        if bad:
            raise DataError("cls_logits", f"has {num_heads} heads but heads {bad} are selected for SAR")
        return list(self.heads)

    def per_map(self, cls_logits: Tensor, grid: Sequence[int]) -> Tensor:
        """(B, H_sel) spatial entropy of each selected map (order of :meth:`selected_heads`)."""
        grid = _check_grid(grid)
        n = math.prod(grid)
        if cls_logits.ndim != 3 or cls_logits.shape[2] != n:
            raise DataError(
                "cls_logits", f"expected (B, H, {n}) for grid {grid}, got {tuple(cls_logits.shape)}"
            )
        heads = self.selected_heads(cls_logits.shape[1])
        z = cls_logits if heads == list(range(cls_logits.shape[1])) else cls_logits[:, heads]
        return spatial_entropy(z, grid, self.connectivity, self.backend, self.check_every)

    def forward(self, cls_logits: Tensor, grid: Sequence[int]) -> Tensor:
        h = self.per_map(cls_logits, grid)
        if h.numel() == 0:
            return cls_logits.float().sum() * 0.0
        return h.mean()


def sar_schedule(
    base: float, epochs: int, niter_per_ep: int, warmup_epochs: int = 0, final: float = 0.0
) -> np.ndarray:
    """Per-iteration SAR weight as in the SAR code: linear warm-up from 0, then cosine decay.

    The first ``min(warmup_epochs, epochs) * niter_per_ep`` values rise linearly from 0 to ``base``;
    the rest decay from ``base`` toward ``final`` (default 0, SAR's choice) along a half cosine
    (:func:`medspan.ssl.schedules.cosine_schedule`). ``base = 0`` gives all zeros (SAR off).

    Returns:
        float64 array of length ``epochs * niter_per_ep``.

    Example:
        >>> w = sar_schedule(0.1, epochs=10, niter_per_ep=5, warmup_epochs=2)
        >>> float(w[0]), float(w[9]), round(float(w[-1]), 5)
        (0.0, 0.1, 0.00015)
    """
    return cosine_schedule(float(base), float(final), int(epochs), int(niter_per_ep),
                           warmup_epochs=min(int(warmup_epochs), int(epochs)))
