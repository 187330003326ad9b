"""``medspan check-datalist``: validate a MONAI datalist JSON and summarise it.

Prints every problem found (one per line) and exits 1, or prints a summary (entries per
section and which optional keys they carry, structures, classes) and exits 0.

Example::

    medspan check-datalist data/synth_cxr/dataset.json --shapes
    # data/synth_cxr/dataset.json: OK
    #   name: synth_cxr
    #   training: 160 entries (label 160, prior 160)
    #   validation: 40 entries (label 40, prior 40)
    #   structures (3): left_lung, right_lung, heart
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medspan.data.datalist import datalist_sections, validate_datalist


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``medspan check-datalist``."""
    parser.add_argument("datalist", type=Path, help="the datalist JSON file")
    parser.add_argument(
        "--shapes", action="store_true", help="also compare image/label/prior shapes (reads headers only)"
    )
    parser.add_argument(
        "--section", action="append", default=None, metavar="NAME",
        help="check only this section (repeatable; default: every section in the file)",
    )
    parser.add_argument(
        "--require", nargs="+", default=["image"], metavar="KEY",
        help="keys every entry must have (default: image)",
    )
    parser.add_argument(
        "--base-dir", type=Path, default=None, help="folder relative paths start from (default: the datalist's)"
    )


def summary(path: Path) -> list[str]:
    """Summary lines of a (valid) datalist: name, entries per section, structures, classes."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    lines = [f"{path}: OK"]
    if "name" in data:
        lines.append(f"  name: {data['name']}")
    for section in datalist_sections(data):
        entries = [e if isinstance(e, dict) else {"image": e} for e in data[section]]
        keys: dict[str, int] = {}
        for e in entries:
            for k in e:
                if k not in ("image", "case_id"):
                    keys[k] = keys.get(k, 0) + 1
        extra = f" ({', '.join(f'{k} {n}' for k, n in keys.items())})" if keys else ""
        lines.append(f"  {section}: {len(entries)} entries{extra}")
    for key in ("structures", "classes"):
        if key in data:
            lines.append(f"  {key} ({len(data[key])}): {', '.join(map(str, data[key]))}")
    return lines


def run(args: argparse.Namespace) -> int:
    """Check the datalist; print the problems (exit 1) or the summary (exit 0)."""
    problems = validate_datalist(
        args.datalist,
        sections=args.section,
        require=tuple(args.require),
        check_files=True,
        check_shapes=args.shapes,
        base_dir=args.base_dir,
    )
    if problems:
        for p in problems:
            print(p)
        print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {args.datalist}")
        return 1
    print("\n".join(summary(args.datalist)))
    return 0
