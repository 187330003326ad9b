"""The shared training step (medspan.engines.step): clipping modes, freeze, EMA, and non-finite refusal.

Also the learning-rate scaling rule (medspan.ssl.schedules.scale_lr) and the trainers' use of the step.
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from ignite.engine import Events
from torch import nn

from medspan.engines.pretrain import SelfDistillationTrainer
from medspan.engines.step import (
    TrainStep,
    clip_gradients,
    non_finite_tensors,
    param_groups,
)
from medspan.errors import TrainingError
from medspan.losses.dino import DINOLoss
from medspan.losses.span import SpanPriorLoss
from medspan.models.heads import DINOHead, MultiCropWrapper
from medspan.models.vit import build_vit
from medspan.ssl.schedules import cosine_schedule, scale_lr
from medspan.ssl.teacher import copy_teacher, ema_update


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one torch thread avoids OpenMP stalls on a loaded shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Tiny(nn.Module):
    """A two-layer network whose second layer is named like a DINO head's ``last_layer``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.last_layer = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(torch.tanh(self.body(x)))


def _tiny(seed: int = 0) -> tuple[Tiny, torch.Tensor]:
    torch.manual_seed(seed)
    return Tiny(), torch.randn(5, 3)


def _params_with_grads(grads: list[list[float]]) -> list[nn.Parameter]:
    params = []
    for g in grads:
        p = nn.Parameter(torch.zeros(len(g)))
        p.grad = torch.tensor(g)
        params.append(p)
    return params


# ----------------------------------------------------------------------------- clipping


def test_per_param_clip_gives_the_known_norms() -> None:
    params = _params_with_grads([[3.0, 4.0], [0.6, 0.8], [0.0, 0.0, 12.0]])  # norms 5, 1, 12
    total = clip_gradients(params, 2.0, "per_param")
    assert float(total) == pytest.approx(math.sqrt(25 + 1 + 144), rel=1e-6)  # the norm before clipping
    # each gradient on its own: 5 -> 2, 1 stays (below 2), 12 -> 2; directions kept
    assert [float(p.grad.norm()) for p in params] == pytest.approx([2.0, 1.0, 2.0], abs=1e-5)
    assert params[0].grad.tolist() == pytest.approx([1.2, 1.6], abs=1e-6)
    assert torch.equal(params[1].grad, torch.tensor([0.6, 0.8]))  # untouched, bit for bit
    assert params[2].grad.tolist() == pytest.approx([0.0, 0.0, 2.0], abs=1e-5)


def test_global_clip_gives_the_known_norms_and_is_torchs() -> None:
    params = _params_with_grads([[3.0, 4.0], [0.6, 0.8], [0.0, 0.0, 12.0]])
    ref = _params_with_grads([[3.0, 4.0], [0.6, 0.8], [0.0, 0.0, 12.0]])
    total = clip_gradients(params, 2.0, "global")
    ref_total = nn.utils.clip_grad_norm_(ref, 2.0)
    coef = 2.0 / (math.sqrt(170.0) + 1e-6)  # one factor for all: the global norm becomes 2
    assert [float(p.grad.norm()) for p in params] == pytest.approx([5 * coef, 1 * coef, 12 * coef], rel=1e-6)
    assert float(torch.cat([p.grad for p in params]).norm()) == pytest.approx(2.0, rel=1e-6)
    assert torch.equal(total, ref_total)
    assert all(torch.equal(p.grad, r.grad) for p, r in zip(params, ref))


def test_clip_mode_is_checked() -> None:
    model, _ = _tiny()
    with pytest.raises(ValueError, match="clip_mode must be one of"):
        TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), clip_grad=1.0, clip_mode="norm")
    with pytest.raises(ValueError, match="clip_mode must be one of"):
        clip_gradients(model.parameters(), 1.0, "layer")


# ----------------------------------------------------------------------------- the update


def _old_update(model, teacher, opt, loss, epoch0, clip, freeze, momentum) -> None:
    """The update both trainers had inline before the shared step (the reference for the default)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    if epoch0 < freeze:
        for name, p in model.named_parameters():
            if "last_layer" in name:
                p.grad = None
    opt.step()
    ema_update(model, teacher, momentum)


@pytest.mark.parametrize("epoch", [1, 2])
def test_default_step_is_the_old_update_bit_for_bit(epoch: int) -> None:
    """Defaults (global clipping) = the trainers' former inline update: the toy figures cannot move."""
    a, x = _tiny()
    b = copy.deepcopy(a)
    ta, tb = copy_teacher(a), copy_teacher(b)
    opt_a = torch.optim.AdamW(param_groups(a), lr=0.05, weight_decay=0.04)
    opt_b = torch.optim.AdamW(param_groups(b), lr=0.05, weight_decay=0.04)
    step = TrainStep(a, opt_a, teacher=ta, clip_grad=0.5, freeze_last_layer=1)
    for _ in range(3):
        out = step((a(x) ** 2).sum(), epoch=epoch, iteration=1, momentum=0.9)
        _old_update(b, tb, opt_b, (b(x) ** 2).sum(), epoch - 1, 0.5, 1, 0.9)
    assert out["grad_norm"] > 0.5  # the clipping did act
    for pa, pb in zip([*a.parameters(), *ta.parameters()], [*b.parameters(), *tb.parameters()]):
        assert torch.equal(pa, pb)


