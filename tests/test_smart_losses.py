"""SMARTFormer loss terms against hand-computed values, and one SmartTrainer step recomputed by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from medspan.engines.pretrain import param_groups
from medspan.engines.smart import SmartTrainer, format_losses
from medspan.errors import TrainingError
from medspan.losses.smart import DistillCE, masked_l1
from medspan.losses.span import SpanPriorLoss
from medspan.models.swin_ca import SmartFormer, build_swin_ca
from medspan.ssl.masking import MaskingPolicy, attention_guided_mask, upsample_mask
from medspan.ssl.teacher import PatchDropout, copy_teacher


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these small models run faster so, and much faster on a machine shared with other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- unit losses


def test_masked_l1_hand_value() -> None:
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]]).reshape(1, 2, 2, 2)  # (B, C=2, 2, 2)
    target = torch.zeros(1, 2, 2, 2)
    mask = torch.tensor([[[True, False], [False, True]]])  # voxels (0,0) and (1,1)
    # channel 0: |1| + |4| = 5, channel 1: 0; over 2 voxels x 2 channels
    assert masked_l1(pred, target, mask).item() == pytest.approx(5.0 / 4.0)
    assert masked_l1(pred, target, torch.zeros(1, 2, 2, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="voxel_mask"):
        masked_l1(pred, target, mask[:, :1])


def _ce(
    t_logits: list[float], s_logits: list[float], tau_t: float, tau_s: float, center: list[float] | None = None
) -> float:
    c = center or [0.0] * len(t_logits)
    te = [math.exp((t - ci) / tau_t) for t, ci in zip(t_logits, c)]
    tp = [e / sum(te) for e in te]
    se = [s / tau_s for s in s_logits]
    lse = math.log(sum(math.exp(v) for v in se))
    return -sum(p * (v - lse) for p, v in zip(tp, se))


def test_distill_ce_hand_value_and_center_update() -> None:
    loss = DistillCE(
        out_dim=3, teacher_temp=0.5, warmup_teacher_temp=0.5, student_temp=0.25, nepochs=1, center_momentum=0.9
    )
    s = torch.tensor([[0.2, -0.1, 0.4], [0.0, 0.3, -0.2]])
    t = torch.tensor([[0.1, 0.5, -0.3], [0.4, 0.0, 0.2]])
    want = (_ce(t[0].tolist(), s[0].tolist(), 0.5, 0.25) + _ce(t[1].tolist(), s[1].tolist(), 0.5, 0.25)) / 2
    assert loss(s, t, epoch=0).item() == pytest.approx(want, rel=1e-6)
    assert torch.allclose(loss.center, 0.1 * t.mean(0, keepdim=True), atol=1e-7)
    # the next call centres the teacher with that centre
    c = loss.center[0].tolist()
    want2 = _ce(t[0].tolist(), s[0].tolist(), 0.5, 0.25, c)
    assert loss(s[:1], t[:1], epoch=0, update_center=False).item() == pytest.approx(want2, rel=1e-6)


def test_distill_ce_masked_per_image_mean() -> None:
    loss = DistillCE(out_dim=2, teacher_temp=1.0, warmup_teacher_temp=1.0, student_temp=1.0, nepochs=1)
    s = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [0.5, 0.5]], [[1.0, 0.0], [0.0, 0.0], [3.0, 1.0]]])  # (B=2, N=3, K=2)
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], [[0.0, 2.0], [1.0, 1.0], [0.0, 0.0]]])
    m = torch.tensor([[True, True, False], [False, False, True]])
    img0 = (_ce(t[0, 0].tolist(), s[0, 0].tolist(), 1, 1) + _ce(t[0, 1].tolist(), s[0, 1].tolist(), 1, 1)) / 2
    img1 = _ce(t[1, 2].tolist(), s[1, 2].tolist(), 1, 1)
    assert loss(s, t, epoch=0, mask=m, update_center=False).item() == pytest.approx((img0 + img1) / 2, rel=1e-6)
    # an image without masked tokens does not count
    m2 = torch.tensor([[True, True, False], [False, False, False]])
    assert loss(s, t, epoch=0, mask=m2, update_center=False).item() == pytest.approx(img0, rel=1e-6)
    assert loss(s, t, epoch=0, mask=torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0
    # the centre comes from every teacher row, masked or not
    assert torch.allclose(loss.center, 0.1 * t.reshape(-1, 2).mean(0, keepdim=True))


def test_distill_ce_teacher_temperature_warmup() -> None:
    loss = DistillCE(out_dim=2, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=4, nepochs=10)
    assert loss.teacher_temp_at(0) == pytest.approx(0.04) and loss.teacher_temp_at(3) == pytest.approx(0.07)
    s, t = torch.tensor([[0.3, -0.2]]), torch.tensor([[0.5, 0.1]])
    assert loss(s, t, 3, update_center=False).item() == pytest.approx(_ce([0.5, 0.1], [0.3, -0.2], 0.07, 0.1), rel=1e-6)
    with pytest.raises(ValueError, match="must match"):
        loss(s, torch.zeros(1, 3), 0)


def test_format_losses_table() -> None:
    text = format_losses({"rec": 0.5, "ampd": 2.0, "loss": 0.7}, {"rec": 1.0, "ampd": 0.1})
    lines = text.splitlines()
    assert lines[0].split() == ["term", "what", "mean", "weight", "weighted"]
    assert lines[1].split()[0] == "rec" and lines[1].split()[-1] == "0.5000"
    assert lines[2].split()[-1] == "0.2000" and lines[3].split()[0] == "loss"


def test_init_center_primes_the_centre_once_and_is_saved() -> None:
    t1 = torch.tensor([[0.2, -0.4, 0.6], [0.4, 0.0, 0.2]])
    t2 = torch.tensor([[1.0, 1.0, 1.0], [3.0, -1.0, 1.0]])
    off = DistillCE(out_dim=3, nepochs=1, center_momentum=0.9)
    assert off.prime_center(t1) is False and torch.equal(off.center, torch.zeros(1, 3))  # DINO: starts at 0
    on = DistillCE(out_dim=3, nepochs=1, center_momentum=0.9, init_center=True)
    assert on.prime_center(t1) is True
    assert torch.allclose(on.center, torch.tensor([[0.3, -0.2, 0.4]]))  # the batch mean, not 0.1 x it
    assert on.center_momentum == 0.9 and int(on.center_updates) == 1
    assert on.prime_center(t2) is False  # only once
    on.update_center(t2)  # then the ordinary EMA: 0.9 c + 0.1 mean(t2) = 0.9 c + 0.1 [2, 0, 1]
    assert torch.allclose(on.center, torch.tensor([[0.47, -0.18, 0.46]]), atol=1e-6)
    # the count is state: a resumed run does not re-initialise its centre
    again = DistillCE(out_dim=3, nepochs=1, init_center=True)
    again.load_state_dict(on.state_dict())
    assert int(again.center_updates) == 2 and again.prime_center(t1) is False


# ----------------------------------------------------------------------------- one trainer step by hand

SIZE = (64, 32, 32)  # stage-3 grid (4, 2, 2): 16 cells; mask 0.7 -> 12 selected, 1 hint, 11 masked


def _make(prior: bool = False, symmetric: bool = False, noise: float = 0.7, init_center: bool = False):
    torch.manual_seed(0)
    micro = build_swin_ca("tiny", img_size=32, embed_dim=6, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), ca_heads=2)
    student = SmartFormer(micro, out_dim=16, head_hidden_dim=16, head_bottleneck_dim=8, recon_stage=3)
    teacher = copy_teacher(student)
    losses = [DistillCE(16, nepochs=2, init_center=init_center) for _ in range(3)]
    trainer = SmartTrainer(
        "cpu",
        1,
        [],
        student,
        teacher,
        torch.optim.AdamW(param_groups(student), lr=1e-3),
        *losses,
        masking=MaskingPolicy("attention", 0.7, 0.1, seed=0),
        noise=PatchDropout(noise, seed=1),
        lr_schedule=1e-3,
        wd_schedule=0.04,
        momentum_schedule=0.9,
        prior_loss=SpanPriorLoss({0: 0, 1: 1}, sigma=0.0) if prior else None,
        prior_weight=0.5 if prior else 0.0,
        symmetric=symmetric,
        clip_grad=None,
        freeze_last_layer=0,
        epoch_length=1,
    )
    trainer.state.epoch, trainer.state.iteration = 1, 1
    g = torch.Generator().manual_seed(7)
    batch = {"views": torch.rand(2, 2, 1, *SIZE, generator=g), "case_id": ["ct_a", "ct_b"]}
    if prior:
        pri = torch.zeros(2, 2, 2, *SIZE)
        pri[:, :, 0, :32, :16] = 1.0  # structure 0 in one corner, structure 1 in another
        pri[:, :, 1, 32:, 16:] = 1.0
        batch["view_priors"] = pri
    return trainer, batch


def _record(module: torch.nn.Module, calls: list) -> None:
    module.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, dict(kwargs))), with_kwargs=True)


def _ce_rows(s: torch.Tensor, t: torch.Tensor, tau_s: float = 0.1, tau_t: float = 0.04) -> torch.Tensor:
    return -(torch.softmax(t / tau_t, -1) * torch.log_softmax(s / tau_s, -1)).sum(-1)


def test_trainer_step_terms_noise_and_ema_by_hand() -> None:
    trainer, batch = _make()
    student0, teacher0 = copy.deepcopy(trainer.student), copy.deepcopy(trainer.teacher)
    views0 = batch["views"].clone()
    t_calls, s_calls = [], []
    _record(trainer.teacher, t_calls)
    _record(trainer.student, s_calls)
    out = trainer._iteration(trainer, batch)[0]
    u, v = views0[:, 0], views0[:, 1]

    # teacher noise: only the teacher's input, exactly round(0.7 * M) dropped patch tokens per view
    (t_x,), t_kw = t_calls[0]
    drop = PatchDropout(0.7, seed=1)(4, (32, 16, 16))
    assert torch.equal(t_x, torch.cat([u, v])) and t_kw["mask_mode"] == "zero"
    assert torch.equal(t_kw["token_mask"], drop)
    assert drop.reshape(4, -1).sum(1).tolist() == [round(0.7 * 32 * 16 * 16)] * 4
    assert out["noise_fraction"] == pytest.approx(5734 / 8192)
    (s_x,), s_kw = s_calls[0]
    assert torch.equal(s_x, u) and s_kw["mask_mode"] == "token"  # the student sees the clean view, masked
    assert torch.equal(batch["views"], views0)  # the batch is not modified in place

    # the student's mask: top-attended stage-3 cells of the noisy teacher on u, mapped to patches
    with torch.no_grad():
        t = teacher0(torch.cat([u, v]), token_mask=drop, mask_mode="zero", recon=False)
        attn = t.features.cls_attn.mean(1)[:2].reshape(2, 4, 2, 2)
        m3 = attention_guided_mask(attn, 0.7, 0.1, generator=torch.Generator().manual_seed(0))
        assert m3.reshape(2, -1).sum(1).tolist() == [11, 11]
        assert torch.equal(s_kw["token_mask"], upsample_mask(m3, 8))
        s = student0(u, token_mask=upsample_mask(m3, 8), mask_mode="token")
        vox = upsample_mask(m3, 16).unsqueeze(1).float()
        rec = ((s.recon - u).abs() * vox).sum() / vox.sum()
        ce_p = _ce_rows(s.patch_proj, t.patch_proj[:2])  # (B, N); centres start at 0
        mf = m3.reshape(2, -1).float()
        ampd = ((ce_p * mf).sum(1) / mf.sum(1)).mean()
        aitd = _ce_rows(s.cls_proj, t.cls_proj[2:]).mean()  # cross view: teacher(v) -> student(u)
        gitd = _ce_rows(s.global_proj, t.global_proj[2:]).mean()
    assert out["rec"] == pytest.approx(float(rec), rel=1e-5)
    assert out["ampd"] == pytest.approx(float(ampd), rel=1e-5)
    assert out["aitd"] == pytest.approx(float(aitd), rel=1e-5)
    assert out["gitd"] == pytest.approx(float(gitd), rel=1e-5)
    assert out["loss"] == pytest.approx(float(rec + 0.1 * (ampd + aitd + gitd)), rel=1e-5)
    assert out["mask_fraction"] == pytest.approx(11 / 16)
    assert "prior" not in out

    # EMA: teacher = 0.9 * teacher_before + 0.1 * student_after, parameter by parameter
    for t0, s1, t1 in zip(teacher0.parameters(), trainer.student.parameters(), trainer.teacher.parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s1, atol=1e-7)
    # centres: 0.1 x the mean of every teacher output of the step (both views)
    assert torch.allclose(
        trainer.patch_loss.center, 0.1 * t.patch_proj.reshape(-1, 16).mean(0, keepdim=True), atol=1e-6
    )
    assert torch.allclose(trainer.cls_loss.center, 0.1 * t.cls_proj.mean(0, keepdim=True), atol=1e-6)
    # the preview keeps the first sample
    assert trainer.preview["mask"].shape == SIZE and torch.equal(trainer.preview["teacher_drop"], drop[0])


def test_first_step_targets_are_centred_with_init_center() -> None:
    trainer, batch = _make(init_center=True)
    student0, teacher0 = copy.deepcopy(trainer.student), copy.deepcopy(trainer.teacher)
    s_calls = []
    _record(trainer.student, s_calls)
    out = trainer._iteration(trainer, batch)[0]
    u, v = batch["views"][:, 0], batch["views"][:, 1]
    drop = PatchDropout(0.7, seed=1)(4, (32, 16, 16))
    (s_x,), s_kw = s_calls[0]
    with torch.no_grad():
        t = teacher0(torch.cat([u, v]), token_mask=drop, mask_mode="zero", recon=False)
        s = student0(s_x, token_mask=s_kw["token_mask"], mask_mode="token")
        c_cls = t.cls_proj.mean(0, keepdim=True)  # the centre of step 1: the mean of both views' teacher rows
        c_glob = t.global_proj.mean(0, keepdim=True)
        aitd = _ce_rows(s.cls_proj, t.cls_proj[2:] - c_cls).mean()
        gitd = _ce_rows(s.global_proj, t.global_proj[2:] - c_glob).mean()
    assert out["aitd"] == pytest.approx(float(aitd), rel=1e-5)
    assert out["gitd"] == pytest.approx(float(gitd), rel=1e-5)
    # then the EMA update with the same rows keeps it: 0.9 * mean + 0.1 * mean
    assert torch.allclose(trainer.cls_loss.center, c_cls, atol=1e-6)
    assert torch.allclose(trainer.patch_loss.center, t.patch_proj.reshape(-1, 16).mean(0, keepdim=True), atol=1e-6)
    assert int(trainer.cls_loss.center_updates) == 2


def test_clean_teacher_and_symmetric_views() -> None:
    trainer, batch = _make(symmetric=True, noise=0.0)
    t_calls, s_calls = [], []
    _record(trainer.teacher, t_calls)
    _record(trainer.student, s_calls)
    out = trainer._iteration(trainer, batch)[0]
    assert t_calls[0][1]["token_mask"] is None and out["noise_fraction"] == 0.0
    (s_x,), s_kw = s_calls[0]
    assert torch.equal(s_x, torch.cat([batch["views"][:, 0], batch["views"][:, 1]]))  # both views, u first
    assert s_kw["token_mask"].shape == (4, 32, 16, 16)


def _step_and_student_output(trainer, batch):
    """Run one step; return its output and the student's forward on the step's masked input, redone
    with the weights from before the step (what the step's losses saw)."""
    student0 = copy.deepcopy(trainer.student)
    s_calls = []
    _record(trainer.student, s_calls)
    out = trainer._iteration(trainer, batch)[0]
    (s_x,), s_kw = s_calls[0]
    with torch.no_grad():
        return out, student0(s_x, token_mask=s_kw["token_mask"], mask_mode="token")


def test_prior_term_is_the_span_loss_of_the_student_attention() -> None:
    trainer, batch = _make(prior=True)
    out, s = _step_and_student_output(trainer, batch)
    with torch.no_grad():
        want = SpanPriorLoss({0: 0, 1: 1}, sigma=0.0)(s.features.cls_attn, batch["view_priors"][:, 0], s.features.grid)
    assert out["prior"] == pytest.approx(float(want), rel=1e-5)
    total = out["rec"] + 0.1 * (out["ampd"] + out["aitd"] + out["gitd"]) + 0.5 * out["prior"]
    assert out["loss"] == pytest.approx(total, rel=1e-5)
    del batch["view_priors"]
    with pytest.raises(TrainingError, match="view_priors"):
        trainer._iteration(trainer, batch)


def test_sar_term_is_the_spatial_entropy_of_the_student_logits() -> None:
    """SAR on the SA branch: the term equals SpatialEntropyLoss of the student's CLS logits (stage-3 grid)."""
    from medspan.losses.spatial_entropy import SpatialEntropyLoss

    trainer, batch = _make()
    trainer.sar_loss, trainer.sar_weight = SpatialEntropyLoss("all"), 0.25
    out, s = _step_and_student_output(trainer, batch)
    with torch.no_grad():
        want = SpatialEntropyLoss("all")(s.features.cls_logits, s.features.grid)
    assert s.features.grid == (4, 2, 2) and out["sar"] == pytest.approx(float(want), rel=1e-5, abs=1e-7)
    total = out["rec"] + 0.1 * (out["ampd"] + out["aitd"] + out["gitd"]) + 0.25 * out["sar"]
    assert out["loss"] == pytest.approx(total, rel=1e-5)


def test_non_finite_loss_names_the_cases() -> None:
    trainer, batch = _make(noise=0.0)
    with torch.no_grad():
        next(trainer.student.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 1, iteration 1 .*cases: ct_a, ct_b"):
        trainer._iteration(trainer, batch)


def test_bad_batch_and_weights() -> None:
    trainer, batch = _make(noise=0.0)
    with pytest.raises(TrainingError, match=r"'views' must be \(B, V>=2"):
        trainer._iteration(trainer, {"views": batch["views"][:, :1], "case_id": ["x", "y"]})
    with pytest.raises(ValueError, match="unknown loss weights"):
        SmartTrainer(
            "cpu",
            1,
            [],
            trainer.student,
            trainer.teacher,
            trainer.optimizer,
            trainer.patch_loss,
            trainer.cls_loss,
            trainer.global_loss,
            weights={"recon": 1.0},
        )


def test_huge_lr_stops_before_non_finite_weights_are_saved() -> None:
    """lr 300 on the micro SMARTFormer: the former step saved 234 non-finite tensors at epoch 2's
    checkpoint; now the run stops inside the iteration (non-finite gradients or weights), so no
    end-of-epoch handler (checkpoint, export) sees them."""
    from ignite.engine import Events

    torch.manual_seed(0)
    micro = build_swin_ca("tiny", img_size=32, embed_dim=6, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), ca_heads=2)
    student = SmartFormer(micro, out_dim=16, head_hidden_dim=16, head_bottleneck_dim=8, recon_stage=3)
    teacher = copy_teacher(student)
    g = torch.Generator().manual_seed(7)
    batch = {"views": torch.rand(2, 2, 1, *SIZE, generator=g), "case_id": ["ct_a", "ct_b"]}
    trainer = SmartTrainer(
        "cpu", 6, [batch], student, teacher, torch.optim.AdamW(param_groups(student), lr=300.0),
        *[DistillCE(16, nepochs=6) for _ in range(3)],
        masking=MaskingPolicy("attention", 0.7, 0.1, seed=0), noise=PatchDropout(0.7, seed=1),
        lr_schedule=300.0, wd_schedule=0.04, momentum_schedule=0.9, freeze_last_layer=1,
    )
    saved: list[int] = []

    def checkpoint(engine) -> None:  # what a checkpoint handler reads at the end of each epoch
        state = [*student.state_dict().values(), *teacher.state_dict().values()]
        assert all(torch.isfinite(v).all() for v in state if v.is_floating_point()), f"epoch {engine.state.epoch}"
        saved.append(engine.state.epoch)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
    with pytest.raises(TrainingError) as info:
        trainer.run()
    failed = trainer.state.epoch
    assert saved == list(range(1, failed)) and failed >= 2
    assert f"at epoch {failed}, iteration {trainer.state.iteration}" in str(info.value)
    assert "cases: ct_a, ct_b" in str(info.value) and "lower learning rate (lr now 300" in str(info.value)
