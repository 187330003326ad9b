"""Attention-guided / random masking, grid mapping, the noisy teacher's patch dropout and the EMA update."""

from __future__ import annotations

import math

import pytest
import torch

from medspan.ssl.masking import (
    MaskingPolicy,
    attention_guided_mask,
    hint_count,
    random_block_mask,
    select_count,
    upsample_mask,
)
from medspan.ssl.teacher import PatchDropout, copy_teacher, ema_update, patch_dropout_mask


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    ("n", "ratio", "hint", "k", "h"),
    [
        (512, 0.7, 0.1, 359, 35),
        (64, 0.7, 0.1, 45, 4),
        (27, 0.7, 0.1, 19, 1),
        (216, 0.7, 0.1, 152, 15),
        (10, 0.5, 0.2, 5, 1),
    ],
)
def test_counts(n: int, ratio: float, hint: float, k: int, h: int) -> None:
    assert select_count(ratio, n) == k == math.ceil(ratio * n - 1e-9)
    assert hint_count(hint, k) == h


def test_count_edges_and_errors() -> None:
    assert select_count(0.7, 10) == 7  # 0.7 * 10 = 7.000000000000001 in floats: still 7
    assert select_count(1.0, 5) == 5 and select_count(0.0, 5) == 0
    with pytest.raises(ValueError, match="ratio"):
        select_count(1.5, 4)
    with pytest.raises(ValueError, match="hint"):
        hint_count(-0.1, 4)


# ----------------------------------------------------------------------------- attention-guided


def test_attention_mask_known_example() -> None:
    attn = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    assert attention_guided_mask(attn, 0.6, 0.0).tolist() == [[False, True, False, True, True]]
    # ties: the lower index wins (stable order)
    tied = torch.tensor([[0.2, 0.2, 0.2, 0.4]])
    assert attention_guided_mask(tied, 0.5, 0.0).tolist() == [[True, False, False, True]]


def test_attention_mask_ratio_hint_and_top_set_exact() -> None:
    torch.manual_seed(0)
    attn = torch.rand(6, 8, 8, 8)  # stage-3 grid of a 128^3 crop
    mask = attention_guided_mask(attn, 0.7, 0.1, generator=_gen(1))
    assert mask.shape == attn.shape and mask.dtype == torch.bool
    flat_a, flat_m = attn.reshape(6, -1), mask.reshape(6, -1)
    top = torch.zeros_like(flat_m)
    top.scatter_(1, flat_a.topk(359, dim=1).indices, True)
    for b in range(6):
        assert int(flat_m[b].sum()) == 359 - 35  # ratio exact
        assert bool((flat_m[b] & ~top[b]).sum() == 0)  # masked cells are all among the top 359
        hints = top[b] & ~flat_m[b]
        assert int(hints.sum()) == 35  # hint fraction exact: floor(0.1 * 359) of the selected stay visible
        # every masked cell is attended at least as much as every unselected cell
        assert float(flat_a[b][flat_m[b]].min()) >= float(flat_a[b][~top[b]].max())
    # without hints the mask is exactly the top-k set
    assert torch.equal(attention_guided_mask(attn, 0.7, 0.0).reshape(6, -1), top)


