"""Tests of the SPAN attention-prior loss (medspan.losses.span)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from medspan.errors import DataError
from medspan.losses.span import (
    SpanPriorLoss,
    gaussian_blur,
    pool_to_grid,
    prior_to_patch_distribution,
)
from medspan.models.vit import VisionTransformer

# A 4x4 prior on a 2x2 patch grid (2x2 pixels per patch). Patch means: [1, 0.5, 0, 0.25].
PRIOR = torch.tensor(
    [
        [1.0, 1.0, 1.0, 1.0],
        [1.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ],
    dtype=torch.float64,
)
POOLED = [1.0, 0.5, 0.0, 0.25]
ATTN = [0.4, 0.1, 0.2, 0.3]


def _kl(p: list[float], a: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(ai)) for pi, ai in zip(p, a) if pi > 0)


def _normalise(q: list[float], eps: float) -> list[float]:
    z = sum(x + eps for x in q)
    return [(x + eps) / z for x in q]


def test_kl_hand_value_no_blur():
    prior = PRIOR.reshape(1, 1, 4, 4)
    attn = torch.tensor([[ATTN]], dtype=torch.float64)  # (B=1, H=1, N=4)
    # eps = 0: p = [4/7, 2/7, 0, 1/7]
    expected = 4 / 7 * math.log((4 / 7) / 0.4) + 2 / 7 * math.log((2 / 7) / 0.1) + 1 / 7 * math.log((1 / 7) / 0.3)
    loss = SpanPriorLoss({0: 0}, sigma=0.0, eps=0.0)(attn, prior, (2, 2))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # default eps = 1e-6 enters every cell before normalising
    p = _normalise(POOLED, 1e-6)
    loss = SpanPriorLoss({0: 0}, sigma=0.0)(attn, prior, (2, 2))
    assert loss.item() == pytest.approx(_kl(p, ATTN), rel=1e-12)
    # attention equal to the prior distribution -> 0
    same = prior_to_patch_distribution(prior, (2, 2), sigma=0.0)
    assert SpanPriorLoss([0], sigma=0.0)(same, prior, (2, 2)).item() == pytest.approx(0.0, abs=1e-12)


def test_prior_distribution_values():
    dist = prior_to_patch_distribution(PRIOR.reshape(1, 1, 4, 4), (2, 2), sigma=0.0, eps=0.0)
    torch.testing.assert_close(dist, torch.tensor([[[4 / 7, 2 / 7, 0.0, 1 / 7]]], dtype=torch.float64))
    dist = prior_to_patch_distribution(PRIOR.reshape(1, 1, 4, 4), (2, 2), sigma=0.0)
    torch.testing.assert_close(dist[0, 0], torch.tensor(_normalise(POOLED, 1e-6), dtype=torch.float64))
    blurred = prior_to_patch_distribution(torch.rand(3, 2, 16, 12), (4, 3), sigma=1.5)
    assert blurred.shape == (3, 2, 12)
    torch.testing.assert_close(blurred.sum(-1), torch.ones(3, 2))


def test_inside_mass_hand_value():
    prior = PRIOR.reshape(1, 1, 4, 4)
    attn = torch.tensor([[ATTN]], dtype=torch.float64)
    # threshold 0.5 * max(pooled) = 0.5; region = cells with pooled > 0.5 = {0}; mass 0.4
    loss = SpanPriorLoss({0: 0}, sigma=0.0, mode="inside")(attn, prior, (2, 2))
    assert loss.item() == pytest.approx(-math.log(0.4), rel=1e-12)
    # threshold 0.2 * 1 -> region {0, 1, 3}; mass 0.8
    loss = SpanPriorLoss({0: 0}, sigma=0.0, mode="inside", inside_threshold=0.2)(attn, prior, (2, 2))
    assert loss.item() == pytest.approx(-math.log(0.8), rel=1e-12)
    # relative to the map's max: the same region for a prior scaled by 0.3
    loss = SpanPriorLoss({0: 0}, sigma=0.0, mode="inside")(attn, 0.3 * prior, (2, 2))
    assert loss.item() == pytest.approx(-math.log(0.4), rel=1e-12)


def test_multiple_heads_free_heads_and_absent_structure():
    # 3 heads: head 0 -> structure 0, head 1 free, head 2 -> structure 1; B = 2
    prior = torch.zeros(2, 2, 4, 4, dtype=torch.float64)
    prior[0, 0] = PRIOR
    prior[1, 0] = PRIOR
    prior[0, 1, :2, :2] = 1.0  # structure 1 only in patch 0 of item 0; absent (all zero) in item 1
    a = [[0.4, 0.1, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]
    b = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.3, 0.3]]
    attn = torch.tensor([a, b], dtype=torch.float64, requires_grad=True)
    loss_fn = SpanPriorLoss([0, None, 1], sigma=0.0, eps=0.0)
    assert loss_fn.regularized_heads == (0, 2) and loss_fn.structures == (0, 1)
    p0 = [4 / 7, 2 / 7, 0.0, 1 / 7]
    p1 = [1.0, 0.0, 0.0, 0.0]
    terms = [_kl(p0, a[0]), _kl(p1, a[2]), _kl(p0, b[0])]  # (item 1, head 2) skipped
    loss = loss_fn(attn, prior, (2, 2))
    assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-12)
    per = loss_fn.per_head(attn, prior, (2, 2))
    assert per.shape == (2, 2)
    torch.testing.assert_close(per[0], torch.tensor(terms[:2], dtype=torch.float64))
    assert per[1, 0].item() == pytest.approx(terms[2], rel=1e-12) and math.isnan(per[1, 1].item())
    loss.backward()
    g = attn.grad
    assert torch.equal(g[:, 1], torch.zeros(2, 4, dtype=torch.float64))  # free head
    assert torch.equal(g[1, 2], torch.zeros(4, dtype=torch.float64))  # absent structure
    # d KL(p || a) / d a_j = -p_j / a_j, over the 3 present (item, head) pairs
    for (i, h), p, att in (((0, 0), p0, a[0]), ((0, 2), p1, a[2]), ((1, 0), p0, b[0])):
        expected = torch.tensor([-pj / aj / 3 for pj, aj in zip(p, att)], dtype=torch.float64)
        torch.testing.assert_close(g[i, h], expected, rtol=1e-12, atol=1e-15)
    # every structure absent: 0, no NaN, in both modes (also with eps = 0)
    for mode in ("kl", "inside"):
        for eps in (0.0, 1e-6):
            empty = SpanPriorLoss([0, None, 1], sigma=1.0, eps=eps, mode=mode)(
                attn, torch.zeros_like(prior), (2, 2)
            )
            assert empty.item() == 0.0


def test_blur_preserves_mass_and_matches_scipy():
    delta = torch.zeros(1, 1, 21, 21, dtype=torch.float64)
    delta[0, 0, 10, 10] = 1.0
    blurred = gaussian_blur(delta, 2.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert blurred[0, 0, 10, 10] == blurred.max() and blurred[0, 0, 10, 8] == blurred[0, 0, 8, 10]
    rng = np.random.default_rng(0)
    img = rng.random((13, 9))
    ours = gaussian_blur(torch.from_numpy(img)[None, None], 1.5)[0, 0].numpy()
    np.testing.assert_allclose(ours, gaussian_filter(img, 1.5, mode="nearest", truncate=4.0), atol=1e-12)
    vol = rng.random((7, 6, 5))
    ours = gaussian_blur(torch.from_numpy(vol)[None, None], 1.0)[0, 0].numpy()
    np.testing.assert_allclose(ours, gaussian_filter(vol, 1.0, mode="nearest", truncate=4.0), atol=1e-12)
    const = torch.full((1, 2, 5, 5), 0.7)
    torch.testing.assert_close(gaussian_blur(const, 3.0), const)  # constant maps stay constant
    assert gaussian_blur(delta, 0.0) is delta


@pytest.mark.parametrize("shape,grid,patch,index", [
    ((8, 8), (2, 2), (slice(0, 4), slice(4, 8)), 1),  # top-right of 2x2 -> grid[1] - 1
    ((8, 16), (2, 4), (slice(0, 4), slice(12, 16)), 3),  # top-right of 2x4 -> grid[1] - 1
    ((8, 16), (2, 4), (slice(4, 8), slice(4, 8)), 5),  # (1, 1) -> 1 * 4 + 1
])
def test_pooling_token_order(shape, grid, patch, index):
    prior = torch.zeros(1, 1, *shape)
    prior[(0, 0) + patch] = 1.0
    dist = prior_to_patch_distribution(prior, grid, sigma=0.0, eps=0.0)
    expected = torch.zeros(1, 1, grid[0] * grid[1])
    expected[0, 0, index] = 1.0
    assert torch.equal(dist, expected)
    assert pool_to_grid(prior, grid).argmax().item() == index


def test_pooling_matches_vit_token_order():
    # a patch that lights up image patch (i, j) lights up ViT token i * grid[1] + j too
    vit = VisionTransformer(img_size=(8, 16), patch_size=4, embed_dim=12, depth=1, num_heads=2)
    x = torch.zeros(1, 1, 8, 16)
    x[0, 0, 4:8, 8:12] = 1.0
    tok, grid = vit.patch_embed(x)
    changed = ((tok[0] - vit.patch_embed.proj.bias).abs().sum(-1) > 0).nonzero().flatten().tolist()
    dist = prior_to_patch_distribution(x, grid, sigma=0.0, eps=0.0)
    assert changed == dist[0, 0].nonzero().flatten().tolist() == [1 * 4 + 2]


def test_shape_errors():
    loss_fn = SpanPriorLoss({0: 0, 1: 1, 2: 2}, sigma=0.0)
    attn = torch.full((1, 6, 4), 0.25)
    with pytest.raises(DataError, match="prior has 2 channels but head 2 is assigned structure 2"):
        loss_fn(attn, torch.ones(1, 2, 4, 4), (2, 2))
    with pytest.raises(DataError, match=r"expected shape \(B, S, \*spatial\) with 2 spatial dims"):
        loss_fn(attn, torch.ones(1, 3, 4), (2, 2))
    with pytest.raises(DataError, match=r"expected \(B, H, 4\)"):
        loss_fn(torch.full((1, 6, 9), 1 / 9), torch.ones(1, 3, 4, 4), (2, 2))
    with pytest.raises(DataError, match="batch size 2 differs"):
        loss_fn(attn, torch.ones(2, 3, 4, 4), (2, 2))
    with pytest.raises(DataError, match="cls_attn has 2 heads but head 2 is regularized"):
        loss_fn(torch.full((1, 2, 4), 0.25), torch.ones(1, 3, 4, 4), (2, 2))
    with pytest.raises(DataError, match="priors: expected shape"):
        prior_to_patch_distribution(torch.ones(1, 1, 4, 4, 4), (2, 2))
    with pytest.raises(ValueError, match="mode"):
        SpanPriorLoss([0], mode="mse")


def test_gradient_flows_from_vit():
    """Through a real ViT: the loss is KL(p || a_1) of head 1 only, its gradient on the attention is
    -p / (B a) on head 1 and 0 on the free head, and a small step of the last block along the
    gradient lowers the loss and moves head 1's attention mass into the prior's region."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=12, depth=2, num_heads=2).double()
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    prior = torch.zeros(2, 1, 16, 16, dtype=torch.float64)
    prior[:, 0, 4:12, 2:8] = 1.0
    loss_fn = SpanPriorLoss({1: 0}, sigma=1.0)
    out = vit.forward_features(x, return_attention=True)
    attn = out.cls_attn  # (2, 2, 16)
    loss = loss_fn(attn, prior, out.grid)

    p = prior_to_patch_distribution(prior, out.grid, sigma=1.0)[:, 0]  # (2, 16)
    a = attn[:, 1].detach()
    expected = (p * (p.log() - a.log())).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    (g_attn,) = torch.autograd.grad(loss, attn, retain_graph=True)
    torch.testing.assert_close(g_attn[:, 1], -p / (2 * a), rtol=1e-10, atol=1e-12)
    assert torch.equal(g_attn[:, 0], torch.zeros_like(g_attn[:, 0]))  # the free head gets nothing

    qkv = vit.blocks[-1].attn.qkv.weight
    (g,) = torch.autograd.grad(loss, qkv)
    region = p > p.mean(-1, keepdim=True)  # the cells the prior covers most
    mass_before = (a * region).sum(-1)
    with torch.no_grad():
        qkv -= 1e-2 * g / g.norm()
        after = vit.forward_features(x, return_attention=True)
    assert loss_fn(after.cls_attn, prior, after.grid).item() < loss.item() - 1e-4
    assert torch.all((after.cls_attn[:, 1] * region).sum(-1) > mass_before)


@pytest.mark.parametrize("mode", ["kl", "inside"])
def test_gradcheck_wrt_attention_logits(mode):
    torch.manual_seed(0)
    prior = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    prior[1, 1] = 0.0  # an absent structure
    loss_fn = SpanPriorLoss([1, None, 0], sigma=1.0, mode=mode)
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)

    def f(z):
        return loss_fn(z.softmax(-1), prior, (2, 2))

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "shape,grid,sigma",
    [((2, 3, 64, 64), (8, 8), 1.0), ((2, 3, 37, 53), (5, 7), 2.3), ((1, 2, 20, 24, 28), (4, 3, 7), 1.5),
     ((2, 3, 32, 32), (4, 4), 0.0)],
)
def test_blur_pool_matrix_form_equals_blur_then_pool(shape, grid, sigma) -> None:
    from medspan.losses.span import blur_pool_to_grid, gaussian_blur, pool_to_grid

    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = pool_to_grid(gaussian_blur(x, sigma), grid)
    torch.testing.assert_close(blur_pool_to_grid(x, grid, sigma), expected, rtol=0, atol=1e-12)
