"""A 2D/3D Vision Transformer whose last block returns CLS->patch attention *with gradient*.

The layout follows timm/DINO: small composable :class:`PatchEmbed`, :class:`Attention`,
:class:`Mlp` and :class:`Block` modules, a learnable CLS token and a learnable position
embedding for the ``img_size`` patch grid, pre-norm blocks and a final LayerNorm.

Attention in every block runs through :func:`torch.nn.functional.scaled_dot_product_attention`
(the fused path). When asked, the last block additionally recomputes only the CLS query row
``q_cls . K^T / sqrt(d)`` (O(N) per head, never the N x N matrix) and returns

* ``cls_logits`` (B, H', N): the raw CLS->patch logits, and
* ``cls_attn``   (B, H', N): softmax over all 1+N tokens with the CLS->CLS entry dropped and
  the rest renormalised over the N patches. This equals ``softmax(cls_logits)`` over the
  patches, which is how it is computed (numerically safer when CLS->CLS dominates).

Both keep their autograd graph, so a loss on them (SPAN prior, SAR spatial entropy) trains
the student. MONAI's ``SABlock(save_attn=True)`` detaches its attention, hence this module.

Token order: patches are flattened in row-major order of the input's spatial axes, in the
order they are given. For a 2D input (B, C, X, Y) with patch grid (gx, gy) the patch at grid
position (i, j) is token ``i * gy + j`` (``1 + i * gy + j`` counting the CLS token). 3D is the
same with ``(i * gy + j) * gz + k``. Priors given in the same array axes as the image (see
:mod:`medspan.losses.span`) therefore line up token by token.

Example:
    >>> import torch
    >>> vit = build_vit("vit_toy")                       # 64 px, patch 8, 6 heads
    >>> out = vit.forward_features(torch.randn(2, 1, 64, 64), return_attention=True)
    >>> out.cls.shape, out.patch_tokens.shape, out.cls_attn.shape, out.grid
    (torch.Size([2, 96]), torch.Size([2, 64, 96]), torch.Size([2, 6, 64]), (8, 8))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.utils import ensure_tuple_rep
from torch import Tensor, nn

from medspan.errors import DataError

__all__ = [
    "VIT_PRESETS",
    "Attention",
    "Block",
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "ViTOutput",
    "VisionTransformer",
    "build_vit",
    "init_weights",
    "resize_pos_embed",
]


@dataclass
class ViTOutput:
    """What :meth:`VisionTransformer.forward_features` returns.

    Attributes:
        cls: (B, D) CLS token after the final LayerNorm.
        patch_tokens: (B, N, D) patch tokens after the final LayerNorm, N = prod(grid).
        cls_attn: (B, H', N) or None. CLS->patch attention of the last block for the requested
            heads, CLS entry dropped and renormalised over the N patches (rows sum to 1).
            float32 under half-precision autocast, else the input dtype.
        cls_logits: (B, H', N) or None. The raw CLS->patch logits ``q_cls . k_i / sqrt(d)`` of
            the same heads (same dtype as ``cls_attn``).
        grid: the patch grid, in the order of the input's spatial axes, e.g. ``(14, 14)``.
        hidden: list of (B, N, D) or None. On request (``return_layers``), the patch tokens output
            by the given blocks (0-based), in the order asked: CLS dropped, before the final
            LayerNorm (what a UNETR-style decoder takes as skips).
    """

    cls: Tensor
    patch_tokens: Tensor
    cls_attn: Tensor | None
    cls_logits: Tensor | None
    grid: tuple[int, ...]
    hidden: list[Tensor] | None = None


class DropPath(nn.Module):
    """Stochastic depth per sample (drops the residual branch of whole samples).

    Args:
        drop_prob: probability of dropping a sample's branch during training.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding by a strided Conv2d/Conv3d.

    Args:
        patch_size: patch edge length (same on every axis).
        in_chans: input channels C.
        embed_dim: token width D.
        spatial_dims: 2 or 3.

    Input (B, C, *spatial) with every spatial size divisible by ``patch_size``; output
    ``(tokens (B, N, D), grid)`` with tokens in row-major order of the spatial axes.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, spatial_dims: int = 2) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.patch_size = int(patch_size)
        self.spatial_dims = spatial_dims
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.proj = conv(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        y = self.proj(x)  # (B, D, *grid)
        grid = tuple(int(s) for s in y.shape[2:])
        return y.flatten(2).transpose(1, 2), grid


class Attention(nn.Module):
    """Multi-head self-attention on the fused SDPA path, optionally also the CLS query row.

    Args:
        dim: token width D.
        num_heads: H; ``dim`` must be divisible by it.
        qkv_bias: bias in the qkv projection.

    ``forward(x (B, T, D), cls_heads=None)`` returns ``(out (B, T, D), cls_logits)`` where
    ``cls_logits`` is None unless ``cls_heads`` is given, then (B, len(cls_heads), T): the CLS
    query's logits ``q_0 . k_t * scale`` over all T tokens (CLS included), with gradient.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = int(num_heads)
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Split ``x`` (B, T, D) into q, k, v, each (B, H, T, D/H)."""
        b, t, _ = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: Tensor, cls_heads: Sequence[int] | None = None) -> tuple[Tensor, Tensor | None]:
        b, t, d = x.shape
        q, k, v = self.qkv_heads(x)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, H, T, hd)
        out = self.proj(out.transpose(1, 2).reshape(b, t, d))
        logits = None
        if cls_heads is not None:
            idx = list(cls_heads)
            q_cls = q[:, idx, :1, :]  # (B, H', 1, hd)
            logits = (q_cls @ k[:, idx].transpose(-2, -1)).squeeze(2) * self.scale  # (B, H', T)
        return out, logits


