"""Speed of one SPAN pretraining step against plain DINO, measured side by side in one run.

What is timed is the production code: a :class:`medspan.engines.pretrain.SelfDistillationTrainer`
is built exactly as ``bundles/span_cxr/train.json`` builds it (ViT + DINO head in a
``MultiCropWrapper``, EMA teacher from ``copy_teacher``, ``DINOLoss``, ``AdamW`` over
``param_groups``, ``SpanPriorLoss`` for heads 0, 1, 2 -> structures 0, 1, 2) and its
``_iteration`` is called on a fake engine state, one full training step per call: teacher forward on
the global crops, student forward on all crops (with the last block's CLS attention when the prior
loss is on), DINO loss (+ SPAN prior loss), backward, gradient clipping, AdamW step, EMA update.

The two variants share the same student, teacher, optimizer and batch; they differ only in the
trainer's ``prior_weight`` (1.0 = SPAN, 0.0 = plain DINO, which is what the bundle's baseline run
sets). They are interleaved ABBA BAAB ... (each pair alternates which variant goes first) after
warm-up steps of both; the report gives the median step time of each, the ratio of medians with a
bootstrap 95% interval, and the ratio of the minima as a second, noise-robust estimate.

Configurations:

* ``toy``: the bundle default (vit_toy, 2 global crops 64 px, 4 local crops 32 px, batch 32,
  out_dim 4096, head hidden 512, bottleneck 128).
* ``vit_s16_224``: ViT-S/16 as DINO (2 global crops 224 px, 8 local crops 96 px, batch 8,
  out_dim 65536, head hidden 2048, bottleneck 256). Its SPAN step time is also reported in seconds
  per step and images per second (one image = one batch item with its 10 crops).

The batch is random: crops ~ N(0, 1), priors (B, 2, 3, G, G) smooth random maps in [0, 1]
(uniform noise on a 4 x 4 grid, bilinearly upsampled). It is kept on the host, as a DataLoader
hands it over, so the copy to the device (priors included for SPAN) is part of the step.

Usage::

    python benchmarks/bench_span_step.py                 # both configs, prints the report
    python benchmarks/bench_span_step.py --update-readme # ... and updates benchmarks/README.md
    python benchmarks/bench_span_step.py --quick         # smoke check: tiny sizes, few steps, nothing written
    python benchmarks/bench_span_step.py --device cuda --amp   # bf16 autocast on a GPU
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _table import markdown_table, merge_rows, parse_table, read_section, update_section  # noqa: E402

SECTION = "span_step"
TARGET_RATIO = 1.05
HEAD_TO_STRUCTURE = {0: 0, 1: 1, 2: 2}  # the bundle's left lung, right lung, heart on heads 0..2
N_STRUCTURES = 3
N_GLOBAL = 2


@dataclass(frozen=True)
class BenchConfig:
    """One model/batch setting.

    Attributes:
        name: label used in the report and as the README row key.
        model: :func:`medspan.models.vit.build_vit` preset; ``model_kwargs`` override it.
        global_size, local_size: crop sizes in pixels (square, single channel).
        n_local: number of local crops (2 global crops always).
        batch: batch size B (images; each has 2 + n_local crops).
        out_dim, hidden_dim, bottleneck_dim: :class:`medspan.models.heads.DINOHead` widths.
        steps: timed steps per variant.
        warmup: untimed steps per variant before timing.
    """

    name: str
    model: str
    global_size: int
    local_size: int
    n_local: int
    batch: int
    out_dim: int
    hidden_dim: int
    bottleneck_dim: int
    steps: int
    warmup: int
    model_kwargs: dict = field(default_factory=dict)

    def describe(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.model_kwargs.items())
        return (
            f"{self.model}{extra}, B={self.batch}, 2x{self.global_size}px + {self.n_local}x{self.local_size}px, "
            f"head {self.hidden_dim}/{self.bottleneck_dim}/{self.out_dim}"
        )


def make_configs(quick: bool, device: torch.device, steps: int | None = None) -> list[BenchConfig]:
    """The configurations to run. ``steps`` overrides the number of timed steps per variant."""
    if quick:
        cfgs = [
            BenchConfig("toy", "vit_toy", 64, 32, 4, 4, 512, 64, 32, steps=3, warmup=1),
            BenchConfig("vit_s16", "vit_small", 32, 16, 2, 2, 1024, 128, 64, steps=3, warmup=1,
                        model_kwargs={"depth": 1}),
        ]
    else:
        cpu = device.type == "cpu"
        cfgs = [
            BenchConfig("toy", "vit_toy", 64, 32, 4, 32, 4096, 512, 128, steps=30, warmup=3),
            # ViT-S/16 with DINO's 65536 prototypes: ~10 s per step on a 2-core CPU, hence 8 steps there (~3 min)
            BenchConfig("vit_s16_224", "vit_small", 224, 96, 8, 8, 65536, 2048, 256,
                        steps=8 if cpu else 30, warmup=1 if cpu else 5),
        ]
    if steps is not None:
        cfgs = [BenchConfig(**{**asdict(c), "steps": int(steps)}) for c in cfgs]
    return cfgs


# ---------------------------------------------------------------------------------------------- setup
def make_batch(cfg: BenchConfig, seed: int = 0) -> dict:
    """A random multi-crop batch as :class:`medspan.data.multicrop.MultiCropd` + DataLoader give it.

    Returns a dict with ``global_crops`` (B, 2, 1, G, G), ``local_crops`` (B, n_local, 1, L, L),
    ``global_priors`` (B, 2, 3, G, G) float32 on the host, and ``case_id`` (B strings).
    """
    g = torch.Generator().manual_seed(seed)
    b, gs, ls = cfg.batch, cfg.global_size, cfg.local_size
    coarse = torch.rand(b * N_GLOBAL, N_STRUCTURES, 4, 4, generator=g)
    priors = F.interpolate(coarse, size=(gs, gs), mode="bilinear", align_corners=False)
    return {
        "global_crops": torch.randn(b, N_GLOBAL, 1, gs, gs, generator=g),
        "local_crops": torch.randn(b, cfg.n_local, 1, ls, ls, generator=g),
        "global_priors": priors.reshape(b, N_GLOBAL, N_STRUCTURES, gs, gs).contiguous(),
        "case_id": [f"bench_{i:03d}" for i in range(b)],
    }


def make_trainer(cfg: BenchConfig, device: torch.device, batch: dict, amp: bool, seed: int = 0):
    """A :class:`SelfDistillationTrainer` wired like the span_cxr bundle, ready for ``_iteration``."""
    from medspan.engines.pretrain import SelfDistillationTrainer, param_groups
    from medspan.models.heads import DINOHead, MultiCropWrapper
    from medspan.models.vit import build_vit
    from medspan.losses.span import SpanPriorLoss
    from medspan.losses.dino import DINOLoss
    from medspan.ssl.teacher import copy_teacher

    torch.manual_seed(seed)
    backbone = build_vit(cfg.model, in_chans=1, img_size=cfg.global_size, **cfg.model_kwargs)
    head = DINOHead(backbone.embed_dim, out_dim=cfg.out_dim, hidden_dim=cfg.hidden_dim,
                    bottleneck_dim=cfg.bottleneck_dim)
    student = MultiCropWrapper(backbone, head).to(device)
    teacher = copy_teacher(student)
    dino_loss = DINOLoss(cfg.out_dim, N_GLOBAL + cfg.n_local, nepochs=10).to(device)
    optimizer = torch.optim.AdamW(param_groups(student), lr=1e-4)
    trainer = SelfDistillationTrainer(
        device, 1, [batch], student, teacher, dino_loss, optimizer,
        lr_schedule=1e-4, wd_schedule=0.04, momentum_schedule=0.996,
        prior_loss=SpanPriorLoss(HEAD_TO_STRUCTURE, sigma=1.0, mode="kl"), prior_weight=1.0,
        clip_grad=3.0,
        freeze_last_layer=0,  # time the full step, last layer of the head updated too
        amp=amp, epoch_length=1,
    )
    trainer.state.epoch = 1
    trainer.state.iteration = 0
    return trainer


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(trainer, batch: dict, span: bool, device: torch.device) -> tuple[float, dict]:
    """One ``_iteration`` of the given variant; returns (seconds, the step's output dict)."""
    trainer.prior_weight = 1.0 if span else 0.0
    trainer.state.iteration += 1
    gc.collect()
    _sync(device)
    t0 = time.perf_counter()
    out = trainer._iteration(trainer, batch)
    _sync(device)
    dt = time.perf_counter() - t0
    out = out[0] if isinstance(out, list) else out  # MONAI's decollated convention
    if span != ("prior" in out):
        raise RuntimeError(f"variant mismatch: span={span} but step output keys are {sorted(out)}")
    return dt, out


def summarize(t_dino: Sequence[float], t_span: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """Medians, ratio of medians with a bootstrap 95% interval, ratio of minima, paired median ratio.

    Example:
        >>> s = summarize([1.0, 1.0, 1.0], [1.1, 1.1, 1.1])
        >>> round(s["ratio_median"], 3), round(s["ratio_min"], 3)
        (1.1, 1.1)
    """
    d, s = np.asarray(t_dino, float), np.asarray(t_span, float)
    rng = np.random.default_rng(seed)
    bd = np.median(d[rng.integers(0, len(d), (n_boot, len(d)))], axis=1)
    bs = np.median(s[rng.integers(0, len(s), (n_boot, len(s)))], axis=1)
    lo, hi = np.percentile(bs / bd, [2.5, 97.5])
    n = min(len(d), len(s))
    return {
        "dino_median_s": float(np.median(d)),
        "span_median_s": float(np.median(s)),
        "dino_min_s": float(d.min()),
        "span_min_s": float(s.min()),
        "ratio_median": float(np.median(s) / np.median(d)),
        "ratio_ci95": [float(lo), float(hi)],
        "ratio_min": float(s.min() / d.min()),
        "ratio_paired_median": float(np.median(s[:n] / d[:n])),
    }


def _interleaved(trainer, batch: dict, n: int, device: torch.device) -> tuple[list[float], list[float], dict]:
    """``n`` pairs of steps, DINO first in even pairs and SPAN first in odd ones (ABBA BAAB ...)."""
    t_dino: list[float] = []
    t_span: list[float] = []
    last: dict = {}
    for i in range(n):
        for span in ((False, True) if i % 2 == 0 else (True, False)):
            dt, out = timed_step(trainer, batch, span, device)
            (t_span if span else t_dino).append(dt)
            if span:
                last = out
    return t_dino, t_span, last


def run_config(cfg: BenchConfig, device: torch.device, amp: bool, log=print) -> dict:
    """Warm up, then time ``cfg.steps`` steps of each variant interleaved; returns times and summary."""
    batch = make_batch(cfg)
    trainer = make_trainer(cfg, device, batch, amp)
    n_params = sum(p.numel() for p in trainer.student.parameters())
    log(f"[{cfg.name}] {cfg.describe()}; student {n_params / 1e6:.1f} M parameters")
    # freeze what exists now, so the per-step gc.collect() (outside the timed region) stays cheap
    gc.collect()
    gc.freeze()
    try:
        t_start = time.perf_counter()
        w_dino, w_span, _ = _interleaved(trainer, batch, cfg.warmup, device)
        if w_dino:
            eta = (w_dino[-1] + w_span[-1]) * cfg.steps
            log(f"[{cfg.name}] warm-up {2 * cfg.warmup} steps in {time.perf_counter() - t_start:.1f} s; "
                f"timing {cfg.steps} steps per variant, about {eta:.0f} s")
        t_dino, t_span, last = _interleaved(trainer, batch, cfg.steps, device)
        wall = time.perf_counter() - t_start
    finally:
        del trainer
        gc.unfreeze()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not np.isfinite(last.get("loss", float("nan"))):
        raise RuntimeError(f"[{cfg.name}] non-finite loss {last}")
    summary = summarize(t_dino, t_span)
    summary["span_images_per_s"] = cfg.batch / summary["span_median_s"]
    summary["wall_s"] = wall
    return {"config": asdict(cfg), "times_dino_s": t_dino, "times_span_s": t_span, "summary": summary,
            "last_span_step": last}


# ---------------------------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    """GPU name from torch, or the CPU model from /proc/cpuinfo (platform.processor() as a fallback)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment(device: torch.device) -> dict:
    return {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------- report
HEADER = [
    "config", "device", "threads", "DINO s/step", "SPAN s/step", "SPAN/DINO (median)", "95% CI",
    "SPAN/DINO (min)", f"<= {TARGET_RATIO}", "SPAN img/s", "steps", "torch", "date", "command",
]
KEY_COLUMNS = [0, 1]


def table_rows(results: Sequence[dict], env: dict, amp: bool, command: str) -> list[list[str]]:
    dev = env["device_name"] + (" (bf16 autocast)" if amp else "")
    rows = []
    for r in results:
        s = r["summary"]
        lo, hi = s["ratio_ci95"]
        rows.append([
            r["config"]["name"], dev, str(env["threads"]), f"{s['dino_median_s']:.4g}", f"{s['span_median_s']:.4g}",
            f"{s['ratio_median']:.3f}", f"{lo:.3f}-{hi:.3f}", f"{s['ratio_min']:.3f}",
            "yes" if s["ratio_median"] <= TARGET_RATIO else "NO", f"{s['span_images_per_s']:.3g}",
            str(r["config"]["steps"]), env["torch"], env["date"].split(" ")[0], f"`{command}`",
        ])
    return rows


def print_report(results: Sequence[dict], env: dict, amp: bool) -> None:
    print()
    print(f"date {env['date']} | device {env['device']}: {env['device_name']} | threads {env['threads']} "
          f"(logical CPUs {env['logical_cpus']}) | torch {env['torch']}"
          + (f" | CUDA {env['cuda']}" if env["cuda"] else "") + (" | bf16 autocast" if amp else ""))
    for r in results:
        cfg, s = r["config"], r["summary"]
        lo, hi = s["ratio_ci95"]
        verdict = "meets" if s["ratio_median"] <= TARGET_RATIO else "MISSES"
        print(f"[{cfg['name']}] {cfg['steps']} steps per variant, {s['wall_s']:.0f} s")
        print(f"  DINO  median {s['dino_median_s'] * 1e3:9.2f} ms  min {s['dino_min_s'] * 1e3:9.2f} ms")
        print(f"  SPAN  median {s['span_median_s'] * 1e3:9.2f} ms  min {s['span_min_s'] * 1e3:9.2f} ms  "
              f"-> {s['span_images_per_s']:.3g} images/s")
        print(f"  SPAN/DINO: {s['ratio_median']:.3f} (median; bootstrap 95% CI {lo:.3f}-{hi:.3f}), "
              f"{s['ratio_min']:.3f} (min), {s['ratio_paired_median']:.3f} (median of pairs); "
              f"{verdict} the target <= {TARGET_RATIO}")


def write_readme(readme: Path, results: Sequence[dict], env: dict, amp: bool, command: str) -> None:
    """Merge this run's rows (keyed by config and device) into the README's span_step table."""
    old = read_section(readme, SECTION) or ""
    header, old_rows = parse_table(old)
    if header != HEADER:
        old_rows = []  # a different layout: start the table afresh
    rows = merge_rows(old_rows, table_rows(results, env, amp, command), KEY_COLUMNS)
    update_section(readme, SECTION, markdown_table(HEADER, rows))


# ---------------------------------------------------------------------------------------------- main
def resolve_device(name: str | None, amp: bool, threads: int | None) -> torch.device | None:
    """The benchmark device (``name``, else CUDA when present, else CPU); sets torch's thread count.

    Prints why and returns None when CUDA is asked for but absent, or ``amp`` without CUDA.
    """
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA was asked for but torch sees no GPU", file=sys.stderr)
        return None
    if amp and device.type != "cuda":
        print("--amp needs --device cuda (the trainer ignores autocast on CPU)", file=sys.stderr)
        return None
    if threads:
        torch.set_num_threads(threads)
    return device


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (smoke check; nothing written)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only; the bundle default is off)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (overrides the defaults)")
    p.add_argument("--only", choices=["toy", "vit_s16"], default=None, help="run one configuration")
    p.add_argument("--update-readme", action="store_true", help="write the rows into benchmarks/README.md")
    p.add_argument("--readme", type=Path, default=HERE / "README.md", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None, help="also write every step time and the summary here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device, args.amp, args.threads)
    if device is None:
        return 2
    if args.steps is not None and args.steps < 1:
        print("--steps must be >= 1", file=sys.stderr)
        return 2
    cfgs = make_configs(args.quick, device, args.steps)
    if args.only:
        cfgs = [c for c in cfgs if c.name.startswith(args.only)]
    env = environment(device)
    print(f"bench_span_step: {env['device_name']} ({device}), {env['threads']} threads, torch {env['torch']}, "
          f"{env['date']}" + (" [quick]" if args.quick else ""))
    results = [run_config(c, device, args.amp) for c in cfgs]
    print_report(results, env, args.amp)
    argv_used = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "benchmarks/bench_span_step.py", *argv_used])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "amp": args.amp, "command": command,
                                         "results": results}, indent=2))
        print(f"wrote {args.json}")
    if args.update_readme:
        if args.quick:
            print("--quick: results are not written to the README")
        else:
            write_readme(args.readme, results, env, args.amp, command)
            print(f"updated section '{SECTION}' of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
