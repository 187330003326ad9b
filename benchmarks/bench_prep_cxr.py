"""Images per second of the chest X-ray resize/cache path of ``data_prep``, with 1 and 2 workers.

What is timed is the production path: :func:`data_prep.common.run_items` over the converters'
own per-image functions, exactly as ``medspan prepare`` calls them:

* ``png``: :func:`data_prep.cxr_common.cache_picture` (NIH ChestX-ray14 / CheXpert / TB sets):
  decode an 8-bit 1024 x 1024 PNG, exact area resize to 512 x 512, write an 8-bit PNG atomically.
* ``dicom``: :func:`data_prep.vindr_cxr.cache_dicom` (VinDr-CXR): read a 1024 x 1024 12-bit
  MONOCHROME1 DICOM with a VOI window through ``read_dicom_2d`` (uncompressed, or JPEG-LS
  lossless with ``--dicom-syntax jpegls``), window + inversion, resize to 512, write the PNG.

The inputs are synthetic (a smooth chest-like phantom with mild noise, so PNG compression works
about as on real radiographs) and are generated into a temporary folder before timing. Each
timed run converts all N images into a fresh output folder, so nothing is skipped; the process
pool start-up is part of the time, as it is for a real conversion. 1- and 2-worker runs alternate
(1, 2, 2, 1, 1, 2, ...) so drifts of the machine hit both alike; the report gives the median
images/s of each and the speed-up (median 2-worker / median 1-worker).

Usage::

    python benchmarks/bench_prep_cxr.py                  # png + dicom, prints the report
    python benchmarks/bench_prep_cxr.py --update-readme  # ... and updates benchmarks/README.md
    python benchmarks/bench_prep_cxr.py --quick          # smoke check: tiny sizes; nothing written
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(HERE), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

from _table import markdown_table, merge_rows, parse_table, read_section, update_section

SECTION = "prep_cxr"
HEADER = ["format", "source -> cache", "workers", "images/s", "speed-up vs 1", "images x runs", "cpu",
          "logical cpus", "date", "command"]
KEY_COLUMNS = [0, 2, 6]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def phantom(size: int, seed: int) -> np.ndarray:
    """A smooth chest-like picture in [0, 1] (rows, cols): bright body, two dark lungs, mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    body = np.exp(-((x - 0.5) ** 2 / 0.18 + (y - 0.55) ** 2 / 0.35))
    lungs = sum(np.exp(-((x - cx) ** 2 / 0.012 + (y - 0.45) ** 2 / 0.05)) for cx in (0.3 + 0.01 * (seed % 3), 0.7))
    img = 0.15 + 0.7 * body - 0.45 * lungs + rng.normal(0, 0.01, (size, size))
    return np.clip(img, 0.0, 1.0)