def test_freeze_last_layer_then_update_and_ema() -> None:
    model, x = _tiny()
    teacher = copy_teacher(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = TrainStep(model, opt, teacher=teacher, freeze_last_layer=1)  # no clipping
    body0, last0 = model.body.weight.detach().clone(), model.last_layer.weight.detach().clone()
    t_body0 = teacher.body.weight.detach().clone()
    loss = (model(x) ** 2).sum()
    grad = torch.autograd.grad(loss, model.body.weight, retain_graph=True)[0]
    step(loss, epoch=1, iteration=1, momentum=0.75)
    assert torch.equal(model.last_layer.weight, last0)  # epoch 1: frozen
    assert torch.allclose(model.body.weight, body0 - 0.1 * grad, atol=1e-7)  # plain SGD step
    assert torch.allclose(teacher.body.weight, 0.75 * t_body0 + 0.25 * model.body.weight, atol=1e-7)
    step((model(x) ** 2).sum(), epoch=2, iteration=2, momentum=0.75)
    assert not torch.equal(model.last_layer.weight, last0)  # epoch 2: trained


def test_step_without_teacher_for_supervised_trainers() -> None:
    model, x = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = TrainStep(model, opt, clip_grad=1.0, clip_mode="per_param")
    before = [p.detach().clone() for p in model.parameters()]
    out = step((model(x) ** 2).sum(), epoch=1, iteration=1)  # no momentum needed, nothing frozen
    assert set(out) == {"grad_norm"}
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="momentum"):
        TrainStep(model, opt, teacher=copy_teacher(model))((model(x) ** 2).sum(), epoch=1, iteration=1)


# ----------------------------------------------------------------------------- non-finite refusal


def test_non_finite_loss_changes_nothing() -> None:
    model, x = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    loss = (model(x) ** 2).sum() * float("nan")
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 3, iteration 9 \(mse=nan\); cases: a, b"):
        TrainStep(model, opt)(loss, epoch=3, iteration=9, terms={"mse": loss}, cases="a, b")
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_non_finite_gradient_with_a_finite_loss_is_refused_before_the_step() -> None:
    model, x = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    # sqrt'(0) = inf, times 0 = NaN: a finite loss (0) with a NaN gradient on body.weight only
    loss = (model(x) ** 2).sum() * 0.0 + torch.sqrt((model.body.weight * 0.0).sum())
    assert math.isfinite(float(loss.detach()))
    with pytest.raises(TrainingError) as info:
        TrainStep(model, opt, clip_grad=3.0)(loss, epoch=2, iteration=4)
    msg = str(info.value)
    assert "non-finite gradients at epoch 2, iteration 4" in msg
    assert "1 of 4 tensors (first: body.weight)" in msg
    assert "lower learning rate (lr now 0.1; clip_grad=3 (global))" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the optimizer did not step
    assert not opt.state  # nor its moments


def test_absurd_lr_makes_weights_non_finite_and_the_step_refuses() -> None:
    """A real tiny network, one SGD step with lr 1e38: the weights overflow to inf."""
    model, x = _tiny()
    teacher = copy_teacher(model)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=1e38), teacher=teacher, max_named=2)
    with pytest.raises(TrainingError) as info:
        step(((model(x) - 3.0) ** 2).sum(), epoch=5, iteration=17, momentum=0.9, cases="cxr_1")
    msg = str(info.value)
    bad, count = non_finite_tensors(model.named_parameters(), limit=2)
    assert count >= 2
    assert f"non-finite student weights after the optimizer step at epoch 5, iteration 17; cases: cxr_1: " \
           f"{count} of 4 tensors (first: {', '.join(bad)})" in msg
    assert "before any checkpoint or exported model of this iteration and epoch was written" in msg
    assert "lower learning rate (lr now 1e+38" in msg


def test_non_finite_teacher_is_refused() -> None:
    model, x = _tiny()
    teacher = copy_teacher(model)
    with torch.no_grad():
        teacher.last_layer.bias.fill_(float("inf"))  # the EMA keeps it infinite
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.01), teacher=teacher)
    with pytest.raises(TrainingError, match=r"non-finite teacher weights after the EMA update at epoch 1, "
                                            r"iteration 1: 1 of 4 tensors \(first: last_layer.bias\)"):
        step((model(x) ** 2).sum(), epoch=1, iteration=1, momentum=0.9)


def _vit_trainer(lr: float, max_epochs: int = 6, **kwargs) -> SelfDistillationTrainer:
    torch.manual_seed(0)
    student = MultiCropWrapper(build_vit("vit_toy", img_size=32), DINOHead(96, 64, 32, 16))
    g = torch.Generator().manual_seed(0)
    batch = {
        "global_crops": torch.randn(2, 2, 1, 32, 32, generator=g),
        "local_crops": torch.randn(2, 2, 1, 16, 16, generator=g),
        "global_priors": torch.rand(2, 2, 3, 32, 32, generator=g),
        "case_id": ["cxr_a", "cxr_b"],
    }
    return SelfDistillationTrainer(
        "cpu", max_epochs, [batch], student, copy_teacher(student), DINOLoss(64, 4, nepochs=max_epochs),
        torch.optim.AdamW(param_groups(student), lr=lr), lr_schedule=lr, wd_schedule=0.04, momentum_schedule=0.9,
        prior_loss=SpanPriorLoss({0: 0, 1: 1, 2: 2}), prior_weight=1.0, **kwargs,
    )


