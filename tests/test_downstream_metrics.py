"""Tests of medspan.eval.classification and medspan.eval.segmentation (hand-computed values, MONAI underneath)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_roc_auc
from sklearn.metrics import roc_auc_score

from medspan.errors import DataError
from medspan.eval.attention_seg import attention_dice, attention_to_maps
from medspan.eval.classification import (
    _weighted_auc,
    format_auc_table,
    multilabel_auc,
    positive_weights,
)
from medspan.eval.segmentation import (
    attention_masks,
    format_seg_table,
    segmentation_metrics,
)

# ----------------------------------------------------------------------------- AUC


def test_auc_per_class_and_mean_by_hand() -> None:
    scores = np.array([[0.1, 0.9], [0.4, 0.2], [0.35, 0.6], [0.8, 0.7]])
    labels = np.array([[0, 1], [0, 0], [1, 0], [1, 1]])
    r = multilabel_auc(scores, labels, ["a", "b"], min_positives=2, n_boot=0)
    # a: positives {0.35, 0.8} vs negatives {0.1, 0.4}: 0.35 > 0.1, 0.8 > both -> 3 of 4 pairs
    # b: positives {0.9, 0.7} vs negatives {0.2, 0.6}: all 4 pairs
    assert r["per_class"]["a"] == {"auc": 0.75, "ci": None, "n_pos": 2, "n_neg": 2, "status": "ok", "n_boot": 0}
    assert r["per_class"]["b"]["auc"] == 1.0
    assert r["mean_auc"] == 0.875
    assert r["classes_averaged"] == ["a", "b"] and r["excluded"] == [] and r["n_cases"] == 4
    assert r["mean_ci"] is None and r["n_boot_used"] == 0
    # torch input, one class as (N,)
    r1 = multilabel_auc(torch.tensor(scores[:, 0]), torch.tensor(labels[:, 0]), ["a"], min_positives=2, n_boot=0)
    assert r1["mean_auc"] == 0.75


def test_auc_ties_count_one_half() -> None:
    s = np.array([0.5, 0.5, 0.5, 0.2, 0.8])
    y = np.array([1, 0, 0, 0, 1])
    # positive 0.5: ties with two negatives (2 x 1/2) + beats 0.2 -> 2; positive 0.8 beats all 3 -> 5 / 6
    r = multilabel_auc(s[:, None], y[:, None], ["x"], min_positives=2, n_boot=0)
    assert r["per_class"]["x"]["auc"] == pytest.approx(5 / 6, abs=1e-15)
    assert _weighted_auc(s, y.astype(float), np.ones((1, 5)))[0] == pytest.approx(5 / 6, abs=1e-15)


@pytest.mark.parametrize("levels", [None, 3, 10])
def test_vectorised_auc_equals_monai_and_repeated_cases(levels: int | None) -> None:
    rng = np.random.RandomState(7 if levels is None else levels)
    for _ in range(20):
        n = int(rng.randint(4, 60))
        y = (rng.rand(n) < 0.4).astype(float)
        y[0], y[1] = 0.0, 1.0
        s = rng.rand(n) if levels is None else rng.randint(0, levels, n) / levels
        monai = float(compute_roc_auc(torch.from_numpy(s), torch.from_numpy(y)))
        assert _weighted_auc(s, y, np.ones((1, n)))[0] == pytest.approx(monai, abs=1e-12)
        assert monai == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        # a weighting = the AUC of the sample with case i repeated w_i times (what a bootstrap draws)
        w = rng.randint(0, 4, size=(3, n)).astype(float)
        w[:, 0] = w[:, 1] = 1.0
        got = _weighted_auc(s, y, w)
        for row in range(3):
            rep = np.repeat(np.arange(n), w[row].astype(int))
            assert got[row] == pytest.approx(roc_auc_score(y[rep], s[rep]), abs=1e-12)
    # no positive (or no negative) under a weighting -> NaN
    assert math.isnan(_weighted_auc(np.array([0.1, 0.9]), np.array([0.0, 1.0]), np.array([[1.0, 0.0]]))[0])


def test_classes_with_too_few_positives_or_negatives_are_listed_not_averaged() -> None:
    rng = np.random.RandomState(0)
    n = 40
    y = np.zeros((n, 3), dtype=int)
    y[:20, 0] = 1  # 20 / 20: ok
    y[:2, 1] = 1  # 2 positives
    y[:37, 2] = 1  # 3 negatives
    s = rng.rand(n, 3)
    r = multilabel_auc(s, y, ["ok", "rare", "common"], min_positives=5, n_boot=50)
    assert r["per_class"]["rare"]["status"] == "too_few_positives"
    assert r["per_class"]["common"]["status"] == "too_few_negatives"
    assert (r["per_class"]["rare"]["n_pos"], r["per_class"]["rare"]["n_neg"]) == (2, 38)
    assert r["per_class"]["rare"]["auc"] is None and r["per_class"]["rare"]["ci"] is None
    assert r["classes_averaged"] == ["ok"]
    assert r["excluded"] == [
        {"class": "rare", "status": "too_few_positives", "reason": "2 positives < 5"},
        {"class": "common", "status": "too_few_negatives", "reason": "3 negatives < 5"},
    ]
    assert r["mean_auc"] == r["per_class"]["ok"]["auc"] == pytest.approx(roc_auc_score(y[:, 0], s[:, 0]))
    table = format_auc_table(r, "toy").splitlines()
    assert table[0] == "**toy** (40 cases)"
    assert table[2] == "| class | n_pos | AUC | 95% CI | status |"
    assert table[5] == "| rare | 2 | - | - | too few positives |"
    assert table[-1].startswith(f"| **mean** (1 of 3 classes) | | **{r['mean_auc']:.3f}** | ")
    none = multilabel_auc(s[:, 1:2], y[:, 1:2], ["rare"], n_boot=10)
    assert none["mean_auc"] is None and none["mean_ci"] is None and none["classes_averaged"] == []


def test_bootstrap_interval_is_seeded_and_contains_the_estimate() -> None:
    rng = np.random.RandomState(3)
    n = 300
    y = (rng.rand(n, 2) < np.array([0.3, 0.1])).astype(int)
    s = y + rng.randn(n, 2) * np.array([1.0, 1.5])  # informative but noisy scores
    a = multilabel_auc(s, y, ["p", "q"], n_boot=200, seed=1)
    b = multilabel_auc(s, y, ["p", "q"], n_boot=200, seed=1)
    c = multilabel_auc(s, y, ["p", "q"], n_boot=200, seed=2)
    assert a == b
    assert a["mean_ci"] != c["mean_ci"] and a["mean_auc"] == c["mean_auc"]
    for name in ("p", "q"):
        pc = a["per_class"][name]
        assert pc["ci"][0] < pc["auc"] < pc["ci"][1]
        assert pc["ci"][1] - pc["ci"][0] < 0.25
        assert pc["n_boot"] == 200  # 90 and 30 positives: every resample has both classes
    assert a["mean_ci"][0] < a["mean_auc"] < a["mean_ci"][1] and a["n_boot_used"] == 200


def test_bootstrap_equals_resampling_the_cases_with_sklearn() -> None:
    """The documented procedure, written out: draws of default_rng(seed) in chunks of 64 replicates,
    sklearn's AUC of each resample, replicates missing a class dropped from the mean, linear quantiles."""
    rng = np.random.RandomState(5)
    n, n_boot = 40, 100
    y = np.zeros((n, 2), dtype=int)
    y[:2, 0] = 1  # 2 positives: about one resample in 8 has none
    y[10:30, 1] = 1
    s = np.round(y + rng.randn(n, 2), 1)  # rounded: ties
    got = multilabel_auc(s, y, ["p", "q"], min_positives=2, n_boot=n_boot, seed=4)
    draw = np.random.default_rng(4)
    idx = np.concatenate([draw.integers(0, n, size=(64, n)), draw.integers(0, n, size=(n_boot - 64, n))])
    boot = np.full((n_boot, 2), np.nan)
    for b in range(n_boot):
        for k in range(2):
            if 0 < y[idx[b], k].sum() < n:
                boot[b, k] = roc_auc_score(y[idx[b], k], s[idx[b], k])
    full = np.isfinite(boot).all(1)
    assert 0 < full.sum() < n_boot and got["n_boot_used"] == int(full.sum())
    np.testing.assert_allclose(got["mean_ci"], np.quantile(boot[full].mean(1), [0.025, 0.975]), atol=1e-12)
    for k, name in enumerate(["p", "q"]):
        col = boot[np.isfinite(boot[:, k]), k]
        assert got["per_class"][name]["n_boot"] == col.size
        np.testing.assert_allclose(got["per_class"][name]["ci"], np.quantile(col, [0.025, 0.975]), atol=1e-12)


