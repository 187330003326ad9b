"""Throughput of the downstream chest X-ray networks: fine-tuning and inference, images per second.

What is timed is the production code, built as ``bundles/cxr_seg/train.json`` and
``bundles/cxr_cls/train.json`` build it (encoder from ``medspan.models.pretrained.build_encoder``
with no pretrained weights: the speed does not depend on the weights):

* ``cxr_seg train step``: :class:`medspan.models.unetr.ViTUNETR` (``out_channels`` 3, ``feature_size``
  16), MONAI ``DiceCELoss(sigmoid=True)``, ``AdamW`` over
  ``layer_decay_param_groups(net, 1e-3, 0.05, 0.75)``, inside a MONAI ``SupervisedTrainer`` whose
  ``_iteration`` is called once per step: copy of the batch to the device, forward, loss, backward,
  optimizer step. Batch 8 (the bundle's ``batch_size``).
* ``cxr_seg inference``: the same network in a MONAI ``SupervisedEvaluator`` (eval mode, no autograd)
  with the bundle's validation post-processing (``Activationsd`` sigmoid, ``AsDiscreted`` threshold
  0.5, per decollated item); no metric. Batch 8 (the bundle's validation batch; ``inference.json``
  runs batch 1 and writes files, which is not timed).
* ``cxr_cls fine-tune step``: :class:`medspan.models.classifier.ViTClassifier` (5 classes, CLS
  pooling), ``BCEWithLogitsLoss`` with positive weights, ``AdamW`` with layer-wise lr decay
  (5e-4, 0.05, 0.75) in a ``SupervisedTrainer``. Batch 16 (the bundle's ``batch_size``).
* ``cxr_cls inference``: the classifier in a ``SupervisedEvaluator`` with the sigmoid as
  post-processing (``Activationsd``). Batch 8 (``inference.json``'s batch).
* ``cxr_cls probe features``: the linear probe's one-off cost,
  :func:`medspan.engines.downstream.cached_features` of the frozen classifier on 32 images (its own
  batch of 32): forward of the frozen encoder, CLS features copied to the host.
* ``cxr_cls probe head step``: a training step of the linear head (``nn.Linear(D, 5)``, lr 0.01) on
  cached features in a ``SupervisedTrainer``, batch 16 (trivial; reported in steps/s too).

Batches are random but shaped like the real input (images (B, 1, S, S) uniform in [0, 1] as after
``CXRNormalized``; segmentation labels random 0/1 masks (B, 3, S, S); class labels random 0/1 (B, 5))
and stay on the host, as a DataLoader hands them over, so the copy to the device is part of a step.
Data loading and augmentation are not timed, nor the learning-rate scheduler handler.

Configurations:

* ``toy_128``: the bundles' default, ``vit_toy`` (D 96, depth 4, 6 heads, patch 8 -> 3 UNETR
  stages) at 128 px.
* ``vit_small_224``: ``vit_small`` (ViT-S/16: D 384, depth 12, 6 heads, patch 16 -> UNETR's 4
  stages, skips from blocks 3, 6, 9, 12) at 224 px. On a GPU by default; on a CPU only with
  ``--large`` (a step takes seconds there).

Every task runs in a freshly spawned process of its own (``--in-process`` to run them all in this
one), so that its peak memory is its own. Reported per task: median (and minimum) seconds per step
over the timed steps after warm-up, images per second (batch / median), steps per second, peak
memory (CPU: peak resident set size of the task's process, imports and network included, with how
much it grew during warm-up and steps; GPU: ``torch.cuda.max_memory_allocated`` over warm-up and
steps, with ``torch.cuda.synchronize`` around every timed step). No ratio is claimed here, so the
tasks run one after another, not interleaved: compare absolute numbers only between rows of the same
device.

Usage::

    python benchmarks/bench_downstream.py                         # CPU: toy_128, prints the report
    python benchmarks/bench_downstream.py --update-readme         # ... and writes its rows into benchmarks/README.md
    python benchmarks/bench_downstream.py --large --update-readme # CPU: toy_128 and vit_small_224
    python benchmarks/bench_downstream.py --device cuda --update-readme   # GPU: both configurations
    python benchmarks/bench_downstream.py --quick                 # smoke check: 64 px, 2 steps, nothing written
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import multiprocessing
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _table import markdown_table, merge_rows, parse_table, read_section, update_section
from bench_span_step import environment, resolve_device

SECTION = "downstream"
N_STRUCTURES = 3  # cxr_seg: left lung, right lung, heart
N_CLASSES = 5  # cxr_cls: cardiomegaly, nodule, effusion, pneumothorax, no_finding
SEG_LR, CLS_FT_LR, CLS_PROBE_LR = 1e-3, 5e-4, 1e-2  # the bundles' learning rates
WEIGHT_DECAY, LAYER_DECAY = 0.05, 0.75
FEATURE_SIZE = 16
HEAD_STEP_FACTOR = 10  # the linear head's step is ~1000x cheaper: 10x more steps for a stable median

TASKS: dict[str, str] = {
    "seg_train": "cxr_seg train step",
    "seg_infer": "cxr_seg inference",
    "cls_finetune": "cxr_cls fine-tune step",
    "cls_infer": "cxr_cls inference",
    "probe_features": "cxr_cls probe features",
    "probe_head": "cxr_cls probe head step",
}
"""``--only`` name -> the task as the table names it, in the order they run."""


@dataclass(frozen=True)
class Config:
    """One encoder / image size setting; every task of :data:`TASKS` runs on it.

    Attributes:
        name: row key in the README.
        model: ViT preset (:data:`medspan.models.vit.VIT_PRESETS`).
        img_size: square image edge in pixels.
        seg_batch, seg_infer_batch: cxr_seg training and inference batch sizes.
        cls_batch, cls_infer_batch, feature_batch: cxr_cls fine-tune / probe-head, inference and
            feature-extraction batch sizes.
        steps, warmup: timed and warm-up steps (the probe head step runs :data:`HEAD_STEP_FACTOR` x more).
    """

    name: str
    model: str
    img_size: int
    steps: int
    warmup: int
    seg_batch: int = 8
    seg_infer_batch: int = 8
    cls_batch: int = 16
    cls_infer_batch: int = 8
    feature_batch: int = 32


def make_configs(quick: bool, device: torch.device, large: bool, steps: int | None) -> list[Config]:
    """The configurations of this run (``--quick``: one tiny one; vit_small on a GPU or with ``large``)."""
    if quick:
        return [Config("toy_64_quick", "vit_toy", 64, steps or 2, 1, 2, 2, 4, 2, 4)]
    gpu = device.type == "cuda"
    cfgs = [Config("toy_128", "vit_toy", 128, steps or (50 if gpu else 20), 10 if gpu else 3)]
    if gpu or large:
        cfgs.append(Config("vit_small_224", "vit_small", 224, steps or (30 if gpu else 5), 5 if gpu else 1))
    return cfgs


# ---------------------------------------------------------------------------------------------- parts
@dataclass
class Measurement:
    """A ready-to-time step: ``step()`` does one step; ``batch`` images (or feature rows) per step."""

    task: str
    step: Callable[[], object]
    batch: int
    params_m: float
    what: str


def _encoder(cfg: Config):
    """The bundles' encoder: ``build_encoder(None, model, img_size=...)`` (scratch, 1 channel)."""
    from medspan.models.pretrained import build_encoder

    return build_encoder(None, model=cfg.model, img_size=cfg.img_size)[0]