def test_attention_mask_hints_are_random_but_reproducible() -> None:
    attn = torch.rand(4, 64, generator=_gen(3))
    a = attention_guided_mask(attn, 0.7, 0.1, generator=_gen(5))
    b = attention_guided_mask(attn, 0.7, 0.1, generator=_gen(5))
    c = attention_guided_mask(attn, 0.7, 0.1, generator=_gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.sum(1).tolist() == [41] * 4


def test_attention_mask_2d() -> None:
    attn = torch.arange(16.0).reshape(1, 4, 4)  # cell 15 most attended
    m = attention_guided_mask(attn, 0.25, 0.0)
    assert m.flatten().nonzero().flatten().tolist() == [12, 13, 14, 15]


# ----------------------------------------------------------------------------- random (SMIT)


def test_random_block_mask_exact_counts_2d_3d() -> None:
    m3 = random_block_mask(5, (6, 6, 6), 0.7, generator=_gen(0))
    assert m3.shape == (5, 6, 6, 6) and m3.reshape(5, -1).sum(1).tolist() == [152] * 5
    assert not torch.equal(m3[0], m3[1])
    m2 = random_block_mask(3, (4, 5), 0.5, generator=_gen(0))
    assert m2.shape == (3, 4, 5) and m2.reshape(3, -1).sum(1).tolist() == [10] * 3
    assert torch.equal(
        random_block_mask(2, (4, 4), 0.3, generator=_gen(9)), random_block_mask(2, (4, 4), 0.3, generator=_gen(9))
    )


def test_random_block_mask_is_uniform_over_cells() -> None:
    m = random_block_mask(4000, (2, 2, 2), 0.5, generator=_gen(0)).float().mean(0)
    assert torch.allclose(m, torch.full((2, 2, 2), 0.5), atol=0.04)


# ----------------------------------------------------------------------------- grid mapping


def test_upsample_mask_maps_stage3_cells_to_patches_and_voxels() -> None:
    coarse = random_block_mask(2, (2, 3, 2), 0.5, generator=_gen(0))
    fine = upsample_mask(coarse, 8)  # stage-3 -> input patch grid
    assert fine.shape == (2, 16, 24, 16)
    idx = torch.stack(torch.meshgrid(torch.arange(16), torch.arange(24), torch.arange(16), indexing="ij"))
    for b in range(2):
        assert torch.equal(fine[b], coarse[b][idx[0] // 8, idx[1] // 8, idx[2] // 8])
    vox = upsample_mask(coarse, 16)  # -> voxels at patch 2
    assert vox.shape == (2, 32, 48, 32) and int(vox.sum()) == int(coarse.sum()) * 16**3
    assert upsample_mask(torch.tensor([[[True, False]]]), (2, 1)).tolist() == [[[True, False], [True, False]]]
    with pytest.raises(ValueError, match="factor needs 3"):
        upsample_mask(coarse, (2, 2))


def test_masking_policy_state_roundtrip() -> None:
    pol = MaskingPolicy("attention", 0.7, 0.1, seed=0)
    attn = torch.rand(2, 64, generator=_gen(1))
    pol(attn, 2, (4, 4, 4))
    state = pol.state_dict()
    nxt = pol(attn, 2, (4, 4, 4))
    other = MaskingPolicy("attention", 0.7, 0.1, seed=123)
    other.load_state_dict(state)
    assert torch.equal(other(attn, 2, (4, 4, 4)), nxt)
    rnd = MaskingPolicy("random", 0.7, seed=0)
    assert rnd(None, 3, (4, 4, 4)).reshape(3, -1).sum(1).tolist() == [45] * 3
    with pytest.raises(ValueError, match="needs the teacher's attention"):
        pol(None, 2, (4, 4, 4))
    with pytest.raises(ValueError, match="masking mode"):
        MaskingPolicy("lowest")


# ----------------------------------------------------------------------------- teacher noise


def test_patch_dropout_exact_ratio_and_blocks() -> None:
    m = patch_dropout_mask(3, (8, 8, 8), 0.7, generator=_gen(0))
    assert m.shape == (3, 8, 8, 8) and m.reshape(3, -1).sum(1).tolist() == [358] * 3  # round(358.4)
    assert patch_dropout_mask(1, (4, 4, 4), 0.7, generator=_gen(0)).sum() == 45  # round half up of 44.8
    blk = patch_dropout_mask(2, (8, 8), 0.5, block=4, generator=_gen(0))
    coarse = blk[:, ::4, ::4]
    assert torch.equal(blk, upsample_mask(coarse, 4)) and coarse.reshape(2, -1).sum(1).tolist() == [2, 2]
    assert not patch_dropout_mask(2, (4, 4, 4), 0.0).any()
    with pytest.raises(ValueError, match="divide"):
        patch_dropout_mask(1, (6, 6, 6), 0.5, block=4)


def test_patch_dropout_callable_and_state() -> None:
    assert PatchDropout(0.0)(2, (4, 4, 4)) is None
    a = PatchDropout(0.7, seed=3)
    first = a(2, (4, 4, 4))
    state = a.state_dict()
    second = a(2, (4, 4, 4))
    b = PatchDropout(0.7, seed=99)
    b.load_state_dict(state)
    assert torch.equal(b(2, (4, 4, 4)), second) and not torch.equal(first, second)


# ----------------------------------------------------------------------------- EMA


def test_ema_update_exact_for_known_momentum() -> None:
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    teacher = copy_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    t_before = [p.clone() for p in teacher.parameters()]
    ema_update(student, teacher, momentum=0.75)
    for t0, s, t in zip(t_before, student.parameters(), teacher.parameters()):
        assert torch.allclose(t, 0.75 * t0 + 0.25 * s, atol=0, rtol=1e-6)
        assert torch.allclose(t - t0, torch.full_like(t, 0.25), atol=1e-6)  # the student moved by exactly 1
    assert all(not p.requires_grad for p in teacher.parameters())
