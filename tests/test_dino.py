"""Tests of DINOLoss, the EMA teacher, cosine schedules, DINOHead and MultiCropWrapper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medspan.losses.dino import DINOLoss
from medspan.models.heads import DINOHead, MultiCropWrapper
from medspan.models.vit import VisionTransformer
from medspan.ssl.schedules import cosine_schedule
from medspan.ssl.teacher import copy_teacher, ema_update


# ----------------------------------------------------------------------------- hand formulas
def _softmax(v: list[float], temp: float) -> list[float]:
    e = [math.exp(x / temp) for x in v]
    z = sum(e)
    return [x / z for x in e]


def _log_softmax(v: list[float], temp: float) -> list[float]:
    s = [x / temp for x in v]
    lse = math.log(sum(math.exp(x) for x in s))
    return [x - lse for x in s]


def _ce(teacher: list[float], student: list[float], center: list[float], tt: float, ts: float) -> float:
    p = _softmax([t - c for t, c in zip(teacher, center)], tt)
    logq = _log_softmax(student, ts)
    return -sum(pi * lq for pi, lq in zip(p, logq))


S0, S1, S2 = [1.0, 0.0, -1.0], [0.5, 0.2, 0.1], [-0.3, 0.4, 0.0]
T0, T1 = [0.2, 0.1, 0.0], [0.0, 0.3, 0.1]


def test_dino_loss_hand_value_two_crops():
    loss_fn = DINOLoss(out_dim=3, ncrops=2, teacher_temp=0.04, student_temp=0.1, nepochs=10)
    student = torch.tensor([S0, S1], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([T0, T1], dtype=torch.float64, requires_grad=True)
    zero = [0.0, 0.0, 0.0]
    # pairs of different views: teacher view 0 vs student view 1, teacher view 1 vs student view 0
    expected = 0.5 * (_ce(T0, S1, zero, 0.04, 0.1) + _ce(T1, S0, zero, 0.04, 0.1))
    loss = loss_fn(student, teacher, epoch=0, update_center=False)
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    loss.backward()
    assert teacher.grad is None  # teacher outputs are detached
    # d CE(p, softmax(s / ts)) / ds = (softmax(s / ts) - p) / ts, each pair weighted 1/2
    grad = [[0.5 * (q - p) / 0.1 for q, p in zip(_softmax(s, 0.1), _softmax(t, 0.04))] for s, t in ((S0, T1), (S1, T0))]
    torch.testing.assert_close(student.grad, torch.tensor(grad, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert torch.equal(loss_fn.center, torch.zeros(1, 3))  # update_center=False


def test_dino_loss_hand_value_three_crops_with_center():
    loss_fn = DINOLoss(out_dim=3, ncrops=3, teacher_temp=0.07, student_temp=0.1, nepochs=10)
    c = [0.1, -0.1, 0.0]
    loss_fn.center.copy_(torch.tensor([c]))
    c32 = loss_fn.center[0].tolist()  # the float32 values actually stored
    student = torch.tensor([S0, S1, S2], dtype=torch.float64)
    teacher = torch.tensor([T0, T1], dtype=torch.float64)
    terms = [
        _ce(T0, S1, c32, 0.07, 0.1),
        _ce(T0, S2, c32, 0.07, 0.1),
        _ce(T1, S0, c32, 0.07, 0.1),
        _ce(T1, S2, c32, 0.07, 0.1),
    ]
    loss = loss_fn(student, teacher, epoch=3)  # uses the centre before its update
    assert loss.item() == pytest.approx(sum(terms) / 4, rel=1e-12)


def test_dino_loss_batch_mean():
    # B = 2: the per-pair term is the batch mean
    loss_fn = DINOLoss(out_dim=3, ncrops=2, nepochs=1)
    student = torch.tensor([S0, S2, S1, S0], dtype=torch.float64)  # crop0: S0,S2; crop1: S1,S0
    teacher = torch.tensor([T0, T1, T1, T0], dtype=torch.float64)  # view0: T0,T1; view1: T1,T0
    z = [0.0] * 3
    a = 0.5 * (_ce(T0, S1, z, 0.04, 0.1) + _ce(T1, S0, z, 0.04, 0.1))  # teacher view 0 -> student crop 1
    b = 0.5 * (_ce(T1, S0, z, 0.04, 0.1) + _ce(T0, S2, z, 0.04, 0.1))  # teacher view 1 -> student crop 0
    assert loss_fn(student, teacher, 0).item() == pytest.approx(0.5 * (a + b), rel=1e-12)


def test_center_update_exact_and_in_state_dict():
    loss_fn = DINOLoss(out_dim=3, ncrops=2, center_momentum=0.5)
    loss_fn.center.copy_(torch.tensor([[0.25, -0.5, 1.0]]))
    teacher = torch.tensor([[0.5, 0.25, -1.0], [1.5, 0.75, 0.0]])
    loss_fn(torch.zeros(2, 3), teacher, epoch=0)
    # 0.5 * c + 0.5 * mean(teacher) = 0.5 * [0.25, -0.5, 1] + 0.5 * [1, 0.5, -0.5]
    assert torch.equal(loss_fn.center, torch.tensor([[0.625, 0.0, 0.25]]))
    assert "center" in loss_fn.state_dict()
    assert torch.equal(loss_fn.state_dict()["center"], loss_fn.center)

    default = DINOLoss(out_dim=3, ncrops=2)
    default(torch.zeros(2, 3), teacher, epoch=0)
    torch.testing.assert_close(default.center, 0.1 * torch.tensor([[1.0, 0.5, -0.5]]), atol=1e-7, rtol=0)


def test_teacher_temperature_schedule():
    loss_fn = DINOLoss(
        out_dim=3, ncrops=2, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3, nepochs=5
    )
    np.testing.assert_allclose(loss_fn.teacher_temp_schedule, [0.04, 0.055, 0.07, 0.07, 0.07], rtol=0, atol=1e-15)
    assert loss_fn.teacher_temp_at(1) == pytest.approx(0.055, abs=1e-15)
    assert loss_fn.teacher_temp_at(99) == pytest.approx(0.07, abs=1e-15)
    student = torch.tensor([S0, S1], dtype=torch.float64)
    teacher = torch.tensor([T0, T1], dtype=torch.float64)
    z = [0.0] * 3
    expected = 0.5 * (_ce(T0, S1, z, 0.055, 0.1) + _ce(T1, S0, z, 0.055, 0.1))
    assert loss_fn(student, teacher, epoch=1, update_center=False).item() == pytest.approx(expected, rel=1e-12)


def test_dino_loss_shape_errors():
    loss_fn = DINOLoss(out_dim=3, ncrops=4)
    with pytest.raises(ValueError, match="not a multiple of ncrops=4"):
        loss_fn(torch.zeros(6, 3), torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match="student_output must be"):
        loss_fn(torch.zeros(8, 5), torch.zeros(4, 5), 0)
    with pytest.raises(ValueError, match="teacher_output has 3 rows"):
        loss_fn(torch.zeros(8, 3), torch.zeros(3, 3), 0)


def test_dino_loss_and_distill_ce_share_one_base_and_one_cross_entropy():
    """DINO's two-crop loss is DistillCE on the crop pairs (t0 -> s1, t1 -> s0): one definition of the
    centred, sharpened cross-entropy, in CenteredDistillation; DistillCE has no DINO crop argument."""
    from medspan.losses.dino import CenteredDistillation
    from medspan.losses.smart import DistillCE

    dino = DINOLoss(out_dim=3, ncrops=2, teacher_temp=0.07, center_momentum=0.5, nepochs=1)
    paired = DistillCE(out_dim=3, teacher_temp=0.07, center_momentum=0.5, nepochs=1)
    assert isinstance(dino, CenteredDistillation) and isinstance(paired, CenteredDistillation)
    assert not isinstance(paired, DINOLoss) and not hasattr(paired, "ncrops")
    center = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64)
    dino.center = center.clone()
    paired.center = center.clone()
    student = torch.tensor([S0, S1], dtype=torch.float64)  # crop 0, crop 1 (B = 1)
    teacher = torch.tensor([T0, T1], dtype=torch.float64)
    expected = 0.5 * (_ce(T0, S1, center[0].tolist(), 0.07, 0.1) + _ce(T1, S0, center[0].tolist(), 0.07, 0.1))
    assert dino(student, teacher, 0).item() == pytest.approx(expected, rel=1e-12)
    assert paired(student.flip(0), teacher, 0).item() == pytest.approx(expected, rel=1e-6)  # float32 rows
    torch.testing.assert_close(dino.center, paired.center, rtol=0, atol=1e-7)  # the same EMA update


# ----------------------------------------------------------------------------- EMA teacher
def test_ema_update_exact():
    student = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    teacher = copy_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert not teacher.training
    with torch.no_grad():
        student[0].weight.copy_(torch.tensor([[1.0, 2.0], [-4.0, 0.5]]))
        student[0].bias.copy_(torch.tensor([0.25, -1.0]))
        teacher[0].weight.copy_(torch.tensor([[0.0, 4.0], [8.0, 0.5]]))
        teacher[0].bias.copy_(torch.tensor([1.25, 3.0]))
        student[1].running_mean.copy_(torch.tensor([0.3, -0.7]))
        student[1].num_batches_tracked.fill_(7)
    ema_update(student, teacher, momentum=0.75)
    # t = 0.75 t + 0.25 s
    assert torch.equal(teacher[0].weight, torch.tensor([[0.25, 3.5], [5.0, 0.5]]))
    assert torch.equal(teacher[0].bias, torch.tensor([1.0, 2.0]))
    assert torch.equal(teacher[1].running_mean, torch.tensor([0.3, -0.7]))  # buffers copied
    assert teacher[1].num_batches_tracked.item() == 7
    assert torch.equal(teacher[1].weight, torch.ones(2))  # 0.75 * 1 + 0.25 * 1
    ema_update(student, teacher, momentum=0.0)
    assert torch.equal(teacher[0].weight, student[0].weight)
    # student untouched, storage separate
    assert torch.equal(student[0].weight, torch.tensor([[1.0, 2.0], [-4.0, 0.5]]))
    with pytest.raises(ValueError, match="momentum"):
        ema_update(student, teacher, 1.5)


def test_copy_teacher_disables_drop_path_and_ema_on_vit():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=8, patch_size=4, embed_dim=12, depth=2, num_heads=2, drop_path_rate=0.5)
    student = MultiCropWrapper(vit, DINOHead(12, out_dim=5, hidden_dim=8, bottleneck_dim=4))
    teacher = copy_teacher(student)
    assert [b.drop_path.drop_prob for b in teacher.backbone.blocks] == [0.0, 0.0]
    assert [b.drop_path.drop_prob for b in student.backbone.blocks] == [0.0, 0.5]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(student, teacher, 0.9)
    for b, t, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- schedules
def test_cosine_schedule_warmup_and_endpoints():
    sched = cosine_schedule(1.0, 0.0, epochs=2, niter_per_ep=2, warmup_epochs=1, start_warmup_value=0.0)
    # warm-up linspace(0, 1, 2) = [0, 1]; cosine over L = 2 iters: 1, 0.5 * (1 + cos(pi / 2))
    np.testing.assert_allclose(sched, [0.0, 1.0, 1.0, 0.5], rtol=0, atol=1e-15)

    lr = cosine_schedule(5e-4, 1e-6, epochs=10, niter_per_ep=5, warmup_epochs=2, start_warmup_value=1e-5)
    assert lr.shape == (50,) and lr.dtype == np.float64
    assert lr[0] == 1e-5 and lr[9] == 5e-4 and lr[10] == 5e-4  # warm-up ends on base, cosine starts on it
    np.testing.assert_allclose(lr[:10], np.linspace(1e-5, 5e-4, 10), rtol=0, atol=0)
    expected_last = 1e-6 + 0.5 * (5e-4 - 1e-6) * (1 + math.cos(math.pi * 39 / 40))
    assert lr[-1] == pytest.approx(expected_last, rel=1e-15)
    assert np.all(np.diff(lr[10:]) < 0)

    mom = cosine_schedule(0.996, 1.0, epochs=1, niter_per_ep=4)
    expected = [1.0 + 0.5 * (0.996 - 1.0) * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    np.testing.assert_allclose(mom, expected, rtol=0, atol=1e-15)
    assert mom[0] == 0.996
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, epochs=1, niter_per_ep=1, warmup_epochs=2)


# ----------------------------------------------------------------------------- heads
def test_dino_head_weight_norm():
    torch.manual_seed(0)
    head = DINOHead(12, out_dim=7, hidden_dim=16, bottleneck_dim=5, nlayers=3)
    out = head(torch.randn(4, 12))
    assert out.shape == (4, 7)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, torch.ones(7, 1))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(7), atol=1e-6, rtol=0)
    # the bottleneck output is L2-normalised, so |out_k| <= 1 with unit-norm rows
    assert out.abs().max() <= 1.0 + 1e-6
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 16), (16, 16), (16, 5)]
    free = DINOHead(12, out_dim=7, hidden_dim=16, bottleneck_dim=5, nlayers=1, norm_last_layer=False)
    assert isinstance(free.mlp, torch.nn.Linear)
    assert free.last_layer.parametrizations.weight.original0.requires_grad
    bn = DINOHead(12, out_dim=7, hidden_dim=16, bottleneck_dim=5, nlayers=2, use_bn=True)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in bn.mlp)


def test_multicrop_wrapper_groups_and_crop_order():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=12, depth=1, num_heads=2).eval()
    head = DINOHead(12, out_dim=5, hidden_dim=8, bottleneck_dim=4)
    model = MultiCropWrapper(vit, head).eval()
    calls: list[tuple[int, ...]] = []
    original = vit.forward_features

    def counting(x, return_attention=False, attn_heads=None):
        calls.append(tuple(x.shape))
        return original(x, return_attention=return_attention, attn_heads=attn_heads)

    vit.forward_features = counting  # instance attribute shadows the method
    g0, g1 = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    l0, l1, l2 = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    crops = [g0, l0, g1, l1, l2]  # interleaved on purpose
    out, first = model(crops, return_attention=True)
    assert calls == [(4, 1, 16, 16), (6, 1, 8, 8)]  # one backbone pass per resolution
    assert out.shape == (10, 5)
    expected = torch.cat([head(original(c).cls) for c in crops])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    ref = original(torch.cat([g0, g1]), return_attention=True)
    assert first.grid == (4, 4) and first.cls_attn.shape == (4, 2, 16)
    torch.testing.assert_close(first.cls_attn, ref.cls_attn, atol=1e-6, rtol=0)
    torch.testing.assert_close(first.cls, ref.cls, atol=1e-6, rtol=0)

    calls.clear()
    dino_order = [g0, g1, l0, l1, l2]
    plain = model(dino_order)
    assert isinstance(plain, torch.Tensor) and calls == [(4, 1, 16, 16), (6, 1, 8, 8)]
    torch.testing.assert_close(plain, torch.cat([head(original(c).cls) for c in dino_order]), atol=1e-5, rtol=1e-5)
    sub = model(dino_order[:2], return_attention=True, attn_heads=[1])[1]
    assert sub.cls_attn.shape == (4, 1, 16)
    assert model(g0).shape == (2, 5)
