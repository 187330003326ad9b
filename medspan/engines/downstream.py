"""The supervised half of the 2D pipeline: what the ``cxr_seg`` and ``cxr_cls`` bundles compose.

The bundles train with MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator`` and its handlers; this
module holds the pieces MONAI does not have:

- :func:`fraction_entries`: the training entries of a label fraction (nested and patient-wise, fixed
  by seed: :func:`medspan.data.splits.label_fraction_subsets`). The bundles draw a fixed number of
  samples per epoch from it (``hparams::samples_per_epoch``), so every fraction trains for the same
  number of steps.
- :func:`eval_section` / :func:`eval_entries`: the section a run is scored on (``test``, else
  ``validation``).
- :class:`SelectLabelsd`: the chosen columns of a multi-hot ``labels`` list as a float ``label``.
- :func:`cached_features`: CLS features of a frozen encoder, computed once (linear probe).
- :class:`BestModel`: keeps the best validation weights (``best_model.pt``) across a resume.
- :class:`NonFiniteLossCheck`: stops training at the first non-finite loss, naming the batch.
- :func:`cosine_lambda`: warm-up + cosine factor per iteration for ``LambdaLR``.
- :class:`DownstreamReport`: scores the best weights on the evaluation section and writes
  ``final_summary.json`` (the contract :mod:`medspan.workflows.downstream` reads) and ``model.pt``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import MapTransform
from torch import nn

from medspan.data.datalist import load_datalist, read_datalist_json
from medspan.data.splits import label_fraction_subsets
from medspan.engines.checkpoint import atomic_torch_save
from medspan.errors import DataError, TrainingError
from medspan.eval.classification import multilabel_auc
from medspan.eval.segmentation import attention_masks, segmentation_metrics
from medspan.io import json_plain, write_json_atomic

__all__ = [
    "MODES",
    "BestModel",
    "ClassificationScore",
    "DownstreamReport",
    "NonFiniteLossCheck",
    "SegmentationScore",
    "SelectLabelsd",
    "ZeroLabelScore",
    "cached_features",
    "case_mean_ci",
    "check_mode",
    "choice_section",
    "class_names",
    "cosine_lambda",
    "entry_labels",
    "eval_entries",
    "eval_section",
    "fraction_entries",
    "predict",
    "pretrained_identity",
    "validation_entries",
]

logger = logging.getLogger("medspan")


# ---------------------------------------------------------------------------------------------- data
def fraction_entries(
    datalist: str | os.PathLike,
    fraction: float = 1.0,
    seed: int = 0,
    require: Sequence[str] = ("image",),
    patient_key: str = "patient_id",
) -> list[dict[str, Any]]:
    """The training entries of a label fraction: whole patients, nested across fractions, fixed by seed.

    Raises:
        DataError: the datalist has no usable training entry.
    """
    entries = load_datalist(datalist, "training", require=tuple(require))
    subset = label_fraction_subsets(entries, fractions=(float(fraction),), seed=int(seed), patient_key=patient_key)
    return list(subset[float(fraction)])


def validation_entries(datalist: str | os.PathLike, require: Sequence[str] = ("image",)) -> list[dict[str, Any]]:
    """The validation entries, or ``[]`` (with one line saying what that means) when there are none.

    Without validation there is no model selection: the run trains for its whole budget and the
    final weights are scored (e.g. 5 labeled images, all used for training).
    """
    doc = read_datalist_json(datalist)
    if not doc.get("validation"):
        print(f"[medspan] {datalist}: no validation entries; no model selection or early stopping, "
              "the final weights are scored", flush=True)
        return []
    return load_datalist(datalist, "validation", require=tuple(require))


def choice_section(datalist: str | os.PathLike) -> str:
    """Where a setting is chosen: ``"validation"`` when it has entries, else ``"training"`` (never the scored section)."""
    return "validation" if read_datalist_json(datalist).get("validation") else "training"


def eval_section(datalist: str | os.PathLike) -> str:
    """``"test"`` when the datalist has a non-empty test section, else ``"validation"``."""
    doc = read_datalist_json(datalist)
    return "test" if doc.get("test") else "validation"


def eval_entries(datalist: str | os.PathLike, require: Sequence[str] = ("image",)) -> list[dict[str, Any]]:
    """The entries of :func:`eval_section`."""
    return load_datalist(datalist, eval_section(datalist), require=tuple(require))


def class_names(datalist: str | os.PathLike, classes: Sequence[str] | None = None) -> tuple[list[str], list[int]]:
    """The chosen class names and their columns in the datalist's ``classes`` (all when ``classes`` is None).

    Raises:
        DataError: the datalist has no ``classes`` list, or a chosen class is not in it.
    """
    doc = read_datalist_json(datalist)
    known = doc.get("classes")
    if not isinstance(known, list) or not known:
        raise DataError(datalist, "no top-level 'classes' list: a classification datalist names its label columns")
    chosen = list(known) if classes is None else list(classes)
    missing = [c for c in chosen if c not in known]
    if missing:
        raise DataError(datalist, f"classes {missing} are not in its 'classes' {known}")
    return chosen, [known.index(c) for c in chosen]


MODES = ("linear", "finetune")
"""Classification modes: a linear layer on the frozen encoder's features, or the whole network."""