def test_bad_scores_and_labels_raise_data_error_naming_them() -> None:
    s = np.array([[0.1, 0.2], [np.nan, 0.3], [0.5, 0.6]])
    y = np.array([[0, 1], [1, 0], [1, 1]])
    with pytest.raises(DataError, match=r"run_7/scores.csv: 1 scores are NaN .*class 'a'.*first case 1"):
        multilabel_auc(s, y, ["a", "b"], min_positives=1, where="run_7/scores.csv")
    s[1, 0] = 0.4
    y[2, 1] = -1  # CheXpert's "uncertain" left in
    with pytest.raises(DataError, match=r"labels must be 0 or 1.*case 2, class 1, value -1"):
        multilabel_auc(s, y, ["a", "b"], min_positives=1)
    with pytest.raises(ValueError, match="K = 3 classes"):
        multilabel_auc(s, y, ["a", "b", "c"])


def test_positive_weights_exact() -> None:
    labels = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]])
    w = positive_weights(labels)
    # n_neg / n_pos: 3/1; no positive -> max_weight; 1/3; no negative -> 1 / max_weight
    torch.testing.assert_close(w, torch.tensor([3.0, 100.0, 1.0 / 3.0, 0.01]))
    assert w.dtype == torch.float32
    torch.testing.assert_close(positive_weights(np.array([[1], [0]] * 1 + [[0]] * 98), max_weight=50.0),
                               torch.tensor([50.0]))  # 99 / 1 clipped
    loss = torch.nn.BCEWithLogitsLoss(pos_weight=w)(torch.zeros(4, 4), labels.float())
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- Dice / HD95


