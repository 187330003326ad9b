"""Tests of medspan.eval.collapse: encoder health figures on constructed toys with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from medspan.eval.collapse import (
    border_attention,
    border_share,
    effective_rank,
    encoder_features,
    encoder_health,
    format_health_table,
    head_similarity,
    knn_accuracy,
)
from medspan.models.vit import VisionTransformer


def _unit(degrees: list[float]) -> torch.Tensor:
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180.0
    return torch.stack([torch.cos(a), torch.sin(a)], 1)


def test_knn_accuracy_by_hand() -> None:
    # cosine similarity of unit vectors = cos(angle difference): neighbours are nearest angles
    f = _unit([0, 10, 30, 90, 80, 55])
    y = torch.tensor([0, 0, 1, 1, 1, 0])
    # k=1: 0->10 (0) ok; 10->0 (0) ok; 30->10 (0) wrong; 90->80 (1) ok; 80->90 (1) ok; 55->80 (1, 25 deg
    # vs 30 at 25 deg: tie, lower index wins -> 30, label 1) wrong  -> 4 / 6
    assert knn_accuracy(f, y, k=1) == pytest.approx(4 / 6)
    # k=2: 0: {10, 30} -> 0, 1 tie -> nearest (10) -> 0 ok; 10: {0, 30} -> tie -> 0 ok; 30: {10, 55} -> 0, 0
    # wrong; 90: {80, 55} -> 1, 0 tie -> 1 ok; 80: {90, 55} -> tie -> 1 ok; 55: {30, 80} -> 1, 1 wrong -> 4 / 6
    assert knn_accuracy(f, y, k=2) == pytest.approx(4 / 6)
    # k=3: 0: {10, 30, 55} -> 0,1,0 -> 0 ok; 10: {0, 30, 55} -> 0,1,0 ok; 30: {10, 55, 0} -> 0 wrong;
    # 90: {80, 55, 30} -> 1,0,1 -> 1 ok; 80: {90, 55, 30} ok; 55: {30, 80, 90} -> 1 wrong -> 4 / 6
    assert knn_accuracy(f, y, k=3) == pytest.approx(4 / 6)
    # k is capped at N - 1: every case sees all others; majority of the other five
    # 0: others 0,1,1,1,0 -> 1 wrong; 1 (label 1) cases see three 1s minus themselves... by count:
    # label-0 cases see 2 zeros + 3 ones -> 1 (wrong); label-1 cases see 3 zeros + 2 ones -> 0 (wrong)
    assert knn_accuracy(f, y, k=50) == 0.0
    # arbitrary label values are fine (mapped to 0..C-1)
    assert knn_accuracy(f, y * 7 - 3, k=1) == pytest.approx(4 / 6)


def test_knn_accuracy_multi_hot_is_balanced_against_prevalence() -> None:
    f = _unit([0, 10, 30, 90, 80, 55])
    y = torch.tensor([[1, 1], [1, 0], [0, 0], [0, 0], [0, 0], [0, 1]])
    # class 0 (prevalence 1/3), k=1 -> neighbours 10, 0, 10, 80, 90, 30 -> shares 1, 1, 1, 0, 0, 0
    # -> predicted positive (share > 1/3): cases 0, 1, 2. TPR 2/2, TNR 3/4 -> 0.875
    # class 1 (prevalence 1/3): neighbours' labels 0, 1, 0, 0, 0, 0 -> positive: case 1 only.
    # TPR 0/2, TNR 3/4 -> 0.375. Mean 0.625
    assert knn_accuracy(f, y, k=1) == pytest.approx(0.625)
    assert math.isnan(knn_accuracy(f, torch.ones(6, 1), k=1))  # no negatives: undefined


def test_effective_rank_known_values() -> None:
    d = 6
    assert effective_rank(torch.cat([torch.eye(d), -torch.eye(d)])) == pytest.approx(d, abs=1e-12)
    # centring the identity removes one direction: D - 1 equal singular values and a zero
    assert effective_rank(torch.eye(d)) == pytest.approx(d - 1, abs=1e-9)
    # rank 1: cases on a line
    assert effective_rank(torch.linspace(-1, 3, 10)[:, None] * torch.randn(1, 8)) == pytest.approx(1.0, abs=1e-9)
    # singular values 3 : 1 -> p = (0.75, 0.25) -> exp(H)
    f = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(f) == pytest.approx(math.exp(h), abs=1e-12)
    # a constant encoder: no spread at all (float32 rounding of the mean does not count as spread)
    assert effective_rank(torch.full((50, 16), 0.1234567)) == 0.0
    assert effective_rank(torch.randn(1, 16).expand(50, 16).contiguous()) == 0.0


def test_head_similarity_and_border_attention_by_hand() -> None:
    same = torch.rand(4, 1, 9).expand(4, 3, 9)
    assert head_similarity(same) == pytest.approx(1.0, abs=1e-12)
    disjoint = torch.eye(3)[None].expand(2, 3, 3)
    assert head_similarity(disjoint) == 0.0
    # per pair: (e0, e1) 0, (e0, e0+e1) 1/sqrt2, (e1, e0+e1) 1/sqrt2
    assert head_similarity(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])) == pytest.approx(math.sqrt(2) / 3)
    assert math.isnan(head_similarity(torch.rand(2, 1, 4)))

    assert border_share((4, 4)) == 12 / 16 and border_share((8, 8)) == 28 / 64 and border_share((2, 5)) == 1.0
    a = torch.zeros(1, 2, 16)  # 4x4 grid; token i * 4 + j
    a[0, 0, 1 * 4 + 1] = 2.0  # inner patch (1, 1)
    a[0, 0, 0] = 1.0  # corner (0, 0)
    a[0, 0, 2] = 1.0  # top edge (0, 2): ring mass 2 of 4
    a[0, 1, 3 * 4 + 2] = 5.0  # bottom edge only: 1
    assert border_attention(a, (4, 4)) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="16 tokens"):
        border_attention(a, (3, 3))


def _separated(n_per: int = 10, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(d)[:4] * 3.0
    labels = torch.arange(4).repeat_interleave(n_per)
    return centres[labels] + 0.3 * torch.randn(4 * n_per, d, generator=g), labels


def _focused_attention(n: int, heads: int, grid: tuple[int, int]) -> torch.Tensor:
    """Each head on its own inner patch (a healthy-looking attention)."""
    a = torch.full((n, heads, grid[0] * grid[1]), 1e-3)
    for h in range(heads):
        a[:, h, (1 + h) * grid[1] + 1 + h] = 1.0
    return a / a.sum(-1, keepdim=True)


def test_encoder_health_passes_a_separated_encoder_and_flags_a_constant_one() -> None:
    f, y = _separated()
    grid = (8, 8)
    good = encoder_health(f, y, _focused_attention(40, 3, grid), grid)
    assert good["collapsed"] is False and good["reasons"] == []
    assert good["knn_accuracy"] == 1.0 and good["knn_chance"] == 0.25
    assert good["effective_rank"] > 4.0 and good["rank_threshold"] == pytest.approx(max(2.0, 0.05 * 16))
    assert good["head_similarity"] < 0.05 and good["border_attention"] < 0.05
    assert good["border_share"] == 28 / 64 and good["border_threshold"] == pytest.approx(1.5 * 28 / 64)

    uniform = torch.full((40, 3, 64), 1 / 64)
    bad = encoder_health(torch.ones(40, 16), y, uniform, grid)
    assert bad["collapsed"] is True
    assert bad["effective_rank"] == 0.0
    assert bad["reasons"][0] == "features are constant (no spread across cases)"
    # constant features: neighbours are the lowest indices, all of class 0 -> accuracy 10 / 40 = chance
    assert bad["knn_accuracy"] == 0.25
    assert bad["reasons"][1] == "head similarity 1.000 > 0.95"
    assert len(bad["reasons"]) == 2  # uniform attention puts 0.4375 on the ring: not border-seeking
    # k-NN at chance is a note, not a collapse: anatomy features can be blind to a subtle finding
    assert bad["notes"] == ["k-NN accuracy 0.250 <= chance 0.250 + 0.02: no label signal a neighbour sees"]

    table = format_health_table({"span": good, "dino": bad}).splitlines()
    assert table[0] == "| encoder | k-NN acc (chance) | eff. rank (of D) | head sim. | border (uniform) | verdict |"
    assert table[2].startswith("| span | 1.000 (0.250) | ") and table[2].endswith(" | ok |")
    assert table[3].startswith("| dino | 0.250 (0.250) | 0.0 (16) | 1.000 | 0.438 (0.438) | **collapsed**: features")


def test_encoder_health_rank_and_border_flags() -> None:
    f, y = _separated()
    # features on a line (off the origin) that still separates the classes: k-NN fine, rank 1 flagged
    line = torch.zeros(40, 16)
    line[:, 0] = 1.0
    line[:, 1] = y + 1e-3 * torch.arange(40.0)
    r = encoder_health(line, y)
    assert r["reasons"] == [f"effective rank {r['effective_rank']:.2f} < 2.00"] and r["effective_rank"] < 1.01
    # all attention on the ring of an 8 x 8 grid (a DINO that has not learned): flagged
    ring = torch.zeros(40, 3, 64)
    ring[:, 0, 0] = ring[:, 1, 7] = ring[:, 2, 63] = 1.0  # three corners, distinct heads
    r = encoder_health(f, y, ring, (8, 8))
    assert r["reasons"] == ["border attention 1.000 > 0.656"]
    # the same on a 4 x 4 grid, uniform attention (75 % on the ring) is not flagged
    assert encoder_health(f, y, torch.full((40, 3, 16), 1 / 16), (4, 4), max_head_similarity=1.0)["reasons"] == []
    # a small sample bounds the rank: 5 % of min(D, N - 1), not of D
    assert encoder_health(f[:8], y[:8], k=1)["rank_threshold"] == 2.0
    # no labels: k-NN skipped, the other figures still computed
    r = encoder_health(torch.ones(40, 16), None, ring, (8, 8))
    assert r["knn_accuracy"] is None and r["knn_chance"] is None
    assert r["reasons"] == ["features are constant (no spread across cases)", "border attention 1.000 > 0.656"]
    assert format_health_table({"x": r}).splitlines()[2].startswith("| x | - (-) | 0.0 (16) | ")
    nan = f.clone()
    nan[3, 2] = float("nan")
    r = encoder_health(nan, y)
    assert r["collapsed"] and r["reasons"] == ["features contain NaN or infinite values"]


def test_encoder_features_batches_equal_one_pass_and_restore_mode() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=3)
    vit.train()
    x = torch.randn(5, 1, 16, 16)
    cls, attn, grid = encoder_features(vit, x, "cpu", batch_size=2)
    assert vit.training  # mode restored
    assert cls.shape == (5, 24) and attn.shape == (5, 3, 4) and grid == (2, 2)
    assert cls.dtype == attn.dtype == torch.float32 and not cls.requires_grad
    vit.eval()
    with torch.no_grad():
        ref = vit.forward_features(x, return_attention=True)
    torch.testing.assert_close(cls, ref.cls)
    torch.testing.assert_close(attn, ref.cls_attn)
    torch.testing.assert_close(attn.sum(-1), torch.ones(5, 3))
    # a loader of dict batches (MONAI style) or (image, label) tuples gives the same
    loader = [{"image": x[:3], "label": torch.zeros(3)}, {"image": x[3:], "label": torch.zeros(2)}]
    torch.testing.assert_close(encoder_features(vit, loader)[0], cls)
    torch.testing.assert_close(encoder_features(vit, [(x[:4], 0), (x[4:], 1)])[1], attn)
    with pytest.raises(ValueError, match="patch grids"):
        encoder_features(vit, [x[:2], torch.randn(2, 1, 24, 24)])
    assert not vit.training