def check_mode(mode: str) -> str:
    """``mode`` when it is one of :data:`MODES`, else ValueError naming them."""
    if mode not in MODES:
        raise ValueError(f"hparams::mode must be one of {list(MODES)}, got {mode!r}")
    return mode


def entry_labels(entries: Sequence[Mapping[str, Any]], columns: Sequence[int], key: str = "labels") -> torch.Tensor:
    """The chosen label columns of datalist entries as a float32 tensor (N, K) (e.g. for positive weights)."""
    return torch.tensor([[float(e[key][c]) for c in columns] for e in entries], dtype=torch.float32).reshape(
        len(entries), len(columns))


class SelectLabelsd(MapTransform):
    """``data[key]`` (multi-hot list over the datalist's classes) -> ``data[out_key]``: float32 (K,) of ``columns``.

    Raises:
        DataError: the entry's labels are missing, too short, or not 0/1 (naming the image).
    """

    def __init__(self, columns: Sequence[int], key: str = "labels", out_key: str = "label") -> None:
        super().__init__(keys=[key])
        self.columns = [int(c) for c in columns]
        self.key, self.out_key = key, out_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        where = str(d.get("image_path") or getattr(d.get("image"), "meta", {}).get("filename_or_obj", "entry"))
        raw = d.get(self.key)
        if raw is None:
            raise DataError(where, f"no '{self.key}' (the label columns) in this entry")
        arr = np.asarray(raw, dtype=np.float32).reshape(-1)
        if arr.size <= max(self.columns):
            raise DataError(where, f"'{self.key}' has {arr.size} values, column {max(self.columns)} was asked for")
        sel = arr[self.columns]
        if not np.isin(sel, (0.0, 1.0)).all():
            raise DataError(where, f"'{self.key}' must be 0/1 (uncertain labels need a policy first), got {sel.tolist()}")
        d[self.out_key] = torch.from_numpy(sel.copy())
        return d


@torch.no_grad()
def cached_features(
    encoder: nn.Module,
    dataset: Sequence[Mapping[str, Any]],
    device: torch.device | str = "cpu",
    batch_size: int = 32,
) -> list[dict[str, torch.Tensor]]:
    """Features of a frozen encoder for every item of ``dataset`` (each ``{"image": (C, H, W), "label": (K,)}``).

    ``encoder.features(x)`` when the module has it (a :class:`~medspan.models.classifier.ViTClassifier`:
    its pooled features), else ``encoder(x)`` (a ViT: the CLS token).

    Returns:
        ``[{"image": (D,) float32 feature, "label": (K,)}]`` in dataset order: a linear probe then
        trains on these instead of running the encoder every step.
    """
    was_training = encoder.training
    encoder.eval()
    out: list[dict[str, torch.Tensor]] = []
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            x = torch.stack([torch.as_tensor(it["image"]).float() for it in items]).to(device)
            feats = (encoder.features(x) if hasattr(encoder, "features") else encoder(x)).float().cpu()
            if not torch.isfinite(feats).all():
                raise TrainingError("the encoder gave non-finite features (broken weights or input)")
            out.extend({"image": f.as_subclass(torch.Tensor), "label": torch.as_tensor(it["label"]).float()}
                       for f, it in zip(feats, items))
    finally:
        encoder.train(was_training)
    return out