def _images(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=g)


def _class_labels(n: int, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, N_CLASSES, generator=g) < 0.3).float()


def _trainer(net: torch.nn.Module, optimizer, loss, device: torch.device, batch: dict):
    """A MONAI SupervisedTrainer as the bundles wire it (SimpleInferer, no amp), on a fake epoch state."""
    from monai.engines import SupervisedTrainer
    from monai.inferers import SimpleInferer

    trainer = SupervisedTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=[batch],
        epoch_length=1,
        network=net,
        optimizer=optimizer,
        loss_function=loss,
        inferer=SimpleInferer(),
        amp=False,
    )
    trainer.state.epoch, trainer.state.iteration = 1, 0
    return trainer


def _train_step(trainer, batch: dict) -> Callable[[], object]:
    def step() -> object:
        trainer.state.iteration += 1
        return trainer._iteration(trainer, batch)

    return step


def _infer_step(net: torch.nn.Module, device: torch.device, batch: dict, postprocessing) -> Callable[[], object]:
    """One ``SupervisedEvaluator._iteration``: eval mode, no autograd, forward, decollation, post-processing."""
    from monai.engines import SupervisedEvaluator
    from monai.inferers import SimpleInferer

    ev = SupervisedEvaluator(
        device=device,
        val_data_loader=[batch],
        epoch_length=1,
        network=net,
        inferer=SimpleInferer(),
        postprocessing=postprocessing,
        amp=False,
    )
    ev.state.epoch, ev.state.iteration = 1, 0

    def step() -> object:
        ev.state.iteration += 1
        return ev._iteration(ev, batch)

    return step