class Mlp(nn.Module):
    """Two-layer MLP with GELU: D -> hidden -> D."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    ``forward(x, cls_heads=None)`` returns ``(x (B, T, D), cls_logits or None)``; see
    :class:`Attention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, cls_heads: Sequence[int] | None = None) -> tuple[Tensor, Tensor | None]:
        y, logits = self.attn(self.norm1(x), cls_heads=cls_heads)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, logits


class VisionTransformer(nn.Module):
    """ViT for 2D or 3D single-/multi-channel images, DINO style.

    Args:
        img_size: the size the position embedding is learned for (int or one per axis). Other
            input sizes work as long as each spatial size is divisible by ``patch_size``: the
            patch part of the position embedding is interpolated (bicubic in 2D, trilinear in 3D).
        patch_size: patch edge length P.
        in_chans: input channels C.
        embed_dim: token width D.
        depth: number of blocks (>= 1).
        num_heads: heads per block H.
        mlp_ratio: MLP hidden width / D.
        qkv_bias: bias in the qkv projections.
        drop_path_rate: stochastic depth, linearly increasing to this value over the blocks.
        spatial_dims: 2 or 3.

    Input: (B, C, *spatial) float. ``forward`` returns the normalised CLS token (B, D);
    :meth:`forward_features` returns a :class:`ViTOutput` with patch tokens and, on request,
    the last block's CLS->patch attention with gradient.

    Example:
        >>> vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
        >>> vit(torch.randn(4, 1, 32, 32)).shape
        torch.Size([4, 48])
        >>> vit.forward_features(torch.randn(4, 1, 16, 24), return_attention=True,
        ...                      attn_heads=[0, 2]).cls_attn.shape   # grid (2, 3)
        torch.Size([4, 2, 6])
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.spatial_dims = spatial_dims
        self.img_size = tuple(int(v) for v in ensure_tuple_rep(img_size, spatial_dims))
        self.patch_size = int(patch_size)
        if any(s % self.patch_size for s in self.img_size):
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        self.in_chans = int(in_chans)
        self.embed_dim = int(embed_dim)
        self.num_heads = int(num_heads)
        self.depth = int(depth)
        self.pos_grid = tuple(s // self.patch_size for s in self.img_size)
        self.num_patches = math.prod(self.pos_grid)

        self.patch_embed = PatchEmbed(self.patch_size, in_chans, embed_dim, spatial_dims)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=r) for r in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)

    # ------------------------------------------------------------------ helpers
    def interpolate_pos_embed(self, grid: Sequence[int]) -> Tensor:
        """Position embedding (1, 1+prod(grid), D) for a patch grid.

        Returns the stored parameter itself when ``grid`` equals the ``img_size`` grid, else the
        patch part resized with bicubic (2D) / trilinear (3D) interpolation, ``align_corners=False``.
        """
        grid = tuple(int(g) for g in grid)
        if grid == self.pos_grid:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, self.pos_grid, grid)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 2 + self.spatial_dims or x.shape[1] != self.in_chans:
            raise DataError(
                "VisionTransformer input",
                f"expected shape (B, {self.in_chans}, *spatial) with {self.spatial_dims} spatial dims, "
                f"got {tuple(x.shape)}",
            )
        bad = [s for s in x.shape[2:] if s % self.patch_size]
        if bad:
            raise DataError(
                "VisionTransformer input",
                f"spatial size {tuple(x.shape[2:])} is not divisible by patch_size {self.patch_size}",
            )

    def prepare_tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """Patch-embed ``x`` (B, C, *spatial), prepend CLS, add position embedding -> (B, 1+N, D)."""
        self._check_input(x)
        tokens, grid = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        return tokens + self.interpolate_pos_embed(grid), grid

    # ------------------------------------------------------------------ forward
    def forward_features(
        self,
        x: Tensor,
        return_attention: bool = False,
        attn_heads: Sequence[int] | None = None,
        return_layers: Sequence[int] | None = None,
    ) -> ViTOutput:
        """Run the ViT.

        Args:
            x: (B, C, *spatial), each spatial size divisible by ``patch_size``.
            return_attention: also return the last block's CLS->patch attention and logits.
            attn_heads: which heads of the last block (default: all, in order).
            return_layers: blocks (0-based, in ``[0, depth)``, repeats allowed) whose output patch
                tokens are returned in ``hidden``, in this order.

        Returns:
            :class:`ViTOutput`; ``cls_attn``/``cls_logits`` are (B, len(attn_heads), N) or None;
            ``hidden`` is a list of len(return_layers) tensors (B, N, D), or None when not asked.

        Raises:
            ValueError: an ``attn_heads`` or ``return_layers`` entry out of range.
        """
        heads: list[int] | None = None
        if return_attention:
            heads = list(range(self.num_heads)) if attn_heads is None else [int(h) for h in attn_heads]
            if not heads or any(not 0 <= h < self.num_heads for h in heads):
                raise ValueError(f"attn_heads {heads} must be a non-empty list of ints in [0, {self.num_heads})")
        layers: list[int] | None = None
        if return_layers is not None:
            layers = list(return_layers)
            if any(isinstance(i, bool) or not hasattr(i, "__index__") or not 0 <= i < self.depth
                   for i in layers):
                raise ValueError(f"return_layers {layers} must be block indices (ints) in [0, {self.depth})")
            layers = [int(i) for i in layers]
        tokens, grid = self.prepare_tokens(x)
        last = len(self.blocks) - 1
        logits = None
        outputs: dict[int, Tensor] = {}
        for i, blk in enumerate(self.blocks):
            tokens, lg = blk(tokens, cls_heads=heads if i == last else None)
            if lg is not None:
                logits = lg
            if layers is not None and i in layers:
                outputs[i] = tokens[:, 1:]
        tokens = self.norm(tokens)
        cls_attn = cls_logits = None
        if logits is not None:
            dtype = torch.promote_types(logits.dtype, torch.float32)
            cls_logits = logits[..., 1:].to(dtype)
            # softmax over 1+N, drop CLS, renormalise == softmax over the N patch logits
            cls_attn = cls_logits.softmax(dim=-1)
        return ViTOutput(
            cls=tokens[:, 0],
            patch_tokens=tokens[:, 1:],
            cls_attn=cls_attn,
            cls_logits=cls_logits,
            grid=grid,
            hidden=None if layers is None else [outputs[i] for i in layers],
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, *spatial) -> normalised CLS token (B, D)."""
        return self.forward_features(x).cls


def resize_pos_embed(pos_embed: Tensor, src_grid: Sequence[int], grid: Sequence[int]) -> Tensor:
    """Resize a position embedding (1, 1+prod(src_grid), D) with a CLS entry to ``grid``.

    The CLS entry is kept; the patch part is resized with bicubic (2D grid) / trilinear (3D grid)
    interpolation, ``align_corners=False`` (the rule of :meth:`VisionTransformer.interpolate_pos_embed`,
    which calls this). Returns (1, 1+prod(grid), D); ``pos_embed`` itself when the grids are equal.
    """
    src_grid = tuple(int(g) for g in src_grid)
    grid = tuple(int(g) for g in grid)
    if len(grid) != len(src_grid) or len(grid) not in (2, 3):
        raise ValueError(f"grids must both be 2D or both 3D, got {src_grid} and {grid}")
    if pos_embed.ndim != 3 or pos_embed.shape[1] != 1 + math.prod(src_grid):
        raise ValueError(f"pos_embed of shape {tuple(pos_embed.shape)} does not fit grid {src_grid} (+1 CLS)")
    if grid == src_grid:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    d = patch_pos.shape[-1]
    patch_pos = patch_pos.reshape(1, *src_grid, d).movedim(-1, 1)  # (1, D, *src_grid)
    mode = "bicubic" if len(grid) == 2 else "trilinear"
    patch_pos = F.interpolate(patch_pos, size=grid, mode=mode, align_corners=False)
    patch_pos = patch_pos.flatten(2).transpose(1, 2)
    return torch.cat([cls_pos, patch_pos], dim=1)


def init_weights(m: nn.Module) -> None:
    """ViT initialisation of one module (use with ``module.apply``): Linear weights truncated normal
    (std 0.02) with zero bias, LayerNorm weight 1 and bias 0; other modules are left alone."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


VIT_PRESETS: dict[str, dict[str, int]] = {
    # toy: 6 heads so 3 can carry structures and 3 stay free; trains on CPU in minutes
    "vit_toy": {"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 6},
    "vit_tiny": {"img_size": 224, "patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small": {"img_size": 224, "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": {"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12},
}


def build_vit(name: str, **kwargs) -> VisionTransformer:
    """Build a ViT by preset name; keyword arguments override the preset.

    Presets (:data:`VIT_PRESETS`): ``vit_toy`` (D 96, depth 4, 6 heads, patch 8, img 64),
    ``vit_tiny`` (192, 12, 3), ``vit_small`` (384, 12, 6), ``vit_base`` (768, 12, 12), the last
    three with patch 16 and img 224.

    Example:
        >>> build_vit("vit_tiny", num_heads=6, spatial_dims=3, img_size=96).num_heads
        6
    """
    if name not in VIT_PRESETS:
        raise ValueError(f"unknown ViT {name!r}; choose one of {sorted(VIT_PRESETS)}")
    cfg: dict = dict(VIT_PRESETS[name])
    cfg.update(kwargs)
    return VisionTransformer(**cfg)