# ------------------------------------------------------------------------------------------- training
def cosine_lambda(total_steps: int, warmup_steps: int = 0, final_factor: float = 0.01) -> Callable[[int], float]:
    """Factor of the base learning rate at step ``i``: linear warm-up, then cosine down to ``final_factor``.

    Example:
        >>> f = cosine_lambda(10, warmup_steps=2, final_factor=0.0)
        >>> [round(f(i), 3) for i in (0, 1, 2, 6, 10)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    total, warm = max(1, int(total_steps)), max(0, int(warmup_steps))

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        t = min(1.0, (i - warm) / max(1, total - warm))
        return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


class NonFiniteLossCheck:
    """Stop training with a :class:`~medspan.errors.TrainingError` at the first non-finite loss.

    Attached to a MONAI ``SupervisedTrainer`` (``engine.state.output["loss"]``). The step that made
    the loss non-finite has updated the weights, but :class:`~medspan.engines.checkpoint.EpochCheckpoint`
    refuses to save non-finite weights, so the last checkpoint stays the one to resume from.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        loss = out[0]["loss"] if isinstance(out, list) else out["loss"]
        value = float(torch.as_tensor(loss).detach().float())
        if not math.isfinite(value):
            raise TrainingError(
                f"non-finite loss ({value}) at epoch {engine.state.epoch}, iteration {engine.state.iteration}: "
                "lower hparams::lr or check the input images; the last checkpoint is unchanged"
            )


