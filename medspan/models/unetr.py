"""A UNETR-style segmentation network on a (pretrained) 2D :class:`~medspan.models.vit.VisionTransformer`.

MONAI's :class:`monai.networks.nets.UNETR` builds its own ViT with 16-px patches and 12 blocks
and decodes the outputs of blocks 3, 6, 9 (1-based) and the final (normed) tokens. This module
keeps its composition, from MONAI's blocks (``UnetrBasicBlock``, ``UnetrPrUpBlock``,
``UnetrUpBlock``, ``UnetOutBlock``), around an encoder that is given (e.g. the teacher of a SPAN
pretraining run) and generalises it to the encoder's patch size and depth.

Scheme, for patch size ``P = 2**S`` (``S >= 2``; UNETR's 16-px patches give ``S = 4``):

* level 0 (full resolution): ``UnetrBasicBlock`` on the input image -> ``feature_size`` channels;
* level k = 1 .. S-1 (resolution H / 2**k): the tokens of skip ``k-1`` reshaped to the patch grid
  (H / P) and brought up by ``UnetrPrUpBlock`` with ``S-1-k`` extra upsamplings (one transposed
  conv plus ``num_layer = S-1-k``) -> ``feature_size * 2**k`` channels;
* bottleneck (resolution H / P): the tokens of the last skip, ``embed_dim`` channels;
* decoder: ``S`` ``UnetrUpBlock`` (transposed conv x2, concatenate the level's skip, conv block)
  from level S-1 down to 0, then ``UnetOutBlock`` (1x1 conv) -> ``out_channels`` logits.

So exactly ``S`` encoder blocks are tapped (``skip_layers``, shallow to deep; the last one feeds the
bottleneck). Default: evenly spaced, ending at the last block, ``skip_layers[j] = ceil((j+1) * depth
/ S) - 1``: depth 12, S 4 -> ``[2, 5, 8, 11]`` (UNETR's blocks 3, 6, 9, 12 counted from 1); depth 4,
S 4 -> ``[0, 1, 2, 3]``; depth 4, S 3 (patch 8) -> ``[1, 2, 3]``; depth 2, S 4 -> ``[0, 0, 1, 1]``
(an encoder shallower than the decoder taps a block twice). Skip tokens are taken before the
encoder's final LayerNorm, except a bottleneck from the LAST block, which is the encoder's normed
output as in MONAI's UNETR.

Example:
    >>> import torch
    >>> from medspan.models.vit import build_vit
    >>> net = ViTUNETR(build_vit("vit_toy"), out_channels=4)       # patch 8 -> 3 stages, skips [1, 2, 3]
    >>> net(torch.randn(2, 1, 64, 96)).shape
    torch.Size([2, 4, 64, 96])
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.blocks import (
    UnetOutBlock,
    UnetrBasicBlock,
    UnetrPrUpBlock,
    UnetrUpBlock,
)
from torch import Tensor, nn

from medspan.models.vit import VisionTransformer

__all__ = ["ViTUNETR", "default_skip_layers"]


def default_skip_layers(depth: int, n_skips: int) -> list[int]:
    """``n_skips`` block indices (0-based) evenly spaced over ``depth`` blocks, ending at the last.

    ``ceil((j+1) * depth / n_skips) - 1`` for ``j = 0 .. n_skips-1`` (non-decreasing; repeats when
    ``depth < n_skips``).

    Example:
        >>> default_skip_layers(12, 4), default_skip_layers(4, 3), default_skip_layers(2, 4)
        ([2, 5, 8, 11], [1, 2, 3], [0, 0, 1, 1])
    """
    if depth < 1 or n_skips < 1:
        raise ValueError(f"depth and n_skips must be >= 1, got {depth} and {n_skips}")
    return [-(-(j + 1) * depth // n_skips) - 1 for j in range(n_skips)]


class ViTUNETR(nn.Module):
    """UNETR-style decoder over the intermediate tokens of a 2D ViT (see the module docstring).

    Args:
        encoder: a 2D :class:`VisionTransformer` whose patch size is a power of two >= 4.
        out_channels: number of output channels (classes).
        feature_size: channels at full resolution; level k has ``feature_size * 2**k``.
        skip_layers: the ``log2(patch_size)`` encoder blocks tapped, shallow to deep (entry 0 feeds
            the highest-resolution token skip, the last the bottleneck); default
            :func:`default_skip_layers`.
        norm_name: normalisation of MONAI's blocks (``"instance"``, ``"batch"``, ...).
        res_block: residual conv blocks (MONAI's ``res_block``).

    Input (B, C, H, W) with C = ``encoder.in_chans`` and H, W divisible by the patch size (any
    size: the encoder interpolates its position embedding) -> logits (B, out_channels, H, W).

    Attributes:
        encoder: the ViT (its parameters are the "encoder" for layer-wise lr decay).
        skip_layers: the tapped blocks, a tuple.
        num_stages: ``log2(patch_size)``, the number of x2 upsampling stages.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        out_channels: int,
        feature_size: int = 16,
        skip_layers: Sequence[int] | None = None,
        norm_name: str = "instance",
        res_block: bool = True,
    ) -> None:
        super().__init__()
        if getattr(encoder, "spatial_dims", None) != 2:
            raise ValueError(f"ViTUNETR needs a 2D encoder, got spatial_dims={getattr(encoder, 'spatial_dims', None)}")
        p = int(encoder.patch_size)
        if p < 4 or p & (p - 1):
            raise ValueError(f"ViTUNETR needs a patch size that is a power of two >= 4, got {p}")
        stages = p.bit_length() - 1
        depth = int(encoder.depth)
        if skip_layers is None:
            skips = default_skip_layers(depth, stages)
        else:
            skips = list(skip_layers)
            if len(skips) != stages:
                raise ValueError(
                    f"skip_layers {skips} must list {stages} blocks (log2 of patch size {p}: one per decoder stage)"
                )
            if any(isinstance(i, bool) or not hasattr(i, "__index__") or not 0 <= i < depth for i in skips):
                raise ValueError(f"skip_layers {skips} must be block indices in [0, {depth})")
            skips = [int(i) for i in skips]
        if out_channels < 1 or feature_size < 1:
            raise ValueError(f"out_channels and feature_size must be >= 1, got {out_channels} and {feature_size}")

        self.encoder = encoder
        self.skip_layers = tuple(skips)
        self.num_stages = stages
        self.out_channels = int(out_channels)
        d = int(encoder.embed_dim)
        fs = int(feature_size)

        # level 0: the image itself (UNETR's encoder1)
        self.image_block = UnetrBasicBlock(
            spatial_dims=2, in_channels=int(encoder.in_chans), out_channels=fs, kernel_size=3, stride=1,
            norm_name=norm_name, res_block=res_block,
        )
        # levels 1 .. S-1: tokens of skip k-1, up by 2**(S-k) (UNETR's encoder2..4)
        self.skip_blocks = nn.ModuleList(
            UnetrPrUpBlock(
                spatial_dims=2, in_channels=d, out_channels=fs * 2**k, num_layer=stages - 1 - k, kernel_size=3,
                stride=1, upsample_kernel_size=2, norm_name=norm_name, conv_block=True, res_block=res_block,
            )
            for k in range(1, stages)
        )
        # decoder, level S-1 down to 0 (UNETR's decoder5..2)
        self.up_blocks = nn.ModuleList(
            UnetrUpBlock(
                spatial_dims=2, in_channels=d if k == stages - 1 else fs * 2 ** (k + 1), out_channels=fs * 2**k,
                kernel_size=3, upsample_kernel_size=2, norm_name=norm_name, res_block=res_block,
            )
            for k in range(stages - 1, -1, -1)
        )
        self.out = UnetOutBlock(spatial_dims=2, in_channels=fs, out_channels=out_channels)

    @staticmethod
    def _to_grid(tokens: Tensor, grid: tuple[int, ...]) -> Tensor:
        """(B, N, D) tokens in row-major grid order -> (B, D, *grid)."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> logits (B, out_channels, H, W)."""
        out = self.encoder.forward_features(x, return_layers=self.skip_layers)
        feats = list(out.hidden or [])
        if self.skip_layers[-1] == self.encoder.depth - 1:
            feats[-1] = out.patch_tokens  # the last block's output after the final norm, as MONAI's UNETR
        skips = [self.image_block(x)]
        skips += [blk(self._to_grid(t, out.grid)) for blk, t in zip(self.skip_blocks, feats[:-1])]
        y = self._to_grid(feats[-1], out.grid)
        for up, skip in zip(self.up_blocks, reversed(skips)):
            y = up(y, skip)
        return self.out(y)