def _n_params(net: torch.nn.Module) -> float:
    return sum(p.numel() for p in net.parameters()) / 1e6


def build_measurement(task: str, cfg: Config, device: torch.device, seed: int = 0) -> Measurement:
    """Network, optimizer, loss and a random host batch for ``task``, wired as the bundle does."""
    from monai.losses import DiceCELoss
    from monai.transforms import Activationsd, AsDiscreted, Compose

    from medspan.engines.downstream import cached_features
    from medspan.eval.classification import positive_weights
    from medspan.models.classifier import ViTClassifier, layer_decay_param_groups
    from medspan.models.unetr import ViTUNETR

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    s = cfg.img_size
    if task.startswith("cxr_seg"):
        net = ViTUNETR(_encoder(cfg), out_channels=N_STRUCTURES, feature_size=FEATURE_SIZE).to(device)
        what = f"ViTUNETR({cfg.model}, {net.num_stages} stages, skips {list(net.skip_layers)}), {s} px"
        if task == "cxr_seg train step":
            b = cfg.seg_batch
            masks = (torch.rand(b, N_STRUCTURES, s, s, generator=g) < 0.5).float()
            batch = {"image": _images(b, s, g), "label": masks}
            opt = torch.optim.AdamW(layer_decay_param_groups(net, SEG_LR, WEIGHT_DECAY, LAYER_DECAY), lr=SEG_LR)
            trainer = _trainer(net, opt, DiceCELoss(sigmoid=True), device, batch)
            return Measurement(task, _train_step(trainer, batch), b, _n_params(net), what)
        b = cfg.seg_infer_batch
        post = Compose([Activationsd(keys="pred", sigmoid=True), AsDiscreted(keys="pred", threshold=0.5)])
        step = _infer_step(net, device, {"image": _images(b, s, g)}, post)
        return Measurement(task, step, b, _n_params(net), what)

    if task in ("cxr_cls fine-tune step", "cxr_cls inference"):
        net = ViTClassifier(_encoder(cfg), N_CLASSES, pool="cls").to(device)
        what = f"ViTClassifier({cfg.model}, CLS, {N_CLASSES} classes), {s} px"
        if task == "cxr_cls fine-tune step":
            b = cfg.cls_batch
            labels = _class_labels(b, g)
            batch = {"image": _images(b, s, g), "label": labels}
            loss = torch.nn.BCEWithLogitsLoss(pos_weight=positive_weights(labels).to(device))
            opt = torch.optim.AdamW(layer_decay_param_groups(net, CLS_FT_LR, WEIGHT_DECAY, LAYER_DECAY), lr=CLS_FT_LR)
            trainer = _trainer(net, opt, loss, device, batch)
            return Measurement(task, _train_step(trainer, batch), b, _n_params(net), what)
        b = cfg.cls_infer_batch
        post = Compose([Activationsd(keys="pred", sigmoid=True)])
        step = _infer_step(net, device, {"image": _images(b, s, g)}, post)
        return Measurement(task, step, b, _n_params(net), what)

    clf = ViTClassifier(_encoder(cfg), N_CLASSES, pool="cls", freeze_encoder=True).to(device)
    if task == "cxr_cls probe features":
        b = cfg.feature_batch
        items = [{"image": img, "label": lab} for img, lab in zip(_images(b, s, g), _class_labels(b, g))]
        what = f"cached_features(frozen {cfg.model}), {s} px, its batch {b}"
        return Measurement(task, lambda: cached_features(clf, items, device, b), b, _n_params(clf.encoder), what)
    if task == "cxr_cls probe head step":
        b = cfg.cls_batch
        head = clf.head
        labels = _class_labels(b, g)
        batch = {"image": torch.randn(b, clf.num_features, generator=g), "label": labels}
        groups = [{"params": list(head.parameters()), "lr": CLS_PROBE_LR, "weight_decay": WEIGHT_DECAY}]
        opt = torch.optim.AdamW(groups, lr=CLS_PROBE_LR)  # the bundle's linear-probe optimizer
        loss = torch.nn.BCEWithLogitsLoss(pos_weight=positive_weights(labels).to(device))
        trainer = _trainer(head, opt, loss, device, batch)
        what = f"nn.Linear({clf.num_features}, {N_CLASSES}) on cached {cfg.model} CLS features"
        return Measurement(task, _train_step(trainer, batch), b, _n_params(head), what)
    raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS.values())}")


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (Linux /proc), NaN where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (``VmHWM``) to the current RSS; False where Linux refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_measurement(task: str, cfg: Config, device: torch.device, isolated: bool = False, log=print) -> dict:
    """Build ``task`` on ``cfg``, warm up, time the steps; returns times, throughput and peak memory.

    ``isolated``: the caller runs this in a process of its own (:func:`run_isolated`); only changes
    how the CPU peak memory is described.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    m = build_measurement(task, cfg, device)
    factor = HEAD_STEP_FACTOR if task == "cxr_cls probe head step" else 1
    warmup, steps = cfg.warmup * factor, cfg.steps * factor
    log(f"[{cfg.name}] {task}: {m.what}; batch {m.batch}; {m.params_m:.2f} M parameters; {steps} steps (+{warmup})")
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        hwm_reset = True
    else:
        hwm_reset = _reset_peak_rss()
    base_rss = _status_mb("VmRSS")
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        m.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {
        "config": asdict(cfg),
        "task": task,
        "what": m.what,
        "batch": m.batch,
        "params_m": m.params_m,
        "steps": steps,
        "warmup": warmup,
        "times_s": times,
        "median_s": med,
        "min_s": min(times),
        "images_per_s": m.batch / med,
        "steps_per_s": 1.0 / med,
    }
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["peak_note"] = "torch.cuda.max_memory_allocated"
    else:
        peak = _status_mb("VmHWM") if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        out["peak_mem_mb"] = peak
        out["peak_growth_mb"] = peak - base_rss
        if not hwm_reset:
            where = "process peak RSS so far (its high-water mark cannot be reset here)"
        elif isolated:
            where = "peak RSS of a process that runs only this task (imports and network included)"
        else:
            where = "peak RSS from the warm-up on, in one process with the tasks before"
        out["peak_note"] = f"{where}, +{peak - base_rss:.0f} MiB in warm-up and steps"
    del m
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _child(task: str, cfg: Config, device: str, threads: int | None) -> dict:
    """:func:`run_measurement` in a fresh process (the target of :func:`run_isolated`)."""
    if threads:
        torch.set_num_threads(threads)
    return run_measurement(task, cfg, torch.device(device), isolated=True)


def run_isolated(task: str, cfg: Config, device: torch.device, threads: int | None) -> dict:
    """:func:`run_measurement` in a freshly spawned process, so its peak memory is its own.

    A process's resident memory does not shrink when tensors are freed (the allocator keeps it), so
    measured one after another in one process every task after the largest would show the largest's
    peak; in its own process each task's peak covers the imports, its network and its steps only.
    """
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_child, task, cfg, str(device), threads).result()


# ---------------------------------------------------------------------------------------------- report
HEADER = [
    "config", "task", "network", "device", "threads", "batch", "s/step (median)", "s/step (min)", "images/s",
    "steps/s", "peak memory (MiB)", "what peak", "steps", "torch", "date", "command",
]
KEY_COLUMNS = [0, 1, 3]  # configuration (config + task) and device


def table_rows(results: Sequence[dict], env: dict, command: str) -> list[list[str]]:
    rows = []
    for r in results:
        rows.append(
            [
                r["config"]["name"],
                r["task"],
                r["what"],
                env["device_name"],
                str(env["threads"]),
                str(r["batch"]),
                f"{r['median_s']:.4g}",
                f"{r['min_s']:.4g}",
                f"{r['images_per_s']:.3g}",
                f"{r['steps_per_s']:.3g}",
                f"{r['peak_mem_mb']:.0f}",
                r["peak_note"],
                str(r["steps"]),
                env["torch"],
                env["date"].split(" ")[0],
                f"`{command}`",
            ]
        )
    return rows


def print_report(results: Sequence[dict], env: dict) -> None:
    print()
    print(
        f"date {env['date']} | device {env['device']}: {env['device_name']} | threads {env['threads']} "
        f"(logical CPUs {env['logical_cpus']}) | torch {env['torch']}"
        + (f" | CUDA {env['cuda']}" if env["cuda"] else "")
    )
    cols = ["config", "task", "batch", "s/step (median)", "s/step (min)", "images/s", "steps/s", "peak MiB", "steps"]
    rows = [
        [
            r["config"]["name"],
            r["task"],
            r["batch"],
            f"{r['median_s']:.4g}",
            f"{r['min_s']:.4g}",
            f"{r['images_per_s']:.3g}",
            f"{r['steps_per_s']:.3g}",
            f"{r['peak_mem_mb']:.0f}",
            r["steps"],
        ]
        for r in results
    ]
    print(markdown_table(cols, rows))


def write_readme(readme: Path, results: Sequence[dict], env: dict, command: str) -> None:
    """Merge this run's rows into the README's downstream section (keyed by config, task and device)."""
    header, old = parse_table(read_section(readme, SECTION) or "")
    rows = merge_rows(old if header == HEADER else [], table_rows(results, env, command), KEY_COLUMNS)
    update_section(readme, SECTION, markdown_table(HEADER, rows))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="64 px, tiny batches, 2 steps (smoke check; nothing written)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (torch.set_num_threads)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per task (the probe head step: 10x)")
    p.add_argument("--large", action="store_true", help="on a CPU also run vit_small_224 (slow; always on a GPU)")
    p.add_argument("--only", choices=list(TASKS), action="append", default=None, help="run only this task (repeatable)")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every task in this process (faster; a CPU peak memory then also covers the tasks before)",
    )
    p.add_argument("--update-readme", action="store_true", help="write the rows into benchmarks/README.md")
    p.add_argument("--readme", type=Path, default=HERE / "README.md", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None, help="also write every step time and the summary here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.steps is not None and args.steps < 1:
        print("--steps must be >= 1", file=sys.stderr)
        return 2
    device = resolve_device(args.device, False, args.threads)
    if device is None:
        return 2
    env = environment(device)
    print(
        f"bench_downstream: {env['device_name']} ({device}), {env['threads']} threads, torch {env['torch']}, "
        f"{env['date']}" + (" [quick]" if args.quick else "")
    )
    tasks = [label for key, label in TASKS.items() if args.only is None or key in args.only]
    results = [
        run_measurement(t, c, device) if args.in_process else run_isolated(t, c, device, args.threads)
        for c in make_configs(args.quick, device, args.large, args.steps)
        for t in tasks
    ]
    print_report(results, env)
    command = shlex.join(["python", "benchmarks/bench_downstream.py", *list(sys.argv[1:] if argv is None else argv)])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "command": command, "results": results}, indent=2))
        print(f"wrote {args.json}")
    if args.update_readme:
        if args.quick:
            print("--quick: results are not written to the README")
        else:
            write_readme(args.readme, results, env, command)
            print(f"updated section '{SECTION}' of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