class BestModel:
    """Keep the weights of the best validation score in ``best_model.pt`` (atomic), across a resume.

    Attached to the validation evaluator. The best score so far lives in ``best_model.json`` next to
    the weights, so a resumed run only replaces them with better ones.

    Args:
        output_dir: the run folder.
        network: the trained network (DDP wrappers are unwrapped).
        metric_name: the evaluator metric to maximise (the evaluator's epoch, which MONAI's
            ``ValidationHandler`` sets to the trainer's, is recorded with it).
        resume: False forgets an earlier best (a fresh run).
    """

    def __init__(self, output_dir: str | os.PathLike, network: nn.Module, metric_name: str,
                 resume: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.network = network
        self.metric_name = metric_name
        self.weights = self.output_dir / "best_model.pt"
        self.record_path = self.output_dir / "best_model.json"
        if not resume:
            for p in (self.weights, self.record_path):
                p.unlink(missing_ok=True)

    def best(self) -> dict[str, Any] | None:
        """``{"metric", "value", "epoch"}`` of the kept weights, or None."""
        try:
            rec = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return None
        return rec if self.weights.exists() else None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        value = engine.state.metrics.get(self.metric_name)
        if value is None or not math.isfinite(float(value)):
            return
        prev = self.best()
        if prev is not None and float(value) <= float(prev["value"]):
            return
        epoch = int(engine.state.epoch)
        state = getattr(self.network, "module", self.network).state_dict()
        atomic_torch_save(state, self.weights, what="the best validation weights",
                          kept="The previous best weights are unchanged.")
        write_json_atomic({"metric": self.metric_name, "value": float(value), "epoch": epoch}, self.record_path)
        logger.info("best %s %.4f at epoch %d -> %s", self.metric_name, float(value), epoch, self.weights)


# --------------------------------------------------------------------------------------------- report
class DownstreamReport:
    """Score the best weights on the evaluation section; write ``final_summary.json`` and ``model.pt``.

    ``final_summary.json`` follows the contract read by ``medspan compare``
    (:mod:`medspan.workflows.downstream`): ``task``, ``key_metric``, ``key_value``, ``key_ci``,
    ``eval_section``, ``encoder_name``, ``pretrained``, ``label_fraction``, ``n_train``,
    ``n_train_patients``, ``seed``, ``mode``, ``identity``, ``hparams``, ``report`` (the full metric
    report) and ``load_report`` (what the pretrained weights gave).

    Args:
        output_dir: the run folder.
        task: ``"segmentation"`` or ``"classification"``.
        score: callable ``() -> report dict`` holding ``key_metric`` value under ``key_metric`` (and
            optionally ``key_metric_ci``); it runs the network on the evaluation data.
        key_metric: ``"mean_dice"`` or ``"mean_auc"``.
        network: the trained network (its best weights are loaded back before scoring).
        export: the module written as ``model.pt`` (default ``network``); e.g. the whole classifier
            when only its head was trained on cached features.
        best: the :class:`BestModel` of the run (None: the final weights are scored).
        train_entries: the label-fraction entries the run trained on (before repetition).
        format_table: callable ``(report) -> str`` printed after writing.
        extra: more fields for the summary (encoder name, pretrained, fraction, seed, mode, identity,
            hparams, load_report, eval_section...).
        enabled: False on DDP ranks other than 0.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        task: str,
        score: Callable[[], Mapping[str, Any]],
        key_metric: str,
        network: nn.Module,
        best: BestModel | None = None,
        export: nn.Module | None = None,
        train_entries: Sequence[Mapping[str, Any]] = (),
        format_table: Callable[[Mapping[str, Any]], str] | None = None,
        extra: Mapping[str, Any] | None = None,
        patient_key: str = "patient_id",
        enabled: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.task = task
        self.score = score
        self.key_metric = key_metric
        self.network = network
        self.best = best
        self.export = export
        self.train_entries = list(train_entries)
        self.format_table = format_table
        self.extra = dict(extra or {})
        self.patient_key = patient_key
        self.enabled = bool(enabled)
        self.record: dict[str, Any] | None = None

    def write(self) -> dict[str, Any] | None:
        """Load the best weights (if any), score, export ``model.pt``, write and print the summary."""
        if not self.enabled:
            return None
        net = getattr(self.network, "module", self.network)
        best = self.best.best() if self.best is not None else None
        if best is not None:
            net.load_state_dict(torch.load(self.best.weights, map_location="cpu", weights_only=True))
        report = dict(self.score())
        value = report.get(self.key_metric)
        patients = {str(e.get(self.patient_key, e.get("image"))) for e in self.train_entries}
        record: dict[str, Any] = {
            "task": self.task,
            "key_metric": self.key_metric,
            "key_value": None if value is None else float(value),
            "key_ci": report.get(f"{self.key_metric}_ci", report.get("mean_ci")),
            "n_train": len(self.train_entries),
            "n_train_patients": len(patients),
            "best_validation": best,
            **self.extra,
            "report": report,
        }
        exported = getattr(self.export, "module", self.export) if self.export is not None else net
        atomic_torch_save(exported.state_dict(), self.output_dir / "model.pt", what="the exported weights",
                          kept="An earlier export, if any, is unchanged.")
        write_json_atomic(json_plain(record), self.output_dir / "final_summary.json")
        self.record = record
        if self.format_table is not None:
            print(self.format_table(report), flush=True)
        ci = record["key_ci"]
        ci_text = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
        shown = "undefined (see the table)" if record["key_value"] is None else f"{record['key_value']:.4f}"
        print(
            f"[medspan] {self.task}: {self.key_metric} {shown}{ci_text} on "
            f"{self.extra.get('eval_section', 'the evaluation set')}, {record['n_train']} training images; "
            f"summary in {self.output_dir / 'final_summary.json'}",
            flush=True,
        )
        return record


# --------------------------------------------------------------------------------------------- scores
@torch.no_grad()
def predict(
    network: nn.Module,
    dataset: Sequence[Mapping[str, Any]],
    device: torch.device | str = "cpu",
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid outputs and labels of ``network`` over ``dataset`` (items ``{"image", "label"}``).

    Returns:
        ``(probabilities (N, K, ...), labels (N, K, ...))`` on the CPU, float32.
    """
    was_training = network.training
    network.eval()
    probs, labels = [], []
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            x = torch.stack([torch.as_tensor(it["image"]).float().as_subclass(torch.Tensor) for it in items])
            logits = network(x.to(device)).float().cpu()
            if not torch.isfinite(logits).all():
                raise TrainingError("the network gave non-finite outputs on the evaluation data")
            probs.append(torch.sigmoid(logits))
            labels.append(torch.stack([torch.as_tensor(it["label"]).float().as_subclass(torch.Tensor) for it in items]))
    finally:
        network.train(was_training)
    if not probs:
        raise DataError("<evaluation data>", "no evaluation images")
    return torch.cat(probs), torch.cat(labels)


def case_mean_ci(report: Mapping[str, Any], structures: Sequence[str], n_boot: int = 1000, seed: int = 0,
                 ci: float = 0.95) -> list[float] | None:
    """Bootstrap interval (over cases) of the mean Dice of a :func:`segmentation_metrics` report.

    Each case's value is its Dice averaged over the structures where it is defined; cases are
    resampled with replacement ``n_boot`` times (fixed by ``seed``) and the percentile interval of
    the resampled means is returned (None with fewer than 2 cases).
    """
    per = [report["structures"][s]["dice_per_case"] for s in structures]
    cases = []
    for values in zip(*per):
        vals = [v for v in values if v is not None]
        if vals:
            cases.append(sum(vals) / len(vals))
    if len(cases) < 2:
        return None
    x = np.asarray(cases, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(int(n_boot), len(x)))].mean(1)
    a = (1.0 - ci) / 2.0
    return [float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))]


