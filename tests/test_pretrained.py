"""Tests of medspan.models.pretrained: a pretraining run's encoder loads with exactly the expected keys."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from medspan.errors import DataError
from medspan.io import write_json_atomic
from medspan.models.heads import DINOHead, MultiCropWrapper
from medspan.models.pretrained import (
    LoadReport,
    WeightsError,
    build_encoder,
    load_encoder_weights,
    read_state_dict,
    resolve_pretrained,
)
from medspan.models.vit import VisionTransformer, build_vit

N_TENSORS = 4 + 4 * 12 + 2
"""vit_toy's state dict: cls_token, pos_embed, patch_embed w/b; 12 per block (4 blocks); final norm w/b."""

HPARAMS = {"model": "vit_toy", "in_chans": 1, "img_size": 128, "global_size": 32,
           "head_structures": {"0": "left_lung", "1": "right_lung", "2": "heart"}}


def _source() -> VisionTransformer:
    torch.manual_seed(1)
    vit = build_vit("vit_toy", img_size=32)
    with torch.no_grad():  # make every tensor distinguishable from a fresh init (norms are 1 / 0 there)
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return vit


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, VisionTransformer]:
    """A finished pretraining run folder, made by hand: model.pt + final_summary.json."""
    folder = tmp_path / "runs" / "span_cxr"
    folder.mkdir(parents=True)
    src = _source()
    torch.save(src.state_dict(), folder / "model.pt")
    write_json_atomic({"epoch": 2, "summary": None, "hparams": HPARAMS, "baseline": False},
                      folder / "final_summary.json")
    return folder, src


def _assert_same(model: torch.nn.Module, state: dict, skip: tuple[str, ...] = ()) -> None:
    own = model.state_dict()
    for k, v in state.items():
        if k not in skip:
            assert torch.equal(own[k], v), k


def test_resolve_run_folder(run):
    folder, _ = run
    spec = resolve_pretrained(folder)
    assert spec.weights == folder / "model.pt" and spec.run_dir == folder
    assert spec.arch == {"model": "vit_toy", "in_chans": 1, "img_size": 32, "patch_size": 8, "embed_dim": 96,
                         "depth": 4, "num_heads": 6}
    assert spec.head_structures == {0: "left_lung", 1: "right_lung", 2: "heart"}
    assert spec.baseline is False and spec.pos_grid == (4, 4)
    # a bare weights file: architecture unknown
    bare = resolve_pretrained(folder / "model.pt")
    assert bare.arch is None and bare.run_dir is None and bare.head_structures is None
    # a plain-DINO baseline run has no guided heads
    write_json_atomic({"hparams": HPARAMS, "baseline": True}, folder / "final_summary.json")
    assert resolve_pretrained(folder).head_structures is None


def test_run_loads_exactly_its_keys_bit_exact(run, caplog):
    folder, src = run
    with caplog.at_level(logging.INFO, logger="medspan"):
        enc, report = build_encoder(folder)
    assert isinstance(report, LoadReport)
    assert (report.missing, report.unexpected, report.interpolated, report.ignored) == ([], [], [], [])
    assert report.loaded == N_TENSORS == len(src.state_dict())
    assert enc.img_size == (32, 32) and enc.embed_dim == 96
    _assert_same(enc, src.state_dict())  # pos_embed included: same grid, kept bit-exactly
    lines = [r.getMessage() for r in caplog.records if r.name == "medspan"]
    assert len(lines) == 1 and f"loaded {N_TENSORS} tensors" in lines[0] and str(folder / "model.pt") in lines[0]


def test_pos_embed_interpolated_to_the_fine_tuning_size(run):
    folder, src = run
    enc, report = build_encoder(folder, img_size=64)
    assert enc.img_size == (64, 64) and enc.pos_embed.shape == (1, 1 + 64, 96)
    assert report.interpolated == ["pos_embed"] and report.loaded == N_TENSORS
    with torch.no_grad():
        expected = src.interpolate_pos_embed((8, 8))
    assert torch.equal(enc.pos_embed.detach(), expected)
    assert torch.equal(enc.pos_embed[:, 0], src.pos_embed[:, 0])  # the CLS entry is kept
    _assert_same(enc, src.state_dict(), skip=("pos_embed",))
    # a same-size embedding is not touched, also when loaded directly
    same = build_vit("vit_toy", img_size=32)
    rep = load_encoder_weights(same, src.state_dict(), source="x.pt")
    assert rep.interpolated == [] and torch.equal(same.pos_embed, src.pos_embed)


