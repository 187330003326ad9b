"""Tests of medspan.models.vit: attention with gradient, fused == naive, pos-embed, 3D, token order."""

from __future__ import annotations

import pytest
import torch

from medspan.errors import DataError
from medspan.models.vit import VIT_PRESETS, Attention, VisionTransformer, ViTOutput, build_vit


def _tiny(depth: int = 2, dtype: torch.dtype = torch.float32, **kw) -> VisionTransformer:
    torch.manual_seed(0)
    cfg = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=12, depth=depth, num_heads=2)
    cfg.update(kw)
    return VisionTransformer(**cfg).to(dtype).eval()


def _naive_attention(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax(QK^T/sqrt d) V attention; returns (output (B,T,D), attention (B,H,T,T))."""
    b, t, d = x.shape
    h = attn.num_heads
    hd = d // h
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv.reshape(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-2, -1) / hd**0.5, dim=-1)
    out = (a @ v).transpose(1, 2).reshape(b, t, d)
    return out @ attn.proj.weight.T + attn.proj.bias, a


def _naive_vit(model: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole ViT with naive attention; returns (final-normed tokens, last block full attention)."""
    tokens, _ = model.prepare_tokens(x)
    last_attn = None
    for blk in model.blocks:
        y, last_attn = _naive_attention(blk.attn, blk.norm1(tokens))
        tokens = tokens + y
        tokens = tokens + blk.mlp(blk.norm2(tokens))
    return model.norm(tokens), last_attn


def test_cls_attn_equals_explicit_full_attention_row():
    model = _tiny(depth=2, img_size=16, embed_dim=24, num_heads=3)
    x = torch.randn(3, 1, 16, 16)
    captured = {}
    model.blocks[-1].norm1.register_forward_hook(lambda m, i, o: captured.setdefault("xn", o))
    out = model.forward_features(x, return_attention=True)
    assert isinstance(out, ViTOutput)
    xn = captured["xn"]
    attn = model.blocks[-1].attn
    b, t, d = xn.shape
    hd = d // attn.num_heads
    q, k, _ = attn.qkv(xn).reshape(b, t, 3, attn.num_heads, hd).permute(2, 0, 3, 1, 4)
    full = torch.softmax(q @ k.transpose(-2, -1) / hd**0.5, dim=-1)  # (B, H, T, T)
    row = full[:, :, 0, 1:]  # CLS query, CLS key dropped
    expected = row / row.sum(-1, keepdim=True)
    assert out.cls_attn.shape == (3, 3, 16)
    torch.testing.assert_close(out.cls_attn, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.cls_attn.sum(-1), torch.ones(3, 3), atol=1e-6, rtol=0)
    logits = (q[:, :, 0:1] @ k.transpose(-2, -1)).squeeze(2)[..., 1:] / hd**0.5
    torch.testing.assert_close(out.cls_logits, logits, atol=1e-5, rtol=1e-5)
    # head subset, in the requested order
    sub = model.forward_features(x, return_attention=True, attn_heads=[2, 0])
    torch.testing.assert_close(sub.cls_attn, expected[:, [2, 0]], atol=1e-6, rtol=0)
    assert model.forward_features(x).cls_attn is None


def test_fused_forward_equals_naive_attention():
    model = _tiny(depth=2, dtype=torch.float64, img_size=16, embed_dim=24, num_heads=3)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    xn = torch.randn(2, 17, 24, dtype=torch.float64)
    fused, _ = model.blocks[0].attn(xn)
    naive, _ = _naive_attention(model.blocks[0].attn, xn)
    torch.testing.assert_close(fused, naive, atol=1e-12, rtol=0)
    out = model.forward_features(x, return_attention=True)
    tokens, full = _naive_vit(model, x)
    torch.testing.assert_close(out.cls, tokens[:, 0], atol=1e-12, rtol=0)
    torch.testing.assert_close(out.patch_tokens, tokens[:, 1:], atol=1e-12, rtol=0)
    torch.testing.assert_close(model(x), tokens[:, 0], atol=1e-12, rtol=0)
    row = full[:, :, 0, 1:]
    torch.testing.assert_close(out.cls_attn, row / row.sum(-1, keepdim=True), atol=1e-12, rtol=0)


def test_gradcheck_cls_attn_wrt_input_float64():
    model = _tiny(depth=2, dtype=torch.float64)
    w = torch.randn(2, 4, dtype=torch.float64)
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)

    def f(inp):
        out = model.forward_features(inp, return_attention=True)
        return (out.cls_attn[0] * w).sum() + (out.cls_logits[0] * w).sum()

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5, check_batched_grad=False)