class SegmentationScore:
    """``() -> report``: Dice and HD95 per structure of ``network`` on ``dataset`` (threshold 0.5).

    The report is :func:`medspan.eval.segmentation.segmentation_metrics`' (``mean_dice`` and per structure).
    """

    def __init__(self, network: nn.Module, dataset: Sequence[Mapping[str, Any]], structures: Sequence[str],
                 device: torch.device | str = "cpu", batch_size: int = 8, threshold: float = 0.5,
                 seed: int = 0) -> None:
        self.network, self.dataset, self.structures = network, dataset, list(structures)
        self.device, self.batch_size, self.threshold = device, int(batch_size), float(threshold)
        self.seed = int(seed)

    def __call__(self) -> dict[str, Any]:
        probs, labels = predict(self.network, self.dataset, self.device, self.batch_size)
        report = dict(segmentation_metrics(probs > self.threshold, labels > 0.5, self.structures))
        report["mean_dice_ci"] = case_mean_ci(report, self.structures, seed=self.seed)
        return report


class ClassificationScore:
    """``() -> report``: per-class AUC with bootstrap intervals and the mean AUC on ``dataset``."""

    def __init__(self, network: nn.Module, dataset: Sequence[Mapping[str, Any]], classes: Sequence[str],
                 device: torch.device | str = "cpu", batch_size: int = 32, min_positives: int = 5,
                 n_boot: int = 1000, seed: int = 0) -> None:
        self.network, self.dataset, self.classes = network, dataset, list(classes)
        self.device, self.batch_size = device, int(batch_size)
        self.min_positives, self.n_boot, self.seed = int(min_positives), int(n_boot), int(seed)

    def __call__(self) -> dict[str, Any]:
        probs, labels = predict(self.network, self.dataset, self.device, self.batch_size)
        return dict(multilabel_auc(probs, labels, self.classes, min_positives=self.min_positives,
                                   n_boot=self.n_boot, seed=self.seed))


def pretrained_identity(pretrained: str | os.PathLike | None) -> dict[str, Any]:
    """``{"pretrained": absolute path or None, "pretrained_sha256": digest of the weights file}``.

    A run folder's weights are its ``model.pt``. Part of a downstream run's identity: a checkpoint
    or a finished comparison cell is reused only for the same pretrained weights.

    Raises:
        DataError: the path does not exist, or a run folder has no ``model.pt``.
    """
    if pretrained in (None, "", "none", "None"):
        return {"pretrained": None, "pretrained_sha256": None}
    path = Path(pretrained)
    weights = path / "model.pt" if path.is_dir() else path
    if not weights.is_file():
        raise DataError(weights, "pretrained weights not found (give a pretraining run folder with model.pt, or a .pt file)")
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"pretrained": str(path.resolve()), "pretrained_sha256": h.hexdigest()}


