"""Speed of the SAR spatial-entropy loss: batched vs a per-map loop, and its train-step overhead.

Two measurements, each with the variants compared side by side in the same run, interleaved:

1. **Loss forward + backward** (section ``sar`` of ``benchmarks/README.md``) on the same logits
   ``z`` (B, H, N) with gradient:

   * ``batched``: :class:`medspan.losses.spatial_entropy.SpatialEntropyLoss` as the bundles use it
     (backend ``auto``: one ``cc3d.connected_components`` call for all maps on CPU, the torch
     propagation labeller elsewhere);
   * ``batched (scipy labeller)``: the same loss with one ``scipy.ndimage.label`` call for all maps
     (the CPU fallback when the ``connected-components-3d`` package is missing; CPU only);
   * ``batched (torch labeller)``: the same loss forced to the device-agnostic torch backend
     (what runs on a GPU), reported for information on every device;
   * ``loop (SAR-style)`` -- the **reference**: the structure of SAR's public code with scipy in
     place of OpenCV: the foreground masks go to the host (a sync on a GPU), a Python double loop
     labels every map with ``scipy.ndimage.label``, one dense 0/1 mask tensor per component is
     built, stacked and moved back to the device, masses are gathered per component, entropies
     summed per map with ``index_add`` (vectorised; SAR's ``+1e-9`` on the weights is left out);
   * ``loop (labels only)``: the cheapest per-map loop: scipy labels of every map written into
     one array in a Python loop, then the batched dense masses and entropy of our module.

   Every variant must give the same loss (|diff| <= 1e-5) and gradient, checked in the same run.
   The logits are Gaussian noise smoothed with sigma = 1 token per map (x5), i.e. blobby maps with
   a few above-mean regions each (the report gives the mean number of regions per map).
   Configurations: ``2d``: 768 maps of 14 x 14 (batch 64 x 12 heads; target: batched >= 10x faster
   than the SAR-style loop), ``3d``: 768 maps of 8 x 8 x 8 (batch 64 x 12 heads).

2. **Train-step overhead** (section ``sar_step``): one full step of
   :class:`medspan.engines.pretrain.SelfDistillationTrainer` on the ``span_cxr`` default model
   (the ``toy`` configuration of ``bench_span_step.py``: vit_toy, batch 32, 2 x 64 px + 4 x 32 px,
   SPAN prior on), with ``sar_weight`` 0 (SAR off) and 0.1 (SAR on all 6 heads: 384 maps of
   8 x 8 per step, more than the bundle's default of the 3 free heads). Target: SAR/off <= 1.10.

Usage::

    python benchmarks/bench_sar.py                     # prints the report
    python benchmarks/bench_sar.py --update-readme     # ... and writes both tables of benchmarks/README.md
    python benchmarks/bench_sar.py --quick             # smoke check (tiny sizes; nothing written)
    python benchmarks/bench_sar.py --device cuda --update-readme
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_span_step as span_bench  # noqa: E402  (make_batch, make_trainer, environment)
from _table import markdown_table, merge_rows, parse_table, read_section, update_section  # noqa: E402

SECTION_LOSS = "sar"
SECTION_STEP = "sar_step"
TARGET_SPEEDUP = 10.0
TARGET_OVERHEAD = 1.10
STEP_SAR_WEIGHT = 0.1


# ---------------------------------------------------------------------------------------------- the loss variants
def loop_sar_reference(z: torch.Tensor, grid: Sequence[int], structure: np.ndarray) -> torch.Tensor:
    """Mean spatial entropy, computed the way SAR's public code does it (scipy instead of OpenCV).

    ``z`` (B, H, N) logits -> scalar. Per-map Python loop, one tensor per component.
    """
    from scipy import ndimage

    b, h, _ = z.shape
    zf = z.float()
    mu = zf.mean(dim=-1, keepdim=True)
    fg = (zf > mu).detach().cpu().numpy()  # the host round trip (a sync on a GPU)
    comps: list[torch.Tensor] = []
    bi: list[int] = []
    hi: list[int] = []
    for i in range(b):
        for j in range(h):
            lab, k = ndimage.label(fg[i, j].reshape(grid), structure)
            lab = lab.reshape(-1)
            for r in range(1, k + 1):
                comps.append(torch.from_numpy(lab == r))
                bi.append(i)
                hi.append(j)
    a = torch.relu(zf - mu)
    if not comps:
        return zf.sum() * 0.0
    masks = torch.stack(comps).to(z.device, torch.float32)
    bi_t = torch.tensor(bi, device=z.device)
    hi_t = torch.tensor(hi, device=z.device)
    mass = (a[bi_t, hi_t] * masks).sum(dim=-1)
    owner = bi_t * h + hi_t
    total = torch.zeros(b * h, device=z.device).index_add(0, owner, mass)
    p = mass / total[owner]
    ent = torch.zeros(b * h, device=z.device).index_add(0, owner, -p * p.log())
    return ent.mean()


def loop_labels_reference(z: torch.Tensor, grid: Sequence[int], structure: np.ndarray) -> torch.Tensor:
    """Per-map scipy labels in a Python loop, then our batched dense masses and entropy."""
    from scipy import ndimage

    from medspan.losses.spatial_entropy import entropy_from_masses, region_masses

    b, h, n = z.shape
    zf = z.float().reshape(b * h, n)
    fg = ((zf - zf.mean(dim=-1, keepdim=True)) > 0).detach().cpu().numpy().reshape(b * h, *grid)
    labels = np.zeros(fg.shape, dtype=np.int64)
    for i in range(b * h):
        ndimage.label(fg[i], structure, output=labels[i])  # labels 1..k <= N: valid dense bins
    lab_t = torch.from_numpy(labels.reshape(b * h, n)).to(z.device)
    return entropy_from_masses(region_masses(zf, lab_t)).mean()


@dataclass(frozen=True)
class LossConfig:
    """One loss benchmark: ``batch`` x ``heads`` maps on ``grid``; ``reps`` timed calls per variant."""

    name: str
    batch: int
    heads: int
    grid: tuple[int, ...]
    reps: int
    warmup: int
    target: float | None = None  # minimum speed-up over the SAR-style loop, if any

    @property
    def maps(self) -> int:
        return self.batch * self.heads

    def grid_str(self) -> str:
        return "x".join(map(str, self.grid))


def loss_configs(quick: bool, reps: int | None = None) -> list[LossConfig]:
    if quick:
        cfgs = [LossConfig("2d", 4, 4, (14, 14), 3, 1, TARGET_SPEEDUP), LossConfig("3d", 2, 4, (8, 8, 8), 3, 1)]
    else:
        cfgs = [LossConfig("2d", 64, 12, (14, 14), 40, 3, TARGET_SPEEDUP), LossConfig("3d", 64, 12, (8, 8, 8), 20, 2)]
    if reps is not None:
        cfgs = [LossConfig(**{**asdict(c), "reps": int(reps)}) for c in cfgs]
    return cfgs


def make_logits(cfg: LossConfig, device: torch.device, seed: int = 0) -> torch.Tensor:
    """(B, H, N) float32 logits: per-map Gaussian noise smoothed with sigma 1 token, times 5."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((cfg.maps, *cfg.grid))
    smooth = ndimage.gaussian_filter(noise, (0,) + (1.0,) * len(cfg.grid)) * 5.0
    z = torch.from_numpy(smooth.reshape(cfg.batch, cfg.heads, -1).astype(np.float32)).to(device)
    return z.requires_grad_()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_variants(cfg: LossConfig, device: torch.device) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    from scipy import ndimage

    from medspan.losses.spatial_entropy import SpatialEntropyLoss

    nd = len(cfg.grid)
    structure = ndimage.generate_binary_structure(nd, nd)
    auto = SpatialEntropyLoss("all", backend="auto")
    torch_backend = SpatialEntropyLoss("all", backend="torch")
    scipy_backend = SpatialEntropyLoss("all", backend="scipy")
    variants = {
        "batched": lambda z: auto(z, cfg.grid),
        "batched_torch": lambda z: torch_backend(z, cfg.grid),
        "loop_sar": lambda z: loop_sar_reference(z, cfg.grid, structure),
        "loop_labels": lambda z: loop_labels_reference(z, cfg.grid, structure),
    }
    if device.type == "cpu":
        variants["batched_scipy"] = lambda z: scipy_backend(z, cfg.grid)
    return variants


