"""The ``kerntrace`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["main", "build_parser"]


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum``."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an integer, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return convert


def _add_run_options(parser: argparse.ArgumentParser, out: str, quick: str) -> None:
    """The options the demo-like commands share."""
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(out),
        help=f"directory for the store, models and report (default: {out})",
    )
    parser.add_argument(
        "--checkpoints",
        type=_at_least(1),
        default=5,
        help="independently trained models to ensemble (default: 5)",
    )
    parser.add_argument(
        "--proj-dim",
        type=_at_least(1),
        default=2048,
        help="k, the number of features per example (default: 2048)",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"a fast smoke run: {quick}"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress or log")


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
    _add_run_options(
        demo, "kerntrace-demo", "2 checkpoints, k=256, 6 subsets, short training"
    )
    demo.add_argument(
        "--subsets",
        type=_at_least(2),
        default=50,
        help="random half-size train subsets retrained for the LDS (default: 50)",
    )
    demo.add_argument("--no-lds", action="store_true", help="skip the LDS")

    audit = commands.add_parser(
        "audit",
        help="find flipped labels among the demo's digits by self-influence",
        description="Flip a share of the 1,200 training digits' labels, train the "
        "demo's MLPs on them, rank the training digits by self-influence and "
        "report how well the flipped ones come first (detection AUC).",
    )
    _add_run_options(audit, "kerntrace-audit", "2 checkpoints, k=256, short training")
    audit.add_argument(
        "--fraction", type=float, default=0.1, help="share of labels flipped"
    )

    lds = commands.add_parser(
        "lds",
        help="the linear datamodeling score of scores saved as .npy files",
        description="Compute the LDS from attribution scores, subset masks and "
        "the outputs of models retrained on those subsets, all .npy files.",
    )
    lds.add_argument(
        "--scores", type=Path, required=True, help="(n_train, n_targets) scores"
    )
    lds.add_argument(
        "--masks", type=Path, required=True, help="(n_subsets, n_train) bool masks"
    )
    lds.add_argument(
        "--outputs",
        type=Path,
        required=True,
        help="(n_subsets, n_targets) outputs of the retrained models",
    )
    lds.add_argument("--quiet", action="store_true", help="no log")
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


def _audit(args: argparse.Namespace) -> int:
    from .demo import AuditDemoSettings, run_audit_demo

    settings = AuditDemoSettings(
        out=args.out,
        fraction=args.fraction,
        checkpoints=2 if args.quick else args.checkpoints,
        proj_dim=256 if args.quick else args.proj_dim,
        steps=60 if args.quick else 300,
        progress=not args.quiet,
    )
    run_audit_demo(settings)
    return 0


def _load_npy(path: Path, what: str, ndim: int) -> np.ndarray:
    from .errors import ConfigurationError

    if not path.is_file():
        raise ConfigurationError(f"--{what} file {str(path)!r} does not exist")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ConfigurationError(
            f"--{what} file {str(path)!r} is not a .npy array ({error})"
        ) from error
    if array.ndim != ndim:
        raise ConfigurationError(
            f"--{what} file {str(path)!r} holds an array of shape {array.shape}; "
            f"expected {ndim} dimensions"
        )
    return array


def _lds(args: argparse.Namespace) -> int:
    from .errors import ConfigurationError
    from .evaluate import lds

    scores = _load_npy(args.scores, "scores", 2)
    masks = _load_npy(args.masks, "masks", 2)
    outputs = _load_npy(args.outputs, "outputs", 2)
    if masks.dtype != np.bool_ and not (
        np.issubdtype(masks.dtype, np.integer) and np.isin(masks, (0, 1)).all()
    ):
        raise ConfigurationError(
            f"--masks file {str(args.masks)!r} must hold booleans (or 0/1), got "
            f"dtype {masks.dtype}"
        )
    n_train, n_targets = scores.shape
    if masks.shape[1] != n_train:
        raise ConfigurationError(
            f"--masks file {str(args.masks)!r} has shape {masks.shape}, but "
            f"--scores {str(args.scores)!r} has shape {scores.shape}: masks need "
            f"shape (n_subsets, n_train={n_train})"
        )
    if outputs.shape != (masks.shape[0], n_targets):
        raise ConfigurationError(
            f"--outputs file {str(args.outputs)!r} has shape {outputs.shape}; "
            f"expected (n_subsets={masks.shape[0]}, n_targets={n_targets}) from "
            f"--masks {masks.shape} and --scores {scores.shape}"
        )
    result = lds(scores, masks.astype(bool), outputs)
    low, high = result.interval
    valid = int(np.isfinite(result.per_target).sum())
    print(
        f"LDS {result.value:.6f} (95% CI {low:.6f} to {high:.6f}) over {valid} "
        f"of {n_targets} targets and {masks.shape[0]} subsets"
    )
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
        return {"demo": _demo, "audit": _audit, "lds": _lds}[args.command](args)
    except KerntraceError as error:
        print(f"kerntrace: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"kerntrace: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "kerntrace: interrupted; rerun the same command to resume from the "
            "results already saved",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
