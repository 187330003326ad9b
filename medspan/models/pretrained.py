"""Encoders for downstream tasks: from scratch, or with the weights of a pretraining run.

A pretraining run folder (what ``python -m monai.bundle run --config_file bundles/span_cxr/train.json``
writes, e.g. ``bundles/span_cxr/runs/span_cxr``) holds

* ``model.pt`` -- the teacher ViT's state dict (``ExportWeights``), and
* ``final_summary.json`` -- whose ``hparams`` give the architecture: ``model`` (a
  :data:`~medspan.models.vit.VIT_PRESETS` name), ``in_chans``, ``global_size`` (the ``img_size`` the
  ViT was built with) and ``head_structures`` (the prior-guided heads; not guided when ``baseline``).

:func:`resolve_pretrained` reads such a folder (or a bare weights file, whose architecture then comes
from the caller) into a :class:`PretrainedSpec`; :func:`build_encoder` builds the ViT at the
fine-tuning image size and loads the weights through :func:`load_encoder_weights`, which

* recognises a DINO student / ``MultiCropWrapper`` checkpoint (keys ``backbone.*``; the other keys,
  the DINO head, are set aside as ``ignored``) and DDP / ``torch.compile`` prefixes (``module.``,
  ``_orig_mod.``), and strips them;
* fails (:class:`WeightsError`) on a missing or unexpected key unless it matches an allowed pattern
  (``fnmatch``), and on a shape mismatch other than ``pos_embed``;
* resizes ``pos_embed`` to the model's patch grid with :func:`~medspan.models.vit.resize_pos_embed`
  (bicubic in 2D, the rule of ``VisionTransformer.interpolate_pos_embed``); an embedding of the same
  grid is copied bit-exactly;
* logs one line (logger ``"medspan"``) of what was loaded, missing, unexpected and interpolated.

Example::

    encoder, report = build_encoder("bundles/span_cxr/runs/span_cxr", img_size=128)
    # medspan: bundles/span_cxr/runs/span_cxr/model.pt: loaded 64 tensors; interpolated pos_embed 8x8 -> 16x16; ...
    encoder, report = build_encoder(None, model="vit_toy", img_size=128)       # scratch, report None
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medspan.errors import DataError
from medspan.models.vit import (
    VIT_PRESETS,
    VisionTransformer,
    build_vit,
    resize_pos_embed,
)

__all__ = [
    "ARCH_KEYS",
    "LoadReport",
    "PretrainedSpec",
    "WeightsError",
    "build_encoder",
    "load_encoder_weights",
    "read_state_dict",
    "resolve_pretrained",
]

logger = logging.getLogger("medspan")

WEIGHTS_FILE = "model.pt"
SUMMARY_FILE = "final_summary.json"
ARCH_KEYS = ("in_chans", "patch_size", "embed_dim", "depth", "num_heads")
"""Architecture keys of :attr:`PretrainedSpec.arch` that an explicit argument must not contradict."""
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_BACKBONE = "backbone."


class WeightsError(DataError):
    """Weights that do not fit the model: missing / unexpected keys, or a shape mismatch.

    Args:
        where: the weights file (or a description of the source).
        problem: what does not fit, in words (the keys, the shapes).
    """


@dataclass
class PretrainedSpec:
    """Where a pretrained encoder's weights are and what architecture they belong to.

    Attributes:
        weights: the weights file (``model.pt``).
        arch: ``{"model", "in_chans", "img_size", "patch_size", "embed_dim", "depth", "num_heads"}``
            of the run (``img_size`` = the pretraining ``global_size``), or None when unknown (a bare
            weights file, or a folder without ``final_summary.json``).
        head_structures: ``{head: structure}`` of the prior-guided heads, or None (unknown, or a
            plain-DINO baseline run, whose heads were not guided).
        run_dir: the run folder, or None for a bare weights file.
        hparams: the run's recorded hyper-parameters, or None.
        baseline: True for a plain-DINO baseline run, None when unknown.
    """

    weights: Path
    arch: dict[str, Any] | None
    head_structures: dict[int, str] | None
    run_dir: Path | None
    hparams: dict[str, Any] | None = None
    baseline: bool | None = None

    @property
    def pos_grid(self) -> tuple[int, int] | None:
        """The pretraining patch grid ``(img_size // patch_size,) * 2``, or None when unknown."""
        if self.arch is None:
            return None
        return (self.arch["img_size"] // self.arch["patch_size"],) * 2


@dataclass
class LoadReport:
    """What :func:`load_encoder_weights` did.

    Attributes:
        missing: model keys the checkpoint lacked (all allowed; they keep their initialisation).
        unexpected: checkpoint keys the model has no place for (all allowed; not loaded).
        interpolated: keys resized to the model (``["pos_embed"]`` or ``[]``).
        loaded: number of tensors copied into the model.
        ignored: keys of a wrapper checkpoint outside its ``backbone.`` (e.g. the DINO head).
        source: the weights file (or description) they came from.
    """

    missing: list[str]
    unexpected: list[str]
    interpolated: list[str]
    loaded: int
    ignored: list[str] = field(default_factory=list)
    source: str = ""


# ---------------------------------------------------------------------------------- resolve
def _arch_from_hparams(hparams: Mapping[str, Any], summary: Path) -> dict[str, Any]:
    name = hparams.get("model")
    if not isinstance(name, str):
        raise DataError(summary, "hparams has no 'model' (the ViT preset name); cannot tell the architecture")
    if name not in VIT_PRESETS:
        raise DataError(
            summary,
            f"hparams model {name!r} is not a 2D ViT preset ({sorted(VIT_PRESETS)}); only ViT runs "
            "(e.g. span_cxr) can be loaded as encoders here",
        )
    arch: dict[str, Any] = {"model": name, **VIT_PRESETS[name]}
    size = hparams.get("global_size", hparams.get("img_size", arch["img_size"]))
    try:
        arch["in_chans"] = int(hparams.get("in_chans", 1))
        arch["img_size"] = int(size)
    except (TypeError, ValueError) as e:
        raise DataError(summary, f"hparams in_chans / global_size are not integers ({e})") from None
    return arch


def resolve_pretrained(source: str | os.PathLike) -> PretrainedSpec:
    """Find the weights and the architecture of a pretraining run folder or a weights file.

    Args:
        source: a run folder (``model.pt`` + ``final_summary.json``) or a weights file (``.pt``;
            the architecture is then unknown: ``arch`` None).

    Raises:
        DataError: ``source`` does not exist; a folder without ``model.pt``; a ``final_summary.json``
            that is not readable JSON, has no ``hparams``, or names no 2D ViT preset. A folder with
            ``model.pt`` but no summary is accepted (``arch`` None).
    """
    path = Path(source).expanduser()
    if path.is_file():
        return PretrainedSpec(weights=path, arch=None, head_structures=None, run_dir=None)
    if not path.is_dir():
        raise DataError(path, "no such pretraining run folder or weights file")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(
            path,
            f"no {WEIGHTS_FILE} in this folder; give a pretraining run folder (it holds {WEIGHTS_FILE} "
            f"and {SUMMARY_FILE} when the run finished) or the weights file itself",
        )
    summary = path / SUMMARY_FILE
    if not summary.is_file():
        logger.info("%s: no %s; the encoder architecture comes from the arguments", path, SUMMARY_FILE)
        return PretrainedSpec(weights=weights, arch=None, head_structures=None, run_dir=path)
    try:
        record = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(summary, f"not readable JSON ({type(e).__name__}: {e})") from None
    hparams = record.get("hparams") if isinstance(record, dict) else None
    if not isinstance(hparams, dict):
        raise DataError(summary, "no 'hparams' object; cannot tell the encoder's architecture")
    arch = _arch_from_hparams(hparams, summary)
    baseline = record.get("baseline")
    baseline = None if baseline is None else bool(baseline)
    heads = hparams.get("head_structures")
    head_structures: dict[int, str] | None = None
    if isinstance(heads, Mapping) and not baseline:
        try:
            head_structures = {int(h): str(s) for h, s in heads.items()}
        except (TypeError, ValueError):
            raise DataError(summary, f"hparams head_structures {heads!r}: keys must be head numbers") from None
    return PretrainedSpec(
        weights=weights, arch=arch, head_structures=head_structures, run_dir=path, hparams=dict(hparams),
        baseline=baseline,
    )


# ---------------------------------------------------------------------------------- load
def _is_state(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict (on CPU) from a weights file.

    Accepts a plain state dict, or a checkpoint dict holding one under ``state_dict``, ``model`` or
    ``teacher`` (tried in that order).

    Raises:
        DataError: the file is not a readable PyTorch file or holds no state dict.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise DataError(path, f"not a readable PyTorch weights file ({type(e).__name__}: {e})") from None
    if _is_state(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "teacher"):
            if _is_state(obj.get(key)):
                return dict(obj[key])
    raise DataError(path, f"holds no state dict (a mapping of names to tensors); found {type(obj).__name__}")


def _strip(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Strip wrapper prefixes; keep a ``backbone.`` part. Returns (state, ignored keys)."""
    ignored: list[str] = []
    changed = True
    while changed and state:
        changed = False
        for pre in _WRAPPER_PREFIXES:
            if all(k.startswith(pre) for k in state):
                state = {k[len(pre):]: v for k, v in state.items()}
                changed = True
        if any(k.startswith(_BACKBONE) for k in state):
            ignored += [k for k in state if not k.startswith(_BACKBONE)]
            state = {k[len(_BACKBONE):]: v for k, v in state.items() if k.startswith(_BACKBONE)}
            changed = True
    return state, ignored


def _source_grid(pos: Tensor, model: VisionTransformer, source_grid: Sequence[int] | None) -> tuple[int, ...] | None:
    if source_grid is not None:
        return tuple(int(g) for g in source_grid)
    n = int(pos.shape[1]) - 1
    dims = model.spatial_dims
    side = round(n ** (1.0 / dims))
    for s in (side - 1, side, side + 1):
        if s > 0 and s**dims == n:
            return (s,) * dims
    return None


def _short(keys: Sequence[str], limit: int = 20) -> str:
    keys = list(keys)
    return str(keys) if len(keys) <= limit else f"{keys[:limit]} ... ({len(keys)} in all)"


def load_encoder_weights(
    model: VisionTransformer,
    state: Mapping[str, Tensor],
    *,
    source: str = "",
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
    source_grid: Sequence[int] | None = None,
) -> LoadReport:
    """Load a pretrained state dict into ``model``, strictly, resizing the position embedding.

    Args:
        model: the encoder, built at the fine-tuning size.
        state: a ViT state dict, or that of a DINO student / ``MultiCropWrapper`` (``backbone.*``),
            possibly with ``module.`` / ``_orig_mod.`` prefixes.
        source: the weights file, named in the errors and the log line.
        allow_missing: ``fnmatch`` patterns of model keys that may be absent from ``state``.
        allow_unexpected: patterns of ``state`` keys (after stripping) the model may lack.
        source_grid: the checkpoint's patch grid; default: inferred from ``pos_embed`` as a square
            (cube in 3D) grid.

    Returns:
        :class:`LoadReport`.

    Raises:
        WeightsError: missing / unexpected keys not allowed (all listed), a shape mismatch (key and
            both shapes), or a ``pos_embed`` whose grid cannot be inferred; nothing is loaded then.
    """
    where = source or "pretrained weights"
    state, ignored = _strip(dict(state))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_missing = [k for k in missing if not any(fnmatch(k, p) for p in allow_missing)]
    bad_unexpected = [k for k in unexpected if not any(fnmatch(k, p) for p in allow_unexpected)]
    problems = []
    if bad_missing:
        problems.append(f"missing key(s) {_short(bad_missing)} (the model has them, the weights do not; "
                        "allow with allow_missing=[patterns])")
    if bad_unexpected:
        problems.append(f"unexpected key(s) {_short(bad_unexpected)} (in the weights, not in the model; "
                        "allow with allow_unexpected=[patterns])")

    new: dict[str, Tensor] = {}
    interpolated: list[str] = []
    note = ""
    for key, value in state.items():
        if key not in own:
            continue
        target = own[key].shape
        if key == "pos_embed" and value.ndim == 3 and value.shape[-1] == target[-1]:
            grid = _source_grid(value, model, source_grid)
            if grid is None or 1 + math.prod(grid) != value.shape[1]:
                why = (f"does not fit the patch grid {grid} (+1 CLS)" if grid is not None
                       else "cannot tell its patch grid (not square); pass source_grid")
                problems.append(f"pos_embed {tuple(value.shape)}: {why}")
                continue
            if grid != model.pos_grid:
                with torch.no_grad():
                    value = resize_pos_embed(value.float(), grid, model.pos_grid).to(value.dtype)
                interpolated.append(key)
                note = f"; interpolated pos_embed {'x'.join(map(str, grid))} -> {'x'.join(map(str, model.pos_grid))}"
        if value.shape != target:
            problems.append(f"shape mismatch for {key}: weights {tuple(value.shape)}, model {tuple(target)}")
            continue
        new[key] = value
    if problems:
        raise WeightsError(where, "; ".join(problems))
    model.load_state_dict(new, strict=False)
    report = LoadReport(missing=missing, unexpected=unexpected, interpolated=interpolated, loaded=len(new),
                        ignored=ignored, source=where)
    logger.info(
        "%s: loaded %d tensors%s; missing (allowed) %s; unexpected (allowed) %s%s",
        where, len(new), note, _short(missing, 8), _short(unexpected, 8),
        f"; ignored {len(ignored)} non-backbone key(s)" if ignored else "",
    )
    return report


# ---------------------------------------------------------------------------------- build
def build_encoder(
    pretrained: str | os.PathLike | None,
    model: str | None = None,
    in_chans: int | None = None,
    img_size: int | Sequence[int] | None = None,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
    **vit_kwargs: Any,
) -> tuple[VisionTransformer, LoadReport | None]:
    """Build a 2D ViT encoder, from scratch or with a pretraining run's weights.

    Args:
        pretrained: None (scratch: random init), a run folder or a weights file (see
            :func:`resolve_pretrained`).
        model: ViT preset name. From a run folder the run's preset is used, and a different one
            given here is an error; otherwise default ``"vit_toy"``.
        in_chans: input channels; same rule (default 1).
        img_size: the fine-tuning image size the encoder (its position embedding) is built for;
            default the run's pretraining size, else the preset's. Weights of another grid have their
            ``pos_embed`` interpolated.
        allow_missing, allow_unexpected: ``fnmatch`` patterns (see :func:`load_encoder_weights`).
        **vit_kwargs: more :class:`VisionTransformer` arguments (e.g. ``drop_path_rate``); from a run,
            ``patch_size`` / ``embed_dim`` / ``depth`` / ``num_heads`` must agree with it.

    Returns:
        ``(encoder, report)``; ``report`` is None from scratch.

    Raises:
        ValueError: an explicit ``model`` / architecture argument contradicts the run (says which).
        DataError: see :func:`resolve_pretrained`, :func:`read_state_dict`.
        WeightsError: see :func:`load_encoder_weights`.
    """
    spec = None if pretrained is None else resolve_pretrained(pretrained)
    if spec is not None and spec.arch is not None:
        arch = spec.arch
        given = {"model": model, "in_chans": in_chans, **{k: vit_kwargs.get(k) for k in ARCH_KEYS[1:]}}
        for key, value in given.items():
            if value is not None and value != arch[key]:
                raise ValueError(
                    f"{key}={value!r} was given, but the pretraining run {spec.run_dir} has {key}={arch[key]!r} "
                    f"(from {spec.run_dir / SUMMARY_FILE}); drop the argument or give another run"
                )
        cfg = {k: arch[k] for k in ARCH_KEYS}
        cfg.update(vit_kwargs)
        name = arch["model"]
        size = arch["img_size"] if img_size is None else img_size
    else:
        name = model or "vit_toy"
        cfg = {"in_chans": 1 if in_chans is None else int(in_chans), **vit_kwargs}
        size = img_size
    if cfg.get("spatial_dims", 2) != 2:
        raise ValueError("build_encoder builds 2D ViTs only (spatial_dims=2)")
    if size is not None:
        cfg["img_size"] = size
    encoder = build_vit(name, **cfg)
    if spec is None:
        return encoder, None
    report = load_encoder_weights(
        encoder,
        read_state_dict(spec.weights),
        source=str(spec.weights),
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        source_grid=spec.pos_grid,
    )
    return encoder, report