def _square(rows: slice, cols: slice, size: int = 6) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    m[rows, cols] = True
    return m


def test_dice_and_hd95_of_squares_offset_by_one_pixel() -> None:
    t = _square(slice(1, 4), slice(1, 4))
    p = _square(slice(1, 4), slice(2, 5))  # shifted one column
    r = segmentation_metrics(p[None, None], t[None, None], ["heart"])
    h = r["structures"]["heart"]
    # Dice 2 * 6 / (9 + 9). Edges: the 8 border pixels of each square. From the target's edges to the
    # prediction's: 4 pixels lie on it (0), 4 are one column (or row) away (1): sorted [0]*4 + [1]*4,
    # 95th percentile = 1; the other direction is symmetric.
    assert h["dice"] == pytest.approx(2 / 3, abs=1e-6)
    assert h["hd95"] == pytest.approx(1.0, abs=1e-6)
    assert r["mean_dice"] == pytest.approx(2 / 3, abs=1e-6) and r["unit"] == "px"
    # spacing (rows 2.0 mm, columns 0.5 mm): every non-zero edge distance is one column: 0.5 mm
    assert segmentation_metrics(p[None, None], t[None, None], ["heart"], spacing=(2.0, 0.5))["structures"]["heart"][
        "hd95"
    ] == pytest.approx(0.5, abs=1e-6)
    # spacing (0.5, 2.0): three edge pixels per side are one column (2 mm) from the other square,
    # one is half a mm away by row: sorted [0]*4 + [0.5] + [2]*3 -> 95th percentile 2 mm
    r2 = segmentation_metrics(p[None, None], t[None, None], ["heart"], spacing=(0.5, 2.0))
    assert r2["structures"]["heart"]["hd95"] == pytest.approx(2.0, abs=1e-6) and r2["unit"] == "mm"


def test_dice_and_hd95_of_diagonal_offset() -> None:
    t = _square(slice(1, 3), slice(1, 3))
    p = _square(slice(2, 4), slice(2, 4))
    h = segmentation_metrics(p[None, None].float(), t[None, None].float(), ["lung"])["structures"]["lung"]
    # one shared pixel: Dice 2 / 8. Distances of the 4 edge pixels: 0, 1, 1, sqrt(2);
    # 95th percentile (linear) at rank 0.95 * 3 = 2.85: 1 + 0.85 (sqrt(2) - 1)
    assert h["dice"] == pytest.approx(0.25, abs=1e-6)
    assert h["hd95"] == pytest.approx(1 + 0.85 * (math.sqrt(2) - 1), abs=1e-6)


