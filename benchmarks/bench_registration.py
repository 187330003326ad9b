"""Seconds per atlas registration (exemplar -> one image, masks warped, prior written), 2D and 3D.

What is timed is the production code of ``medspan build-priors``:
:func:`medspan.atlas.build._register_one` on an image already read into memory (as
``build_priors`` hands it to a worker): :func:`~medspan.atlas.registration.register` (intensity
normalisation, reduction to the registration grid, centred initialisation, multi-resolution affine,
the deformable stage, the checks: similarity, Jacobian determinant) with the settings
:func:`~medspan.atlas.build.registration_settings` gives, then the masks warped three times
(soft, nearest, affine-only), the prior softened and saved (float16 ``.npy``), the warped masks
(``.npz``) and the quality record written.

Images: phantoms from :mod:`medspan.data.synthetic` (case 0 is the exemplar, cases 1..N the targets):

========  ==============================  ===========================
config    image                           structures (exemplar masks)
========  ==============================  ===========================
cxr256    ``synth_cxr`` 256 x 256         left lung, right lung, heart
cxr512    ``synth_cxr`` 512 x 512         left lung, right lung, heart
ct96      ``synth_ct`` 96^3 (4 x 4 x 3.5 mm)  left lung, right lung, heart
ct128     ``synth_ct`` 128^3 (3 x 3 x 2.6 mm) left lung, right lung, heart
========  ==============================  ===========================

Two ways of running, each over the same N targets:

* **1 worker**: the registrations run one after another in this process; ``s/reg`` is the median of
  the per-image times.
* **2 workers**: a pool of 2 spawned processes (as ``build_priors(workers=2)``), warmed up by one
  registration each before timing; ``s/reg`` is the median of the per-image times measured inside
  the workers, ``wall/img`` the wall time of the batch divided by N, and ``core-s/img`` = wall time x
  workers / N (the cost per image per core, the quantity of the target: <= 1 s per 256 px CXR for
  the default method).

Every registration uses one SimpleITK thread (the default), so the results do not depend on the
number of workers.

Usage::

    python benchmarks/bench_registration.py --update-readme             # all configs, N = 20, default method
    python benchmarks/bench_registration.py --only cxr256 --methods demons,bspline,affine
    python benchmarks/bench_registration.py --quick                     # smoke check: tiny sizes, nothing written
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from _table import markdown_table, merge_rows, parse_table, read_section, update_section

SECTION = "registration"
STRUCTURES = ("left_lung", "right_lung", "heart")
TARGET_S = 1.0
HEADER = ["config", "method", "device", "workers", "N", "s/reg (median)", "wall/img", "core-s/img",
          "<= 1 s/core (cxr256)", "SimpleITK", "date", "command"]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                return " ".join(w for w in name.split() if w not in ("Processor", "CPU")).split(" @")[0]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_case(config: str, seed: int, quick: bool) -> dict:
    """One phantom as build_priors hands it to a worker: array (MONAI order), affine, masks."""
    from medspan.data.synthetic import synth_ct, synth_cxr

    if config.startswith("cxr"):
        size = 64 if quick else int(config[3:])
        c = synth_cxr(seed, size=size)
        return {"array": c["image"].T.astype(np.float32), "affine": np.eye(4),
                "masks": np.stack([c["masks"][s].T for s in STRUCTURES])}
    n = 32 if quick else int(config[2:])
    c = synth_ct(seed, shape=(n, n, n), nodules=0)
    return {"array": c["image"].transpose(2, 1, 0).astype(np.float32), "affine": np.asarray(c["affine"]),
            "masks": np.stack([c["masks"][s].transpose(2, 1, 0) for s in STRUCTURES])}


def _job(case: dict, index: int, folder: str) -> dict:
    return {"case_id": f"case_{index:03d}", "image": os.path.join(folder, f"case_{index:03d}"),
            "array": case["array"], "affine": case["affine"]}


def run_config(config: str, method: str, n: int, workers_list: Sequence[int], quick: bool) -> list[dict]:
    """Time ``n`` registrations of ``config`` with ``method`` for each worker count."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from medspan.atlas.build import _register_one, registration_settings

    ex = make_case(config, 0, quick)
    targets = [make_case(config, i, quick) for i in range(1, n + 1)]
    dim = ex["array"].ndim
    settings = registration_settings(method, dim)
    ex_payload = {"image": "<exemplar>", "array": ex["array"], "affine": ex["affine"], "masks": ex["masks"]}
    sigma = 4.0 if dim == 2 else 2.0
    results = []
    for workers in workers_list:
        with tempfile.TemporaryDirectory(prefix="bench_reg_") as tmp:
            jobs = [_job(c, i, tmp) for i, c in enumerate(targets)]
            if workers <= 1:
                _register_one(_job(targets[0], 999, tmp), ex_payload, settings, sigma, tmp)  # warm-up
                t0 = time.perf_counter()
                recs = [_register_one(j, ex_payload, settings, sigma, tmp) for j in jobs]
                wall = time.perf_counter() - t0
            else:
                ctx = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                    warm = [pool.submit(_register_one, _job(targets[k % n], 900 + k, tmp), ex_payload, settings,
                                        sigma, tmp) for k in range(workers)]
                    [f.result() for f in warm]
                    t0 = time.perf_counter()
                    recs = list(pool.map(_register_one, jobs, [ex_payload] * n, [settings] * n, [sigma] * n,
                                         [tmp] * n))
                    wall = time.perf_counter() - t0
            bad = [r for r in recs if r["status"] not in ("ok", "retried", "fallback_affine")]
            times = [r["seconds_total"] for r in recs]
            results.append({
                "config": config, "method": settings.method, "workers": workers, "n": n,
                "median": float(np.median(times)), "wall_per_img": wall / n, "core_per_img": wall * workers / n,
                "statuses": {s: sum(r["status"] == s for r in recs) for s in {r["status"] for r in recs}},
                "bad": len(bad),
            })
            r = results[-1]
            print(f"{config:7s} {r['method']:9s} workers {workers}: median {r['median']:.3f} s/reg, "
                  f"wall {r['wall_per_img']:.3f} s/img, {r['core_per_img']:.3f} core-s/img  {r['statuses']}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="cxr256,cxr512,ct96,ct128", help="comma list of configs")
    parser.add_argument("--methods", default="default", help="comma list: default, demons_cc, demons, bspline, affine")
    parser.add_argument("--n", type=int, default=20, help="registrations per config and worker count (>= 20 for the README)")
    parser.add_argument("--workers", default="1,2", help="comma list of worker counts")
    parser.add_argument("--quick", action="store_true", help="smoke check: 64 px / 32^3 images, N=3, nothing written")
    parser.add_argument("--update-readme", action="store_true", help="write the rows into benchmarks/README.md")
    args = parser.parse_args(argv)
    import SimpleITK as sitk

    configs = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in configs if c not in ("cxr256", "cxr512", "ct96", "ct128")]
    if unknown:
        parser.error(f"unknown configs {unknown}")
    n = 3 if args.quick else args.n
    workers_list = [int(w) for w in args.workers.split(",")]
    device = f"{_cpu_name()} ({os.cpu_count()} cores)"
    print(f"device: {device}; SimpleITK {sitk.Version.VersionString()}; N = {n}{' (quick)' if args.quick else ''}")
    rows = []
    for config in configs:
        for method in args.methods.split(","):
            for r in run_config(config, method.strip(), n, workers_list, args.quick):
                ok = "" if config != "cxr256" else ("yes" if r["core_per_img"] <= TARGET_S else "no")
                rows.append([config, r["method"], device, str(r["workers"]), str(n), f"{r['median']:.3f}",
                             f"{r['wall_per_img']:.3f}", f"{r['core_per_img']:.3f}", ok, sitk.Version.VersionString(),
                             _dt.date.today().isoformat(), "`" + " ".join(["python", "benchmarks/bench_registration.py",
                                                                          *map(shlex.quote, argv or sys.argv[1:])]) + "`"])
    print(markdown_table(HEADER, rows))
    if args.update_readme and not args.quick:
        if n < 20:
            print("not written: the README table needs N >= 20", file=sys.stderr)
            return 1
        old = read_section(HERE / "README.md", SECTION) or ""
        _, old_rows = parse_table(old)
        merged = merge_rows(old_rows, rows, key_columns=[0, 1, 2, 3])
        update_section(HERE / "README.md", SECTION, markdown_table(HEADER, merged))
        print("benchmarks/README.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
