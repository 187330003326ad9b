"""SwinCA (Swin trunk + class-attention branch) and SmartFormer: shapes, attention with gradient, masking hooks."""

from __future__ import annotations

import pytest
import torch

from medspan.errors import DataError
from medspan.models.swin_ca import SWIN_CA_PRESETS, ReconstructionHead, SmartFormer, SwinCA, build_swin_ca


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these small models run faster so, and much faster on a machine shared with other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(**kw) -> SwinCA:
    torch.manual_seed(0)
    return build_swin_ca("tiny", img_size=32, **kw)


def test_small_preset_matches_the_dagman_encoder() -> None:
    net = build_swin_ca("small")
    assert sum(p.numel() for p in net.swin.parameters()) == 10_571_872  # research note: 10.57 M
    assert net.stage3_dim == 384 and net.stage4_dim == 768
    assert net.divisor == 32 and net.stage3_factor == 8
    assert net.grids((128, 128, 128)) == ((64, 64, 64), (8, 8, 8))
    rec = ReconstructionHead(net.stage4_dim, 1, net.patch_size * 16)  # what SmartFormer(net) builds (stage 4)
    assert sum(p.numel() for p in rec.parameters()) == 768 * 32**3 + 32**3  # the note's 25.2 M linear head


def test_forward_shapes_3d() -> None:
    net = _tiny()
    x = torch.randn(2, 1, 32, 64, 32)
    out = net.forward_features(x)
    assert out.grid == (2, 4, 2) and out.patch_grid == (16, 32, 16)
    assert out.cls.shape == (2, 96)
    assert out.patch_tokens.shape == (2, 16, 96)
    assert out.cls_attn.shape == (2, 6, 16) and out.cls_logits.shape == (2, 6, 16)
    assert torch.allclose(out.cls_attn.sum(-1), torch.ones(2, 6))
    assert out.pooled.shape == (2, 192) and out.stage4.shape == (2, 192, 1, 2, 1)
    assert out.stage3_map.shape == (2, 96, 2, 4, 2)
    # patch tokens are the stage-3 map flattened row-major over (x, y, z)
    assert torch.equal(out.patch_tokens[:, 2 * 2 + 1], out.stage3_map[:, :, 0, 2, 1])
    assert torch.allclose(out.pooled, out.stage4.flatten(2).mean(-1))
    assert torch.equal(net(x), net.forward_features(x).cls)


def test_forward_2d() -> None:
    torch.manual_seed(0)
    net = build_swin_ca("tiny", spatial_dims=2, img_size=64)
    out = net.forward_features(torch.randn(3, 1, 64, 32))
    assert out.grid == (4, 2) and out.cls_attn.shape == (3, 6, 8) and out.stage4.shape == (3, 192, 2, 1)


def test_cls_attention_is_the_explicit_softmax_row_of_the_last_block() -> None:
    """cls_attn equals softmax(q_cls . K^T / sqrt(d)) over all 1+N tokens with the CLS entry dropped, renormalised."""
    net = _tiny().eval()
    x = torch.randn(2, 1, 32, 32, 32)
    out = net.forward_features(x)
    tokens = torch.cat([net.cls_token.expand(2, -1, -1), out.patch_tokens], dim=1)
    for blk in net.ca_blocks[:-1]:
        tokens, _ = blk(tokens)
    last = net.ca_blocks[-1]
    q, k, _ = last.attn.qkv_heads(last.norm1(tokens))
    full = torch.softmax(q @ k.transpose(-2, -1) * last.attn.scale, dim=-1)[:, :, 0]  # (B, H, 1+N)
    expected = full[..., 1:] / full[..., 1:].sum(-1, keepdim=True)
    assert torch.allclose(out.cls_attn, expected, atol=1e-6)


def test_cls_attention_has_gradient_into_trunk_and_branch() -> None:
    net = _tiny()
    out = net.forward_features(torch.randn(1, 1, 32, 32, 32))
    (out.cls_attn[:, 0, 0]).sum().backward()
    assert net.swin.patch_embed.proj.weight.grad is not None
    assert net.swin.patch_embed.proj.weight.grad.abs().sum() > 0
    assert net.ca_blocks[-1].attn.qkv.weight.grad.abs().sum() > 0
    assert net.cls_token.grad.abs().sum() > 0