def test_empty_cases_are_counted_and_left_out_as_documented() -> None:
    full = _square(slice(1, 4), slice(1, 4))
    empty = torch.zeros_like(full)
    # lung over 3 cases: perfect, empty prediction, empty target (with a false positive); heart always perfect
    pred = torch.stack([torch.stack([full, full]), torch.stack([empty, full]), torch.stack([full, full])])
    target = torch.stack([torch.stack([full, full]), torch.stack([full, full]), torch.stack([empty, full])])
    r = segmentation_metrics(pred, target, ["lung", "heart"])
    lung = r["structures"]["lung"]
    assert lung["dice_per_case"] == [1.0, 0.0, None]
    assert lung["hd95_per_case"] == [0.0, None, None]
    assert (lung["dice"], lung["hd95"]) == (0.5, 0.0)
    assert (lung["n_cases"], lung["n_dice"], lung["n_hd95"]) == (3, 2, 1)
    assert (lung["n_empty_pred"], lung["n_empty_target"]) == (1, 1)
    assert r["structures"]["heart"]["dice"] == 1.0
    assert r["mean_dice"] == 0.75 and r["mean_hd95"] == 0.0
    table = format_seg_table(r, "toy").splitlines()
    assert table[2] == "| structure | Dice | HD95 (px) | cases | empty pred | empty target |"
    assert table[4] == "| lung | 0.500 | 0.00 | 3 | 1 | 1 |"
    assert table[6] == "| **mean** | **0.750** | 0.00 | | | |"


def test_segmentation_metrics_rejects_probabilities_and_bad_shapes() -> None:
    t = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="binary"):
        segmentation_metrics(torch.full_like(t, 0.3), t, ["a"])
    with pytest.raises(ValueError, match="2 structures"):
        segmentation_metrics(t, t, ["a", "b"])
    with pytest.raises(ValueError, match="spacing needs 2"):
        segmentation_metrics(t, t, ["a"], spacing=(1.0,))


# ----------------------------------------------------------------------------- attention masks


def test_attention_masks_upsample_then_keep_mass() -> None:
    maps = torch.zeros(1, 1, 2, 2)
    maps[0, 0, 0, 0] = 4.0
    # bilinear 2 -> 4 (align_corners=False) weights one axis by [1, 0.75, 0.25, 0]; the 4x4 map is
    # 4 * outer(w, w): values 4, 3, 3, 2.25, 1, 1, 0.75, 0.75, 0.25, rest 0; total 16.
    # cumulative shares 0.25, 0.4375, 0.625 -> 60 % keeps {4, 3, 3}
    m = attention_masks(maps, (4, 4))
    assert m.dtype == torch.bool and m.shape == (1, 1, 4, 4)
    assert sorted(map(tuple, m[0, 0].nonzero().tolist())) == [(0, 0), (0, 1), (1, 0)]
    assert int(attention_masks(maps, (4, 4), mass=0.7).sum()) == 4  # + 2.25 (share 0.766)
    # 0.8 needs one 1 (share 0.828): both tied 1s are kept
    assert sorted(map(tuple, attention_masks(maps, (4, 4), mass=0.8)[0, 0].nonzero().tolist())) == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0),
    ]
    with pytest.raises(ValueError, match="mass"):
        attention_masks(maps, (4, 4), mass=0.0)


def test_attention_masks_share_the_rule_of_attention_dice() -> None:
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(3, 2, 16, generator=g) ** 4  # (B, S, P) on a 4x4 grid
    masks = torch.rand(3, 2, 12, 12, generator=g) < 0.3
    pred = attention_masks(attn.reshape(3, 2, 4, 4), (12, 12))
    dice = segmentation_metrics(pred, masks, ["a", "b"])
    ref = attention_dice(attention_to_maps(attn, (4, 4), (12, 12)), masks)  # (H, S): head s for structure s
    for s, name in enumerate(["a", "b"]):
        assert dice["structures"][name]["dice"] == pytest.approx(ref[s, s].item(), abs=1e-6)
