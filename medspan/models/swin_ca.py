"""3D (or 2D) Swin trunk with a class-attention side branch at stage 3: the SMARTFormer encoder.

The trunk is MONAI's :class:`monai.networks.nets.swin_unetr.SwinTransformer` (the module Swin UNETR
uses). MONAI puts a patch merging at the end of *every* stage, so for an input of size ``S`` and
patch size ``p`` its five feature maps are::

    index 0  patch embedding        E      channels on S / p        (the "input patch grid")
    index 1  after stage 1 + merge  2E     channels on S / (2p)
    index 2  after stage 2 + merge  4E     channels on S / (4p)
    index 3  after stage 3 + merge  8E     channels on S / (8p)     "stage-3 tokens" (DAGMaN)
    index 4  after stage 4 + merge  16E    channels on S / (16p)    "stage-4 tokens"

For the DAGMaN "Swin-small" (E = 48, p = 2, 128^3 crops) that is 384-d stage-3 tokens on an 8^3 grid
(each covers 16^3 voxels) and 768-d stage-4 tokens on 4^3, as in the research note
(``research/smartformer.md`` section 1.2 and section 6). Every spatial size must therefore be divisible by
``p * 2**4`` (32 for p = 2).

The **semantic-attention (SA) branch** (DAGMaN's "two ViT blocks with a learnable [CLS] token at
stage 3") is a side branch: ``[CLS; stage-3 tokens]`` go through ``ca_depth`` pre-norm transformer
blocks (:class:`medspan.models.vit.Block`, fused SDPA attention); the last block also recomputes
the CLS query row with gradient, so the CLS->token attention can be used for masking (teacher) and
regularised by an anatomical prior (student). Stage 4 continues from the trunk's own stage-3
output, as the note reads the paper.

Masking and noise enter right after the patch embedding, on the input patch grid (``S / p``):

* ``token_mask`` + ``mask_mode="token"`` (student): masked patch embeddings are replaced by a
  learnable mask token (SimMIM / SMIT).
* ``token_mask`` + ``mask_mode="zero"`` (noisy teacher): dropped patch embeddings are set to zero.
  Swin's windows need the full grid, so patch *dropout* (Liu et al., WACV 2023) is implemented as
  zeroing, which the note (section 1.5) calls the natural reading for a windowed Swin.

Token order everywhere: row-major over the spatial axes in the order given (MONAI ``(x, y, z)``),
the same as :mod:`medspan.models.vit`, so priors and masks line up token by token.

Example:
    >>> import torch
    >>> net = build_swin_ca("tiny")                              # 64^3 crops, stage-3 grid 4^3
    >>> out = net.forward_features(torch.randn(2, 1, 64, 64, 64))
    >>> out.cls.shape, out.patch_tokens.shape, out.cls_attn.shape, out.grid, out.pooled.shape
    (torch.Size([2, 96]), torch.Size([2, 64, 96]), torch.Size([2, 6, 64]), (4, 4, 4), torch.Size([2, 192]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.networks.nets.swin_unetr import SwinTransformer
from monai.networks.utils import pixelshuffle
from monai.utils import ensure_tuple_rep
from torch import Tensor, nn

from medspan.errors import DataError
from medspan.models.heads import DINOHead
from medspan.models.vit import Block, init_weights

__all__ = [
    "SWIN_CA_PRESETS",
    "ReconstructionHead",
    "SmartFormer",
    "SmartOutput",
    "SwinCA",
    "SwinCAOutput",
    "build_swin_ca",
]

N_STAGES = 4
STAGE3 = 3  # index of the stage-3 feature map in SwinTransformer's outputs


@dataclass
class SwinCAOutput:
    """What :meth:`SwinCA.forward_features` returns (field names follow :class:`~medspan.models.vit.ViTOutput`).

    Attributes:
        cls: (B, D3) the SA branch's CLS token after its final LayerNorm (D3 = 8 * embed_dim).
        patch_tokens: (B, N3, D3) the trunk's stage-3 tokens (layer-normed), N3 = prod(grid),
            row-major over ``grid``.
        cls_attn: (B, H, N3) CLS->stage-3-token attention of every head of the last SA block, CLS
            entry dropped and renormalised over the N3 tokens (rows sum to 1), with gradient.
        cls_logits: (B, H, N3) the raw logits ``q_cls . k_i / sqrt(d)`` of the same heads.
        grid: the stage-3 grid, e.g. ``(8, 8, 8)`` for a 128^3 crop at patch 2.
        pooled: (B, D4) global average of the stage-4 tokens (layer-normed), D4 = 16 * embed_dim.
        stage4: (B, D4, *grid4) the stage-4 feature map (layer-normed), for the reconstruction head.
        stage3_map: (B, D3, *grid) the stage-3 feature map (same values as ``patch_tokens``).
        patch_grid: the input patch grid ``S / patch_size`` (where ``token_mask`` lives).
    """

    cls: Tensor
    patch_tokens: Tensor
    cls_attn: Tensor
    cls_logits: Tensor
    grid: tuple[int, ...]
    pooled: Tensor
    stage4: Tensor
    stage3_map: Tensor
    patch_grid: tuple[int, ...]


class SwinCA(nn.Module):
    """Swin trunk + class-attention (SA) side branch at stage 3.

    Args:
        in_chans: input channels C.
        embed_dim: E, width of the patch embedding (stage-3 tokens are 8E wide, stage-4 16E).
        patch_size: p, patch edge (same on every axis).
        window_size: Swin window edge (same on every axis).
        depths: blocks per Swin stage (4 stages).
        num_heads: heads per Swin stage.
        ca_depth: blocks of the SA branch.
        ca_heads: heads of the SA blocks (8E must be divisible by it).
        mlp_ratio: MLP width / token width in the trunk and the SA branch.
        drop_path_rate: stochastic depth of the trunk (linearly increasing) and the SA blocks.
        spatial_dims: 3 (CT) or 2.
        img_size: the crop size the model is meant for (documentation, :meth:`example_input`);
            any size divisible by ``p * 16`` works.
        qkv_bias: bias in the attention projections.
        use_flash_attention: MONAI's fused window attention (``scaled_dot_product_attention``); MONAI
            uses it only when autograd is off (teacher, validation), the student keeps the eager path.

    Forward: :meth:`forward_features` (full output) or ``forward(x) -> cls (B, 8E)``.
    """

    def __init__(
        self,
        in_chans: int = 1,
        embed_dim: int = 48,
        patch_size: int = 2,
        window_size: int = 4,
        depths: Sequence[int] = (2, 2, 8, 2),
        num_heads: Sequence[int] = (4, 4, 8, 16),
        ca_depth: int = 2,
        ca_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        spatial_dims: int = 3,
        img_size: int | Sequence[int] = 128,
        qkv_bias: bool = True,
        use_flash_attention: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(depths) != N_STAGES or len(num_heads) != N_STAGES:
            raise ValueError(f"depths and num_heads need {N_STAGES} entries, got {list(depths)} / {list(num_heads)}")
        if ca_depth < 1:
            raise ValueError(f"ca_depth must be >= 1, got {ca_depth}")
        self.spatial_dims = int(spatial_dims)
        self.in_chans = int(in_chans)
        self.embed_dim = int(embed_dim)
        self.patch_size = int(patch_size)
        self.window_size = int(window_size)
        self.img_size = tuple(int(v) for v in ensure_tuple_rep(img_size, spatial_dims))
        self.stage3_dim = self.embed_dim * 2**STAGE3
        self.stage4_dim = self.embed_dim * 2**N_STAGES
        if self.stage3_dim % ca_heads:
            raise ValueError(f"stage-3 width {self.stage3_dim} is not divisible by ca_heads {ca_heads}")
        self.num_heads = int(ca_heads)  # heads of the attention maps (SA branch), as ViT's num_heads
        self.divisor = self.patch_size * 2**N_STAGES
        self.stage3_factor = 2**STAGE3  # input patches per stage-3 token along each axis

        self.swin = SwinTransformer(
            in_chans=in_chans,
            embed_dim=embed_dim,
            window_size=(window_size,) * spatial_dims,
            patch_size=(patch_size,) * spatial_dims,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_path_rate=drop_path_rate,
            spatial_dims=spatial_dims,
            use_flash_attention=use_flash_attention,
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.stage3_dim))
        self.ca_blocks = nn.ModuleList(
            Block(self.stage3_dim, ca_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path_rate)
            for _ in range(ca_depth)
        )
        self.ca_norm = nn.LayerNorm(self.stage3_dim, eps=1e-6)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.ca_blocks.apply(init_weights)
        self.ca_norm.apply(init_weights)

    # ------------------------------------------------------------------ geometry
    def grids(self, spatial: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(patch_grid, stage3_grid)`` for an input of spatial size ``spatial``."""
        patch = tuple(int(s) // self.patch_size for s in spatial)
        return patch, tuple(g // self.stage3_factor for g in patch)

    def example_input(self, batch: int = 1) -> Tensor:
        """A zero input of the configured ``img_size``: (batch, C, *img_size)."""
        return torch.zeros(batch, self.in_chans, *self.img_size)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 2 + self.spatial_dims or x.shape[1] != self.in_chans:
            raise DataError(
                "SwinCA input",
                f"expected shape (B, {self.in_chans}, *spatial) with {self.spatial_dims} spatial dims, "
                f"got {tuple(x.shape)}",
            )
        bad = [int(s) for s in x.shape[2:] if s % self.divisor]
        if bad:
            raise DataError(
                "SwinCA input",
                f"spatial size {tuple(x.shape[2:])} is not divisible by patch_size * 2**4 = {self.divisor} "
                "(the Swin trunk halves the grid 4 times); crop or pad the volume",
            )

    # ------------------------------------------------------------------ forward
    def embed(self, x: Tensor, token_mask: Tensor | None = None, mask_mode: str = "token") -> Tensor:
        """Patch-embed ``x`` (B, C, *S) -> (B, E, *patch_grid), masked / zeroed where ``token_mask``.

        Args:
            token_mask: (B, *patch_grid) bool, True = replace this patch embedding.
            mask_mode: ``"token"`` (learnable mask token, the student) or ``"zero"`` (patch dropout,
                the noisy teacher).
        """
        x0 = self.swin.patch_embed(x)
        if token_mask is None:
            return x0
        if mask_mode not in ("token", "zero"):
            raise ValueError(f"mask_mode must be 'token' or 'zero', got {mask_mode!r}")
        grid = tuple(x0.shape[2:])
        if tuple(token_mask.shape) != (x0.shape[0], *grid):
            raise ValueError(
                f"token_mask must be (B, *patch_grid) = {(x0.shape[0], *grid)}, got {tuple(token_mask.shape)}"
            )
        m = token_mask.to(device=x0.device, dtype=torch.bool).unsqueeze(1)  # (B, 1, *grid)
        if mask_mode == "zero":
            return x0.masked_fill(m, 0.0)
        shape = (1, self.embed_dim) + (1,) * self.spatial_dims
        return torch.where(m, self.mask_token.to(x0.dtype).reshape(shape), x0)

    def trunk(self, x0: Tensor) -> list[Tensor]:
        """The Swin stages on embedded patches (B, E, *patch_grid) -> the 5 layer-normed feature maps."""
        sw = self.swin
        x = sw.pos_drop(x0)
        feats = [sw.proj_out(x, True)]
        for layers in (sw.layers1, sw.layers2, sw.layers3, sw.layers4):
            x = layers[0](x.contiguous())
            feats.append(sw.proj_out(x, True))
        return feats

    def class_attention(self, stage3_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """SA branch on (B, N3, D3) tokens -> (cls (B, D3), cls_logits (B, H, N3)) of the last block."""
        b = stage3_tokens.shape[0]
        tokens = torch.cat([self.cls_token.expand(b, -1, -1).to(stage3_tokens.dtype), stage3_tokens], dim=1)
        heads = list(range(self.num_heads))
        logits = None
        last = len(self.ca_blocks) - 1
        for i, blk in enumerate(self.ca_blocks):
            tokens, lg = blk(tokens, cls_heads=heads if i == last else None)
            if lg is not None:
                logits = lg
        assert logits is not None
        return self.ca_norm(tokens)[:, 0], logits[..., 1:]

    def forward_features(self, x: Tensor, token_mask: Tensor | None = None, mask_mode: str = "token") -> SwinCAOutput:
        """Run trunk and SA branch.

        Args:
            x: (B, C, *S), every size divisible by ``patch_size * 16``.
            token_mask: optional (B, *patch_grid) bool, see :meth:`embed`.
            mask_mode: ``"token"`` or ``"zero"``.

        Returns:
            :class:`SwinCAOutput`.
        """
        self._check_input(x)
        patch_grid, _ = self.grids(x.shape[2:])
        feats = self.trunk(self.embed(x, token_mask, mask_mode))
        s3, s4 = feats[STAGE3], feats[STAGE3 + 1]
        grid = tuple(int(g) for g in s3.shape[2:])
        tokens = s3.flatten(2).transpose(1, 2)  # (B, N3, D3), row-major over grid
        cls, logits = self.class_attention(tokens)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        cls_logits = logits.to(dtype)
        return SwinCAOutput(
            cls=cls,
            patch_tokens=tokens,
            cls_attn=cls_logits.softmax(dim=-1),
            cls_logits=cls_logits,
            grid=grid,
            pooled=s4.flatten(2).mean(-1),
            stage4=s4,
            stage3_map=s3,
            patch_grid=patch_grid,
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, *S) -> the SA branch's CLS embedding (B, 8E)."""
        return self.forward_features(x).cls


class ReconstructionHead(nn.Module):
    """SimMIM-style linear voxel head: a 1x1(x1) convolution, then pixel shuffle back to the input grid.

    Args:
        in_dim: channels of the feature map it reads (16E for stage 4, 8E for stage 3).
        out_chans: image channels to predict.
        scale: input voxels per feature cell along each axis (``patch_size * 2**4`` for stage 4).
        spatial_dims: 3 or 2.

    ``forward(f (B, in_dim, *g)) -> (B, out_chans, *(g * scale))``. Parameters:
    ``in_dim * out_chans * scale**spatial_dims`` weights (25.2 M for 768 -> 32^3, as in the note).
    """

    def __init__(self, in_dim: int, out_chans: int = 1, scale: int = 32, spatial_dims: int = 3) -> None:
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.spatial_dims = int(spatial_dims)
        self.scale = int(scale)
        self.out_chans = int(out_chans)
        self.proj = conv(in_dim, out_chans * self.scale**spatial_dims, kernel_size=1)
        # as the linear layers of the rest of the model (timm / DINO init): small weights, zero bias, so the
        # first predictions are near 0 instead of the +-0.5 noise of PyTorch's default conv init
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, f: Tensor) -> Tensor:
        return pixelshuffle(self.proj(f), self.spatial_dims, self.scale)


@dataclass
class SmartOutput:
    """What :class:`SmartFormer` returns for one batch of views.

    Attributes:
        features: the backbone's :class:`SwinCAOutput`.
        cls_proj: (B, K) projection of the SA branch's CLS token (AITD).
        global_proj: (B, K) projection of the average-pooled stage-4 token (GITD).
        patch_proj: (B, N3, K) projections of the stage-3 tokens (AMPD), or None when not asked.
        recon: (B, C, *S) voxel reconstruction (AMIP), or None when not asked.
    """

    features: SwinCAOutput
    cls_proj: Tensor
    global_proj: Tensor
    patch_proj: Tensor | None
    recon: Tensor | None


class SmartFormer(nn.Module):
    """SMARTFormer network: :class:`SwinCA` + three DINO heads + a linear reconstruction head.

    The EMA teacher is a copy of the whole module (its reconstruction head is carried along but
    not used). Heads (separate, as SMIT's default): ``cls_head`` on the SA CLS token (8E),
    ``global_head`` on the pooled stage-4 token (16E), ``patch_head`` on every stage-3 token (8E),
    all :class:`medspan.models.heads.DINOHead` (``last_layer`` frozen in the first epoch by the
    trainer); ``recon_head`` a :class:`ReconstructionHead` reading stage 4 (DAGMaN) or stage 3.

    Args:
        backbone: the :class:`SwinCA`.
        out_dim: prototypes K of every DINO head (8192 in SMIT / iBOT).
        head_hidden_dim, head_bottleneck_dim, head_nlayers: DINOHead MLP sizes (2048 / 256 / 3).
        recon_stage: 4 (DAGMaN: stage-4 map, scale ``patch * 16``) or 3 (scale ``patch * 8``).

    Example:
        >>> net = SmartFormer(build_swin_ca("tiny"), out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16)
        >>> out = net(torch.randn(2, 1, 64, 64, 64))
        >>> out.cls_proj.shape, out.patch_proj.shape, out.recon.shape
        (torch.Size([2, 64]), torch.Size([2, 64, 64]), torch.Size([2, 1, 64, 64, 64]))
    """

    def __init__(
        self,
        backbone: SwinCA,
        out_dim: int = 8192,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        head_nlayers: int = 3,
        recon_stage: int = 4,
        head_use_bn: bool = False,
    ) -> None:
        super().__init__()
        if recon_stage not in (3, 4):
            raise ValueError(f"recon_stage must be 3 or 4, got {recon_stage}")
        self.backbone = backbone
        d3, d4 = backbone.stage3_dim, backbone.stage4_dim
        kw = {
            "out_dim": out_dim,
            "hidden_dim": head_hidden_dim,
            "bottleneck_dim": head_bottleneck_dim,
            "nlayers": head_nlayers,
            "use_bn": bool(head_use_bn),
        }
        self.cls_head = DINOHead(d3, **kw)
        self.global_head = DINOHead(d4, **kw)
        self.patch_head = DINOHead(d3, **kw)
        self.recon_stage = int(recon_stage)
        scale = backbone.patch_size * 2 ** (N_STAGES if recon_stage == 4 else STAGE3)
        self.recon_head = ReconstructionHead(
            d4 if recon_stage == 4 else d3, backbone.in_chans, scale, backbone.spatial_dims
        )
        self.out_dim = int(out_dim)

    def forward(
        self,
        x: Tensor,
        token_mask: Tensor | None = None,
        mask_mode: str = "token",
        patch: bool = True,
        recon: bool = True,
    ) -> SmartOutput:
        """Views (B, C, *S) -> :class:`SmartOutput` (``token_mask``/``mask_mode`` as :meth:`SwinCA.embed`)."""
        f = self.backbone.forward_features(x, token_mask, mask_mode)
        patch_proj = None
        if patch:
            b, n, d = f.patch_tokens.shape
            patch_proj = self.patch_head(f.patch_tokens.reshape(b * n, d)).reshape(b, n, -1)
        rec = None
        if recon:
            rec = self.recon_head(f.stage4 if self.recon_stage == 4 else f.stage3_map)
        return SmartOutput(
            features=f,
            cls_proj=self.cls_head(f.cls),
            global_proj=self.global_head(f.pooled),
            patch_proj=patch_proj,
            recon=rec,
        )


SWIN_CA_PRESETS: dict[str, dict] = {
    # DAGMaN / SMIT-10k "Swin-small": 10.6 M trunk parameters, 128^3 crops at 2 mm, stage-3 grid 8^3
    "small": {
        "embed_dim": 48,
        "patch_size": 2,
        "window_size": 4,
        "depths": (2, 2, 8, 2),
        "num_heads": (4, 4, 8, 16),
        "ca_depth": 2,
        "ca_heads": 6,
        "img_size": 128,
    },
    # trains on a 2-core CPU in minutes: 64^3 crops, stage-3 grid 4^3 (64 tokens of 96-d), 0.45 M trunk parameters
    "tiny": {
        "embed_dim": 12,
        "patch_size": 2,
        "window_size": 4,
        "depths": (2, 2, 2, 2),
        "num_heads": (1, 2, 4, 8),
        "ca_depth": 2,
        "ca_heads": 6,
        "img_size": 64,
    },
}


def build_swin_ca(name: str, **kwargs) -> SwinCA:
    """Build a :class:`SwinCA` by preset name (:data:`SWIN_CA_PRESETS`); keyword arguments override it.

    Example:
        >>> build_swin_ca("small").stage3_dim, build_swin_ca("tiny", spatial_dims=2, img_size=64).spatial_dims
        (384, 2)
    """
    if name not in SWIN_CA_PRESETS:
        raise ValueError(f"unknown SwinCA preset {name!r}; choose one of {sorted(SWIN_CA_PRESETS)}")
    cfg = dict(SWIN_CA_PRESETS[name])
    cfg.update(kwargs)
    return SwinCA(**cfg)
