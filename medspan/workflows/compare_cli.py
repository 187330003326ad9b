"""``medspan compare``: scratch vs DINO vs SPAN (or any runs) x label fractions x seeds on a downstream bundle.

Runs ``bundles/cxr_<task>/train.json`` once per encoder x fraction x seed (in-process, MONAI
``ConfigWorkflow``), checks every encoder for collapse, and writes ``results.csv``, ``results.md``,
``results.png``, ``results.json`` and an MLflow parent run with one child per cell into ``--out``
(see :mod:`medspan.workflows.downstream`). Finished cells are skipped on a re-run. Paths are
relative to the current folder: run it from the repository root.

Examples::

    medspan compare --task seg --zero-label
    medspan compare --task cls --mode linear --fractions 0.1,1 --seeds 0,1,2 --set hparams::epochs=5
    medspan compare --task cls --encoders scratch=none,span=runs/nih_span,dino=runs/nih_span_baseline \\
        --datalist data/nih/cls_datalist.json --out runs/nih_compare
"""

from __future__ import annotations

import argparse
import shlex

from medspan.workflows.downstream import (
    DEFAULT_ENCODERS,
    compare,
    parse_encoders,
    parse_fractions,
    parse_seeds,
    parse_set,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``medspan compare``."""
    default_enc = ",".join(f"{k}={v or 'none'}" for k, v in DEFAULT_ENCODERS.items())
    parser.add_argument("--task", required=True, choices=["seg", "cls"], help="segmentation (cxr_seg) or classification (cxr_cls)")
    parser.add_argument("--mode", choices=["linear", "finetune"], help="cls only: linear probe or fine-tune (default: the bundle's)")
    parser.add_argument("--encoders", help=f"NAME=PATH,... (PATH: a pretraining run folder, a model.pt, or none); default {default_enc}")
    parser.add_argument("--fractions", default="0.01,0.1,1", help="label fractions in (0, 1] (default 0.01,0.1,1)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds per encoder and fraction (default 0,1,2)")
    parser.add_argument("--zero-label", action="store_true", help="seg only: add the zero-label rows (masks from the guided heads)")
    parser.add_argument("--datalist", help="the task's datalist (default: the bundle's synthetic set)")
    parser.add_argument("--out", help="output folder (default bundles/cxr_<task>/runs/compare, compare_<mode> with --mode)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra bundle override, e.g. hparams::epochs=5 (JSON values; repeatable)")
    parser.add_argument("--bundle", help="the bundle config (default bundles/cxr_<task>/train.json)")
    parser.add_argument("--no-health", action="store_true", help="skip the encoder collapse check")
    parser.add_argument("--no-mlflow", action="store_true", help="no MLflow parent/child runs")
    parser.add_argument("--tracking-uri", help="MLflow store (default sqlite:///<out>/mlruns.db)")


def command_line(args: argparse.Namespace) -> str:
    """The ``medspan compare`` command that reproduces ``args`` (options at their defaults left out).

    Example::

        >>> command_line(argparse.Namespace(task="seg", mode=None, fractions="0.1,1", zero_label=True))
        'medspan compare --task seg --fractions 0.1,1 --zero-label'
    """
    defaults = {"fractions": "0.01,0.1,1", "seeds": "0,1,2"}
    words = ["medspan", "compare"]
    for name, value in vars(args).items():
        if value is None or value is False or value == [] or defaults.get(name) == value:
            continue
        flag = "--set" if name == "overrides" else "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            for v in value:
                words += [flag, str(v)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    """Run the comparison and print ``results.md``. Exit code 0."""
    report = compare(
        args.task,
        encoders=None if args.encoders is None else parse_encoders(args.encoders),
        fractions=parse_fractions(args.fractions),
        seeds=parse_seeds(args.seeds),
        mode=args.mode,
        zero_label=args.zero_label,
        datalist=args.datalist,
        out=args.out,
        extra=parse_set(args.overrides),
        mlflow=not args.no_mlflow,
        tracking_uri=args.tracking_uri,
        bundle=args.bundle,
        health=not args.no_health,
        command=command_line(args),
    )
    print()
    print(report.markdown, flush=True)
    for name, path in report.files.items():
        print(f"[medspan] compare: {name}: {path}")
    return 0
