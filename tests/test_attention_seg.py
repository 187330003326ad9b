"""Tests of medspan.eval.attention_seg (exact values, sklearn as the reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from medspan.eval.attention_seg import (
    attention_ap,
    attention_dice,
    attention_to_maps,
    format_summary,
    summarize_heads,
)


@pytest.mark.parametrize("levels", [None, 2, 5, 30])
def test_average_precision_equals_sklearn_with_ties(levels):
    rng = np.random.RandomState(0 if levels is None else levels)
    for case in range(25):
        p = int(rng.randint(2, 400))
        y = rng.rand(p) < rng.uniform(0.05, 0.9)
        if not y.any():
            y[rng.randint(p)] = True
        s = rng.rand(p) if levels is None else rng.randint(0, levels, size=p) / levels
        ref = average_precision_score(y, s)
        got = _ap(torch.from_numpy(s), torch.from_numpy(y))
        assert got == pytest.approx(ref, abs=1e-12), (levels, case)
        got32 = _ap(torch.from_numpy(s.astype(np.float32)), torch.from_numpy(y))
        assert got32 == pytest.approx(average_precision_score(y, s.astype(np.float32)), abs=1e-12)


def _ap(scores: torch.Tensor, target: torch.Tensor) -> float:
    """AP of one score vector (P,) against a bool target (P,): attention_ap of a 1 x P image."""
    return attention_ap(scores.reshape(1, 1, 1, -1), target.reshape(1, 1, 1, -1)).item()


def test_average_precision_edge_cases():
    assert _ap(torch.tensor([0.3, 0.3, 0.3]), torch.tensor([True, False, True])) == pytest.approx(2 / 3)
    assert _ap(torch.tensor([0.9, 0.1]), torch.tensor([True, True])) == 1.0
    assert math.isnan(_ap(torch.tensor([0.1, 0.2, 0.3]), torch.zeros(3, dtype=torch.bool)))  # structure absent


def test_attention_ap_toy_case():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:4, 2:4] = True
    masks = torch.stack([mask, torch.zeros_like(mask)])[None]  # (1, S=2, 8, 8): 2nd never present
    maps = torch.stack([mask.float(), 1.0 - mask.float()])[None]  # (1, H=2, 8, 8)
    ap = attention_ap(maps, masks)
    assert ap.shape == (2, 2) and ap.dtype == torch.float64
    assert ap[0, 0].item() == 1.0
    # inverted map: one threshold ranks all 60 negatives first, then all pixels: precision 4/64
    assert ap[1, 0].item() == pytest.approx(4 / 64, abs=1e-15)
    assert torch.isnan(ap[:, 1]).all()


def test_attention_ap_averages_over_images_with_the_structure():
    rng = np.random.RandomState(1)
    maps = torch.from_numpy(rng.rand(3, 2, 6, 5))
    masks = torch.from_numpy(rng.rand(3, 2, 6, 5) < 0.3)
    masks[1, 1] = False  # structure 1 absent from image 1
    ap = attention_ap(maps, masks)
    for h in range(2):
        for s in range(2):
            imgs = [b for b in range(3) if masks[b, s].any()]
            ref = np.mean(
                [average_precision_score(masks[b, s].numpy().ravel(), maps[b, h].numpy().ravel()) for b in imgs]
            )
            assert ap[h, s].item() == pytest.approx(ref, abs=1e-12)


def test_attention_dice_known_answer():
    m = torch.zeros(2, 1, 4, 4)
    # image 0: values 5, 3, 2 (total 10). 60 % of the mass needs {5, 3} (cum 0.5, 0.8).
    m[0, 0, 0, 0], m[0, 0, 1, 1], m[0, 0, 2, 2] = 5.0, 3.0, 2.0
    masks = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    masks[0, 0, 0, 0] = masks[0, 0, 3, 3] = True  # hits the 5 only: Dice = 2*1/(2+2) = 0.5
    masks[0, 1, 1, 1] = masks[0, 1, 0, 0] = True  # exactly the kept set: Dice = 1
    # image 1: uniform map -> every pixel kept (ties); structure 0 absent, structure 1 = 4 pixels
    m[1, 0] = 1.0
    masks[1, 1, :2, :2] = True  # Dice = 2*4/(16+4) = 0.4
    d = attention_dice(m, masks)
    assert d.shape == (1, 2)
    assert d[0, 0].item() == pytest.approx(0.5)
    assert d[0, 1].item() == pytest.approx((1.0 + 0.4) / 2)
    # mass 0.9 keeps {5, 3, 2}: structure 0 of image 0 -> 2*1/(3+2)
    assert attention_dice(m[:1], masks[:1, :1], mass=0.9).item() == pytest.approx(0.4)


def test_summarize_heads_picks_the_right_heads():
    ap = torch.tensor(
        [
            [0.90, 0.10, 0.20],  # h0 -> left lung (assigned)
            [0.30, 0.80, 0.10],  # h1 -> right lung (assigned)
            [0.50, 0.85, 0.40],  # h2 free
            [0.60, 0.20, float("nan")],  # h3 free
            [0.10, 0.10, 0.70],  # h4 -> heart (assigned)
        ]
    )
    s = summarize_heads(ap, ["left_lung", "right_lung", "heart"], {0: 0, 1: 1, 4: 2})
    assert s["left_lung"] == {
        "assigned_head": 0, "assigned_ap": pytest.approx(0.9), "best_free_head": 3,
        "best_free_ap": pytest.approx(0.6), "best_head": 0, "best_ap": pytest.approx(0.9), "assigned_heads": [0],
    }
    r = s["right_lung"]
    assert (r["assigned_head"], r["best_free_head"], r["best_head"]) == (1, 2, 2)
    assert (s["heart"]["assigned_head"], s["heart"]["best_free_head"], s["heart"]["best_head"]) == (4, 2, 4)
    # unassigned structure, no free head
    s2 = summarize_heads(ap[:2, :2], ["a", "b"], {0: 0, 1: 0})
    assert s2["a"]["assigned_head"] == 0 and s2["a"]["assigned_heads"] == [0, 1]
    assert s2["b"]["assigned_head"] is None and s2["b"]["assigned_ap"] is None
    assert s2["b"]["best_free_head"] is None and s2["b"]["best_head"] == 1

    table = format_summary(s, baseline_summary=summarize_heads(ap * 0.5, ["left_lung", "right_lung", "heart"], {}))
    lines = table.splitlines()
    assert lines[0].split() == ["structure", "assigned", "best", "free", "baseline", "best", "gap"]
    assert lines[1].split() == ["left_lung", "90.0", "(h0)", "60.0", "(h3)", "45.0", "(h0)", "+45.0"]
    assert lines[2].split()[-1] == "+37.5"  # 80 - 42.5
    assert len({len(line) for line in lines}) <= 2  # fixed-width columns (last may be rstripped)
    assert format_summary(s2).splitlines()[2].split() == ["b", "-", "-", "-"]


def test_attention_to_maps_token_order():
    grid = (3, 4)
    attn = torch.zeros(1, 12, 12)
    for tok in range(12):
        attn[0, tok, tok] = 1.0  # head `tok` looks only at token `tok`
    maps = attention_to_maps(attn, grid, grid)
    for tok in range(12):
        i, j = divmod(tok, grid[1])
        assert maps[0, tok].nonzero().tolist() == [[i, j]]
    up = attention_to_maps(attn, grid, (12, 16))  # 4x upsampling: patch (i, j) covers [4i, 4i+4) x [4j, 4j+4)
    assert up.shape == (1, 12, 12, 16)
    for tok in range(12):
        i, j = divmod(tok, grid[1])
        r, c = divmod(int(up[0, tok].argmax()), 16)
        assert (r // 4, c // 4) == (i, j)
        # bilinear, align_corners=False: the 4 pixels around the patch centre share the peak
        block = up[0, tok, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
        if 0 < i < grid[0] - 1 and 0 < j < grid[1] - 1:
            torch.testing.assert_close(block[1:3, 1:3], torch.full((2, 2), 0.875**2))
    with pytest.raises(ValueError, match="CLS"):
        attention_to_maps(torch.zeros(1, 1, 13), grid, grid)


def test_overlay_writes_png_of_expected_size(tmp_path):
    from PIL import Image

    from medspan.eval.overlay import GAP, MASK_COLOURS, TITLE_HEIGHT, attention_overlay

    x, y = 40, 30  # MONAI (x, y): the picture is 30 rows by 40 columns
    image = torch.zeros(1, x, y)
    image[0, :, 20:] = 1.0  # y >= 20: the bottom 10 rows are bright
    maps = torch.rand(2, x, y, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(1, x, y, dtype=torch.bool)
    masks[0, 10:20, 5:15] = True
    out = attention_overlay(image, maps, masks, ["h0", "h1"], tmp_path / "sub" / "ov.png", zoom=2)
    assert out == tmp_path / "sub" / "ov.png"
    assert [p.name for p in out.parent.iterdir()] == ["ov.png"]  # no temp file left
    pic = Image.open(out)
    assert pic.format == "PNG" and pic.size == (3 * x * 2 + 2 * GAP, TITLE_HEIGHT + y * 2)
    arr = np.asarray(pic.convert("RGB"))
    # first panel: row 25, col 5 (zoomed 2x) is bright, row 5, col 30 dark; mask edge in colour 0
    assert tuple(arr[TITLE_HEIGHT + 2 * 25, 2 * 5]) == (255, 255, 255)
    assert tuple(arr[TITLE_HEIGHT + 2 * 5, 2 * 30]) == (0, 0, 0)
    assert tuple(arr[TITLE_HEIGHT + 2 * 5, 2 * 10]) == MASK_COLOURS[0]  # corner (row 5, col 10)
    with pytest.raises(ValueError, match="head titles"):
        attention_overlay(image, maps, None, ["h0"], tmp_path / "x.png")


def test_format_summary_plain_dino_shows_best_head_only() -> None:
    s = summarize_heads(torch.tensor([[0.2, 0.9], [0.6, 0.1]]), ["lung", "heart"], {})
    assert format_summary(s).splitlines() == [
        "structure  best head",
        "lung        60.0 (h1)",
        "heart       90.0 (h0)",
    ]