def make_pngs(folder: Path, n: int, size: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:05d}_000.png"
        Image.fromarray(np.rint(phantom(size, i) * 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def make_dicoms(folder: Path, n: int, size: int, syntax: str) -> list[Path]:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
        stored = np.rint((1.0 - phantom(size, i)) * 4095).astype(np.uint16)  # MONOCHROME1: high = dark
        ds.set_pixel_data(stored, photometric_interpretation="MONOCHROME1", bits_stored=12)
        ds.WindowCenter, ds.WindowWidth = "2048", "4096"
        if syntax == "jpegls":
            ds.compress(JPEGLSLossless)
        p = folder / f"{i:032x}.dicom"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def jobs_for(fmt: str, sources: Sequence[Path], out: Path, out_size: int) -> tuple:
    from data_prep.cxr_common import CacheSpec, PictureJob, cache_picture
    from data_prep.vindr_cxr import DicomJob, cache_dicom

    spec = CacheSpec(size=out_size)
    if fmt == "png":
        return cache_picture, [PictureJob(p.stem, str(p), str(out / "images" / f"{p.stem}.png"), spec) for p in sources]
    return cache_dicom, [DicomJob(p.stem, str(p), str(out / "images" / f"{p.stem}.png"), spec) for p in sources]


def time_format(fmt: str, sources: Sequence[Path], work: Path, out_size: int, runs: int) -> dict[int, list[float]]:
    """Alternate 1- and 2-worker conversions of all sources; images/s of every run."""
    from data_prep.common import Report, run_items

    rates: dict[int, list[float]] = {1: [], 2: []}
    orders = [(1, 2), (2, 1)]
    k = 0
    for r in range(runs):
        for workers in orders[r % 2]:
            out = work / f"out_{fmt}_{k}"
            k += 1
            fn, jobs = jobs_for(fmt, sources, out, out_size)
            report = Report("bench", out)
            t0 = time.perf_counter()
            results = run_items(fn, jobs, workers=workers, report=report, progress=False)
            dt = time.perf_counter() - t0
            if report.problems or any(res is None or res["skipped"] for res in results):
                raise RuntimeError(f"benchmark conversion failed: {report.problems[:3]}")
            rates[workers].append(len(jobs) / dt)
            shutil.rmtree(out)
    return rates


def summarize(rates: dict[int, list[float]]) -> dict[str, float]:
    m1, m2 = statistics.median(rates[1]), statistics.median(rates[2])
    return {"w1": m1, "w2": m2, "speedup": m2 / m1}


def write_readme(readme: Path, rows: list[list[str]]) -> None:
    old = read_section(readme, SECTION) or ""
    header, old_rows = parse_table(old)
    if header != HEADER:
        old_rows = []
    update_section(readme, SECTION, markdown_table(HEADER, merge_rows(old_rows, rows, KEY_COLUMNS)))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one run (smoke check; nothing written)")
    p.add_argument("--only", choices=("png", "dicom"), default=None, help="one format")
    p.add_argument("--n", type=int, default=None, help="images per run (default 120 PNG / 60 DICOM)")
    p.add_argument("--runs", type=int, default=None, help="runs per worker count (default 3)")
    p.add_argument("--dicom-syntax", choices=("native", "jpegls"), default="native", help="DICOM transfer syntax")
    p.add_argument("--update-readme", action="store_true", help="write the rows into benchmarks/README.md")
    p.add_argument("--readme", type=Path, default=HERE / "README.md", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick and args.update_readme:
        print("--quick runs are smoke checks and are never written to the README", file=sys.stderr)
        return 2
    from medspan.data.readers import read_dicom_2d  # noqa: F401 - imported before the pools fork (as vindr_cxr does)

    src_size, out_size = (256, 128) if args.quick else (1024, 512)
    runs = args.runs or (1 if args.quick else 3)
    formats = [args.only] if args.only else ["png", "dicom"]
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d")
    command = "python benchmarks/bench_prep_cxr.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    rows: list[list[str]] = []
    print(f"{date} | {cpu_name()} | logical CPUs {os.cpu_count()} | {src_size} px -> {out_size} px")
    with tempfile.TemporaryDirectory(prefix="bench_prep_cxr_") as tmp:
        work = Path(tmp)
        for fmt in formats:
            n = args.n or (12 if args.quick else (120 if fmt == "png" else 60))
            t0 = time.perf_counter()
            if fmt == "png":
                sources = make_pngs(work / "src_png", n, src_size)
                what = f"8-bit PNG {src_size}² -> {out_size}² 8-bit PNG"
            else:
                sources = make_dicoms(work / "src_dicom", n, src_size, args.dicom_syntax)
                what = f"12-bit MONOCHROME1 DICOM ({args.dicom_syntax}) {src_size}² -> {out_size}² 8-bit PNG"
            print(f"[{fmt}] {n} inputs generated in {time.perf_counter() - t0:.1f} s; timing {runs} run(s) per worker count")
            s = summarize(time_format(fmt, sources, work, out_size, runs))
            print(f"  1 worker : {s['w1']:8.1f} images/s")
            print(f"  2 workers: {s['w2']:8.1f} images/s  (speed-up {s['speedup']:.2f})")
            for w in (1, 2):
                rows.append([fmt, what, str(w), f"{s[f'w{w}']:.1f}", "1.00" if w == 1 else f"{s['speedup']:.2f}",
                             f"{n} x {runs}", cpu_name(), str(os.cpu_count()), date, f"`{command.strip()}`"])
    if args.update_readme:
        write_readme(args.readme, rows)
        print(f"updated {args.readme} (section {SECTION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
