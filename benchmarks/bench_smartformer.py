"""SMARTFormer pretraining cost: step time and peak memory, and FLOPs per sample.

What is timed is the production code: a :class:`medspan.engines.smart.SmartTrainer` built as
``bundles/smartformer_ct/train.json`` builds it (``SmartFormer`` = ``SwinCA`` + three ``DINOHead`` +
linear reconstruction head, EMA teacher from ``copy_teacher``, three ``DistillCE``, ``AdamW`` over
``param_groups``, attention-guided ``MaskingPolicy`` 0.7 / 0.1, teacher ``PatchDropout`` 0.7). Its
``_iteration`` is called on a fake engine state, one full step per call: noisy teacher forward on both
views, attention-guided mask, student forward on the masked view, the four losses, backward,
clipping, AdamW step, EMA update, centre updates. The last layers of the heads are not frozen.

Measurements:

* ``tiny_64`` (the bundle default: ``tiny`` preset, 64^3 crops, batch 4, heads 1024 / 256 / 64,
  reconstruction from stage 3): median
  seconds per step, samples per second, peak memory (CPU: the process's peak resident set size and
  its growth over the steps; GPU: ``torch.cuda.max_memory_allocated``).
* ``small_128`` (the DAGMaN encoder: ``small`` preset, 128^3 crops, heads 8192 / 2048 / 256 as SMIT,
  reconstruction from stage 4 as DAGMaN, batch 2): the same, on a GPU only (a CPU step takes minutes);
  ``--amp`` for bf16 autocast.
* FLOPs per sample (batch 1) at ``small`` / 128^3 and ``tiny`` / 64^3, counted with
  :class:`torch.utils.flop_counter.FlopCounterMode` on the **meta device** (shapes only, no arithmetic,
  a few seconds on any machine): encoder forward (trunk + SA branch), student forward with all heads,
  student backward, teacher forward on the two views (no reconstruction head), and their sum = one
  training sample. Matmuls and convolutions count (2 FLOPs per multiply-add); norms, softmax and
  activations do not. MONAI's eager window attention is counted (the fused path is the same math).

Usage::

    python benchmarks/bench_smartformer.py                         # CPU: tiny step + FLOPs, prints the report
    python benchmarks/bench_smartformer.py --update-readme         # ... and writes its rows into benchmarks/README.md
    python benchmarks/bench_smartformer.py --device cuda --amp --update-readme   # GPU: tiny and small, bf16
    python benchmarks/bench_smartformer.py --quick                 # smoke check: 32^3, 2 steps, nothing written
    python benchmarks/bench_smartformer.py --flops-only --update-readme   # FLOP table only (no timing)
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _table import markdown_table, merge_rows, parse_table, read_section, update_section  # noqa: E402
from bench_span_step import environment, resolve_device  # noqa: E402

SECTION = "smartformer"


@dataclass(frozen=True)
class StepConfig:
    """One model / batch setting of the step benchmark.

    Attributes:
        name: row key in the README.
        model: :func:`medspan.models.swin_ca.build_swin_ca` preset.
        crop: cubic crop edge in voxels.
        batch: volumes per step (each gives 2 views).
        out_dim, hidden_dim, bottleneck_dim: DINOHead widths.
        steps, warmup: timed and warm-up steps.
    """

    name: str
    model: str
    crop: int
    batch: int
    out_dim: int
    hidden_dim: int
    bottleneck_dim: int
    steps: int
    warmup: int
    recon_stage: int = 3

    def describe(self) -> str:
        return (
            f"{self.model}, {self.crop}^3 crops x 2 views, batch {self.batch}, heads "
            f"{self.hidden_dim} / {self.bottleneck_dim} / {self.out_dim}, reconstruction from stage {self.recon_stage}"
        )


def make_configs(quick: bool, device: torch.device, steps: int | None) -> list[StepConfig]:
    if quick:
        return [StepConfig("tiny_32_quick", "tiny", 32, 2, 64, 32, 16, steps or 2, 1, 3)]
    gpu = device.type == "cuda"
    cfgs = [StepConfig("tiny_64", "tiny", 64, 4, 1024, 256, 64, steps or (30 if gpu else 8), 5 if gpu else 2, 3)]
    if gpu:
        cfgs.append(StepConfig("small_128", "small", 128, 2, 8192, 2048, 256, steps or 20, 5, 4))
    return cfgs


def make_trainer(cfg: StepConfig, device: torch.device, amp: bool, seed: int = 0):
    """A SmartTrainer wired like the bundle, ready for ``_iteration``, and a random batch on the host."""
    from medspan.engines.pretrain import param_groups
    from medspan.engines.smart import SmartTrainer
    from medspan.models.swin_ca import SmartFormer, build_swin_ca
    from medspan.ssl.masking import MaskingPolicy
    from medspan.losses.smart import DistillCE
    from medspan.ssl.teacher import PatchDropout, copy_teacher

    torch.manual_seed(seed)
    student = SmartFormer(
        build_swin_ca(cfg.model, img_size=cfg.crop),
        out_dim=cfg.out_dim,
        head_hidden_dim=cfg.hidden_dim,
        head_bottleneck_dim=cfg.bottleneck_dim,
        recon_stage=cfg.recon_stage,
        head_use_bn=True,  # the bundle default
    ).to(device)
    teacher = copy_teacher(student)
    losses = [DistillCE(cfg.out_dim, nepochs=10, init_center=True).to(device) for _ in range(3)]
    trainer = SmartTrainer(
        device,
        1,
        [],
        student,
        teacher,
        torch.optim.AdamW(param_groups(student), lr=1e-4),
        *losses,
        masking=MaskingPolicy("attention", 0.7, 0.1, seed=seed),
        noise=PatchDropout(0.7, seed=seed + 1),
        lr_schedule=1e-4,
        wd_schedule=0.04,
        momentum_schedule=0.996,
        clip_grad=3.0,
        freeze_last_layer=0,
        amp=amp,
        epoch_length=1,
        keep_preview=False,
    )
    trainer.state.epoch, trainer.state.iteration = 1, 0
    g = torch.Generator().manual_seed(seed)
    batch = {
        "views": torch.rand(cfg.batch, 2, 1, cfg.crop, cfg.crop, cfg.crop, generator=g),
        "case_id": [f"bench_{i}" for i in range(cfg.batch)],
    }
    return trainer, batch


def _rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_step_config(cfg: StepConfig, device: torch.device, amp: bool, log=print) -> dict:
    """Warm up, then time ``cfg.steps`` steps; returns times and memory."""
    trainer, batch = make_trainer(cfg, device, amp)
    n_params = sum(p.numel() for p in trainer.student.parameters())
    log(f"[{cfg.name}] {cfg.describe()}; student {n_params / 1e6:.2f} M parameters")
    gc.collect()
    base_rss = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    last: dict = {}
    for i in range(cfg.warmup + cfg.steps):
        trainer.state.iteration += 1
        _sync(device)
        t0 = time.perf_counter()
        last = trainer._iteration(trainer, batch)[0]
        _sync(device)
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {
        "config": asdict(cfg),
        "times_s": times,
        "median_s": med,
        "min_s": min(times),
        "samples_per_s": cfg.batch / med,
        "params_m": n_params / 1e6,
        "last_step": last,
    }
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["peak_note"] = "torch.cuda.max_memory_allocated"
    else:
        out["peak_mem_mb"] = _peak_rss_mb()
        out["peak_growth_mb"] = out["peak_mem_mb"] - base_rss
        out["peak_note"] = "process peak RSS"
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------- FLOPs
def count_flops(
    model: str, crop: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, recon_stage: int = 4
) -> dict[str, float]:
    """FLOPs (batch 1) on the meta device: encoder fwd, student fwd / bwd, teacher fwd x 2 views, total."""
    from torch.utils.flop_counter import FlopCounterMode

    from medspan.models.swin_ca import SmartFormer, build_swin_ca

    net = SmartFormer(
        build_swin_ca(model, img_size=crop, use_flash_attention=False),
        out_dim=out_dim,
        head_hidden_dim=hidden_dim,
        head_bottleneck_dim=bottleneck_dim,
        recon_stage=recon_stage,
    ).to("meta")
    x = torch.empty(1, 1, crop, crop, crop, device="meta")

    def flops(fn) -> float:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return float(counter.get_total_flops())

    enc = flops(lambda: net.backbone.forward_features(x))
    with torch.no_grad():
        teacher_view = flops(lambda: net(x, recon=False))
    holder: dict = {}

    def student_fwd() -> None:
        o = net(x)
        holder["loss"] = o.recon.sum() + o.cls_proj.sum() + o.patch_proj.sum() + o.global_proj.sum()

    s_fwd = flops(student_fwd)
    s_bwd = flops(lambda: holder["loss"].backward())
    params = sum(p.numel() for p in net.parameters())
    return {
        "encoder_fwd": enc,
        "student_fwd": s_fwd,
        "student_bwd": s_bwd,
        "teacher_fwd_2views": 2 * teacher_view,
        "total": s_fwd + s_bwd + 2 * teacher_view,
        "params_m": params / 1e6,
        "encoder_params_m": sum(p.numel() for p in net.backbone.parameters()) / 1e6,
    }


FLOP_CONFIGS = {
    "small_128": ("small", 128, 8192, 2048, 256, 4),
    "tiny_64": ("tiny", 64, 1024, 256, 64, 3),
}


# ---------------------------------------------------------------------------------------------- report
STEP_HEADER = [
    "config",
    "device",
    "threads",
    "s/step (median)",
    "s/step (min)",
    "samples/s",
    "peak memory (MiB)",
    "what peak",
    "steps",
    "torch",
    "date",
    "command",
]
FLOP_HEADER = [
    "config",
    "encoder fwd (GFLOP)",
    "student fwd",
    "student bwd",
    "teacher fwd (2 views)",
    "total per sample",
    "parameters (M)",
    "date",
]


def step_rows(results: Sequence[dict], env: dict, amp: bool, command: str) -> list[list[str]]:
    dev = env["device_name"] + (" (bf16 autocast)" if amp else "")
    rows = []
    for r in results:
        note = r["peak_note"] + (f", +{r['peak_growth_mb']:.0f} MiB during the steps" if "peak_growth_mb" in r else "")
        rows.append(
            [
                r["config"]["name"],
                dev,
                str(env["threads"]),
                f"{r['median_s']:.4g}",
                f"{r['min_s']:.4g}",
                f"{r['samples_per_s']:.3g}",
                f"{r['peak_mem_mb']:.0f}",
                note,
                str(r["config"]["steps"]),
                env["torch"],
                env["date"].split(" ")[0],
                f"`{command}`",
            ]
        )
    return rows


def flop_rows(flops: dict[str, dict[str, float]], env: dict) -> list[list[str]]:
    g = 1e9
    return [
        [
            name,
            f"{f['encoder_fwd'] / g:.1f}",
            f"{f['student_fwd'] / g:.1f}",
            f"{f['student_bwd'] / g:.1f}",
            f"{f['teacher_fwd_2views'] / g:.1f}",
            f"{f['total'] / g:.1f}",
            f"{f['encoder_params_m']:.2f} encoder / {f['params_m']:.1f} all",
            env["date"].split(" ")[0],
        ]
        for name, f in flops.items()
    ]


def print_report(results: Sequence[dict], flops: dict, env: dict, amp: bool) -> None:
    print()
    print(
        f"date {env['date']} | device {env['device']}: {env['device_name']} | threads {env['threads']} "
        f"| torch {env['torch']}" + (" | bf16 autocast" if amp else "")
    )
    for r in results:
        c = r["config"]
        extra = f" (+{r['peak_growth_mb']:.0f} MiB during the steps)" if "peak_growth_mb" in r else ""
        print(
            f"[{c['name']}] {c['steps']} steps: median {r['median_s']:.3f} s/step, min {r['min_s']:.3f} s, "
            f"{r['samples_per_s']:.3g} samples/s; peak memory {r['peak_mem_mb']:.0f} MiB ({r['peak_note']}){extra}"
        )
    for name, f in flops.items():
        print(
            f"[flops {name}] per sample: encoder fwd {f['encoder_fwd'] / 1e9:.1f} GFLOP, student fwd "
            f"{f['student_fwd'] / 1e9:.1f} + bwd {f['student_bwd'] / 1e9:.1f}, teacher fwd x2 "
            f"{f['teacher_fwd_2views'] / 1e9:.1f} -> {f['total'] / 1e9:.1f} GFLOP per training sample"
        )


def write_readme(readme: Path, results: Sequence[dict], flops: dict, env: dict, amp: bool, command: str) -> None:
    """Merge this run's rows into the README's smartformer section (step rows keyed by config and device)."""
    old = read_section(readme, SECTION) or ""
    parts = old.split("\n\n", 1)
    h1, old_steps = parse_table(parts[0])
    h2, old_flops = parse_table(parts[1]) if len(parts) > 1 else ([], [])
    steps = merge_rows(old_steps if h1 == STEP_HEADER else [], step_rows(results, env, amp, command), [0, 1])
    fl = merge_rows(old_flops if h2 == FLOP_HEADER else [], flop_rows(flops, env), [0])
    update_section(readme, SECTION, markdown_table(STEP_HEADER, steps) + "\n\n" + markdown_table(FLOP_HEADER, fl))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="32^3, 2 steps, tiny FLOPs only (smoke check; nothing written)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument(
        "--flops-only",
        action="store_true",
        help="only count FLOPs (meta device: seconds, independent of machine load); no step timing",
    )
    p.add_argument("--update-readme", action="store_true", help="write the rows into benchmarks/README.md")
    p.add_argument("--readme", type=Path, default=HERE / "README.md", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None, help="also write every step time and the FLOP counts here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device, args.amp, args.threads)
    if device is None:
        return 2
    env = environment(device)
    print(
        f"bench_smartformer: {env['device_name']} ({device}), {env['threads']} threads, torch {env['torch']}, "
        f"{env['date']}" + (" [quick]" if args.quick else "")
    )
    cfgs = [] if args.flops_only else make_configs(args.quick, device, args.steps)
    results = [run_step_config(c, device, args.amp) for c in cfgs]
    flops: dict[str, dict[str, float]] = {}
    if not args.no_flops:
        names = ["tiny_64"] if args.quick else list(FLOP_CONFIGS)
        flops = {n: count_flops(*FLOP_CONFIGS[n]) for n in names}
    print_report(results, flops, env, args.amp)
    command = shlex.join(["python", "benchmarks/bench_smartformer.py", *list(sys.argv[1:] if argv is None else argv)])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"environment": env, "amp": args.amp, "command": command, "results": results, "flops": flops},
                indent=2,
                default=str,
            )
        )
        print(f"wrote {args.json}")
    if args.update_readme:
        if args.quick:
            print("--quick: results are not written to the README")
        else:
            write_readme(args.readme, results, flops, env, args.amp, command)
            print(f"updated section '{SECTION}' of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
