"""Projection heads and the multi-crop wrapper for DINO-style self-distillation.

* :class:`DINOHead`: MLP -> L2 normalise -> weight-normalised linear layer (DINO).
* :class:`MultiCropWrapper`: runs the backbone once per resolution group of crops (like DINO)
  and the head once on all CLS tokens; optionally hands back the :class:`ViTOutput` of the
  first group (the global crops) so the SPAN loss can use its ``cls_attn`` without a second
  forward pass.

Example:
    >>> from medspan.models.vit import build_vit
    >>> vit = build_vit("vit_toy", depth=1)
    >>> model = MultiCropWrapper(vit, DINOHead(96, out_dim=128, hidden_dim=64, bottleneck_dim=32))
    >>> crops = [torch.randn(2, 1, 64, 64)] * 2 + [torch.randn(2, 1, 32, 32)] * 4
    >>> out, glob = model(crops, return_attention=True)
    >>> out.shape, glob.cls_attn.shape          # 6 crops x B=2 rows; 2 global crops x B rows
    (torch.Size([12, 128]), torch.Size([4, 6, 64]))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from medspan.models.vit import ViTOutput

__all__ = ["DINOHead", "MultiCropWrapper"]


class DINOHead(nn.Module):
    """DINO projection head.

    ``x (B, in_dim) -> MLP (nlayers Linear, GELU between, optional BatchNorm) -> (B, bottleneck_dim)
    -> L2-normalise -> weight-normalised Linear (no bias) -> (B, out_dim)``.

    The last layer is ``torch.nn.utils.parametrizations.weight_norm`` over its rows
    (``weight = g * v / ||v||``); with ``norm_last_layer=True`` the magnitude ``g`` is filled with 1
    and frozen (``requires_grad=False``), so every prototype row has unit norm. The layer is
    exposed as ``self.last_layer`` (DINO freezes it during the first epoch).

    Args:
        in_dim: backbone width D.
        out_dim: number of prototypes K.
        hidden_dim: MLP hidden width.
        bottleneck_dim: MLP output width.
        nlayers: number of MLP Linear layers (>= 1).
        use_bn: BatchNorm1d after each hidden Linear.
        norm_last_layer: freeze the weight-norm magnitude at 1.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(int(nlayers), 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), dim=0)
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        if norm_last_layer:
            g.requires_grad_(False)
        self.out_dim = int(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_dim) -> (B, out_dim)."""
        x = self.mlp(x)
        x = nn.functional.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops of possibly different resolutions.

    Crops with the same spatial shape are concatenated along the batch and sent through the
    backbone together (one pass per resolution; groups in order of first appearance), the head
    runs once on all CLS tokens, and the rows are returned **in crop order**: rows
    ``[k*B:(k+1)*B]`` belong to ``crops[k]`` (when all crops have batch B).

    Args:
        backbone: a module with ``forward_features(x, return_attention=..., attn_heads=...) ->
            ViTOutput`` (e.g. :class:`~medspan.models.vit.VisionTransformer`). A plain module
            returning (B, D) also works when ``return_attention`` is False.
        head: maps (M, D) -> (M, K), e.g. :class:`DINOHead`.

    ``forward(crops, return_attention=False, attn_heads=None)``:
        crops: list of (B_k, C, *spatial_k) tensors (a single tensor counts as one crop).
        Returns (sum_k B_k, K); with ``return_attention=True`` returns ``(out, first)`` where
        ``first`` is the backbone's :class:`ViTOutput` for the group that holds ``crops[0]``
        (the global crops), computed with ``return_attention=True, attn_heads=attn_heads``.
        Its rows follow the order of the crops of that group.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def _features(self, x: Tensor, return_attention: bool, attn_heads: Sequence[int] | None) -> ViTOutput | Tensor:
        if hasattr(self.backbone, "forward_features"):
            return self.backbone.forward_features(x, return_attention=return_attention, attn_heads=attn_heads)
        if return_attention:
            raise TypeError(f"{type(self.backbone).__name__} has no forward_features; cannot return attention")
        return self.backbone(x)

    def forward(
        self,
        crops: Sequence[Tensor] | Tensor,
        return_attention: bool = False,
        attn_heads: Sequence[int] | None = None,
    ) -> Tensor | tuple[Tensor, ViTOutput]:
        if isinstance(crops, Tensor):
            crops = [crops]
        crops = list(crops)
        if not crops:
            raise ValueError("MultiCropWrapper needs at least one crop")
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, c in enumerate(crops):
            groups.setdefault(tuple(c.shape[1:]), []).append(k)

        feats: list[Tensor] = []
        order: list[int] = []
        first: ViTOutput | None = None
        for gi, members in enumerate(groups.values()):
            x = torch.cat([crops[k] for k in members], dim=0)
            want = return_attention and gi == 0
            out = self._features(x, want, attn_heads if want else None)
            if isinstance(out, ViTOutput):
                if gi == 0:
                    first = out
                out = out.cls
            feats.append(out)
            order.extend(members)
        proj = self.head(torch.cat(feats, dim=0))
        if order != sorted(order):
            sizes = [crops[k].shape[0] for k in order]
            chunks = dict(zip(order, torch.split(proj, sizes, dim=0)))
            proj = torch.cat([chunks[k] for k in range(len(crops))], dim=0)
        if return_attention:
            assert first is not None
            return proj, first
        return proj