def _bootstrap_ratio(num: np.ndarray, den: np.ndarray, n_boot: int = 2000, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    bn = np.median(num[rng.integers(0, len(num), (n_boot, len(num)))], axis=1)
    bd = np.median(den[rng.integers(0, len(den), (n_boot, len(den)))], axis=1)
    lo, hi = np.percentile(bn / bd, [2.5, 97.5])
    return [float(lo), float(hi)]


def run_loss_config(cfg: LossConfig, device: torch.device, log=print) -> dict:
    """Check that all variants agree, then time them round-robin (the order rotates every rep)."""
    from medspan.losses.spatial_entropy import label_components

    z = make_logits(cfg, device)
    variants = loss_variants(cfg, device)
    names = list(variants)
    # agreement (value and gradient) and map statistics
    values, grads = {}, {}
    for name, fn in variants.items():
        z.grad = None
        loss = fn(z)
        loss.backward()
        values[name], grads[name] = float(loss.detach()), z.grad.detach().clone()
    for name in names[1:]:
        if abs(values[name] - values["batched"]) > 1e-5 or not torch.allclose(grads[name], grads["batched"],
                                                                              atol=1e-7, rtol=1e-4):
            raise RuntimeError(f"[{cfg.name}] {name} disagrees with batched: {values}")
    with torch.no_grad():
        zf = z.detach().reshape(cfg.maps, -1)
        fg = (zf - zf.mean(dim=-1, keepdim=True)) > 0
        labels, iters = label_components(fg.reshape(cfg.maps, *cfg.grid), return_iterations=True)
        labels = labels.reshape(cfg.maps, -1)
        regions = sum(int(torch.unique(labels[i]).numel()) - int(bool((labels[i] == 0).any()))
                      for i in range(min(cfg.maps, 256))) / min(cfg.maps, 256)
    log(f"[{cfg.name}] {cfg.maps} maps of {cfg.grid_str()}: loss {values['batched']:.4f}, "
        f"{regions:.2f} regions per map, torch labeller {iters} iterations")

    times: dict[str, list[float]] = {n: [] for n in names}

    def once(name: str) -> float:
        z.grad = None
        _sync(device)
        t0 = time.perf_counter()
        variants[name](z).backward()
        _sync(device)
        return time.perf_counter() - t0

    gc.collect()
    gc.freeze()
    try:
        for _ in range(cfg.warmup):
            for name in names:
                once(name)
        t_start = time.perf_counter()
        for rep in range(cfg.reps):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                times[name].append(once(name))
        wall = time.perf_counter() - t_start
    finally:
        gc.unfreeze()
    arr = {n: np.asarray(t) for n, t in times.items()}
    med = {n: float(np.median(a)) for n, a in arr.items()}
    summary = {
        "median_s": med,
        "min_s": {n: float(a.min()) for n, a in arr.items()},
        "speedup_median": med["loop_sar"] / med["batched"],
        "speedup_ci95": _bootstrap_ratio(arr["loop_sar"], arr["batched"]),
        "speedup_min": float(arr["loop_sar"].min() / arr["batched"].min()),
        "speedup_vs_labels_loop": med["loop_labels"] / med["batched"],
        "regions_per_map": regions,
        "torch_iterations": iters,
        "loss": values["batched"],
        "wall_s": wall,
    }
    return {"config": {**asdict(cfg), "maps": cfg.maps}, "times_s": times, "summary": summary}


# ---------------------------------------------------------------------------------------------- train-step overhead
def step_config(quick: bool, device: torch.device, steps: int | None) -> span_bench.BenchConfig:
    toy = span_bench.make_configs(quick, device)[0]  # the bundle's default model and batch ("toy")
    if steps is not None:
        toy = span_bench.BenchConfig(**{**asdict(toy), "steps": int(steps)})
    return toy


def run_step(cfg: span_bench.BenchConfig, device: torch.device, amp: bool, log=print) -> dict:
    """SPAN step with SAR off vs on (weight 0.1, all heads), interleaved ABBA BAAB ..."""
    from medspan.losses.spatial_entropy import SpatialEntropyLoss

    batch = span_bench.make_batch(cfg)
    trainer = span_bench.make_trainer(cfg, device, batch, amp)
    trainer.sar_loss = SpatialEntropyLoss("all")
    log(f"[step] {cfg.describe()}, SPAN prior on; SAR weight {STEP_SAR_WEIGHT} on all heads vs off")

    def one(sar: bool) -> float:
        trainer.sar_weight = STEP_SAR_WEIGHT if sar else 0.0
        trainer.state.iteration += 1
        gc.collect()
        _sync(device)
        t0 = time.perf_counter()
        out = trainer._iteration(trainer, batch)[0]
        _sync(device)
        dt = time.perf_counter() - t0
        if sar != ("sar" in out) or not math.isfinite(out["loss"]):
            raise RuntimeError(f"[step] variant mismatch or non-finite loss: sar={sar}, {out}")
        return dt

    gc.collect()
    gc.freeze()
    try:
        t_off: list[float] = []
        t_on: list[float] = []
        for i in range(cfg.warmup + cfg.steps):
            pair = []
            for sar in ((False, True) if i % 2 == 0 else (True, False)):
                pair.append((sar, one(sar)))
            if i >= cfg.warmup:
                for sar, dt in pair:
                    (t_on if sar else t_off).append(dt)
    finally:
        del trainer
        gc.unfreeze()
        gc.collect()
    summary = span_bench.summarize(t_off, t_on)  # "dino" = SAR off, "span" = SAR on
    summary = {
        "off_median_s": summary["dino_median_s"], "on_median_s": summary["span_median_s"],
        "ratio_median": summary["ratio_median"], "ratio_ci95": summary["ratio_ci95"],
        "ratio_min": summary["ratio_min"], "ratio_paired_median": summary["ratio_paired_median"],
    }
    return {"config": asdict(cfg), "times_off_s": t_off, "times_on_s": t_on, "summary": summary}


# ---------------------------------------------------------------------------------------------- report
LOSS_HEADER = [
    "config", "device", "threads", "maps", "regions/map", "batched ms", "loop (SAR-style) ms",
    "speed-up (median)", "95% CI", "speed-up (min)", f">= {TARGET_SPEEDUP:g}x (2D)", "loop (labels only) ms",
    "speed-up vs labels loop", "torch labeller ms", "scipy labeller ms", "reps", "torch", "date", "command",
]
STEP_HEADER = [
    "config", "device", "threads", "SAR off s/step", "SAR on s/step", "on/off (median)", "95% CI",
    "on/off (min)", f"<= {TARGET_OVERHEAD:.2f}", "steps", "torch", "date", "command",
]
KEY_COLUMNS = [0, 1]


def _dev(env: dict, amp: bool) -> str:
    return env["device_name"] + (" (bf16 autocast)" if amp else "")


def loss_rows(results: Sequence[dict], env: dict, command: str) -> list[list[str]]:
    rows = []
    for r in results:
        c, s = r["config"], r["summary"]
        med = s["median_s"]
        lo, hi = s["speedup_ci95"]
        rows.append([
            f"{c['name']} {'x'.join(map(str, c['grid']))}", _dev(env, False), str(env["threads"]),
            f"{c['maps']} ({c['batch']} x {c['heads']})", f"{s['regions_per_map']:.2f}",
            f"{med['batched'] * 1e3:.3g}", f"{med['loop_sar'] * 1e3:.3g}", f"{s['speedup_median']:.1f}x",
            f"{lo:.1f}-{hi:.1f}", f"{s['speedup_min']:.1f}x",
            "-" if c["target"] is None else ("yes" if s["speedup_median"] >= c["target"] else "NO"),
            f"{med['loop_labels'] * 1e3:.3g}",
            f"{s['speedup_vs_labels_loop']:.1f}x", f"{med['batched_torch'] * 1e3:.3g}",
            f"{med['batched_scipy'] * 1e3:.3g}" if "batched_scipy" in med else "-", str(c["reps"]),
            env["torch"], env["date"].split(" ")[0], f"`{command}`",
        ])
    return rows


def step_rows(result: dict, env: dict, amp: bool, command: str) -> list[list[str]]:
    s = result["summary"]
    lo, hi = s["ratio_ci95"]
    return [[
        result["config"]["name"], _dev(env, amp), str(env["threads"]), f"{s['off_median_s']:.4g}",
        f"{s['on_median_s']:.4g}", f"{s['ratio_median']:.3f}", f"{lo:.3f}-{hi:.3f}", f"{s['ratio_min']:.3f}",
        "yes" if s["ratio_median"] <= TARGET_OVERHEAD else "NO", str(result["config"]["steps"]),
        env["torch"], env["date"].split(" ")[0], f"`{command}`",
    ]]


def print_report(loss_results: Sequence[dict], step_result: dict | None, env: dict, amp: bool) -> None:
    print()
    print(f"date {env['date']} | device {env['device']}: {env['device_name']} | threads {env['threads']} "
          f"(logical CPUs {env['logical_cpus']}) | torch {env['torch']}"
          + (f" | CUDA {env['cuda']}" if env["cuda"] else ""))
    for r in loss_results:
        c, s = r["config"], r["summary"]
        med, lo_hi = s["median_s"], s["speedup_ci95"]
        if c["target"] is None:
            verdict = "no target for this configuration"
        else:
            verdict = ("meets" if s["speedup_median"] >= c["target"] else "MISSES") + f" the target >= {c['target']:g}x"
        print(f"[{c['name']}] {c['maps']} maps of {'x'.join(map(str, c['grid']))}, forward + backward, "
              f"{c['reps']} reps per variant, {s['wall_s']:.0f} s")
        for name, label in (("batched", "batched (default backend)"), ("batched_torch", "batched, torch labeller"),
                            ("batched_scipy", "batched, scipy labeller"),
                            ("loop_sar", "loop, SAR-style (reference)"), ("loop_labels", "loop, labels only")):
            if name not in med:
                continue
            print(f"  {label:30s} median {med[name] * 1e3:9.3f} ms  min {s['min_s'][name] * 1e3:9.3f} ms")
        print(f"  speed-up over the SAR-style loop: {s['speedup_median']:.1f}x (median; 95% CI "
              f"{lo_hi[0]:.1f}-{lo_hi[1]:.1f}), {s['speedup_min']:.1f}x (min); {verdict}; "
              f"over the labels-only loop: {s['speedup_vs_labels_loop']:.1f}x")
    if step_result is not None:
        s = step_result["summary"]
        lo, hi = s["ratio_ci95"]
        verdict = "meets" if s["ratio_median"] <= TARGET_OVERHEAD else "MISSES"
        print(f"[step] {step_result['config']['steps']} steps per variant")
        print(f"  SAR off median {s['off_median_s'] * 1e3:9.2f} ms | SAR on median {s['on_median_s'] * 1e3:9.2f} ms")
        print(f"  on/off: {s['ratio_median']:.3f} (median; 95% CI {lo:.3f}-{hi:.3f}), {s['ratio_min']:.3f} (min), "
              f"{s['ratio_paired_median']:.3f} (median of pairs); {verdict} the target <= {TARGET_OVERHEAD:.2f}")


def _merge_section(readme: Path, section: str, header: list[str], new_rows: list[list[str]]) -> None:
    old = read_section(readme, section) or ""
    old_header, old_rows = parse_table(old)
    if old_header != header:
        old_rows = []
    update_section(readme, section, markdown_table(header, merge_rows(old_rows, new_rows, KEY_COLUMNS)))


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few reps (smoke check; nothing written)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast in the train step (CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--reps", type=int, default=None, help="timed loss calls per variant (overrides the defaults)")
    p.add_argument("--steps", type=int, default=None, help="timed train steps per variant (default 30)")
    p.add_argument("--only", choices=["2d", "3d", "step"], default=None, help="run one measurement")
    p.add_argument("--update-readme", action="store_true", help="write the rows into benchmarks/README.md")
    p.add_argument("--readme", type=Path, default=HERE / "README.md", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None, help="also write every time and the summaries here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = span_bench.resolve_device(args.device, args.amp, args.threads)
    if device is None:
        return 2
    for flag in ("reps", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            print(f"--{flag} must be >= 1", file=sys.stderr)
            return 2
    env = span_bench.environment(device)
    print(f"bench_sar: {env['device_name']} ({device}), {env['threads']} threads, torch {env['torch']}, "
          f"{env['date']}" + (" [quick]" if args.quick else ""))
    cfgs = [c for c in loss_configs(args.quick, args.reps) if args.only in (None, c.name)]
    loss_results = [run_loss_config(c, device) for c in cfgs]
    step_result = None
    if args.only in (None, "step"):
        step_result = run_step(step_config(args.quick, device, args.steps), device, args.amp)
    print_report(loss_results, step_result, env, args.amp)
    command = shlex.join(["python", "benchmarks/bench_sar.py", *(sys.argv[1:] if argv is None else argv)])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "command": command, "loss": loss_results,
                                         "step": step_result}, indent=2))
        print(f"wrote {args.json}")
    if args.update_readme:
        if args.quick:
            print("--quick: results are not written to the README")
        else:
            if loss_results:
                _merge_section(args.readme, SECTION_LOSS, LOSS_HEADER, loss_rows(loss_results, env, command))
            if step_result is not None:
                _merge_section(args.readme, SECTION_STEP, STEP_HEADER, step_rows(step_result, env, args.amp, command))
            print(f"updated sections '{SECTION_LOSS}' / '{SECTION_STEP}' of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
