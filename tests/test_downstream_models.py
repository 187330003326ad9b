"""Tests of the downstream models: ViT intermediate tokens, ViTUNETR, ViTClassifier, layer-wise lr decay."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import (
    UnetOutBlock,
    UnetrBasicBlock,
    UnetrPrUpBlock,
    UnetrUpBlock,
)

from medspan.errors import DataError
from medspan.models.classifier import ViTClassifier, layer_decay_param_groups, layer_id
from medspan.models.unetr import ViTUNETR, default_skip_layers
from medspan.models.vit import VisionTransformer


def _vit(patch_size: int = 8, depth: int = 4, img_size: int = 32, **kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=12, depth=depth, num_heads=2, **kw)


# ------------------------------------------------------------------------ intermediate tokens
def test_return_layers_equal_a_manual_loop_over_blocks():
    vit = _vit(depth=4).eval()
    x = torch.randn(2, 1, 16, 24)
    out = vit.forward_features(x, return_layers=[3, 0, 2, 0])
    tokens, grid = vit.prepare_tokens(x)
    manual = []
    for blk in vit.blocks:
        tokens, _ = blk(tokens)
        manual.append(tokens[:, 1:])
    assert grid == (2, 3) and len(out.hidden) == 4
    for got, i in zip(out.hidden, [3, 0, 2, 0]):
        assert got.shape == (2, 6, 12)
        assert torch.equal(got, manual[i])
    # the last block's hidden state is taken before the final norm
    assert torch.equal(vit.norm(manual[3]), out.patch_tokens)
    # the other outputs do not change, and nothing is returned unless asked
    plain = vit.forward_features(x, return_attention=True)
    both = vit.forward_features(x, return_attention=True, return_layers=[1])
    assert plain.hidden is None
    for name in ("cls", "patch_tokens", "cls_attn", "cls_logits"):
        assert torch.equal(getattr(plain, name), getattr(both, name))
    assert vit.forward_features(x, return_layers=[]).hidden == []


@pytest.mark.parametrize("bad", [[4], [-1], [0, 7], [True], [1.0]])
def test_return_layers_out_of_range_is_a_value_error(bad):
    vit = _vit(depth=4)
    with pytest.raises(ValueError, match="return_layers"):
        vit.forward_features(torch.randn(1, 1, 16, 16), return_layers=bad)


# ------------------------------------------------------------------------ ViTUNETR
def test_default_skip_layers():
    assert default_skip_layers(12, 4) == [2, 5, 8, 11]
    assert default_skip_layers(4, 4) == [0, 1, 2, 3]
    assert default_skip_layers(4, 3) == [1, 2, 3]
    assert default_skip_layers(2, 4) == [0, 0, 1, 1]
    assert default_skip_layers(6, 2) == [2, 5]


@pytest.mark.parametrize(
    ("patch", "stages", "skips"),
    [(8, 3, (1, 2, 3)), (16, 4, (0, 1, 2, 3))],
)
def test_unetr_shapes_and_composition(patch, stages, skips):
    net = ViTUNETR(_vit(patch_size=patch, depth=4), out_channels=3, feature_size=4).eval()
    assert net.num_stages == stages and net.skip_layers == skips
    assert isinstance(net.image_block, UnetrBasicBlock) and isinstance(net.out, UnetOutBlock)
    assert len(net.skip_blocks) == stages - 1 and all(isinstance(b, UnetrPrUpBlock) for b in net.skip_blocks)
    assert len(net.up_blocks) == stages and all(isinstance(b, UnetrUpBlock) for b in net.up_blocks)
    # level k of the token skips: 1 + (stages-1-k) transposed convs, feature_size * 2**k channels
    for k, blk in enumerate(net.skip_blocks, start=1):
        assert len(blk.blocks) == stages - 1 - k
        assert blk.transp_conv_init.conv.out_channels == 4 * 2**k
    for (h, w) in [(32, 32), (48, 64)]:
        with torch.no_grad():
            y = net(torch.randn(2, 1, h, w))
        assert y.shape == (2, 3, h, w)


def test_unetr_tokens_go_to_the_grid_in_row_major_order():
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)  # (B, N, D), grid (2, 3)
    grid = ViTUNETR._to_grid(tokens, (2, 3))
    assert grid.shape == (2, 3, 2, 3)
    for i in range(2):
        for j in range(3):
            assert torch.equal(grid[:, :, i, j], tokens[:, i * 3 + j])


def test_unetr_gradients_reach_every_tapped_block_and_the_patch_embedding():
    vit = _vit(patch_size=8, depth=4)
    net = ViTUNETR(vit, out_channels=2, feature_size=4, skip_layers=[0, 1, 3])
    net(torch.randn(2, 1, 32, 32)).square().mean().backward()
    assert net.encoder is vit
    for p in (vit.patch_embed.proj.weight, vit.pos_embed, vit.blocks[0].mlp.fc2.weight, vit.blocks[3].mlp.fc2.weight,
              vit.norm.weight):  # the bottleneck is the last block's normed output
        assert p.grad is not None and p.grad.abs().sum() > 0
    for p in net.up_blocks.parameters():
        assert p.grad is not None


def test_unetr_rejects_bad_configurations():
    with pytest.raises(ValueError, match="power of two"):
        ViTUNETR(VisionTransformer(img_size=24, patch_size=6, embed_dim=12, depth=2, num_heads=2), 2)
    with pytest.raises(ValueError, match="power of two"):
        ViTUNETR(VisionTransformer(img_size=8, patch_size=2, embed_dim=12, depth=2, num_heads=2), 2)
    with pytest.raises(ValueError, match="2D"):
        ViTUNETR(VisionTransformer(img_size=16, patch_size=8, embed_dim=12, depth=2, num_heads=2, spatial_dims=3), 2)
    with pytest.raises(ValueError, match="must list 3 blocks"):
        ViTUNETR(_vit(patch_size=8), 2, skip_layers=[0, 3])
    with pytest.raises(ValueError, match="block indices"):
        ViTUNETR(_vit(patch_size=8), 2, skip_layers=[0, 1, 4])
    net = ViTUNETR(_vit(patch_size=8), 2, feature_size=4)
    with pytest.raises(DataError, match="not divisible by patch_size 8"):
        net(torch.randn(1, 1, 32, 36))


# ------------------------------------------------------------------------ ViTClassifier
def test_classifier_features_and_logits():
    vit = _vit().eval()
    x = torch.randn(3, 1, 16, 16)
    out = vit.forward_features(x)
    clf = ViTClassifier(vit, num_classes=5).eval()
    assert torch.equal(clf.features(x), out.cls)
    assert clf(x).shape == (3, 5)
    torch.testing.assert_close(clf(x), out.cls @ clf.head.weight.T + clf.head.bias, atol=1e-6, rtol=0)
    both = ViTClassifier(vit, num_classes=2, pool="cls+mean").eval()
    assert both.num_features == 24
    assert torch.equal(both.features(x), torch.cat([out.cls, out.patch_tokens.mean(1)], dim=1))
    with pytest.raises(ValueError, match="pool"):
        ViTClassifier(vit, 2, pool="mean")


def test_frozen_classifier_keeps_the_encoder_in_eval_mode_without_gradients():
    vit = _vit(drop_path_rate=0.5)
    clf = ViTClassifier(vit, num_classes=3, freeze_encoder=True, dropout=0.1)
    assert all(not p.requires_grad for p in vit.parameters())
    assert clf.train() is clf
    assert clf.training and clf.head.training and clf.dropout.training
    assert not vit.training and not any(m.training for m in vit.modules())
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(clf.features(x), clf.features(x))  # no drop-path: the encoder is deterministic
    clf(x).sum().backward()
    assert all(p.grad is None for p in vit.parameters())
    assert clf.head.weight.grad is not None
    # a trainable encoder trains
    free = ViTClassifier(_vit(), num_classes=3).train()
    assert free.encoder.training
    free(x).sum().backward()
    assert free.encoder.blocks[0].attn.qkv.weight.grad is not None


# ------------------------------------------------------------------------ layer-wise lr decay
def _expected_groups(prefix: str, depth: int) -> dict[str, tuple[int, bool]]:
    """Hand-written (layer id, no weight decay) of each parameter of the toy ViT (names prefixed)."""
    exp = {"cls_token": (0, True), "pos_embed": (0, True), "patch_embed.proj.weight": (0, False),
           "patch_embed.proj.bias": (0, True), "norm.weight": (depth + 1, True), "norm.bias": (depth + 1, True)}
    for i in range(depth):
        for mod in ("norm1", "norm2"):
            exp[f"blocks.{i}.{mod}.weight"] = (i + 1, True)
            exp[f"blocks.{i}.{mod}.bias"] = (i + 1, True)
        for mod in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            exp[f"blocks.{i}.{mod}.weight"] = (i + 1, False)
            exp[f"blocks.{i}.{mod}.bias"] = (i + 1, True)
    return {prefix + k: v for k, v in exp.items()}


def _by_name(groups):
    got = {}
    for g in groups:
        for name, p in zip(g["param_names"], g["params"]):
            assert name not in got, f"{name} in two groups"
            got[name] = (g["lr"], g["lr_scale"], g["weight_decay"], p)
    return got


def test_layer_decay_exact_scales_depth_4():
    clf = ViTClassifier(_vit(depth=4), num_classes=3)
    groups = layer_decay_param_groups(clf, base_lr=2.0, weight_decay=0.05, layer_decay=0.5)
    # hand-computed scales 0.5 ** (depth + 1 - layer id): patch_embed/tokens 1/32, blocks 0..3: 1/16 1/8 1/4 1/2
    scale = {0: 1 / 32, 1: 1 / 16, 2: 1 / 8, 3: 1 / 4, 4: 1 / 2, 5: 1.0}
    expected = _expected_groups("encoder.", 4)
    expected["head.weight"] = (5, False)
    expected["head.bias"] = (5, True)
    got = _by_name(groups)
    assert set(got) == set(expected)
    params = dict(clf.named_parameters())
    for name, (lid, no_wd) in expected.items():
        lr, lr_scale, wd, p = got[name]
        assert p is params[name]
        assert lr_scale == scale[lid] and lr == 2.0 * scale[lid], name
        assert wd == (0.0 if no_wd else 0.05), name
    assert [g["layer_id"] for g in groups] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert all(g.get("no_decay", False) == (g["weight_decay"] == 0.0) for g in groups)
    assert layer_id("blocks.3.mlp.fc1.weight", 4) == 4 and layer_id("norm.bias", 4) == 5
    torch.optim.AdamW(groups)  # a valid set of optimizer groups


def test_layer_decay_frozen_encoder_bare_vit_and_unetr():
    frozen = ViTClassifier(_vit(depth=4), num_classes=3, freeze_encoder=True)
    groups = layer_decay_param_groups(frozen, base_lr=1.0, weight_decay=0.1, layer_decay=0.5)
    assert [g["param_names"] for g in groups] == [["head.weight"], ["head.bias"]]
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0]
    # a bare ViT: the names carry no prefix
    got = _by_name(layer_decay_param_groups(_vit(depth=2), base_lr=1.0, weight_decay=0.1, layer_decay=0.5))
    assert set(got) == set(_expected_groups("", 2))
    assert got["blocks.1.attn.qkv.weight"][1] == 0.5 and got["pos_embed"][1] == 0.125
    # ViTUNETR: the decoder is the head (scale 1); conv weights decayed, biases not
    net = ViTUNETR(_vit(patch_size=8, depth=4), out_channels=2, feature_size=4)
    got = _by_name(layer_decay_param_groups(net, base_lr=1.0, weight_decay=0.1, layer_decay=0.5))
    decoder = {n: p for n, p in net.named_parameters() if not n.startswith("encoder.")}
    assert decoder and all(got[n][1] == 1.0 for n in decoder)
    assert got["out.conv.conv.weight"][2] == 0.1 and got["out.conv.conv.bias"][2] == 0.0
    assert got["encoder.blocks.0.attn.qkv.weight"][1] == 1 / 16
    assert len(got) == sum(1 for _ in net.parameters())
    with pytest.raises(ValueError, match="encoder"):
        layer_decay_param_groups(torch.nn.Linear(2, 2), 1.0, 0.1, 0.5)