def test_token_mask_replaces_embeddings() -> None:
    net = _tiny()
    x = torch.randn(2, 1, 32, 32, 32)
    clean = net.embed(x)
    mask = torch.zeros(2, 16, 16, 16, dtype=torch.bool)
    mask[0, :8, :8, :8] = True
    mask[1, 3, 4, 5] = True
    tok = net.embed(x, mask, "token")
    zero = net.embed(x, mask, "zero")
    m = mask.unsqueeze(1).expand_as(clean)
    assert torch.equal(tok[~m], clean[~m]) and torch.equal(zero[~m], clean[~m])
    assert torch.equal(tok[1, :, 3, 4, 5], net.mask_token[0])
    assert torch.equal(tok[0, :, 2, 7, 0], net.mask_token[0])
    assert torch.all(zero[m] == 0)
    # the mask token is learnable: gradient flows into it from a masked forward
    (net.forward_features(x, mask, "token").cls * torch.randn(2, 96)).sum().backward()
    assert net.mask_token.grad is not None and net.mask_token.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="token_mask must be"):
        net.embed(x, mask[:, :8], "token")
    with pytest.raises(ValueError, match="mask_mode"):
        net.embed(x, mask, "noise")


def test_input_size_not_divisible_is_a_clear_error() -> None:
    net = _tiny()
    with pytest.raises(DataError, match=r"not divisible by patch_size \* 2\*\*4 = 32"):
        net.forward_features(torch.randn(1, 1, 48, 32, 32))
    with pytest.raises(DataError, match="expected shape"):
        net.forward_features(torch.randn(1, 2, 32, 32, 32))


def test_reconstruction_head_pixel_shuffle_order() -> None:
    head = ReconstructionHead(in_dim=3, out_chans=1, scale=2, spatial_dims=3)
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.copy_(torch.arange(8.0))
    y = head(torch.zeros(1, 3, 2, 1, 1))
    assert y.shape == (1, 1, 4, 2, 2)
    # voxel (2i + a, b, c) of cell i holds channel a*4 + b*2 + c, in every cell
    for i in range(2):
        assert y[0, 0, 2 * i : 2 * i + 2].flatten().tolist() == list(range(8))


def test_smartformer_outputs() -> None:
    torch.manual_seed(0)
    net = SmartFormer(_tiny(), out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8)
    out = net(torch.randn(2, 1, 32, 32, 32))
    assert out.cls_proj.shape == (2, 32) and out.global_proj.shape == (2, 32)
    assert out.patch_proj.shape == (2, 8, 32) and out.recon.shape == (2, 1, 32, 32, 32)
    light = net(torch.randn(2, 1, 32, 32, 32), patch=False, recon=False)
    assert light.patch_proj is None and light.recon is None
    s3 = SmartFormer(_tiny(), out_dim=8, head_hidden_dim=8, head_bottleneck_dim=4, recon_stage=3)
    assert s3.recon_head.scale == 16 and s3(torch.randn(1, 1, 32, 32, 32)).recon.shape == (1, 1, 32, 32, 32)
    with pytest.raises(ValueError, match="recon_stage"):
        SmartFormer(_tiny(), recon_stage=2)


def test_smartformer_heads_with_batch_norm() -> None:
    plain = SmartFormer(_tiny(), out_dim=8, head_hidden_dim=8, head_bottleneck_dim=4)
    bn = SmartFormer(_tiny(), out_dim=8, head_hidden_dim=8, head_bottleneck_dim=4, head_use_bn=True)
    for head in ("cls_head", "global_head", "patch_head"):  # 3 layers: a BatchNorm1d after each hidden Linear
        assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in getattr(plain, head).modules()) == 0
        assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in getattr(bn, head).modules()) == 2
    # batch statistics remove what every sample shares: a constant offset of the head input changes nothing
    bn.train()
    x = torch.randn(3, bn.backbone.stage3_dim)
    assert torch.allclose(bn.cls_head(x), bn.cls_head(x + 5.0), atol=1e-4)


def test_presets_and_unknown_name() -> None:
    assert set(SWIN_CA_PRESETS) == {"small", "tiny"}
    assert SWIN_CA_PRESETS["small"]["depths"] == (2, 2, 8, 2) and SWIN_CA_PRESETS["small"]["num_heads"] == (4, 4, 8, 16)
    with pytest.raises(ValueError, match="unknown SwinCA preset"):
        build_swin_ca("huge")
    with pytest.raises(ValueError, match="not divisible by ca_heads"):
        build_swin_ca("tiny", ca_heads=5)
