"""The ``medspan`` command.

Each sub-command lives next to the code it drives: the table below maps a command name to a
module that defines ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported
only when their command runs, so ``medspan --help`` stays fast.

A failure ends with ONE message (``[medspan] error: DataError: <file>: <problem>``) and a line
saying where the full traceback was logged; ``--debug`` (anywhere on the line) or
``MEDSPAN_DEBUG=1`` prints the traceback instead (see :func:`medspan.errors.report_failure`).
Ctrl-C prints one line.

Example::

    medspan synth cxr --out data/synth_cxr --n 200 --size 256
    medspan --debug info broken.dcm
    medspan --help
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from medspan.errors import report_failure

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("medspan.data.synthetic.cli", "generate phantom chest X-rays / chest CTs with masks and a datalist"),
    "overview": ("medspan.data.synthetic.overview", "draw a grid of synthetic samples with mask overlays (PNG)"),
    "check-datalist": ("medspan.data.datalist_cli", "validate a MONAI datalist JSON (files, keys, shapes)"),
    "info": ("medspan.data.info_cli", "read an image (DICOM, series folder, PNG, NIfTI...) and print shape, spacing, range"),
    "build-priors": ("medspan.atlas.build_cli", "register one labeled exemplar onto every image and write per-image priors"),
    "priors-report": ("medspan.atlas.report_cli", "Dice and quality report of a build-priors folder, with an overlay PNG"),
    "prepare": ("medspan.data_prep.cli", "convert a public dataset's own layout into MONAI datalists (medspan prepare --help)"),
    "compare": ("medspan.workflows.compare_cli", "scratch vs DINO vs SPAN x label fractions x seeds on cxr_seg/cxr_cls: table, plot, MLflow"),
}

#: commands whose outputs are written atomically item by item, so a re-run after Ctrl-C resumes
RESUMABLE: dict[str, str] = {
    "build-priors": "Finished images are kept; run the same command again to resume with the rest.",
    "prepare": "Finished items are kept; run the same command again to resume with the rest.",
    "compare": "Finished cells are kept; run the same command again to resume with the rest.",
}


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with one sub-parser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="medspan",
        description="medspan: anatomy-guided attention for self-supervised ViTs on medical images.",
    )
    from medspan import __version__

    parser.add_argument("--version", action="version", version=f"medspan {__version__}")
    parser.add_argument("--debug", action="store_true", help="print full tracebacks instead of one message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medspan`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    hint = RESUMABLE.get(argv[0]) if argv else None
    try:
        return _dispatch(argv)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the one top-level handler: one message, traceback logged
        return report_failure(exc, debug=True if debug else None, resume_hint=hint)


def _dispatch(argv: list[str]) -> int:
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help", "--version") or argv[0] not in COMMANDS:
        args = parser.parse_args(argv)  # prints help / version / the unknown-command error
        if args.command is None:
            parser.print_help()
        return 0
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"medspan {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
