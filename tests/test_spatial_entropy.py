"""SAR spatial-entropy loss: exact labelling, known entropies, gradients, head selection, schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from medspan.errors import DataError
from medspan.losses.spatial_entropy import (
    SpatialEntropyLoss,
    _label_stack,
    entropy_from_masses,
    label_components,
    region_masses,
    sar_schedule,
    spatial_entropy,
)

LOG2 = math.log(2.0)
BACKENDS = ("torch", "cc3d", "scipy")


# ---------------------------------------------------------------------------------------------- shapes
def _serpentine(k: int) -> np.ndarray:
    m = np.zeros((k, k), bool)
    m[::2] = True
    for r in range(1, k, 2):
        m[r, k - 1 if (r // 2) % 2 == 0 else 0] = True
    return m


def _spiral(k: int) -> np.ndarray:
    m = np.zeros((k, k), bool)
    x0, y0, x1, y1 = 0, 0, k - 1, k - 1
    while x0 <= x1 and y0 <= y1:
        m[y0, x0:x1 + 1] = True
        m[y0:y1 + 1, x1] = True
        m[y1, x0:x1 + 1] = True
        if y0 + 2 <= y1:
            m[y0 + 2:y1 + 1, x0] = True
        x0, y0, x1, y1 = x0 + 2, y0 + 2, x1 - 2, y1 - 2
    return m


def _maze(k: int, rng: np.random.Generator) -> np.ndarray:
    """A perfect maze (random spanning tree of the even cells): long winding 1-token corridors."""
    m = np.zeros((k, k), bool)
    start = (0, 0)
    m[start] = True
    stack, seen = [start], {start}
    while stack:
        i, j = stack[-1]
        nxt = [(i + a, j + b) for a, b in ((2, 0), (-2, 0), (0, 2), (0, -2))
               if 0 <= i + a < k and 0 <= j + b < k and (i + a, j + b) not in seen]
        if not nxt:
            stack.pop()
            continue
        n = nxt[rng.integers(len(nxt))]
        m[n] = True
        m[(i + n[0]) // 2, (j + n[1]) // 2] = True
        seen.add(n)
        stack.append(n)
    return m


def _orientations(m: np.ndarray) -> list[np.ndarray]:
    out = []
    for r in range(4):
        rot = np.rot90(m, r)
        out += [np.ascontiguousarray(rot), np.ascontiguousarray(rot[::-1])]
    return out


def _structure(nd: int, connectivity: str) -> np.ndarray:
    return ndimage.generate_binary_structure(nd, nd if connectivity == "full" else 1)


def _assert_same_partition(ours: np.ndarray, ref: np.ndarray, where: str) -> None:
    """Same foreground, and a bijection between our labels and scipy's on it."""
    fg = ref > 0
    assert np.array_equal(ours > 0, fg), f"{where}: foreground differs"
    a, b = ours[fg].tolist(), ref[fg].tolist()
    pairs = set(zip(a, b))
    assert len(pairs) == len(set(a)) == len(set(b)), f"{where}: partitions differ"


def _check_batch(masks: np.ndarray, connectivity: str, where: str) -> int:
    """Label the batch at once; compare every map with scipy on that map alone. Returns #maps."""
    labels = label_components(torch.from_numpy(masks), connectivity).numpy()
    st = _structure(masks.ndim - 1, connectivity)
    for i, m in enumerate(masks):
        ref, n = ndimage.label(m, st)
        _assert_same_partition(labels[i], ref, f"{where}[{i}] {connectivity}")
        # canonical label: 1 + the largest row-major index of the component
        flat_idx = np.arange(m.size).reshape(m.shape)
        top = np.asarray(ndimage.maximum(flat_idx, ref, index=np.arange(1, n + 1)), dtype=np.int64).reshape(-1)
        expected = np.where(ref > 0, 1 + np.concatenate([[0], top])[ref], 0)
        assert np.array_equal(labels[i], expected), f"{where}[{i}] {connectivity}: labels not canonical"
    return len(masks)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one torch thread avoids OpenMP stalls on a loaded shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- labelling