def test_huge_lr_stops_the_trainer_before_non_finite_weights_are_saved() -> None:
    """SPAN trainer, toy ViT, lr 3000 (the issue's probe): the former step saved 122 non-finite tensors
    at epoch 2's checkpoint; now the run stops inside the iteration, so no epoch handler sees them."""
    trainer = _vit_trainer(3000.0)
    saved: list[tuple[int, dict[str, torch.Tensor]]] = []

    def checkpoint(engine) -> None:  # what a checkpoint handler would write at the end of each epoch
        state = {**trainer.student.state_dict(), **{f"t.{k}": v for k, v in trainer.teacher.state_dict().items()}}
        saved.append((engine.state.epoch, {k: v.clone() for k, v in state.items()}))

    trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
    with pytest.raises(TrainingError) as info:
        trainer.run()
    assert saved, "at least one good epoch before the divergence"
    for _, state in saved:
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    failed = trainer.state.epoch
    assert [e for e, _ in saved] == list(range(1, failed))  # the failing epoch saved nothing
    assert f"at epoch {failed}, iteration {trainer.state.iteration}" in str(info.value)
    assert "cases: cxr_a, cxr_b" in str(info.value) and "lower learning rate (lr now 3000" in str(info.value)


def test_trainers_take_clip_mode_and_no_attention_heads() -> None:
    """The prior and SAR losses index heads by position: the trainer no longer re-indexes a head subset.

    Before, ``attention_heads=[3, 4, 5]`` made the student return heads 3-5 as positions 0-2, so a
    prior assigned to heads 0-2 silently pulled heads 3-5. The argument is gone; the losses always
    see every head of the last block, in order."""
    params = inspect.signature(SelfDistillationTrainer).parameters
    assert "attention_heads" not in params and params["clip_mode"].default == "global"
    with pytest.raises(TypeError, match="attention_heads"):
        _vit_trainer(1e-3, attention_heads=[3, 4, 5])
    with pytest.raises(ValueError, match="clip_mode"):
        _vit_trainer(1e-3, clip_mode="layerwise")

    trainer = _vit_trainer(1e-3, clip_mode="per_param")
    assert trainer.train_step.clip_mode == "per_param"
    seen: list[torch.Tensor] = []
    trainer.prior_loss.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    batch = trainer.data_loader[0]
    student0 = copy.deepcopy(trainer.student)
    trainer.state.epoch, trainer.state.iteration = 1, 1
    trainer._iteration(trainer, batch)
    with torch.no_grad():
        views = [batch["global_crops"][:, v] for v in range(2)]
        want = student0.backbone.forward_features(torch.cat(views), return_attention=True).cls_attn
    assert seen[0].shape == (4, 6, 16)  # every head of vit_toy, 4x4 patches
    assert torch.allclose(seen[0], want, atol=1e-6)


# ----------------------------------------------------------------------------- learning-rate scaling


def test_linear_lr_scaling_is_dinos_rule() -> None:
    assert scale_lr(1e-3, 32) == 1e-3  # default "none": the given lr (medspan's behaviour)
    assert scale_lr(1e-3, 32, "none", world_size=8) == 1e-3
    assert scale_lr(5e-4, 64, "linear", world_size=8) == pytest.approx(1e-3, rel=1e-12)  # 5e-4 * 512 / 256
    assert scale_lr(1e-3, 32, "linear", world_size=4) == pytest.approx(5e-4, rel=1e-12)  # 1e-3 * 128 / 256
    assert scale_lr(1e-3, 32, "linear") == pytest.approx(1.25e-4, rel=1e-12)  # no process group: world 1
    assert scale_lr(0.1, 100, "linear", world_size=1, reference_batch=50) == pytest.approx(0.2, rel=1e-12)
    with pytest.raises(ValueError, match="lr_scaling must be one of"):
        scale_lr(1e-3, 32, "sqrt")
    with pytest.raises(ValueError, match="must be >= 1"):
        scale_lr(1e-3, 0, "linear")
    # DINO scales the base only: the schedule peaks at the scaled lr and ends near the unscaled min_lr
    lrs = cosine_schedule(scale_lr(1e-3, 32, "linear", world_size=4), 1e-5, 4, 10, warmup_epochs=1)
    assert lrs[9] == pytest.approx(5e-4, rel=1e-12) and lrs[10] == pytest.approx(5e-4, rel=1e-12)
    last = 1e-5 + 0.5 * (5e-4 - 1e-5) * (1 + math.cos(math.pi * 29 / 30))  # the unscaled min_lr as the floor
    assert lrs[-1] == pytest.approx(last, rel=1e-12)