class _ClsAttn(torch.nn.Module):
    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(x, return_attention=True).cls_attn


def test_gradcheck_cls_attn_wrt_last_qkv_weight_float64():
    wrapper = _ClsAttn(_tiny(depth=2, dtype=torch.float64))
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    w = torch.randn(2, 2, 4, dtype=torch.float64)
    weight0 = wrapper.vit.blocks[-1].attn.qkv.weight.detach().clone().requires_grad_(True)

    def f(weight):
        attn = torch.func.functional_call(wrapper, {"vit.blocks.1.attn.qkv.weight": weight}, (x,))
        return (attn * w).sum()

    # fast_mode: checks J·u against finite differences along random directions (432 inputs)
    assert torch.autograd.gradcheck(f, (weight0,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_attention_gradient_reaches_parameters():
    model = _tiny(depth=2)
    out = model.forward_features(torch.randn(2, 1, 8, 8), return_attention=True, attn_heads=[1])
    (out.cls_attn[..., 0].sum()).backward()
    g = model.blocks[-1].attn.qkv.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_pos_embed_identity_at_img_size_and_axis_order():
    model = _tiny(depth=1, img_size=(8, 16))  # grid (2, 4)
    assert model.pos_grid == (2, 4)
    assert model.interpolate_pos_embed((2, 4)) is model.pos_embed
    # the tokens at img_size get exactly the stored position embedding
    x = torch.zeros(1, 1, 8, 16)
    tokens, grid = model.prepare_tokens(x)
    patch_bias = model.patch_embed.proj.bias
    expected = model.pos_embed[0].clone()
    expected[0] += model.cls_token[0, 0]
    expected[1:] += patch_bias
    assert grid == (2, 4)
    assert torch.equal(tokens[0], expected)
    # encode (i, j) in channels 0 and 1 and interpolate to another grid: axes must not swap
    with torch.no_grad():
        for i in range(2):
            for j in range(4):
                model.pos_embed[0, 1 + i * 4 + j, 0] = float(i)
                model.pos_embed[0, 1 + i * 4 + j, 1] = float(j)
    pe = model.interpolate_pos_embed((4, 8))[0, 1:].reshape(4, 8, -1)
    assert pe.shape == (4, 8, 12)
    # channel 0 varies only along axis 0, channel 1 only along axis 1
    assert torch.allclose(pe[:, :, 0], pe[:, :1, 0].expand(4, 8), atol=1e-6)
    assert torch.allclose(pe[:, :, 1], pe[:1, :, 1].expand(4, 8), atol=1e-6)
    assert pe[-1, 0, 0] > pe[0, 0, 0] and pe[0, -1, 1] > pe[0, 0, 1]
    assert torch.equal(model.interpolate_pos_embed((4, 8))[0, 0], model.pos_embed[0, 0])


def test_multicrop_sizes_and_bad_input():
    model = _tiny(depth=1, img_size=16)
    for size, grid in (((16, 16), (4, 4)), ((8, 8), (2, 2)), ((12, 20), (3, 5))):
        out = model.forward_features(torch.randn(2, 1, *size), return_attention=True)
        assert out.grid == grid
        assert out.patch_tokens.shape == (2, grid[0] * grid[1], 12)
        assert out.cls_attn.shape == (2, 2, grid[0] * grid[1])
    with pytest.raises(DataError, match="not divisible by patch_size 4"):
        model(torch.randn(1, 1, 10, 8))
    with pytest.raises(DataError, match="got \\(1, 2, 8, 8\\)"):
        model(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="attn_heads"):
        model.forward_features(torch.randn(1, 1, 8, 8), return_attention=True, attn_heads=[2])


def test_3d_vit():
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=8, patch_size=4, embed_dim=12, depth=2, num_heads=2, spatial_dims=3
    ).eval()
    out = model.forward_features(torch.randn(2, 1, 8, 8, 8), return_attention=True)
    assert out.grid == (2, 2, 2)
    assert out.cls.shape == (2, 12) and out.patch_tokens.shape == (2, 8, 12)
    torch.testing.assert_close(out.cls_attn.sum(-1), torch.ones(2, 2))
    out = model.forward_features(torch.randn(1, 1, 12, 8, 4), return_attention=True)  # trilinear
    assert out.grid == (3, 2, 1) and out.cls_attn.shape == (1, 2, 6)
    # token order in 3D: patch (i, j, k) -> (i * g1 + j) * g2 + k
    x = torch.zeros(1, 1, 12, 8, 4)
    x[0, 0, 8:12, 0:4, 0:4] = 1.0  # patch (2, 0, 0)
    tok, grid = model.patch_embed(x)
    changed = (tok[0] - model.patch_embed.proj.bias).abs().sum(-1) > 0
    assert changed.nonzero().flatten().tolist() == [(2 * grid[1] + 0) * grid[2] + 0]


@pytest.mark.parametrize("i,j", [(0, 3), (1, 0), (1, 2)])
def test_token_order_row_major(i, j):
    model = _tiny(depth=1, img_size=(8, 16))  # grid (2, 4): a non-square grid catches axis swaps
    x = torch.zeros(1, 1, 8, 16)
    x[0, 0, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = torch.rand(4, 4) + 0.5
    tok, grid = model.patch_embed(x)
    assert grid == (2, 4)
    changed = (tok[0] - model.patch_embed.proj.bias).abs().sum(-1) > 0
    assert changed.nonzero().flatten().tolist() == [i * grid[1] + j]
    # and the same token index in the transformer: with pos-embed / CLS zeroed and one block
    # whose attention + mlp are switched off, patch_tokens[k] depends only on patch k
    with torch.no_grad():
        model.pos_embed.zero_()
        model.blocks[0].attn.proj.weight.zero_()
        model.blocks[0].attn.proj.bias.zero_()
        model.blocks[0].mlp.fc2.weight.zero_()
        model.blocks[0].mlp.fc2.bias.zero_()
        model.patch_embed.proj.bias.zero_()
    pt = model.forward_features(x).patch_tokens[0]
    nonzero = pt.abs().sum(-1) > 1e-6
    assert nonzero.nonzero().flatten().tolist() == [i * grid[1] + j]


def test_build_vit_names_and_overrides():
    expected = {
        "vit_toy": (96, 4, 6, 8),
        "vit_tiny": (192, 12, 3, 16),
        "vit_small": (384, 12, 6, 16),
        "vit_base": (768, 12, 12, 16),
    }
    assert set(VIT_PRESETS) == set(expected)
    for name, (d, depth, heads, patch) in expected.items():
        cfg = VIT_PRESETS[name]
        assert (cfg["embed_dim"], cfg["depth"], cfg["num_heads"], cfg["patch_size"]) == (d, depth, heads, patch)
    toy = build_vit("vit_toy")
    assert (toy.embed_dim, len(toy.blocks), toy.num_heads, toy.patch_size) == (96, 4, 6, 8)
    assert toy.in_chans == 1 and toy.spatial_dims == 2
    tiny = build_vit("vit_tiny", num_heads=6, depth=1, img_size=32)
    assert (tiny.embed_dim, tiny.num_heads, len(tiny.blocks), tiny.pos_grid) == (192, 6, 1, (2, 2))
    vol = build_vit("vit_toy", spatial_dims=3, img_size=16, depth=1)
    assert vol.pos_grid == (2, 2, 2)
    with pytest.raises(ValueError, match="unknown ViT"):
        build_vit("vit_huge")


def test_init_like_dino():
    torch.manual_seed(0)
    model = build_vit("vit_small", depth=2)
    w = model.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    assert abs(model.cls_token.std().item() - 0.02) < 0.005
    assert torch.equal(model.norm.weight, torch.ones(384))
    drop = build_vit("vit_toy", drop_path_rate=0.3)
    assert [b.drop_path.drop_prob for b in drop.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