@pytest.mark.parametrize("connectivity", ["full", "face"])
def test_labels_equal_scipy_on_random_2d_maps(connectivity: str) -> None:
    rng = np.random.default_rng(0)
    n = 0
    for grid, count in (((14, 14), 120), ((7, 11), 60), ((1, 9), 20), ((16, 5), 40)):
        density = rng.random((count, 1, 1))
        noise = rng.random((count, *grid)) < density
        smooth = ndimage.gaussian_filter(rng.standard_normal((count, *grid)), (0, 1.2, 1.2)) > 0
        n += _check_batch(noise, connectivity, f"noise{grid}")
        n += _check_batch(smooth, connectivity, f"smooth{grid}")
    assert n == 2 * (120 + 60 + 20 + 40)


@pytest.mark.parametrize("connectivity", ["full", "face"])
def test_labels_equal_scipy_on_random_3d_maps(connectivity: str) -> None:
    rng = np.random.default_rng(1)
    n = 0
    for grid, count in (((8, 8, 8), 80), ((3, 5, 4), 60), ((1, 1, 6), 20)):
        density = rng.random((count, 1, 1, 1))
        noise = rng.random((count, *grid)) < density
        smooth = ndimage.gaussian_filter(rng.standard_normal((count, *grid)), (0, 1, 1, 1)) > 0
        n += _check_batch(noise, connectivity, f"noise{grid}")
        n += _check_batch(smooth, connectivity, f"smooth{grid}")
    assert n == 2 * (80 + 60 + 20)


@pytest.mark.parametrize("connectivity", ["full", "face"])
def test_labels_on_serpentines_spirals_and_mazes(connectivity: str) -> None:
    """Worst cases for propagation (one long winding path) are exact and converge in few iterations."""
    rng = np.random.default_rng(2)
    shapes = _orientations(_serpentine(14)) + _orientations(_spiral(14)) + _orientations(_spiral(13))
    shapes += [o for _ in range(8) for o in _orientations(_maze(15, rng))[:2]]
    masks = np.stack([np.pad(s, ((0, 15 - s.shape[0]), (0, 15 - s.shape[1]))) for s in shapes])
    assert _check_batch(masks, connectivity, "winding") == 40
    # a 14x14 serpentine path is ~100 tokens long; hooking + pointer jumping needs a handful of iterations
    _, iters = label_components(torch.from_numpy(masks), connectivity, return_iterations=True)
    assert iters <= 12
    # 3D: a serpentine in every z-slice, slices joined at alternating corners
    vol = np.zeros((6, 14, 14), bool)
    vol[::2] = _serpentine(14)
    vol[1::4, 0, 0] = True
    vol[3::4, -1, 0] = True
    assert _check_batch(vol[None], connectivity, "3d serpentine") == 1


@pytest.mark.parametrize("labeller", ["cc3d", "scipy"])
@pytest.mark.parametrize("connectivity", ["full", "face"])
def test_one_call_labelling_of_the_stack_equals_scipy_per_map(labeller: str, connectivity: str) -> None:
    """The CPU backends label all maps in one call; each map's partition equals scipy on it alone."""
    rng = np.random.default_rng(3)
    for grid, count in (((14, 14), 150), ((7, 11), 50), ((1, 9), 20), ((8, 8, 8), 60), ((3, 5, 4), 40), ((2, 2, 3), 30)):
        density = rng.random((count,) + (1,) * len(grid))
        masks = np.concatenate([
            rng.random((count, *grid)) < density,
            ndimage.gaussian_filter(rng.standard_normal((count, *grid)), (0,) + (1.0,) * len(grid)) > 0,
        ])
        masks[0] = True  # full maps next to each other must stay apart
        masks[1] = True
        labels, k = _label_stack(masks, connectivity, labeller)
        labels = labels.reshape(masks.shape)
        st = _structure(len(grid), connectivity)
        total = 0
        for i, m in enumerate(masks):
            ref, n = ndimage.label(m, st)
            _assert_same_partition(labels[i], ref, f"{labeller}{grid}[{i}] {connectivity}")
            total += n
        assert k == total and sorted(np.unique(labels[labels > 0]).tolist()) == list(range(1, k + 1))


