"""The ``kerntrace`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kerntrace``."""
    parser = argparse.ArgumentParser(
        prog="kerntrace",
        description="Trace a model's predictions back to its training data (TRAK).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="attribute a digit classifier's predictions (real data, no setup)",
        description="Train MLPs on scikit-learn's real handwritten digits, "
        "attribute each test digit to the training digits, measure the LDS and "
        "write an HTML report.",
    )
    demo.add_argument("--out", type=Path, default=Path("kerntrace-demo"))
    demo.add_argument("--checkpoints", type=int, default=5)
    demo.add_argument("--proj-dim", type=int, default=2048)
    demo.add_argument("--subsets", type=int, default=50)
    demo.add_argument("--no-lds", action="store_true", help="skip the LDS")
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a fast smoke run: 2 checkpoints, k=256, 6 subsets, short training",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress or log")
    return parser


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings(
        out=args.out,
        checkpoints=2 if args.quick else args.checkpoints,
        proj_dim=256 if args.quick else args.proj_dim,
        subsets=0 if args.no_lds else (6 if args.quick else args.subsets),
        steps=60 if args.quick else 300,
        progress=not args.quiet,
    )
    run_demo(settings)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from .errors import KerntraceError

    try:
        return {"demo": _demo}[args.command](args)
    except KerntraceError as error:
        print(f"kerntrace: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
