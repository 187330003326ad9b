"""Image classification on a (pretrained) ViT, and layer-wise learning-rate decay for fine-tuning.

* :class:`ViTClassifier` -- encoder + dropout + linear head over the CLS token (or CLS and the mean
  patch token). ``freeze_encoder=True`` is the linear probe: the encoder gets no gradient, runs
  without autograd and stays in eval mode (no drop-path) even when the model is put in training.
* :func:`layer_decay_param_groups` -- optimizer groups for fine-tuning with layer-wise lr decay
  (BEiT / MAE): the deeper a block, the larger its learning rate; the head learns at ``base_lr``.
  Works for any model with an ``encoder`` attribute (this classifier, :class:`~medspan.models.unetr.ViTUNETR`)
  or a bare :class:`~medspan.models.vit.VisionTransformer`.

Example:
    >>> from medspan.models.vit import build_vit
    >>> clf = ViTClassifier(build_vit("vit_toy"), num_classes=5, pool="cls+mean")
    >>> clf(torch.randn(2, 1, 64, 64)).shape, clf.features(torch.randn(2, 1, 64, 64)).shape
    (torch.Size([2, 5]), torch.Size([2, 192]))
    >>> groups = layer_decay_param_groups(clf, base_lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    >>> opt = torch.optim.AdamW(groups)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from medspan.models.vit import VisionTransformer, init_weights

__all__ = ["POOLS", "ViTClassifier", "layer_decay_param_groups", "layer_id"]

POOLS = ("cls", "cls+mean")
"""Feature pooling of :class:`ViTClassifier`: the normed CLS token, or CLS concatenated with the mean patch token."""


class ViTClassifier(nn.Module):
    """A ViT encoder with a linear classification head.

    Args:
        encoder: the ViT (2D or 3D).
        num_classes: K, number of logits (multi-label: one per finding).
        pool: ``"cls"`` -> features (B, D): the CLS token after the final norm; ``"cls+mean"`` ->
            (B, 2D): CLS concatenated with the mean of the (normed) patch tokens.
        freeze_encoder: linear probe. The encoder's parameters get ``requires_grad=False``, its
            forward runs under ``torch.no_grad`` and it stays in eval mode after ``.train()``.
        dropout: dropout on the features before the linear head.

    ``forward(x (B, C, *spatial)) -> logits (B, K)``; ``features(x) -> (B, F)``;
    ``forward_head(features (B, F)) -> (B, K)`` (e.g. on cached linear-probe features).

    Attributes:
        encoder, head (``nn.Linear(F, K)``, truncated-normal init std 0.02, zero bias),
        num_features (F).
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        num_classes: int,
        pool: str = "cls",
        freeze_encoder: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.encoder = encoder
        self.pool = pool
        self.freeze_encoder = bool(freeze_encoder)
        self.num_classes = int(num_classes)
        self.num_features = int(encoder.embed_dim) * (2 if pool == "cls+mean" else 1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.num_features, self.num_classes)
        init_weights(self.head)
        if self.freeze_encoder:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> ViTClassifier:
        """Set training mode; a frozen encoder stays in eval mode."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        """(B, C, *spatial) -> pooled features (B, F), F = D (``cls``) or 2D (``cls+mean``)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            out = self.encoder.forward_features(x)
        if self.pool == "cls":
            return out.cls
        return torch.cat([out.cls, out.patch_tokens.mean(dim=1)], dim=-1)

    def forward_head(self, features: Tensor) -> Tensor:
        """Pooled features (B, F) -> logits (B, K)."""
        return self.head(self.dropout(features))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, *spatial) -> logits (B, K)."""
        return self.forward_head(self.features(x))


def _encoder_of(model: nn.Module) -> tuple[VisionTransformer, str]:
    """The ViT inside ``model`` and the prefix of its parameter names (``"encoder."`` or ``""``)."""
    if isinstance(model, VisionTransformer):
        return model, ""
    enc = getattr(model, "encoder", None)
    if isinstance(enc, VisionTransformer):
        return enc, "encoder."
    raise ValueError(
        f"{type(model).__name__} is neither a VisionTransformer nor a model with a VisionTransformer "
        "as its `encoder` attribute"
    )


def layer_id(name: str, depth: int) -> int:
    """Layer of an encoder parameter (name relative to the encoder) for layer-wise lr decay.

    0: ``patch_embed.*``, ``cls_token``, ``pos_embed``; ``i + 1``: ``blocks.i.*``; ``depth + 1``:
    everything else (the final ``norm``), like the head.

    Example:
        >>> layer_id("pos_embed", 4), layer_id("blocks.2.attn.qkv.weight", 4), layer_id("norm.weight", 4)
        (0, 3, 5)
    """
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def _no_weight_decay(name: str, p: Tensor) -> bool:
    return p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in ("pos_embed", "cls_token")


def layer_decay_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    layer_decay: float,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise learning-rate decay (BEiT / MAE fine-tuning).

    Scales (``depth`` = number of encoder blocks): the head (every parameter outside ``encoder``)
    and the encoder's final norm 1; block i (0-based) ``layer_decay ** (depth - i)``;
    ``patch_embed``, ``cls_token``, ``pos_embed`` ``layer_decay ** (depth + 1)``. No weight decay for
    biases, 1-D parameters (norm weights) and ``pos_embed`` / ``cls_token``. Only parameters with
    ``requires_grad`` are included (a frozen encoder gives head groups only).

    Args:
        model: a :class:`VisionTransformer`, or a model whose ``encoder`` attribute is one
            (:class:`ViTClassifier`, :class:`~medspan.models.unetr.ViTUNETR`).
        base_lr: learning rate of the head.
        weight_decay: weight decay of the decayed groups.
        layer_decay: per-layer factor in (0, 1]; 1 disables the decay.

    Returns:
        groups in order of layer (0 .. depth+1), decayed before not decayed, each
        ``{"params", "param_names", "lr": base_lr * lr_scale, "lr_scale", "weight_decay",
        "layer_id"}``; groups without weight decay also carry ``"no_decay": True`` (as
        :func:`medspan.engines.step.param_groups`). A scheduler should set ``lr = value * lr_scale``.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    encoder, prefix = _encoder_of(model)
    depth = int(encoder.depth)
    enc_ids = {id(p) for p in encoder.parameters()}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in enc_ids:
            rel = name.removeprefix(prefix)
            lid = layer_id(rel, depth)
            no_wd = _no_weight_decay(rel, p)
        else:
            lid = depth + 1
            no_wd = _no_weight_decay(name, p)
        key = (lid, no_wd)
        if key not in groups:
            scale = float(layer_decay) ** (depth + 1 - lid)
            groups[key] = {
                "params": [],
                "param_names": [],
                "lr": float(base_lr) * scale,
                "lr_scale": scale,
                "weight_decay": 0.0 if no_wd else float(weight_decay),
                "layer_id": lid,
            }
            if no_wd:
                groups[key]["no_decay"] = True
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]
