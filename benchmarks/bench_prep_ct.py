"""Volumes per minute of the CT resampling path of ``data_prep``, with 1 and 2 worker processes.

What is timed is the production path that the CT converters use for a resampled cache
(``data_prep.msd_lung --spacing``): :func:`data_prep.ct_common.resample_file` per volume, i.e.
read the volume (:func:`medspan.data.readers.read_image`: a gzipped NIfTI, or a DICOM series
folder with one file per slice), resample it to 1.5 mm isotropic
(:func:`data_prep.ct_common.resample_to_spacing`, trilinear), round to int16 HU and write a gzipped
NIfTI atomically, run over a list of volumes by :func:`data_prep.common.run_items` with
``workers`` = 1 and 2 (a process pool, as ``--workers 2`` does).

Inputs: one synthetic phantom chest CT (:func:`medspan.data.synthetic.synth_ct` at half the
resolution, each voxel repeated 2 x 2 x 2, so the content compresses like a CT) of 512 x 512 x 120
voxels at 0.7 x 0.7 x 2.5 mm, written once as NIfTI (int16) and once as a DICOM series (uint16,
RescaleIntercept -1024), then copied to ``--volumes`` inputs (4). The two variants (1 and 2
workers) are run in rounds ordered ABBA BAAB ..., each round converting all inputs into a fresh
folder; the report gives the median round time per variant as volumes per minute and seconds per
volume, and the speedup of 2 workers over 1 (ratio of the medians).

Usage::

    python benchmarks/bench_prep_ct.py --update-readme   # about 4 minutes on 2 cores
    python benchmarks/bench_prep_ct.py --quick           # smoke check, 64 x 64 x 24, nothing written
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import shutil
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

from _table import markdown_table, merge_rows, parse_table, read_section, update_section  # noqa: E402

from data_prep.common import run_items  # noqa: E402
from data_prep.ct_common import resample_file, write_ct_series  # noqa: E402
from medspan.io import write_nifti_atomic

SECTION = "prep_ct"
HEADER = [
    "input",
    "volume",
    "target",
    "device",
    "CPUs",
    "workers",
    "volumes/min",
    "s/volume",
    "speedup vs 1 worker",
    "rounds x volumes",
    "date",
    "command",
]
KEY_COLUMNS = [0, 1, 2, 3, 5]


def _resample_job(job: tuple[str, str, float]) -> dict:
    """One volume: read, resample, write (module level: runs in the worker processes)."""
    src, dst, spacing = job
    return resample_file(src, dst, spacing)


def make_inputs(folder: Path, shape_xyz: Sequence[int], spacing: Sequence[float], n: int) -> dict[str, list[str]]:
    """Write the phantom as NIfTI and as a DICOM series, each copied ``n`` times."""
    from medspan.data.synthetic import synth_ct

    nx, ny, nz = shape_xyz
    f = 2 if min(shape_xyz) >= 64 else 1
    case = synth_ct(0, (nz // f, ny // f, nx // f), spacing=[s * f for s in spacing], nodules=2)
    img = case["image"].transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    img = np.repeat(np.repeat(np.repeat(img, f, 0), f, 1), f, 2)[:nx, :ny, :nz]
    img = np.clip(np.rint(img), -1024, 3071)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # RAS of an LPS-aligned series
    write_nifti_atomic(img, folder / "src.nii.gz", affine, dtype="int16")
    write_ct_series(folder / "src_dicom", img, spacing, (0.0, 0.0, 0.0))
    inputs: dict[str, list[str]] = {"nifti": [], "dicom": []}
    for i in range(n):
        p = folder / "in" / f"ct_{i:02d}.nii.gz"
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / "src.nii.gz", p)
        inputs["nifti"].append(str(p))
        d = folder / "in" / f"ct_{i:02d}_dicom"
        shutil.copytree(folder / "src_dicom", d)
        inputs["dicom"].append(str(d))
    return inputs


def run_round(inputs: Sequence[str], out: Path, workers: int, spacing: float) -> float:
    if out.exists():
        shutil.rmtree(out)
    jobs = [(src, str(out / f"v{i:02d}.nii.gz"), spacing) for i, src in enumerate(inputs)]
    t0 = time.perf_counter()
    results = run_items(_resample_job, jobs, workers=workers, progress=False)
    wall = time.perf_counter() - t0
    if any(r is None for r in results):
        raise RuntimeError("a volume failed to convert")
    shutil.rmtree(out)
    return wall


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def bench(kind: str, inputs: Sequence[str], work: Path, spacing: float, rounds: int, log=print) -> dict:
    """ABBA-ordered rounds of 1 and 2 workers; returns the round times and the medians."""
    order: list[int] = []
    for r in range(rounds):
        order += [1, 2] if r % 2 == 0 else [2, 1]
    times: dict[int, list[float]] = {1: [], 2: []}
    run_round(inputs[:1], work / "warm", 1, spacing)  # warm caches and imports
    for w in order:
        t = run_round(inputs, work / f"out_{kind}", w, spacing)
        times[w].append(t)
        log(f"  {kind}: {w} worker(s) {t:7.2f} s for {len(inputs)} volumes")
    med = {w: float(np.median(v)) for w, v in times.items()}
    return {"kind": kind, "times": times, "median_s": med, "n": len(inputs), "speedup": med[1] / med[2]}


def table_rows(
    results: Sequence[dict],
    shape: Sequence[int],
    spacing_in: Sequence[float],
    spacing: float,
    date: str,
    command: str,
    rounds: int,
) -> list[list[str]]:
    vol = f"{shape[0]}x{shape[1]}x{shape[2]} @ {spacing_in[0]:g}x{spacing_in[1]:g}x{spacing_in[2]:g} mm"
    rows = []
    for r in results:
        for w in (1, 2):
            t = r["median_s"][w]
            rows.append(
                [
                    "NIfTI (gz)" if r["kind"] == "nifti" else "DICOM series",
                    vol,
                    f"{spacing:g} mm",
                    cpu_name(),
                    str(os.cpu_count()),
                    str(w),
                    f"{r['n'] * 60 / t:.3g}",
                    f"{t / r['n']:.3g}",
                    "1" if w == 1 else f"{r['speedup']:.2f}",
                    f"{rounds} x {r['n']}",
                    date,
                    f"`{command}`",
                ]
            )
    return rows


def write_readme(readme: Path, rows: list[list[str]]) -> None:
    header, old_rows = parse_table(read_section(readme, SECTION) or "")
    if header != HEADER:
        old_rows = []
    update_section(readme, SECTION, markdown_table(HEADER, merge_rows(old_rows, rows, KEY_COLUMNS)))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="64 x 64 x 24 voxels, 2 volumes, 2 rounds; nothing written")
    p.add_argument("--volumes", type=int, default=4, help="volumes per round (default 4)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per variant (default 2, ordered ABBA)")
    p.add_argument("--spacing", type=float, default=1.5, help="target spacing in mm (default 1.5)")
    p.add_argument("--input", nargs="+", choices=("nifti", "dicom"), default=["nifti", "dicom"])
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--update-readme", action="store_true", help="write the rows into benchmarks/README.md")
    p.add_argument("--readme", type=Path, default=HERE / "README.md", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shape, spacing_in = ((64, 64, 24), (2.8, 2.8, 6.0)) if args.quick else ((512, 512, 120), (0.7, 0.7, 2.5))
    n, rounds = (2, 2) if args.quick else (args.volumes, args.rounds)
    if n < 1 or rounds < 1:
        print("--volumes and --rounds must be >= 1", file=sys.stderr)
        return 2
    date = _dt.date.today().isoformat()
    print(f"bench_prep_ct: {cpu_name()}, {os.cpu_count()} CPUs, {date}" + (" [quick]" if args.quick else ""))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_prep_ct_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        inputs = make_inputs(work, shape, spacing_in, n)
        print(f"inputs: {shape[0]}x{shape[1]}x{shape[2]} voxels, written in {time.perf_counter() - t0:.1f} s")
        results = [bench(k, inputs[k], work, args.spacing, rounds) for k in args.input]
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    for r in results:
        print(
            f"[{r['kind']}] 1 worker: {r['n'] * 60 / r['median_s'][1]:.3g} volumes/min "
            f"({r['median_s'][1] / r['n']:.3g} s/volume); 2 workers: {r['n'] * 60 / r['median_s'][2]:.3g} "
            f"volumes/min; speedup {r['speedup']:.2f}"
        )
    command = shlex.join(["python", "benchmarks/bench_prep_ct.py", *(sys.argv[1:] if argv is None else argv)])
    if args.update_readme:
        if args.quick:
            print("--quick: results are not written to the README")
        else:
            write_readme(args.readme, table_rows(results, shape, spacing_in, args.spacing, date, command, rounds))
            print(f"updated section '{SECTION}' of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
