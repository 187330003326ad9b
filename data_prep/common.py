"""What every converter shares: the problem report, parallel per-item work, resumability, exit codes.

A converter turns one dataset's own layout into MONAI datalists. Its per-item work (one image, one
series, one case) runs through :func:`run_items`, which never lets one bad item stop the others:
the item's error goes into the :class:`Report` with its reason. Outputs are written atomically
(``medspan.io``), so "the output file exists" means "this item is done" and a re-run skips it
(:func:`is_done`). At the end :func:`finish` writes ``report.json`` / ``report.txt`` beside the
datalists and returns the exit code: non-zero only when ``--strict`` was asked and problems exist.

Example::

    report = Report("nih_cxr14", out_dir)
    results = run_items(convert_one, rows, workers=2, report=report, key=lambda r: r["Image Index"])
    write_datalist(out_dir / "datalist.json", {"training": [...]})
    return finish(report, strict=args.strict)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from medspan.data.readers import non_finite_problem
from medspan.errors import DataError
from medspan.io import worker_pool, write_json_atomic, write_text_atomic

__all__ = [
    "Report",
    "add_common_arguments",
    "converter_main",
    "finish",
    "is_done",
    "refuse_non_finite",
    "run_converter",
    "run_items",
]

T = TypeVar("T")


class Report:
    """Problems (item, reason) and counters of one conversion run.

    Args:
        name: converter name (``nih_cxr14``, ``lidc_idri``...).
        out_dir: where ``report.json`` and ``report.txt`` go.
    """

    def __init__(self, name: str, out_dir: str | os.PathLike) -> None:
        self.name = name
        self.out_dir = Path(out_dir)
        self.problems: list[tuple[str, str]] = []
        self.counts: Counter[str] = Counter()
        self.started = time.time()

    def problem(self, item: Any, reason: str) -> None:
        """Record that ``item`` (a file, a CSV row, a series) was skipped because of ``reason``."""
        self.problems.append((str(item), str(reason)))

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to counter ``key`` (e.g. ``"images"``, ``"skipped_existing"``, ``"derived_objects"``)."""
        self.counts[key] += n

    @property
    def ok(self) -> bool:
        return not self.problems

    def write(self) -> Path:
        """Write ``report.json`` and a human-readable ``report.txt`` (atomically); returns the JSON path."""
        doc = {
            "converter": self.name,
            "seconds": round(time.time() - self.started, 3),
            "counts": dict(self.counts),
            "n_problems": len(self.problems),
            "problems": [{"item": i, "reason": r} for i, r in self.problems],
        }
        path = write_json_atomic(doc, self.out_dir / "report.json")
        lines = [f"{self.name}: {len(self.problems)} problem(s)"]
        lines += [f"  {k}: {v}" for k, v in sorted(self.counts.items())]
        lines += [f"{i}: {r}" for i, r in self.problems]
        write_text_atomic("\n".join(lines) + "\n", self.out_dir / "report.txt")
        return path


def _call(fn: Callable[[T], Any], item: T) -> tuple[bool, Any]:
    try:
        return True, fn(item)
    except Exception as e:  # one bad item never stops the others: it goes into the report
        return False, str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"


def run_items(
    fn: Callable[[T], Any],
    items: Sequence[T],
    workers: int = 1,
    report: Report | None = None,
    key: Callable[[T], Any] = str,
    desc: str = "",
    progress: bool = True,
) -> list[Any]:
    """Apply ``fn`` to every item (in processes when ``workers > 1``), in order, with a progress bar.

    ``fn`` must be a module-level function (picklable) when ``workers > 1``. An item whose ``fn``
    raises gives ``None`` in the result list and a problem ``(key(item), "<error>")`` in the report.

    Returns:
        the results, one per item (``None`` for failed items).
    """
    bar = tqdm(total=len(items), desc=desc or (report.name if report else ""), disable=not progress, file=sys.stderr)
    results: list[Any] = []
    try:
        if workers <= 1:
            outcomes: Iterable[tuple[bool, Any]] = (_call(fn, it) for it in items)
            for item, (ok, value) in zip(items, outcomes):
                results.append(_record(ok, value, item, report, key))
                bar.update(1)
        else:
            with worker_pool(workers) as pool:  # workers die with this process (no orphans on a kill)
                futures = [pool.submit(_call, fn, it) for it in items]
                for item, fut in zip(items, futures):
                    ok, value = fut.result()
                    results.append(_record(ok, value, item, report, key))
                    bar.update(1)
    finally:
        bar.close()
    return results


def _record(ok: bool, value: Any, item: Any, report: Report | None, key: Callable[[Any], Any]) -> Any:
    if ok:
        return value
    if report is not None:
        report.problem(key(item), value)
    return None


def refuse_non_finite(array: Any, where: str | os.PathLike) -> None:
    """Raise :class:`DataError` naming ``where`` when ``array`` holds NaN or infinite voxels.

    A converter calls it on every image it decodes: :func:`run_items` puts the error in the report
    (``problems``) and the image is left out of the datalist, since training on it gives NaN losses.
    """
    problem = non_finite_problem(array)
    if problem is not None:
        raise DataError(where, f"{problem}; left out (fix or drop the file)")


def is_done(*paths: str | os.PathLike) -> bool:
    """True when every output exists (outputs are written atomically, so existing means complete)."""
    return all(Path(p).is_file() and Path(p).stat().st_size > 0 for p in paths)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out``, ``--workers``, ``--strict``, ``--quiet``: the options every converter takes."""
    parser.add_argument("--out", required=True, help="output folder (datalists, converted files, report)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--strict", action="store_true", help="exit non-zero when any item had a problem")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def finish(report: Report, strict: bool = False, out=sys.stdout) -> int:
    """Write the report, print a summary, return the exit code (1 only if ``strict`` and problems)."""
    path = report.write()
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report.counts.items()))
    print(f"{report.name}: {counts or 'nothing done'}; {len(report.problems)} problem(s) (see {path})", file=out)
    return 1 if (strict and report.problems) else 0


def run_converter(name: str, convert: Callable[[], Any], strict: bool = False) -> int:
    """Run a converter's ``convert`` call the way its CLI does, and return the exit code.

    A fatal input problem (:class:`~medspan.errors.DataError` or ValueError: no such root, no CSV,
    bad option) prints ``<name>: error: <message>`` and gives 2. Otherwise ``convert()`` returns the
    :class:`Report` or ``(datalist path, Report)`` (the path is printed), and :func:`finish` gives
    the code: 1 only with ``strict`` and problems.

    Example::

        return run_converter("msd_lung", lambda: convert(args.root, args.out, workers=args.workers), args.strict)
    """
    try:
        result = convert()
    except (DataError, ValueError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    if isinstance(result, tuple):
        path, result = result
        print(f"datalist: {path}")
    return finish(result, strict=strict)


def converter_main(
    module: str,
    doc: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
) -> int:
    """The ``main`` of a converter module: parser ``python -m <module>`` described by the first line of ``doc``."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=(doc or module).splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