def test_labels_do_not_cross_maps_and_handle_edge_cases() -> None:
    m = torch.zeros(3, 4, 4, dtype=torch.bool)
    m[0, 3, 3] = True  # last token of map 0 ...
    m[1, 0, 0] = True  # ... and first token of map 1: adjacent in memory, not in space
    out = label_components(m)
    assert out[0, 3, 3] == 16 and out[1, 0, 0] == 1 and int(out[2].abs().sum()) == 0
    full = label_components(torch.ones(2, 3, 3, 3, dtype=torch.bool))
    assert torch.equal(full, torch.full((2, 3, 3, 3), 27))
    assert label_components(torch.zeros(0, 5, 5, dtype=torch.bool)).shape == (0, 5, 5)
    with pytest.raises(ValueError, match="connectivity"):
        label_components(m, connectivity="diagonal")
    with pytest.raises(ValueError, match="grid axes"):
        label_components(torch.zeros(4, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- entropy values
def _map(grid: tuple[int, ...], *blobs: tuple[tuple[slice, ...], float], base: float = -1.0) -> torch.Tensor:
    z = torch.full(grid, base, dtype=torch.float64)
    for region, value in blobs:
        z[region] = value
    return z.reshape(1, 1, -1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_blob_has_entropy_zero(backend: str) -> None:
    z2 = _map((14, 14), ((slice(3, 9), slice(4, 10)), 2.0))
    z2[0, 0, 5 * 14 + 6] = 3.5  # a non-flat blob is still one region
    z3 = _map((8, 8, 8), ((slice(2, 5), slice(1, 6), slice(3, 7)), 1.0))
    for z, grid in ((z2, (14, 14)), (z3, (8, 8, 8))):
        for conn in ("full", "face"):
            h = spatial_entropy(z, grid, conn, backend)
            assert h.shape == (1, 1) and float(h) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_equal_blobs_have_entropy_log2(backend: str) -> None:
    z2 = _map((14, 14), ((slice(1, 4), slice(1, 5)), 2.0), ((slice(9, 13), slice(8, 11)), 2.0))
    z3 = _map((8, 8, 8), ((slice(0, 2), slice(0, 2), slice(0, 2)), 1.0),
              ((slice(5, 7), slice(5, 7), slice(5, 7)), 1.0))
    for z, grid in ((z2, (14, 14)), (z3, (8, 8, 8))):
        h = spatial_entropy(z, grid, "full", backend)
        assert float(h) == pytest.approx(LOG2, abs=1e-12)
    # unequal masses 1:3 (same size, different height) -> the binary entropy of 1/4
    z = _map((14, 14), ((slice(1, 4), slice(1, 4)), 1.0), ((slice(8, 11), slice(8, 11)), 3.0))
    mu = float(z.mean())
    m1, m2 = 9 * (1.0 - mu), 9 * (3.0 - mu)
    p = m1 / (m1 + m2)
    expected = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert float(spatial_entropy(z, (14, 14), "full", backend)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gap_and_diagonal_contact_2d(backend: str) -> None:
    """Two equal blobs: split by a one-token gap -> two regions under 4- AND 8-connectivity;
    touching only at a corner -> two regions under 4-connectivity, ONE under 8-connectivity."""
    gap = _map((6, 7), ((slice(1, 5), slice(0, 3)), 1.0), ((slice(1, 5), slice(4, 7)), 1.0))  # column 3 empty
    diag = _map((6, 6), ((slice(0, 3), slice(0, 3)), 1.0), ((slice(3, 6), slice(3, 6)), 1.0))  # (2,2)-(3,3)
    assert float(spatial_entropy(gap, (6, 7), "face", backend)) == pytest.approx(LOG2, abs=1e-12)
    assert float(spatial_entropy(gap, (6, 7), "full", backend)) == pytest.approx(LOG2, abs=1e-12)
    assert float(spatial_entropy(diag, (6, 6), "face", backend)) == pytest.approx(LOG2, abs=1e-12)
    assert float(spatial_entropy(diag, (6, 6), "full", backend)) == 0.0
    # 3D: two cubes touching at one corner -> one region with 26-connectivity, two with 6
    corner = _map((4, 4, 4), ((slice(0, 2),) * 3, 1.0), ((slice(2, 4),) * 3, 1.0))
    assert float(spatial_entropy(corner, (4, 4, 4), "full", backend)) == 0.0
    assert float(spatial_entropy(corner, (4, 4, 4), "face", backend)) == pytest.approx(LOG2, abs=1e-12)


def test_entropy_edge_cases() -> None:
    assert torch.equal(entropy_from_masses(torch.tensor([[0.0, 0.0], [2.0, 0.0]])), torch.zeros(2))
    z = torch.zeros(2, 3, 25, requires_grad=True)  # constant maps: no foreground
    for backend in BACKENDS:
        h = spatial_entropy(z, (5, 5), backend=backend)
        assert torch.equal(h, torch.zeros(2, 3))
        (g,) = torch.autograd.grad(h.sum(), z)
        assert torch.equal(g, torch.zeros_like(z))
        bad = torch.randn(2, 3, 25)
        bad[1, 2, 7] = float("nan")
        out = spatial_entropy(bad, (5, 5), backend=backend)
        assert torch.isnan(out[1, 2]) and torch.isfinite(out[0]).all() and torch.isfinite(out[1, :2]).all()
    masses = region_masses(torch.tensor([[3.0, 1.0, 0.0, 0.0]]), torch.tensor([[4, 0, 0, 0]]))
    assert torch.equal(masses, torch.tensor([[0.0, 0.0, 0.0, 2.0]]))  # relu(3 - 1) in bin 4 - 1


def reference_entropy(z: np.ndarray, grid: tuple[int, ...]) -> float:
    """SAR by the book for one map (float64): mean threshold, scipy's full-connectivity components,
    masses relu(z - mean) per component, entropy of their shares."""
    zz = z.astype(np.float64).reshape(grid)
    a = np.clip(zz - zz.mean(), 0.0, None)
    labels, n = ndimage.label(a > 0, _structure(len(grid), "full"))
    masses = np.asarray(ndimage.sum(a, labels, index=np.arange(1, n + 1)), dtype=np.float64).reshape(-1)
    if masses.sum() <= 0:
        return 0.0
    q = masses[masses > 0] / masses.sum()
    return float(-(q * np.log(q)).sum())


@pytest.mark.parametrize("grid", [(14, 14), (8, 8, 8)])
def test_backends_agree_on_random_maps(grid: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(16, 6, math.prod(grid), generator=g)
    if len(grid) == 3:  # heavy right tail: few tokens above the mean, so several 26-connected regions
        z = torch.exp(2.5 * z)
    z.requires_grad_()
    grads = []
    values = []
    for backend in BACKENDS:
        h = spatial_entropy(z, grid, backend=backend)
        values.append(h.detach())
        grads.append(torch.autograd.grad(h.mean(), z)[0])
    assert torch.allclose(values[0], values[1], atol=1e-5, rtol=0)
    assert torch.allclose(grads[0], grads[1], atol=1e-7, rtol=1e-4)
    # and each map's value is the entropy of its region masses, labelled by scipy on that map alone
    ref = torch.tensor([reference_entropy(m, grid) for m in z.detach().reshape(-1, math.prod(grid)).numpy()])
    torch.testing.assert_close(values[0].reshape(-1), ref.float(), atol=1e-5, rtol=0)
    assert float((ref > 0).float().mean()) > 0.9 and float(ref.max()) > 1.0  # random maps: several regions


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid", [(5, 6), (4, 4, 4)])
def test_gradcheck_wrt_logits(backend: str, grid: tuple[int, ...]) -> None:
    """Finite differences of the per-map entropies w.r.t. the logits (float64: stays float64)."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 3, math.prod(grid), generator=g, dtype=torch.float64)
    if len(grid) == 3:  # heavy right tail: few tokens above the mean, so several 26-connected regions
        z = torch.exp(2.5 * z)
    z.requires_grad_()
    h = spatial_entropy(z.detach(), grid, backend=backend)
    assert h.dtype == torch.float64
    assert int((h > 0).sum()) >= 5  # several regions in most maps: a real gradient to check
    assert torch.autograd.gradcheck(lambda x: spatial_entropy(x, grid, backend=backend), (z,), eps=1e-6, atol=1e-6)


def test_gradient_matches_closed_form() -> None:
    """dH/dz_i = g_r(i) on the foreground minus the mean of those terms (through the threshold),
    with g_r = -(log p_r + H) / M  (research/sar.md 1.5)."""
    z = _map((6, 6), ((slice(0, 2), slice(0, 2)), 1.0), ((slice(4, 6), slice(3, 6)), 2.0)).requires_grad_()
    h = spatial_entropy(z, (6, 6))
    (grad,) = torch.autograd.grad(h.sum(), z)
    zf = z.detach().reshape(6, 6)
    a = (zf - zf.mean()).clamp_min(0)
    m1, m2 = float(a[:2, :2].sum()), float(a[4:, 3:].sum())
    total = m1 + m2
    hval = -sum(m / total * math.log(m / total) for m in (m1, m2))
    g1, g2 = -(math.log(m1 / total) + hval) / total, -(math.log(m2 / total) + hval) / total
    expected = torch.zeros(6, 6, dtype=torch.float64)
    expected[:2, :2], expected[4:, 3:] = g1, g2
    expected -= (4 * g1 + 6 * g2) / 36
    assert float(h.detach()) == pytest.approx(hval, abs=1e-12)
    assert torch.allclose(grad.reshape(6, 6), expected, atol=1e-12)


def test_float32_inside_autocast() -> None:
    z = torch.randn(4, 6, 64)
    ref = spatial_entropy(z, (8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = SpatialEntropyLoss().per_map(z.to(torch.bfloat16), (8, 8))
    assert out.dtype == torch.float32
    assert torch.allclose(out, spatial_entropy(z.to(torch.bfloat16).float(), (8, 8)))
    assert ref.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- the loss module
def test_head_selection() -> None:
    h2s = {0: 0, 1: 1, 2: 2}
    assert SpatialEntropyLoss("all", h2s).selected_heads(6) == [0, 1, 2, 3, 4, 5]
    assert SpatialEntropyLoss("free", h2s).selected_heads(6) == [3, 4, 5]
    assert SpatialEntropyLoss("free", [0, None, 1, None]).selected_heads(4) == [1, 3]
    assert SpatialEntropyLoss("free", {}).selected_heads(3) == [0, 1, 2]  # plain DINO: every head is free
    assert SpatialEntropyLoss([4, 1]).selected_heads(6) == [4, 1]

    z = torch.randn(3, 6, 49, requires_grad=True)
    per_head = spatial_entropy(z, (7, 7))
    assert torch.allclose(SpatialEntropyLoss("free", h2s)(z, (7, 7)), per_head[:, 3:].mean())
    assert torch.allclose(SpatialEntropyLoss([4, 1])(z, (7, 7)), per_head[:, [4, 1]].mean())
    assert torch.allclose(SpatialEntropyLoss()(z, (7, 7)), per_head.mean())
    none = SpatialEntropyLoss("free", {h: 0 for h in range(6)})(z, (7, 7))
    assert float(none.detach()) == 0.0 and none.requires_grad
    # only the selected heads receive gradient
    (g,) = torch.autograd.grad(SpatialEntropyLoss([4])(z, (7, 7)), z)
    assert float(g[:, [0, 1, 2, 3, 5]].abs().sum()) == 0.0 and float(g[:, 4].abs().sum()) > 0


def test_invalid_arguments_are_reported() -> None:
    with pytest.raises(ValueError, match="heads"):
        SpatialEntropyLoss("some")
    with pytest.raises(ValueError, match="distinct"):
        SpatialEntropyLoss([1, 1])
    with pytest.raises(ValueError, match="backend"):
        SpatialEntropyLoss(backend="cuda")
    with pytest.raises(DataError, match=r"has 6 heads but heads \[7\]"):
        SpatialEntropyLoss([1, 7])(torch.randn(2, 6, 16), (4, 4))
    with pytest.raises(DataError, match=r"expected \(B, H, 16\) for grid \(4, 4\)"):
        SpatialEntropyLoss()(torch.randn(2, 6, 15), (4, 4))
    with pytest.raises(ValueError, match="grid"):
        SpatialEntropyLoss()(torch.randn(2, 6, 16), (16,))


# ---------------------------------------------------------------------------------------------- schedule
def test_sar_schedule_warmup_then_cosine_to_zero() -> None:
    w = sar_schedule(0.1, epochs=10, niter_per_ep=4, warmup_epochs=2)
    assert w.shape == (40,)
    np.testing.assert_allclose(w[:8], np.linspace(0.0, 0.1, 8))  # linear warm-up from 0, 2 epochs
    assert w[8] == pytest.approx(0.1)  # then the cosine starts at the base value ...
    assert np.all(np.diff(w[8:]) < 0) and 0 < w[-1] < 1e-3  # ... and decays toward 0
    assert not sar_schedule(0.0, 5, 3, 2).any()  # off
    assert sar_schedule(0.5, 2, 3, warmup_epochs=5).tolist() == pytest.approx(np.linspace(0, 0.5, 6).tolist())