def test_unexpected_key_fails_unless_allowed(run):
    folder, src = run
    state = src.state_dict()
    state["extra.weight"] = torch.ones(3)
    torch.save(state, folder / "model.pt")
    with pytest.raises(WeightsError) as err:
        build_encoder(folder)
    msg = str(err.value)
    assert "extra.weight" in msg and "unexpected" in msg and str(folder / "model.pt") in msg
    enc, report = build_encoder(folder, allow_unexpected=["extra.*"])
    assert report.unexpected == ["extra.weight"] and report.missing == []
    _assert_same(enc, src.state_dict())


def test_missing_key_fails_unless_allowed(run):
    folder, src = run
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("norm.")}
    torch.save(state, folder / "model.pt")
    with pytest.raises(WeightsError) as err:
        build_encoder(folder)
    assert "missing key(s) ['norm.weight', 'norm.bias']" in str(err.value)
    enc, report = build_encoder(folder, allow_missing=["norm.*"])
    assert report.missing == ["norm.weight", "norm.bias"] and report.loaded == N_TENSORS - 2
    assert torch.equal(enc.norm.weight, torch.ones(96))  # kept its initialisation
    _assert_same(enc, state)


def test_shape_mismatch_names_key_and_shapes(run):
    _, src = run
    state = src.state_dict()
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 96)
    with pytest.raises(WeightsError, match=r"blocks\.1\.mlp\.fc1\.weight: weights \(100, 96\), model \(384, 96\)"):
        load_encoder_weights(build_vit("vit_toy", img_size=32), state, source="w.pt")
    with pytest.raises(WeightsError, match=r"^w\.pt: "):
        load_encoder_weights(build_vit("vit_toy", img_size=32, embed_dim=48), src.state_dict(), source="w.pt")


def test_dino_student_and_ddp_checkpoints_load(run):
    folder, src = run
    student = MultiCropWrapper(src, DINOHead(96, out_dim=16, hidden_dim=8, bottleneck_dim=4))
    state = student.state_dict()
    head_keys = [k for k in state if k.startswith("head.")]
    torch.save(state, folder / "student.pt")
    enc, report = build_encoder(folder / "student.pt", img_size=32)
    assert report.ignored == head_keys and report.loaded == N_TENSORS and report.unexpected == []
    _assert_same(enc, src.state_dict())
    ddp = {f"module.{k}": v for k, v in state.items()}
    rep = load_encoder_weights(build_vit("vit_toy", img_size=32), ddp, source="ddp.pt")
    assert rep.loaded == N_TENSORS and rep.ignored == head_keys
    # a checkpoint dict holding the state under "model"
    torch.save({"model": src.state_dict(), "epoch": 3}, folder / "ckpt.pt")
    assert read_state_dict(folder / "ckpt.pt").keys() == src.state_dict().keys()


def test_folder_without_weights_or_with_a_bad_summary_is_a_data_error(run, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(DataError, match="no model.pt in this folder") as err:
        build_encoder(empty)
    assert err.value.where == str(empty)
    with pytest.raises(DataError, match="no such"):
        resolve_pretrained(tmp_path / "nowhere")
    folder, _ = run
    (folder / "final_summary.json").write_text("{not json")
    with pytest.raises(DataError) as err:
        resolve_pretrained(folder)
    assert err.value.where == str(folder / "final_summary.json") and "not readable JSON" in str(err.value)
    (folder / "final_summary.json").write_text(json.dumps({"hparams": {"model": "tiny"}}))
    with pytest.raises(DataError, match="not a 2D ViT preset"):
        resolve_pretrained(folder)
    (folder / "model.pt").write_text("not torch")
    with pytest.raises(DataError, match="not a readable PyTorch weights file"):
        read_state_dict(folder / "model.pt")


def test_explicit_arguments_must_agree_with_the_run(run):
    folder, _ = run
    with pytest.raises(ValueError, match=r"model='vit_small' was given.*has model='vit_toy'"):
        build_encoder(folder, model="vit_small")
    with pytest.raises(ValueError, match=r"embed_dim=48 was given.*embed_dim=96"):
        build_encoder(folder, embed_dim=48)
    enc, _ = build_encoder(folder, model="vit_toy", in_chans=1, drop_path_rate=0.1)  # agreeing / free arguments
    assert enc.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)


def test_scratch_encoder():
    enc, report = build_encoder(None, model="vit_toy", img_size=48, in_chans=2)
    assert report is None and enc.img_size == (48, 48) and enc.in_chans == 2 and enc.depth == 4