class ZeroLabelScore:
    """``() -> report``: segmentation straight from the prior-guided heads of a pretraining run, no label used.

    Each structure's mask is its assigned head's CLS->patch attention (last block), upsampled to the
    image and thresholded by attention mass (:func:`medspan.eval.segmentation.attention_masks`). The
    one setting, the mass, is CHOSEN on the validation section (the training section when there is
    no validation; best mean Dice over ``masses``) and the report is on the evaluation section, so no
    image both picks the threshold and is scored.

    Args:
        encoder: the pretrained ViT.
        head_of: structure -> its assigned head (from the run's ``head_structures``).
        structures: the structures to segment (each must have a head).
        choose_dataset / eval_dataset: items ``{"image": (1, H, W), "label": (S, H, W)}``.
        masses: candidate attention masses.
        choose_section: the section ``choose_dataset`` comes from (recorded).
    """

    def __init__(self, encoder: nn.Module, head_of: Mapping[str, int], structures: Sequence[str],
                 choose_dataset: Sequence[Mapping[str, Any]], eval_dataset: Sequence[Mapping[str, Any]],
                 masses: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                 device: torch.device | str = "cpu", batch_size: int = 8, choose_section: str = "validation") -> None:
        missing = [s for s in structures if s not in head_of]
        if missing:
            raise DataError("<pretraining run>", f"no prior-guided head for {missing} (head_structures: {dict(head_of)})")
        self.encoder, self.structures = encoder, list(structures)
        self.heads = [int(head_of[s]) for s in self.structures]
        self.choose_dataset, self.eval_dataset = choose_dataset, eval_dataset
        self.masses = [float(m) for m in masses]
        self.device, self.batch_size = device, int(batch_size)
        self.choose_section = choose_section

    @torch.no_grad()
    def maps(self, dataset: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(maps (N, S, gx, gy) of the assigned heads, labels (N, S, H, W))``."""
        self.encoder.eval()
        maps, labels = [], []
        for start in range(0, len(dataset), self.batch_size):
            items = [dataset[i] for i in range(start, min(start + self.batch_size, len(dataset)))]
            x = torch.stack([torch.as_tensor(it["image"]).float().as_subclass(torch.Tensor) for it in items])
            out = self.encoder.forward_features(x.to(self.device), return_attention=True, attn_heads=self.heads)
            maps.append(out.cls_attn.float().cpu().reshape(x.shape[0], len(self.heads), *out.grid))
            labels.append(torch.stack([torch.as_tensor(it["label"]).float().as_subclass(torch.Tensor) for it in items]))
        if not maps:
            raise DataError("<evaluation data>", "no images")
        return torch.cat(maps), torch.cat(labels)

    def _score(self, maps: torch.Tensor, labels: torch.Tensor, mass: float) -> dict[str, Any]:
        pred = attention_masks(maps, tuple(labels.shape[-2:]), mass=mass)
        return dict(segmentation_metrics(pred, labels > 0.5, self.structures))

    def __call__(self) -> dict[str, Any]:
        cmaps, clabels = self.maps(self.choose_dataset)
        choice = {m: float(self._score(cmaps, clabels, m)["mean_dice"]) for m in self.masses}
        mass = max(self.masses, key=lambda m: (choice[m], -abs(m - 0.6)))
        emaps, elabels = self.maps(self.eval_dataset)
        report = self._score(emaps, elabels, mass)
        report["mean_dice_ci"] = case_mean_ci(report, self.structures)
        report.update(mass=mass, mass_chosen_on=self.choose_section, validation_dice_by_mass=choice,
                      heads=dict(zip(self.structures, self.heads)))
        return report
